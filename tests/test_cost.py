"""Parameters and compute per image, and the matched DiMR/baseline pair's budgets."""

from __future__ import annotations

import torch

from mrdit import build_model
from mrdit.cost import Cost, forward_flops, matched, model_cost, ratios


def test_forward_flops_counts_a_linear_layer_exactly():
    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = build_model("tiny").config
            self.lin = torch.nn.Linear(3 * 16 * 16, 10, bias=False)

        def forward(self, x, t, y):
            return self.lin(x.flatten(1))

    # one [B, 768] x [768, 10] matmul: 2 * B * 768 * 10 FLOPs
    assert forward_flops(Probe(), batch=3) == 2 * 3 * 768 * 10


def test_compute_per_image_does_not_depend_on_the_batch():
    model = build_model("tiny").eval()
    assert forward_flops(model, batch=4) == 4 * forward_flops(model, batch=1)


def test_the_matched_pair_is_within_ten_percent_in_parameters_and_compute():
    dimr, base = model_cost(build_model("pair-dimr-32")), model_cost(build_model("pair-baseline-32"))
    params, flops = ratios(dimr, base)
    assert matched(dimr, base, 0.1), (params, flops)
    assert 0.95 <= params <= 1.05 and 0.95 <= flops <= 1.05, (params, flops)
    # the old shipped pair was matched in compute only: 0.53M against 1.69M parameters
    assert not matched(model_cost(build_model("baseline-32")), model_cost(build_model("emoji-32")), 0.1)


def test_matched_needs_both_parameters_and_compute():
    a = Cost(1_000_000, 100e6)
    assert matched(a, Cost(1_050_000, 95e6))
    assert not matched(a, Cost(1_000_000, 130e6))
    assert not matched(a, Cost(700_000, 100e6))
