"""A run's trajectory: the kept steps of one sampling run within a byte budget, and its bundle file.

Every step is shown while a run streams; what is *kept* for scrubbing, replay and export is bounded by
bytes, not steps: when all steps do not fit, an evenly spaced subset that always holds the first and
the last step is kept, and each kept frame carries its real step number.

A bundle is one safetensors file: x_t (the decoded preview and the model-space state) and every
branch's estimate at every kept step, float16, the final images (uint8), the planned schedule, and the
settings and model name as JSON in the file's metadata. Written twice from the same run it is the same
bytes. Bundles are untrusted input when loaded: size-limited, parsed by safetensors only (no pickle),
and every tensor's shape and dtype is checked before anything is used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .checkpoint import atomic_write

BUNDLE_FORMAT = "mrdit-trajectory"
BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 64 * 2**20  # uploads larger than this are refused before they are parsed
MAX_IMAGES = 64
MAX_SIDE = 1024


class BundleError(ValueError):
    """A trajectory bundle is unreadable, too large or inconsistent; the message is meant for users."""


@dataclass
class Frame:
    """One kept solver step: `step` is 1-based; tensors are float16 on the CPU, coarse to fine."""

    step: int
    t: float
    log_snr: float
    nfe: int
    x_t: torch.Tensor  # (B, 3, H, W) decoded preview of x_t, in [-1, 1]
    branches: list[torch.Tensor]  # K x (B, 3, h_k, w_k) each branch's clean estimate, decoded
    x: torch.Tensor  # (B, C, S, S) the sampler's state in model space
    latents: list[torch.Tensor] | None = None  # latent models: x_t and each estimate, for a full decode (not saved)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.x_t, self.x, *self.branches, *(self.latents or [])])


def kept_indices(total: int, capacity: int) -> list[int]:
    """Evenly spaced 0-based step indices, at most `capacity` of `total`, always the first and last."""
    if total <= capacity:
        return list(range(total))
    capacity = max(capacity, 2)
    return sorted({round(i * (total - 1) / (capacity - 1)) for i in range(capacity)})


@dataclass
class Trajectory:
    """The kept frames of one run, the planned schedule, and what identifies the run."""

    total: int  # planned solver steps
    budget_bytes: int
    planned_t: list[float] = field(default_factory=list)  # t reached after each planned step
    planned_log_snr: list[float] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    final: np.ndarray | None = None  # (B, H, W, 3) uint8, once the run has finished
    meta: dict = field(default_factory=dict)  # settings, model name, panel headers (JSON-serialisable)
    keep: set[int] | None = None  # the 0-based step indices kept; fixed by the first frame's size

    def add(self, index: int, frame: Frame) -> bool:
        """Keep `frame` (0-based solver step `index`) if it is in the kept subset; returns whether it was."""
        if self.keep is None:
            capacity = max(self.budget_bytes // max(frame.nbytes, 1), 2)
            self.keep = set(kept_indices(self.total, capacity))
        if index not in self.keep:
            return False
        self.frames.append(frame)
        return True

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.frames)

    @property
    def finished(self) -> bool:
        return self.final is not None

    def position(self, step: int) -> int:
        """Index of the kept frame at or before 1-based `step` (the first frame if none is before)."""
        best = 0
        for i, f in enumerate(self.frames):
            if f.step <= step:
                best = i
        return best


def to_bytes(traj: Trajectory) -> bytes:
    """The bundle of a finished trajectory, deterministic for the same content."""
    if not traj.frames or traj.final is None:
        raise BundleError("only a finished run can be exported")
    K = len(traj.frames[0].branches)
    tensors = {
        "step": torch.tensor([f.step for f in traj.frames], dtype=torch.int32),
        "t": torch.tensor([f.t for f in traj.frames], dtype=torch.float32),
        "log_snr": torch.tensor([f.log_snr for f in traj.frames], dtype=torch.float32),
        "nfe": torch.tensor([f.nfe for f in traj.frames], dtype=torch.int32),
        "x_t": torch.stack([f.x_t for f in traj.frames]).to(torch.float16).contiguous(),
        "x": torch.stack([f.x for f in traj.frames]).to(torch.float16).contiguous(),
        "final": torch.from_numpy(np.ascontiguousarray(traj.final)),
        "planned_t": torch.tensor(traj.planned_t, dtype=torch.float32),
        "planned_log_snr": torch.tensor(traj.planned_log_snr, dtype=torch.float32),
    }
    for k in range(K):
        tensors[f"branch_{k}"] = torch.stack([f.branches[k] for f in traj.frames]).to(torch.float16).contiguous()
    header = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "total": traj.total, "meta": traj.meta}
    # One metadata key: safetensors does not keep the order of several, and the file must be reproducible.
    return save_bytes(tensors, metadata={BUNDLE_FORMAT: json.dumps(header, sort_keys=True)})


def save_bundle(traj: Trajectory, path: str | Path) -> Path:
    """Write the bundle atomically (temporary file, fsync, rename)."""
    path = Path(path)
    data = to_bytes(traj)
    atomic_write(path, lambda f: f.write(data))
    return path


def _header(data: bytes) -> dict:
    """The bundle's JSON header, read from the safetensors header without touching the tensors."""
    if len(data) < 8:
        raise BundleError("not a trajectory bundle: the file is too short")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise BundleError("not a trajectory bundle: the file is truncated or not safetensors")
    try:
        head = json.loads(data[8 : 8 + n])
        header = json.loads(head["__metadata__"][BUNDLE_FORMAT])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BundleError("not a trajectory bundle: it has no mrdit trajectory header") from None
    if not isinstance(header, dict) or header.get("format") != BUNDLE_FORMAT:
        raise BundleError("not a trajectory bundle: unknown format")
    if header.get("version") != BUNDLE_VERSION:
        raise BundleError(f"trajectory bundle version {header.get('version')!r} is not supported (need {BUNDLE_VERSION})")
    return header


def _expect(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    if name not in tensors:
        raise BundleError(f"trajectory bundle is missing {name!r}")
    v = tensors[name]
    if v.dtype != dtype or v.ndim != ndim:
        raise BundleError(f"trajectory bundle: {name!r} must be {ndim}-d {dtype}, got {v.ndim}-d {v.dtype}")
    if v.is_floating_point() and not bool(torch.isfinite(v).all()):
        raise BundleError(f"trajectory bundle: {name!r} holds non-finite values")
    return v


def _check_images(name: str, v: torch.Tensor, T: int, B: int) -> None:
    if v.shape[0] != T or v.shape[1] != B or v.shape[2] != 3 or v.shape[3] != v.shape[4] or not 1 <= v.shape[3] <= MAX_SIDE:
        raise BundleError(f"trajectory bundle: {name!r} must be ({T}, {B}, 3, S, S), got {tuple(v.shape)}")


def _vector(tensors: dict[str, torch.Tensor], name: str, n: int) -> torch.Tensor:
    """A float32 vector of n entries that may hold +inf (the log-SNR of the clean end), never NaN."""
    v = tensors.get(name)
    if v is None or v.dtype != torch.float32 or v.shape != (n,) or bool(torch.isnan(v).any()):
        raise BundleError(f"trajectory bundle: {name!r} must be {n} float32 values")
    return v


def from_bytes(data: bytes, budget_bytes: int | None = None) -> Trajectory:
    """Parse and check an untrusted bundle; any problem is a BundleError with a readable message."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"trajectory bundle is {len(data) / 2**20:.1f} MiB; the limit is {MAX_BUNDLE_BYTES >> 20} MiB")
    header = _header(data)
    try:
        tensors = load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise BundleError(f"trajectory bundle is corrupt: {e}") from None
    step = _expect(tensors, "step", torch.int32, 1)
    T = step.numel()
    total = header.get("total")
    if not isinstance(total, int) or not 1 <= T <= total <= 100_000:
        raise BundleError(f"trajectory bundle: {T} kept steps of total {total!r} is inconsistent")
    if bool((step[1:] <= step[:-1]).any()) or int(step[0]) < 1 or int(step[-1]) > total:
        raise BundleError("trajectory bundle: step numbers must increase within 1..total")
    x_t = _expect(tensors, "x_t", torch.float16, 5)
    B = x_t.shape[1]
    if not 1 <= B <= MAX_IMAGES:
        raise BundleError(f"trajectory bundle: {B} images; at most {MAX_IMAGES}")
    _check_images("x_t", x_t, T, B)
    x = _expect(tensors, "x", torch.float16, 5)
    if x.shape[:2] != (T, B) or x.shape[3] != x.shape[4] or not 1 <= x.shape[3] <= MAX_SIDE or not 1 <= x.shape[2] <= 64:
        raise BundleError(f"trajectory bundle: 'x' must be ({T}, {B}, C, S, S), got {tuple(x.shape)}")
    branches = []
    k = 0
    while f"branch_{k}" in tensors:
        b = _expect(tensors, f"branch_{k}", torch.float16, 5)
        _check_images(f"branch_{k}", b, T, B)
        branches.append(b)
        k += 1
    if not branches or len(branches) > 8:
        raise BundleError("trajectory bundle: needs 1 to 8 branches (branch_0, branch_1, ...)")
    final = _expect(tensors, "final", torch.uint8, 4)
    if final.shape[0] != B or final.shape[3] != 3 or not (1 <= final.shape[1] <= MAX_SIDE and 1 <= final.shape[2] <= MAX_SIDE):
        raise BundleError(f"trajectory bundle: 'final' must be ({B}, H, W, 3) uint8, got {tuple(final.shape)}")
    t = _expect(tensors, "t", torch.float32, 1)
    nfe = _expect(tensors, "nfe", torch.int32, 1)
    log_snr = _vector(tensors, "log_snr", T)
    planned_t = _expect(tensors, "planned_t", torch.float32, 1)
    planned_log_snr = _vector(tensors, "planned_log_snr", total)
    if t.numel() != T or nfe.numel() != T:
        raise BundleError("trajectory bundle: per-step values must have one entry per kept step")
    if planned_t.numel() != total:
        raise BundleError("trajectory bundle: the planned schedule must have one entry per planned step")
    meta = header.get("meta")
    if not isinstance(meta, dict):
        raise BundleError("trajectory bundle: its metadata is not a JSON object")
    frames = [
        Frame(
            step=int(step[i]),
            t=float(t[i]),
            log_snr=float(log_snr[i]),
            nfe=int(nfe[i]),
            x_t=x_t[i],
            branches=[b[i] for b in branches],
            x=x[i],
        )
        for i in range(T)
    ]
    traj = Trajectory(
        total=total,
        budget_bytes=budget_bytes if budget_bytes is not None else sum(f.nbytes for f in frames),
        planned_t=planned_t.tolist(),
        planned_log_snr=planned_log_snr.tolist(),
        frames=frames,
        final=final.numpy(),
        meta=meta,
        keep={f.step - 1 for f in frames},
    )
    return traj


def thinned(traj: Trajectory, budget_bytes: int) -> Trajectory:
    """`traj` with an evenly spaced subset of its frames (first and last kept) that fits `budget_bytes`."""
    if traj.nbytes <= budget_bytes or len(traj.frames) <= 2:
        return traj
    capacity = max(budget_bytes // max(traj.frames[0].nbytes, 1), 2)
    traj.frames = [traj.frames[i] for i in kept_indices(len(traj.frames), capacity)]
    traj.keep = {f.step - 1 for f in traj.frames}
    traj.budget_bytes = budget_bytes
    return traj


def load_bundle(path: str | Path, budget_bytes: int | None = None) -> Trajectory:
    """Read a bundle from disk, refusing files over MAX_BUNDLE_BYTES before reading them."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BundleError(f"cannot read the trajectory bundle: {e.strerror}") from None
    if size > MAX_BUNDLE_BYTES:
        raise BundleError(f"trajectory bundle is {size / 2**20:.1f} MiB; the limit is {MAX_BUNDLE_BYTES >> 20} MiB")
    if path.suffix != ".safetensors":
        raise BundleError("a trajectory bundle is a .safetensors file")
    return from_bytes(path.read_bytes(), budget_bytes)


def finite_log_snr(values: Sequence[float]) -> list[float]:
    """The schedule's log-SNR values without the infinite one at the clean end (for plots)."""
    return [v for v in values if math.isfinite(v)]
