"""Speed benchmarks of mrdit, on the CPU or a GPU: prints a table and writes JSON.

    python bench/bench.py --preset dimr-xl-2r --device cuda --out bench/results/h100.json   # the GPU targets
    python bench/bench.py --model weights/mrdit-emoji-32 --out bench/results/cpu-emoji.json # the CPU demo model

Measures: training img/s and peak memory (with and without activation checkpointing), one forward
at several batch sizes, end-to-end guided sampling latency (250-step dpm-fast, 25-step dpm++2m),
model FLOPs (torch.utils.flop_counter) and the achieved fraction of a matrix-multiply rate measured in
the same run. Every case is one of the variants below; the defaults depend on the device (`--dry-run`
prints them). No gradio or diffusers needed.

    python bench/bench.py --preset dimr-xl-2r --device cuda --skip forward sampling \\
        --train-cases 128:ckpt 128:blocks@0.25      # eager checkpointed vs compiled blocks + memory budget
    python bench/bench.py --preset dimr-xl-2r --device cuda --skip train sampling --forward-batches 256 \\
        --forward-variants compile-blocks --profile  # where a compiled forward's time goes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from forward_bench import CUDA_ONLY, FORWARD_VARIANTS, run_forward
from modes import AMP_DTYPES, TRAIN_MODES, TrainCase, apply_inductor_settings, parse_inductor_setting, parse_train_case
from mrdit import build_model, get_preset, load_model
from mrdit.cost import forward_flops
from plan import BenchConfig, BenchRun
from report import Results, machine, print_config
from sampling_bench import available_variants, default_variants, run_sampling
from train_bench import run_train

SECTIONS = ("forward", "sampling", "train")
DEFAULT_PRESET = "dimr-xl-2r"
# Flags merged into others; each one's replacement, for a command written before the merge.
MERGED_FLAGS = {
    "--train-batches": "--train-cases BATCH:plain BATCH:ckpt",
    "--train-compile": "--train-cases BATCH:compile",
    "--forward-compile": "--forward-variants eager compile (on a GPU also graphs compile+graphs)",
    "--no-compile": "--sampling-variants fp32 (the CPU's variants without fp32+compile)",
    "--sampling-compile": "--sampling-variants fp32 bf16 bf16+graphs bf16+compile+graphs",
}


class MergedFlag(argparse.Action):
    """A flag that no longer exists: fail with the flag that replaced it."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was merged into another flag: use {MERGED_FLAGS[option_string]}")


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults that depend on the device are None here and filled by `resolve`."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help=f"random weights of a preset (default {DEFAULT_PRESET})")
    g.add_argument("--model", type=Path, help="a model directory (e.g. weights/mrdit-emoji-32)")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available"
    )
    p.add_argument("--amp", choices=list(AMP_DTYPES), help="autocast dtype (default: bf16 on GPU, none on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections not to run")
    p.add_argument("--forward-batches", type=int, nargs="+", help="default: 2 8 32 256 on GPU, 1 4 8 on CPU")
    p.add_argument(
        "--forward-variants",
        nargs="+",
        choices=FORWARD_VARIANTS,
        help="forward variants to time (default: eager, and graphs on GPU; graphs need CUDA)",
    )
    p.add_argument(
        "--compile-batches",
        type=int,
        nargs="+",
        help="batches for the compile and compile+graphs forwards (default: --forward-batches; each is a compile)",
    )
    p.add_argument(
        "--profile", action="store_true", help="record the top kernels of each forward variant's largest batch"
    )
    p.add_argument(
        "--sampling-variants",
        nargs="+",
        metavar="NAME",
        help="sampling cases: fp32, fp32+compile (CPU), AMP, AMP+graphs, AMP+compile+graphs (GPU) with AMP the "
        "--amp dtype; fp32 is the reference for the error column (default: all the CPU's; on GPU all but "
        "AMP+compile+graphs)",
    )
    p.add_argument("--sampling-repeat", type=int, default=3, help="timed sampling runs per case (median)")
    p.add_argument("--images", type=int, help="images per sampling run (default 1 on GPU, 4 on CPU)")
    p.add_argument(
        "--train-cases",
        nargs="+",
        type=parse_train_case,
        metavar="BATCH:MODE[@BUDGET]",
        help="training cases, e.g. 128:ckpt 128:blocks+ckpt 128:blocks@0.4; MODE: "
        + ", ".join(TRAIN_MODES)
        + " (blocks: each block compiled in place); BUDGET: fraction of activations a compiled backward "
        "keeps, the rest is recomputed (default: 64 and 128 plain and ckpt on GPU, 32 on CPU)",
    )
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per case (median)")
    p.add_argument(
        "--inductor",
        nargs="+",
        type=parse_inductor_setting,
        default=[],
        metavar="KEY=VALUE",
        help="compiler settings for every compiled case, e.g. max_autotune=true coordinate_descent_tuning=true",
    )
    p.add_argument("--out", type=Path, help="JSON results file (rewritten after every section)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration and stop")
    for flag in MERGED_FLAGS:
        p.add_argument(flag, nargs="*", action=MergedFlag, help=argparse.SUPPRESS)
    return p


def with_resolved_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--help` ends with what the defaults resolve to on this machine."""
    defaults = resolve(parser.parse_args([]), parser).as_json()
    shown = {k: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in defaults.items()}
    lines = [f"  {k}: {v}" for k, v in shown.items() if k not in ("dry_run", "out")]
    parser.epilog = f"{__doc__}\nDefaults on this machine (--device {defaults['device']}):\n" + "\n".join(lines)
    return parser


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    """The flags with the device's defaults filled in; variants this device cannot run are refused."""
    gpu = torch.device(args.device).type == "cuda"
    amp = args.amp or ("bf16" if gpu else "none")
    forward_batches = tuple(args.forward_batches or ((2, 8, 32, 256) if gpu else (1, 4, 8)))
    forward_variants = tuple(args.forward_variants or (("eager", "graphs") if gpu else ("eager",)))
    for variant in forward_variants:
        if variant in CUDA_ONLY and not gpu:
            parser.error(f"forward variant {variant} needs a CUDA device")
    available = available_variants(gpu, amp)
    unknown = sorted(set(args.sampling_variants or ()) - set(available))
    if unknown:
        parser.error(
            f"--sampling-variants: {', '.join(unknown)} not available here (available: {', '.join(available)})"
        )
    sampling = [v for v in available if v in args.sampling_variants] if args.sampling_variants else None
    train_cases = args.train_cases or [
        TrainCase(b, m) for b in ((64, 128) if gpu else (32,)) for m in ("plain", "ckpt")
    ]
    return BenchConfig(
        model=args.model,
        preset=args.preset or DEFAULT_PRESET,
        device=args.device,
        amp=amp,
        threads=args.threads,
        sections=tuple(s for s in SECTIONS if s not in args.skip),
        forward_batches=forward_batches,
        forward_variants=forward_variants,
        compile_batches=tuple(args.compile_batches or forward_batches),
        profile=args.profile,
        sampling_variants=tuple(sampling or default_variants(gpu, amp)),
        sampling_repeat=args.sampling_repeat,
        images=args.images or (1 if gpu else 4),
        train_cases=tuple(train_cases),
        train_steps=args.train_steps,
        inductor=tuple(args.inductor),
        out=args.out,
        dry_run=args.dry_run,
    )


def load_bench_model(cfg: BenchConfig) -> torch.nn.Module:
    """The saved model of `--model`, or a preset with random weights."""
    if cfg.model:
        return load_model(cfg.model, device=cfg.device)
    return build_model(get_preset(cfg.preset), device=cfg.device).eval()


def start_run(cfg: BenchConfig, model: torch.nn.Module, inductor: dict) -> BenchRun:
    """The run's header: the machine, the model's size and FLOPs, and a matmul rate to compare with."""
    run = BenchRun(cfg, model, AMP_DTYPES[cfg.amp], Results(cfg.out))
    run.results.values.update(
        model=cfg.name,
        device=machine(run.device),
        torch=torch.__version__,
        amp=cfg.amp,
        params=sum(p.numel() for p in model.parameters()),
        inductor=inductor,
    )
    run.matmul_tflops = run.results["matmul_tflops"] = run.matmul_rate() / 1e12
    run.flops_per_image = forward_flops(model, 1, run.device)
    run.results["gflops_per_image_forward"] = run.flops_per_image / 1e9
    print(
        f"{cfg.name}: {run.results['params']:,} parameters, {run.flops_per_image / 2e9:.2f} GMAC per image forward; "
        f"matmul {run.matmul_tflops:.3f} TFLOP/s ({run.matmul_dtype})"
    )
    return run


def main(argv: list[str] | None = None) -> int:
    parser = with_resolved_defaults(build_parser())
    cfg = resolve(parser.parse_args(argv), parser)
    print_config(cfg.as_json())
    if cfg.dry_run:
        return 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    inductor = apply_inductor_settings(cfg.inductor)
    run = start_run(cfg, load_bench_model(cfg), inductor)
    run.results.save()
    sections = {"forward": run_forward, "sampling": run_sampling, "train": run_train}
    for name in cfg.sections:
        sections[name](run)
        run.results.save()
    if cfg.out:
        print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
