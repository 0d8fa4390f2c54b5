"""Memory the benchmarks report: a GPU's peak allocation, and this process's resident memory (Linux)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    """Start a new peak for `cuda_peak_gib` (nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last reset, in GiB; None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far: VmHWM of /proc/self/status. Not ru_maxrss where
    /proc has it, since a process started by a large parent inherits that across exec."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mib() -> float:
    """Resident memory now (Linux /proc/self/statm, in pages)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mib(device: torch.device) -> float:
    """The GPU's peak allocation on CUDA, else the process's peak resident memory, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()
