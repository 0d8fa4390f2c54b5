"""End-to-end guided sampling latency per variant (float32, autocast, CUDA graphs, compiled), with
the network's share of a matmul rate timed beside each run and the error against float32."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from mrdit.compiled import FastForward
from mrdit.sampling import noise_for_seeds, sample
from plan import BenchRun
from timing import Timing, summarise, time_once

GUIDANCE = 2.0
CPU_COMPILE_BATCHES = (2, 16)  # the batch sizes FastForward's warm-up compiles (they cover 2..any)


class SamplingRun(NamedTuple):
    """One timed sampling request: its name in the results, sampler and steps."""

    name: str
    sampler: str
    steps: int


def sampling_runs(gpu: bool) -> list[SamplingRun]:
    """25 `dpm++2m` steps everywhere; 250 `dpm-fast` steps on a GPU only."""
    runs = [SamplingRun("dpm++2m_25", "dpm++2m", 25)]
    return runs + [SamplingRun("dpm-fast_250", "dpm-fast", 250)] if gpu else runs


def available_variants(gpu: bool, amp_name: str) -> list[str]:
    """The sampling variants this device and autocast setting can run; fp32 first (the reference)."""
    amp = [] if amp_name == "none" else [amp_name]
    if not gpu:
        return ["fp32", "fp32+compile", *amp]
    return ["fp32", *amp, *(f"{amp_name}+{v}" for v in ("graphs", "compile+graphs") if amp)]


def default_variants(gpu: bool, amp_name: str) -> list[str]:
    """Everything on the CPU; on a GPU all but graphs of the compiled network (a minute per shape)."""
    return [v for v in available_variants(gpu, amp_name) if not (gpu and v.endswith("compile+graphs"))]


def variant_network(run: BenchRun, variant: str) -> torch.nn.Module | FastForward:
    """The network a variant samples with: the model as is, FastForward with autocast, graphs, compiled."""
    if variant == "fp32":
        return run.model
    if variant == "fp32+compile":  # the CPU's compiled network, compiled up front and timed
        net = FastForward(run.model, None, cuda_graphs=False, compile=True)
        seconds = time_once(lambda: net.warm_up(CPU_COMPILE_BATCHES), run.device)
        run.results["compile_warm_up_s"] = seconds
        batches = " and ".join(map(str, CPU_COMPILE_BATCHES))
        print(f"torch.compile warm-up (batches {batches}): {seconds:.1f} s, {net.compile_state}")
        return net
    if variant.endswith("+compile+graphs"):  # compiles in its first (untimed) run, unless a forward case did
        return run.compiled_graphs()
    return FastForward(run.model, run.amp, cuda_graphs=variant.endswith("+graphs"))


def bench_sampling(
    net: torch.nn.Module | FastForward,
    device: torch.device,
    case: SamplingRun,
    images: int,
    repeat: int,
    matmul_rate: Callable[[], float],
    flops: float,
) -> tuple[Timing, float, torch.Tensor]:
    """One sampling case: its timing, the network's median fraction of a matmul rate timed right after
    each run (interleaved, so a machine whose speed drifts is compared with itself), the final images."""
    c = net.config
    noise, gens = noise_for_seeds(list(range(images)), (c.channels, c.image_size, c.image_size), device)
    labels = torch.zeros(images, dtype=torch.long, device=device)

    def once():
        return sample(net, noise, labels, sampler=case.sampler, steps=case.steps, guidance=GUIDANCE, generators=gens)

    final = once().float().cpu()  # also the warm-up
    times, fractions = [], []
    for _ in range(repeat):
        times.append(time_once(once, device))
        fractions.append(flops / times[-1] / matmul_rate())
    return summarise(times), summarise(fractions).median_s, final


def run_sampling(run: BenchRun) -> None:
    """Every sampling variant of the plan, with its error against the float32 variant when both ran."""
    cfg, res = run.config, run.results
    seconds, quartiles = res.section("sampling_s"), res.section("sampling_quartiles_s")
    fraction_of_matmul, rel_err = res.section("sampling_fraction_of_matmul"), res.section("sampling_rel_err_vs_fp32")
    reference: dict[str, torch.Tensor] = {}
    for variant in cfg.sampling_variants:
        net = variant_network(run, variant)
        runs = sampling_runs(run.gpu)
        for case in runs[:1] if (variant == "fp32" and run.gpu) else runs:  # 250 fp32 steps add little
            flops = run.flops_per_image * cfg.images * 2 * case.steps  # guided: two forwards per step
            timing, fraction, final = bench_sampling(
                net, run.device, case, cfg.images, cfg.sampling_repeat, lambda: run.matmul_rate(1, 3), flops
            )
            key = f"{variant}/{case.name}"
            seconds[key], quartiles[key], fraction_of_matmul[key] = timing.median_s, timing.quartiles_s, fraction
            err = ""
            if variant == "fp32":
                reference[case.name] = final
            elif case.name in reference:
                ref = reference[case.name]
                rel_err[key] = float((final - ref).norm() / ref.norm())
                err = f"; final image rel. error vs fp32 {rel_err[key]:.1e}"
            print(
                f"sampling {key} ({cfg.images} images, guided): {timing.median_s:.3f} s; network "
                f"{flops / timing.median_s / 1e9:.1f} GFLOP/s = {fraction * 100:.0f}% of the matmul rate timed beside it{err}"
            )
        if isinstance(net, FastForward):
            net.clear()
