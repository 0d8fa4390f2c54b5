"""One thread for every forward: concurrent sampler calls of a network joined into one batch.

    shared = SharedForward(pipe.net, pipe.config, max_rows=64)
    outs = shared(x, t, y)   # from any number of threads: this call's rows, as the network gives them

Each caller (a request's sampler, in its own thread) hands its forward to the network thread and waits.
That thread takes the calls waiting when it is free, oldest first and up to `max_rows` rows (a larger
call runs alone), and runs them as one forward, each row at its own time step: requests with any
sampler, step count or step index share the forward, and one that arrives mid-run joins the next. On a
CPU a forward's cost per row falls with the batch, and the network's parallel loops all run from one
thread, so one OpenMP pool serves them (`mrdit.threads`). A caller that stops calling (a cancelled
request) leaves the others as they were. Every row is what the network gives it in a batch of these
rows: equal to its own forward up to float rounding, which changes with the batch size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .network import check_inputs

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]]


@dataclass(eq=False)
class _Call:
    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    outs: list[torch.Tensor] | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return self.x.shape[0]


class SharedForward:
    """`net(x, t, y)` for callers in any thread, run on one network thread in joined batches."""

    def __init__(self, net: Network, config: ModelConfig, max_rows: int = 64) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.net = net
        self.config = config
        self.max_rows = max_rows
        self.forwards = 0  # forwards run, and calls served: for tests and benchmarks
        self.calls = 0
        self._pending: list[_Call] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        if threading.current_thread() is self._thread:  # a call from inside a forward: run it here
            return self.net(x, t, y)
        check_inputs(self.config, x, t, y)  # a bad call fails alone, not the batch it would join
        call = _Call(x, t, y)
        with self._ready:
            self._pending.append(call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="mrdit-network", daemon=True)
                self._thread.start()
            self._ready.notify()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.outs is not None
        return call.outs

    def _take(self) -> list[_Call]:
        """The oldest waiting call, then every later one, in order of arrival, that still fits in
        `max_rows` (under the lock): a small call (a step-mode click) joins the next forward whenever
        there is room left, and the oldest call never waits for more than the forward that is running."""
        batch = [self._pending[0]]
        rows = batch[0].rows
        for c in self._pending[1:]:
            if rows + c.rows <= self.max_rows:
                batch.append(c)
                rows += c.rows
        self._pending = [c for c in self._pending if c not in batch]
        return batch

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._pending:
                    self._ready.wait()
                batch = self._take()
            self._run(batch)

    def _run(self, batch: list[_Call]) -> None:
        try:
            with torch.no_grad():
                outs = self._forward(batch)
        except Exception as e:  # every call of the batch gets the error; the thread goes on
            for c in batch:
                c.error = e
                c.done.set()
            return
        self.forwards += 1
        self.calls += len(batch)
        start = 0
        for c in batch:
            stop = start + c.rows
            # Copies when shared, so that no caller's kept tensor holds the whole batch's memory.
            c.outs = outs if len(batch) == 1 else [o[start:stop].clone() for o in outs]
            start = stop
            c.done.set()

    def _forward(self, batch: list[_Call]) -> list[torch.Tensor]:
        if len(batch) == 1:
            c = batch[0]
            return self.net(c.x, c.t, c.y)
        x = torch.cat([c.x for c in batch])  # (sum B_i, C, H, W)
        y = torch.cat([c.y for c in batch])  # (sum B_i,)
        shared = all(c.t.numel() == 1 for c in batch) and all(bool((c.t == batch[0].t).all()) for c in batch)
        if shared:
            t = batch[0].t.reshape(1)  # one step for every row: TD parameters computed once
        else:
            t = torch.cat([c.t.reshape(-1).expand(c.rows) for c in batch]).to(torch.float32)  # (sum B_i,)
        return self.net(x, t, y)
