"""The benchmarks run on the CPU and write what they printed (short forms: tiny models, few steps)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

BENCH = [sys.executable, str(ROOT / "bench" / "bench.py"), "--preset", "tiny", "--device", "cpu"]
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if "def main(" in p.read_text())


def bench_module(name: str):
    """A module of bench/ loaded from its file (the scripts import these as siblings)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_writes_forward_sampling_and_training_numbers(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--forward-batches", "1", "2", "--sampling-variants", "fp32", "--sampling-repeat", "1"]
    args += ["--train-steps", "1"]
    args += ["--train-cases", "32:plain", "32:ckpt", "32:blocks+ckpt", "32:blocks@0.5", "--profile"]
    args += ["--inductor", "coordinate_descent_tuning=true", "fallback_random=true"]
    r = subprocess.run([*BENCH, *args, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["params"] > 0 and res["gflops_per_image_forward"] > 0 and res["matmul_tflops"] > 0
    assert set(res["forward_s"]["eager"]) == {"1", "2"} and all(v > 0 for v in res["forward_s"]["eager"].values())
    q1, q3 = res["forward_quartiles_s"]["eager"]["2"]
    assert 0 < q1 <= res["forward_s"]["eager"]["2"] <= q3
    assert res["sampling_s"]["fp32/dpm++2m_25"] > 0 and 0 < res["sampling_fraction_of_matmul"]["fp32/dpm++2m_25"]
    assert set(res["sampling_s"]) == {"fp32/dpm++2m_25"}  # only the variants asked for
    assert res["train"]["b32_nockpt"]["img_per_s"] > 0 and res["train"]["b32_ckpt"]["img_per_s"] > 0
    assert res["train"]["b32_ckpt_compile_blocks"]["img_per_s"] > 0  # regional compilation inside checkpointing
    assert res["train"]["b32_nockpt_compile_blocks_budget0.5"]["img_per_s"] > 0  # a compiled-backward memory budget
    assert res["inductor"] == {"coordinate_descent_tuning": True, "fallback_random": True}  # compiler settings
    assert res["forward_profile"]["eager"][0]["ms"] > 0 and "profile of eager, batch 2" in r.stdout
    assert "forward eager  batch    2" in r.stdout and f"wrote {out}" in r.stdout


def test_bench_prints_the_resolved_defaults_of_the_device():
    r = subprocess.run([*BENCH, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads(r.stdout.split("config:", 1)[1].splitlines()[0])
    assert config["forward_batches"] == [1, 4, 8] and config["forward_variants"] == ["eager"]
    assert config["sampling_variants"] == ["fp32", "fp32+compile"] and config["images"] == 4
    assert config["train_cases"] == ["32:plain", "32:ckpt"] and config["sections"] == ["forward", "sampling", "train"]
    assert "forward_s" not in r.stdout and "parameters" not in r.stdout  # nothing ran
    r = subprocess.run([*BENCH, "--amp", "bf16", "--skip", "train", "--dry-run"], capture_output=True, text=True)
    config = json.loads(r.stdout.split("config:", 1)[1].splitlines()[0])
    assert config["sampling_variants"] == ["fp32", "fp32+compile", "bf16"]
    assert config["sections"] == ["forward", "sampling"]
    r = subprocess.run([*BENCH, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Defaults on this machine (--device cpu):" in r.stdout
    assert "train_cases: 32:plain 32:ckpt" in r.stdout


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
    r = subprocess.run([*BENCH, "--train-batches", "64", "128", "--train-compile"], capture_output=True, text=True)
    assert r.returncode == 2 and "--train-batches was merged into another flag: use --train-cases" in r.stderr


def test_one_timing_helper_warms_up_repeats_and_summarises():
    timing = bench_module("timing")
    calls = []
    t = timing.measure(lambda: calls.append(1), torch.device("cpu"), warmup=3, repeat=4)
    assert len(calls) == 7 and len(t.times_s) == 4 and t.first_s is not None
    s = timing.summarise([4.0, 1.0, 3.0, 2.0])
    assert s.median_s == 3.0 and s.quartiles_s == (1.75, 3.25)  # the upper median, as always reported
    assert timing.summarise([2.0]).quartiles_s == (2.0, 2.0)
    with pytest.raises(ValueError):
        timing.measure(lambda: None, torch.device("cpu"), repeat=0)


def test_train_cases_name_their_results():
    modes = bench_module("modes")
    case = modes.parse_train_case("128:blocks@0.25")
    assert case == (128, "blocks", 0.25) and case.compiled == "blocks" and not case.checkpointing
    assert case.key == "b128_nockpt_compile_blocks_budget0.25" and case.spec == "128:blocks@0.25"
    assert modes.parse_train_case("64:compile+ckpt").key == "b64_ckpt_compile"
    assert modes.parse_train_case("32:plain").key == "b32_nockpt"


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


def test_app_latency_times_the_served_app_through_its_api(tmp_path):
    out = tmp_path / "latency.json"
    cmd = [sys.executable, str(ROOT / "bench" / "app_latency.py"), "--no-compile", "--steps", "2", "--images", "1"]
    cmd += ["--repeat", "2", "--warmup", "1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["model"] == "mrdit-emoji-32" and not res["compiled"] and len(res["rounds"]) == 2  # the app's default
    assert 0 < res["first_preview_s"] <= res["streamed_total_s"] and res["plain_sampling_s"] > 0
    assert "first preview after" in r.stdout and f"wrote {out}" in r.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_bench_script_has_a_help(script):
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr[-2000:]


def test_a_baseline_revision_is_exported_whole_and_a_bad_one_is_a_clear_error():
    app_server = bench_module("app_server")
    head = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:app.py"], capture_output=True, text=True, check=True)
    with app_server.exported_revision("HEAD") as root:
        assert (root / "app.py").read_text() == head.stdout
        assert (root / "mrdit" / "__init__.py").is_file() and (root / "weights").is_dir()
    assert not root.exists()  # removed with the block
    with pytest.raises(SystemExit, match="cannot export git revision 'no-such-rev'"):
        with app_server.exported_revision("no-such-rev"):
            pass


def test_the_baseline_revision_is_measured_first_from_its_own_folder():
    import argparse

    app_server = bench_module("app_server")
    seen = []

    def measure(args, env, root):
        seen.append((env, root, (root / "app.py").is_file()))
        return {"ok": True}

    args = argparse.Namespace(baseline_rev="HEAD", baseline_env=["MRDIT_BATCH=0"], env=["MRDIT_BATCH=1"])
    runs = app_server.baseline_then_measured(args, measure)
    assert runs == {"baseline": {"ok": True, "rev": "HEAD"}, "measured": {"ok": True}}
    (base_env, base_root, base_app), (env, root, _) = seen
    assert base_env == {"MRDIT_BATCH": "0"} and env == {"MRDIT_BATCH": "1"}
    assert base_root != app_server.ROOT and base_app and root == app_server.ROOT


def test_load_generator_shares_one_tls_context_unless_asked(tmp_path, monkeypatch):
    import ssl

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # load.py imports its siblings, as when run as a script
    load = bench_module("load")
    made = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: made.append(1) or real(*a, **k))
    counts = {}
    for flag in ([], ["--tls-per-request"]):
        made.clear()
        out = tmp_path / f"load{len(flag)}.json"
        args = ["--users", "2", "--seconds", "3", "--steps", "2", "--images", "1", "--out", str(out), *flag]
        assert load.main(args) == 0
        res = json.loads(out.read_text())
        assert res["completed"] > 0 and res["errors"] == 0 and res["isolation_violations"] == 0
        assert res["tls_per_request"] == bool(flag) and res["cpu_s"]["server"] > 0
        counts[bool(flag)] = (len(made), res["completed"] + res["step_mode_steps"])
    shared, requests = counts[False]
    assert requests >= 6 and shared <= 3  # the shared one, and one in each client's start-up at most: not per request
    assert counts[True][0] > counts[True][1]  # gradio_client's default: at least one per request
