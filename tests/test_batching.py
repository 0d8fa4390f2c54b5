"""RequestBatcher: joining, caps, keys, cancellation and errors, with a fake sampler whose rows are
the request's own numbers (the real sampler's batch invariance is tested in test_batched_sampling.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mrdit.batching import RequestBatcher, rows_of
from mrdit.sampling import StepState


def _state(i: int, x: torch.Tensor) -> StepState:
    return StepState(i, 3, 1.0, 1.0, 0.0, 0.0, x, [x * 2], [x * 3], 1.0, i + 1)


class FakeSampler:
    """Yields 3 states whose rows are each request's `settings["value"]` plus the step; `gate` holds
    the first run until released, so that later requests queue up behind it."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.steps_run = 0
        self.fail_on = fail_on

    def __call__(self, requests):
        values = torch.cat([torch.full((r.rows, 1), float(r.settings["value"])) for r in requests])
        self.batches.append([r.settings["value"] for r in requests])
        for i in range(3):
            if len(self.batches) == 1:
                self.gate.wait(5)
            if self.fail_on == i:
                raise RuntimeError("boom")
            self.steps_run += 1
            yield _state(i, values + i)


def _key(settings):
    return settings["plan"]


def _collect(batcher, settings, rows, out, idx):
    out[idx] = [s.x.clone() for s in batcher.stream(settings, rows)]


def test_rows_of_slices_every_per_row_field():
    x = torch.arange(6.0).reshape(6, 1)
    part = rows_of(_state(0, x), 2, 5)
    assert part.x.flatten().tolist() == [2, 3, 4]
    assert part.eps[0].flatten().tolist() == [4, 6, 8] and part.x0[0].flatten().tolist() == [6, 9, 12]
    assert part.index == 0 and part.nfe == 1


def _behind_a_held_run(b: RequestBatcher, fake: FakeSampler, requests: list[tuple[str, int, int]]) -> dict:
    """Requests (plan, value, rows) sent one after another while the first run (value 0) is held at
    the gate, then released; every request's states by value."""
    out: dict[int, list] = {}
    first = threading.Thread(target=_collect, args=(b, {"plan": "a", "value": 0}, 1, out, 0))
    first.start()
    time.sleep(0.2)  # the first run is going (held at the gate); the others queue behind it
    threads = [threading.Thread(target=_collect, args=(b, {"plan": p, "value": v}, n, out, v)) for p, v, n in requests]
    for t in threads:
        t.start()
        time.sleep(0.05)
    time.sleep(0.2)
    fake.gate.set()
    for t in [first, *threads]:
        t.join(10)
    return out


def test_waiting_requests_with_one_plan_share_a_run_and_get_their_own_rows():
    fake = FakeSampler()
    b = RequestBatcher(fake, _key, max_rows=32)
    out = _behind_a_held_run(b, fake, [("a", v, 2) for v in (10, 20, 30)])
    assert fake.batches == [[0], [10, 20, 30]]
    for v in (10, 20, 30):
        assert [s.flatten().tolist() for s in out[v]] == [[v + i] * 2 for i in range(3)]
    assert b.runs == 2


def test_different_plans_and_the_row_cap_split_batches():
    fake = FakeSampler()
    b = RequestBatcher(fake, _key, max_rows=4)
    out = _behind_a_held_run(b, fake, [("a", 1, 3), ("b", 2, 1), ("a", 3, 1), ("a", 4, 1)])  # 3 + 1 rows fit
    assert fake.batches == [[0], [1, 3], [2], [4]]
    assert all(len(out[v]) == 3 for v in range(5))


def test_cancelling_one_request_leaves_the_others_of_its_batch_untouched():
    fake = FakeSampler()
    b = RequestBatcher(fake, _key)
    out: dict[int, list] = {}
    first = threading.Thread(target=_collect, args=(b, {"plan": "a", "value": 0}, 1, out, 0))
    first.start()
    time.sleep(0.2)
    stream = b.stream({"plan": "a", "value": 5}, 1)  # joins the second run with value 7
    got = []
    other = threading.Thread(target=_collect, args=(b, {"plan": "a", "value": 7}, 1, out, 7))

    def cancel_after_one():
        got.append(next(stream).x.clone())
        stream.close()  # the client pressed Stop

    canceller = threading.Thread(target=cancel_after_one)
    canceller.start()
    time.sleep(0.1)
    other.start()
    time.sleep(0.2)
    fake.gate.set()
    for t in (first, canceller, other):
        t.join(10)
    assert fake.batches == [[0], [5, 7]]
    assert [s.item() for s in got] == [5.0]
    assert [s.item() for s in out[7]] == [7.0, 8.0, 9.0]  # all three steps, as if alone


def test_a_run_whose_requests_all_cancel_stops_early():
    gate, steps_run = threading.Event(), []

    def sampler(requests):  # every step after the first waits at the gate, so the run cannot outpace the test
        for i in range(3):
            if i:
                gate.wait(5)
            steps_run.append(i)
            yield _state(i, torch.zeros(requests[0].rows, 1))

    b = RequestBatcher(sampler, _key)
    stream = b.stream({"plan": "a", "value": 1}, 1)
    next(stream)
    stream.close()  # the only request is cancelled while step 1 waits
    gate.set()
    deadline = time.time() + 5
    while b._worker is not None and time.time() < deadline:
        time.sleep(0.01)
    assert b._worker is None and steps_run in ([0], [0, 1])  # never step 2


def test_an_error_reaches_every_request_of_the_batch_and_the_batcher_goes_on():
    fake = FakeSampler(fail_on=1)
    fake.gate.set()
    b = RequestBatcher(fake, _key)
    with pytest.raises(RuntimeError, match="boom"):
        list(b.stream({"plan": "a", "value": 1}, 1))
    fake.fail_on = None
    assert len(list(b.stream({"plan": "a", "value": 2}, 1))) == 3


def test_max_rows_must_be_positive():
    with pytest.raises(ValueError, match="max_rows"):
        RequestBatcher(FakeSampler(), _key, max_rows=0)
