"""The speed benchmark runs on the CPU and writes what it printed (short form: a tiny random model)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

BENCH = [sys.executable, str(ROOT / "bench" / "bench.py"), "--preset", "tiny", "--device", "cpu"]


def test_bench_writes_forward_sampling_and_training_numbers(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--forward-batches", "1", "2", "--no-compile", "--sampling-repeat", "1", "--train-steps", "1"]
    args += ["--train-cases", "32:plain", "32:ckpt", "32:blocks+ckpt", "32:blocks@0.5", "--profile"]
    args += ["--inductor", "coordinate_descent_tuning=true", "fallback_random=true"]
    r = subprocess.run([*BENCH, *args, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["params"] > 0 and res["gflops_per_image_forward"] > 0 and res["matmul_tflops"] > 0
    assert set(res["forward_s"]["eager"]) == {"1", "2"} and all(v > 0 for v in res["forward_s"]["eager"].values())
    assert res["sampling_s"]["fp32/dpm++2m_25"] > 0 and 0 < res["sampling_fraction_of_matmul"]["fp32/dpm++2m_25"]
    assert res["train"]["b32_nockpt"]["img_per_s"] > 0 and res["train"]["b32_ckpt"]["img_per_s"] > 0
    assert res["train"]["b32_ckpt_compile_blocks"]["img_per_s"] > 0  # regional compilation inside checkpointing
    assert res["train"]["b32_nockpt_compile_blocks_budget0.5"]["img_per_s"] > 0  # a compiled-backward memory budget
    assert res["inductor"] == {"coordinate_descent_tuning": True, "fallback_random": True}  # compiler settings
    assert res["forward_profile"]["eager"][0]["ms"] > 0 and "profile of eager, batch 2" in r.stdout
    assert "forward eager  batch    2" in r.stdout and f"wrote {out}" in r.stdout


def test_bench_rejects_variants_it_cannot_run_here(tmp_path):
    r = subprocess.run(
        [*BENCH, "--skip", "train", "sampling", "--forward-variants", "graphs"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "needs a CUDA device" in r.stderr
    r = subprocess.run(
        [*BENCH, "--skip", "train", "forward", "--sampling-variants", "bf16+graphs"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "bf16+graphs not available here" in r.stderr
    r = subprocess.run([*BENCH, "--train-cases", "128:fast"], capture_output=True, text=True)
    assert r.returncode == 2 and "expected BATCH:MODE[@BUDGET]" in r.stderr
    r = subprocess.run([*BENCH, "--inductor", "no_such_setting=1"], capture_output=True, text=True)
    assert r.returncode == 2 and "expected KEY=VALUE with KEY a torch._inductor.config name" in r.stderr


def test_saved_memory_counts_less_with_a_memory_budget(tmp_path):
    out = tmp_path / "saved.json"
    cmd = [sys.executable, str(ROOT / "bench" / "saved_memory.py"), "--preset", "tiny", "--batch", "8"]
    r = subprocess.run([*cmd, "--cases", "0:plain", "0:blocks@0.25", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    kept = json.loads(out.read_text())["kept_mib"]
    assert 0 < kept["blocks@0.25"] < kept["plain"]  # the compiled backward recomputes instead of keeping
    r = subprocess.run([*cmd, "--cases", "0:ckpt"], capture_output=True, text=True)
    assert r.returncode == 2 and "checkpointing hides" in r.stderr


def test_gpu_smoke_runs_on_the_cpu_with_a_small_preset(tmp_path):
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--device", "cpu", "--vae", "tiny"]
    cmd += ["--official-config", str(ROOT / "tests" / "data" / "parity" / "tiny_2r.json"), "--steps", "3"]
    r = subprocess.run([*cmd, "--images", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert 0 < res["first_preview_s"] <= res["first_total_s"] and 0 < res["second_preview_s"] <= res["second_total_s"]
    assert res["peak_memory_mib"] > 0 and "first preview after" in r.stdout and "peak memory" in r.stdout


def test_preview_overhead_bench_reports_both_ratios(tmp_path):
    out = tmp_path / "preview.json"
    cmd = [sys.executable, str(ROOT / "bench" / "preview_overhead.py"), "--vae", "tiny", "--steps", "3"]
    r = subprocess.run(
        [*cmd, "--images", "2", "--repeat", "1", "--full-steps", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["sampling_plain_s"] > 0 and res["ratio_within_runs"] >= 1 and res["full_vae_ratio_within_run"] > 1
    assert "within the previewing runs" in r.stdout
