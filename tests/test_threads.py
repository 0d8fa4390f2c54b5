"""mrdit.threads: one OpenMP thread for the calling thread only, and for every step of a generator
whichever thread resumes it."""

from __future__ import annotations

import threading

import pytest
import torch

from mrdit.threads import _libgomp, omp_limited, one_omp_thread

pytestmark = pytest.mark.skipif(_libgomp() is None, reason="this PyTorch does not run on libgomp")


@pytest.fixture(autouse=True)
def two_threads():
    """The test suite runs on one thread (conftest); these tests need PyTorch's setting to be more."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _in_thread(fn):
    out = []
    th = threading.Thread(target=lambda: out.append(fn()))
    th.start()
    th.join(30)
    return out[0]


def test_the_limit_holds_in_its_thread_only():
    assert _in_thread(torch.get_num_threads) == 2
    assert _in_thread(lambda: (one_omp_thread(), torch.get_num_threads())) == (True, 1)
    assert _in_thread(torch.get_num_threads) == 2  # a fresh thread keeps PyTorch's setting
    assert torch.get_num_threads() == 2  # and so does this one


def test_a_limited_generator_is_limited_at_every_step_in_any_thread():
    @omp_limited
    def counts(n):
        for _ in range(n):
            yield torch.get_num_threads()

    gen = counts(3)
    seen = [_in_thread(lambda: next(gen)) for _ in range(3)]  # each step resumed on a new thread
    assert seen == [1, 1, 1]
    with pytest.raises(StopIteration):
        next(gen)


def test_a_limited_function_and_a_closed_generator():
    closed = []

    @omp_limited
    def steps():
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    assert _in_thread(omp_limited(torch.get_num_threads)) == 1
    gen = steps()
    assert next(gen) == 1
    gen.close()
    assert closed == [True]  # closing the wrapper closes the generator it wraps
