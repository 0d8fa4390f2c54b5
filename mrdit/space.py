"""Hugging Face Spaces: where the app runs, and how long a ZeroGPU request may hold the GPU.

ZeroGPU lends a GPU to each call of a `spaces.GPU` function for at most its `duration` seconds;
a shorter duration queues sooner. It does not support `torch.compile`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# Budgets, not measurements: the measured cost is far below them (H100, CUDA graphs: 25 guided
# dpm++2m steps of DiMR-XL/2R take 0.30 s for one image, bench/NOTES.md; DiMR-G/2R has 2.1x the
# parameters), and a request must not be cut off when the GPU is shared or the model is moved to it.
BASE_SECONDS = 20.0  # moving the model to the GPU, the first graph capture, the VAE decode
SECONDS_PER_IMAGE_STEP = 0.05
MAX_SECONDS = 240


def on_space() -> bool:
    return "SPACE_ID" in os.environ


def on_zero_gpu() -> bool:
    """True on a ZeroGPU Space (the `spaces` runtime sets SPACES_ZERO_GPU there)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def gpu_seconds(steps: int | float | None = 1, images: int | float | None = 1) -> int:
    """The ZeroGPU `duration` for a request of `images` images and `steps` sampler steps."""
    try:
        n = max(int(steps or 1), 1) * max(int(images or 1), 1)
    except (TypeError, ValueError):  # invalid input fails fast inside the call; ask for the base time
        n = 1
    return int(min(BASE_SECONDS + SECONDS_PER_IMAGE_STEP * n, MAX_SECONDS))


M_ARENA_MAX = -8  # glibc's mallopt parameter


def cap_malloc_arenas(arenas: int) -> bool:
    """Let glibc's malloc use at most `arenas` heap arenas (0: leave its default) and return whether it
    was set. By default every thread that allocates may get its own arena, up to 8 per core, and each
    arena keeps memory it has freed: the app serves from dozens of worker threads, and under sixteen users
    its memory grew by 210-249 MB; capped at 2, by 161-182 MB (bench/NOTES.md). A no-op off glibc.
    Call it before the server starts its threads."""
    if arenas <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, int(arenas)))
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return False
