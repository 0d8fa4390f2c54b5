"""Growing a trained DiMR into a model for larger images (mrdit.grow, train/init_grown.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from mrdit import build_model, get_preset, load_model, save_model
from mrdit.cards import grown_lines, run_info_from_dict, widened_text
from mrdit.config import ConfigError, ModelConfig
from mrdit.grow import grow, growth_factor

GROW = [sys.executable, str(ROOT / "train" / "init_grown.py")]
TRAIN = [sys.executable, str(ROOT / "train" / "train.py")]
EXPORT = [sys.executable, str(ROOT / "train" / "export.py")]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def grown_tiny(source: ModelConfig, extra_width: int = 8) -> ModelConfig:
    """`source` at twice the image size: the same branches with doubled patches, plus a finer one."""
    doubled = tuple(dataclasses.replace(b, patch=2 * b.patch) for b in source.branches)
    finest = dataclasses.replace(source.branches[-1], width=extra_width, grid=2 * source.image_size, patch=1)
    return source.replace(branches=(*doubled, finest), image_size=2 * source.image_size, loss_weights=())


def test_grown_branches_read_the_larger_image_as_the_source_read_it_pooled():
    torch.manual_seed(0)
    source = build_model(get_preset("tiny")).eval()
    target = build_model(grown_tiny(source.config)).eval()
    untouched = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("branches.3.")}
    fresh = grow(source, target)
    assert fresh and all(k.startswith("branches.3.") for k in fresh) and set(fresh) == set(untouched)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in untouched.items())

    x = torch.randn(3, 3, 32, 32)
    t, y = torch.tensor([10.0, 500.0, 990.0]), torch.tensor([0, 2, 4])
    with torch.no_grad():
        small = source(F.avg_pool2d(x, 2), t, y)
        large = target(x, t, y)
    assert len(large) == 4 and large[3].shape == (3, 3, 32, 32)
    for k in range(3):  # the copied branches, exactly, on any image
        assert torch.allclose(large[k], small[k], atol=1e-5), k


def wider_tiny(source: ModelConfig, widths: tuple[int, ...]) -> ModelConfig:
    """`source` with each branch's MLP hidden width set from `widths`."""
    return source.replace(
        branches=tuple(dataclasses.replace(b, mlp_width=w) for b, w in zip(source.branches, widths, strict=True))
    )


def test_a_wider_mlp_starts_as_the_source_and_can_learn():
    torch.manual_seed(0)
    source = build_model(get_preset("tiny")).eval()
    widths = tuple(2 * b.mlp_width for b in source.config.branches)
    target = build_model(wider_tiny(source.config, widths)).eval()
    assert grow(source, target) == []  # nothing left wholly at its initialisation
    assert widened_text(source.config, target.config).startswith("wider MLPs in branches 0 (")
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([10.0, 500.0, 990.0]), torch.tensor([0, 2, 4])
    with torch.no_grad():
        for a, b in zip(source(x, t, y), target(x, t, y), strict=True):
            assert torch.allclose(a, b, atol=1e-6)  # the same function
    mlp, h = target.branches[0].blocks[0].mlp, source.config.branches[0].mlp_width
    assert torch.equal(mlp.w0.weight[:h], source.branches[0].blocks[0].mlp.w0.weight)
    assert mlp.w0.weight[h:].abs().sum() > 0 and mlp.w2.weight[:, h:].abs().sum() == 0  # fresh in, zero out
    target.train()
    sum(o.square().mean() for o in target(x, t, y)).backward()
    assert mlp.w2.weight.grad[:, h:].abs().sum() > 0  # the added units get a gradient from the first step

    narrower = wider_tiny(source.config, tuple(b.mlp_width // 2 for b in source.config.branches))
    with pytest.raises(ConfigError, match="an MLP at least as wide"):
        growth_factor(source.config, narrower)
    assert widened_text(source.config, source.config) == ""


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c.replace(
                branches=(
                    dataclasses.replace(c.branches[0], patch=6),
                    dataclasses.replace(c.branches[1], patch=3),
                ),
                image_size=24,
                loss_weights=(),
            ),
            "not a multiple",
        ),
        (lambda c: c.replace(branches=c.branches[:2], loss_weights=()), "fewer than the source's"),
        (lambda c: c.replace(branches=(dataclasses.replace(c.branches[0], width=48), *c.branches[1:])), "branch 0"),
        (lambda c: c.replace(num_classes=7, class_names=()), "num_classes"),
        (lambda c: c.replace(schedule=dataclasses.replace(c.schedule, kind="linear")), "noise schedules"),
    ],
)
def test_a_target_that_does_not_extend_the_source_is_refused(change, message):
    source = get_preset("tiny")
    with pytest.raises(ConfigError, match=message):
        growth_factor(source, change(grown_tiny(source)))


def test_grow_cli_then_train_from_it_and_export(tmp_path, emoji_data):
    """tiny (16 px) -> a 4-branch 32 px model through train/init_grown.py, trained one step with init_from and
    exported: the card tells the growth and the source's training."""
    src_dir = tmp_path / "src"
    r = subprocess.run(
        [*TRAIN, "--config", str(ROOT / "train" / "configs" / "tiny.json"), "--run-dir", str(tmp_path / "run")]
        + ["--set", f"data_path={json.dumps(str(emoji_data))}", "steps=2", "sample_every=0", "threads=1"],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        [*EXPORT, str(tmp_path / "run"), "--name", "src", "--weights-dir", str(tmp_path), "--no-samples"], env=ENV
    )
    assert r.returncode == 0

    target = grown_tiny(get_preset("tiny"))
    overrides = {"branches": [dataclasses.asdict(b) for b in target.branches], "image_size": 32, "loss_weights": []}
    cfg = json.loads((ROOT / "train" / "configs" / "tiny.json").read_text()) | {
        "data_path": str(emoji_data),
        "image_size": 32,
        "model_overrides": overrides,
        "init_from": str(tmp_path / "grown"),
        "steps": 1,
        "sample_every": 0,
        "lr": 1e-12,
        "threads": 1,
    }
    (tmp_path / "big.json").write_text(json.dumps(cfg))
    grow_args = [str(src_dir), "--config", str(tmp_path / "big.json"), "--out", str(tmp_path / "grown")]
    r = subprocess.run([*GROW, *grow_args], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "branches 0-2 from" in r.stdout and "branch 3 new" in r.stdout
    grown = load_model(tmp_path / "grown")
    assert grown.config.image_size == 32 and len(grown.config.branches) == 4
    assert grown.config.class_names == load_model(src_dir).config.class_names
    info = json.loads((tmp_path / "grown" / "run_info.json").read_text())
    assert info["grown_from"] == str(src_dir) and info["source"]["step"] == 2 and info["added_branches"] == [3]

    # the same image size with wider MLPs: nothing fresh, and the log, run_info and card say what changed
    wide = json.loads((ROOT / "train" / "configs" / "tiny.json").read_text()) | {
        "model_overrides": {
            "branches": [dataclasses.asdict(b) for b in wider_tiny(get_preset("tiny"), (128, 48, 16)).branches]
        }
    }
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    r = subprocess.run(
        [*GROW, str(src_dir), "--config", str(tmp_path / "wide.json"), "--out", str(tmp_path / "wide")],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wider MLPs in branches 0 (" in r.stdout and "no new branch (0 of" in r.stdout
    wide_info = json.loads((tmp_path / "wide" / "run_info.json").read_text())
    line = grown_lines(run_info_from_dict(wide_info)).splitlines()[0]
    assert line.endswith(f"its 3 branches copied ({wide_info['widened']}), no new branch")
    assert "patchify kernels widened 2x" in grown_lines(run_info_from_dict(info))

    r = subprocess.run([*GROW, *grow_args], env=ENV, capture_output=True, text=True)  # no silent overwrite
    assert r.returncode == 2 and "--force" in r.stderr
    r = subprocess.run(
        [*GROW, str(src_dir), "--preset", "emoji-64", "--out", str(tmp_path / "x")],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "cannot grow" in r.stderr and not (tmp_path / "x").exists()

    # The grown directory is a valid init_from for the training config it was grown into.
    r = subprocess.run(
        [*TRAIN, "--config", str(tmp_path / "big.json"), "--run-dir", str(tmp_path / "bigrun")],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    tuned = load_model(tmp_path / "bigrun" / "ema").state_dict()
    assert all(torch.allclose(tuned[k], v, atol=1e-6) for k, v in grown.state_dict().items())
    r = subprocess.run(
        [*EXPORT, str(tmp_path / "bigrun"), "--name", "big", "--weights-dir", str(tmp_path), "--no-samples"], env=ENV
    )
    assert r.returncode == 0
    text = (tmp_path / "big" / "README.md").read_text()
    assert f"Grown from `{src_dir}`" in text and "python train/init_grown.py" in text
    assert text.index("Steps: 2 at batch 8") < text.index("Steps: 1 at batch 8")

    # The evaluator judges models of two sizes only at one size, named explicitly.
    evaluate = [sys.executable, str(ROOT / "train" / "evaluate.py"), str(src_dir), str(tmp_path / "big")]
    opts = ["--data", str(emoji_data), "--steps", "1"]  # the protocol's 50 per class, so that the card is written
    r = subprocess.run([*evaluate, *opts], env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "pass --judge-size" in r.stderr
    r = subprocess.run([*evaluate, *opts, "--judge-size", "64"], env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "cannot judge at 64 px" in r.stderr
    r = subprocess.run([*evaluate, *opts, "--judge-size", "16"], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| src |" in r.stdout and "| big |" in r.stdout
    ev = json.loads((tmp_path / "big" / "eval.json").read_text())
    assert (
        ev["judge_size"] == 16
        and "judged at 16 px (area-averaged from 32 px)" in (tmp_path / "big" / "README.md").read_text()
    )


def test_grown_model_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    source = build_model(get_preset("tiny"))
    target = build_model(grown_tiny(source.config))
    grow(source, target)
    save_model(target, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in target.state_dict().items())
