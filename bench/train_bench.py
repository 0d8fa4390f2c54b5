"""Training throughput and peak memory per case: eager or compiled, checkpointed or not, with a
compiled backward's memory budget (`modes.TrainCase`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from memory import cuda_peak_gib, reset_peak
from modes import TrainCase, autocast, compiled_blocks, memory_budget_scope
from mrdit.losses import multiscale_loss
from mrdit.training import TrainConfig, make_optimizer
from plan import BenchRun
from timing import measure


def train_step(
    model: torch.nn.Module, net: torch.nn.Module, batch: int, device: torch.device, amp: torch.dtype | None
) -> Callable[[], None]:
    """One optimiser step of `net` (the model, or it compiled) on a fixed random batch, as a closure."""
    c = model.config
    opt = make_optimizer(model, TrainConfig())
    x = torch.randn(batch, c.channels, c.image_size, c.image_size, device=device)
    n = torch.randint(1, c.schedule.num_steps + 1, (batch,), device=device).float()
    y = torch.randint(0, c.num_classes, (batch,), device=device)
    eps = torch.randn_like(x)
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)

    def step() -> None:
        with autocast(device, amp):
            preds = net(x, n, y)
        loss = multiscale_loss(preds, eps, c.loss_weights).mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def bench_train(
    model: torch.nn.Module, case: TrainCase, device: torch.device, amp: torch.dtype | None, steps: int
) -> dict:
    """Training img/s (median of `steps` timed steps), step seconds and peak GPU memory of one case.
    Regional compilation ("blocks") compiles each block in place, so identical blocks share the
    compiled code and it works inside activation checkpointing; see `modes.memory_budget_scope`."""
    with memory_budget_scope(case.budget), compiled_blocks(model, case.compiled == "blocks"):
        model.train()
        model.set_grad_checkpointing(case.checkpointing)
        try:
            net = torch.compile(model) if case.compiled is True else model
            step = train_step(model, net, case.batch, device, amp)
            reset_peak(device)
            timing = measure(step, device, warmup=3 if case.compiled else 2, repeat=steps)
        finally:
            model.zero_grad(set_to_none=True)
            model.set_grad_checkpointing(False)
            model.eval()
    s = timing.median_s
    return {
        "img_per_s": case.batch / s,
        "step_s": s,
        "step_quartiles_s": timing.quartiles_s,
        "peak_gib": cuda_peak_gib(device),
    }


def run_train(run: BenchRun) -> None:
    """Every training case of the plan; a case that runs out of GPU memory is recorded as such."""
    cfg, out = run.config, run.results.section("train")
    for case in cfg.train_cases:
        try:
            r = bench_train(run.model, case, run.device, run.amp, cfg.train_steps)
        except torch.OutOfMemoryError:
            r = {"error": "out of memory"}
            torch.cuda.empty_cache()
        out[case.key] = r
        run.results.save()
        if "error" in r:
            print(f"train {case.key}: out of memory")
            continue
        tf = run.flops_per_image * 3 * r["img_per_s"] / 1e12  # forward and backward: three forwards' work
        mem = f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
        print(
            f"train {case.key}: {r['img_per_s']:.1f} img/s ({tf:.3f} TFLOP/s, "
            f"{run.share_of_matmul(tf) * 100:.0f}% of matmul){mem}"
        )
