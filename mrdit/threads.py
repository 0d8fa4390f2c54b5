"""OpenMP threads per Python thread: one thread runs the network on every core, the others on one.

PyTorch's CPU build runs its parallel loops through libgomp, which keeps one pool of OpenMP threads for
every thread that has run a parallel loop. Once a server's threads have made more pool threads than
there are cores, libgomp stops spinning between parallel regions, and every region waits for its threads
to wake: on two cores a forward at 8 rows then took 37 ms from a worker thread against 16-18 ms from a
process with one pool (bench/NOTES.md). So a server runs its forwards on one thread
(`mrdit.forwards.SharedForward`) and calls `one_omp_thread()` in every other thread that touches tensors.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any

import torch

_local = threading.local()
_gomp: ctypes.CDLL | None | bool = False  # False: not looked up yet; None: not found


def _libgomp() -> ctypes.CDLL | None:
    """The libgomp this process has loaded (PyTorch's own copy), or None (another OpenMP, or none)."""
    global _gomp
    if _gomp is False:
        _gomp = None
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
            for path in sorted(paths):
                _gomp = ctypes.CDLL(path)
                break
        except OSError:  # not Linux
            pass
    return _gomp  # type: ignore[return-value]


def omp_threads(n: int) -> bool:
    """Let the calling thread's parallel loops run on `n` OpenMP threads (1: on this thread alone, no
    pool of its own); other threads keep their setting. Returns whether it took effect (False where
    PyTorch does not use libgomp)."""
    gomp = _libgomp()
    if gomp is None:
        return False
    torch.get_num_threads()  # PyTorch sets a thread's OpenMP count on its first use: let it, then override
    gomp.omp_set_num_threads(int(n))
    return True


def one_omp_thread() -> bool:
    """`omp_threads(1)` for the calling thread, once: cheap after the first call in a thread."""
    if getattr(_local, "limited", None) is None:
        _local.limited = omp_threads(1)
    return _local.limited


def omp_limited(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with `one_omp_thread()` in force in whichever thread runs it; for a generator function,
    before every step (a server may resume a generator on a different thread each time)."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def steps(*args, **kwargs):
            it = fn(*args, **kwargs)
            try:
                while True:
                    one_omp_thread()
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                    yield item
            finally:
                it.close()

        return steps

    @functools.wraps(fn)
    def call(*args, **kwargs):
        one_omp_thread()
        return fn(*args, **kwargs)

    return call
