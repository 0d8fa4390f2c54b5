"""One place for the sampling settings, one registry of samplers, a library without a request limit,
and the CLI's device check."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from mrdit import build_model, get_preset
from mrdit.pipeline import InputError, Pipeline
from mrdit.sampling import (
    SAMPLER_REGISTRY,
    SAMPLERS,
    BranchDenoiser,
    SamplerSpec,
    iterate,
    noise_for_seeds,
    planned_times,
    sample,
    sample_ddim,
)
from mrdit.schedule import NoiseSchedule, uniform_grid_to_clean
from mrdit.settings import MAX_SEED, Settings

GOOD = dict(labels=(0, 1), seeds=(5, 6), steps=3, guidance=2.0, sampler="ddim")


@pytest.mark.parametrize(
    "field,value",
    [
        ("seeds", ("abc", 1)),
        ("seeds", "abc"),
        ("seeds", (-1, 1)),
        ("seeds", (MAX_SEED + 1, 1)),
        ("seeds", (1.0, 2.0)),
        ("seeds", ()),
        ("labels", ("face", 1)),
        ("labels", (True, 1)),
        ("labels", 3),
        ("steps", "10; rm -rf /"),
        ("steps", "10"),
        ("steps", 0),
        ("steps", 2.5),
        ("steps", True),
        ("steps", float("nan")),
        ("guidance", "2"),
        ("guidance", -1.0),
        ("guidance", float("inf")),
        ("guidance_power", float("nan")),
        ("sampler", "euler"),
        ("sampler", ["ddim"]),
        ("guidance_schedule", "cosine"),
        ("model", 3),
    ],
)
def test_a_bad_field_is_an_input_error_that_names_it(field, value):
    """The message starts with the field's name and shows the value refused (strings from the API too)."""
    with pytest.raises(InputError) as e:
        Settings(**GOOD | {field: value})
    msg = str(e.value)
    assert msg.startswith(f"{field} must"), msg
    shown = value[0] if isinstance(value, tuple) and value else value
    assert value == () or f"got {shown!r}" in msg, msg


@pytest.mark.parametrize("eta", ["0.5", -1.0, float("nan")])
def test_eta_only_where_a_sampler_takes_it(eta):
    with pytest.raises(InputError, match="^eta applies to dpm\\+\\+2m-sde, ddim and ddpm only"):
        Settings(**GOOD | dict(sampler="dpm++2m", eta=0.5))
    with pytest.raises(InputError, match="^eta applies to dpm\\+\\+2m-sde, ddim and ddpm only" + f".*got eta={eta!r}"):
        Settings(**GOOD | dict(eta=eta))
    assert Settings(**GOOD | dict(sampler="ddpm", eta=0.5)).eta == 0.5


def test_labels_and_seeds_pair_up():
    with pytest.raises(InputError, match="^labels and seeds must pair up"):
        Settings(**GOOD | dict(seeds=(1, 2, 3)))


def test_settings_are_normalised_and_frozen():
    s = Settings(**GOOD | dict(steps=3.0, guidance=2, seeds=np.array([5, 6]), labels=[np.int64(0), 1]))
    assert s.steps == 3 and type(s.steps) is int and type(s.guidance) is float
    assert s.seeds == (5, 6) and s.labels == (0, 1) and all(type(v) is int for v in (*s.seeds, *s.labels))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 4
    assert dataclasses.replace(s, seeds=(7, 8)).seeds == (7, 8)


def test_iterate_checks_through_the_same_rules(tiny):
    noise = torch.randn(1, 3, 16, 16)
    for kw, field in ((dict(steps="10; rm -rf /"), "steps"), (dict(guidance="2"), "guidance"), (dict(eta="1"), "eta")):
        with pytest.raises(ValueError, match=f"^{field} "):
            next(iterate(tiny, noise, torch.tensor([0]), **dict(sampler="ddim", steps=2) | kw))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(get_preset("tiny").replace(num_classes=3, null_label=2)).eval()


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize(
    "kw,field",
    [(dict(seeds="abc"), "seeds"), (dict(seeds=["abc"]), "seeds"), (dict(steps="10; rm -rf /"), "steps")],
)
def test_pipeline_validate_names_the_field_of_strings(pipe, kw, field):
    args = dict(labels=["face", "heart"], seeds=[0], steps=3, guidance=2.0, sampler="ddim") | kw
    with pytest.raises(InputError, match=f"^{field} must"):
        pipe.validate(**args)


def test_pipeline_resolves_names_and_spreads_one_seed(pipe):
    s = pipe.validate(["face", "heart", "1"], 7, 3, 2.0, "ddim")
    assert s.labels == (0, 1, 1) and s.seeds == (7, 8, 9) and s.model == pipe.name
    assert pipe.validate("heart", [3, 4], 3.0, 2, "ddim").labels == (1, 1)
    with pytest.raises(InputError, match="unknown class|class"):
        pipe.validate(["dragon"], [0], 3, 2.0, "ddim")


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10])
def test_registry_drives_planned_times_and_iterate_alike(tiny, sampler, steps):
    """For every sampler, the updates `iterate` yields reach exactly the times `planned_times` plans,
    with `steps` network evaluations, and the registered function run on its registered grid is what
    `iterate` runs."""
    spec = SAMPLER_REGISTRY[sampler]
    schedule = NoiseSchedule(tiny.config.schedule)
    noise, gens = noise_for_seeds([0, 1], (3, 16, 16))
    labels = torch.tensor([0, 1])
    states = list(iterate(tiny, noise, labels, sampler=sampler, steps=steps, guidance=2.0, generators=gens))
    planned = planned_times(sampler, steps, schedule)
    assert [s.t for s in states] == planned
    assert [s.index for s in states] == list(range(len(planned))) and {s.total for s in states} == {len(planned)}
    assert states[-1].nfe == steps
    from mrdit.guidance import guided_denoiser

    denoise = BranchDenoiser(guided_denoiser(tiny, labels, lambda n: 2.0, 2), schedule, clip=tiny.config.clamps_estimates)
    _, gens = noise_for_seeds([0, 1], (3, 16, 16))
    extra = {} if spec.eta is None else {"eta": spec.eta}
    direct = list(spec.fn(denoise, noise.float(), spec.grid(schedule, steps), generators=gens, **extra))
    assert torch.equal(direct[-1].x, states[-1].x)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_stochastic_flag_says_which_samplers_draw_fresh_noise(tiny, sampler):
    noise, gens = noise_for_seeds([0, 1], (3, 16, 16))
    other = [torch.Generator().manual_seed(100 + i) for i in range(2)]
    kw = dict(sampler=sampler, steps=4, guidance=2.0)
    a = sample(tiny, noise, torch.tensor([0, 1]), generators=gens, **kw)
    b = sample(tiny, noise, torch.tensor([0, 1]), generators=other, **kw)
    assert torch.equal(a, b) != SAMPLER_REGISTRY[sampler].stochastic


def test_a_registered_sampler_is_offered_without_other_changes(tiny, monkeypatch):
    """No dispatch outside the registry: an entry added to it samples and plans at once."""
    spec = SamplerSpec(sample_ddim, uniform_grid_to_clean, stochastic=True, eta=0.5)
    monkeypatch.setitem(SAMPLER_REGISTRY, "ddim-half", spec)
    noise, gens = noise_for_seeds([0], (3, 16, 16))
    x = sample(tiny, noise, torch.tensor([0]), sampler="ddim-half", steps=3, generators=gens)
    noise, gens = noise_for_seeds([0], (3, 16, 16))
    y = sample(tiny, noise, torch.tensor([0]), sampler="ddim", eta=0.5, steps=3, generators=gens)
    assert torch.equal(x, y)
    schedule = NoiseSchedule(tiny.config.schedule)
    assert planned_times("ddim-half", 3, schedule) == planned_times("ddim", 3, schedule)


def test_library_generates_more_than_sixteen_images_in_batches(pipe):
    """No request limit in the library: 20 images, sampled 16 then 4 at a time, each as its seed gives
    it in any batch, with one trajectory for all of them."""
    labels, seeds = ["face", "heart"] * 10, list(range(20))
    res = pipe.generate(labels, seeds, steps=3, guidance=2.0, sampler="dpm++2m-sde", keep_trajectory=True)
    assert len(res.images) == 20 and len(res.settings.seeds) == 20
    assert len(res.trajectory) == 3 and res.trajectory[0].x_t.shape[0] == 20
    assert all(b.shape[0] == 20 for b in res.trajectory[-1].branches)
    small = pipe.generate(labels, seeds, steps=3, guidance=2.0, sampler="dpm++2m-sde", batch_size=7)
    alone = pipe.generate(labels[17], seeds[17], steps=3, guidance=2.0, sampler="dpm++2m-sde")
    for a, b in zip(res.arrays, small.arrays, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # uint8 images: at most rounding apart
    assert np.abs(res.arrays[17].astype(int) - alone.arrays[0].astype(int)).max() <= 1
    assert not np.array_equal(res.arrays[16], res.arrays[18])  # the chunks are not copies of each other
    with pytest.raises(InputError, match="batch_size"):
        pipe.generate(labels, seeds, steps=3, batch_size=0)


def _generate_main(tiny_model_dir, tmp_path, *extra):
    from mrdit.generate import main

    return main(["--model", str(tiny_model_dir), "--class", "face", "--out", str(tmp_path / "g.png"), *extra])


def test_cli_device_cuda_without_cuda_is_a_clean_error(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        _generate_main(tiny_model_dir, tmp_path, "--device", "cuda")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "CUDA is not available" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        _generate_main(tiny_model_dir, tmp_path, "--device", "nonsense")
    assert "not a device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _generate_main(tiny_model_dir, tmp_path, "--steps", "0")
    assert "steps must be an integer" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_python_m_mrdit_generate_device_cuda_exits_cleanly(tiny_model_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mrdit.generate", "--model", str(tiny_model_dir), "--class", "face"]
        + ["--device", "cuda", "--out", str(tmp_path / "g.png")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert out.returncode == 2 and "CUDA is not available" in out.stderr and "Traceback" not in out.stderr
