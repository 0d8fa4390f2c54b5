"""Sharded latent datasets: fixed-size safetensors shards plus an index, read a few rows at a time.

A dataset folder holds `shard-000000.safetensors`, `shard-000001.safetensors`, ... (each the
posteriors of `shard_size` consecutive images, the last one fewer: `mean` and `logvar` (n, 2, C, h, w)
for the image and its flip, `labels` (n,)) and `index.json`, written last, once every shard is there.
Each shard is written atomically, so after a kill the shards present are complete and an encoder that
starts again skips them.

Training reads only the rows a batch asks for, with positioned reads (`os.pread`) at offsets taken
from each shard's safetensors header: a rank holds its batch and the labels (8 bytes per image), not the
dataset, so its memory stays flat as the dataset grows (bench/shards_memory.py).
"""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_save_safetensors, atomic_write
from .data import PosteriorDataset

INDEX_NAME = "index.json"
FORMAT = "mrdit-latent-shards"
_NUMPY = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
MAX_OPEN = 64  # shard files kept open per process


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


def write_shard(folder: Path, k: int, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Shard `k`, written atomically (a killed writer leaves no partial shard under the final name)."""
    path = folder / shard_name(k)
    atomic_save_safetensors(tensors, path)
    return path


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and the offset its data starts at."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def shard_rows(path: Path) -> int | None:
    """The number of examples in a finished shard, or None if the file is missing or unreadable."""
    try:
        header, start = read_header(path)
        size = path.stat().st_size
        ends = [start + t["data_offsets"][1] for t in header.values()]
        if not {"mean", "logvar", "labels"} <= set(header) or max(ends) != size:
            return None
        return int(header["labels"]["shape"][0])
    except (OSError, ValueError, KeyError):
        return None


def write_index(folder: Path, meta: Mapping[str, Any], counts: Sequence[int]) -> dict[str, Any]:
    """`index.json`: the dataset's settings, its classes and every shard with its count (atomic)."""
    index = dict(meta) | {
        "format": FORMAT,
        "count": int(sum(counts)),
        "shards": [{"file": shard_name(k), "count": int(c)} for k, c in enumerate(counts)],
    }
    atomic_write(folder / INDEX_NAME, lambda f: f.write(json.dumps(index, indent=2).encode()))
    return index


def read_index(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise ValueError(
            f"data_path: {folder} has no {INDEX_NAME}; the encoder writes it when every shard is done "
            "(run train/encode_latents.py again to finish)"
        )
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"data_path: {path} is not a {FORMAT} index")
    return index


class _Shard:
    """One shard file: where each tensor's rows are, read with positioned reads (no memory map)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        header, self.start = read_header(path)
        self.tensors = {
            name: (_NUMPY[t["dtype"]], tuple(t["shape"]), t["data_offsets"][0]) for name, t in header.items()
        }

    def read(self, fd: int, name: str, first: int, count: int = 1) -> np.ndarray:
        """Items [first, first + count) of tensor `name` flattened to its first dimension, or, for
        `mean`/`logvar`, of its (n * 2) rows of (C, h, w) (one row per image and flip)."""
        dtype, shape, begin = self.tensors[name]
        inner = shape[2:] if name in ("mean", "logvar") else shape[1:]
        item = int(np.prod(inner, dtype=np.int64)) * np.dtype(dtype).itemsize
        raw = os.pread(fd, item * count, self.start + begin + first * item)
        return np.frombuffer(raw, dtype=dtype).reshape(count, *inner)


class ShardedLatentDataset(PosteriorDataset):
    """Latent posteriors in shards (see the module docstring), read a batch at a time."""

    def __init__(self, folder: str | Path, scale_factor: float) -> None:
        self.folder = Path(folder)
        index = read_index(self.folder)
        self.shards = [_Shard(self.folder / s["file"]) for s in index["shards"]]
        counts = [s["count"] for s in index["shards"]]
        self.starts = torch.tensor([0, *np.cumsum(counts).tolist()])  # (S + 1,) first index of each shard
        self._fds: OrderedDict[int, int] = OrderedDict()
        self.labels = torch.cat(
            [
                torch.from_numpy(sh.read(self._fd(k), "labels", 0, c).copy())
                for k, (sh, c) in enumerate(zip(self.shards, counts, strict=True))
            ]
        ).long()  # (N,)
        self.class_names = index["class_names"]
        self.latent_shape = tuple(index["latent_shape"])  # (C, h, w)
        self.scale_factor = scale_factor
        self.flip_ok = torch.ones(len(self.class_names), dtype=torch.bool)

    def _fd(self, k: int) -> int:
        """An open descriptor for shard k; at most MAX_OPEN stay open (least recently used closed first)."""
        if k in self._fds:
            self._fds.move_to_end(k)
            return self._fds[k]
        if len(self._fds) >= MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        self._fds[k] = os.open(self.shards[k].path, os.O_RDONLY)
        return self._fds[k]

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def image_size(self) -> int:
        return self.latent_shape[-1]

    def posteriors(self, indices: torch.Tensor, which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"indices out of range for {len(self)} examples")
        k = torch.searchsorted(self.starts, indices, right=True) - 1  # (B,) shard of each example
        where = list(zip(k.tolist(), (indices - self.starts[k]).tolist(), which.tolist(), strict=True))
        return self._rows("mean", where), self._rows("logvar", where)

    def _rows(self, name: str, where: list[tuple[int, int, int]]) -> torch.Tensor:
        """Tensor `name`'s row (C, h, w) for each (shard, example in it, posterior): (B, C, h, w)."""
        out = [self.shards[s].read(self._fd(s), name, 2 * r + w)[0] for s, r, w in where]
        return torch.from_numpy(np.stack(out)).float()

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
