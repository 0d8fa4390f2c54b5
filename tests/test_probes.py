"""Probes: the class token's attention against a plain softmax(q k^T / sqrt(d)) reference, and the
time-dependent norm curves against the norm modules evaluated at those times."""

from __future__ import annotations

import pytest
import torch

from mrdit import build_model, get_preset
from mrdit.layers import TDLayerNorm, TDRMSNorm, TimeDependentParameter
from mrdit.network import step_to_tau
from mrdit.probes import class_token_attention, curves_by_branch, td_norm_curves, transformer_trunk


def _randomise_td(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w", ".b", ".p0", ".p1")):
                p.add_(0.5 * torch.randn_like(p))


@pytest.fixture(scope="module", params=["dimr", "baseline"])
def model(request):
    torch.manual_seed(0)
    tiny = get_preset("tiny")
    if request.param == "baseline":
        tiny = tiny.replace(architecture="unpatchify", branches=tiny.branches[:1], loss_weights=(1.0,))
    m = build_model(tiny).eval()
    _randomise_td(m)
    return m


def _gamma(p: TimeDependentParameter, tau: torch.Tensor) -> torch.Tensor:
    """value(tau) = s p0 + (1 - s) p1, s = sigmoid((1 + w) tau + b), written out from the weights."""
    s = torch.sigmoid((1 + p.w) * tau + p.b)
    return s * p.p0 + (1 - s) * p.p1


def test_class_token_attention_matches_a_softmax_reference(model):
    trunk = transformer_trunk(model)
    B, g, H = 2, trunk.spec.grid, trunk.spec.heads
    x, t, y = torch.randn(B, 3, 16, 16), torch.tensor([640.0]), torch.tensor([0, 3])
    inputs, outputs = {}, {}
    hooks = []
    for i, blk in enumerate(trunk.blocks):  # what each attention sees, and its output before the projection
        hooks.append(blk.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].clone())))
        hooks.append(blk.attn.proj.register_forward_pre_hook(lambda m, a, i=i: outputs.__setitem__(i, a[0].clone())))
    with torch.no_grad():
        model(x, t, y)
    for h in hooks:
        h.remove()

    maps = class_token_attention(model, x, t, y)
    assert maps.shape == (B, len(trunk.blocks), H, g, g) and maps.dtype == torch.float32
    tau = step_to_tau(t, model.config.schedule.num_steps)
    for i, blk in enumerate(trunk.blocks):
        z = inputs[i].double()  # (B, 1 + g*g, D)
        D = z.shape[-1]
        n = z / (z.pow(2).mean(-1, keepdim=True).sqrt() + 1e-8) * _gamma(blk.attn.norm.scale, tau).double()
        q, k, v = (n @ blk.attn.qkv.weight.double().T).view(B, -1, 3, H, D // H).unbind(2)  # 3 x (B, N, H, d)
        ref = torch.softmax(torch.einsum("bhd,bnhd->bhn", q[:, 0], k) / (D // H) ** 0.5, -1)  # (B, H, N)
        grid = maps[:, i].double().reshape(B, H, g * g)
        torch.testing.assert_close(grid, ref[..., 1:], rtol=0, atol=1e-5)
        # Not renormalised: the rest is the class token's attention to itself; with it, probs @ v is
        # the attention output of the normal forward.
        full = torch.cat([1 - grid.sum(-1, keepdim=True), grid], -1)  # (B, H, N)
        out = torch.einsum("bhn,bnhd->bhd", full, v.double()).reshape(B, D)
        torch.testing.assert_close(out, outputs[i][:, 0].double(), rtol=0, atol=1e-5)


def test_class_token_attention_checks_its_inputs(model):
    with pytest.raises(ValueError, match="x must have shape"):
        class_token_attention(model, torch.randn(1, 3, 8, 8), torch.tensor([1.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="model"):
        class_token_attention(torch.nn.Linear(2, 2), torch.randn(1, 3, 16, 16), torch.tensor([1.0]), torch.tensor([0]))


def test_td_curves_agree_with_the_modules_at_those_times(model):
    curves = td_norm_curves(model, num_points=7)
    T = 7
    assert curves.t.shape == (T,) and float(curves.t[0]) == 0.0 and float(curves.t[-1]) == 1.0
    n_params = sum(isinstance(m, TimeDependentParameter) for m in model.modules())
    assert curves.values.shape == curves.gates.shape == (n_params, T) == (len(curves.names), T)
    assert len(set(curves.names)) == n_params
    N = model.config.schedule.num_steps
    taus = [step_to_tau(ti.reshape(1) * N, N) for ti in curves.t]
    rms = lambda v: v.pow(2).mean().sqrt()  # noqa: E731
    rows = []
    for m in model.modules():  # the norms applied to inputs whose normalisation is known, in module order
        if isinstance(m, TDRMSNorm):
            ones = torch.ones(1, m.scale.p0.numel())  # rms 1: the output is gamma(tau) / (1 + eps)
            rows.append(torch.stack([rms(m(ones, tau) * (1 + m.eps)) for tau in taus]))
        elif isinstance(m, TDLayerNorm):
            alt = torch.ones(1, m.dim)
            alt[:, 1::2] = -1  # mean 0, variance 1: layer-normalises to itself / sqrt(1 + eps)
            betas = [m(torch.zeros(1, m.dim), tau) for tau in taus]
            gammas = [(m(alt, tau) - beta) * alt * (1 + m.eps) ** 0.5 for tau, beta in zip(taus, betas)]
            rows += [torch.stack([rms(v) for v in gammas]), torch.stack([rms(v) for v in betas])]
    torch.testing.assert_close(curves.values, torch.stack(rows), rtol=1e-4, atol=1e-5)
    assert ((curves.gates > 0) & (curves.gates < 1)).all()
    assert not torch.allclose(curves.values[:, 0], curves.values[:, -1])  # randomised: they do move with t


def test_td_curves_name_every_branch_and_reduce_per_branch_and_kind():
    torch.manual_seed(0)
    m = build_model(get_preset("tiny"))
    _randomise_td(m)
    curves = td_norm_curves(m, num_points=5)
    assert "branch 1 · block 0 · mlp norm scale" in curves.names
    assert "branch 2 · upsampler · input norm bias" in curves.names
    assert "branch 0 · head · norm weight" in curves.names
    assert sorted(set(curves.branch)) == [0, 1, 2]
    reduced = curves_by_branch(curves)
    assert "branch 0 · blocks · attention norm scale" in reduced.names
    assert len(reduced.names) == len(set(zip(curves.branch, curves.kind)))
    i = reduced.names.index("branch 0 · blocks · mlp norm scale")
    rows = [j for j, n in enumerate(curves.names) if n.startswith("branch 0 · block ") and "mlp" in n]
    assert len(rows) == 3
    torch.testing.assert_close(reduced.values[i], curves.values[rows].mean(0))
    with pytest.raises(ValueError, match="num_points"):
        td_norm_curves(m, num_points=1)
