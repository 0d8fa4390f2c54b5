"""Read-outs of a trained network: the class token's attention over the coarse grid, and the
time-dependent norms as functions of time.

Both read the modules the forward runs: the attention through the trunk's `probe` argument (the
same q and k the blocks attend with), the norms through their own `TimeDependentParameter`s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .layers import TDLayerNorm, TDRMSNorm, tdp_gate
from .network import Branch, check_inputs, step_to_tau


def transformer_trunk(model: nn.Module) -> Branch:
    """The transformer branch of a DiMR (branch 0) or of the single-resolution baseline."""
    branches = getattr(model, "branches", None)
    trunk = branches[0] if branches is not None else getattr(model, "trunk", None)
    if not isinstance(trunk, Branch) or not trunk.is_transformer:
        raise ValueError(f"model: expected a DiMR or the unpatchify baseline, got {type(model).__name__}")
    return trunk


@torch.no_grad()
def class_token_attention(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, L, H, g, g) float32: for every block l and head h of the transformer branch, the attention
    probability of the class token's query on each key of the g x g grid, at DDPM step `t` for input x.

    Not renormalised: over the grid they sum to 1 minus the class token's attention to itself. Inputs
    as for `model(x, t, y)`; from a sampler's state, x = state.x and t = N * state.t (what the next
    network evaluation reads)."""
    trunk = transformer_trunk(model)
    check_inputs(model.config, x, t, y)
    tau = step_to_tau(t.reshape(-1), model.config.schedule.num_steps)
    probe: list[torch.Tensor] = []
    trunk.run_blocks(x, tau, y, None, keep_feats=False, probe=probe)  # L x (B, H, 1 + g*g)
    g = trunk.spec.grid
    probs = torch.stack(probe, 1)  # (B, L, H, 1 + g*g); key 0 is the class token
    return probs[..., 1:].reshape(*probs.shape[:3], g, g)  # (B, L, H, g, g), keys in row-major grid order


@dataclass
class TDCurves:
    """Time-dependent parameters as functions of continuous time t in [0, 1] (t = 1 is pure noise).

    Row s of `values` is parameter s's RMS over its channels, sqrt(mean_c value_c(t)^2): the size of
    the scale (or shift) it applies; row s of `gates` is its mean mixing gate s(t) over channels, which
    moves from 1 (all p0) to 0 (all p1). `kind` names the parameter without its block index."""

    t: torch.Tensor  # (T,)
    names: list[str]
    branch: list[int]
    kind: list[str]
    values: torch.Tensor  # (S, T)
    gates: torch.Tensor  # (S, T)


def _readable(path: str) -> tuple[int, str, str]:
    """'branches.1.blocks.2.mlp.norm' -> (1, 'block 2 · mlp norm', 'blocks · mlp norm')."""
    m = re.match(r"(?:branches\.(\d+)\.|trunk\.)?(.*)", path)
    assert m is not None
    branch, rest = int(m.group(1) or 0), m.group(2)
    parts = {
        "attn.norm": "attention norm",
        "mlp.norm": "mlp norm",
        "upsample.norm_in": "upsampler · input norm",
        "upsample.norm_out": "upsampler · output norm",
        "head.norm": "head · norm",
        "norm": "output norm",
    }
    blk = re.match(r"blocks\.(\d+)\.(.*)", rest)
    if blk:
        what = parts.get(blk.group(2), blk.group(2))
        return branch, f"block {blk.group(1)} · {what}", f"blocks · {what}"
    what = parts.get(rest, rest)
    return branch, what, what


@torch.no_grad()
def td_norm_curves(model: nn.Module, num_points: int = 101) -> TDCurves:
    """Every time-dependent parameter of the model (TD-RMSNorm scales; TD-LayerNorm weights and biases
    in the upsamplers and heads) summarised over channels at `num_points` times from 0 to 1."""
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}")
    N = model.config.schedule.num_steps
    t = torch.linspace(0.0, 1.0, num_points)  # (T,)
    tau = step_to_tau(t * N, N)  # (T,) what the network reads at DDPM step N t
    names, branches, kinds, values, gates = [], [], [], [], []
    for path, module in model.named_modules():
        if isinstance(module, TDRMSNorm):
            params = [("scale", module.scale)]
        elif isinstance(module, TDLayerNorm):
            params = [("weight", module.weight), ("bias", module.bias)]
        else:
            continue
        branch, name, kind = _readable(path)
        for label, p in params:
            v = p(tau.to(p.p0.device)).float()  # (T, D)
            names.append(f"branch {branch} · {name} {label}")
            branches.append(branch)
            kinds.append(f"{kind} {label}")
            values.append(v.pow(2).mean(-1).sqrt().cpu())  # (T,)
            gates.append(tdp_gate(tau.to(p.w.device), p.w, p.b).float().mean(-1).cpu())  # (T,)
    return TDCurves(t, names, branches, kinds, torch.stack(values), torch.stack(gates))


def curves_by_branch(curves: TDCurves) -> TDCurves:
    """One curve per (branch, kind): the mean over blocks of the curves sharing both, for a readable
    plot (e.g. "branch 1 · blocks · mlp norm scale")."""
    groups: dict[tuple[int, str], list[int]] = {}
    for i, key in enumerate(zip(curves.branch, curves.kind)):
        groups.setdefault(key, []).append(i)
    keys = list(groups)
    return TDCurves(
        t=curves.t,
        names=[f"branch {b} · {k}" for b, k in keys],
        branch=[b for b, _ in keys],
        kind=[k for _, k in keys],
        values=torch.stack([curves.values[groups[key]].mean(0) for key in keys]),
        gates=torch.stack([curves.gates[groups[key]].mean(0) for key in keys]),
    )
