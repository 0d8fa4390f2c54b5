"""The authors' released checkpoints through the app's real code, end to end, without the Hub.

A checkpoint in the release's own `.pth` layout (the release's key naming, random weights of a tiny
model wired like DiMR-XL/2R) and a small AutoencoderKL saved with `save_pretrained` stand in for the
files on the Hub; only `huggingface_hub.hf_hub_download` is replaced. Everything else is the served
path: download -> convert -> cache -> load -> stream (linear previews) -> decode (the VAE).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import PARITY, ROOT, live_client, tiny_vae
from safetensors.torch import load_file

from mrdit.convert import config_from_official
from mrdit.released import Release, is_ready, prepare

sys.path.insert(0, str(ROOT))
from test_app import _read  # noqa: E402

import app  # noqa: E402

LABEL = "Tiny release (test)"
REPO, VAE_REPO = "authors/DiMR-test", "authors/vae-test"


class FakeHub:
    """`hf_hub_download` over local files, counting what was asked for."""

    def __init__(self, files: dict[tuple[str, str], Path]) -> None:
        self.files = files
        self.calls: list[tuple[str, str]] = []

    def __call__(self, repo_id: str, filename: str, **kwargs) -> str:
        self.calls.append((repo_id, filename))
        try:
            return str(self.files[repo_id, filename])
        except KeyError:
            raise FileNotFoundError(f"{repo_id}/{filename}") from None


@pytest.fixture(scope="module")
def release_files(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("hub")
    pth = root / "DiMR-Tiny_2R.pth"
    torch.save(load_file(str(PARITY / "tiny_2r.official.safetensors")), pth)  # the release's key naming
    torch.manual_seed(0)
    tiny_vae().save_pretrained(root / "vae")
    files = {(REPO, pth.name): pth}
    files.update({(VAE_REPO, n): root / "vae" / n for n in ("config.json", "diffusion_pytorch_model.safetensors")})
    return files


def tiny_release() -> Release:
    meta = json.loads((PARITY / "tiny_2r.json").read_text())
    return Release("tiny-2r", REPO, "DiMR-Tiny_2R.pth", config=lambda: config_from_official(meta), vae_repo=VAE_REPO)


@pytest.fixture
def served(monkeypatch, tmp_path, release_files):
    import huggingface_hub

    hub = FakeHub(release_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    monkeypatch.setitem(app.RELEASED, LABEL, tiny_release())
    monkeypatch.setattr(app, "CACHE", tmp_path / "cache")
    app.MODELS.items.clear()
    yield hub, tmp_path / "cache"
    app.MODELS.items.clear()


def test_first_load_converts_and_caches_then_loads_without_converting(served):
    hub, cache = served
    out = app.resolve_model(LABEL)
    assert out == cache / "tiny-2r" and is_ready(out)
    assert {"config.json", "model.safetensors", "preview.safetensors", "class_synonyms.json"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()  # the VAE is served from beside the model
    assert sorted(r for r, _ in hub.calls) == sorted([REPO, VAE_REPO, VAE_REPO])
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert app.resolve_model(LABEL) == out
    assert len(hub.calls) == 3 and (out / "model.safetensors").stat().st_mtime_ns == stamp  # nothing again
    assert not list(cache.glob(".tiny-2r.partial-*"))


def test_an_interrupted_conversion_is_never_taken_for_a_finished_one(served, monkeypatch):
    hub, cache = served
    import mrdit.preview

    def interrupted(*args, **kwargs):  # the last step of the build: the weights are written by then
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(mrdit.preview, "fit_linear_preview", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare(tiny_release(), cache)
    assert not (cache / "tiny-2r").exists() and not list(cache.glob(".tiny-2r.partial-*"))
    # a build killed outright leaves its staging folder, weights and config included: not a model
    dead = cache / ".tiny-2r.partial-deadbeef"
    dead.mkdir()
    (dead / "config.json").write_text("{}")
    out = app.resolve_model(LABEL)
    assert is_ready(out) and (out / "preview.safetensors").is_file() and not dead.exists()


def test_released_model_classes_previews_and_full_decode(served):
    pipe = app.MODELS.get(LABEL)
    assert pipe.preview_kind == "linear approximation"
    assert [pipe.resolve_label(s) for s in ("Cardigan", "cardigan", "207", "golden retriever")] == [264, 474, 207, 207]
    assert pipe.resolve_label("Cardigan Welsh corgi") == 264 and pipe.resolve_label("cardigan (474)") == 474
    with pytest.raises(app.InputError, match="several classes"):
        pipe.resolve_label("CARDIGAN")
    outs = list(app.generate("cardigan", 3, 4, 2.0, "dpm++2m", 2, LABEL))
    panels, final, status, run = outs[-1][:4]
    panels, final = _read(panels), [_read(f) for f in final]
    assert len(final) == 2 and final[0].shape == (64, 64, 3)  # decoded by the (2x) VAE
    assert "preview: linear approximation" in status and run.settings.labels == (474, 474)
    frame = run.traj.frames[1]
    assert [tuple(b.shape) for b in frame.branches] == [(2, 3, 16, 16), (2, 3, 32, 32)]  # each branch's own grid
    sheet, status = app.full_decode(2, run)  # the step being looked at, through the full VAE
    sheet = _read(sheet)
    full = run.cache["full"][2]
    assert "preview: VAE decode" in status and "linear" not in status
    assert full.kind == "VAE decode" and [tuple(b.shape) for b in full.branches] == [(2, 3, 32, 32), (2, 3, 64, 64)]
    app.full_decode(2, run)
    assert run.cache["full"][2] is full  # decoded once
    assert sheet.shape[1] >= 4 * app.DISPLAY
    assert panels.shape[1] >= 4 * app.DISPLAY  # x_t, two branches, what the fine branch added


def test_generate_endpoint_serves_the_released_model(served):
    with live_client(LABEL) as client:
        job = client.submit(
            class_label="golden retriever",
            seed=5,
            steps=3,
            guidance=2.0,
            sampler="dpm++2m",
            num_images=2,
            model=LABEL,
            api_name="/generate",
        )
        panels, final = list(job)[-1][:2]
        assert len(final) == 2 and Path(panels).is_file()
