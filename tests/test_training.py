"""Training: data preparation, loss goes down, exact resume after SIGKILL, atomic states, DDP on two
CPU processes, export -> load -> sample."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_vae
from safetensors.torch import load_file

from mrdit import build_model, get_preset, load_model
from mrdit.config import ConfigError
from mrdit.data import load_emoji
from mrdit.losses import diffusion_loss
from mrdit.training import (
    EMA,
    TrainConfig,
    balanced_batch_indices,
    batch_indices,
    compile_for_training,
    compile_regions,
    list_states,
    load_latest_state,
    lr_at,
    make_optimizer,
    preset_with_overrides,
    save_state,
)

TRAIN = [sys.executable, str(ROOT / "train" / "train.py")]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _config(tmp_path, data, **over) -> Path:
    cfg = (
        json.loads((ROOT / "train" / "configs" / "tiny.json").read_text())
        | {"data_path": str(data), "threads": 1}
        | over
    )
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg))
    return p


def test_prepare_emoji_from_npm_layout(emoji_data):
    meta = json.loads((emoji_data / "classes.json").read_text())
    by_name = {c["name"]: c for c in meta["classes"]}
    assert len(meta["classes"]) >= 10 and meta["null_label"] == len(meta["classes"])
    # 5 faces x 3 styles, 4 hearts x 3 styles, 4 flags x 2 styles (no Fluent flags); the house is in no class
    assert by_name["face"]["train"] + by_name["face"]["val"] == 15
    assert by_name["heart"]["train"] + by_name["heart"]["val"] == 12
    assert by_name["flag"]["train"] + by_name["flag"]["val"] == 8 and not by_name["flag"]["flip"]
    assert all(by_name[n]["val"] >= 1 for n in ("face", "heart", "flag"))
    train, val = load_emoji(emoji_data, "train", 16), load_emoji(emoji_data, "val", 32)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (16, 16, 3)
    assert val.images.shape[1:] == (32, 32, 3)
    # composited onto white: corners are white
    assert int(train.images[:, 0, 0].min()) == 255
    assert "CC-BY 4.0" in (emoji_data / "ATTRIBUTION.md").read_text()
    # the judge's extras: every image's subcategory, and the emoji of no class (the house, 3 styles)
    subs = meta["subcategories"]
    assert "Travel & Places/place-building" in subs and "Smileys & Emotion/heart" in subs
    others = load_file(str(emoji_data / "others.safetensors"))
    assert meta["others"] == 3 and others["labels"].tolist() == [-1, -1, -1]
    assert {subs[i] for i in others["subcategories"].tolist()} == {"Travel & Places/place-building"}
    shard = load_file(str(emoji_data / "train.safetensors"))
    for label, sub in zip(shard["labels"].tolist(), shard["subcategories"].tolist(), strict=True):
        assert subs[sub].split("/")[1].startswith({"face": "face-", "heart": "heart", "flag": "country-flag"}[
            meta["classes"][label]["name"]])  # fmt: skip
    # all styles of one emoji share an id: 5 faces, 4 hearts, 4 flags over both splits
    both = torch.cat([shard["emoji_ids"], load_file(str(emoji_data / "val.safetensors"))["emoji_ids"]])
    assert len(set(both.tolist())) == 13


def test_prepare_emoji_without_npm_or_offline_is_a_clear_error(tmp_path):
    script = [sys.executable, str(ROOT / "train" / "prepare_emoji.py"), "--out", str(tmp_path / "out")]
    script += ["--npm-dir", str(tmp_path / "npm")]
    bare = tmp_path / "bin"  # a PATH without npm
    bare.mkdir()
    r = subprocess.run(script, env=ENV | {"PATH": str(bare)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "npm is not on PATH" in r.stderr and "--no-fetch" in r.stderr
    assert "Traceback" not in r.stderr
    npm = bare / "npm"  # an npm that cannot reach the registry
    npm.write_text("#!/bin/sh\necho 'npm error network request failed' >&2\nexit 1\n")
    npm.chmod(0o755)
    r = subprocess.run(script, env=ENV | {"PATH": str(bare)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "`npm pack emoji-datasource-twitter@16.0.0` failed (exit 1: npm error network request failed)" in r.stderr
    assert not (tmp_path / "out").exists()


def test_batch_order_is_a_function_of_step():
    a = batch_indices(7, 50, 8, seed=1)
    assert torch.equal(a, batch_indices(7, 50, 8, seed=1))
    epoch = torch.cat([batch_indices(s, 48, 8, seed=0) for s in range(6)])
    assert sorted(epoch.tolist()) == list(range(48))  # one epoch visits every index once
    two = torch.cat([batch_indices(3, 48, 8, 0, r, 2) for r in range(2)])
    assert torch.equal(two, batch_indices(3, 48, 8, 0))


def test_batch_order_seeds_are_unchanged():
    """The data order of a seed stays what earlier runs drew, so they resume exactly."""
    from mrdit.rng import BALANCED_STREAM, order_seed

    assert (
        order_seed(2, 5) == 2 * 1_000_003 + 5 and order_seed(2, 5, BALANCED_STREAM) == 2 * 1_000_003 + 500_000_003 + 5
    )
    want = torch.randperm(48, generator=torch.Generator().manual_seed(2 * 1_000_003 + 1))[:8]
    assert torch.equal(batch_indices(6, 48, 8, seed=2), want)  # step 6 of 8 per batch: epoch 1, its first 8


def test_class_balanced_batches_draw_every_class_equally():
    labels = torch.tensor([0] * 90 + [2] * 9 + [5] * 1)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    a = balanced_batch_indices(7, labels, 64, seed=1)
    assert torch.equal(a, balanced_batch_indices(7, labels, 64, seed=1))  # a function of (seed, step)
    assert not torch.equal(a, balanced_batch_indices(8, labels, 64, seed=1))
    two = torch.cat([balanced_batch_indices(3, labels, 64, 0, r, 2) for r in range(2)])
    assert torch.equal(two, balanced_batch_indices(3, labels, 64, 0))  # ranks split one global batch
    idx = torch.cat([balanced_batch_indices(s, labels, 64, seed=0) for s in range(150)])
    assert idx.min() >= 0 and idx.max() < 100
    counts = torch.bincount(labels[idx], minlength=6)
    assert counts[[1, 3, 4]].sum() == 0  # absent classes are never asked for
    share = counts[[0, 2, 5]].float() / len(idx)
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.03), share  # uniform images would give 0.9/0.09/0.01
    assert len(idx[labels[idx] == 0].unique()) > 80  # and images within a class are drawn uniformly


def test_lr_warmup_then_constant():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3) and lr_at(5000, cfg) == 1e-3


def test_lr_cool_down_over_the_last_decay_steps():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=100, decay_steps=20)
    assert lr_at(79, cfg) == 1e-3
    assert lr_at(80, cfg) == pytest.approx(1e-3) and lr_at(90, cfg) == pytest.approx(5e-4)
    assert lr_at(99, cfg) == pytest.approx(5e-5) and lr_at(99, cfg) > 0
    lrs = [lr_at(s, cfg) for s in range(80, 100)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    with pytest.raises(ConfigError, match="decay_steps"):
        TrainConfig(steps=100, decay_steps=101)


def test_weight_decay_excludes_td_gates():
    model = build_model("tiny")
    opt = make_optimizer(model, TrainConfig(weight_decay=0.03))
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 0.03 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith((".w", ".b")) for p in plain["params"])
    assert any(names[id(p)].endswith(".p0") for p in decay["params"])


def test_few_steps_reduce_validation_loss(emoji_data):
    """Honest check: loss on a fixed held-out batch (fixed noise and steps) falls after training."""
    torch.manual_seed(0)
    data = load_emoji(emoji_data, "train", 16)
    model = build_model(get_preset("tiny").replace(num_classes=13, null_label=12))
    cfg = TrainConfig(lr=2e-3, warmup_steps=0)
    opt = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    x_val, y_val = data.batch(torch.arange(len(data)))
    n_val = torch.randint(1, 1001, (len(data),), generator=g)
    eps_val = torch.randn(x_val.shape, generator=g)

    def val_loss():
        with torch.no_grad():
            return float(diffusion_loss(model.eval(), x_val, y_val, n=n_val, eps=eps_val).mean())

    before = val_loss()
    for _ in range(40):
        model.train()
        idx = torch.randint(0, len(data), (16,), generator=g)
        x, y = data.batch(idx)
        loss = diffusion_loss(model, x, y, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_loss()
    assert after < 0.7 * before, (before, after)


def test_ema_moves_toward_weights():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, 0.5)
    with torch.no_grad():
        m.weight.add_(1.0)
    before = (ema.model.weight - m.weight).abs().max()
    ema.update(m, step=1000)
    assert (ema.model.weight - m.weight).abs().max() < before


def test_ema_update_is_the_per_parameter_lerp():
    torch.manual_seed(0)
    m = build_model(get_preset("tiny"))
    ema = EMA(m, 0.99)
    expected = {k: v.clone() for k, v in ema.model.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    ema.update(m, step=10_000)
    for k, p in m.named_parameters():
        want = expected[k] + 0.01 * (p.detach() - expected[k])
        assert torch.allclose(dict(ema.model.named_parameters())[k], want, atol=1e-6), k
    with pytest.raises(ValueError, match="parameters"):
        ema.update(torch.nn.Linear(2, 2), step=1)


def test_state_write_is_atomic_and_falls_back(tmp_path, monkeypatch):
    save_state(tmp_path, 5, {"step": 5, "x": torch.ones(3)}, keep=2)
    real_save = torch.save

    def crash(obj, f):  # dies half way through writing the file, like a full disk or a kill
        real_save(obj, f)
        f.truncate(10)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_state(tmp_path, 10, {"step": 10, "x": torch.zeros(3)}, keep=2)
    monkeypatch.undo()
    assert [s for s, _ in list_states(tmp_path)] == [5]
    assert not list((tmp_path / "states").glob(".*tmp"))
    # a damaged newest state (e.g. a disk error after the rename) falls back to the previous one
    save_state(tmp_path, 15, {"step": 15, "x": torch.zeros(3)}, keep=3)
    p = tmp_path / "states" / "state-00000015.pt"
    p.write_bytes(p.read_bytes()[:50])
    assert load_latest_state(tmp_path)["step"] == 5


class _Touch:
    """Unpickling this object runs code: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_training_state_holding_code_is_refused(tmp_path):
    save_state(tmp_path, 5, {"step": 5, "x": torch.ones(3)}, keep=3)
    marker = tmp_path / "code-ran"
    torch.save({"step": 10, "x": _Touch(marker)}, tmp_path / "states" / "state-00000010.pt")
    state = load_latest_state(tmp_path)  # the newest state needs code to load: skipped, never run
    assert state["step"] == 5 and not marker.exists()


def _script(name: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """train/`name` run as a user runs it, with `args`, one thread, output captured."""
    argv = [sys.executable, str(ROOT / "train" / name), *args]
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=timeout)


def _run(cfg, run, *extra, timeout=300):
    return subprocess.run(
        [*TRAIN, "--config", str(cfg), "--run-dir", str(run), *extra],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _export(run, weights_dir, name, *extra):
    return _script(
        "export.py",
        [
            str(run),
            "--name",
            name,
            "--weights-dir",
            str(weights_dir),
            *extra,
        ],
        timeout=300,
    )


def test_run_folder_and_kill_resume_is_exact(tmp_path, emoji_data):
    cfg = _config(tmp_path, emoji_data, steps=24, save_every=4, sample_every=12)
    ref = tmp_path / "ref"
    r = _run(cfg, ref)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in (
        "train_config.json",
        "model_config.json",
        "metrics.jsonl",
        "command.txt",
        "DONE",
        "ema/model.safetensors",
    ):
        assert (ref / f).exists(), f
    assert list((ref / "samples").glob("*.png"))
    assert len((ref / "metrics.jsonl").read_text().splitlines()) >= 4

    run = tmp_path / "killed"
    for attempt in range(3):  # kill at a different moment each time
        p = subprocess.Popen(
            [*TRAIN, "--config", str(cfg), "--run-dir", str(run)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        target = 4 * (attempt + 1)
        while time.time() < deadline and not any(s >= target for s, _ in list_states(run)):
            time.sleep(0.01)
        time.sleep(0.05 * attempt)
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL, "the run ended before the kill"
        state = load_latest_state(run)  # never a checkpoint that fails to load
        assert state is not None
        # The kill landed mid-run: past this attempt's target, before the final step, not finished.
        assert target <= state["step"] < 24 and not (run / "DONE").exists(), (attempt, state["step"])
    r = _run(cfg, run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step" in r.stdout
    a, b = load_file(str(ref / "ema" / "model.safetensors")), load_file(str(run / "ema" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k

    # resuming with a changed config is refused unless forced
    cfg2 = _config(tmp_path, emoji_data, steps=24, save_every=4, sample_every=12, lr=0.01)
    r = _run(cfg2, run)
    assert r.returncode == 2 and "different config" in r.stderr and "lr" in r.stderr
    assert _run(cfg2, run, "--force").returncode == 0


def test_the_run_keeps_an_ema_of_the_trained_weights(tmp_path, emoji_data):
    """The EMA in the state (and the exported model) moves from the initial weights towards the trained ones."""
    cfg = _config(tmp_path, emoji_data, steps=3, save_every=3, sample_every=0, ema_decay=0.5)
    run = tmp_path / "run"
    r = _run(cfg, run)
    assert r.returncode == 0, r.stderr[-2000:]
    state = load_latest_state(run)
    torch.manual_seed(0)  # the run's seed: the weights it started from
    init = build_model(load_model(run / "ema").config).state_dict()
    model, ema = state["model"], state["ema"]
    moved = [k for k in model if not torch.equal(model[k], init[k])]
    assert len(moved) > len(model) // 2
    for k in moved:
        assert not torch.equal(ema[k], init[k]) and not torch.equal(ema[k], model[k]), k
    dist = lambda a, b: sum(float((a[k] - b[k]).norm()) for k in moved)  # noqa: E731
    assert dist(ema, model) < dist(init, model)
    exported = load_model(run / "ema").state_dict()
    assert all(torch.equal(exported[k], v) for k, v in ema.items())


def test_sigterm_saves_and_exits_cleanly(tmp_path, emoji_data):
    cfg = _config(tmp_path, emoji_data, steps=100000, save_every=100000, sample_every=0)
    run = tmp_path / "term"
    p = subprocess.Popen(
        [*TRAIN, "--config", str(cfg), "--run-dir", str(run)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "state saved" in out
    state = load_latest_state(run)
    assert state["step"] >= 1
    exported = load_model(run / "ema").state_dict()  # the EMA model at the stop is exported too
    assert all(torch.equal(exported[k], v) for k, v in state["ema"].items())


def test_time_limit_saves_exports_and_resumes(tmp_path, emoji_data):
    cfg = _config(
        tmp_path, emoji_data, steps=100000, save_every=100000, sample_every=0, log_every=2, class_balanced=True
    )
    run = tmp_path / "limited"
    r = _run(cfg, run, "--max-minutes", "0.02", "--export-every", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "time limit: stopped at step" in r.stdout
    paused = json.loads((run / "PAUSED").read_text())
    first = paused["step"]
    assert first >= 2 and not (run / "DONE").exists()
    assert load_latest_state(run)["step"] == first  # the state at the stop, though save_every is huge
    assert load_model(run / "ema").config.num_classes == 13  # the EMA model is exported at the stop
    exports = sorted(run.glob("ema-*"))
    assert exports and all(int(e.name.split("-")[1]) % 4 == 0 for e in exports)
    assert load_file(str(exports[0] / "model.safetensors"))["branches.0.patchify.weight"].dtype == torch.float16
    r = _run(cfg, run, "--max-minutes", "0.02")
    assert r.returncode == 0 and f"resumed from step {first}" in r.stdout
    assert json.loads((run / "PAUSED").read_text())["step"] > first
    assert _run(cfg, run, "--max-minutes", "-1").returncode == 2
    # the export of a paused run describes it (step, hardware) from PAUSED
    r = _export(run, tmp_path / "w", "m", "--no-samples")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((tmp_path / "w" / "m" / "run_info.json").read_text())
    assert info["step"] == json.loads((run / "PAUSED").read_text())["step"] and "CPU" in info["hardware"]
    assert "class-balanced batches" in (tmp_path / "w" / "m" / "README.md").read_text()


def test_time_limit_reached_on_the_last_step_finishes_the_run(tmp_path, emoji_data):
    cfg = _config(tmp_path, emoji_data, steps=4, save_every=100, sample_every=0, log_every=4)
    run = tmp_path / "run"
    r = _run(cfg, run, "--max-minutes", "0.0001")  # already late when the limit is first checked, at step 4
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done: 4 steps" in r.stdout and "time limit" not in r.stdout
    assert json.loads((run / "DONE").read_text())["step"] == 4 and not (run / "PAUSED").exists()


def test_init_from_starts_a_fine_tune_from_exported_weights(tmp_path, emoji_data):
    base = tmp_path / "base"
    assert _run(_config(tmp_path, emoji_data, steps=4, sample_every=0), base).returncode == 0
    exported = tmp_path / "w" / "base"
    assert _export(base, tmp_path / "w", "base", "--no-samples").returncode == 0
    source = load_model(exported).state_dict()

    # A negligible learning rate: one step leaves the weights where init_from put them.
    cfg = _config(tmp_path, emoji_data, steps=1, sample_every=0, lr=1e-12, init_from=str(exported))
    run = tmp_path / "ft"
    r = _run(cfg, run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "initialised from" in r.stdout
    tuned = load_model(run / "ema").state_dict()
    assert all(torch.allclose(tuned[k], v, atol=1e-6) for k, v in source.items())
    fresh = tmp_path / "fresh"  # the same run without init_from is far from those weights
    assert _run(_config(tmp_path, emoji_data, steps=1, sample_every=0, lr=1e-12), fresh).returncode == 0
    untuned = load_model(fresh / "ema").state_dict()
    assert any(not torch.allclose(untuned[k], v, atol=1e-3) for k, v in source.items())

    # Resuming that run continues from its own state, not from init_from again.
    cfg = _config(tmp_path, emoji_data, steps=2, sample_every=0, lr=1e-12, init_from=str(exported))
    r = _run(cfg, run, "--force")
    assert r.returncode == 0 and "resumed from step 1" in r.stdout and "initialised" not in r.stdout

    # Exported over the model it started from: the card tells both trainings, and the old eval is dropped.
    (exported / "eval.json").write_text(json.dumps({"accuracy": 0.5}))
    r = _export(run, tmp_path / "w", "base", "--no-samples")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (exported / "eval.json").exists() and "previous weights" in r.stdout
    info = json.loads((exported / "run_info.json").read_text())
    assert info["step"] == 2 and info["init_from"] == str(exported) and info["source"]["step"] == 4
    card = (exported / "README.md").read_text()
    assert f"Started from `{exported}`" in card and "Then fine-tuned" in card and "Not measured yet" in card
    assert card.index("Steps: 4 at batch 8") < card.index("Steps: 2 at batch 8")

    # A source whose network differs, or whose weights are corrupt, is refused before anything is written.
    other = _config(tmp_path, emoji_data, steps=1, init_from=str(exported), model_overrides={"loss_weights": [1, 1, 1]})
    bad = tmp_path / "bad"
    r = _run(other, bad)
    assert r.returncode == 2 and "differs from this run's in loss_weights" in r.stderr and not bad.exists()
    (exported / "model.safetensors").write_bytes(b"not a safetensors file")
    r = _run(_config(tmp_path, emoji_data, steps=1, init_from=str(exported)), bad)
    assert r.returncode == 2 and "corrupt" in r.stderr and not bad.exists()


def test_non_finite_loss_stops_without_saving(tmp_path, emoji_data):
    cfg = _config(tmp_path, emoji_data, steps=40, save_every=4, sample_every=0, log_every=4, lr=1e30, warmup_steps=0)
    run = tmp_path / "nan"
    r = _run(cfg, run)
    assert r.returncode == 3 and "not finite" in r.stderr
    for _, path in list_states(run):  # whatever was saved before the blow-up is finite
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_dry_run_and_help(tmp_path, emoji_data):
    r = _run(_config(tmp_path, emoji_data), tmp_path / "dry", "--dry-run")
    assert r.returncode == 0 and '"batch_size": 8' in r.stdout and not (tmp_path / "dry").exists()
    r = subprocess.run([*TRAIN, "--help"], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and "--run-dir" in r.stdout
    r = _run(_config(tmp_path, emoji_data), tmp_path / "x", "--set", "bogus=1")
    assert r.returncode == 2 and "bogus" in r.stderr


def test_dry_run_prints_the_model_with_its_overrides(tmp_path):
    """--dry-run shows the model that is built: for emoji-32-wide the preset's 256-wide transformer MLP
    is 512 wide, as `model_overrides` say."""
    config = ROOT / "train" / "configs" / "emoji-32-wide.json"
    r = _run(config, tmp_path / "dry", "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    printed = r.stdout[r.stdout.index("model (emoji-32 with model_overrides") :]
    model = json.loads(printed[printed.index("{") :])
    cfg = TrainConfig.from_dict(json.loads(config.read_text()))
    assert get_preset("emoji-32").branches[0].mlp_width == 256
    assert model["branches"][0]["mlp_width"] == 512 and model == json.loads(preset_with_overrides(cfg).to_json())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(json.loads(config.read_text()) | {"model_overrides": {"mlp": 1}}))
    r = _run(bad, tmp_path / "dry", "--dry-run")
    assert r.returncode == 2 and "model_overrides: unknown model config field 'mlp'" in r.stderr
    assert not (tmp_path / "dry").exists()


def test_export_load_sample_and_card(tmp_path, emoji_data):
    cfg = _config(tmp_path, emoji_data, steps=6, save_every=3, sample_every=0, decay_steps=3)
    run = tmp_path / "run"
    assert _run(cfg, run).returncode == 0
    r = _export(run, tmp_path / "w", "tiny-emoji", "--dtype", "float16")
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "w" / "tiny-emoji"
    card = (out / "README.md").read_text()
    recipe = "learning rate 0.001 after 2 warm-up steps, constant, then a linear cool-down over the last 3 steps"
    for needle in ("CC-BY 4.0", "Apache-2.0", "MIT", "train/train.py", "Steps: 6", recipe, "EMA 0.9"):
        assert needle in card, needle
    assert (out / "samples.png").is_file()
    # the weights are the EMA of the newest state, read from the run's safetensors copy
    ema = load_latest_state(run)["ema"]
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], v.half()) for k, v in ema.items())
    m = load_model(out)
    assert m.config.class_names[0] == "face"
    from mrdit.pipeline import Pipeline

    res = Pipeline(m).generate("heart", [0, 1], steps=3)
    assert len(res.images) == 2 and res.images[0].size == (16, 16)

    # the evaluator writes its numbers into eval.json and the card, and a side-by-side figure
    r = _script(
        "evaluate.py",
        [
            str(out),
            "--data",
            str(emoji_data),
            "--steps",
            "2",
            "--figure",
            str(tmp_path / "fig.png"),
            "--guidance-schedule",
            "power-cosine",
            "--guidance-power",
            "2",
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads((out / "eval.json").read_text())
    assert 0 <= ev["accuracy"] <= 1 and ev["fd"] >= 0 and ev["fd_floor"] >= 0 and ev["sec_per_image"] > 0
    card = (out / "README.md").read_text()
    assert "class accuracy of samples" in card and "real validation emoji" in card
    # the protocol's defaults: 50 per class at held-out seeds, the frozen judge, named in the card
    assert f"{ev['accuracy'] * 100:.1f}% (95% interval " in card and f", {50 * 12} samples)" in card
    assert ev["first_seed"] == 10_000 and "seeds 10,000-10,049 of each class (held out" in card
    assert 0 <= ev["near_copies"] <= 1 and "near-copies" in card and "near-copies" in r.stdout
    assert ev["guidance_schedule"] == "power-cosine" and "guidance power-cosine to 4.0 (p 2.0)" in card
    for args, msg in [
        (["--guidance-power", "-1"], "guidance_power must be a finite number >= 0"),
        (["--sampler", "euler"], "invalid choice: 'euler'"),
    ]:
        bad = subprocess.run(
            [sys.executable, str(ROOT / "train" / "evaluate.py"), str(out), *args],
            env=ENV,
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2 and msg in bad.stderr
    from mrdit.pipeline import DEFAULT_SAMPLER

    assert ev["sampler"] == DEFAULT_SAMPLER  # the evaluator measures the default settings unless told otherwise
    assert set(ev["classifier_val_per_class_accuracy"]) == set(ev["per_class_accuracy"])
    assert "| class | tiny-emoji | real training emoji | real validation emoji |" in r.stdout
    seen = ev["classifier_train_per_class_accuracy"]  # the judge on the training images: a ceiling
    assert set(seen) == set(ev["per_class_accuracy"])
    present = [a for a in seen.values() if a is not None]  # classes with training images
    assert ev["classifier_train_accuracy"] == pytest.approx(sum(present) / len(present))
    assert "| class | samples (50 each, 95% interval) | real training emoji | real validation emoji |" in card
    assert "reproduced them exactly would score" in card and "reproduced them exactly would score" in r.stdout
    assert (
        ev["classifier_recipe"]["epochs"] == "30"
        and f"judge version {ev['classifier_recipe']['judge_recipe']!r}, 30 epochs" in card
    )
    assert (tmp_path / "fig.png").is_file() and "| tiny-emoji |" in r.stdout

    # an EMA copy older than the newest state, or none, is a clear error; the training command writes it
    record = json.loads((run / "ema.json").read_text())
    (run / "ema.json").write_text(json.dumps(record | {"step": 3}))
    r = _export(run, tmp_path / "w", "stale", "--no-samples")
    assert r.returncode == 1 and "holds step 3 but the newest training state is step 6" in r.stderr
    shutil.rmtree(run / "ema")
    r = _export(run, tmp_path / "w", "stale", "--no-samples")
    assert r.returncode == 1 and "has no EMA model" in r.stderr and "run the training command again" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "w" / "stale").exists()
    assert _run(cfg, run).returncode == 0  # the finished run, run again: nothing to train, the copy written
    assert _export(run, tmp_path / "w", "stale", "--no-samples").returncode == 0


def test_two_process_ddp_trains_and_exports_once(tmp_path, emoji_data):
    pytest.importorskip("accelerate")
    cfg = _config(tmp_path, emoji_data, steps=6, save_every=3, sample_every=0, log_every=2)
    run = tmp_path / "ddp"
    # accelerate's --cpu launcher starts one process unless MPI is present; its torchrun path (--multi_gpu)
    # starts two, and each uses the CPU with gloo when there is no GPU.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "train" / "train.py"),
        "--config",
        str(cfg),
        "--run-dir",
        str(run),
    ]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "processes: 2" in r.stdout
    assert r.stdout.count("done: 6 steps") == 1  # rank 0 alone reports and exports
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    load_model(run / "ema")
    state = load_latest_state(run)
    # DDP keeps both replicas identical, so rank 0's copy is the model; it trained on both ranks' data
    assert state["step"] == 6


def test_encode_latents_and_train_on_them(tmp_path):
    """Image folder -> VAE posteriors (image and flip) with a tiny local autoencoder -> a latent training run."""
    pytest.importorskip("diffusers")
    from PIL import Image

    from mrdit.data import LatentDataset

    root = tmp_path / "images"
    for c, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (root / c).mkdir(parents=True)
        for i in range(3):
            im = Image.new("RGB", (40 + 8 * i, 32), (255, 255, 255))
            im.paste(Image.new("RGB", (16 + 4 * i, 32), colour), (0, 0))  # colour on the left only: flips differ
            im.save(root / c / f"{i}.png")
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "latents.safetensors"
    r = _script(
        "encode_latents.py",
        [
            str(root),
            "--out",
            str(out),
            "--size",
            "32",
            "--vae",
            str(tmp_path / "vae"),
            "--device",
            "cpu",
        ],
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    d = load_file(str(out))
    assert d["mean"].shape == (6, 2, 4, 16, 16) and d["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    # the second posterior is the horizontally flipped image's
    from mrdit.data import ImageFolderDataset

    x, _ = ImageFolderDataset(root, 32).batch(torch.arange(6))
    with torch.no_grad():
        flipped = vae.encode(x.flip(-1)).latent_dist.mean
    assert torch.allclose(d["mean"][:, 1], flipped, atol=1e-4)
    assert not torch.allclose(d["mean"][:, 0], d["mean"][:, 1], atol=1e-3)
    ds = LatentDataset(out, scale_factor=0.5)
    z, y = ds.batch(torch.tensor([0, 4]), torch.tensor([False, True]), torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 16, 16) and y.tolist() == [0, 1]
    cfg = {
        "model": "tiny",
        "model_overrides": {
            "channels": 4,
            "autoencoder": {"repo_id": str(tmp_path / "vae"), "scale_factor": 0.5, "downsample": 2},
        },
        "data": "latents",
        "data_path": str(out),
        "image_size": 16,
        "batch_size": 4,
        "steps": 3,
        "save_every": 3,
        "sample_every": 0,
        "threads": 1,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = _run(tmp_path / "cfg.json", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_model(tmp_path / "run" / "ema").config.autoencoder.scale_factor == 0.5


def test_frechet_distance_known_values():
    from mrdit.judge import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g)
    b = torch.randn(20000, 4, generator=g) + torch.tensor([1.0, 0, 0, 0])
    c = torch.randn(20000, 4, generator=g) * 2
    assert frechet_distance(a, a) < 1e-6
    assert abs(frechet_distance(a, b) - 1.0) < 0.1  # mean shift of 1
    assert abs(frechet_distance(a, c) - 4.0) < 0.2  # trace term: 4 * (1 + 4 - 2 * 2) = 4


def test_judge_on_real_images_is_class_balanced():
    from mrdit.data import TensorImageDataset
    from mrdit.judge import judge_real

    images = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    data = TensorImageDataset(images, torch.tensor([0, 0, 0, 1]), ["a", "b", "c"])

    def always_a(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 0.0]).expand(len(x), 3)  # logits: class a for every image

    balanced, per_class = judge_real(always_a, data)
    assert per_class == {"a": 1.0, "b": 0.0, "c": None}  # c has no images
    assert balanced == 0.5  # the mean over present classes, not the 3/4 of all images


def test_wilson_interval_of_sample_accuracy():
    from mrdit.cards import accuracy_text
    from mrdit.judge import wilson_interval

    z2 = 1.96**2
    assert wilson_interval(0.0, 20) == (0.0, pytest.approx(z2 / (20 + z2)))  # closed forms at the ends
    assert wilson_interval(1.0, 20) == (pytest.approx(20 / (20 + z2)), 1.0)
    lo, hi = wilson_interval(0.842, 240)
    assert lo == pytest.approx(0.7905, abs=1e-4) and hi == pytest.approx(0.8827, abs=1e-4)
    assert wilson_interval(0.842, 2400)[1] - wilson_interval(0.842, 2400)[0] < hi - lo  # more samples, narrower
    ev = evaluation_record(accuracy=0.842, samples_per_class=20, per_class_accuracy={str(c): 0.8 for c in range(12)})
    assert accuracy_text(ev) == "84.2% (95% interval 79.1-88.3%, 240 samples)"


def evaluation_record(**fields):
    """An evaluation record with plausible numbers, `fields` replaced."""
    from mrdit.cards import Evaluation

    base = {
        "accuracy": 0.5,
        "per_class_accuracy": {"a": 0.5, "b": None},
        "fd": 3.0,
        "sec_per_image": 0.1,
        "samples_per_class": 2,
        "steps": 2,
        "guidance": 4.0,
        "sampler": "dpm++2m-sde",
        "fd_floor": 1.0,
        "command": "python train/evaluate.py m",
        "hardware": "a CPU",
    }
    return Evaluation.from_dict(base | fields)


def test_card_recipe_names_a_later_phase():
    from mrdit.cards import Recipe, recipe_line

    cfg = {
        "lr": 5e-4,
        "warmup_steps": 500,
        "decay_steps": 0,
        "betas": [0.9, 0.99],
        "weight_decay": 0.03,
        "ema_decay": 0.999,
        "label_dropout": 0.1,
        "mixed_precision": "no",
    }
    line = recipe_line(Recipe.from_dict(cfg))
    assert line.startswith("- Recipe: AdamW") and line.endswith("float32\n") and "then constant" in line
    assert "class-balanced" not in line  # configs that predate the field read as unbalanced
    assert "; class-balanced batches;" in recipe_line(Recipe.from_dict(cfg | {"class_balanced": True}))
    later = recipe_line(Recipe.from_dict(cfg), "batch 512 for 1,300 steps")
    assert later == line[:-1] + "; then batch 512 for 1,300 steps\n"
    assert recipe_line(None, "ignored") == ""


def test_config_fields_of_the_wrong_type_are_clear_errors():
    for bad, msg in [
        (["steps="], "steps: must be an integer, got ''"),  # --set parses what is not JSON as a string
        (["steps=2e3"], "steps: must be an integer, got 2000.0"),
        (["lr=fast"], "lr: must be a number"),
        (["flips=1"], "flips: must be true or false"),
        (["betas=0.9"], "betas: must be two numbers"),
        (['model_overrides=["x"]'], "model_overrides: must be an object"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(msg)):
            TrainConfig().with_overrides(bad)
    assert TrainConfig().with_overrides(["lr=1", "steps=20"]).lr == 1  # an integer is a number


def test_compile_options_are_checked():
    TrainConfig(compile="blocks", activation_memory_budget=0.25)
    for bad, msg in [
        ({"compile": "fast"}, "compile: must be"),
        ({"activation_memory_budget": 0.5}, "below 1 needs compile"),
        ({"compile": True, "activation_memory_budget": 0.0}, "must be in \\(0, 1\\]"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(**bad)


def _saved_bytes(fn, *args) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of fn(*args)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args).sum().backward()
    return sum(storages.values())


def test_regional_compile_trains_like_plain_and_the_budget_keeps_less():
    import torch._functorch.config as functorch_config

    torch.manual_seed(0)
    plain = build_model(get_preset("tiny")).train()
    x, n, y = torch.randn(4, 3, 16, 16), torch.tensor([10.0, 300.0, 600.0, 990.0]), torch.tensor([0, 1, 2, 3])
    sum(o.square().mean() for o in plain(x, n, y)).backward()
    want = [p.grad.clone() for p in plain.parameters()]
    block, z, tau = plain.branches[0].blocks[0], torch.randn(16, 17, 32, requires_grad=True), torch.rand(16)
    full = _saved_bytes(torch.compile(block), z, tau)
    with functorch_config.patch(activation_memory_budget=1.0):  # restored afterwards: a process-wide setting
        torch._dynamo.reset()
        model = build_model(get_preset("tiny")).train()
        model.load_state_dict(plain.state_dict())
        net = compile_for_training(model, "blocks", memory_budget=0.3)
        regions = compile_regions(model)
        kinds = {type(m).__name__ for m in regions}
        assert net is model and all(m._compiled_call_impl is not None for m in regions)
        assert kinds == {"TransformerBlock", "ConvNeXtBlock", "SkipJoin", "Upsampler"}
        sum(o.square().mean() for o in net(x, n, y)).backward()
        got = [p.grad.clone() for p in model.parameters()]
        budgeted = _saved_bytes(model.branches[0].blocks[0], z, tau)
    torch._dynamo.reset()
    bad = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if not torch.allclose(a, b, rtol=1e-4, atol=1e-6)]
    assert not bad, [(i, float((got[i] - want[i]).abs().max()), float(want[i].abs().max())) for i in bad]
    assert budgeted < 0.7 * full, (budgeted, full)  # the compiled backward recomputes instead of keeping


def test_train_with_compiled_blocks_and_a_memory_budget(tmp_path, emoji_data):
    cfg = _config(tmp_path, emoji_data, steps=4, save_every=4, sample_every=0)
    r = _run(cfg, tmp_path / "run", "--set", 'compile="blocks"', "activation_memory_budget=0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["compile"] == "blocks" and saved["activation_memory_budget"] == 0.5
    assert [s for s, _ in list_states(tmp_path / "run")] == [4]


def test_judge_cache_is_reused_only_for_its_recipe(tmp_path, emoji_data, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mrdit.judge import JUDGE_RECIPE, RECIPES, classifier, judge_images, judge_recipe

    data = tmp_path / "emoji"
    shutil.copytree(emoji_data, data)
    path = data / "classifier-16.safetensors"
    path.unlink(missing_ok=True)
    train = judge_images(data, 16, RECIPES[JUDGE_RECIPE].others)

    def recipe() -> dict[str, str]:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()

    first, _, _ = classifier(data, 16, 1)
    assert recipe() == judge_recipe(1, train)
    stamp = path.stat().st_mtime_ns
    again, _, _ = classifier(data, 16, 1)  # same recipe: loaded, not retrained
    assert path.stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    capsys.readouterr()

    classifier(data, 16, 2)  # another epoch count: trained again
    assert "training again" in capsys.readouterr().out and recipe() == judge_recipe(2, train)
    save_file(first.state_dict(), str(path))  # a cache from before recipes were recorded
    classifier(data, 16, 2)
    assert "an older recipe" in capsys.readouterr().out and recipe() == judge_recipe(2, train)
    path.write_bytes(b"not a safetensors file")  # a corrupt cache is retrained, not a crash
    classifier(data, 16, 2)
    assert "unreadable" in capsys.readouterr().out and recipe() == judge_recipe(2, train)
    assert not list(data.glob("*.tmp"))
    meta = recipe() | {"train_images": "1"}  # made from other data: trained again
    save_file(first.state_dict(), str(path), metadata=meta)
    classifier(data, 16, 2)
    assert "training again" in capsys.readouterr().out and recipe() == judge_recipe(2, train)
