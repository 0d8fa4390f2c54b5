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
from PIL import Image

from mrdit import build_model, get_preset
from mrdit.config import ModelConfig
from mrdit.data import ImageFolderDataset
from mrdit.schedule import NoiseSchedule
from mrdit.training import StepBatches, TrainConfig, load_latest_state, step_batches

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TRAIN = str(ROOT / "train" / "train.py")
# Two processes launched through accelerate's torchrun path; without a GPU each runs on the CPU over gloo.
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH_2 += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]

# The runs differ only in the order of float sums: DDP averages two per-rank gradient means (gloo
# all-reduce) where one process takes one mean over the batch, about 1e-7 relative per sum. AdamW then
# divides each gradient entry by the root of its second moment, so an entry that is a sum of cancelling
# terms (rounding error large against its size) can move its weight by a visible fraction of the step
# size lr: the largest single difference is data-dependent (measured 4.9e-7 to 1.8e-5 over three
# random emoji sets, against 2 lr = 2e-3 per step at most). Such entries are few, so the test compares
# the whole update: |w_1 - w_2| / |w_1 - w_0| over all weights (L2, w_0 the shared initial weights).
# Measured: 4.2e-6; 1e-3 leaves room for other data and CPUs, while any change of the examples' draws
# changes the update completely (turning flips off: 0.99, asserted below with 0.1).
REL_TOL = 1e-3


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


def _relative_difference(a: dict, b: dict, start: dict) -> float:
    """|a - b| / |a - start| over all weights together (L2)."""
    assert a.keys() == b.keys() == start.keys()
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    den = sum(float((a[k].double() - start[k].double()).square().sum()) for k in a)
    return (num / den) ** 0.5


def test_two_processes_at_batch_b_train_the_one_process_model_at_2b(tmp_path, emoji_data):
    pytest.importorskip("accelerate")
    cfg = _config(tmp_path, emoji_data, "cfg")
    one, two = tmp_path / "one", tmp_path / "two"
    _train([sys.executable, TRAIN, "--config", str(cfg), "--run-dir", str(one)])
    r = _train([*LAUNCH_2, TRAIN, "--config", str(cfg), "--run-dir", str(two)])
    assert "processes: 2" in r.stdout
    a, b = load_latest_state(one), load_latest_state(two)
    assert a["step"] == b["step"] == 4
    torch.manual_seed(0)  # the run's seed: train.py builds the model right after seeding
    start = build_model(ModelConfig.from_dict(json.loads((one / "model_config.json").read_text()))).state_dict()
    model_rel = _relative_difference(a["model"], b["model"], start)
    ema_rel = _relative_difference(a["ema"], b["ema"], start)
    largest = max(float((a["model"][k] - b["model"][k]).abs().max()) for k in start)
    print(f"one process vs two: relative {model_rel:.3g} (EMA {ema_rel:.3g}), largest weight difference {largest:.3g}")
    assert model_rel < REL_TOL and ema_rel < REL_TOL

    # The tolerance tells runs apart: other draws for the same examples (no flips) change the update.
    other = tmp_path / "other"
    _train(
        [
            sys.executable,
            TRAIN,
            "--config",
            str(_config(tmp_path, emoji_data, "noflip", flips=False)),
            "--run-dir",
            str(other),
        ]
    )
    changed = _relative_difference(a["model"], load_latest_state(other)["model"], start)
    print(f"flips off: relative {changed:.3g}")
    assert changed > 0.1


def test_ranks_split_the_global_batch_and_workers_prepare_the_same_batches(tmp_path):
    for c, colour in enumerate([(200, 30, 30), (30, 30, 200)]):  # an image folder: decoded in the workers
        (tmp_path / f"class{c}").mkdir()
        for i in range(5):
            im = Image.new("RGB", (24 + i, 20), (255, 255, 255))
            im.paste(Image.new("RGB", (8 + i, 20), colour))
            im.save(tmp_path / f"class{c}" / f"{i}.png")
    data = ImageFolderDataset(tmp_path, 16)
    schedule = NoiseSchedule(get_preset("tiny").schedule)
    cfg = TrainConfig(batch_size=8, seed=3)
    whole = StepBatches(data, schedule, 2, cfg)[5]
    halves = [StepBatches(data, schedule, 2, cfg, rank, 2)[5] for rank in range(2)]
    for full, parts in zip(whole, zip(*halves, strict=True), strict=True):
        assert torch.equal(full, torch.cat(parts))  # each rank draws its examples' own noise, flips and labels
    plain = list(step_batches(StepBatches(data, schedule, 2, cfg, 1, 2), 2, 6, workers=0))
    ahead = list(step_batches(StepBatches(data, schedule, 2, cfg, 1, 2), 2, 6, workers=2))
    assert len(plain) == len(ahead) == 4
    for p, q in zip(plain, ahead, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(p, q, strict=True))
    assert not torch.equal(plain[0][3], plain[1][3])  # and steps differ from each other
