"""Requests batched together (Pipeline.stream_batched) get exactly the images and steps they get alone,
for every sampler, the stochastic ones included (per-seed generators), and a cancelled request does not
disturb the others of its batch."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mrdit.batching import RequestBatcher
from mrdit.pipeline import Pipeline, plan_key
from mrdit.sampling import SAMPLERS, iterate_rows, noise_for_seeds
from mrdit.settings import Settings


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.from_pretrained(tiny_model_dir)


def _alone(pipe: Pipeline, s: Settings) -> list[torch.Tensor]:
    return [state.x.clone() for state, _ in pipe.stream(s, previews=False)]


def _batched(pipe: Pipeline, requests: list[Settings], cancel: int | None = None) -> dict[int, list[torch.Tensor]]:
    """Run `requests` concurrently and check that they shared one batched run: the batcher's first run
    (of the first request) is held at a gate until all the others are waiting, so they join the next."""
    release = threading.Event()
    runs: list[int] = []

    def gated(batch):
        runs.append(len(batch))
        if len(runs) == 1:
            release.wait(10)
        yield from pipe._run_requests(batch)

    pipe._batcher = RequestBatcher(gated, plan_key)
    requests = [Settings("ddim", 2, labels=(0,), seeds=(99,)), *requests]
    out: dict[int, list[torch.Tensor]] = {}

    def go(i: int, s: Settings) -> None:
        stream = pipe.stream_batched(s, previews=False)
        out[i] = []
        for state, _ in stream:
            out[i].append(state.x.clone())
            if i - 1 == cancel:
                stream.close()  # Stop after the first step
                break

    threads = [threading.Thread(target=go, args=(i, s)) for i, s in enumerate(requests)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    release.set()
    for t in threads:
        t.join(60)
    assert runs == [1, len(requests) - 1], "the requests did not share one run"
    return {i - 1: v for i, v in out.items() if i > 0}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_batched_request_gets_exactly_what_it_gets_alone(pipe, sampler):
    requests = [
        Settings(sampler, 4, 3.0, labels=(1, 0), seeds=(5, 6)),
        Settings(sampler, 4, 1.7, labels=(0,), seeds=(7,)),
        Settings(sampler, 4, 5.0, labels=(0, 0, 1), seeds=(5, 8, 9)),  # seed 5 again, another class
    ]
    assert len({plan_key(s) for s in requests}) == 1
    got = _batched(pipe, requests)
    for i, s in enumerate(requests):
        alone = _alone(pipe, s)
        assert len(got[i]) == len(alone)
        for a, b in zip(got[i], alone):
            assert torch.equal(a, b), f"request {i} differs from its run alone ({sampler})"


def test_cancelling_one_request_does_not_disturb_its_batch(pipe):
    requests = [
        Settings("dpm++2m-sde", 5, 3.0, labels=(1,), seeds=(11,)),
        Settings("dpm++2m-sde", 5, 2.0, labels=(1, 0), seeds=(12, 13)),
        Settings("dpm++2m-sde", 5, 4.0, labels=(0,), seeds=(14,)),
    ]
    got = _batched(pipe, requests, cancel=1)
    assert len(got[1]) == 1
    for i in (0, 2):
        alone = _alone(pipe, requests[i])
        assert len(got[i]) == 5
        assert all(torch.equal(a, b) for a, b in zip(got[i], alone))


def test_power_cosine_guidance_rows_match_their_runs_alone(pipe):
    requests = [
        Settings("dpm++2m", 4, 3.0, "power-cosine", 2.0, labels=(1,), seeds=(3,)),
        Settings("dpm++2m", 4, 6.0, "power-cosine", 2.0, labels=(0,), seeds=(4,)),
    ]
    got = _batched(pipe, requests)
    for i, s in enumerate(requests):
        assert all(torch.equal(a, b) for a, b in zip(got[i], _alone(pipe, s)))


def test_plan_key_keeps_unguided_and_differently_planned_requests_apart():
    base = Settings("ddim", 4, 3.0, labels=(0,), seeds=(0,))
    assert plan_key(base) == plan_key(Settings("ddim", 4, 2.0, labels=(1,), seeds=(5,)))
    assert plan_key(base) != plan_key(Settings("ddim", 4, 1.0, labels=(0,), seeds=(0,)))
    assert plan_key(base) != plan_key(Settings("ddim", 5, 3.0, labels=(0,), seeds=(0,)))
    assert plan_key(base) != plan_key(Settings("ddpm", 4, 3.0, labels=(0,), seeds=(0,)))


def test_iterate_rows_checks_its_rows(pipe):
    noise, gens = noise_for_seeds([0, 1], (3, pipe.config.image_size, pipe.config.image_size))
    opts = Settings("ddim", 2, labels=(0, 1), seeds=(0, 1))
    with pytest.raises(ValueError, match="one label and one guidance weight"):
        next(iterate_rows(pipe.model, noise, torch.tensor([0, 1]), opts, [2.0], gens))
    with pytest.raises(ValueError, match="guidance"):
        next(iterate_rows(pipe.model, noise, torch.tensor([0, 1]), opts, [2.0, -1.0], gens))
