"""The shipped checkpoints load and sample on the CPU (a smoke, not a quality test); publishing lists
exactly the inference files."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from mrdit import load_model
from mrdit.hub import main as hub_main
from mrdit.pipeline import Pipeline

SHIPPED = (
    sorted(p for p in (ROOT / "weights").iterdir() if (p / "config.json").is_file())
    if (ROOT / "weights").is_dir()
    else []
)


def test_default_model_is_shipped():
    assert (ROOT / "weights" / "mrdit-emoji-32" / "config.json").is_file()


@pytest.mark.parametrize("model_dir", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_model_loads_and_samples(model_dir):
    pipe = Pipeline.from_pretrained(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["channels"] == 3 and cfg["num_classes"] == len(cfg["class_names"]) + 1
    res = pipe.generate(pipe.class_names[0], [0, 1], steps=4, guidance=2.0, keep_trajectory=True)
    assert len(res.images) == 2 and res.images[0].size == (cfg["image_size"],) * 2
    assert len(res.trajectory) == 4
    card = (model_dir / "README.md").read_text()
    for needle in ("CC-BY 4.0", "Apache-2.0", "MIT", "train/train.py", "Hardware"):
        assert needle in card


def test_hub_push_dry_run_lists_inference_files(tiny_model_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    assert hub_main(["push", str(d), "--repo-id", "me/tiny", "--dry-run"]) == 1  # no card yet: refused
    (d / "README.md").write_text("# tiny\n")
    (d / "notes.pt").write_bytes(b"not uploaded")
    assert hub_main(["push", str(d), "--repo-id", "me/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload config.json" in out and "model.safetensors" in out and "README.md" in out
    assert "notes.pt" not in out
    load_model(d)
