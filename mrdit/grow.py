"""Grow a trained DiMR into a larger-image DiMR (keep its branches, add finer ones), or widen its MLPs.

A DiMR branch reads the whole input through a patchify convolution with stride = patch. A model for
images f times larger whose first branches have the same grids and widths, but patches f times larger,
can reuse every weight of the smaller model: a patchify kernel widened by repeating each tap over an
f x f block, divided by f^2, reads an image exactly as the original kernel reads that image
average-pooled by f. The copied branches therefore start as the trained model (on pooled inputs), and
only the added finer branches start from scratch. Pair it with `ScheduleConfig(snr_scale=1 / f**2)`
so that the pooled noisy image has the signal-to-noise ratio the copied branches were trained on.

A copied branch may also have a wider MLP (`mlp_width`, the hidden width of every block's gated MLP):
the source's hidden units are copied and the new ones get fresh input weights and zero output weights,
so the model computes exactly what the source did and the added units start learning from there. With
the same image size (f = 1) this is how a trained model is given more capacity without starting over.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .config import ConfigError, ModelConfig


def growth_factor(source: ModelConfig, target: ModelConfig) -> int:
    """f = target.image_size / source.image_size, after checking that `target` extends `source`:
    same kind of model, channels, classes and schedule steps, and the source's branches first, each with
    the same grid and width and a patch f times larger. The error names the first mismatch."""

    def fail(message: str) -> None:
        raise ConfigError(f"cannot grow this model into the target: {message}")

    if source.architecture != "dimr" or target.architecture != "dimr":
        fail("both must be DiMR models (architecture 'dimr')")
    if target.image_size % source.image_size:
        fail(f"image size {target.image_size} is not a multiple of {source.image_size}")
    f = target.image_size // source.image_size
    for field in ("channels", "num_classes"):
        if getattr(source, field) != getattr(target, field):
            fail(f"{field} differ ({getattr(source, field)} vs {getattr(target, field)})")
    if (source.schedule.kind, source.schedule.num_steps) != (target.schedule.kind, target.schedule.num_steps):
        fail("the noise schedules differ in kind or number of steps (the time-dependent layers read the step)")
    if len(target.branches) < len(source.branches):
        fail(f"the target has {len(target.branches)} branches, fewer than the source's {len(source.branches)}")
    for k, (s, t) in enumerate(zip(source.branches, target.branches, strict=False)):
        same = dataclasses.replace(t, patch=s.patch, mlp_width=s.mlp_width) == s
        if t.patch != s.patch * f or t.mlp_width < s.mlp_width or not same:
            fail(
                f"branch {k} must equal the source's with patch {s.patch * f} and an MLP at least as wide "
                f"(source: {s}; target: {t})"
            )
    return f


def widen_patchify(weight: torch.Tensor, f: int) -> torch.Tensor:
    """(D, C, p, p) -> (D, C, f p, f p): each tap repeated over an f x f block, divided by f^2."""
    return weight.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3) / (f * f)


MLP_IN = (".mlp.w0.weight", ".mlp.w0.bias", ".mlp.w1.weight", ".mlp.w1.bias")  # (hidden, D) and (hidden,)
MLP_OUT = ".mlp.w2.weight"  # (D, hidden)


@torch.no_grad()
def grow(source: nn.Module, target: nn.Module) -> list[str]:
    """Copy `source`'s weights into `target` in place (see the module docstring); returns the names of
    the target's parameters left as they were (those of the added branches; a widened MLP's weights are
    partly copied and not listed)."""
    f = growth_factor(source.config, target.config)
    src = source.state_dict()
    state = target.state_dict()
    for name, value in src.items():
        if name not in state:  # cannot happen when growth_factor passed; guards against future layouts
            raise ConfigError(f"cannot grow: the target has no weight {name!r}")
        new = widen_patchify(value, f) if name.endswith(".patchify.weight") else value
        into = state[name]
        if name.endswith(MLP_IN) and new.shape[1:] == into.shape[1:] and new.shape[0] <= into.shape[0]:
            into = into[: new.shape[0]]  # a wider MLP: the source's hidden units first, the rest keep their init
        elif name.endswith(MLP_OUT) and new.shape[0] == into.shape[0] and new.shape[1] <= into.shape[1]:
            into[:, new.shape[1] :].zero_()  # the added hidden units start with no effect on the output
            into = into[:, : new.shape[1]]
        if new.shape != into.shape:
            raise ConfigError(
                f"cannot grow: {name} is {tuple(new.shape)}, the target expects {tuple(state[name].shape)}"
            )
        into.copy_(new)
    return [name for name in state if name not in src]
