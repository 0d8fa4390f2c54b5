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

Calls made inside `with shared.first():` (a step-mode click: one forward a person waits on) go ahead
of the others, in forwards of their own: such a call waits only for the forward that is running, then
runs at its own small size, instead of waiting its turn behind long requests' forwards. With
`first_lane=True` they run on a second network thread of their own and do not wait for the running
forward at all; `omp_threads=1` then keeps each network thread's loops on its own thread while both
have work (two busy OpenMP teams on two cores would stall each other at every barrier; with no first
call for `BUSY_S` seconds the main thread goes back to PyTorch's setting, so a lone request keeps every
core), and `nice` lowers the priority of the thread that runs the long requests' forwards (Linux), so
that the clicks and the server's request handling run first when they are ready and the long requests
take the cores left over (bench/NOTES.md).

`TracedNetwork` is the network to give it on a CPU: a TorchScript trace runs the whole forward in C++
with the GIL released, so the Python work of the server's other threads does not stall it between
its operations as it stalls the eager network (bench/NOTES.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ModelConfig
from .network import check_inputs
from .threads import omp_threads

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]]
log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Call:
    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    outs: list[torch.Tensor] | None = None
    error: BaseException | None = None
    first: bool = False  # made inside `SharedForward.first()`: served before the others

    @property
    def rows(self) -> int:
        return self.x.shape[0]


class _Lane:
    """One network thread and the calls waiting for it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending: list[_Call] = []
        self.ready = threading.Condition()
        self.thread: threading.Thread | None = None


class SharedForward:
    """`net(x, t, y)` for callers in any thread, run on one network thread in joined batches (two with
    `first_lane`: one for the calls made in `first()` blocks)."""

    BUSY_S = 2.0  # seconds after a first-lane call during which the main lane keeps to `omp_threads`

    def __init__(
        self,
        net: Network,
        config: ModelConfig,
        max_rows: int = 64,
        first_lane: bool = False,
        omp_threads: int | None = None,
        nice: int = 0,
    ) -> None:
        """`first_lane`: calls made in `first()` blocks run on a second network thread. `omp_threads`:
        OpenMP threads of the first lane's thread, and of the main one while the first lane has had a
        call within `BUSY_S` seconds (without a first lane: of the one network thread; None: PyTorch's
        setting throughout). `nice`: added to the main network thread's nice value when there is a
        first lane (Linux; elsewhere, or with one lane, it changes nothing)."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if omp_threads is not None and omp_threads < 1:
            raise ValueError(f"omp_threads must be >= 1 or None, got {omp_threads}")
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be in [0, 19], got {nice}")
        self.net = net
        self.config = config
        self.max_rows = max_rows
        self.first_lane = first_lane
        self.omp_threads = omp_threads  # OpenMP threads of a network thread while both lanes are busy
        self.nice = nice  # added to the main network thread's nice value (Linux; 0: unchanged)
        self.forwards = 0  # forwards run, and calls served: for tests and benchmarks
        self.calls = 0
        self._count = threading.Lock()
        self._main = _Lane("mrdit-network")
        self._firsts = _Lane("mrdit-network-first") if first_lane else self._main
        self._last_first = -float("inf")  # time.monotonic() of the first lane's latest call
        self._local = threading.local()  # .first: this thread's calls go first

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        if threading.current_thread() in (self._main.thread, self._firsts.thread):  # from inside a forward
            return self.net(x, t, y)
        check_inputs(self.config, x, t, y)  # a bad call fails alone, not the batch it would join
        call = _Call(x, t, y, first=getattr(self._local, "first", False))
        lane = self._firsts if call.first else self._main
        with lane.ready:
            lane.pending.append(call)
            if lane.thread is None:
                lane.thread = threading.Thread(target=self._serve, args=(lane,), name=lane.name, daemon=True)
                lane.thread.start()
            lane.ready.notify()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.outs is not None
        return call.outs

    @contextlib.contextmanager
    def first(self) -> Iterator[None]:
        """This thread's calls in the block go ahead of every other waiting call, in forwards of their
        own (with the other calls made in such blocks): for forwards a person waits on, one at a time,
        such as a step-mode click. Long requests' calls wait at most for those, which are small. With
        `first_lane`, on a network thread of their own: they never wait for a long request's forward."""
        before = getattr(self._local, "first", False)
        self._local.first = True
        try:
            yield
        finally:
            self._local.first = before

    def warm_up(self, rows: int = 2) -> None:
        """Two calls of `rows` rows, one at a shared time step and one with a step per row: a
        `TracedNetwork` makes both its traces then (about a second on 2 cores), before the first request;
        with a first lane, one more call there."""
        c = self.config
        x = torch.zeros(rows, c.channels, c.image_size, c.image_size)
        y = torch.zeros(rows, dtype=torch.long)
        self(x, torch.full((1,), 500.0), y)
        self(x, torch.linspace(10.0, 990.0, rows), y)
        if self.first_lane:  # its thread started, and the traces run there once
            with self.first():
                self(x, torch.full((1,), 500.0), y)

    def _take(self, lane: _Lane) -> list[_Call]:
        """The oldest waiting call, then every later one, in order of arrival, that still fits in
        `max_rows` (under the lane's lock), so the oldest call never waits for more than the forward
        that is running. On a shared lane, calls made in `first()` blocks go before the others, in a
        forward of their own."""
        firsts = [c for c in lane.pending if c.first]
        waiting = firsts or lane.pending
        batch = [waiting[0]]
        rows = batch[0].rows
        for c in waiting[1:]:
            if rows + c.rows <= self.max_rows:
                batch.append(c)
                rows += c.rows
        lane.pending = [c for c in lane.pending if c not in batch]
        return batch

    def _serve(self, lane: _Lane) -> None:
        two_lanes = self._firsts is not self._main
        main = lane is self._main
        if self.nice and main and two_lanes:
            _lower_priority(self.nice)
        full = torch.get_num_threads()  # PyTorch's setting, for the main lane when the first one is idle
        current = None
        while True:
            with lane.ready:
                while not lane.pending:
                    lane.ready.wait()
                batch = self._take(lane)
            if self.omp_threads is not None:
                now = time.monotonic()
                if not main:
                    self._last_first = now
                busy = not main or not two_lanes or now - self._last_first < self.BUSY_S
                want = self.omp_threads if busy else full
                if want != current:
                    omp_threads(want)
                    current = want
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
        with self._count:
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


def _lower_priority(nice: int) -> bool:
    """Add `nice` to the calling thread's nice value (Linux: a thread's id is its own scheduling entity,
    and the OpenMP threads it starts later inherit it). Returns whether it took effect."""
    if not sys.platform.startswith("linux"):  # elsewhere a thread id is not a scheduling entity
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as e:
        log.warning("could not lower the network thread's priority: %s", e)
        return False
    return True


class TracedNetwork:
    """`model(x, t, y)` through TorchScript traces of `model`, one per kind of call (a shared time step
    or one per row, and the dtypes of t and y), each made on the first call of its kind and checked
    there against `model` on a batch of another size; a kind whose trace fails or disagrees (beyond
    `atol`) runs `fallback` (by default `model`) from then on. Inference only; the network threads of
    a `SharedForward` may call it at once (a trace is made under a lock, then run from any thread).
    The graph is traced on validated inputs, so the network's shape checks are constants in it (the
    callers check). `torch.jit.trace` is deprecated in favour of `torch.compile`,
    whose CPU code still runs its kernels from Python; should tracing go away, every call falls back.

    Why: an eager forward releases and retakes the GIL at each of its several hundred operations, and
    with a dozen request threads running Python it waits for it each time. Measured on 2 cores, a
    24-row forward of the 32 px model with 12 busy Python threads: eager 661 ms, compiled 334 ms,
    traced 199 ms (quiet: 53, 50, 51 ms)."""

    def __init__(self, model: nn.Module, fallback: Network | None = None, atol: float = 1e-4) -> None:
        self.model = model.eval()
        self.fallback = fallback if fallback is not None else model
        self.atol = atol
        self.traces: dict[tuple, Callable | None] = {}  # kind -> trace, or None where it falls back
        self._tracing = threading.Lock()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        t = t.reshape(-1)  # (1,) or (B,), as the network reads it: a 0-d step is a shared one
        kind = (t.numel() == 1, t.dtype, y.dtype)
        if kind not in self.traces:
            with self._tracing:
                if kind not in self.traces:
                    self.traces[kind] = self._trace(x, t, y)
        traced = self.traces[kind]
        if traced is None:
            return self.fallback(x, t, y)
        with torch.no_grad():
            return list(traced(x, t, y))

    def _trace(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> Callable | None:
        """A trace for calls like this one, or None (logged) where tracing fails or disagrees."""
        # The check batch: one more row than the traced one, so that a batch size baked into the graph shows.
        x2, y2 = torch.cat([x, x[:1]]), torch.cat([y, y[:1]])
        t2 = t if t.numel() == 1 else torch.cat([t, t[:1]])
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation, and the shape checks becoming constants
                traced = torch.jit.trace(self.model, (x, t, y), check_trace=False)
                for args in ((x, t, y), (x2, t2, y2)):
                    for a, b in zip(traced(*args), self.model(*args), strict=True):
                        if a.shape != b.shape or not torch.allclose(a, b, atol=self.atol, rtol=self.atol):
                            raise ValueError(f"the trace differs from the network by {float((a - b).abs().max()):.2e}")
        except Exception as e:
            log.warning("the network runs untraced for calls like (x %s, t %s): %s", tuple(x.shape), tuple(t.shape), e)
            return None
        return traced
