"""The matched pair's rule (docs/matched-pair.md): better only when every seed is, and for accuracy
only when the pooled intervals are apart; records of different protocols are refused."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT
from test_evaluation import _record

sys.path.insert(0, str(ROOT / "train"))

import compare_pair  # noqa: E402

ACC = compare_pair.METRICS[0]
FD = compare_pair.METRICS[1]
NAMES = ("DiMR", "baseline")


def runs(*accuracies: float, fd: float = 3.0) -> list:
    return [_record(accuracy=a, fd=fd + i) for i, a in enumerate(accuracies)]


def test_every_seed_better_and_intervals_apart_is_better():
    assert compare_pair.verdict(ACC, runs(0.80, 0.82), runs(0.30, 0.35), NAMES) == "**DiMR better**"
    assert compare_pair.verdict(ACC, runs(0.30, 0.35), runs(0.80, 0.82), NAMES) == "**baseline better**"


def test_one_seed_behind_or_overlapping_intervals_is_not_decided():
    assert compare_pair.verdict(ACC, runs(0.80, 0.40), runs(0.45, 0.50), NAMES) == "not decided"
    # every seed ahead, but by so little that 200 samples per design cannot tell them apart
    assert compare_pair.verdict(ACC, runs(0.52, 0.53), runs(0.50, 0.51), NAMES) == "not decided"


def test_distances_are_better_when_lower():
    assert compare_pair.verdict(FD, runs(0.5, 0.5, fd=1.0), runs(0.5, 0.5, fd=5.0), NAMES) == "**DiMR better**"
    assert compare_pair.verdict(FD, runs(0.5, 0.5, fd=5.0), runs(0.5, 0.5, fd=1.0), NAMES) == "**baseline better**"
    low = compare_pair.METRICS[2]
    assert compare_pair.verdict(low, runs(0.5), runs(0.5), NAMES) == "not measured for every model"


def test_the_script_reports_from_records_and_refuses_mixed_protocols(tmp_path):
    records = {f"a{i}": r.to_dict() for i, r in enumerate(runs(0.8, 0.82))}
    records |= {f"b{i}": r.to_dict() for i, r in enumerate(runs(0.3, 0.35))}
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    cmd = [sys.executable, str(ROOT / "train" / "compare_pair.py"), "--records", str(path)]
    r = subprocess.run([*cmd, "--a", "a0", "a1", "--b", "b0", "b1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| class accuracy, seeds pooled | 81.0% (" in r.stdout and "**DiMR better**" in r.stdout
    records["b1"]["guidance"] = 2.0
    path.write_text(json.dumps(records))
    r = subprocess.run([*cmd, "--a", "a0", "a1", "--b", "b0", "b1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "differ in guidance" in r.stderr


def test_records_from_several_files_and_unreportable_records_refused(tmp_path):
    cmd = [sys.executable, str(ROOT / "train" / "compare_pair.py"), "--a", "a0", "a1", "--b", "b0", "b1", "--records"]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({f"a{i}": r.to_dict() for i, r in enumerate(runs(0.8, 0.82))}))
    second.write_text(json.dumps({f"b{i}": r.to_dict() for i, r in enumerate(runs(0.3, 0.35))}))
    r = subprocess.run([*cmd, str(first), str(second)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "**DiMR better**" in r.stdout, r.stderr
    tuning = {f"b{i}": _record(accuracy=a, tuning=True, first_seed=0).to_dict() for i, a in enumerate((0.3, 0.35))}
    second.write_text(json.dumps(tuning))
    r = subprocess.run([*cmd, str(first), str(second)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "may not be reported: measured on tuning seeds" in r.stderr
