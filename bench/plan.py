"""The resolved plan of a `bench.py` run (`BenchConfig`) and what its sections share (`BenchRun`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from modes import TrainCase
from mrdit.compiled import FastForward
from report import Results
from timing import matmul_rate


@dataclass(frozen=True)
class BenchConfig:
    """Every flag of `bench.py` with the device's defaults filled in (what `config:` prints)."""

    model: Path | None
    preset: str
    device: str
    amp: str
    threads: int
    sections: tuple[str, ...]
    forward_batches: tuple[int, ...]
    forward_variants: tuple[str, ...]
    compile_batches: tuple[int, ...]
    profile: bool
    sampling_variants: tuple[str, ...]
    sampling_repeat: int
    images: int
    train_cases: tuple[TrainCase, ...]
    train_steps: int
    inductor: tuple[tuple[str, object], ...]
    out: Path | None
    dry_run: bool = False

    @property
    def name(self) -> str:
        return str(self.model or self.preset)

    def as_json(self) -> dict:
        values = asdict(self)
        values["train_cases"] = [c.spec for c in self.train_cases]
        values["inductor"] = dict(self.inductor)
        return values


@dataclass
class BenchRun:
    """One run: its plan, the model, the results so far, and the machine's matmul rate beside them."""

    config: BenchConfig
    model: torch.nn.Module
    amp: torch.dtype | None
    results: Results
    flops_per_image: float = 0.0  # one forward, from torch.utils.flop_counter
    matmul_tflops: float = 0.0
    _compiled_graphs: FastForward | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def matmul_dtype(self) -> torch.dtype:
        return self.amp if (self.gpu and self.amp is not None) else torch.float32

    def matmul_rate(self, warmup: int = 2, repeat: int = 5) -> float:
        """FLOP/s of a square matmul in the run's dtype (8192 on a GPU, 1024 on the CPU)."""
        return matmul_rate(self.device, self.matmul_dtype, 8192 if self.gpu else 1024, warmup, repeat)

    def share_of_matmul(self, tflops: float) -> float:
        return tflops / self.matmul_tflops

    def compiled_graphs(self) -> FastForward:
        """One FastForward of the compiled network, shared by the forward and sampling cases: its
        compiled code is reused, only the graphs are recaptured."""
        if self._compiled_graphs is None:
            self._compiled_graphs = FastForward(self.model, self.amp, cuda_graphs=True, compile=True)
        return self._compiled_graphs
