"""Named model configurations, in one registry that the command-line tools offer as choices."""

from __future__ import annotations

from collections.abc import Callable

from .config import AutoencoderConfig, BranchSpec, ModelConfig, ScheduleConfig


def _transformer(width: int, blocks: int, heads: int, grid: int, patch: int) -> BranchSpec:
    return BranchSpec("transformer", width, blocks, grid, patch, mlp_width=2 * width, heads=heads)


def _convnext(width: int, blocks: int, grid: int, patch: int) -> BranchSpec:
    return BranchSpec("convnext", width, blocks, grid, patch, mlp_width=2 * width, kernel=7)


def _imagenet_256(*branches: BranchSpec) -> ModelConfig:
    """The released 2R models' shared setting: ImageNet 256 on SD-VAE latents 4x32x32, 1000 classes + null."""
    return ModelConfig(
        branches=branches,
        channels=4,
        image_size=32,
        num_classes=1001,
        loss_weights=(0.25, 1.0),
        schedule=ScheduleConfig("scaled-linear"),
        autoencoder=AutoencoderConfig(),
    )


def dimr_xl_2r() -> ModelConfig:
    """Released DiMR-XL/2R, ImageNet 256 on SD-VAE latents 4x32x32 (505,046,408 parameters)."""
    return _imagenet_256(_transformer(960, 39, 16, 16, 2), _convnext(480, 21, 32, 1))


def dimr_g_2r() -> ModelConfig:
    """Released DiMR-G/2R, ImageNet 256 on SD-VAE latents 4x32x32 (1,056,352,904 parameters)."""
    return _imagenet_256(_transformer(1152, 57, 16, 16, 2), _convnext(576, 29, 32, 1))


def dimr_xl_3r() -> ModelConfig:
    """DiMR-XL/3R for ImageNet 512 (latents 4x64x64) as reconstructed from the paper's numbers."""
    return ModelConfig(
        branches=(_transformer(960, 39, 16, 16, 4), _convnext(480, 21, 32, 2), _convnext(240, 21, 64, 1)),
        channels=4,
        image_size=64,
        num_classes=1001,
        loss_weights=(0.25, 0.5, 1.0),
        schedule=ScheduleConfig("scaled-linear"),
        autoencoder=AutoencoderConfig(),
    )


def emoji_32(num_classes: int = 13) -> ModelConfig:
    """Demo: pixel space 3x32x32, 8x8 transformer -> 16x16 -> 32x32 ConvNeXt-like (~1.1M parameters,
    sized to train on two CPU cores and sample 4 images in a second or two)."""
    return ModelConfig(
        branches=(_transformer(128, 5, 4, 8, 4), _convnext(48, 3, 16, 2), _convnext(24, 3, 32, 1)),
        channels=3,
        image_size=32,
        num_classes=num_classes,
        loss_weights=(0.25, 0.5, 1.0),
        schedule=ScheduleConfig("cosine"),
    )


def emoji_64(num_classes: int = 13) -> ModelConfig:
    """Demo: pixel space 3x64x64 in four branches, 8x8 transformer -> 16x16 -> 32x32 -> 64x64 ConvNeXt-like.

    Branches 0-2 are emoji-32's with doubled patches, so `train/init_grown.py` can start it from emoji-32's
    weights; its schedule's signal-to-noise ratio is a quarter of emoji-32's, so that those branches,
    which see the image average-pooled by 2 and more, meet the noise levels they were trained on.
    """
    return ModelConfig(
        branches=(
            _transformer(128, 5, 4, 8, 8),
            _convnext(48, 3, 16, 4),
            _convnext(24, 3, 32, 2),
            _convnext(24, 1, 64, 1),
        ),
        channels=3,
        image_size=64,
        num_classes=num_classes,
        loss_weights=(0.25, 0.25, 0.5, 1.0),
        schedule=ScheduleConfig("cosine", snr_scale=0.25),
    )


def baseline_32(num_classes: int = 13) -> ModelConfig:
    """Single-resolution baseline: one transformer on a 16x16 grid of 2x2 patches, linear unpatchify.

    Compared with emoji-32 it has about half the parameters and 1.25x the compute (256 tokens are
    expensive); matching both at once is impossible with 2x2 patches, so compute is kept close."""
    return ModelConfig(
        branches=(_transformer(96, 5, 4, 16, 2),),
        channels=3,
        image_size=32,
        num_classes=num_classes,
        loss_weights=(1.0,),
        schedule=ScheduleConfig("cosine"),
        architecture="unpatchify",
    )


def pair_dimr_32(num_classes: int = 13) -> ModelConfig:
    """DiMR of the matched pair: emoji-32's 8x8 transformer with one-block ConvNeXt branches at 16x16
    (width 48) and 32x32 (width 16); within 5% of `pair-baseline-32` in parameters and compute per image."""
    return ModelConfig(
        branches=(_transformer(128, 5, 4, 8, 4), _convnext(48, 1, 16, 2), _convnext(16, 1, 32, 1)),
        channels=3,
        image_size=32,
        num_classes=num_classes,
        loss_weights=(0.25, 0.5, 1.0),
        schedule=ScheduleConfig("cosine"),
    )


def pair_baseline_32(num_classes: int = 13) -> ModelConfig:
    """Single-resolution baseline of the matched pair, as the paper's ablation starts (U-ViT-M/4): one
    transformer on the same 8x8 grid of 4x4 patches with a linear unpatchify head, widened (128 -> 144)
    to spend what `pair-dimr-32` spends on its finer branches."""
    return ModelConfig(
        branches=(_transformer(144, 5, 4, 8, 4),),
        channels=3,
        image_size=32,
        num_classes=num_classes,
        loss_weights=(1.0,),
        schedule=ScheduleConfig("cosine"),
        architecture="unpatchify",
    )


def tiny(channels: int = 3, image_size: int = 16, num_classes: int = 5) -> ModelConfig:
    """A very small 3-branch model for tests and smoke runs."""
    g = image_size // 4
    return ModelConfig(
        branches=(_transformer(32, 3, 2, g, 4), _convnext(16, 1, 2 * g, 2), _convnext(8, 1, 4 * g, 1)),
        channels=channels,
        image_size=image_size,
        num_classes=num_classes,
        schedule=ScheduleConfig("cosine"),
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "dimr-xl-2r": dimr_xl_2r,
    "dimr-g-2r": dimr_g_2r,
    "dimr-xl-3r": dimr_xl_3r,
    "emoji-32": emoji_32,
    "emoji-64": emoji_64,
    "baseline-32": baseline_32,
    "pair-dimr-32": pair_dimr_32,
    "pair-baseline-32": pair_baseline_32,
    "tiny": tiny,
}


def get_preset(name: str) -> ModelConfig:
    """The config of a named preset; the error lists the known names."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
