"""The eager (not compiled) network's arithmetic rate while sampling, as a fraction of this machine's
fp32 matmul rate measured in the same run.

    python bench/eager_rate.py --model weights/mrdit-emoji-32 --out bench/results/eager_rate.json

The forward is the one a guided sampler makes (`mrdit.guidance.guided_denoiser`): the images and
their copies with the null label in one batch, so N images give a network batch of 2N rows, with one
DDPM step shared by the batch. `--batch` counts those network rows (8 rows = 4 guided images).
FLOPs per forward come from `torch.utils.flop_counter`; the matmul rate is the best of a few square
fp32 sizes, picked once at the start. Timing rounds interleave the matmul and the forwards (matmul,
forward at each batch, matmul, ...) so that other processes on the machine slow both alike; the
reported ratio is the median of the per-round ratios. A torch.profiler table of one batch's forward
(top operators by self CPU time) shows where the eager time goes.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mrdit import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default="weights/mrdit-emoji-32", help="model directory or Hub repo id")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16], help="network batch rows (guided: 2 x images)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--inner", type=int, default=3, help="calls per round and measurement (median taken)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--matmul-sizes", type=int, nargs="+", default=[512, 1024, 1536, 2048], help="square sizes tried")
    p.add_argument("--step", type=float, default=500.0, help="the shared DDPM step of the forward")
    p.add_argument("--profile-batch", type=int, default=None, help="batch of the profile (default: the first)")
    p.add_argument("--profile-top", type=int, default=15, help="operators listed in the profile")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler table")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if any(b < 2 or b % 2 for b in args.batch):
        p.error("--batch: network rows of a guided forward are 2 x images, so even and >= 2")
    if args.repeats < 1 or args.inner < 1:
        p.error("--repeats and --inner must be >= 1")
    return args


def guided_inputs(config, rows: int, step: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `guided_denoiser` passes the network for rows/2 images: [x, x], one shared t, [labels, null]."""
    g = torch.Generator().manual_seed(0)
    n = rows // 2
    x = torch.randn(n, config.channels, config.image_size, config.image_size, generator=g)
    labels = torch.randint(0, config.null_label, (n,), generator=g)
    y = torch.cat([labels, torch.full_like(labels, config.null_label)])  # (2n,)
    return torch.cat([x, x]), torch.tensor([step]), y


def median_seconds(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def minor_faults() -> int:
    """Page faults of this process so far: fresh memory from the system costs a fault per page."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def pick_matmul(sizes: list[int]) -> tuple[int, dict[int, float]]:
    """The square fp32 size with the best GFLOP/s on this machine, and every size's rate."""
    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        s = median_seconds(lambda a=a, b=b: a @ b, 3 if n <= 1024 else 2)
        rates[n] = 2 * n**3 / s / 1e9
    return max(rates, key=rates.get), rates


def profile_table(model, inputs, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(2):
            model(*inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                model(*inputs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "op": e.key,
            "calls_per_forward": e.count / 5,
            "self_ms_per_forward": e.self_cpu_time_total / 5 / 1e3,
            "self_share": e.self_cpu_time_total / total,
        }
        for e in events[:top]
    ]


def interleaved_rounds(model, inputs: dict, flops: dict, mm: tuple, repeats: int, inner: int):
    """`repeats` rounds of (matmul, forward) pairs, one pair per batch, each the median of `inner` calls.
    Returns the matmul seconds, and per batch the forward seconds, the per-pair ratios of the forward's
    rate to the matmul's and the page faults per forward."""
    a, b = mm
    mm_flops = 2 * a.shape[0] ** 3
    mm_s: list[float] = []
    fwd_s: dict[int, list[float]] = {rows: [] for rows in inputs}
    ratios: dict[int, list[float]] = {rows: [] for rows in inputs}
    faults: dict[int, list[float]] = {rows: [] for rows in inputs}
    with torch.inference_mode():
        for inp in inputs.values():
            for _ in range(3):
                model(*inp)
        for _ in range(repeats):
            for rows, inp in inputs.items():
                m = median_seconds(lambda: a @ b, inner)
                f0 = minor_faults()
                f = median_seconds(lambda inp=inp: model(*inp), inner)
                faults[rows].append((minor_faults() - f0) / inner)
                mm_s.append(m)
                fwd_s[rows].append(f)
                ratios[rows].append((flops[rows] / f) / (mm_flops / m))
    return mm_s, fwd_s, ratios, faults


def run_config(args: argparse.Namespace) -> dict:
    """The resolved settings and the machine, printed and recorded with the results."""
    return {
        "model": args.model,
        "batch_rows": args.batch,
        "images_per_batch": [b // 2 for b in args.batch],
        "repeats": args.repeats,
        "inner": args.inner,
        "threads": torch.get_num_threads(),
        "step": args.step,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "mkldnn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
    }


def forward_result(rows: int, flops: float, times: list[float], ratios: list[float], faults: list[float]) -> dict:
    """One batch size's numbers, printed as a line."""
    s = statistics.median(times)
    r = {
        "rows": rows,
        "images": rows // 2,
        "gflop_per_forward": flops / 1e9,
        "ms": s * 1e3,
        "gflops": flops / s / 1e9,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "page_faults_per_forward": statistics.median(faults),
    }
    print(
        f"guided forward, {rows} rows ({rows // 2} images): {r['gflop_per_forward']:.3f} GFLOP, "
        f"{r['ms']:.2f} ms, {r['gflops']:.1f} GFLOP/s = {r['ratio'] * 100:.1f}% of matmul "
        f"(rounds {r['ratio_min'] * 100:.1f}-{r['ratio_max'] * 100:.1f}%; "
        f"{r['page_faults_per_forward']:.0f} page faults per forward)"
    )
    return r


def print_profile(rows: int, table: list[dict]) -> None:
    print(f"profile, {rows} rows: top operators by self CPU time per forward")
    for e in table:
        print(
            f"  {e['op']:40s} {e['calls_per_forward']:6.0f} calls  {e['self_ms_per_forward']:7.2f} ms"
            f"  {e['self_share'] * 100:5.1f}%"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    config = run_config(args)
    print("config:", json.dumps(config))

    n_mm, mm_sizes = pick_matmul(args.matmul_sizes)
    print("matmul GFLOP/s by size:", {k: round(v, 1) for k, v in mm_sizes.items()}, f"-> {n_mm}^3")
    a, b = torch.randn(n_mm, n_mm), torch.randn(n_mm, n_mm)

    inputs = {rows: guided_inputs(model.config, rows, args.step) for rows in args.batch}
    flops = {}
    for rows, inp in inputs.items():
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            model(*inp)
        flops[rows] = float(fc.get_total_flops())

    mm_s, fwd_s, ratios, faults = interleaved_rounds(model, inputs, flops, (a, b), args.repeats, args.inner)
    mm_rate = 2 * n_mm**3 / statistics.median(mm_s) / 1e9
    print(f"matmul {n_mm}^3, median over the run: {mm_rate:.1f} GFLOP/s")
    results = {
        "command": "python " + " ".join(sys.argv),
        "config": config,
        "matmul_size": n_mm,
        "matmul_gflops_by_size": mm_sizes,
        "matmul_gflops": mm_rate,
        "forward": {
            str(rows): forward_result(rows, flops[rows], fwd_s[rows], ratios[rows], faults[rows]) for rows in args.batch
        },
    }
    if not args.no_profile:
        rows = args.profile_batch or args.batch[0]
        inp = inputs[rows] if rows in inputs else guided_inputs(model.config, rows, args.step)
        results["profile"] = {"rows": rows, "top_ops": profile_table(model, inp, args.profile_top)}
        print_profile(rows, results["profile"]["top_ops"])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
