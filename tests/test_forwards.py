"""SharedForward: concurrent forwards joined into one batch on one network thread; each caller gets its
own rows at its own time step, a bad call fails alone, an error reaches its batch only, and pipelines
that share their forwards give every request the images it gets alone, for every sampler, with the
network traced or not. TracedNetwork: the network's outputs, one checked trace per kind of call, and
the plain network wherever a trace fails or disagrees."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import pytest
import torch
from torch import nn

from mrdit.forwards import SharedForward, TracedNetwork
from mrdit.pipeline import Pipeline
from mrdit.sampling import SAMPLERS
from mrdit.settings import Settings
from mrdit.threads import _libgomp


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.from_pretrained(tiny_model_dir)


def _inputs(cfg, rows: int, seed: int, step: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    y = torch.randint(0, cfg.num_classes - 1, (rows,), generator=g)
    return x, torch.tensor([step]), y


class Gate:
    """A network whose first forward waits until released, so that later calls queue up behind it."""

    def __init__(self, model) -> None:
        self.model, self.config = model, model.config
        self.release = threading.Event()
        self.batches: list[int] = []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        if len(self.batches) == 1:
            self.release.wait(10)
        return self.model(x, t, y)


def _concurrently(shared, calls) -> dict[int, list[torch.Tensor]]:
    """The first call starts (and blocks at the gate), the others queue up; then the gate opens."""
    out: dict[int, list[torch.Tensor]] = {}
    errors: dict[int, Exception] = {}

    def go(i, args):
        try:
            out[i] = shared(*args)
        except Exception as e:
            errors[i] = e

    threads = [threading.Thread(target=go, args=(i, a)) for i, a in enumerate(calls)]
    for th in threads:
        th.start()
        time.sleep(0.1)
    shared.net.release.set()
    for th in threads:
        th.join(30)
    return out | errors


def test_waiting_calls_join_one_forward_and_get_their_own_rows_at_their_own_steps(pipe):
    net = Gate(pipe.model)
    shared = SharedForward(net, pipe.config, max_rows=64)
    calls = [_inputs(pipe.config, 2, 0, 500.0), _inputs(pipe.config, 3, 1, 100.0), _inputs(pipe.config, 1, 2, 900.0)]
    got = _concurrently(shared, calls)
    assert net.batches == [2, 4], "the calls waiting behind the first did not join one forward"
    assert (shared.forwards, shared.calls) == (2, 3)
    with torch.no_grad():
        for i, (x, t, y) in enumerate(calls):
            alone = pipe.model(x, t, y)
            assert len(got[i]) == len(alone)
            for a, b in zip(got[i], alone):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_oldest_call_goes_first_and_smaller_later_ones_fill_the_room_left(pipe):
    cfg = pipe.config

    class Tags:  # records which caller's rows (x filled with the caller's tag) each forward held
        config = cfg

        def __init__(self):
            self.release, self.batches = threading.Event(), []

        def __call__(self, x, t, y):
            self.batches.append([int(v) for v in x[:, 0, 0, 0]])
            if len(self.batches) == 1:
                self.release.wait(10)
            return [x.clone()]

    def call(rows, tag):
        x = torch.full((rows, cfg.channels, cfg.image_size, cfg.image_size), float(tag))
        return x, torch.tensor([1.0]), torch.zeros(rows, dtype=torch.long)

    net = Tags()
    shared = SharedForward(net, cfg, max_rows=10)
    calls = [call(1, 0), call(8, 1), call(8, 2), call(2, 3), call(12, 4)]
    got = _concurrently(shared, calls)
    assert net.batches[0] == [0]
    # 8 rows first (the oldest waiting), then the 2-row call that still fits; the other 8 next; 12 alone.
    assert net.batches[1:] == [[1] * 8 + [3] * 2, [2] * 8, [4] * 12]
    for i, (x, _, _) in enumerate(calls):
        assert torch.equal(got[i][0], x), f"call {i} got rows that are not its own"


def test_calls_made_first_go_ahead_of_older_ones_in_forwards_of_their_own(pipe):
    cfg = pipe.config

    class Tags:  # records which caller's rows (x filled with the caller's tag) each forward held
        config = cfg

        def __init__(self):
            self.release, self.batches = threading.Event(), []

        def __call__(self, x, t, y):
            self.batches.append([int(v) for v in x[:, 0, 0, 0]])
            if len(self.batches) == 1:
                self.release.wait(10)
            return [x.clone()]

    def call(rows, tag):
        x = torch.full((rows, cfg.channels, cfg.image_size, cfg.image_size), float(tag))
        return x, torch.tensor([1.0]), torch.zeros(rows, dtype=torch.long)

    net = Tags()
    shared = SharedForward(net, cfg, max_rows=10)
    calls = [call(1, 0), call(4, 1), call(2, 2), call(4, 3), call(2, 4)]
    firsts = {2, 4}  # step-mode clicks, say: made inside `first()`
    out: dict[int, list[torch.Tensor]] = {}

    def go(i, args):
        if i in firsts:
            with shared.first():
                out[i] = shared(*args)
        else:
            out[i] = shared(*args)

    threads = [threading.Thread(target=go, args=(i, a)) for i, a in enumerate(calls)]
    for th in threads:
        th.start()
        time.sleep(0.1)
    net.release.set()
    for th in threads:
        th.join(30)
    # The running forward ends; then the two first calls, alone, although 1 and 3 waited longer; then 1 and 3.
    assert net.batches == [[0], [2] * 2 + [4] * 2, [1] * 4 + [3] * 4]
    for i, (x, _, _) in enumerate(calls):
        assert torch.equal(out[i][0], x), f"call {i} got rows that are not its own"
    # The block ends with the thread's calls back in line, and nesting keeps the outer block's setting.
    with shared.first():
        with shared.first():
            pass
        assert shared._local.first
    assert not shared._local.first


def test_pipeline_forwards_first_is_a_plain_block_without_a_shared_thread(tiny_model_dir):
    pipe = Pipeline.from_pretrained(tiny_model_dir)
    with pipe.forwards_first():  # no shared thread: nothing to reorder, and nothing fails
        pass
    shared = pipe.share_forwards(max_rows=8)
    with pipe.forwards_first():
        assert shared._local.first


def test_a_bad_call_fails_alone_and_an_error_reaches_its_batch_only(pipe):
    shared = SharedForward(pipe.model, pipe.config)
    x, t, y = _inputs(pipe.config, 2, 0, 500.0)
    with pytest.raises(ValueError, match="x must have shape"):
        shared(x[:, :, :-1], t, y)

    class Fails:
        config = pipe.config

        def __init__(self):
            self.n = 0

        def __call__(self, x, t, y):
            self.n += 1
            if self.n == 1:
                raise RuntimeError("out of memory, say")
            return pipe.model(x, t, y)

    shared = SharedForward(Fails(), pipe.config)
    with pytest.raises(RuntimeError, match="out of memory"):
        shared(x, t, y)
    with torch.no_grad():
        torch.testing.assert_close(shared(x, t, y)[0], pipe.model(x, t, y)[0])  # the thread went on


def test_max_rows_must_be_positive(pipe):
    with pytest.raises(ValueError, match="max_rows"):
        SharedForward(pipe.model, pipe.config, max_rows=0)
    with pytest.raises(ValueError, match="omp_threads"):
        SharedForward(pipe.model, pipe.config, omp_threads=0)
    with pytest.raises(ValueError, match="nice"):
        SharedForward(pipe.model, pipe.config, nice=20)


def test_a_first_lane_call_does_not_wait_for_the_running_forward(pipe):
    """With `first_lane`, a call made in `first()` runs on a thread of its own while a long request's
    forward is still running, and gets its own rows."""
    net = Gate(pipe.model)
    shared = SharedForward(net, pipe.config, first_lane=True)
    long_call = threading.Thread(target=shared, args=_inputs(pipe.config, 4, 0, 500.0))
    long_call.start()
    for _ in range(100):  # until the long call's forward is running (and held at the gate)
        if net.batches:
            break
        time.sleep(0.01)
    x, t, y = _inputs(pipe.config, 2, 1, 100.0)
    got: list[torch.Tensor] = []
    click = threading.Thread(target=lambda: got.extend(_first(shared, x, t, y)))
    click.start()
    click.join(10)
    assert not click.is_alive() and got, "the first call waited for the running forward"
    assert not net.release.is_set() and long_call.is_alive()
    net.release.set()
    long_call.join(10)
    assert net.batches == [4, 2] and (shared.forwards, shared.calls) == (2, 2)
    with torch.no_grad():
        for a, b in zip(got, pipe.model(x, t, y), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _first(shared: SharedForward, x, t, y) -> list[torch.Tensor]:
    with shared.first():
        return shared(x, t, y)


def test_network_threads_run_on_their_openmp_threads_and_the_long_requests_one_at_lower_priority(pipe):
    """`omp_threads=1`: the first lane's loops on its thread alone, and the main lane's too while the
    first lane is busy (PyTorch's setting again once it has been idle for `BUSY_S`); `nice`: the main
    lane's thread (the long requests') runs at a higher nice value than the caller's, the first lane's
    does not."""
    seen: list[tuple[str, int, int]] = []

    class Records:
        config = pipe.config

        def __call__(self, x, t, y):
            tid = threading.get_native_id()
            seen.append((threading.current_thread().name, torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, tid)))
            return pipe.model(x, t, y)

    shared = SharedForward(Records(), pipe.config, first_lane=True, omp_threads=1, nice=3)
    x, t, y = _inputs(pipe.config, 2, 0, 500.0)
    shared(x, t, y)  # the first lane idle: PyTorch's setting
    _first(shared, x, t, y)
    shared(x, t, y)  # within BUSY_S of a first call: one thread
    shared.BUSY_S = 0.0
    shared(x, t, y)  # idle again
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert [name for name, _, _ in seen] == ["mrdit-network", "mrdit-network-first", "mrdit-network", "mrdit-network"]
    lowered = min(19, mine + 3) if sys.platform.startswith("linux") else mine  # Linux only
    assert [nice for _, _, nice in seen] == [lowered, mine, lowered, lowered]
    full = torch.get_num_threads()
    if _libgomp() is not None:  # PyTorch on libgomp (Linux): the limits are in force
        assert [n for _, n, _ in seen] == [full, 1, 1, full]


@pytest.mark.parametrize(("trace", "lanes"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_requests_sharing_forwards_get_the_images_they_get_alone(tiny_model_dir, sampler, trace, lanes):
    """Three requests at once with other samplers, step counts, guidance and seeds (stochastic samplers
    with per-seed generators): each gets its own run's images, the forwards were shared, and one request
    stopped after its first step leaves the others as they were. With `lanes`, the second request's
    forwards go first, on the first lane's thread, as a step-mode click's do in the app."""
    plain = Pipeline.from_pretrained(tiny_model_dir)
    shared = Pipeline.from_pretrained(tiny_model_dir)
    shared.share_forwards(max_rows=64, trace=trace, first_lane=lanes, omp_threads=1 if lanes else None, nice=5 if lanes else 0)
    requests = [
        Settings(sampler, 6, 3.0, labels=(1, 0), seeds=(5, 6)),
        Settings("ddim", 4, 1.0, labels=(0,), seeds=(7,)),
        Settings(sampler, 5, 5.0, labels=(0, 0, 1), seeds=(5, 8, 9)),
        Settings("dpm++2m", 6, 2.0, labels=(1,), seeds=(3,)),  # stopped after its first step
    ]
    out: dict[int, list[torch.Tensor]] = {}
    start = threading.Barrier(len(requests))

    def go(i, s):
        start.wait()
        out[i] = []
        stream = shared.stream(s, previews=False)
        first = shared.forwards_first() if i == 1 else contextlib.nullcontext()
        with first:
            steps = list(stream) if i == 1 else stream
        for state, _ in steps:
            out[i].append(state.x.clone())
            if i == 3:
                stream.close()
                break

    threads = [threading.Thread(target=go, args=(i, s)) for i, s in enumerate(requests)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert shared.shared.forwards < shared.shared.calls, "no forward was shared"
    for i, s in enumerate(requests[:3]):
        alone = [state.x for state, _ in plain.stream(s, previews=False)]
        assert len(out[i]) == len(alone)
        for a, b in zip(out[i], alone):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(out[3]) == 1
    if trace:
        assert any(v is not None for v in shared.shared.net.traces.values()), "nothing ran traced"


def test_traced_network_gives_the_network_outputs_with_one_checked_trace_per_kind(pipe):
    traced = TracedNetwork(pipe.model)
    with torch.no_grad():
        for rows in (1, 3, 8):
            x, t, y = _inputs(pipe.config, rows, rows, 300.0)
            for tt in (t, torch.linspace(5.0, 995.0, rows), t.reshape(())):
                got, want = traced(x, tt, y), pipe.model(x, tt, y)
                assert len(got) == len(want) == len(pipe.config.branches)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # A shared step (0-d or (1,)) and a step per row: two kinds, each traced once and kept.
    assert len(traced.traces) == 2 and all(v is not None for v in traced.traces.values())


class BakedBatch(nn.Module):
    """A network whose trace bakes its batch size in (a Python int from the shape): wrong at any other."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        return [x * torch.arange(int(x.shape[0]), dtype=x.dtype).reshape(-1, 1, 1, 1)]


class NotTraceable(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    def forward(self, x, t, y):
        return [x + 1.0, {"not": "a tensor"}]


def test_traced_network_falls_back_where_a_trace_is_wrong_or_fails(pipe, caplog):
    cfg = pipe.config
    x, t, y = _inputs(cfg, 3, 0, 300.0)
    baked = BakedBatch(cfg)
    traced = TracedNetwork(baked)
    for rows in (3, 5):  # traced at 3 rows and checked at 4: the check catches it, every call is plain
        xr = torch.cat([x, x])[:rows]
        out = traced(xr, t, torch.zeros(rows, dtype=torch.long))
        torch.testing.assert_close(out[0], baked(xr, t, y)[0])
    assert traced.traces == {(True, t.dtype, y.dtype): None}
    assert "runs untraced" in caplog.text

    seen = []
    fallback = TracedNetwork(NotTraceable(cfg), fallback=lambda *a: seen.append(a) or ["plain"])
    assert fallback(x, t, y) == ["plain"] and len(seen) == 1
