"""The authors' own numbers: our converted network, loss and sampler must reproduce them."""

from __future__ import annotations

import ast
import json

import pytest
import torch
from conftest import PARITY, rel_err
from safetensors.torch import load_file

from mrdit import build_model, get_preset, load_model
from mrdit.convert import config_from_official, convert, map_key
from mrdit.losses import multiscale_loss, multiscale_targets
from mrdit.sampling import sample
from mrdit.schedule import NoiseSchedule

NAMES = ["tiny_2r", "tiny_3r"]


@pytest.fixture(scope="module", params=NAMES)
def parity(request, tmp_path_factory):
    name = request.param
    meta = json.loads((PARITY / f"{name}.json").read_text())
    cfg = config_from_official(meta)
    out = convert(PARITY / f"{name}.official.safetensors", tmp_path_factory.mktemp(name) / "model", cfg)
    return name, meta, load_model(out), load_file(str(PARITY / f"{name}.io.safetensors"))


@pytest.mark.parametrize("mode", ["per_sample", "shared"])
def test_forward_matches_reference(parity, mode):
    _, _, model, io = parity
    n = (io[f"forward.{mode}.log_snr"] + 4) * 1000 / 8  # the reference's time input is log_snr = 8 n / 1000 - 4
    with torch.no_grad():
        outs = model(io["forward.x"], n, io["forward.y"])
    ref = [io[k] for k in sorted(k for k in io if k.startswith(f"forward.{mode}.out"))]
    assert len(outs) == len(ref)
    for ours, theirs in zip(outs, ref, strict=True):
        assert ours.shape == theirs.shape
        assert rel_err(ours, theirs) < 1e-5


def test_shared_time_as_one_element(parity):
    """A [1]-shaped time (the sampler's fast path) gives the same as the time repeated per sample."""
    _, _, model, io = parity
    n = (io["forward.shared.log_snr"] + 4) * 1000 / 8
    with torch.no_grad():
        a = model(io["forward.x"], n, io["forward.y"])
        b = model(io["forward.x"], n[:1], io["forward.y"])
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, atol=1e-6)


def test_loss_matches_reference(parity):
    _, meta, model, io = parity
    schedule = NoiseSchedule(model.config.schedule)
    a, s = schedule.discrete_coefficients(io["loss.n"])
    xn = a.view(-1, 1, 1, 1) * io["loss.x0"] + s.view(-1, 1, 1, 1) * io["loss.eps"]
    assert rel_err(xn, io["loss.xn"]) < 1e-6
    targets = multiscale_targets(io["loss.eps"], model.config.output_sizes)
    for t in targets:
        assert rel_err(t, io[f"loss.target_{t.shape[-1]}"]) < 1e-6
    assert list(model.config.loss_weights) == meta["loss_coeffs"]
    with torch.no_grad():
        preds = model(io["loss.xn"], io["loss.n"].float(), io["loss.y"])
    loss = multiscale_loss(preds, io["loss.eps"], model.config.loss_weights)
    assert rel_err(loss, io["loss.per_sample"]) < 1e-5


@pytest.mark.parametrize(
    "key,steps,guidance,schedule",
    [
        ("none_s10", 10, 1.0, "constant"),
        ("const0.4_s12", 12, 1.4, "constant"),
        ("decay2.0p1.0_s12", 12, 2.0, "power-cosine"),
    ],
)
def test_dpm_fast_matches_reference(parity, key, steps, guidance, schedule):
    _, meta, model, io = parity
    run = meta["sampling_runs"][key]
    assert run["steps"] == steps
    x = sample(
        model,
        io["sample.z"],
        io["sample.y"],
        sampler="dpm-fast",
        steps=steps,
        guidance=guidance,
        guidance_schedule=schedule,
        guidance_power=1.0,
    )
    assert rel_err(x, io[f"sample.{key}"]) < 1e-4


def _keys(path):
    lines = path.read_text().strip().splitlines()[1:]
    return {k: ast.literal_eval(s) for k, s in (line.split("\t") for line in lines)}


@pytest.mark.parametrize(
    "preset,tsv,count",
    [
        ("dimr-xl-2r", "dimr_xl_2r_keys.tsv", 505_046_408),
        ("dimr-g-2r", "dimr_g_2r_keys.tsv", 1_056_352_904),
    ],
)
def test_released_checkpoint_keys_map_exactly(preset, tsv, count):
    model = build_model(preset, device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(v.numel() for v in model.parameters()) == count
    ref = _keys(PARITY / tsv)
    mapped = {}
    for k, shape in ref.items():
        target = map_key(k)
        assert target in ours, f"{k} -> {target} is not a parameter"
        assert ours[target] == tuple(shape), k
        mapped[target] = k
    assert len(mapped) == len(ref) == len(ours), "every released tensor maps to exactly one parameter and back"


def test_xl_3r_preset_matches_paper():
    model = build_model(get_preset("dimr-xl-3r"), device="meta")
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 525) < 1


def test_bf16_autocast_close_to_float32(parity):
    """The bf16 path (autocast) stays within 1e-2 relative error of float32 on the parity models."""
    _, _, model, io = parity
    n = (io["forward.per_sample.log_snr"] + 4) * 1000 / 8
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = model(io["forward.x"], n, io["forward.y"])
    ref = [io[k] for k in sorted(k for k in io if k.startswith("forward.per_sample.out"))]
    for ours, theirs in zip(outs, ref, strict=True):
        assert rel_err(ours.float(), theirs) < 1e-2
