"""The app: input handling and paths (unit), and a live server driven through gradio_client."""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
from pathlib import Path

import gradio as gr
import pytest
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(ROOT))
import app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("weights")
    shutil.copytree(tiny_model_dir, root / "tiny")
    old = app.WEIGHTS
    app.WEIGHTS = root
    app.MODELS.items.clear()
    yield root
    app.WEIGHTS = old
    app.MODELS.items.clear()


def test_model_paths_stay_inside_roots(weights, tmp_path):
    assert app.resolve_model("tiny") == (weights / "tiny").resolve()
    for bad in ["../tiny", "/etc", "~/x", "tiny/../../etc", "a\\b", ""]:
        with pytest.raises(app.InputError):
            app.resolve_model(bad)
    outside = tmp_path / "outside"
    shutil.copytree(weights / "tiny", outside)
    os.symlink(outside, weights / "link")
    with pytest.raises(app.InputError, match="outside"):
        app.resolve_model("link")


def test_released_models_offline_give_a_clear_message(weights, monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(app, "CACHE", tmp_path)
    name = next(iter(app.RELEASED))
    with pytest.raises(app.InputError, match="unavailable"):
        app.resolve_model(name)
    with pytest.raises(gr.Error):
        list(app.generate("face", 0, 3, 2.0, "ddim", 1, name))


@pytest.mark.parametrize(
    "args",
    [
        ("nope", 0, 5, 2.0, "ddim", 1),
        ("face", -1, 5, 2.0, "ddim", 1),
        ("face", 0, 0, 2.0, "ddim", 1),
        ("face", 0, 5, float("nan"), "ddim", 1),
        ("face", 0, 5, float("inf"), "ddim", 1),
        ("face", 0, 5, -2.0, "ddim", 1),
        ("face", 0, 5, 2.0, "euler", 1),
        ("face", 0, 5, 2.0, "ddim", 99),
        ("face", 2**64, 5, 2.0, "ddim", 1),
        ("face", 1.5, 5, 2.0, "ddim", 1),
        ("face", "abc", 5, 2.0, "ddim", 1),
        (None, 0, 5, 2.0, "ddim", 1),
    ],
)
def test_bad_inputs_are_gr_errors(weights, args):
    with pytest.raises(gr.Error):
        list(app.generate(*args, model="tiny"))


@settings(max_examples=40, deadline=None)
@given(
    st.one_of(st.text(max_size=8), st.integers(-5, 5)),
    st.one_of(st.integers(-3, 2**64), st.floats(allow_nan=True)),
    st.one_of(st.integers(-2, 3), st.floats(allow_nan=True)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["ddim", "dpm++2m", "dpm++2m-sde", "x", ""]),
)
def test_fuzz_inputs_give_results_or_gr_errors(class_label, seed, steps, guidance, sampler):
    old = app.WEIGHTS
    try:
        out = list(app.generate(class_label, seed, steps, guidance, sampler, 1, "tiny"))
        assert out[-1][1] is not None  # final images
        assert guidance >= 0 and math.isfinite(guidance)
    except gr.Error:
        pass
    finally:
        app.WEIGHTS = old


def test_stochastic_sampler_is_offered_and_repeats_per_seed(weights):
    """dpm++2m-sde draws fresh noise every step, from the seed's own generator: the same request gives
    the same images, another seed another."""

    def final(seed):
        return list(app.generate("heart", seed, 5, 2.0, "dpm++2m-sde", 2, "tiny"))[-1][1]

    assert "dpm++2m-sde" in app.SAMPLERS
    a, b, c = final(4), final(4), final(5)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not (a[0] == c[0]).all()


def test_generate_streams_then_scrub_step_mode_and_gif(weights, tmp_path, monkeypatch):
    monkeypatch.setattr(app, "CACHE", tmp_path)
    outs = list(app.generate("heart", 3, 6, 2.0, "dpm++2m", 2, "tiny"))
    panels, final, status, run, slider, sched, settle, adds = outs[-1]
    assert len(final) == 2 and final[0].shape == (16, 16, 3)
    assert "done" in status and len(run.traj.frames) == 6
    headers = run.headers
    assert headers[:4] == ["x_t (noisy)", "branch 0: 4x4", "branch 1: 8x8", "branch 2: 16x16"]
    # panels: 2 rows (images) x (x_t + 3 branches + 2 additions) at the display size, plus a header
    assert panels.shape[1] >= 6 * app.DISPLAY and panels.shape[0] >= 2 * app.DISPLAY
    img, st_, *_ = app.scrub(2, run)
    assert "step 2 / 6" in st_
    gif = app.export_gif(run)
    assert Path(gif).stat().st_size > 0
    # step mode: one solver update per click, state per session object
    r2, msg, *_ = app.step_start("face", 0, 3, 2.0, "ddim", 1, "tiny")
    for i in range(3):
        res = app.step_next(r2)
        assert f"step {i + 1} / 3" in res[2]
    assert res[1] is not None and r2.stepper is None
    with pytest.raises(gr.Error):
        app.step_next(r2)
    assert len(run.traj.frames) == 6  # the other session's trajectory is untouched


def test_live_server_with_gradio_client(weights):
    from gradio_client import Client

    demo = app.build_demo(default_model="tiny")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        job = client.submit(class_label="heart", seed=1, steps=12, guidance=2.0, sampler="ddim", api_name="/generate")
        updates = list(job)
        assert len(updates) >= 2  # streamed steps, then the final result
        panels, final, status = updates[-1][:3]
        assert len(final) == 4  # the default number of images
        assert "done" in status and Path(panels).is_file()
        # class ids work too; bad input is a clean error and the server keeps serving
        assert (
            "done"
            in client.predict(class_label="1", seed=2, steps=3, guidance=1.0, sampler="ddpm", api_name="/generate")[2]
        )
        with pytest.raises(Exception, match="unknown class"):
            client.predict(class_label="dragon", seed=1, steps=3, guidance=2.0, sampler="ddim", api_name="/generate")
        assert (
            "done"
            in client.predict(class_label="face", seed=1, steps=3, guidance=2.0, sampler="ddim", api_name="/generate")[
                2
            ]
        )
    finally:
        demo.close()
