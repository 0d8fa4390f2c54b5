"""Sharded latents: the reader returns the rows asked for, the encoder resumes after SIGKILL without
redoing finished shards and writes the same shards on two processes, and two processes train on them
(sample grids decoded by the configured autoencoder) and export."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, tiny_vae
from PIL import Image
from safetensors.torch import load_file

from mrdit import get_preset, load_model
from mrdit.config import AutoencoderConfig
from mrdit.data import ImageFolderDataset, posterior_sample
from mrdit.pipeline import PixelDecoder
from mrdit.rng import example_generators
from mrdit.shards import INDEX_NAME, ShardedLatentDataset, shard_name, shard_rows, write_index, write_shard

sys.path.insert(0, str(ROOT / "train"))
from encode_latents import posteriors  # noqa: E402

import train  # noqa: E402

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
ENCODE = [sys.executable, str(ROOT / "train" / "encode_latents.py")]
TRAIN = str(ROOT / "train" / "train.py")
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH_2 += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _random_shards(folder, counts, shape=(4, 2, 2)):
    g = torch.Generator().manual_seed(0)
    whole = {"mean": [], "logvar": [], "labels": []}
    for k, n in enumerate(counts):
        t = {
            "mean": torch.randn((n, 2, *shape), generator=g),
            "logvar": torch.randn((n, 2, *shape), generator=g) - 2,
            "labels": torch.randint(0, 3, (n,), generator=g),
        }
        write_shard(folder, k, t)
        for key in whole:
            whole[key].append(t[key])
    meta = {"class_names": ["a", "b", "c"], "latent_shape": list(shape)}
    write_index(folder, meta, counts)
    return {k: torch.cat(v) for k, v in whole.items()}


def test_reader_returns_the_rows_and_posteriors_asked_for(tmp_path):
    whole = _random_shards(tmp_path, [5, 5, 3])
    ds = ShardedLatentDataset(tmp_path, scale_factor=0.5)
    assert len(ds) == 13 and ds.image_size == 2 and torch.equal(ds.labels, whole["labels"])
    idx = torch.tensor([12, 0, 7, 4, 5, 7])  # across shards, repeats, the last row of the last shard
    flips = torch.tensor([True, False, True, False, True, False])
    z, y = ds.batch(idx, flips, example_generators(0, 3, range(6)))
    which = flips.long()
    want = posterior_sample(
        whole["mean"][idx, which], whole["logvar"][idx, which], 0.5, example_generators(0, 3, range(6))
    )
    assert torch.equal(z, want) and torch.equal(y, whole["labels"][idx])
    with pytest.raises(IndexError, match="13 examples"):
        ds.batch(torch.tensor([13]))


def test_unfinished_folders_and_damaged_shards_are_recognised(tmp_path):
    _random_shards(tmp_path, [4, 2])
    assert shard_rows(tmp_path / shard_name(0)) == 4 and shard_rows(tmp_path / shard_name(1)) == 2
    p = tmp_path / shard_name(1)
    p.write_bytes(p.read_bytes()[:-10])  # a truncated file is not a finished shard
    assert shard_rows(p) is None and shard_rows(tmp_path / shard_name(7)) is None
    (tmp_path / INDEX_NAME).unlink()
    with pytest.raises(ValueError, match="no index.json"):
        ShardedLatentDataset(tmp_path, 1.0)


def _images(root, per_class=10):
    for c, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            im = Image.new("RGB", (64 + 4 * i, 64), (255, 255, 255))
            im.paste(Image.new("RGB", (20 + 2 * i, 64), colour), (0, 0))
            im.save(root / c / f"{i:02d}.png")


def _encode_cmd(root, out, vae):
    return [str(root), "--out", str(out), "--size", "32", "--vae", str(vae), "--device", "cpu"] + [
        "--shard-size",
        "3",
        "--batch",
        "2",
        "--workers",
        "1",
    ]


def _shards(folder):
    return sorted(folder.glob("shard-*.safetensors"))


def test_encoder_resumes_after_a_kill_and_two_processes_train_on_its_shards(tmp_path):
    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL
    root, vae = tmp_path / "images", tmp_path / "vae"
    _images(root)  # 20 images: 7 shards of 3, the last of 2
    tiny_vae().save_pretrained(vae)

    killed = tmp_path / "killed"
    for _attempt in range(3):  # SIGKILL once some, but not all, shards are written
        p = subprocess.Popen(
            [*ENCODE, *_encode_cmd(root, killed, vae)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 120
        while time.time() < deadline and not _shards(killed) and p.poll() is None:
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if not (killed / INDEX_NAME).exists():
            break
    assert not (killed / INDEX_NAME).exists(), "the encoder finished before it could be killed"
    done = {f.name: f.stat().st_mtime_ns for f in _shards(killed)}
    assert 1 <= len(done) < 7
    assert all(shard_rows(killed / name) is not None for name in done)  # killed shards leave no partial files
    # Resumed on two processes: each skips its finished shards and encodes the rest of its own.
    r = subprocess.run(
        [*LAUNCH_2, *ENCODE[1:], *_encode_cmd(root, killed, vae)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = [int(n) for n in re.findall(r"process \d: \d of 7 shards, (\d+) already done", r.stdout)]
    assert len(skipped) == 2 and sum(skipped) == len(done), r.stdout
    assert {f.name: f.stat().st_mtime_ns for f in _shards(killed) if f.name in done} == done  # not redone
    assert len(_shards(killed)) == 7 and json.loads((killed / INDEX_NAME).read_text())["count"] == 20

    # The shards hold every image's posteriors in order, as one encoder call per batch computes them.
    data, model = ImageFolderDataset(root, 32), AutoencoderKL.from_pretrained(vae)
    for k, shard in enumerate(_shards(killed)):
        got = load_file(str(shard))
        first, stop = 3 * k, min(3 * k + 3, 20)
        parts = [
            posteriors(model, data.batch(torch.arange(a, min(a + 2, stop)))[0], "cpu") for a in range(first, stop, 2)
        ]
        assert torch.equal(got["mean"], torch.cat([m for m, _ in parts])), shard.name
        assert torch.equal(got["logvar"], torch.cat([lv for _, lv in parts])), shard.name
        assert got["labels"].tolist() == [c for _, c in data.files[first:stop]]

    # Changed settings are refused rather than mixed into the same folder.
    r = subprocess.run(
        [*ENCODE, *_encode_cmd(root, killed, vae), "--size", "16"], env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 2 and "size" in r.stderr

    cfg = {
        "model": "tiny",
        "model_overrides": {"channels": 4, "autoencoder": {"repo_id": str(vae), "scale_factor": 0.5, "downsample": 2}},
        "data": "latents",
        "data_path": str(killed),
        "image_size": 16,
        "batch_size": 4,
        "steps": 4,
        "save_every": 4,
        "sample_every": 4,
        "sample_steps": 2,
        "log_every": 2,
        "threads": 1,
        "num_workers": 1,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    r = subprocess.run(
        [*LAUNCH_2, TRAIN, "--config", str(tmp_path / "cfg.json"), "--run-dir", str(run)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "processes: 2" in r.stdout and "dataset: 20 images" in r.stdout
    grid = Image.open(run / "samples" / "step-00000004.png")  # decoded by the tiny autoencoder: RGB pixels
    assert grid.mode == "RGB" and grid.size[0] > 32
    r = subprocess.run(
        [sys.executable, str(ROOT / "train" / "export.py"), str(run), "--name", "tiny-latent"]
        + ["--weights-dir", str(tmp_path / "weights"), "--no-samples"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_model(tmp_path / "weights" / "tiny-latent").config.autoencoder.repo_id == str(vae)


def test_latent_run_without_its_autoencoder_skips_grids_with_a_log_line(tmp_path, capsys):
    config = get_preset("tiny").replace(
        channels=4, autoencoder=AutoencoderConfig(repo_id=str(tmp_path / "no-vae"), scale_factor=0.5, downsample=2)
    )
    assert train.grid_decoder(config, "cpu") is None  # the loop then draws no grids
    assert "sample grids skipped: could not load the autoencoder" in capsys.readouterr().out
    assert isinstance(train.grid_decoder(get_preset("tiny"), "cpu"), PixelDecoder)
