"""FastForward: the inference wrapper used by the pipeline on GPUs (autocast, CUDA graph replay).

The CPU tests run everywhere; the CUDA tests need a GPU and check graph replay against the eager call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, rel_err

from mrdit import build_model, get_preset, load_model
from mrdit.compiled import FastForward
from mrdit.pipeline import Pipeline
from mrdit.sampling import noise_for_seeds, sample

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(model, batch: int, device="cpu"):
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.channels, c.image_size, c.image_size, generator=g).to(device)
    return x, torch.full((1,), 437.0, device=device), torch.arange(batch, device=device) % (c.num_classes - 1)


def test_float32_is_the_plain_forward():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    x, t, y = _inputs(model, 3)
    fast = FastForward(model, dtype=None)
    with torch.no_grad():
        want = model(x, t, y)
    got = fast(x, t, y)
    assert fast.config is model.config
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_bfloat16_stays_close_on_the_shipped_model():
    model = load_model(ROOT / "weights" / "mrdit-emoji-32")
    x, t, y = _inputs(model, 2)
    with torch.no_grad():
        want = model(x, t, y)
    got = FastForward(model, torch.bfloat16)(x, t, y)
    assert all(o.dtype == torch.float32 for o in got)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-2


def test_compiled_cpu_forward_matches_and_keeps_the_plain_path_for_the_rest(tiny_model_dir):
    model = load_model(tiny_model_dir)
    fast = FastForward(model, None, cuda_graphs=False, compile=True)
    x, t, y = _inputs(model, 3)
    with torch.no_grad():
        want = model(x, t, y)
    assert fast.compile_state == "not compiled"
    assert all(torch.equal(a, b) for a, b in zip(fast(x, t, y), want, strict=True))  # plain until compiled
    assert fast.warm_up(batches=(2,)) and fast.compile_state == "ready"
    got = fast(x, t, y)  # batch 3: covered by the batch-2 compile (dynamic batch)
    assert fast.calls["compiled"] == 1
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-5
    x1, _, y1 = _inputs(model, 1)
    fast(x1, t, y1)  # batch 1 is specialised by the compiler: the plain network, no recompile
    fast(x, torch.full((3,), 10.0), y)  # per-sample times were not compiled either
    assert fast.calls == {"plain": 3, "compiled": 1, "graph": 0}


def _broken_compiler(message: str):
    """Stands in for a compiled network whose compilation fails."""

    def broken(*args):
        raise RuntimeError(message)

    return broken


def test_failed_compile_keeps_the_plain_network(tiny_model_dir):
    model = load_model(tiny_model_dir)
    fast = FastForward(model, None, cuda_graphs=False, compile=True)
    fast._compiled = _broken_compiler("no C++ compiler found")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert not fast.warm_up()
    assert fast.compile_state.startswith("failed: RuntimeError")
    x, t, y = _inputs(model, 2)
    assert len(fast(x, t, y)) == len(model.config.branches) and fast.calls["plain"] == 1


def test_pipeline_compiles_in_the_background_with_the_same_images(tiny_model_dir):
    plain = Pipeline.from_pretrained(tiny_model_dir)
    want = plain.generate(["face", "heart"], [3, 4], steps=6).arrays
    pipe = Pipeline.from_pretrained(tiny_model_dir)
    thread = pipe.compile_in_background(batches=(2,))
    thread.join(timeout=600)
    assert pipe.net.compile_state == "ready"
    got = pipe.generate(["face", "heart"], [3, 4], steps=6).arrays
    assert pipe.net.calls["compiled"] == 6
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # uint8 images: at most rounding apart


def test_pipeline_compile_true_waits_for_the_compile_on_the_cpu(tiny_model_dir):
    pipe = Pipeline.from_pretrained(tiny_model_dir, compile=True)
    assert isinstance(pipe.net, FastForward) and pipe.net.compile_state == "ready"
    pipe.generate(["face", "heart"], [3, 4], steps=2)
    assert pipe.net.calls["compiled"] == 2 and pipe.net.calls["plain"] == 0


def test_rejects_unknown_dtypes():
    with pytest.raises(ValueError, match="dtype"):
        FastForward(build_model(get_preset("tiny")), torch.int8)


@cuda
def test_cuda_graph_replay_matches_eager_and_survives_new_inputs():
    torch.manual_seed(0)
    model = build_model(get_preset("emoji-32"), device="cuda").eval()
    eager = FastForward(model, torch.bfloat16, cuda_graphs=False)
    graphed = FastForward(model, torch.bfloat16, cuda_graphs=True)
    for batch in (2, 8, 2):  # a new shape captures a new graph; an old shape replays its graph
        x, t, y = _inputs(model, batch, "cuda")
        first = graphed(x, t, y)
        x2 = torch.randn_like(x)
        second = graphed(x2, t * 0.5, y)  # replaying must not overwrite outputs already returned
        for a, b in zip(first, eager(x, t, y), strict=True):
            assert rel_err(a, b) < 1e-3
        for a, b in zip(second, eager(x2, t * 0.5, y), strict=True):
            assert rel_err(a, b) < 1e-3
    assert len(graphed._graphs) == 2


@cuda
def test_cuda_graphs_of_the_compiled_network_match_eager_and_fall_back():
    torch.manual_seed(0)
    model = build_model(get_preset("emoji-32"), device="cuda").eval()
    eager = FastForward(model, torch.bfloat16, cuda_graphs=False)
    compiled = FastForward(model, torch.bfloat16, cuda_graphs=True, compile=True)
    x, t, y = _inputs(model, 4, "cuda")
    for a, b in zip(compiled(x, t, y), eager(x, t, y), strict=True):
        assert rel_err(a, b) < 2e-2  # fused bf16 kernels round differently
    assert compiled.compile_state == "ready" and compiled.calls["graph"] == 1

    failing = FastForward(model, torch.bfloat16, cuda_graphs=True, compile=True)
    failing._compiled = _broken_compiler("no Triton")
    with pytest.warns(UserWarning, match="no Triton"):
        out = failing(x, t, y)
    assert failing.compile_state.startswith("failed") and rel_err(out[-1], eager(x, t, y)[-1]) < 1e-3


@cuda
def test_cuda_sampling_and_pipeline_match_the_cpu():
    model = load_model(ROOT / "weights" / "mrdit-emoji-32")
    noise, _ = noise_for_seeds([0, 1], (3, 32, 32))
    labels = torch.tensor([0, 5])
    want = sample(model, noise, labels, sampler="dpm++2m", steps=10, guidance=4.0)
    gpu = load_model(ROOT / "weights" / "mrdit-emoji-32", device="cuda")
    got = sample(
        FastForward(gpu, torch.bfloat16), noise.cuda(), labels.cuda(), sampler="dpm++2m", steps=10, guidance=4.0
    )
    # bf16 rounding, amplified by guidance 4 over 10 steps: 0.231 on an H100 with the shipped weights
    # (0.205 with CPU bf16 autocast; 0.05-0.14 at 25 steps). A broken path is off by ~1.
    assert rel_err(got.cpu(), want) < 0.35
    pipe = Pipeline.from_pretrained(ROOT / "weights" / "mrdit-emoji-32", device="cuda")
    assert isinstance(pipe.net, FastForward)
    result = pipe.generate(["face", "heart"], [0, 1], steps=10)
    assert len(result.images) == 2 and result.images[0].size == (32, 32)


@cuda
def test_cuda_pipeline_with_compile_captures_the_compiled_network():
    plain = Pipeline.from_pretrained(ROOT / "weights" / "mrdit-emoji-32", device="cuda")
    pipe = Pipeline.from_pretrained(ROOT / "weights" / "mrdit-emoji-32", device="cuda", compile=True)
    want = plain.generate(["face", "heart"], [0, 1], steps=10).arrays
    got = pipe.generate(["face", "heart"], [0, 1], steps=10).arrays
    assert pipe.net.compile and pipe.net.compile_state == "ready" and pipe.net.calls["graph"] == 10
    # Both bf16; the fusions round differently and 10 guided steps amplify it: 7.1 levels on an H100.
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 12


def test_warm_up_when_idle_waits_until_the_network_has_rested(monkeypatch):
    """The idle compile starts only after `idle_s` without a call: calls keep pushing it back."""
    import time

    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    fast = FastForward(model, dtype=None, cuda_graphs=False, compile=True)
    started = []
    monkeypatch.setattr(fast, "warm_up", lambda batches: started.append(time.monotonic()))
    x, t, y = _inputs(model, 2)
    thread = fast.warm_up_when_idle(0.6)
    busy_until = time.monotonic() + 1.2
    while time.monotonic() < busy_until:  # a request's network calls, every 50 ms
        fast(x, t, y)
        time.sleep(0.05)
    assert not started, "compiled while the network was busy"
    thread.join(5)
    assert len(started) == 1 and started[0] - busy_until >= 0.5
