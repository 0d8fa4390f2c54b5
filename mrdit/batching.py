"""Batching across requests: concurrent requests that share a sampling plan run as one sampler run.

    batcher = RequestBatcher(run_batch, max_rows=32)
    for state in batcher.stream(settings, rows=4):   # from any number of threads at once
        ...  # this request's rows of every StepState, as if it had run alone

Requests with the same plan (the `key` function: sampler, steps, guidance schedule, ...) that are
waiting when a run starts go into it together, up to `max_rows` images; a request that arrives while a
run is going waits for the next one. A worker thread runs `run_batch(requests)`, which yields batched
states, and hands each request its own rows. Closing a request's stream (a cancelled client) stops its
deliveries only: its rows are still computed, so the others in its batch see exactly the numbers they
would have seen, and a run whose requests are all cancelled stops at its next step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any

from .sampling import StepState

_DONE = object()


@dataclass(eq=False)
class Request:
    """One caller's share of a batch: its settings, image count and delivery queue."""

    settings: Any
    rows: int
    deliveries: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)


def rows_of(state: StepState, start: int, stop: int) -> StepState:
    """The StepState of rows [start, stop) of a batched state."""
    return replace(
        state,
        x=state.x[start:stop],
        eps=[e[start:stop] for e in state.eps],
        x0=[x0[start:stop] for x0 in state.x0],
    )


class RequestBatcher:
    """Joins concurrent requests with the same `key` into batched runs of `run_batch`, one at a time."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Request]], Iterator[StepState]],
        key: Callable[[Any], Hashable],
        max_rows: int = 32,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.run_batch = run_batch
        self.key = key
        self.max_rows = max_rows
        self.runs = 0  # batched runs started, for tests and benchmarks
        self._pending: list[Request] = []
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def stream(self, settings: Any, rows: int) -> Iterator[StepState]:
        """This request's states, step by step; closing the iterator cancels the request."""
        req = Request(settings, rows)
        with self._lock:
            self._pending.append(req)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="mrdit-batcher", daemon=True)
                self._worker.start()
        try:
            while True:
                item = req.deliveries.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancelled.set()

    def _next_batch(self) -> list[Request]:
        """The oldest waiting request and every later one with its key that fits (under the lock)."""
        head = self._pending[0]
        key, batch, rows = self.key(head.settings), [], 0
        for req in list(self._pending):
            if req is head or (self.key(req.settings) == key and rows + req.rows <= self.max_rows):
                batch.append(req)
                rows += req.rows
                self._pending.remove(req)
        return batch

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._worker = None
                    return
                batch = self._next_batch()
            self._run(batch)

    def _run(self, batch: list[Request]) -> None:
        live = [r for r in batch if not r.cancelled.is_set()]
        try:
            if live:
                self.runs += 1
                with closing(self.run_batch(batch)) as states:
                    for state in states:
                        start = 0
                        for r in batch:
                            if not r.cancelled.is_set():
                                r.deliveries.put(rows_of(state, start, start + r.rows))
                            start += r.rows
                        if all(r.cancelled.is_set() for r in batch):
                            break
        except Exception as e:  # every request in the batch gets the error, the worker goes on
            for r in batch:
                r.deliveries.put(e)
        for r in batch:
            r.deliveries.put(_DONE)
