"""The multi-resolution DiMR network: a transformer branch on a coarse grid feeding ConvNeXt-like
branches on grids twice as fine, each with its own noise prediction.

The network knows nothing about diffusion beyond its time input: `forward(x, t, y)` takes DDPM steps
t in [0, num_steps] and returns one noise prediction per branch, coarse to fine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import BranchSpec, ModelConfig
from .layers import ConvHead, ConvNeXtBlock, SkipJoin, TransformerBlock, Upsampler


def step_to_tau(t: torch.Tensor, num_steps: int) -> torch.Tensor:
    """tau = 2 n / N - 1, in (-1, 1]: the release's log_snr = 8 n / N - 4 divided by 4.

    A remap of the DDPM step, not the schedule's log-SNR; it is what every TD parameter reads.
    """
    return 2.0 * t.float() / num_steps - 1.0


class Branch(nn.Module):
    """One resolution branch. Reads the full input through its own patchify convolution, adds the
    upsampled features of the coarser branch (if any), runs U-ViT-skipped blocks and a head."""

    def __init__(
        self, spec: BranchSpec, channels: int, num_classes: int, prev: BranchSpec | None, head: bool = True
    ) -> None:
        super().__init__()
        self.spec = spec
        D = spec.width
        self.patchify = nn.Conv2d(channels, D, spec.patch, stride=spec.patch)
        self.pos_embed = nn.Embedding(spec.grid * spec.grid, D)
        self.is_transformer = spec.kind == "transformer"
        if self.is_transformer:
            self.class_embed = nn.Embedding(num_classes, D)
            self.blocks = nn.ModuleList(TransformerBlock(D, spec.heads, spec.mlp_width) for _ in range(spec.blocks))
        else:
            self.blocks = nn.ModuleList(ConvNeXtBlock(D, spec.mlp_width, spec.kernel) for _ in range(spec.blocks))
        self.skips = nn.ModuleList(SkipJoin(2 * D, D) for _ in range(spec.blocks // 2))
        self.upsample = Upsampler((prev.blocks + 1) * prev.width, D) if prev is not None else None  # embedding + every block
        self.head = ConvHead(D, channels, spec.head_kernel) if head else None
        self.grad_checkpointing = False

    def _block(
        self, i: int, x: torch.Tensor, tau: torch.Tensor, probe: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        if probe is not None:
            return self.blocks[i](x, tau, probe)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.blocks[i], x, tau, use_reentrant=False)
        return self.blocks[i](x, tau)

    def run_blocks(
        self,
        x: torch.Tensor,
        tau: torch.Tensor,
        y: torch.Tensor,
        prev_feats: list[torch.Tensor] | None,
        keep_feats: bool,
        probe: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Embedding and blocks. Returns the last block's output on the grid and, if asked, the features
        for the next branch: the embedding and every block output, each (B, g, g, D).

        `probe` (transformer branches only), if a list, receives each block's class-token attention
        probabilities (B, h, 1 + g*g) in float32 (see `layers.Attention`)."""
        if probe is not None and not self.is_transformer:
            raise ValueError("probe: only a transformer branch has attention to record")
        g, D = self.spec.grid, self.spec.width
        B = x.shape[0]
        # Few input channels: float32 is nearly free. A channels-last input makes the patchify output
        # channels-last, so that its (B, g, g, D) view is contiguous and every block after it is too.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float().contiguous(memory_format=torch.channels_last)  # (B, C, S, S), channels-last strides
            h = self.patchify(x).permute(0, 2, 3, 1)  # (B, g, g, D), contiguous
        h = h + self.pos_embed.weight.view(g, g, D)  # (B, g, g, D), row index i*g + j
        if prev_feats is not None:
            h = h + self.upsample(prev_feats, tau)  # (B, g, g, D) from n+1 x (B, g/2, g/2, D_prev)
        feats = [h] if keep_feats else None

        if self.is_transformer:
            cls = self.class_embed(y)[:, None]  # (B, 1, D)
            z = torch.cat([cls, h.reshape(B, g * g, D)], dim=1)  # (B, 1 + g*g, D)
            to_grid = lambda z: z[:, 1:].reshape(B, g, g, D)  # noqa: E731 - drops the class token
        else:
            z = h  # (B, g, g, D)
            to_grid = lambda z: z  # noqa: E731

        n = self.spec.blocks
        stack: list[torch.Tensor] = []
        for i in range(n):
            if i > n // 2:
                z = self.skips[i - n // 2 - 1](z, stack.pop())  # [(B, ..., D), (B, ..., D)] -> (B, ..., D)
            z = self._block(i, z, tau, probe)  # (B, 1 + g*g, D) or (B, g, g, D)
            if i < n // 2:
                stack.append(z)
            if feats is not None:
                feats.append(to_grid(z))
        return to_grid(z), feats  # (B, g, g, D), n+1 x (B, g, g, D)


Handoff = Callable[[int, list[torch.Tensor]], list[torch.Tensor]]


class DiMR(nn.Module):
    """Multi-resolution diffusion network. forward(x, t, y) -> [eps_hat_0, ..., eps_hat_{K-1}],
    coarse to fine, eps_hat_k of shape (B, C, grid_k, grid_k).

    `handoff(k, feats)`, if given, sees the features branch k hands to branch k + 1 (the embedding and
    every block output, each (B, g_k, g_k, D_k)) and returns the features to use instead: the hook that
    `mrdit.interventions` builds its experiments on. The network itself keeps no state between calls.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.architecture != "dimr":
            raise ValueError(f"DiMR needs architecture 'dimr', got {config.architecture!r}")
        self.config = config
        specs = config.branches
        self.branches = nn.ModuleList(
            Branch(s, config.channels, config.num_classes, specs[k - 1] if k > 0 else None) for k, s in enumerate(specs)
        )

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for b in self.branches:
            b.grad_checkpointing = enabled

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, handoff: Handoff | None = None
    ) -> list[torch.Tensor]:
        check_inputs(self.config, x, t, y)
        tau = step_to_tau(t.reshape(-1), self.config.schedule.num_steps)  # (B,) or (1,) when shared
        outs: list[torch.Tensor] = []
        feats = None
        last = len(self.branches) - 1
        for k, branch in enumerate(self.branches):
            h, feats = branch.run_blocks(x, tau, y, feats, keep_feats=k < last)  # (B, g_k, g_k, D_k)
            outs.append(branch.head(h, tau))  # (B, C, g_k, g_k)
            if handoff is not None and k < last:
                feats = handoff(k, feats)  # n_k+1 x (B, g_k, g_k, D_k)
        return outs


def check_inputs(config: ModelConfig, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    """Shape checks with messages that say what was expected (cheap: no device synchronisation)."""
    C, S = config.channels, config.image_size
    if x.ndim != 4 or x.shape[1:] != (C, S, S):
        raise ValueError(f"x must have shape (B, {C}, {S}, {S}), got {tuple(x.shape)}")
    B = x.shape[0]
    if t.numel() not in (1, B):
        raise ValueError(f"t must hold one DDPM step per sample ({B}) or one shared step, got shape {tuple(t.shape)}")
    if y.shape != (B,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must be an integer tensor of shape ({B},), got {tuple(y.shape)} {y.dtype}")
