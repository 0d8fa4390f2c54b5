"""Experiments on the branches: interventions on what the transformer branch hands to the finer ones.

An intervention is a frozen description (`SwapCoarse`, `FreezeCoarse`, `BranchGuidance`) passed to
`mrdit.sampling.iterate(..., intervention=...)`. The sampler turns it into an `InterventionDenoiser`,
a per-run guidance closure that counts network evaluations and edits the features through the
network's `handoff` argument; the network itself stays stateless and diffusion-free.

"Step" means network evaluation, counted from 0: the solver step for every sampler but `dpm-fast`,
whose higher-order updates evaluate the network two or three times per step.

With classifier-free guidance the batch holds a conditional and an unconditional stream (rows
[cond..., uncond...]); `SwapCoarse` and `FreezeCoarse` act on each stream with its own counterpart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .network import DiMR


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_step(from_step: object) -> None:
    if not _is_int(from_step) or from_step < 0:
        raise ValueError(f"from_step must be an integer >= 0 (a network evaluation), got {from_step!r}")


@dataclass(frozen=True)
class SwapCoarse:
    """From evaluation `from_step` on, row i's finer branches receive the coarse (branch 0 -> 1)
    features computed for row `source[i]`; `source[i] == i` leaves row i alone."""

    source: tuple[int, ...]
    from_step: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.source, (str, bytes)) or not isinstance(self.source, Sequence) or not self.source:
            raise ValueError(f"source must be a non-empty sequence of row indices, got {self.source!r}")
        if not all(_is_int(i) and i >= 0 for i in self.source):
            raise ValueError(f"source must hold integer row indices >= 0, got {tuple(self.source)!r}")
        object.__setattr__(self, "source", tuple(int(i) for i in self.source))
        _check_step(self.from_step)

    @property
    def identity(self) -> bool:
        return all(i == j for j, i in enumerate(self.source))


@dataclass(frozen=True)
class FreezeCoarse:
    """From evaluation `from_step` on, the branch 0 -> 1 features are the ones computed at evaluation
    `from_step` (the finer branches still see the current x_t); with `zero`, they are zeros instead."""

    from_step: int
    zero: bool = False

    def __post_init__(self) -> None:
        _check_step(self.from_step)
        if not isinstance(self.zero, bool):
            raise ValueError(f"zero must be a bool, got {self.zero!r}")


@dataclass(frozen=True)
class BranchGuidance:
    """Classifier-free guidance with one weight per branch, coarse to fine (it replaces the sampler's
    `guidance`, which is then ignored).

    A conditional and an unconditional stream run through the network. At each hand-off k < K-1 the
    conditional stream's features become F_u + w_k (F_c - F_u); the finest branch's prediction, the one
    the sampler uses, is eps_u + w_{K-1} (eps_c - eps_u), and each coarser branch's displayed
    prediction is eps_u,k + w_k (eps_c,k - eps_u,k) on those streams.

    Ordinary guidance with weight w is (1, ..., 1, w); all ones is the plain conditional run. Equal
    weights (w, ..., w) are *not* ordinary guidance: the class enters only through branch 0's class
    token, so extrapolating the features and then the prediction again compounds the two.
    """

    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        ws = self.weights
        if isinstance(ws, (str, bytes)) or not isinstance(ws, Sequence) or not ws:
            raise ValueError(f"weights must be a non-empty sequence, one per branch, got {ws!r}")
        ok = all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in ws)
        if not ok:
            raise ValueError(f"weights must be finite numbers >= 0, got {tuple(ws)!r}")
        object.__setattr__(self, "weights", tuple(float(w) for w in ws))


Intervention = SwapCoarse | FreezeCoarse | BranchGuidance


def plan_swap(
    seeds_a: Sequence[int],
    labels_a: Sequence[int],
    seeds_b: Sequence[int],
    labels_b: Sequence[int],
    from_step: int = 0,
) -> tuple[tuple[int, ...], tuple[int, ...], SwapCoarse]:
    """Rows [A..., B..., hybrid...] for one sampler run: each hybrid row has B's seed and label and A's
    coarse features. With per-seed generators a hybrid's fresh noise equals its B's."""
    n = len(seeds_a)
    for name, v in (("labels_a", labels_a), ("seeds_b", seeds_b), ("labels_b", labels_b)):
        if len(v) != n:
            raise ValueError(f"{name} must have one entry per seed of A ({n}), got {len(v)}")
    if n == 0:
        raise ValueError("seeds_a must not be empty")
    source = (*range(n), *range(n, 2 * n), *range(n))
    seeds = tuple(int(s) for s in (*seeds_a, *seeds_b, *seeds_b))
    labels = tuple(int(y) for y in (*labels_a, *labels_b, *labels_b))
    return seeds, labels, SwapCoarse(source, from_step)


def check_intervention(intervention: Intervention, model: torch.nn.Module, batch: int, evaluations: int) -> None:
    """What can only be checked against the model, the batch and the run's number of network
    evaluations (`steps` for every sampler): a clear ValueError otherwise."""
    config: ModelConfig = model.config
    if not isinstance(intervention, (SwapCoarse, FreezeCoarse, BranchGuidance)):
        raise ValueError(f"intervention must be SwapCoarse, FreezeCoarse or BranchGuidance, got {intervention!r}")
    if config.architecture != "dimr":
        raise ValueError(
            f"interventions act on DiMR's branch hand-offs; this model's architecture is {config.architecture!r}"
        )
    if not isinstance(model, DiMR):
        raise ValueError(f"interventions need the plain DiMR network, not a {type(model).__name__} wrapper")
    from_step = getattr(intervention, "from_step", 0)
    if from_step >= evaluations:
        raise ValueError(f"from_step must be below the run's {evaluations} network evaluations, got {from_step}")
    if isinstance(intervention, SwapCoarse):
        if len(intervention.source) != batch or max(intervention.source) >= batch:
            raise ValueError(
                f"source must hold one row index in [0, {batch}) per image ({batch}), got {intervention.source}"
            )
    if isinstance(intervention, BranchGuidance) and len(intervention.weights) != len(config.branches):
        raise ValueError(
            f"weights must hold one weight per branch ({len(config.branches)}), got {len(intervention.weights)}"
        )


def guide_features(feats: list[torch.Tensor], w: float) -> list[torch.Tensor]:
    """Rows [cond..., uncond...] -> [F_u + w (F_c - F_u), F_u]: guidance applied to a hand-off."""
    out = []
    for f in feats:
        c, u = f.chunk(2)  # (B, g, g, D) each
        out.append(torch.cat([u + w * (c - u), u]))  # (2B, g, g, D)
    return out


class InterventionDenoiser:
    """The guidance closure (x, n) -> per-branch predictions with an intervention applied. Built by the
    sampler for one run; `evaluation` counts the network evaluations so far.

    `guided`: whether the run uses classifier-free guidance at all (both streams at every evaluation,
    so that stored features always match the batch; at an evaluation whose weight is 1 the conditional
    stream's predictions are returned)."""

    def __init__(
        self,
        model: torch.nn.Module,
        labels: torch.Tensor,
        weight: Callable[[float], float],
        null_label: int,
        intervention: Intervention,
        guided: bool,
    ) -> None:
        self.model = model
        self.labels = labels
        self.weight = weight
        self.intervention = intervention
        if isinstance(intervention, BranchGuidance):  # its weights replace the sampler's guidance
            self.two_streams = any(w != 1.0 for w in intervention.weights)
        else:
            self.two_streams = guided
        self.both = torch.cat([labels, torch.full_like(labels, null_label)])  # (2B,)
        self.evaluation = 0
        self._frozen: list[torch.Tensor] | None = None
        if isinstance(intervention, SwapCoarse):
            src = torch.tensor(intervention.source, device=labels.device)
            self._rows = torch.cat([src, src + len(src)]) if self.two_streams else src  # (2B,) or (B,)

    def _handoff(self, step: int, k: int, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        iv = self.intervention
        if isinstance(iv, BranchGuidance):
            return feats if iv.weights[k] == 1.0 else guide_features(feats, iv.weights[k])
        if k != 0 or step < iv.from_step:
            return feats
        if isinstance(iv, SwapCoarse):
            return feats if iv.identity else [f[self._rows] for f in feats]  # (B', g, g, D) rows re-ordered
        if iv.zero:
            return [torch.zeros_like(f) for f in feats]
        if step == iv.from_step:
            self._frozen = feats
        assert self._frozen is not None
        return self._frozen

    def __call__(self, x: torch.Tensor, n: torch.Tensor) -> list[torch.Tensor]:
        step = self.evaluation
        self.evaluation += 1
        t = n.reshape(1).to(x.device, torch.float32)  # one shared step, as in `guided_denoiser`
        handoff = lambda k, feats: self._handoff(step, k, feats)  # noqa: E731
        if not self.two_streams:
            return self.model(x, t, self.labels, handoff=handoff)  # K x (B, C, g_k, g_k)
        outs = self.model(torch.cat([x, x]), t, self.both, handoff=handoff)  # K x (2B, C, g_k, g_k)
        halves = [o.chunk(2) for o in outs]  # K x [(B, C, g_k, g_k) cond, uncond]
        if isinstance(self.intervention, BranchGuidance):
            return [u + w * (c - u) for (c, u), w in zip(halves, self.intervention.weights)]
        w = float(self.weight(float(n)))
        return [c if w == 1.0 else u + w * (c - u) for c, u in halves]
