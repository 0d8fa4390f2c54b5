"""Console scripts: every entry in pyproject.toml resolves, checkout scripts run with their own
arguments and exit codes, and outside a checkout they say so instead of failing obscurely."""

from __future__ import annotations

import importlib
import tomllib

import pytest
from conftest import ROOT

from mrdit import scripts


def _entries() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_console_script_resolves_to_a_callable_and_every_checkout_script_exists():
    entries = _entries()
    for name, target in entries.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    checkout = {n for n, t in entries.items() if t.startswith("mrdit.scripts:")}
    assert checkout == set(scripts.CHECKOUT_SCRIPTS)
    for script in scripts.CHECKOUT_SCRIPTS.values():
        assert (scripts.TRAIN / script).is_file(), script


def test_a_checkout_script_gets_its_arguments_and_exit_code(capsys):
    assert scripts.run_checkout_script("mrdit-train", ["--help"]) == 0
    assert "--config" in capsys.readouterr().out
    assert scripts.run_checkout_script("mrdit-export", []) == 2  # argparse: missing arguments
    assert "required" in capsys.readouterr().err


def test_outside_a_checkout_the_script_says_what_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(scripts, "TRAIN", tmp_path / "train")
    assert scripts.run_checkout_script("mrdit-train", ["--help"]) == 1
    assert "source checkout" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["mrdit.generate", "mrdit.convert"])
def test_package_tools_keep_python_dash_m(module):
    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
