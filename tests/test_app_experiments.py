"""The app's Experiments, Inside the network and Compare tabs, through their functions and the API."""

from __future__ import annotations

import re
import shutil
import sys

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import ROOT, live_client

sys.path.insert(0, str(ROOT))

import app  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_model_dir):
    """The tiny DiMR and a tiny single-resolution baseline with the same classes."""
    from mrdit import build_model, get_preset, save_model

    root = tmp_path_factory.mktemp("weights")
    shutil.copytree(tiny_model_dir, root / "tiny")
    torch.manual_seed(1)
    dimr = get_preset("tiny").replace(num_classes=3, null_label=2, class_names=("face", "heart"))
    spec = dimr.branches[0]
    base = dimr.replace(architecture="unpatchify", branches=(spec.__class__(**{**spec.__dict__, "grid": 8, "patch": 2}),),
                        loss_weights=(1.0,))
    save_model(build_model(base), root / "base")
    old, old_base = app.WEIGHTS, app.BASELINE
    app.WEIGHTS, app.BASELINE = root, "base"
    app.MODELS.items.clear()
    yield root
    app.WEIGHTS, app.BASELINE = old, old_base
    app.MODELS.items.clear()


COMMON = dict(class_label="heart", seed=3, steps=4, guidance=2.0, sampler="dpm++2m", num_images=2, model="tiny")


def test_swap_shows_a_b_and_the_hybrid_with_band_distances(weights):
    sheet, summary = app.run_experiment("swap-coarse", **COMMON, other_seed=50, other_class="face", from_step=1)
    assert sheet.ndim == 3 and sheet.shape[0] > 3 * app.DISPLAY  # three titled rows
    assert "hybrid vs A" in summary and "hybrid vs B" in summary and "4x4 layout" in summary


def test_swap_of_a_run_with_itself_is_the_plain_run(weights):
    """A == B: the hybrid's coarse features are its own, so every band distance is 0."""
    sheet, summary = app.run_experiment("swap-coarse", **COMMON, other_seed=3, other_class="heart", from_step=1)
    row = [line for line in summary.splitlines() if line.startswith("| hybrid vs A")][0]
    assert all(float(v) == 0.0 for v in row.split("|")[2:-1])


def test_freeze_and_branch_guidance_run_beside_the_plain_run(weights):
    _, s = app.run_experiment("freeze-coarse", **COMMON, from_step=2)
    assert "frozen at step 2" in s
    _, s = app.run_experiment("freeze-coarse", **COMMON, from_step=4)  # the last step: the plain run
    row = [line for line in s.splitlines() if line.startswith("| coarse features frozen")][0]
    assert all(float(v) == 0.0 for v in row.split("|")[2:-1])
    _, s = app.run_experiment("freeze-coarse", **COMMON, from_step=1, zero=True)
    assert "zeroed" in s
    _, s = app.run_experiment("branch-guidance", **COMMON, branch_weights="1, 1, 2")  # = ordinary guidance 2
    row = [line for line in s.splitlines() if line.startswith("| weights 1, 1, 2")][0]
    assert all(float(v) < 1e-4 for v in row.split("|")[2:-1])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(experiment="melt-coarse"), "experiment must be"),
        (dict(experiment="swap-coarse", other_seed=-1), "seed"),
        (dict(experiment="swap-coarse", other_class="dragon"), "unknown class"),
        (dict(experiment="freeze-coarse", from_step=0), "from step"),
        (dict(experiment="freeze-coarse", from_step=99), "from step"),
        (dict(experiment="freeze-coarse", from_step="abc"), "from step"),
        (dict(experiment="branch-guidance", branch_weights="4, 1"), "3 numbers"),
        (dict(experiment="branch-guidance", branch_weights="a, b, c"), "numbers"),
        (dict(experiment="branch-guidance", branch_weights="1, nan, 1"), "3 numbers"),
        (dict(experiment="swap-coarse", num_images=9), "number of images"),
    ],
)
def test_bad_experiment_settings_are_clear_errors(weights, kw, match):
    args = {**COMMON, **kw}
    with pytest.raises(gr.Error, match=match):
        app.run_experiment(**args)


def test_the_baseline_refuses_experiments(weights):
    with pytest.raises(gr.Error, match="multi-branch"):
        app.run_experiment("swap-coarse", **{**COMMON, "model": "base"})


def test_attention_and_norms_of_the_current_run(weights):
    run = list(app.generate("heart", 1, 4, 2.0, "ddim", 2, "tiny"))[-1][3]
    sheet, caption = app.attention(2, 1, "mean", run)
    assert sheet.shape[0] > 2 * 64 and "layer 1 of" in caption and "step 2 / 4" in caption
    sheet_h, caption_h = app.attention(2, 1, "1", run)
    assert "head 1" in caption_h and not np.array_equal(sheet, sheet_h)
    with pytest.raises(gr.Error, match="layer"):
        app.attention(2, 99, "mean", run)
    with pytest.raises(gr.Error, match="Generate"):
        app.attention(1, 1, "mean", None)
    df = app.tdln("tiny", 2, run)
    assert {"t", "value", "series"} <= set(df.columns)
    assert df[df.series == "current step"].t.nunique() == 1
    assert any(s.startswith("branch 2") for s in df.series)
    gates = app.tdln("tiny", None, None, app.TDLN_VIEWS[1])
    assert gates[gates.series != "current step"].value.between(0, 1).all()


def test_compare_runs_dimr_and_the_baseline_side_by_side(weights):
    sheet, status, runs, slider = app.compare("face", 5, 3, 2.0, "ddim", 1, "tiny")
    assert "baseline" in status and "parameters" in status and slider["maximum"] == 3
    assert sheet.shape[1] >= 6 * 48  # DiMR: x_t + 3 branches; baseline: x_t + 1 estimate
    assert not np.array_equal(app.compare_scrub(1, runs), sheet)
    with pytest.raises(gr.Error, match="DiMR model"):
        app.compare("face", 5, 3, 2.0, "ddim", 1, "base")


def test_a_pair_model_is_compared_with_its_matched_partner(weights):
    import json

    for src, name in (("tiny", "pair-dimr-t-s0"), ("base", "pair-baseline-t-s0")):
        shutil.copytree(weights / src, weights / name, dirs_exist_ok=True)
        (weights / name / "run_info.json").write_text(json.dumps({"step": 100, "batch_size": 8}))
    assert app.baseline_for("pair-dimr-t-s0") == "pair-baseline-t-s0"
    assert app.baseline_for("pair-dimr-t-s1") == app.BASELINE  # no partner folder: the usual baseline
    assert app.baseline_for("tiny") == app.BASELINE
    _, status, _, _ = app.compare("face", 5, 2, 2.0, "ddim", 1, "pair-dimr-t-s0")
    matched, _, unmatched = status.rpartition("Matched in ")[2].partition(", not in ")
    assert "training" in matched and "parameters" in unmatched  # same steps and batch; the tiny pair differs in size
    for name in ("pair-dimr-u-s0", "pair-baseline-u-s0"):  # one network twice: matched in everything
        shutil.copytree(weights / "tiny", weights / name, dirs_exist_ok=True)
        (weights / name / "run_info.json").write_text(json.dumps({"step": 100, "batch_size": 8}))
    _, status, _, _ = app.compare("face", 5, 2, 2.0, "ddim", 1, "pair-dimr-u-s0")
    assert "Matched in parameters, compute per image and training" in status
    (weights / "pair-baseline-t-s0" / "run_info.json").write_text(json.dumps({"step": 99, "batch_size": 8}))
    _, status, _, _ = app.compare("face", 5, 2, 2.0, "ddim", 1, "pair-dimr-t-s0")
    assert re.search(r"(not|Not matched) in [^(]*training", status), status


def test_experiment_attention_and_tdln_through_gradio_client(weights):
    with live_client("tiny") as client:
        sheet, summary = client.predict(experiment="freeze-coarse", class_label="face", seed=2, steps=3, guidance=2.0,
                                        sampler="ddim", num_images=1, model="tiny", from_step=2, api_name="/experiment")
        assert "freeze-coarse" in summary
        for experiment, extra in (("swap-coarse", dict(other_seed=9, other_class="heart")),
                                  ("branch-guidance", dict(branch_weights="2, 1, 1"))):
            sheet, summary = client.predict(experiment=experiment, class_label="face", seed=2, steps=3, guidance=2.0,
                                            sampler="ddim", num_images=1, model="tiny", api_name="/experiment", **extra)
            assert experiment in summary and "layout" in summary
        with pytest.raises(Exception, match="3 numbers"):
            client.predict(experiment="branch-guidance", model="tiny", branch_weights="1", api_name="/experiment")
        out = client.predict(class_label="face", seed=3, steps=2, guidance=2.0, sampler="ddim", num_images=1,
                             model="tiny", api_name="/compare")
        assert "baseline" in out[1]
        with pytest.raises(Exception, match="experiment must be|not in the list of choices"):
            client.predict(experiment="nope", api_name="/experiment")
        client.predict(class_label="face", seed=1, steps=3, guidance=2.0, sampler="ddim", num_images=1, model="tiny",
                       api_name="/generate")
        sheet, caption = client.predict(step=2, layer=1, head="mean", api_name="/attention")
        assert "layer 1" in caption
        plot = client.predict(model="tiny", api_name="/tdln")
        assert plot is not None
        assert "done" in client.predict(class_label="heart", seed=1, steps=2, guidance=1.0, sampler="ddim",
                                        api_name="/generate")[2]  # still serving


def test_each_experiment_shows_its_question_and_only_its_controls():
    for name in app.EXPERIMENTS:
        question, hint, *controls = app.experiment_card(name)
        assert question == app.CARDS[name][0] and "Measured" in hint
        visible = [c["visible"] for c in controls]  # B seed, B class, from step, weights, zero
        assert visible == {
            "swap-coarse": [True, True, True, False, False],
            "freeze-coarse": [False, False, True, False, True],
            "branch-guidance": [False, False, False, True, False],
        }[name]
