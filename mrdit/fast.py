"""Fast inference forward for sampling: autocast to a low-precision dtype and, on CUDA, replay of
one captured CUDA graph per input shape.

A sampler calls the network hundreds of times with the same shapes. At small batch a GPU then waits
on Python and kernel launches, not on arithmetic; a captured graph launches the whole forward at once.
`FastForward` is a drop-in for the model in `mrdit.sampling` (it has `.config` and returns the same
list of per-branch predictions) and falls back to the plain call on the CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    outs: list[torch.Tensor]


class FastForward:
    """`model(x, t, y)` under autocast(`dtype`), with CUDA graphs on a CUDA device when `cuda_graphs`.

    Graphs are captured lazily for each (x shape, t shape, y shape) and kept (`max_graphs` at most,
    oldest dropped); outputs are copied out of the graph's buffers, so callers may keep them.
    Inference only: no gradients flow through a replayed graph.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype | None = torch.bfloat16,
        cuda_graphs: bool = True,
        warmup: int = 2,
        max_graphs: int = 8,
    ) -> None:
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be None, float32, bfloat16 or float16, got {dtype}")
        self.model = model.eval()
        self.config = model.config
        self.dtype = None if dtype == torch.float32 else dtype
        self.cuda_graphs = cuda_graphs
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Graph] = {}

    def _autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        # Cached casts would be freed between graph replays; recasting is part of the captured work.
        return torch.autocast(device.type, dtype=self.dtype, cache_enabled=False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        if not (self.cuda_graphs and x.is_cuda):
            with self._autocast(x.device):
                return [o.float() for o in self.model(x, t, y)]
        t = t.to(x.device, torch.float32)
        y = y.to(x.device)
        key = (tuple(x.shape), x.dtype, tuple(t.shape), tuple(y.shape), y.dtype)
        g = self._graphs.get(key)
        if g is None:
            g = self._capture(x, t, y)
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = g
        g.x.copy_(x)
        g.t.copy_(t)
        g.y.copy_(y)
        g.graph.replay()
        return [o.clone() for o in g.outs]

    def _capture(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> _Graph:
        sx, st, sy = x.clone(), t.clone(), y.clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(self.warmup):
                with self._autocast(x.device):
                    [o.float() for o in self.model(sx, st, sy)]
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._autocast(x.device):
            outs = [o.float() for o in self.model(sx, st, sy)]
        return _Graph(graph, sx, st, sy, outs)

    def clear(self) -> None:
        """Drop the captured graphs (and the memory they hold)."""
        self._graphs.clear()
