"""How a benchmark case runs: autocast, regional compilation, a compiled backward's memory budget,
compiler settings, and the `BATCH:MODE[@BUDGET]` training cases."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from mrdit.training import compile_for_training, compile_regions

TRAIN_MODES = ("plain", "ckpt", "compile", "compile+ckpt", "blocks", "blocks+ckpt")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on the device, or nothing for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def memory_budget_scope(memory_budget: float | None) -> Iterator[None]:
    """For the duration, a compiled backward keeps only this fraction (0..1] of the activations and
    recomputes the rest (torch._functorch.config.activation_memory_budget). Compiled code is not
    guarded on the budget, so compiled code is dropped on entry and exit."""
    if memory_budget is None:
        yield
        return
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    try:
        with functorch_config.patch(activation_memory_budget=memory_budget):
            yield
    finally:
        torch._dynamo.reset()


@contextlib.contextmanager
def compiled_blocks(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Regional compilation for the duration: each block, skip join and upsampler compiled in place
    (identical modules share the compiled code), back to the plain forward afterwards."""
    if not enabled:
        yield
        return
    compile_for_training(model, "blocks")
    try:
        yield
    finally:
        for blk in compile_regions(model):
            blk._compiled_call_impl = None  # nn.Module.compile is in place


class TrainCase(NamedTuple):
    """One training case: batch, mode (one of TRAIN_MODES) and the compiled backward's memory budget."""

    batch: int
    mode: str
    budget: float | None = None

    @property
    def checkpointing(self) -> bool:
        return self.mode.endswith("ckpt")

    @property
    def compiled(self) -> bool | str:
        """False, True (the whole model through torch.compile) or "blocks" (regional compilation)."""
        return {"compile": True, "blocks": "blocks"}.get(self.mode.split("+")[0], False)

    @property
    def spec(self) -> str:
        return f"{self.batch}:{self.mode}" + (f"@{self.budget:g}" if self.budget else "")

    @property
    def key(self) -> str:
        """The case's name in the results, e.g. b128_nockpt_compile_blocks_budget0.25."""
        suffix = {False: "", True: "_compile", "blocks": "_compile_blocks"}[self.compiled]
        budget = f"_budget{self.budget:g}" if self.budget else ""
        return f"b{self.batch}_{'ckpt' if self.checkpointing else 'nockpt'}{suffix}{budget}"


def parse_train_case(spec: str) -> TrainCase:
    """'128:blocks+ckpt' or '128:blocks@0.5' -> TrainCase(batch, mode, memory budget)."""
    try:
        batch, rest = spec.split(":")
        mode, _, budget = rest.partition("@")
        if mode not in TRAIN_MODES:
            raise ValueError
        b = float(budget) if budget else None
        if b is not None and not 0 < b <= 1:
            raise ValueError
        return TrainCase(int(batch), mode, b)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"train case {spec!r}: expected BATCH:MODE[@BUDGET], MODE one of {', '.join(TRAIN_MODES)}, BUDGET in (0, 1]"
        ) from None


def parse_inductor_setting(spec: str) -> tuple[str, object]:
    """'max_autotune=true' -> ('max_autotune', True): a torch._inductor.config setting for every compile
    in the run. Values are read as JSON where they parse (true, 3, 0.5) and as strings otherwise."""
    import torch._inductor.config as inductor_config

    key, sep, raw = spec.partition("=")
    if not sep or not hasattr(inductor_config, key):
        raise argparse.ArgumentTypeError(
            f"inductor setting {spec!r}: expected KEY=VALUE with KEY a torch._inductor.config name"
        )
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def apply_inductor_settings(settings: Sequence[tuple[str, object]]) -> dict[str, object]:
    """Set these torch._inductor.config values for the process; returns them as now in effect."""
    if not settings:
        return {}
    import torch._inductor.config as inductor_config

    for key, value in settings:
        setattr(inductor_config, key, value)
    return {key: getattr(inductor_config, key) for key, _ in settings}
