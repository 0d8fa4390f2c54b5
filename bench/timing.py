"""The one way the benchmarks time a call: warm-up, synchronise on CUDA, repeat, median and quartiles.

Scripts run as `python bench/x.py` import this as a sibling module (`from timing import measure`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds of the timed calls, and of the first warm-up call (which includes any compile or capture)."""

    times_s: tuple[float, ...]
    first_s: float | None = None

    @property
    def median_s(self) -> float:
        # The upper median of an even count, as the benchmarks have always reported.
        return sorted(self.times_s)[len(self.times_s) // 2]

    @property
    def quartiles_s(self) -> tuple[float, float]:
        if len(self.times_s) < 2:
            return self.times_s[0], self.times_s[0]
        q1, _, q3 = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q1, q3


def summarise(times: Sequence[float], first: float | None = None) -> Timing:
    """A `Timing` of seconds measured elsewhere (streamed requests, a loop with work between runs)."""
    if not times:
        raise ValueError("no times to summarise")
    return Timing(tuple(times), first)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `fn`, its device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeat: int = 5) -> Timing:
    """Call `fn` `warmup` times untimed (the first is timed apart as `first_s`), then `repeat` times timed."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    first = None
    for i in range(warmup):
        t = time_once(fn, device)
        first = t if i == 0 else first
    return Timing(tuple(time_once(fn, device) for _ in range(repeat)), first)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, warmup: int = 2, repeat: int = 5) -> float:
    """Achieved FLOP/s of a square matrix multiply of size n (the machine's practical peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / measure(lambda: a @ b, device, warmup=warmup, repeat=repeat).median_s
