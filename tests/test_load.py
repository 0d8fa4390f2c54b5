"""Many users at once, short form (the full run is `python bench/load.py --users 16 --seconds 60`)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_eight_users_ten_seconds(tmp_path):
    out = tmp_path / "load.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "load.py"),
            "--users",
            "8",
            "--seconds",
            "10",
            "--steps",
            "4",
            "--images",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    res = json.loads(out.read_text())
    assert r.returncode == 0, (res, r.stderr[-2000:])
    assert res["server_alive"] and res["errors"] == 0 and res["isolation_violations"] == 0
    assert res["completed"] >= 8 and res["step_mode_steps"] >= 4
    assert res["mem_growth_mb"] < 300
