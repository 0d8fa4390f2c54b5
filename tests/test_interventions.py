"""Interventions on the branch hand-offs: off is the plain sampler, each has its defining property."""

from __future__ import annotations

import math

import pytest
import torch

from mrdit import build_model, get_preset
from mrdit.compiled import FastForward
from mrdit.interventions import BranchGuidance, FreezeCoarse, InterventionDenoiser, SwapCoarse, plan_swap
from mrdit.network import step_to_tau
from mrdit.pipeline import DEFAULT_SAMPLER, InputError, Pipeline
from mrdit.sampling import SAMPLERS, iterate, noise_for_seeds, sample

STEPS = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(get_preset("tiny")).eval()  # 16 px, grids 4, 8, 16; classes 0..3 and null 4
    with torch.no_grad():  # time-dependent parameters away from their constant start
        for name, p in m.named_parameters():
            if name.endswith((".w", ".b", ".p1")):
                p.add_(0.5 * torch.randn_like(p))
    return m


def run(model, seeds, labels, sampler="dpm++2m-sde", guidance=3.0, intervention=None, steps=STEPS):
    c = model.config
    noise, gens = noise_for_seeds(seeds, (c.channels, c.image_size, c.image_size))
    kw = {} if intervention is None else {"intervention": intervention}
    return sample(
        model, noise, torch.tensor(labels), sampler=sampler, steps=steps, guidance=guidance, generators=gens, **kw
    )


class UpsampleInputs:
    """Records the features branch 1 receives (its upsampler's input), one list per network call."""

    def __init__(self, model) -> None:
        self.calls: list[list[torch.Tensor]] = []
        self.handle = model.branches[1].upsample.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls.append([f.clone() for f in args[0]])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_identity_handoff_is_bit_equal_and_sees_every_handoff(model):
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([500.0]), torch.tensor([0, 1, 2])
    seen = []

    def spy(k, feats):
        seen.append((k, [tuple(f.shape) for f in feats]))
        return feats

    plain = model(x, t, y)
    hooked = model(x, t, y, handoff=spy)
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))
    assert seen == [(0, [(3, 4, 4, 32)] * 4), (1, [(3, 8, 8, 16)] * 2)]  # embedding + every block, per branch


def test_handoff_replaces_the_features(model):
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([500.0]), torch.tensor([0, 1])
    plain = model(x, t, y)
    zeroed = model(x, t, y, handoff=lambda k, f: [torch.zeros_like(v) for v in f] if k == 0 else f)
    assert torch.equal(plain[0], zeroed[0])  # the coarse branch is upstream of its own hand-off
    assert not torch.allclose(plain[1], zeroed[1])
    assert not torch.allclose(plain[2], zeroed[2])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_identity_swap_and_late_freeze_are_the_plain_run(model, sampler):
    seeds, labels = [1, 2, 3], [0, 1, 3]
    plain = run(model, seeds, labels, sampler)
    assert torch.equal(run(model, seeds, labels, sampler, intervention=SwapCoarse((0, 1, 2))), plain)
    assert torch.equal(run(model, seeds, labels, sampler, intervention=FreezeCoarse(STEPS - 1)), plain)
    assert not torch.allclose(run(model, seeds, labels, sampler, intervention=FreezeCoarse(1)), plain)


def test_swap_at_step_zero_with_a_equal_b_is_the_plain_run(model):
    seeds, labels, swap = plan_swap([5, 6], [0, 2], [5, 6], [0, 2])
    x = run(model, list(seeds), list(labels), intervention=swap)
    plain = run(model, [5, 6], [0, 2])
    for block in x.split(2):
        torch.testing.assert_close(block, plain, rtol=0, atol=1e-5)


def test_swap_changes_the_hybrid_and_only_the_hybrid(model):
    seeds, labels, swap = plan_swap([5, 6], [0, 2], [7, 8], [1, 3])
    assert seeds == (5, 6, 7, 8, 7, 8) and labels == (0, 2, 1, 3, 1, 3)
    assert swap.source == (0, 1, 2, 3, 0, 1)
    x = run(model, list(seeds), list(labels), intervention=swap)
    a, b = run(model, [5, 6], [0, 2]), run(model, [7, 8], [1, 3])
    torch.testing.assert_close(x[:2], a, rtol=0, atol=1e-5)
    torch.testing.assert_close(x[2:4], b, rtol=0, atol=1e-5)
    assert (x[4:] - b).abs().amax() > 0.05


def test_swap_hands_each_stream_its_sources_features(model):
    seeds, labels, swap = plan_swap([5], [0], [7], [1], from_step=2)
    with UpsampleInputs(model) as rec:
        run(model, list(seeds), list(labels), intervention=swap)
    assert len(rec.calls) == STEPS
    for step, feats in enumerate(rec.calls):  # rows [A, B, H | A_u, B_u, H_u]
        for f in feats:
            assert f.shape[0] == 6
            if step >= 2:
                assert torch.equal(f[2], f[0]) and torch.equal(f[5], f[3])
            else:
                assert not torch.equal(f[2], f[0])


def test_class_swap_at_step_zero_at_one_seed_is_exactly_a(model):
    # The class enters only through the coarse branch: given A's coarse features B *is* A.
    seeds, labels, swap = plan_swap([4], [0], [4], [3])
    x = run(model, list(seeds), list(labels), intervention=swap)
    assert torch.equal(x[2], x[0]) and not torch.allclose(x[1], x[0])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_freeze_reuses_the_features_of_its_step(model, sampler):
    with UpsampleInputs(model) as rec:
        state = None
        c = model.config
        noise, gens = noise_for_seeds([1, 2], (c.channels, c.image_size, c.image_size))
        for state in iterate(  # noqa: B007
            model,
            noise,
            torch.tensor([0, 1]),
            sampler=sampler,
            steps=STEPS,
            guidance=2.0,
            generators=gens,
            intervention=FreezeCoarse(1),
        ):
            pass
    assert len(rec.calls) == state.nfe == STEPS  # "step" counts network evaluations
    for later in rec.calls[2:]:
        assert all(torch.equal(a, b) for a, b in zip(later, rec.calls[1]))
    assert not torch.equal(rec.calls[0][0], rec.calls[1][0])


def test_zeroed_coarse_branch_makes_the_image_blind_to_the_class(model):
    zero = FreezeCoarse(0, zero=True)
    a = run(model, [3, 4], [0, 0], intervention=zero)
    b = run(model, [3, 4], [1, 2], intervention=zero)
    assert torch.equal(a, b)
    assert not torch.allclose(run(model, [3, 4], [0, 0]), run(model, [3, 4], [1, 2]))
    assert not torch.allclose(a, run(model, [3, 4], [0, 0]))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_branch_guidance_reduces_to_ordinary_guidance(model, sampler):
    seeds, labels = [1, 2], [0, 3]
    assert torch.equal(
        run(model, seeds, labels, sampler, 1.0, BranchGuidance((1, 1, 1))), run(model, seeds, labels, sampler, 1.0)
    )
    guided = run(model, seeds, labels, sampler, 3.0)
    assert torch.equal(run(model, seeds, labels, sampler, 1.0, BranchGuidance((1, 1, 3))), guided)
    assert torch.equal(run(model, seeds, labels, sampler, 7.0, BranchGuidance((1, 1, 3))), guided)  # replaces guidance
    assert not torch.allclose(run(model, seeds, labels, sampler, 1.0, BranchGuidance((3, 1, 3))), guided)


def test_branch_guidance_matches_a_two_stream_reference(model):
    ws = (2.5, 0.5, 1.5)
    x, n, y = torch.randn(2, 3, 16, 16), torch.tensor(300.0), torch.tensor([0, 2])
    null = torch.full_like(y, model.config.null_label)
    den = InterventionDenoiser(model, y, lambda n: 1.0, model.config.null_label, BranchGuidance(ws), guided=False)
    got = den(x, n)
    # Reference: the two streams run branch by branch, the conditional features guided at each hand-off.
    tau = step_to_tau(n.reshape(1), model.config.schedule.num_steps)
    feats_c = feats_u = None
    want = []
    for k, br in enumerate(model.branches):
        hc, fc = br.run_blocks(x, tau, y, feats_c, keep_feats=True)
        hu, fu = br.run_blocks(x, tau, null, feats_u, keep_feats=True)
        ec, eu = br.head(hc, tau), br.head(hu, tau)
        want.append(eu + ws[k] * (ec - eu))
        feats_c = [u + ws[k] * (c - u) for c, u in zip(fc, fu)]
        feats_u = fu
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize(
    "intervention", [SwapCoarse((1, 0)), FreezeCoarse(1), FreezeCoarse(2, zero=True), BranchGuidance((2, 1, 3))]
)
def test_every_sampler_runs_every_intervention(model, sampler, intervention):
    c = model.config
    noise, gens = noise_for_seeds([1, 2], (c.channels, c.image_size, c.image_size))
    states = list(
        iterate(
            model,
            noise,
            torch.tensor([0, 1]),
            sampler=sampler,
            steps=3,
            guidance=2.0,
            generators=gens,
            intervention=intervention,
        )
    )
    assert states[-1].nfe == 3 and states[-1].x.shape == (2, 3, 16, 16)
    assert all(torch.isfinite(s.x).all() for s in states)
    assert [e.shape[-1] for e in states[-1].eps] == [4, 8, 16]


def test_guided_swap_with_power_cosine_schedule(model):
    c = model.config
    noise, gens = noise_for_seeds([1, 2], (c.channels, c.image_size, c.image_size))
    kw = dict(sampler="ddim", steps=3, guidance=3.0, guidance_schedule="power-cosine", generators=gens)
    x = sample(model, noise, torch.tensor([0, 1]), intervention=FreezeCoarse(0), **kw)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: SwapCoarse(()), "source"),
        (lambda: SwapCoarse((0, -1)), "source"),
        (lambda: SwapCoarse((0, 1.5)), "source"),
        (lambda: SwapCoarse("01"), "source"),
        (lambda: SwapCoarse((0,), from_step=-1), "from_step"),
        (lambda: SwapCoarse((0,), from_step=True), "from_step"),
        (lambda: FreezeCoarse(2.0), "from_step"),
        (lambda: FreezeCoarse(1, zero="yes"), "zero"),
        (lambda: BranchGuidance(()), "weights"),
        (lambda: BranchGuidance((1.0, math.nan)), "weights"),
        (lambda: BranchGuidance((1.0, -1.0)), "weights"),
        (lambda: plan_swap([1, 2], [0], [3, 4], [0, 1]), "labels_a"),
        (lambda: plan_swap([1], [0], [3, 4], [0, 1]), "seeds_b"),
    ],
)
def test_bad_values_are_refused_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_run_time_checks(model):
    with pytest.raises(ValueError, match="source"):
        run(model, [1, 2], [0, 1], intervention=SwapCoarse((0, 1, 2)))
    with pytest.raises(ValueError, match="source"):
        run(model, [1, 2], [0, 1], intervention=SwapCoarse((0, 2)))
    with pytest.raises(ValueError, match="weights"):
        run(model, [1, 2], [0, 1], intervention=BranchGuidance((1, 2)))
    with pytest.raises(ValueError, match="from_step must be below the run's 4 network evaluations"):
        run(model, [1, 2], [0, 1], intervention=FreezeCoarse(STEPS))
    c = model.config
    noise, _ = noise_for_seeds([1], (c.channels, c.image_size, c.image_size))
    with pytest.raises(ValueError, match="guidance_schedule"):
        sample(
            model,
            noise,
            torch.tensor([0]),
            sampler="ddim",
            steps=2,
            guidance=3.0,
            guidance_schedule="power-cosine",
            intervention=BranchGuidance((1, 1, 2)),
        )
    with pytest.raises(ValueError, match="plain DiMR"):
        sample(
            FastForward(model, None, cuda_graphs=False),
            noise,
            torch.tensor([0]),
            sampler="ddim",
            steps=2,
            intervention=FreezeCoarse(0),
        )
    with pytest.raises(ValueError, match="intervention"):
        sample(model, noise, torch.tensor([0]), sampler="ddim", steps=2, intervention="swap")


def test_the_baseline_refuses_interventions():
    torch.manual_seed(0)
    tiny = get_preset("tiny")
    base = build_model(tiny.replace(architecture="unpatchify", branches=tiny.branches[:1], loss_weights=(1.0,)))
    c = base.config
    noise, _ = noise_for_seeds([1], (c.channels, c.image_size, c.image_size))
    with pytest.raises(ValueError, match="architecture"):
        sample(base, noise, torch.tensor([0]), sampler="ddim", steps=2, intervention=FreezeCoarse(0))


def test_pipeline_stream_passes_the_intervention_to_the_plain_network(model):
    pipe = Pipeline(model, fast=True)  # a FastForward wrapper on the CPU, which cannot take a hand-off
    assert isinstance(pipe.net, FastForward)
    settings = pipe.validate([0, 1], [5, 6], steps=3, guidance=2.0, sampler="ddim")
    swapped = [s.x for s, _ in pipe.stream(settings, previews=False, intervention=SwapCoarse((1, 0)))][-1]
    ref = sample(
        model,
        *_noise_labels(model, [5, 6], [0, 1]),
        sampler="ddim",
        steps=3,
        guidance=2.0,
        intervention=SwapCoarse((1, 0)),
    )
    assert torch.equal(swapped, ref)
    states = list(pipe.stream(settings, previews=True))
    assert states[-1][1] is not None and states[-1][0].x.shape == (2, 3, 16, 16)
    with pytest.raises(InputError, match="source"):  # a message for the user, before any sampling
        next(pipe.stream(settings, intervention=SwapCoarse((0, 1, 2))))


def _noise_labels(model, seeds, labels):
    c = model.config
    noise, _ = noise_for_seeds(seeds, (c.channels, c.image_size, c.image_size))
    return noise, torch.tensor(labels)


def test_pipeline_generate_applies_a_row_wise_intervention_to_every_batch(model):
    pipe = Pipeline(model, fast=True)
    weights = BranchGuidance((3.0, 1.0, 1.0))
    one = pipe.generate([0, 1, 2], [5, 6, 7], steps=3, intervention=weights, batch_size=1)
    all3 = pipe.generate([0, 1, 2], [5, 6, 7], steps=3, intervention=weights, batch_size=3)
    assert (one.arrays == all3.arrays).all()  # each image has its own generator: batching changes nothing
    noise, gens = noise_for_seeds([5, 6, 7], (3, 16, 16))
    labels = torch.tensor([0, 1, 2])
    ref = sample(model, noise, labels, sampler=DEFAULT_SAMPLER, steps=3, generators=gens, intervention=weights)
    expected = ((ref.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)
    assert (torch.from_numpy(one.arrays).float() - expected).abs().max() <= 1  # uint8 rounding only
    plain = pipe.generate([0, 1, 2], [5, 6, 7], steps=3)
    assert not (plain.arrays == one.arrays).all()
    with pytest.raises(InputError, match="a swap names rows of one batch"):
        pipe.generate([0, 1], [5, 6], steps=3, intervention=SwapCoarse((1, 0)))
    with pytest.raises(InputError, match="one weight per branch"):
        pipe.generate([0], [5], steps=3, intervention=BranchGuidance((3.0, 1.0)))
