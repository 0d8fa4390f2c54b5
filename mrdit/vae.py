"""Autoencoder architectures with random weights, for timing and tests without the Hub (needs diffusers).

"sd" is the Stable Diffusion VAE's architecture (stabilityai/sd-vae-ft-ema: 8x downsampling, 4 latent
channels, 83.7M parameters), so its timings are the real VAE's; "tiny" downsamples 2x and is for tests.
"""

from __future__ import annotations

import torch

VAE_ARCHITECTURES: dict[str, dict] = {
    "sd": dict(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=256,
    ),
    "tiny": dict(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
    ),
}


def random_vae(name: str = "sd", seed: int | None = 0) -> torch.nn.Module:
    """A diffusers AutoencoderKL of a named architecture, randomly initialised (from `seed`, leaving the
    global generator as it was; None: from the global generator), in eval mode."""
    from diffusers import AutoencoderKL

    if name not in VAE_ARCHITECTURES:
        raise KeyError(f"unknown VAE architecture {name!r}; known: {', '.join(VAE_ARCHITECTURES)}")
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **VAE_ARCHITECTURES[name])
    return vae.eval()
