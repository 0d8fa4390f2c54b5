"""Typed Hub repo ids on a public server: file types, sizes from the file list, our config, the switch.

The Hub API is a test double: `model_info` answers a file list with sizes, the downloads copy local
files and record what was asked for, so a refused repo is shown to have downloaded nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from mrdit.hubguard import HubIdRefused, fetch_model, hub_ids_allowed, plan_download


class FakeApi:
    def __init__(self, model_dir: Path, files: dict[str, int | None], config: dict | None = None) -> None:
        self.model_dir, self.files, self.config = model_dir, files, config
        self.downloads: list[object] = []

    def model_info(self, repo_id, revision=None, files_metadata=False):
        assert files_metadata, "sizes must be asked for"
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=n, size=s) for n, s in self.files.items()])

    def hf_hub_download(self, repo_id, filename, revision=None):
        self.downloads.append(filename)
        path = self.model_dir.parent / f"fetched-{filename}"
        if self.config is not None:
            path.write_text(json.dumps(self.config))
        else:
            shutil.copyfile(self.model_dir / filename, path)
        return str(path)

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None):
        self.downloads.append(tuple(allow_patterns))
        return str(self.model_dir)


ON = {"MRDIT_HUB_IDS": "1"}
MODEL_FILES = {"config.json": 900, "model.safetensors": 40_000, "README.md": 2_000, "train.pth": 10**12}


@pytest.fixture
def model_dir(tmp_path, tiny_model_dir) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "repo"))


def test_only_config_and_safetensors_are_downloaded(model_dir):
    api = FakeApi(model_dir, MODEL_FILES | {"sub/model.safetensors": 5, "model.safetensors.index.json": 100})
    assert fetch_model("user/tiny", api=api, env=ON) == model_dir
    assert api.downloads == ["config.json", ("config.json", "model.safetensors", "model.safetensors.index.json")]


def test_size_limit_is_read_from_the_file_list_before_any_download(model_dir):
    api = FakeApi(model_dir, MODEL_FILES | {"model.safetensors": 5 * 10**9})
    with pytest.raises(HubIdRefused, match="5.00 GB, over this server's limit of 4.00 GB"):
        fetch_model("user/huge", api=api, env=ON)
    with pytest.raises(HubIdRefused, match="over this server's limit of 0.00 GB"):
        fetch_model("user/tiny", api=FakeApi(model_dir, MODEL_FILES), env=ON | {"MRDIT_HUB_MAX_BYTES": "1000"})
    assert api.downloads == []
    unknown = FakeApi(model_dir, MODEL_FILES | {"model.safetensors": None})
    with pytest.raises(HubIdRefused, match="did not report the size"):
        plan_download("user/tiny", unknown, 10**9)


def test_repos_without_our_config_or_safetensors_are_refused(model_dir):
    with pytest.raises(HubIdRefused, match="has no config.json"):
        fetch_model("user/pth-only", api=FakeApi(model_dir, {"model.pth": 10}), env=ON)
    with pytest.raises(HubIdRefused, match="no safetensors"):
        fetch_model("user/no-weights", api=FakeApi(model_dir, {"config.json": 10, "pytorch_model.bin": 10}), env=ON)
    foreign = FakeApi(model_dir, MODEL_FILES, config={"architectures": ["BertModel"], "hidden_size": 768})
    with pytest.raises(HubIdRefused, match="not an mrdit model config"):
        fetch_model("user/bert", api=foreign, env=ON)
    assert foreign.downloads == ["config.json"]  # the weights were never fetched


def test_the_switch_turns_typed_ids_off_and_is_off_by_default_on_a_space(model_dir):
    api = FakeApi(model_dir, MODEL_FILES)
    with pytest.raises(HubIdRefused, match="MRDIT_HUB_IDS=0"):
        fetch_model("user/tiny", api=api, env={"MRDIT_HUB_IDS": "0"})
    assert api.downloads == []
    assert hub_ids_allowed({}) and not hub_ids_allowed({"SPACE_ID": "user/space"})
    assert hub_ids_allowed({"SPACE_ID": "user/space", "MRDIT_HUB_IDS": "1"})


def test_the_app_turns_refusals_into_input_errors(monkeypatch):
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT))
    import app

    monkeypatch.setenv("MRDIT_HUB_IDS", "0")
    with pytest.raises(app.InputError, match="does not download typed Hub repo ids"):
        app.resolve_model("someone/anything")
