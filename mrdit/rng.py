"""Per-example random streams for training.

Every random draw of a training example (its flip, its latent sample, its noise level, its noise, its
label dropout) comes from a generator seeded by (seed, step, position in the global batch). Which
process draws an example then does not matter: N processes at B / N examples each draw exactly what one
process at batch B draws, so data-parallel training computes the single-process model (to float
reduction order), and a resumed run draws what an uninterrupted one drew.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def example_seed(seed: int, step: int, position: int) -> int:
    """A 32-bit seed for one example. torch's CPU generator keeps only the low 32 bits of a seed, so the
    three numbers are hashed together rather than packed into one wide integer."""
    digest = hashlib.blake2b(f"{seed}:{step}:{position}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


ORDER_STRIDE = 1_000_003  # how far apart the order seeds of successive run seeds start
BALANCED_STREAM = 500_000_003  # apart from the epoch permutations' seeds


def order_seed(seed: int, index: int, stream: int = 0) -> int:
    """The seed of one draw of the data order: `index` is the epoch of a permutation (stream 0) or the
    step of a class-balanced draw (stream `BALANCED_STREAM`). A function of (seed, stream, index) alone,
    so the data position depends on the step only (exact resume, any world size)."""
    return seed * ORDER_STRIDE + stream + index


def example_generators(seed: int, step: int, positions: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per example at `positions` (indices into the global batch of `step`)."""
    return [torch.Generator().manual_seed(example_seed(seed, step, int(p))) for p in positions]


def randn_rows(shape: tuple[int, ...], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """(len(generators), *shape) standard normal noise, row i from generator i."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def rand_rows(generators: Sequence[torch.Generator]) -> torch.Tensor:
    """(len(generators),) uniform numbers in [0, 1), entry i from generator i."""
    return torch.cat([torch.rand(1, generator=g) for g in generators])


def randint_rows(low: int, high: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """(len(generators),) integers in [low, high), entry i from generator i."""
    return torch.cat([torch.randint(low, high, (1,), generator=g) for g in generators])
