"""mrdit: DiMR, the multi-resolution diffusion model (Liu et al., NeurIPS 2024), in PyTorch."""

from .build import build_model
from .checkpoint import CheckpointError, load_model, save_model
from .config import AutoencoderConfig, BranchSpec, ConfigError, ModelConfig, ScheduleConfig
from .presets import PRESETS, get_preset

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AutoencoderConfig",
    "BranchSpec",
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "ScheduleConfig",
    "build_model",
    "get_preset",
    "load_model",
    "save_model",
]
