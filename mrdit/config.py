"""Frozen, typed configuration of a DiMR model: one spec per resolution branch.

The config is the only thing needed to rebuild a network; it is written as `config.json` beside the
weights. Validation happens in `__post_init__` and every error names the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

BranchKind = Literal["transformer", "convnext"]
ScheduleKind = Literal["scaled-linear", "linear", "cosine"]
Architecture = Literal["dimr", "unpatchify"]

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


@dataclass(frozen=True)
class BranchSpec:
    """One resolution branch.

    `grid` is the branch's square grid size; the branch reads the full-resolution input through a
    `patch` x `patch` patchify convolution, so `grid * patch == image_size`. `blocks` is the number of
    blocks actually built (odd: U-ViT skips pair the first and last halves around a middle block).
    """

    kind: BranchKind
    width: int
    blocks: int
    grid: int
    patch: int
    mlp_width: int
    heads: int = 0
    kernel: int = 7
    head_kernel: int = 3

    def __post_init__(self) -> None:
        _require(
            self.kind in ("transformer", "convnext"), "kind", f"must be 'transformer' or 'convnext', got {self.kind!r}"
        )
        for name in ("width", "blocks", "grid", "patch", "mlp_width", "head_kernel"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
        _require(
            self.blocks % 2 == 1, "blocks", f"must be odd (long skips pair around a middle block), got {self.blocks}"
        )
        _require(self.head_kernel % 2 == 1, "head_kernel", f"must be odd, got {self.head_kernel}")
        if self.kind == "transformer":
            _require(
                isinstance(self.heads, int) and self.heads > 0,
                "heads",
                f"a transformer branch needs heads > 0, got {self.heads!r}",
            )
            _require(
                self.width % self.heads == 0, "heads", f"width {self.width} is not divisible by heads {self.heads}"
            )
        else:
            _require(
                isinstance(self.kernel, int) and self.kernel > 0 and self.kernel % 2 == 1,
                "kernel",
                f"must be a positive odd integer, got {self.kernel!r}",
            )


@dataclass(frozen=True)
class ScheduleConfig:
    """A discrete DDPM noise schedule of `num_steps` steps, used in continuous time t = n / num_steps.

    `scaled-linear` is Stable Diffusion's (betas linear in sqrt), which the released models use;
    `linear` is DDPM's; `cosine` is Nichol & Dhariwal's alpha-bar, discretised to betas.
    `snr_scale` multiplies every step's signal-to-noise ratio abar / (1 - abar). A model of images
    f times larger in each direction takes 1 / f^2: its image, average-pooled by f, then has the
    original schedule's signal-to-noise ratio at every step (the "shifted" schedules of pixel-space
    diffusion at high resolution).
    """

    kind: ScheduleKind = "scaled-linear"
    num_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_scale: float = 1.0

    def __post_init__(self) -> None:
        _require(self.kind in ("scaled-linear", "linear", "cosine"), "schedule.kind", f"unknown schedule {self.kind!r}")
        _require(
            isinstance(self.num_steps, int) and self.num_steps >= 2,
            "schedule.num_steps",
            f"must be an integer >= 2, got {self.num_steps!r}",
        )
        if self.kind != "cosine":
            _require(
                0 < self.beta_start < self.beta_end < 1,
                "schedule.beta_start",
                f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}",
            )
        _require(
            isinstance(self.snr_scale, int | float) and 0 < self.snr_scale < math.inf,
            "schedule.snr_scale",
            f"must be a positive finite number, got {self.snr_scale!r}",
        )


@dataclass(frozen=True)
class AutoencoderConfig:
    """The latent autoencoder of a latent-space model (decode(z / scale_factor))."""

    repo_id: str = "stabilityai/sd-vae-ft-ema"
    scale_factor: float = 0.18215
    downsample: int = 8

    def __post_init__(self) -> None:
        _require(bool(self.repo_id), "autoencoder.repo_id", "must not be empty")
        _require(self.scale_factor > 0, "autoencoder.scale_factor", f"must be positive, got {self.scale_factor}")


@dataclass(frozen=True)
class ModelConfig:
    """A whole model: branches coarse to fine, data shape, classes, schedule.

    `num_classes` counts the null (unconditional) label; `null_label` is its id (the last by default).
    `architecture="unpatchify"` is the single-transformer baseline (one branch, linear unpatchify head).
    `clip_x0`: samplers clamp clean-image estimates to [-1, 1]; None means yes for pixel-space models
    (near t = 1, x0 = (x - sigma eps) / alpha divides by a tiny alpha) and no for latent ones.
    """

    branches: tuple[BranchSpec, ...]
    channels: int = 4
    image_size: int = 32
    num_classes: int = 1001
    null_label: int = -1
    norm: Literal["td-rmsnorm"] = "td-rmsnorm"
    loss_weights: tuple[float, ...] = ()
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    autoencoder: AutoencoderConfig | None = None
    architecture: Architecture = "dimr"
    class_names: tuple[str, ...] = ()
    clip_x0: bool | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self._check_fields()
        if not self.loss_weights:
            object.__setattr__(self, "loss_weights", default_loss_weights(len(self.branches)))
        self._check_lists()
        self._check_branches()

    def _normalise(self) -> None:
        """The JSON-friendly forms (lists, dicts) as tuples, so configs compare and hash reliably."""
        object.__setattr__(self, "branches", tuple(self.branches))
        object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.null_label == -1:
            object.__setattr__(self, "null_label", self.num_classes - 1)

    def _check_fields(self) -> None:
        """The branch list's element types and every scalar field."""
        _require(len(self.branches) >= 1, "branches", "need at least one branch")
        for i, b in enumerate(self.branches):
            _require(isinstance(b, BranchSpec), f"branches[{i}]", f"must be a BranchSpec, got {type(b).__name__}")
        _require(
            isinstance(self.channels, int) and self.channels > 0,
            "channels",
            f"must be a positive integer, got {self.channels!r}",
        )
        _require(
            isinstance(self.image_size, int) and self.image_size > 0,
            "image_size",
            f"must be a positive integer, got {self.image_size!r}",
        )
        _require(
            isinstance(self.num_classes, int) and self.num_classes >= 2,
            "num_classes",
            f"must count at least one class plus the null label, got {self.num_classes!r}",
        )
        _require(
            0 <= self.null_label < self.num_classes,
            "null_label",
            f"must be in [0, {self.num_classes}), got {self.null_label}",
        )
        _require(self.norm == "td-rmsnorm", "norm", f"only 'td-rmsnorm' is supported, got {self.norm!r}")
        _require(
            self.architecture in ("dimr", "unpatchify"),
            "architecture",
            f"must be 'dimr' or 'unpatchify', got {self.architecture!r}",
        )

    def _check_lists(self) -> None:
        """One loss weight per branch, one name per class."""
        _require(
            len(self.loss_weights) == len(self.branches),
            "loss_weights",
            f"need one weight per branch ({len(self.branches)}), got {len(self.loss_weights)}",
        )
        _require(
            all(w >= 0 and math.isfinite(w) for w in self.loss_weights),
            "loss_weights",
            "must be finite and non-negative",
        )
        if self.class_names:
            _require(
                len(self.class_names) == self.num_classes - 1,
                "class_names",
                f"need {self.num_classes - 1} names (one per class, null excluded), got {len(self.class_names)}",
            )

    def _check_branches(self) -> None:
        """Every branch covers the image; a DiMR's grids double from a transformer at the coarsest."""
        for i, b in enumerate(self.branches):
            _require(
                b.grid * b.patch == self.image_size,
                f"branches[{i}].grid",
                f"grid {b.grid} x patch {b.patch} must equal image_size {self.image_size}",
            )
        if self.architecture == "unpatchify":
            _require(
                len(self.branches) == 1 and self.branches[0].kind == "transformer",
                "branches",
                "the unpatchify baseline has exactly one transformer branch",
            )
            return
        _require(
            self.branches[0].kind == "transformer",
            "branches[0].kind",
            "the coarsest DiMR branch must be a transformer",
        )
        for i in range(1, len(self.branches)):
            _require(
                self.branches[i].grid == 2 * self.branches[i - 1].grid,
                f"branches[{i}].grid",
                f"must be twice the previous branch's grid ({2 * self.branches[i - 1].grid}), got {self.branches[i].grid}",
            )
        _require(
            self.branches[-1].grid * self.branches[-1].patch == self.image_size,
            "branches",
            "the finest branch must cover the image",
        )

    @property
    def latent(self) -> bool:
        return self.autoencoder is not None

    @property
    def clamps_estimates(self) -> bool:
        return (not self.latent) if self.clip_x0 is None else bool(self.clip_x0)

    @property
    def output_sizes(self) -> tuple[int, ...]:
        """Spatial size of each branch's output, coarse to fine."""
        if self.architecture == "unpatchify":
            return (self.image_size,)
        return tuple(b.grid for b in self.branches)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config_version"] = CONFIG_VERSION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d.pop("config_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config: unknown field(s) {unknown}")
        try:
            d["branches"] = tuple(BranchSpec(**b) for b in d["branches"])
            if "schedule" in d:
                d["schedule"] = ScheduleConfig(**d["schedule"])
            if d.get("autoencoder") is not None:
                d["autoencoder"] = AutoencoderConfig(**d["autoencoder"])
        except TypeError as e:
            raise ConfigError(f"config: {e}") from None
        except KeyError as e:
            raise ConfigError(f"config: missing field {e}") from None
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def changed_fields(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The sorted names of the fields whose values differ between two config dicts (absent counts as None)."""
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))


def default_loss_weights(n: int) -> tuple[float, ...]:
    """Coarse-to-fine loss weights: the release's [1/4, 1] for two branches, [1/4, 1/2, 1] for three."""
    if n == 1:
        return (1.0,)
    if n == 2:
        return (0.25, 1.0)
    return tuple(0.25 if k == 0 else 2.0 ** -(n - 1 - k) for k in range(n))
