"""What a network costs: parameters and compute per image, and whether two networks are matched.

Compute is counted by `torch.utils.flop_counter` over one forward (matmuls, convolutions, attention;
elementwise work is not counted), at the schedule's middle step, as the sampler calls the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Cost:
    """A network's size and the compute of one network evaluation for one image."""

    params: int
    flops_per_image: float

    @property
    def mflops(self) -> float:
        return self.flops_per_image / 1e6


def forward_flops(model: torch.nn.Module, batch: int = 1, device: torch.device | str | None = None) -> float:
    """FLOPs of one forward of `batch` images (one time per image) by `torch.utils.flop_counter`."""
    c = model.config
    device = device if device is not None else next(model.parameters()).device
    x = torch.randn(batch, c.channels, c.image_size, c.image_size, device=device)
    t = torch.full((batch,), c.schedule.num_steps / 2, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    return float(counter.get_total_flops())


def model_cost(model: torch.nn.Module) -> Cost:
    """Parameters and compute per image of `model`."""
    return Cost(sum(p.numel() for p in model.parameters()), forward_flops(model))


def ratios(a: Cost, b: Cost) -> tuple[float, float]:
    """(parameters, compute) of `a` over those of `b`."""
    return a.params / b.params, a.flops_per_image / b.flops_per_image


def matched(a: Cost, b: Cost, tolerance: float = 0.1) -> bool:
    """Whether `a` and `b` are within `tolerance` of each other in both parameters and compute."""
    return all(abs(r - 1) <= tolerance for r in ratios(a, b))
