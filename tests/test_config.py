"""Configuration: validation names the field, presets are consistent, JSON round-trips; fuzzed."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrdit import PRESETS, BranchSpec, ConfigError, ModelConfig, build_model, get_preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = get_preset(name)
    again = ModelConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_unknown_preset_lists_known():
    with pytest.raises(KeyError, match="dimr-xl-2r"):
        get_preset("dimr-xxl")


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(channels=0), "channels"),
        (dict(num_classes=1), "num_classes"),
        (dict(null_label=99), "null_label"),
        (dict(loss_weights=(1.0,)), "loss_weights"),
        (dict(image_size=30), r"branches\[0\].grid"),
        (dict(norm="layernorm"), "norm"),
        (dict(class_names=("a",)), "class_names"),
    ],
)
def test_model_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        get_preset("tiny").replace(**change)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(blocks=4), "blocks"),
        (dict(heads=3), "heads"),
        (dict(width=0), "width"),
        (dict(kind="mlp"), "kind"),
    ],
)
def test_branch_errors_name_the_field(kw, field):
    base = dict(kind="transformer", width=32, blocks=3, grid=4, patch=4, mlp_width=64, heads=2)
    with pytest.raises(ConfigError, match=f"^{field}"):
        BranchSpec(**(base | kw))


def test_unknown_json_field_is_refused():
    d = get_preset("tiny").to_dict() | {"colour": "red"}
    with pytest.raises(ConfigError, match="colour"):
        ModelConfig.from_dict(d)


branch_kw = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["transformer", "convnext", "mlp", ""]),
        "width": st.integers(-2, 64),
        "blocks": st.integers(-1, 6),
        "grid": st.integers(0, 9),
        "patch": st.integers(0, 5),
        "mlp_width": st.integers(-1, 64),
        "heads": st.integers(-1, 5),
        "kernel": st.integers(-1, 8),
    }
)


@settings(max_examples=200, deadline=None)
@given(branch_kw)
def test_fuzz_branch_spec_valid_or_clear_error(kw):
    try:
        BranchSpec(**kw)
    except ConfigError as e:
        assert str(e).split(":")[0] in kw  # the message starts with the offending field


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.sampled_from([8, 16]), st.integers(2, 6))
def test_fuzz_valid_configs_build_and_run(n_branches, channels, size, classes):
    import torch

    g0 = size // 2 ** (n_branches - 1)
    branches = [BranchSpec("transformer", 16, 1, g0, size // g0, 32, heads=2)]
    for k in range(1, n_branches):
        g = g0 * 2**k
        branches.append(BranchSpec("convnext", 8, 1, g, size // g, 16, kernel=3))
    cfg = ModelConfig(branches=tuple(branches), channels=channels, image_size=size, num_classes=classes)
    m = build_model(cfg)
    outs = m(torch.zeros(2, channels, size, size), torch.tensor([1.0, 999.0]), torch.tensor([0, classes - 1]))
    assert [o.shape[-1] for o in outs] == [b.grid for b in branches]
