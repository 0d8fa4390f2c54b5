"""Graph replay from several threads at once: each caller gets the outputs of its own inputs.

A captured graph has one input and one output buffer per shape; the stand-in graph below reads its
input buffer, yields the interpreter (as a real replay and copy-out leave time for another thread to
run), then writes its output buffer, so any interleaving of two callers shows up as a wrong output.
"""

from __future__ import annotations

import threading
import time

import torch

from mrdit import build_model, get_preset
from mrdit.compiled import FastForward, _Graph


class StandInGraph:
    """Replays "outs = 2 x + t + y" from the buffers it was captured with, slowly."""

    def __init__(self, g: _Graph) -> None:
        self.g = g

    def replay(self) -> None:
        x = self.g.x.clone()
        time.sleep(0.002)  # another caller may now overwrite the input buffer
        value = 2 * x + self.g.t.view(-1, 1, 1, 1) + self.g.y.view(-1, 1, 1, 1).float()
        time.sleep(0.002)
        self.g.outs[0].copy_(value)


def _fast_with_stand_in_graphs() -> FastForward:
    fast = FastForward(build_model(get_preset("tiny")), dtype=None)

    def capture(x, t, y):
        g = _Graph(None, x.clone(), t.clone(), y.clone(), [torch.zeros_like(x)])
        g.graph = StandInGraph(g)
        return g

    fast._capture = capture
    return fast


def _hammer(fast: FastForward, threads: int, calls: int) -> list[str]:
    errors: list[str] = []
    start = threading.Barrier(threads)

    def user(k: int) -> None:
        start.wait()
        for i in range(calls):
            x = torch.full((2, 3, 4, 4), float(100 * k + i))
            t, y = torch.full((1,), float(k)), torch.tensor([k, k])
            want = 2 * x + k + k
            got = fast._graph_call(x, t, y)[0]
            if not torch.equal(got, want):
                errors.append(f"user {k} call {i}: got {got.flatten()[0].item()}, want {want.flatten()[0].item()}")

    pool = [threading.Thread(target=user, args=(k,)) for k in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return errors


def test_concurrent_replays_of_one_graph_do_not_mix_users():
    fast = _fast_with_stand_in_graphs()
    assert _hammer(fast, threads=4, calls=15) == []
    assert len(fast._graphs) == 1 and fast.calls["graph"] == 60  # one shape: one graph, shared by all


def test_the_stand_in_exposes_interleaving_without_the_lock():
    """The check above can fail: with the lock replaced by a no-op the same callers get mixed outputs."""
    fast = _fast_with_stand_in_graphs()

    class NoLock:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fast._lock = NoLock()
    assert _hammer(fast, threads=4, calls=15)
