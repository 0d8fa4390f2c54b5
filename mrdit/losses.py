"""The multi-scale training objective: every branch predicts the noise at its own resolution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .schedule import NoiseSchedule


def noised(x0: torch.Tensor, n: torch.Tensor, eps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps, a sample of q(x_n | x_0) (DDPM, Ho et al. 2020, eq. 4),
    for integer steps n (B,) in {1..N}; (B, C, S, S)."""
    B = x0.shape[0]
    a, s = schedule.discrete_coefficients(n)  # (B,), (B,) float32
    return a.view(B, 1, 1, 1).to(x0.dtype) * x0 + s.view(B, 1, 1, 1).to(x0.dtype) * eps


def multiscale_targets(eps: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Target of a branch f = S / size times coarser than the input: f * avg_pool(eps, f).

    The factor f keeps the pooled noise at unit variance (the mean of f^2 i.i.d. unit normals has
    variance 1 / f^2).
    """
    S = eps.shape[-1]
    targets = []
    for size in sizes:
        f = S // size
        targets.append(eps if f == 1 else f * F.avg_pool2d(eps, f))  # (B, C, size, size)
    return targets


def multiscale_loss(preds: Sequence[torch.Tensor], eps: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Per-sample loss sum_k c_k mean_{C,H,W} (eps_hat_k - target_k)^2, shape (B,)."""
    if len(preds) != len(weights):
        raise ValueError(f"got {len(preds)} predictions but {len(weights)} loss weights")
    targets = multiscale_targets(eps, [p.shape[-1] for p in preds])
    loss = eps.new_zeros(eps.shape[0], dtype=torch.float32)
    for pred, target, c in zip(preds, targets, weights, strict=True):
        loss = loss + c * (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return loss


def diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    *,
    n: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise x0 at DDPM steps n ~ U{1..N} and return the per-sample multi-scale loss, shape (B,)."""
    from .schedule import NoiseSchedule

    config = model.config
    schedule = NoiseSchedule(config.schedule)
    B = x0.shape[0]
    if n is None:
        n = torch.randint(1, schedule.N + 1, (B,), device=x0.device, generator=generator)
    if eps is None:
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    xn = noised(x0, n, eps, schedule)  # (B, C, S, S)
    preds = model(xn, n.float(), y)  # K x (B, C, g_k, g_k)
    return multiscale_loss(preds, eps, config.loss_weights)
