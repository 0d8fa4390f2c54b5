"""One network forward at several batch sizes, eager, graphed or compiled; FLOPs; top kernels."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from modes import autocast, compiled_blocks
from mrdit.compiled import FastForward
from mrdit.config import ModelConfig
from plan import BenchRun
from timing import measure, sync

FORWARD_VARIANTS = ("eager", "graphs", "compile", "compile+graphs", "compile-blocks")
CUDA_ONLY = ("graphs", "compile+graphs")
WHOLE_COMPILE = ("compile", "compile+graphs")  # timed at --compile-batches: each batch is one compile


def forward_inputs(c: ModelConfig, batch: int, device: torch.device, shared_time: bool = True):
    """(x, t, y) of one forward: noise, the schedule's middle step ([1] shared, as the sampler passes
    it, or one per image), class 0."""
    x = torch.randn(batch, c.channels, c.image_size, c.image_size, device=device)
    t = torch.full((1 if shared_time else batch,), c.schedule.num_steps / 2, device=device)
    return x, t, torch.zeros(batch, dtype=torch.long, device=device)


def top_kernels(fn: Callable[[], object], device: torch.device, rows: int = 15) -> tuple[list[dict], str]:
    """Profile one call of `fn`: the kernels (or CPU ops) taking the most device time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:rows]
    top = [{"name": e.key[:120], "calls": e.count, "ms": getattr(e, key) / 1000} for e in events]
    table = "\n".join(f"{r['ms']:9.2f} ms {r['calls']:5d}x  {r['name']}" for r in top)
    return top, table


def bench_forward(
    model: torch.nn.Module,
    batches: Sequence[int],
    device: torch.device,
    amp: torch.dtype | None,
    variant: str,
    fast: FastForward | None = None,
    profile: bool = False,
) -> dict:
    """Seconds per forward at each batch (median and quartiles), and the first call's seconds (any
    compile or capture): `eager`, `graphs` (FastForward's CUDA graph replay), `compile` (torch.compile,
    default mode), `compile+graphs` (FastForward's graphs of the compiled network; pass `fast` to share
    its compiled code with the sampling cases) or `compile-blocks` (each block compiled in place).
    `profile`: also the top kernels of one forward at the largest batch."""
    if variant in CUDA_ONLY and fast is None:
        fast = FastForward(model, amp, cuda_graphs=True, compile=variant == "compile+graphs")
    net = torch.compile(model) if variant == "compile" else model
    res: dict = {"median_s": {}, "quartiles_s": {}, "first_call_s": {}}
    with compiled_blocks(model, variant == "compile-blocks"):
        for b in batches:
            x, t, y = forward_inputs(model.config, b, device)

            def run(x=x, t=t, y=y):
                if fast is not None:
                    return fast(x, t, y)
                with torch.no_grad(), autocast(device, amp):
                    return net(x, t, y)

            timing = measure(run, device, warmup=3, repeat=5)
            res["median_s"][b], res["quartiles_s"][b], res["first_call_s"][b] = (
                timing.median_s,
                timing.quartiles_s,
                timing.first_s,
            )
            if profile and b == max(batches):
                res["profile"], res["profile_table"] = top_kernels(run, device)
            if fast is not None:
                fast.clear()
    return res


def run_forward(run: BenchRun) -> None:
    """Every forward variant of the plan, recorded and printed as it finishes."""
    cfg, res = run.config, run.results
    for variant in cfg.forward_variants:
        batches = cfg.compile_batches if variant in WHOLE_COMPILE else cfg.forward_batches
        fast = run.compiled_graphs() if variant == "compile+graphs" else None
        r = bench_forward(run.model, batches, run.device, run.amp, variant, fast, profile=cfg.profile)
        res.section("forward_s")[variant] = r["median_s"]
        res.section("forward_quartiles_s")[variant] = r["quartiles_s"]
        res.section("forward_first_call_s")[variant] = r["first_call_s"]
        if "profile" in r:
            res.section("forward_profile")[variant] = r["profile"]
            print(f"profile of {variant}, batch {max(batches)}:\n{r['profile_table']}")
        if fast is not None:  # a failed compile falls back to graphs of the plain network: say so
            res["compile_state"] = fast.compile_state
            print(f"compile+graphs: {fast.compile_state}")
        res.save()
        for b, s in r["median_s"].items():
            tf = run.flops_per_image * b / s / 1e12
            print(
                f"forward {variant:6s} batch {b:4d}: {s * 1000:8.1f} ms  ({tf:.3f} TFLOP/s, "
                f"{run.share_of_matmul(tf) * 100:.0f}% of matmul; first call {r['first_call_s'][b]:.1f} s)"
            )
