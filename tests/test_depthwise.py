"""The shifted-sum depthwise convolution (for compiled code) is the same function as the convolution."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from mrdit import build_model, get_preset
from mrdit.layers import ConvNeXtBlock, depthwise_shifted


def _grads(block: ConvNeXtBlock, x: torch.Tensor, tau: torch.Tensor, fn=None):
    y = (block if fn is None else fn)(x, tau)
    return [y, *torch.autograd.grad(y.square().sum(), [x, block.dwconv.weight, block.dwconv.bias])]


def test_shifted_sums_equal_the_convolution_with_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 11, 6, dtype=torch.float64)  # not square, odd sizes: padding on every side
    conv = torch.nn.Conv2d(6, 6, 5, padding=2, groups=6).double()
    want = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    got = depthwise_shifted(x, conv.weight, conv.bias)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12)


def test_block_with_shifted_depthwise_matches_compiled_too():
    torch.manual_seed(0)
    block = ConvNeXtBlock(16, 32, 7)
    x = torch.randn(2, 8, 8, 16, requires_grad=True)
    tau = torch.rand(2) * 2 - 1
    want = _grads(block, x, tau)
    block.depthwise = "shifted"
    for got in (_grads(block, x, tau), _grads(block, x, tau, torch.compile(block))):
        for a, b in zip(got, want, strict=True):
            assert rel_err(a, b) < 1e-5


def test_model_switches_depthwise_and_rejects_unknown_names():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    x = torch.randn(2, 3, 16, 16)
    t, y = torch.tensor([300.0, 700.0]), torch.tensor([0, 1])
    with torch.no_grad():
        want = model(x, t, y)
        model.set_depthwise("shifted")
        got = model(x, t, y)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want, strict=True))
    with pytest.raises(ValueError, match="depthwise must be one of"):
        model.set_depthwise("fft")
