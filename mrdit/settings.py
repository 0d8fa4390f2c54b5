"""A request's settings, checked in one place: the library (`Pipeline.validate`), the CLI
(`python -m mrdit.generate`), the app and the evaluator all build a `Settings`.

The sampler fields are `mrdit.sampling.SamplerSettings`, which `iterate` checks its arguments with;
`Settings` adds the images (class ids and seeds, one each per image) and the model's name. Class names
are resolved to ids by `Pipeline` (`mrdit.classes.ClassIndex`), which knows the model's classes.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import KW_ONLY, dataclass

from .sampling import SamplerSettings

MAX_SEED = 2**63 - 1


class InputError(ValueError):
    """A request setting is invalid; the message is meant for the user."""


def _integers(name: str, values: object, low: int, high: int | None, what: str) -> tuple[int, ...]:
    """`values` as a non-empty tuple of integers in [low, high], or an InputError naming the field."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InputError(f"{name} must be a sequence of {what}, got {values!r}")
    values = tuple(values)
    if not values:
        raise InputError(f"{name} must not be empty")
    for v in values:
        ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
        if not ok or v < low or (high is not None and v > high):
            raise InputError(f"{name} must be {what}, got {v!r}")
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class Settings(SamplerSettings):
    """A reproducible recipe: the same settings and model give the same images. Image i is class
    `labels[i]` (an id) from seed `seeds[i]`; every field is checked on construction, and a bad one is
    an InputError that names it."""

    _: KW_ONLY
    labels: tuple[int, ...]
    seeds: tuple[int, ...]
    model: str = ""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as e:
            raise InputError(str(e)) from None
        labels = _integers("labels", self.labels, 0, None, "class ids (integers >= 0)")
        seeds = _integers("seeds", self.seeds, 0, MAX_SEED, f"integers in [0, {MAX_SEED}]")
        if len(labels) != len(seeds):
            raise InputError(
                f"labels and seeds must pair up, one of each per image; got {len(labels)} and {len(seeds)}"
            )
        if not isinstance(self.model, str):
            raise InputError(f"model must be a string (the model's name), got {self.model!r}")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "seeds", seeds)
