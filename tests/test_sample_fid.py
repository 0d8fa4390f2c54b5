"""The FID sample set: the same arrays from one process and from two, class-balanced, resumable, in the
ADM evaluation suite's `.npz` layout."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "train"))
from sample_fid import PRESETS, Plan, write_npz  # noqa: E402

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SCRIPT = str(ROOT / "train" / "sample_fid.py")
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH_2 += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# A stochastic sampler, so each image's own noise stream is exercised too.
FLAGS = ["--num", "10", "--chunk", "4", "--sampler", "dpm++2m-sde", "--steps", "3", "--guidance", "2"]


def _draw(prefix: list[str], model, out, *extra) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [*prefix, SCRIPT, str(model), "--out", str(out), *FLAGS, *extra],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_one_and_two_processes_write_identical_arrays_and_a_resume_draws_only_what_is_missing(tmp_path, tiny_model_dir):
    pytest.importorskip("accelerate")
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    _draw([sys.executable], tiny_model_dir, one)
    r = _draw(LAUNCH_2, tiny_model_dir, two)
    assert "process 1: 1 of 3 chunks" in r.stdout
    a, b = np.load(one), np.load(two)
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (10, 16, 16, 3)  # NHWC
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert a["arr_1"].tolist() == [0, 1] * 5  # two classes, equally often
    assert len({im.tobytes() for im in a["arr_0"]}) == 10  # one seed per image: no repeats

    # After a lost chunk (a kill mid-way leaves no partial file), the same command draws only that one.
    (tmp_path / "one.npz.parts" / "part-000001.npz").unlink()
    one.unlink()
    r = _draw([sys.executable], tiny_model_dir, one)
    assert "3 of 3 chunks, 1 to draw" in r.stdout
    assert np.array_equal(np.load(one)["arr_0"], b["arr_0"])

    # Other settings are refused in the same folder rather than mixed into one set.
    r = subprocess.run(
        [sys.executable, SCRIPT, str(tiny_model_dir), "--out", str(one), *FLAGS, "--seed", "5"],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "seed" in r.stderr


def test_streamed_npz_reads_like_numpy_savez(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for n in (3, 3, 1)]
    parts = []
    for k, x in enumerate(chunks):
        parts.append(tmp_path / f"p{k}.npz")
        np.savez(parts[-1], arr_0=x, arr_1=np.full(len(x), k))
    write_npz(tmp_path / "all.npz", parts, (4, 4, 3), 7)
    with np.load(tmp_path / "all.npz") as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        assert np.array_equal(z["arr_0"], np.concatenate(chunks)) and z["arr_1"].tolist() == [0, 0, 0, 1, 1, 1, 2]


def test_plan_is_class_balanced_and_the_release_preset_is_the_release_sampler():
    plan = Plan(num=50_000, classes=1000, seed=0, chunk=64)
    labels = np.concatenate([plan.labels(c) for c in range(plan.chunks)])
    assert len(labels) == 50_000 and np.bincount(labels).tolist() == [50] * 1000
    assert plan.seeds(plan.chunks - 1)[-1] == 49_999
    assert PRESETS["release"] == {
        "sampler": "dpm-fast",
        "steps": 250,
        "guidance": 1.4,
        "guidance_schedule": "constant",
        "guidance_power": 1.0,
    }
