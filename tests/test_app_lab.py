"""The app's Watch and Runs views: full planned schedule, Play that replays, trajectories bounded by
bytes, GIF / MP4 / bundle export and load (through the functions and through gradio_client)."""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import ROOT, live_client
from PIL import Image

sys.path.insert(0, str(ROOT))
from test_app import _read, free_port, weights  # noqa: E402, F401

import app  # noqa: E402

pytestmark = pytest.mark.usefixtures("weights")  # the tiny model under a temporary weights/


def finished(*args, **kw):
    """Generate's last outputs, with its panels and final images (files of their own) read back."""
    return arrays(list(app.generate(*args, **kw))[-1])


def arrays(outs: tuple) -> tuple:
    panels, final, *rest = outs
    return (_read(panels), [_read(f) for f in final] if final is not None else None, *rest)


def test_generate_keeps_every_step_and_the_plots_cover_the_run():
    panels, final, status, run, slider, sched, settle, adds = finished("heart", 3, 6, 2.0, "dpm++2m", 2, "tiny")
    assert len(final) == 2 and final[0].shape == (16, 16, 3)
    assert "step 6 / 6" in status and "done" in status
    assert [f.step for f in run.traj.frames] == [1, 2, 3, 4, 5, 6]
    assert run.headers[:4] == ["x_t (noisy)", "branch 0: 4x4", "branch 1: 8x8", "branch 2: 16x16"]
    assert panels.shape[1] >= 6 * app.DISPLAY and panels.shape[0] >= 2 * app.DISPLAY
    assert slider["maximum"] == 6 and slider["value"] == 6
    planned = sched[sched.series == "planned schedule"]
    assert len(planned) == 5  # the clean end's log-SNR is infinite and left out
    assert set(settle.band) == {"4x4 layout", "4-8", "8-16", "4x4 layout, branch 0's own", "current step"}
    last = settle[(settle.step == 6) & settle.band.isin(["4x4 layout", "4-8", "8-16"])]
    assert last["distance to final"].abs().max() < 1e-3  # the last estimate is the final image
    own = settle[settle.band == "4x4 layout, branch 0's own"]
    assert len(own) == 6 and own["distance to final"].iloc[-1] < 0.5
    assert set(adds.branch) == {"branch 1 (8x8)", "branch 2 (16x16)", "current step"}
    img, status, sched2, settle2, _ = app.scrub(2, run)
    assert "step 2 / 6" in status
    marker = sched2[sched2.series == "current step"]
    assert set(marker.step) == {2} and set(settle2[settle2.band == "current step"].step) == {2}


def test_play_after_a_run_starts_again_from_step_one():
    run = finished("heart", 1, 4, 2.0, "ddim", 1, "tiny")[3]
    start, timer = app.play(4, run, 5)
    assert start["value"] == 1 and timer.active and timer.value == pytest.approx(0.2)
    steps, step = [], 1
    for _ in range(10):
        upd, timer = app.play_tick(step, run)
        if not timer.active:
            break
        step = upd["value"]
        steps.append(step)
    assert steps == [2, 3, 4]
    mid, timer = app.play(2, run, 4)  # from the middle, Play continues from there
    assert mid["value"] == 2 and timer.active


def test_step_mode_shows_the_whole_planned_schedule_from_the_start():
    run, msg, _, btn, sched = app.step_start("face", 0, 5, 2.0, "dpm++2m", 1, "tiny")
    assert "5 steps" in msg and btn["interactive"]
    planned = sched[sched.series == "planned schedule"]
    assert list(planned.step) == [1, 2, 3, 4]  # every finite planned step before any is computed
    assert set(sched[sched.series == "current step"].step) == {1}
    out = app.step_next(run)
    assert "step 1 / 5" in out[2]
    assert len(out[5][out[5].series == "planned schedule"]) == 4
    app.scrub(1, run)  # looking back before the end: the measure has nothing to compare with yet
    for _ in range(4):
        out = app.step_next(run)
    assert "step 5 / 5" in out[2] and out[1] is not None and run.stepper is None
    assert {"4x4 layout", "4-8", "8-16"} <= set(out[6].band)  # the measure of the finished run


def test_a_thousand_step_run_ends_at_the_last_step_within_the_budget(monkeypatch):
    monkeypatch.setattr(app, "TRAJECTORY_MB", 0.25)
    panels, final, status, run, slider, *_ = finished("heart", 0, 1000, 1.0, "ddim", 1, "tiny")
    traj = run.traj
    assert "step 1000 / 1000" in status and "done" in status and "kept" in status
    assert traj.frames[0].step == 1 and traj.frames[-1].step == 1000
    assert traj.nbytes <= 0.25 * 2**20 and 2 < len(traj.frames) < 1000
    assert slider["maximum"] == 1000 and slider["value"] == 1000
    img, status, *_ = app.scrub(1000, run)
    assert "step 1000 / 1000" in status
    img, status, *_ = app.scrub(500, run)
    shown = int(status.split("**step ")[1].split(" /")[0])
    assert shown <= 500 and shown in {f.step for f in traj.frames}


def test_exports_and_a_bundle_that_replays_the_same_panels(tmp_path):
    run = finished("heart", 2, 5, 2.0, "dpm++2m-sde", 2, "tiny")[3]
    gif = Image.open(app.export_gif(run))
    assert gif.n_frames == 5
    mp4 = Path(app.export_mp4(run))
    assert mp4.stat().st_size > 1000 and mp4.read_bytes()[4:8] == b"ftyp"
    bundle = Path(app.export_bundle(run))
    again = finished("heart", 2, 5, 2.0, "dpm++2m-sde", 2, "tiny")[3]
    assert Path(app.export_bundle(again)).read_bytes() == bundle.read_bytes()  # same settings and seed, same bytes
    loaded = arrays(app.load_run(str(bundle)))
    panels, final, status, lrun, slider = loaded[:5]
    assert "loaded" in status and "step 5 / 5" in status and slider["maximum"] == 5
    assert all((a == b).all() for a, b in zip(final, run.traj.final))
    for step in (1, 3, 5):
        assert np.array_equal(_read(app.scrub(step, lrun)[0]), _read(app.scrub(step, run)[0]))
    upd, timer = app.play(5, lrun, 4)
    assert upd["value"] == 1 and timer.active


def test_bad_uploads_are_clear_errors(tmp_path):
    with pytest.raises(gr.Error, match="Choose"):
        app.load_run(None)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(gr.Error, match="bundle"):
        app.load_run(str(junk))
    run = finished("heart", 2, 3, 2.0, "ddim", 1, "tiny")[3]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(Path(app.export_bundle(run)).read_bytes()[:-100])
    with pytest.raises(gr.Error, match="bundle"):
        app.load_run(str(cut))
    with pytest.raises(gr.Error, match="finished run"):
        app.export_gif(None)


def test_exports_and_bundles_through_gradio_client(tmp_path):
    from gradio_client import handle_file

    with live_client("tiny") as client:
        out = client.predict(class_label="heart", seed=4, steps=4, guidance=2.0, sampler="ddim", num_images=1,
                             model="tiny", api_name="/generate")
        assert "done" in out[2]
        gif = client.predict(api_name="/export_gif")
        assert Path(gif).read_bytes()[:6] in (b"GIF89a", b"GIF87a")
        mp4 = client.predict(api_name="/export_mp4")
        mp4 = mp4["video"] if isinstance(mp4, dict) else mp4
        assert Path(mp4).stat().st_size > 1000
        bundle = client.predict(api_name="/export_bundle")
        loaded = client.predict(handle_file(bundle), api_name="/load_bundle")
        assert "loaded" in loaded[2] and "step 4 / 4" in loaded[2]
        with pytest.raises(Exception, match="bundle"):
            bad = tmp_path / "bad.safetensors"
            bad.write_bytes(b"garbage")
            client.predict(handle_file(str(bad)), api_name="/load_bundle")
        assert "done" in client.predict(class_label="face", seed=1, steps=2, guidance=1.0, sampler="ddim",
                                        api_name="/generate")[2]  # still serving


def test_the_same_seed_gives_the_same_frames_at_any_thinning(monkeypatch):
    full = finished("face", 9, 40, 2.0, "ddpm", 1, "tiny")[3].traj
    monkeypatch.setattr(app, "TRAJECTORY_MB", 0.02)
    thin = finished("face", 9, 40, 2.0, "ddpm", 1, "tiny")[3].traj
    by_step = {f.step: f for f in full.frames}
    assert len(thin.frames) < len(full.frames)
    for f in thin.frames:
        assert torch.equal(f.x, by_step[f.step].x)


def _bundle_with(tmp_path, run, edit) -> str:
    """An exported bundle of `run` with its tensors or JSON header edited by `edit(tensors, header)`."""
    import json

    from safetensors.torch import load, save

    from mrdit.trajectory import BUNDLE_FORMAT

    data = Path(app.export_bundle(run)).read_bytes()
    tensors = load(data)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8 : 8 + n])["__metadata__"][BUNDLE_FORMAT])
    edit(tensors, header)
    path = tmp_path / f"edited-{len(list(tmp_path.iterdir()))}.safetensors"
    path.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata={BUNDLE_FORMAT: json.dumps(header)}))
    return str(path)


def test_hostile_bundle_contents_are_clear_errors(tmp_path):
    run = finished("heart", 2, 3, 2.0, "ddim", 1, "tiny")[3]
    empty = _bundle_with(tmp_path, run, lambda t, h: t.update(branch_0=t["branch_0"][:, :, :, :0, :0]))
    with pytest.raises(gr.Error, match="branch_0"):
        app.load_run(empty)
    cases = [
        (lambda t, h: h["meta"].update(settings="not a dict"), "valid classes"),
        (lambda t, h: h["meta"]["settings"].update(labels=[999]), "valid classes"),
        (lambda t, h: h["meta"].update(model="DiMR-XL/2R (ImageNet 256, authors' release)"), "not one of the shipped"),
        (lambda t, h: h["meta"].update(model="someone/else"), "not one of the shipped"),
    ]
    for edit, match in cases:
        loaded = app.load_run(_bundle_with(tmp_path, run, edit))[3]  # loads and replays: the views need no model
        assert "loaded" in app.scrub(3, loaded)[1] or "step 3 / 3" in app.scrub(3, loaded)[1]
        with pytest.raises(gr.Error, match=match):
            app.attention(1, 1, "mean", loaded)
    ok = app.load_run(_bundle_with(tmp_path, run, lambda t, h: None))[3]
    assert "layer 1" in app.attention(2, 1, "mean", ok)[1]  # an honest bundle of a shipped model works


def test_large_bundles_are_thinned_to_the_session_budget(monkeypatch):
    run = finished("face", 1, 30, 2.0, "ddim", 1, "tiny")[3]
    path = app.export_bundle(run)
    monkeypatch.setattr(app, "TRAJECTORY_MB", 0.01)
    loaded = app.load_run(path)[3]
    steps = [f.step for f in loaded.traj.frames]
    assert loaded.traj.nbytes <= 0.01 * 2**20 and steps[0] == 1 and steps[-1] == 30 and len(steps) < 30
