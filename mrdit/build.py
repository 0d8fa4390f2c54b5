"""Build a network from a preset name or a config, with the release's initialisation."""

from __future__ import annotations

import torch
from torch import nn

from .baseline import UnpatchifyTransformer
from .config import ModelConfig
from .layers import TimeDependentParameter
from .network import DiMR
from .presets import get_preset

Model = DiMR | UnpatchifyTransformer


def init_weights(model: nn.Module) -> None:
    """The release's initialisation: Linear and Embedding weights truncated normal (std 0.02), Linear
    biases zero; convolutions keep PyTorch's default; TD parameters start as plain ones (set in their
    constructor: p0 = p1 = the usual init, w = b = 0). No zero-initialised output layers."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def build_model(preset_or_config: str | ModelConfig, device: str | torch.device | None = None) -> Model:
    """A freshly initialised model. `device="meta"` builds the structure without memory (full-size presets)."""
    config = get_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    with torch.device(device if device is not None else "cpu"):
        model = DiMR(config) if config.architecture == "dimr" else UnpatchifyTransformer(config)
    if str(device) != "meta":
        init_weights(model)
    return model


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Parameters exempt from weight decay: the gates (w, b) of every time-dependent parameter."""
    names = set()
    for mod_name, m in model.named_modules():
        if isinstance(m, TimeDependentParameter):
            names.update(f"{mod_name}.{p}" for p in ("w", "b"))
    return names
