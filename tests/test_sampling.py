"""Samplers on a case with a known answer, step states, seeds, guidance, the CLI, a latent model."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import tiny_vae
from torch import nn

from mrdit import build_model, get_preset, load_model
from mrdit.config import BranchSpec, ModelConfig, ScheduleConfig
from mrdit.guidance import power_cosine_weight
from mrdit.sampling import SAMPLERS, iterate, noise_for_seeds, sample
from mrdit.schedule import NoiseSchedule

MU, STD = 0.5, 0.4
STOCHASTIC = ("ddpm", "dpm++2m-sde")


class GaussianDenoiser(nn.Module):
    """The exact noise prediction for data x0 ~ N(MU, STD^2) per pixel, at the schedule's alpha, sigma."""

    def __init__(self, schedule_kind: str = "cosine") -> None:
        super().__init__()
        self.config = ModelConfig(
            branches=(BranchSpec("transformer", 8, 1, 4, 2, 16, heads=1),),
            channels=1,
            image_size=8,
            num_classes=2,
            architecture="unpatchify",
            schedule=ScheduleConfig(schedule_kind),
            clip_x0=False,
        )
        self.schedule = NoiseSchedule(self.config.schedule)
        self.calls = 0

    def forward(self, x, n, y):
        self.calls += 1
        t = (n.float() / self.schedule.N).reshape(-1)[:1]
        a, s = self.schedule.alpha(t).double(), self.schedule.sigma(t).double()
        xd = x.double()
        x0 = MU + a * STD**2 / (a**2 * STD**2 + s**2) * (xd - a * MU)
        return [((xd - a * x0) / s).float()]


def _moments(sampler, steps, n=4000):
    model = GaussianDenoiser()
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(i) for i in range(n)] if sampler in STOCHASTIC else None
    x = sample(model, noise, torch.zeros(n, dtype=torch.long), sampler=sampler, steps=steps, generators=gens)
    return float(x.mean()), float(x.std())


@pytest.mark.parametrize(
    "sampler,steps", [("dpm-fast", 60), ("dpm++2m", 60), ("dpm++2m-sde", 60), ("ddim", 60), ("ddpm", 250)]
)
def test_gaussian_data_moments(sampler, steps):
    """Every sampler reproduces the data mean and standard deviation within 0.02 (ancestral DDPM's
    error falls as 1/steps, so it gets 250 steps; the others 60)."""
    mean, std = _moments(sampler, steps, n=2000 if sampler in STOCHASTIC else 4000)
    assert abs(mean - MU) < 0.02
    assert abs(std - STD) < 0.02


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_error_shrinks_with_steps(sampler):
    errs = []
    for steps in (4, 12, 60):
        mean, std = _moments(sampler, steps, n=1000)
        errs.append(abs(std - STD) + abs(mean - MU))
    assert errs[2] < errs[0]
    assert errs[2] <= errs[1] + 1e-3


def test_stochastic_second_order_beats_ddpm_and_starts_as_ddpm():
    """dpm++2m-sde's first-order steps are DDPM's posterior steps (2 steps: identical results), and its
    second-order correction makes 12 steps far closer to the data's spread than DDPM's 12."""
    n = 2000
    model = GaussianDenoiser()
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(n, dtype=torch.long)

    def run(sampler, steps):
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        return sample(model, noise, labels, sampler=sampler, steps=steps, generators=gens)

    assert torch.allclose(run("dpm++2m-sde", 2), run("ddpm", 2), atol=1e-4)  # two float32 forms of one step
    sde, ddpm = run("dpm++2m-sde", 12), run("ddpm", 12)
    assert abs(float(sde.std()) - STD) < 0.04 < abs(float(ddpm.std()) - STD)  # measured: 0.02 vs 0.09
    assert abs(float(sde.mean()) - MU) < 0.01


@pytest.mark.parametrize("eta", [0.25, 0.5, 1.0])
def test_sde_eta_first_step_is_the_closed_form(eta):
    """dpm++2m-sde's first (first-order) step with `eta`, against the update written out here:
    x_t = (sigma_t / sigma_s) e^-(eta h) x_s + alpha_t (1 - e^-((1 + eta) h)) D + sigma_t sqrt(1 - e^-(2 eta h)) z."""
    n = 64
    model = GaussianDenoiser()
    ns = model.schedule
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    first = next(iter(iterate(model, noise, torch.zeros(n, dtype=torch.long), sampler="dpm++2m-sde", steps=4,
                              eta=eta, generators=gens)))
    s, t = torch.tensor(1.0), torch.tensor(first.t)
    a_s, s_s, a_t, s_t = (float(v) for v in (ns.alpha(s), ns.sigma(s), ns.alpha(t), ns.sigma(t)))
    h = math.log(a_t / s_t) - math.log(a_s / s_s)
    d = first.x0[0].double()  # the exact posterior mean at t = 1
    z = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(n)]).double()
    want = (s_t / s_s) * math.exp(-eta * h) * noise.double() + a_t * (1 - math.exp(-(1 + eta) * h)) * d
    want = want + s_t * math.sqrt(1 - math.exp(-2 * eta * h)) * z
    assert torch.allclose(first.x.double(), want, atol=1e-5)


def test_sde_eta_ends_equal_the_ode_and_keep_the_data_spread():
    """eta = 0 is dpm++2m exactly (and draws no noise); eta = 0.5 reaches the data's mean and spread."""
    n = 2000
    model = GaussianDenoiser()
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(n, dtype=torch.long)

    def run(eta, seed0=0):
        gens = [torch.Generator().manual_seed(seed0 + i) for i in range(n)]
        return sample(model, noise, labels, sampler="dpm++2m-sde", steps=12, eta=eta, generators=gens)

    ode = sample(model, noise, labels, sampler="dpm++2m", steps=12)
    assert torch.equal(run(0.0), ode) and torch.equal(run(0.0, seed0=500), ode)
    half = run(0.5)
    assert not torch.equal(half, run(0.5, seed0=500))
    assert abs(float(half.std()) - STD) < 0.04 and abs(float(half.mean()) - MU) < 0.01


def test_sde_variants_ode_tail_and_second_order_end(monkeypatch):
    """The SDE's tail variants: `ode_below` = 1 is dpm++2m exactly; `ode_below` = 0.2 leaves the steps
    that start above t = 0.2 as they were and changes the rest; `second_order_end` changes only the step
    to t = 1/N and the one after it, and widens the spread (extrapolating the injected noise, as the
    sampler's docstring says); both keep the data's mean; bad values are refused."""
    import dataclasses
    import functools

    from mrdit.sampling import SAMPLER_REGISTRY, sample_dpmpp_2m_sde

    n, steps = 2000, 12
    model = GaussianDenoiser()
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(n, dtype=torch.long)
    spec = SAMPLER_REGISTRY["dpm++2m-sde"]

    def states(**variant):
        monkeypatch.setitem(SAMPLER_REGISTRY, "dpm++2m-sde",
                            dataclasses.replace(spec, fn=functools.partial(sample_dpmpp_2m_sde, **variant)))
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        return list(iterate(model, noise, labels, sampler="dpm++2m-sde", steps=steps, generators=gens))

    default = states()
    ode = sample(model, noise, labels, sampler="dpm++2m", steps=steps)
    assert torch.equal(states(ode_below=1.0)[-1].x, ode)

    tail = states(ode_below=0.2)
    starts = [1.0] + [st.t for st in default[:-1]]  # each step's start time
    above = [i for i, s in enumerate(starts) if s > 0.2]
    assert 0 < len(above) < steps
    assert all(torch.equal(tail[i].x, default[i].x) for i in above)
    assert not torch.equal(tail[-1].x, default[-1].x)

    end = states(second_order_end=True)
    assert all(torch.equal(end[i].x, default[i].x) for i in range(steps - 2))
    assert not torch.equal(end[-1].x, default[-1].x)

    for x in (tail[-1].x, end[-1].x):
        assert abs(float(x.mean()) - MU) < 0.01
    assert float(end[-1].x.std()) > float(default[-1].x.std()) + 0.1
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ode_below"):
            states(ode_below=bad)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(get_preset("tiny").replace(num_classes=3, null_label=2)).eval()


@pytest.mark.parametrize(
    "sampler,steps,updates,nfe",
    [
        ("dpm-fast", 10, 4, 10),
        ("dpm++2m", 7, 7, 7),
        ("dpm++2m-sde", 6, 6, 6),
        ("ddim", 5, 5, 5),
        ("ddpm", 5, 5, 5),
    ],
)
def test_states_per_update(tiny, sampler, steps, updates, nfe):
    noise, gens = noise_for_seeds([0, 1], (3, 16, 16))
    states = list(iterate(tiny, noise, torch.tensor([0, 1]), sampler=sampler, steps=steps, generators=gens))
    assert len(states) == updates
    assert [s.index for s in states] == list(range(updates))
    assert states[-1].nfe == nfe and all(s.total == updates for s in states)
    for s in states:
        assert [e.shape[-1] for e in s.x0] == [4, 8, 16]  # each branch at its own resolution
        assert [e.shape[-1] for e in s.eps] == [4, 8, 16]
        assert s.x.shape == (2, 3, 16, 16)
    ts = [s.t for s in states]
    assert ts == sorted(ts, reverse=True)


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m-sde", "ddim", "ddpm"])
def test_last_finest_estimate_is_the_image(tiny, sampler):
    noise, gens = noise_for_seeds([3], (3, 16, 16))
    states = list(iterate(tiny, noise, torch.tensor([1]), sampler=sampler, steps=6, generators=gens))
    assert states[-1].t == 0.0
    assert torch.allclose(states[-1].x0[-1], states[-1].x)


def test_branch_estimate_formula(tiny):
    """x0_k = (avg_pool(x_t, f) - sigma eps_k / f) / alpha for the coarse branches."""
    noise, _ = noise_for_seeds([0], (3, 16, 16))
    st = next(iterate(tiny, noise, torch.tensor([0]), sampler="ddim", steps=3))
    ns = NoiseSchedule(tiny.config.schedule)
    t = torch.tensor(st.eval_t)
    a, s = float(ns.alpha(t)), float(ns.sigma(t))
    expect = (torch.nn.functional.avg_pool2d(noise, 4) - s * st.eps[0] / 4) / a
    assert tiny.config.clamps_estimates  # pixel space: estimates are clamped to the image range
    assert torch.allclose(st.x0[0], expect.clamp(-1, 1), atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_seed_gives_same_image_alone_or_in_batch(tiny, sampler):
    seeds = list(range(8))
    noise, gens = noise_for_seeds(seeds, (3, 16, 16))
    labels = torch.tensor([i % 2 for i in seeds])
    batch = sample(tiny, noise, labels, sampler=sampler, steps=5, guidance=2.0, generators=gens)
    n1, g1 = noise_for_seeds([5], (3, 16, 16))
    alone = sample(tiny, n1, labels[5:6], sampler=sampler, steps=5, guidance=2.0, generators=g1)
    assert float((batch[5] - alone[0]).norm() / alone[0].norm()) < 1e-4  # random weights: large values


def test_guidance_is_one_batched_forward_matching_two_passes(tiny):
    from mrdit.guidance import guided_denoiser

    calls = []
    orig = tiny.forward

    def spy(x, t, y):
        calls.append(x.shape[0])
        return orig(x, t, y)

    tiny.forward = spy
    try:
        x = torch.randn(2, 3, 16, 16)
        y = torch.tensor([0, 1])
        eps = guided_denoiser(tiny, y, lambda n: 3.0, 2)(x, torch.tensor(500.0))
    finally:
        del tiny.forward
    assert calls == [4]
    t = torch.tensor([500.0])
    c, u = tiny(x, t, y), tiny(x, t, torch.tensor([2, 2]))
    for k in range(3):
        assert torch.allclose(eps[k], u[k] + 3.0 * (c[k] - u[k]), atol=1e-5)


def test_power_cosine_rises_from_one_to_max():
    assert power_cosine_weight(1000, 1000, 4.0, 1.0) == pytest.approx(1.0)
    assert power_cosine_weight(0, 1000, 4.0, 1.0) == pytest.approx(4.0)
    assert power_cosine_weight(500, 1000, 4.0, 1.0) == pytest.approx(2.5)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(sampler="euler"), "sampler"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(guidance=float("nan")), "guidance"),
        (dict(guidance=-1.0), "guidance"),
        (dict(guidance_schedule="linear"), "guidance_schedule"),
        (dict(sampler="dpm++2m", eta=0.5), "eta applies to dpm++2m-sde, ddim and ddpm only"),
        (dict(sampler="ddim", eta=-1.0), "eta applies to dpm++2m-sde, ddim and ddpm only"),
    ],
)
def test_bad_arguments(tiny, kw, msg):
    args = dict(sampler="ddim", steps=3) | kw
    with pytest.raises(ValueError, match=re.escape(msg)):
        sample(tiny, torch.randn(1, 3, 16, 16), torch.tensor([0]), **args)


def test_schedule_inverse_and_ends():
    for kind in ("scaled-linear", "linear", "cosine"):
        ns = NoiseSchedule(ScheduleConfig(kind))
        t = torch.linspace(0.01, 1.0, 50)
        assert torch.allclose(ns.inverse_log_snr(ns.log_snr(t)), t, atol=1e-4)
        assert float(ns.sigma(torch.tensor(0.0))) == 0 and float(ns.alpha(torch.tensor(0.0))) == 1
        assert math.isinf(float(ns.log_snr(torch.tensor(0.0))))


def test_snr_scale_shifts_log_snr_and_keeps_old_configs():
    base = NoiseSchedule(ScheduleConfig("cosine"))
    shifted = NoiseSchedule(ScheduleConfig("cosine", snr_scale=0.25))
    snr = lambda abar: abar / (1 - abar)  # noqa: E731
    assert torch.allclose(snr(shifted.abar), 0.25 * snr(base.abar), rtol=1e-9)  # every training step
    t = torch.linspace(0.01, 1.0, 50)
    # sampling time: lambda = log(alpha / sigma) is half the log of the ratio
    assert torch.allclose(shifted.log_snr(t), base.log_snr(t) + 0.5 * math.log(0.25), atol=1e-3)
    assert torch.allclose(shifted.inverse_log_snr(shifted.log_snr(t)), t, atol=1e-4)
    # A config.json written before the field existed reads as snr_scale 1, the unshifted schedule.
    assert (
        ModelConfig.from_dict({**get_preset("tiny").to_dict(), "schedule": {"kind": "cosine"}}).schedule.snr_scale == 1
    )
    for bad in (0, -1.0, float("inf"), float("nan"), "0.25"):
        with pytest.raises(ValueError, match="snr_scale"):
            ScheduleConfig("cosine", snr_scale=bad)


def test_cli_writes_grid_and_gif(tiny_model_dir, tmp_path):
    from PIL import Image

    from mrdit.generate import main

    code = main(
        [
            "--model",
            str(tiny_model_dir),
            "--class",
            "heart",
            "--seed",
            "3",
            "--steps",
            "4",
            "--num-images",
            "2",
            "--sampler",
            "ddim",
            "--out",
            str(tmp_path / "g.png"),
            "--gif",
            str(tmp_path / "t.gif"),
        ]
    )
    assert code == 0
    assert Image.open(tmp_path / "g.png").size[0] > 96
    gif = Image.open(tmp_path / "t.gif")
    assert gif.n_frames >= 2  # identical consecutive frames may merge (random weights saturate)
    # x_t plus 3 branches side by side, two images stacked
    assert gif.size[0] > 4 * 96 and gif.size[1] > 2 * 96
    assert main(["--model", str(tiny_model_dir), "--class", "nope", "--out", str(tmp_path / "x.png")]) == 2


def test_latent_model_decodes_with_tiny_autoencoder(tmp_path):
    pytest.importorskip("diffusers")
    from mrdit import save_model
    from mrdit.config import AutoencoderConfig
    from mrdit.pipeline import LatentDecoder, Pipeline

    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    cfg = get_preset("tiny").replace(
        channels=4,
        num_classes=3,
        null_label=2,
        autoencoder=AutoencoderConfig(repo_id=str(tmp_path / "vae"), scale_factor=0.5, downsample=2),
    )
    save_model(build_model(cfg), tmp_path / "latent")
    pipe = Pipeline.from_pretrained(tmp_path / "latent")
    assert isinstance(pipe.decoder, LatentDecoder) and pipe.decoder.scale_factor == 0.5
    res = pipe.generate([0, 1], [0, 1], steps=3, guidance=1.5, keep_trajectory=True)
    assert res.images[0].size == (32, 32)  # 16x16 latents, 2x upsampling decoder
    # per-step previews: the linear latent-to-RGB map, at each branch's latent grid (4x4 for branch 0)
    assert len(res.trajectory) == 3 and res.trajectory[0].branches[0].shape[-1] == 4
    assert res.trajectory[0].kind == "linear approximation" and (tmp_path / "latent" / "preview.safetensors").is_file()
    full = Pipeline.from_pretrained(tmp_path / "latent", full_previews=True)
    pv = full.generate([0, 1], [0, 1], steps=1, keep_trajectory=True).trajectory[0]
    assert pv.kind == "VAE decode" and pv.branches[0].shape[-1] == 8  # decoded: 2x the latent grid
    assert load_model(tmp_path / "latent").config.autoencoder.scale_factor == 0.5


def test_gif_keeps_distinct_frames(tmp_path):
    import numpy as np
    from PIL import Image

    from mrdit.visual import save_gif

    frames = [np.full((8, 8, 3), 40 * i, dtype=np.uint8) for i in range(5)]
    gif = Image.open(save_gif(frames, tmp_path / "a.gif"))
    assert gif.n_frames == 5


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mrdit.sampling import MAX_STEPS  # noqa: E402

NAN, INF = float("nan"), float("inf")


class Spy(nn.Module):
    """The tiny model, recording the batch size of every forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config, self.batches = model, model.config, []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return self.model(x, t, y)


@st.composite
def sampler_arguments(draw):
    """Combinations with none, one or two fields out of range; few steps, to keep sampling cheap."""
    fields = {
        "sampler": (st.sampled_from(SAMPLERS), st.one_of(st.text(max_size=6), st.sampled_from(["DDIM", "euler"]))),
        "steps": (st.integers(1, 5), st.sampled_from([0, -3, MAX_STEPS + 1, 2.5, True, NAN, "3"])),
        "guidance": (st.one_of(st.floats(0, 6), st.integers(0, 6)), st.sampled_from([-0.5, NAN, INF, True, "2"])),
        "guidance_schedule": (st.sampled_from(["constant", "power-cosine"]), st.sampled_from(["cosine", ""])),
        "guidance_power": (st.floats(0, 4), st.sampled_from([-1.0, NAN, INF])),
        "eta": (st.one_of(st.none(), st.just(0.0), st.floats(0.01, 1)), st.sampled_from([-1.0, NAN, INF])),
    }
    broken = draw(st.sets(st.sampled_from(sorted(fields)), max_size=2)) if draw(st.booleans()) else set()
    return {k: draw(bad if k in broken else good) for k, (good, bad) in fields.items()}


def test_fuzz_sampler_arguments(tiny):
    """Every combination is refused with a ValueError before any network call, or sampled through to
    the end: `steps` evaluations, one batched forward each (doubled batch when guided), finite images,
    and fresh noise exactly where the sampler is stochastic."""
    outcomes = []

    @settings(max_examples=120, deadline=None, derandomize=True, database=None)
    @given(sampler_arguments())
    def run(kw):
        spy = Spy(tiny)
        noise, gens = noise_for_seeds([0, 1], (3, 16, 16))
        try:
            states = list(iterate(spy, noise, torch.tensor([0, 1]), generators=gens, **kw))
        except ValueError:
            assert spy.batches == [], kw  # refused before any network call
            outcomes.append(False)
            return
        sampler, steps, eta = kw["sampler"], kw["steps"], kw["eta"]
        # Accepted means in range (checked here, not by the validator) ...
        assert sampler in SAMPLERS and type(steps) is int and 1 <= steps <= MAX_STEPS, kw
        for v in (kw["guidance"], kw["guidance_power"]):
            assert type(v) in (int, float) and math.isfinite(v) and v >= 0, kw
        assert eta is None or (sampler in ("ddim", "ddpm", "dpm++2m-sde") and math.isfinite(eta) and eta >= 0), kw
        # ... and sampled through to the end.
        assert [s.index for s in states] == list(range(len(states))) and states[-1].total == len(states), kw
        assert states[-1].nfe == steps == len(spy.batches), kw
        if kw["guidance_schedule"] == "constant":
            assert set(spy.batches) == {2 if kw["guidance"] == 1 else 4}, kw
        ts = [s.t for s in states]
        assert all(a > b for a, b in zip(ts, ts[1:])), kw
        x = states[-1].x
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all(), kw
        # Other generators change the result exactly when the sampler injects fresh noise.
        other = [torch.Generator().manual_seed(100 + i) for i in range(2)]
        y = sample(tiny, noise, torch.tensor([0, 1]), generators=other, **kw)
        stochastic = sampler in STOCHASTIC if eta is None else eta > 0
        if steps == 1 and sampler != "dpm-fast":
            stochastic = False  # a single step lands on the clean end, with no noise to add
        assert torch.equal(x, y) != stochastic, kw
        outcomes.append(True)

    run()
    share = sum(outcomes) / len(outcomes)
    assert len(outcomes) >= 100 and 0.3 <= share <= 0.8, (len(outcomes), share)  # measured: 0.57 of 120
