"""The compiled, graph-captured inference forward for sampling: autocast to a low-precision dtype,
replay of one captured CUDA graph per input shape on a GPU (of the plain or the `torch.compile`d
network), or a compiled network on the CPU.

A sampler calls the network hundreds of times with the same shapes. At small batch a GPU then waits
on Python and kernel launches, not on arithmetic; a captured graph launches the whole forward at once.
On a CPU with few cores the small elementwise operations between the matmuls do not spread over the
cores; the compiler fuses them into a few parallel loops. `FastForward` is a drop-in for the model in
`mrdit.sampling` (it has `.config` and returns the same list of per-branch predictions).
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Sequence
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
    """`model(x, t, y)` under autocast(`dtype`), with CUDA graphs on a CUDA device when `cuda_graphs`,
    and through `torch.compile` when `compile`.

    Graphs are captured lazily for each (x shape, t shape, y shape) and kept (`max_graphs` at most,
    oldest dropped); outputs are copied out of the graph's buffers, so callers may keep them, and one
    lock makes capture and replay safe for concurrent callers (`_graph_call`).
    The compiled network is used only after `warm_up` (which may run in a background thread while
    calls go to the plain network), and only for what the warm-up compiled: one shared time step and
    batches of 2 or more (the compiler specialises batch 1). Anything else, or a failed compile (no C++
    compiler, say), runs the plain network. With CUDA graphs and `compile`, each graph captures the
    compiled network (fused kernels, compiled for that shape in the capture's warm-up; minutes for a
    large model); if compiling fails the plain network is captured instead. Inference only.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype | None = torch.bfloat16,
        cuda_graphs: bool = True,
        warmup: int = 2,
        max_graphs: int = 8,
        compile: bool = False,
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
        self._lock = threading.Lock()  # guards the graphs' shared buffers and their capture
        self.compile = compile
        self.compile_state = "off" if not compile else "not compiled"  # -> compiling -> ready | failed: ...
        on_cuda = next(model.parameters()).is_cuda
        # Graphs fix every shape, so the compiler may specialise; the CPU path serves any batch.
        self._compiled = torch.compile(model, dynamic=not (cuda_graphs and on_cuda)) if compile else None
        self.calls = {"plain": 0, "compiled": 0, "graph": 0}  # which path served each call
        self.last_call = time.monotonic()  # when the network last ran (or was created): for `warm_up_when_idle`
        self.warm_thread: threading.Thread | None = None

    def warm_up(self, batches: Sequence[int] = (2, 16)) -> bool:
        """Compile the network for these batch sizes (2 and 16 cover 2..any: the compiler splits its
        convolution guards at 16). Returns whether the compiled network is now in use."""
        if self._compiled is None:
            return False
        self.compile_state = "compiling"
        c = self.config
        device = next(self.model.parameters()).device
        try:
            with torch.no_grad():
                for b in batches:
                    if b < 2:
                        raise ValueError(f"warm-up batches must be >= 2, got {b}")
                    x = torch.zeros(b, c.channels, c.image_size, c.image_size, device=device)
                    t = torch.full((1,), c.schedule.num_steps / 2, device=device)
                    y = torch.zeros(b, dtype=torch.long, device=device)
                    with self._autocast(device):
                        self._compiled(x, t, y)
        except Exception as e:  # no compiler, unsupported platform...: keep the plain network
            self._compile_failed(e)
            return False
        self.compile_state = "ready"
        return True

    def warm_up_async(self, batches: Sequence[int] = (2, 16)) -> threading.Thread:
        """`warm_up` in a daemon thread; calls meanwhile run the plain network."""
        self.warm_thread = threading.Thread(
            target=self.warm_up, args=(tuple(batches),), daemon=True, name="mrdit-compile"
        )
        self.warm_thread.start()
        return self.warm_thread

    def warm_up_when_idle(self, idle_s: float, batches: Sequence[int] = (2, 16)) -> threading.Thread:
        """`warm_up` in a daemon thread once the network has not been called for `idle_s` seconds, so that
        compiling never shares the cores with the first requests after a start. A request that comes
        while it compiles still shares them, once."""

        def wait_then_warm() -> None:
            while (wait := idle_s - (time.monotonic() - self.last_call)) > 0:
                time.sleep(min(wait, 0.25))
            self.warm_up(batches)

        self.warm_thread = threading.Thread(target=wait_then_warm, daemon=True, name="mrdit-compile")
        self.warm_thread.start()
        return self.warm_thread

    def touch(self) -> None:
        """Count the network as busy now (for calls that bypass this wrapper, such as interventions)."""
        self.last_call = time.monotonic()

    def _autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        # Cached casts would be freed between graph replays; recasting is part of the captured work.
        return torch.autocast(device.type, dtype=self.dtype, cache_enabled=False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        self.last_call = time.monotonic()
        if not (self.cuda_graphs and x.is_cuda):
            use_compiled = self.compile_state == "ready" and x.shape[0] >= 2 and t.numel() == 1
            net = self._compiled if use_compiled else self.model
            self.calls["compiled" if use_compiled else "plain"] += 1
            with self._autocast(x.device):
                return [o.float() for o in net(x, t, y)]
        return self._graph_call(x, t.to(x.device, torch.float32), y.to(x.device))

    def _graph_call(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Capture (once per shape) and replay under one lock: a graph has one set of input and output
        buffers, so two callers (two users of the app) must not fill and read them interleaved. The lock
        is held while the host enqueues copy-in, replay and copy-out, not while the GPU runs them: the
        work of one stream runs in order anyway, so concurrent requests lose little."""
        key = (tuple(x.shape), x.dtype, tuple(t.shape), tuple(y.shape), y.dtype)
        with self._lock:
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
            self.calls["graph"] += 1
            return [o.clone() for o in g.outs]

    def _capture(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> _Graph:
        sx, st, sy = x.clone(), t.clone(), y.clone()
        if self._compiled is not None:
            try:  # compiles for this shape in the warm-up, outside the capture
                self._warm(self._compiled, sx, st, sy)
                graph = self._record(self._compiled, sx, st, sy)
                self.compile_state = "ready"
                return graph
            except Exception as e:  # no Triton, an unsupported GPU, compiled code that cannot be captured
                self._compile_failed(e)
        self._warm(self.model, sx, st, sy)
        return self._record(self.model, sx, st, sy)

    def _record(self, net, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> _Graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._autocast(x.device):
            outs = [o.float() for o in net(x, t, y)]
        return _Graph(graph, x, t, y, outs)

    def _warm(self, net, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """`warmup` calls off the default stream, as capture requires (lazy inits, allocator pools)."""
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                with self._autocast(x.device):
                    [o.float() for o in net(x, t, y)]
        torch.cuda.current_stream(x.device).wait_stream(stream)

    def _compile_failed(self, e: Exception) -> None:
        self.compile_state = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self._compiled = None
        warnings.warn(f"torch.compile is not used ({self.compile_state})", stacklevel=3)

    def clear(self) -> None:
        """Drop the captured graphs (and the memory they hold)."""
        with self._lock:
            self._graphs.clear()
