"""What every benchmark prints and writes: the resolved configuration first, results as JSON."""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch


def print_config(config: argparse.Namespace | dict) -> None:
    """The resolved configuration as one JSON line, before anything runs."""
    values = vars(config) if isinstance(config, argparse.Namespace) else config
    print("config:", json.dumps(values, default=str), flush=True)


def write_json(out: Path | None, res: dict, quiet: bool = False) -> None:
    """Write `res` to `out` (nothing without a path); says so unless `quiet`."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2, default=str))
        if not quiet:
            print(f"wrote {out}")


def machine(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


@dataclass
class Results:
    """Results so far, written after every section, so a run cut short keeps what it measured."""

    out: Path | None
    values: dict = field(default_factory=dict)

    def __getitem__(self, key: str):
        return self.values[key]

    def __setitem__(self, key: str, value) -> None:
        self.values[key] = value

    def section(self, key: str) -> dict:
        """The dict for one section's results, created empty on first use."""
        return self.values.setdefault(key, {})

    def save(self) -> None:
        write_json(self.out, self.values, quiet=True)
