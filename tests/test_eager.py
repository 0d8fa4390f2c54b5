"""The eager network's fast paths give the plain paths' results, and bench/eager_rate.py measures them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from mrdit import load_model
from mrdit.layers import TDLayerNorm, TDRMSNorm


@pytest.fixture(scope="module", params=["mrdit-emoji-32", "baseline-emoji-32"])
def shipped(request):
    model = load_model(ROOT / "weights" / request.param)
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c.channels, c.image_size, c.image_size, generator=g)
    y = torch.tensor([0, 1, c.null_label])
    return model, x, y


def blocks(model):
    branches = model.branches if hasattr(model, "branches") else [model.trunk]
    return [blk for branch in branches for blk in branch.blocks]


def test_every_block_reads_contiguous_rows(shipped):
    """The patchify output is channels-last, so no block works on (B, g, g, D) views of NCHW memory."""
    model, x, y = shipped
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous())) for blk in blocks(model)]
    try:
        with torch.no_grad():
            model(x, torch.tensor([500.0]), y)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(blocks(model)) and all(seen)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-time", "per-sample-time"])
def test_forward_without_autograd_equals_the_recorded_one(shipped, shared):
    """Without autograd the residuals and gates are summed in place; not one value may change."""
    model, x, y = shipped
    t = torch.tensor([500.0]) if shared else torch.tensor([10.0, 500.0, 990.0])
    with torch.inference_mode():
        fast = model(x, t, y)
    plain = model(x, t, y)  # grad enabled: every intermediate stays as the autograd graph keeps it
    assert plain[0].requires_grad
    for a, b in zip(fast, plain, strict=True):
        assert torch.equal(a, b.detach())


def randomised(norm: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return norm


def test_td_layer_norm_with_one_time_matches_the_per_sample_path():
    norm = randomised(TDLayerNorm(24))
    x = torch.randn(4, 8, 8, 24)
    tau = torch.tensor([0.3])
    with torch.no_grad():
        one = norm(x, tau)  # a plain affine layer norm
        each = norm(x, tau.expand(4))  # normalise, then scale and shift per sample
    assert torch.allclose(one, each, atol=1e-6)
    gamma, beta = norm.weight(tau), norm.bias(tau)
    ref = torch.nn.functional.layer_norm(x, (24,), eps=1e-5) * gamma + beta
    assert torch.allclose(each, ref, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_td_rms_norm_is_the_released_formula(grad):
    """x / (sqrt(mean x^2) + eps) * gamma(tau), the epsilon added to the rms."""
    norm = randomised(TDRMSNorm(48))
    x = torch.randn(2, 16, 16, 48) * torch.logspace(-3, 2, 48)
    tau = torch.tensor([-0.5, 0.9])
    with torch.set_grad_enabled(grad):
        ours = norm(x, tau)
        ref = x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-8) * norm.scale(tau)[:, None, None]
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-7)


BENCH = [sys.executable, str(ROOT / "bench" / "eager_rate.py")]


def test_eager_rate_bench_writes_the_ratio_and_a_profile(tmp_path, tiny_model_dir):
    out = tmp_path / "eager.json"
    args = ["--model", str(tiny_model_dir), "--batch", "2", "4", "--repeats", "2", "--inner", "1"]
    args += ["--matmul-sizes", "64", "128", "--threads", "1", "--profile-top", "3", "--out", str(out)]
    r = subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["config"]["threads"] == 1 and res["config"]["batch_rows"] == [2, 4]
    assert res["matmul_size"] in (64, 128) and res["matmul_gflops"] > 0
    for rows in ("2", "4"):
        f = res["forward"][rows]
        assert f["images"] == int(rows) // 2 and f["gflop_per_forward"] > 0 and f["ratio"] > 0
    assert res["forward"]["4"]["gflop_per_forward"] == pytest.approx(2 * res["forward"]["2"]["gflop_per_forward"])
    assert len(res["profile"]["top_ops"]) == 3 and res["profile"]["rows"] == 2
    assert r.stdout.startswith("config: ") and "guided forward, 4 rows (2 images)" in r.stdout


def test_eager_rate_bench_rejects_an_odd_batch():
    r = subprocess.run([*BENCH, "--batch", "3"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "--batch" in r.stderr
