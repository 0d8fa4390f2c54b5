"""Classifier-free guidance as a closure around the model.

Convention: eps = eps_u + w (eps_c - eps_u). w = 1 is no guidance. The release's "scale 0.4"
(eps_c + 0.4 (eps_c - eps_u)) is w = 1.4 here. Conditional and unconditional passes are batched into
one forward; the null label comes from the model's config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]


def power_cosine_weight(n: float, num_steps: int, w_max: float, power: float) -> float:
    """The release's schedule: s = (1 - cos(pi (1 - n/N)^p)) / 2, w = 1 + (w_max - 1) s.

    w rises from 1 at the noisiest step (n = N) to w_max at the end (n = 0).
    """
    s = (1 - math.cos(math.pi * (1 - n / num_steps) ** power)) / 2
    return 1 + (w_max - 1) * s


WeightFn = Callable[[float], float]  # DDPM step n -> guidance weight w


def _constant(guidance: float, power: float, num_steps: int) -> WeightFn:
    return lambda n: guidance


def _power_cosine(guidance: float, power: float, num_steps: int) -> WeightFn:
    return lambda n: power_cosine_weight(n, num_steps, guidance, power)


# Guidance schedules by name: (w, power, N) -> the weight at each DDPM step n.
GUIDANCE_REGISTRY: dict[str, Callable[[float, float, int], WeightFn]] = {
    "constant": _constant,
    "power-cosine": _power_cosine,
}
GUIDANCE_SCHEDULES = tuple(GUIDANCE_REGISTRY)


def guidance_weight_fn(guidance: float, schedule: str, power: float, num_steps: int) -> WeightFn:
    """The weight w(n) of guidance schedule `schedule` with maximum `guidance`."""
    if schedule not in GUIDANCE_REGISTRY:
        raise ValueError(f"guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, got {schedule!r}")
    return GUIDANCE_REGISTRY[schedule](guidance, power, num_steps)


def with_null_labels(labels: torch.Tensor, null_label: int) -> torch.Tensor:
    """(2B,): the labels, then the null label once per image, for one batched guided forward."""
    null = torch.full_like(labels, null_label)
    return torch.cat([labels, null])


def guided_denoiser(model: torch.nn.Module, labels: torch.Tensor, weight: WeightFn, null_label: int) -> Denoiser:
    """A function (x, n) -> per-branch guided noise predictions, n a DDPM step shared by the batch."""
    both = with_null_labels(labels, null_label)  # (2B,)

    def denoise(x: torch.Tensor, n: torch.Tensor) -> list[torch.Tensor]:
        t = n.reshape(1).to(x.device, torch.float32)  # one shared step: TD parameters computed once
        w = weight(float(n))
        if w == 1.0:
            return model(x, t, labels)  # K x (B, C, g_k, g_k)
        outs = model(torch.cat([x, x]), t, both)  # K x (2B, C, g_k, g_k)
        guided = []
        for o in outs:
            cond, uncond = o.chunk(2)  # (B, C, g_k, g_k) each
            guided.append(uncond + w * (cond - uncond))
        return guided

    return denoise


def rowwise_guided_denoiser(
    model: torch.nn.Module, labels: torch.Tensor, weights: Sequence[WeightFn], null_label: int
) -> Denoiser:
    """`guided_denoiser` with one weight function per image, for requests batched together: each row
    gets exactly what it would get alone (a row at w = 1 takes the conditional prediction as such)."""
    if len(weights) != labels.shape[0]:
        raise ValueError(f"need one weight function per image: {len(weights)} for {labels.shape[0]} labels")
    both = with_null_labels(labels, null_label)  # (2B,)

    def denoise(x: torch.Tensor, n: torch.Tensor) -> list[torch.Tensor]:
        t = n.reshape(1).to(x.device, torch.float32)
        w = torch.tensor([f(float(n)) for f in weights], dtype=torch.float32, device=x.device)  # (B,)
        if bool((w == 1.0).all()):
            return model(x, t, labels)  # K x (B, C, g_k, g_k)
        outs = model(torch.cat([x, x]), t, both)  # K x (2B, C, g_k, g_k)
        plain = (w == 1.0).view(-1, 1, 1, 1)
        guided = []
        for o in outs:
            cond, uncond = o.chunk(2)  # (B, C, g_k, g_k) each
            guided.append(torch.where(plain, cond, uncond + w.view(-1, 1, 1, 1) * (cond - uncond)))
        return guided

    return denoise
