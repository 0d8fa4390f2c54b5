"""End-to-end smoke of train/branch_experiments.py on the tiny saved model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "train" / "branch_experiments.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_help_and_bad_arguments():
    assert "--seeds-per-class" in _run("--help").stdout
    bad = _run("--seeds-per-class", "3")
    assert bad.returncode == 2 and "--seeds-per-class must be even" in bad.stderr


def test_runs_every_experiment_and_measures_saved_images_again(tiny_model_dir, tmp_path):
    out, images = tmp_path / "r.json", tmp_path / "x.safetensors"
    common = ["--model", str(tiny_model_dir), "--out", str(out), "--images", str(images), "--seeds-per-class", "2"]
    res = _run(
        *common,
        "--steps",
        "2",
        "--class-swap-steps",
        "0",
        "--freeze-steps",
        "0",
        "--zero-steps",
        "1",
        "--branch-weights",
        "2,1,1",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("config:") and "**Swap**" in res.stdout
    r = json.loads(out.read_text())
    assert r["bands"] == ["4x4 layout", "4-8", "8-16"]
    # From step 0 a class swap at one seed is exactly A: the class reaches the finer branches only there.
    assert r["swap"]["other class, same seed, from 0"]["hybrid_to_a_over_a_to_b"] == [0.0, 0.0, 0.0]
    assert set(r["conditions"]) == {"freeze from 0", "zero from 1", "weights 2,1,1"}
    assert r["images_sampled"] == 2 * 3 + 4 * 2 + 3 * 4  # 2 classes: seed swap, class swap, 3 conditions
    assert len(r["probes"]["grid_mass"]) == 3
    again = _run(*common, "--reuse-images")
    assert again.returncode == 0, again.stderr
    assert json.loads(out.read_text())["swap"] == r["swap"]


def test_tables_print_the_judge_with_its_version():
    """The judge's record holds its version (a string) beside the per-condition records: printed in the
    header, not read as a condition."""
    spec = importlib.util.spec_from_file_location("branch_experiments", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    judge = {
        "version": "3: subcategories",
        "validation_accuracy": 0.7,
        "plain": {"accuracy": 0.88, "interval": [0.83, 0.92], "n": 192},
        "class hybrid": {"share_class_a": 0.25, "share_class_b": 0.5, "n": 96},
    }
    text = mod.tables({"bands": [], "swap": {}, "another_seed": [], "conditions": {}, "judge": judge})
    assert "version '3: subcategories', validation accuracy 70.0%" in text
    assert "| plain | 88.0% (83.0-92.0%, n=192) |" in text
    assert "| class hybrid | A's class 25.0%, B's class 50.0% (n=96) |" in text


def test_judge_data_the_judge_cannot_use_is_refused_before_sampling(tiny_model_dir, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "classes.json").write_text('{"classes": [], "sizes": [16]}')  # prepared before subcategories
    out = tmp_path / "r.json"
    res = _run("--model", str(tiny_model_dir), "--out", str(out), "--judge-data", str(tmp_path / "old"))
    assert res.returncode == 2 and "--judge-data:" in res.stderr and "prepare_emoji.py again" in res.stderr
    assert not out.exists()
