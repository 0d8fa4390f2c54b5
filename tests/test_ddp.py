"""Data parallelism computes the single-process model: two gloo CPU processes at batch B each end
with the weights one process reaches at batch 2B, and batches prepared in data-loader workers are the
ones the loop prepares itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from mrdit import get_preset
from mrdit.data import load_emoji
from mrdit.schedule import NoiseSchedule
from mrdit.training import StepBatches, TrainConfig, load_latest_state, step_batches

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TRAIN = str(ROOT / "train" / "train.py")
# Two processes launched through accelerate's torchrun path; without a GPU each runs on the CPU over gloo.
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH_2 += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]

# Float32 weights after 4 AdamW steps at lr 1e-3. The runs differ only in the order of float sums:
# DDP averages two per-rank gradient means (gloo all-reduce) where one process takes one mean over the
# batch. A gradient entry that is a sum of cancelling terms has an absolute rounding error of about
# 1e-7 of the terms, not of the sum, so small entries carry large relative errors, and Adam, which
# divides by the root of the second moment, turns them into update differences of up to the
# step size lr (a sign flip: at most 2 lr per step, 8e-3 over 4 steps). Measured on this tiny run:
# 1.75e-6 for the model, 1.33e-6 for the EMA (`pytest tests/test_ddp.py -s` prints both); 1e-5 leaves
# room for other CPUs' summation orders, while a run with another seed differs by far more (asserted).
ATOL = 1e-5


def _config(tmp_path, data, name, **over):
    cfg = json.loads((ROOT / "train" / "configs" / "tiny.json").read_text())
    cfg |= {"data_path": str(data), "threads": 1, "batch_size": 8, "steps": 4, "save_every": 4}
    cfg |= {"sample_every": 0, "log_every": 2, "warmup_steps": 0} | over
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _train(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_processes_at_batch_b_train_the_one_process_model_at_2b(tmp_path, emoji_data):
    pytest.importorskip("accelerate")
    cfg = _config(tmp_path, emoji_data, "cfg")
    one, two = tmp_path / "one", tmp_path / "two"
    _train([sys.executable, TRAIN, "--config", str(cfg), "--run-dir", str(one)])
    r = _train([*LAUNCH_2, TRAIN, "--config", str(cfg), "--run-dir", str(two)])
    assert "processes: 2" in r.stdout
    a, b = load_latest_state(one), load_latest_state(two)
    assert a["step"] == b["step"] == 4
    model_diff, ema_diff = _max_difference(a["model"], b["model"]), _max_difference(a["ema"], b["ema"])
    print(f"max |one process - two processes|: model {model_diff:.3g}, EMA {ema_diff:.3g}")
    assert model_diff < ATOL and ema_diff < ATOL

    # The tolerance can tell runs apart: a different seed (other noise and batches) moves weights far more.
    other = tmp_path / "other"
    _train(
        [
            sys.executable,
            TRAIN,
            "--config",
            str(_config(tmp_path, emoji_data, "seed1", seed=1)),
            "--run-dir",
            str(other),
        ]
    )
    seed_diff = _max_difference(a["model"], load_latest_state(other)["model"])
    print(f"max |seed 0 - seed 1|: {seed_diff:.3g}")
    assert seed_diff > 100 * ATOL


def test_ranks_split_the_global_batch_and_workers_prepare_the_same_batches(emoji_data):
    data = load_emoji(emoji_data, "train", 16)
    schedule = NoiseSchedule(get_preset("tiny").schedule)
    cfg = TrainConfig(batch_size=8, seed=3)
    whole = StepBatches(data, schedule, 12, cfg)[5]
    halves = [StepBatches(data, schedule, 12, cfg, rank, 2)[5] for rank in range(2)]
    for full, parts in zip(whole, zip(*halves, strict=True), strict=True):
        assert torch.equal(full, torch.cat(parts))  # each rank draws its examples' own noise, flips and labels
    plain = list(step_batches(StepBatches(data, schedule, 12, cfg, 1, 2), 2, 6, workers=0))
    ahead = list(step_batches(StepBatches(data, schedule, 12, cfg, 1, 2), 2, 6, workers=2))
    assert len(plain) == len(ahead) == 4
    for p, q in zip(plain, ahead, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(p, q, strict=True))
    assert not torch.equal(plain[0][3], plain[1][3])  # and steps differ from each other
