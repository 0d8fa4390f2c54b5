"""The coarse-to-fine measurement script end to end on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_the_script_measures_every_band_and_branch(tiny_model_dir, tmp_path):
    out = tmp_path / "c2f.json"
    cmd = [sys.executable, str(ROOT / "train" / "coarse_to_fine.py"), str(tiny_model_dir), "--seeds-per-class", "2",
           "--steps", "3", "--threads", "1", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.read_text())["results"][0]
    assert result["images"] == 4 and result["bands"] == ["4x4 layout", "4-8", "8-16"]
    assert all(len(v) == 3 for v in result["mean_distance"].values())
    assert all(v[-1] == 0.0 for v in result["mean_distance"].values())  # the last estimate is the final image
    assert set(result["new_detail_share"]) == {"branch 1", "branch 2"}
    assert "| 4x4 layout |" in run.stdout
