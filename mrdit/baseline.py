"""The single-resolution baseline DiMR argues against: one transformer on a patch grid whose last
layer "unpatchifies" each token linearly into a patch of pixels (the U-ViT / DiT design).

It shares the transformer branch's trunk with DiMR but has its own head, so the DiMR path stays
untouched. Its output is a one-element list, so losses and samplers treat it like a 1-branch model.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import TDLayerNorm
from .network import Branch, check_inputs, step_to_tau


def unpatchify(x: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(B, g, g, p*p*C) -> (B, C, g*p, g*p), each token's vector laid out as (p, p, C)."""
    B, g, _, _ = x.shape
    x = x.view(B, g, g, patch, patch, channels)  # (B, g, g, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, g * patch, g * patch)  # (B, C, S, S)


class UnpatchifyTransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.architecture != "unpatchify":
            raise ValueError(f"UnpatchifyTransformer needs architecture 'unpatchify', got {config.architecture!r}")
        self.config = config
        spec = config.branches[0]
        self.trunk = Branch(spec, config.channels, config.num_classes, prev=None, head=False)
        self.norm = TDLayerNorm(spec.width)
        self.unpatch = nn.Linear(spec.width, spec.patch * spec.patch * config.channels)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.trunk.grad_checkpointing = enabled

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        check_inputs(self.config, x, t, y)
        tau = step_to_tau(t.reshape(-1), self.config.schedule.num_steps)
        h, _ = self.trunk.run_blocks(x, tau, y, None, keep_feats=False)  # (B, g, g, D)
        patches = self.unpatch(self.norm(h, tau))  # (B, g, g, p*p*C)
        return [unpatchify(patches, self.config.branches[0].patch, self.config.channels)]  # [(B, C, S, S)]
