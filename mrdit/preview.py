"""Cheap per-step previews of latent models: a per-channel linear map from latents to RGB.

Decoding every branch through the SD VAE at every step costs several times the sampling itself.
The per-step panels only need to show layout and colour, so each latent pixel is mapped to one RGB
pixel by `rgb = W z + b`, with W (3, C) and b (3) fitted once by least squares to the VAE's own
decodes (average-pooled to the latent grid) of a few encoded images, and cached beside the model.
The final images are always decoded by the full VAE.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .checkpoint import CheckpointError, atomic_save_safetensors

PREVIEW_NAME = "preview.safetensors"
LINEAR_KIND = "linear approximation"
VAE_KIND = "VAE decode"


class LinearPreview:
    """latents (B, C, h, w) -> RGB (B, 3, h, w) in [-1, 1] by one matmul per pixel."""

    kind = LINEAR_KIND

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, fit_rmse: float = float("nan")) -> None:
        if weight.ndim != 2 or weight.shape[0] != 3 or bias.shape != (3,):
            raise ValueError(f"weight must be (3, C) and bias (3,), got {tuple(weight.shape)} and {tuple(bias.shape)}")
        self.weight = weight.float().cpu()
        self.bias = bias.float().cpu()
        self.fit_rmse = fit_rmse

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.to(z.device), self.bias.to(z.device)
        rgb = torch.einsum("oc,bchw->bohw", w, z.float()) + b.view(1, 3, 1, 1)  # (B, 3, h, w)
        return rgb.clamp(-1, 1)

    def save(self, path: Path) -> None:
        meta = {"kind": "linear", "fit_rmse": json.dumps(self.fit_rmse)}
        atomic_save_safetensors({"weight": self.weight, "bias": self.bias}, path, metadata=meta)

    @classmethod
    def load(cls, path: Path) -> LinearPreview:
        try:
            t = load_file(str(path))
            return cls(t["weight"], t["bias"])
        except (KeyError, ValueError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a usable linear preview ({type(e).__name__}: {e})") from None


def vae_downsample(vae: torch.nn.Module) -> int:
    """Pixels per latent pixel of a diffusers AutoencoderKL (8 for the SD VAE): one per down block but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def fit_size(vae: torch.nn.Module, latent_size: int) -> int:
    """Image size for the fit: at most 16x16 latents (1,024 per image for C + 1 unknowns per colour), so
    that the one-off fit costs four small VAE round trips, not four at the model's full resolution."""
    return min(latent_size, 16) * vae_downsample(vae)


def fit_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields with sharp-edged blobs, (n, 3, size, size) in [-1, 1]: stand-ins
    for photographs that span the VAE's colours at coarse and fine scales."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=(size, size), mode="bicubic")
    fine = F.interpolate(torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, size=(size, size), mode="nearest")
    mask = (F.interpolate(torch.rand(n, 1, 8, 8, generator=g), size=(size, size), mode="nearest") > 0.6).float()
    return (coarse * (1 - mask) + fine * mask).clamp(-1, 1)


@torch.no_grad()
def fit_linear_preview(vae: torch.nn.Module, scale_factor: float, n: int = 4, size: int = 256) -> LinearPreview:
    """Least-squares fit of rgb = W z + b to a diffusers AutoencoderKL's own decodes of `n` encoded images.

    z are model-space latents (scale_factor * the encoder's mean), as the sampler produces them; the
    target is the decode average-pooled to the latent grid."""
    p = next(vae.parameters())
    images = fit_images(n, size).to(p.device, p.dtype)
    z = vae.encode(images).latent_dist.mean * scale_factor  # (n, C, h, w)
    rgb = vae.decode(z / scale_factor).sample.float().clamp(-1, 1)  # (n, 3, size, size)
    target = F.adaptive_avg_pool2d(rgb, z.shape[-2:])  # (n, 3, h, w)
    feats = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (n h w, C)
    ones = torch.ones(feats.shape[0], 1, device=feats.device)
    a = torch.cat([feats, ones], dim=1).double().cpu()  # (n h w, C + 1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3).double().cpu()  # (n h w, 3)
    sol = torch.linalg.lstsq(a, y).solution  # (C + 1, 3)
    rmse = math.sqrt(float(((a @ sol - y) ** 2).mean()))
    return LinearPreview(sol[:-1].T.float(), sol[-1].float(), fit_rmse=rmse)


def cached_linear_preview(
    directory: Path, vae: torch.nn.Module, scale_factor: float, latent_size: int
) -> LinearPreview:
    """The linear preview saved beside a model, fitted (and saved, if the directory is writable) on first use."""
    path = Path(directory) / PREVIEW_NAME
    if path.is_file():
        return LinearPreview.load(path)
    preview = fit_linear_preview(vae, scale_factor, size=fit_size(vae, latent_size))
    try:
        preview.save(path)
    except OSError:  # a read-only model directory: fit again next time
        pass
    return preview
