"""What per-step previews cost for a latent model: streaming with linear previews, with full VAE
previews (the old way), and without previews, all through `Pipeline.stream`, plus the final decode.

    python bench/preview_overhead.py [--official-config tests/data/parity/tiny_2r.json | --preset dimr-xl-2r]
        [--vae sd] [--images 4] [--steps 25] [--repeat 3] [--out bench/results/preview-overhead.json]

The VAE has the SD VAE's architecture with random weights (timing only). The default model is the
release's wiring at the parity data's small widths, so that 25 steps run in seconds on a CPU; the
smaller the model, the larger the share previews take, so this is the hard case.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from latent_setup import TINY_RELEASE, add_model_args, latent_pipeline, model_config
from report import print_config, write_json


def run(pipe, settings, previews: bool):
    """(seconds streaming, seconds of it spent making previews, the last state)."""
    spent = [0.0]
    make = pipe.preview

    def timed_preview(state):
        t = time.perf_counter()
        pv = make(state)
        spent[0] += time.perf_counter() - t
        return pv

    pipe.preview = timed_preview
    t0 = time.perf_counter()
    state = None
    try:
        for state, _ in pipe.stream(settings, previews=previews):  # noqa: B007 - the last state is decoded
            pass
    finally:
        del pipe.preview  # back to the class's method
    return time.perf_counter() - t0, spent[0], state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p, preset=None)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--full-steps", type=int, default=2, help="steps timed with full VAE previews (slow)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.preset is None and args.official_config is None:
        args.official_config = TINY_RELEASE
    if args.threads:
        torch.set_num_threads(args.threads)
    print_config(args)
    config = model_config(args)
    pipe, fit_s = latent_pipeline(config, args.vae, args.device)
    print(f"linear preview fitted in {fit_s:.2f} s (once per model; cached beside it when served)")
    settings = pipe.validate([0] * args.images, list(range(args.images)), args.steps, 4.0, args.sampler)
    plain, linear, in_run = [], [], []
    *_, state = run(pipe, settings, previews=True)  # warm-up
    for _ in tqdm(range(args.repeat), desc="plain / linear previews"):
        plain.append(run(pipe, settings, previews=False)[0])
        total, spent, _ = run(pipe, settings, previews=True)
        linear.append(total)
        in_run.append(total / (total - spent))
    t0 = time.perf_counter()
    pipe.to_images(state.x)  # the final decode: the same with or without previews
    decode_s = time.perf_counter() - t0
    full_pipe = type(pipe)(pipe.model, pipe.decoder)  # previews through the full VAE, as before
    short = full_pipe.validate([0] * args.images, list(range(args.images)), args.full_steps, 4.0, args.sampler)
    full_total, full_spent, _ = run(full_pipe, short, previews=True)
    res = {
        "model_params": sum(q.numel() for q in pipe.model.parameters()),
        "vae": args.vae,
        "images": args.images,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "fit_s": fit_s,
        "sampling_plain_s": statistics.median(plain),
        "sampling_linear_previews_s": statistics.median(linear),
        "final_decode_s": decode_s,
        "full_vae_preview_per_step_s": full_spent / args.full_steps,
        "full_vae_sampling_per_step_s": (full_total - full_spent) / args.full_steps,
    }
    # Two estimates of the same ratio: separate runs (sensitive to a shared machine's load), and within
    # each previewing run, its time over its time minus what the previews took (same load for both).
    res["ratio_sampling"] = res["sampling_linear_previews_s"] / res["sampling_plain_s"]
    res["ratio_within_runs"] = statistics.median(in_run)
    res["ratio_with_final_decode"] = (res["sampling_linear_previews_s"] + res["final_decode_s"]) / (
        res["sampling_plain_s"] + res["final_decode_s"]
    )
    res["full_vae_ratio_within_run"] = 1 + res["full_vae_preview_per_step_s"] / res["full_vae_sampling_per_step_s"]
    print(
        f"{args.images} images, {args.steps} steps: sampling {res['sampling_plain_s']:.3f} s without previews, "
        f"{res['sampling_linear_previews_s']:.3f} s with linear previews ({res['ratio_sampling']:.3f}x; "
        f"{res['ratio_within_runs']:.3f}x within the previewing runs); "
        f"final VAE decode {res['final_decode_s']:.3f} s (with it: {res['ratio_with_final_decode']:.3f}x); "
        f"full-VAE previews cost {res['full_vae_preview_per_step_s']:.3f} s per step "
        f"({res['full_vae_ratio_within_run']:.1f}x sampling)"
    )
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
