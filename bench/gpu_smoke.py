"""GPU smoke test of the ImageNet serving path: DiMR-XL/2R with random weights, a random autoencoder
of the SD VAE's architecture, the app's pipeline streaming 25 `dpm++2m` steps with (linear) previews
for 4 images, then the final VAE decode. Prints time to the first preview, total time, peak memory.

    python bench/gpu_smoke.py                                   # on a CUDA machine: the real sizes
    python bench/gpu_smoke.py --device cpu --official-config tests/data/parity/tiny_2r.json --vae tiny --steps 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from latent_setup import add_model_args, latent_pipeline, model_config
from memory import peak_memory_mib, reset_peak
from report import print_config, write_json
from timing import sync


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p, preset="dimr-xl-2r")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    print_config(args)
    t_load = time.perf_counter()
    pipe, fit_s = latent_pipeline(model_config(args), args.vae, args.device)
    device = pipe.device
    load_s = time.perf_counter() - t_load
    sync(device)
    reset_peak(device)
    settings = pipe.validate([207] * args.images, list(range(args.images)), args.steps, args.guidance, args.sampler)
    res: dict[str, object] = {"device": str(device), "load_s": load_s, "fit_s": fit_s}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    for run in ("first run (captures graphs)", "second run"):
        t0 = time.perf_counter()
        first = None
        state = None
        for state, pv in tqdm(pipe.stream(settings), total=args.steps, desc=run):  # noqa: B007 - decoded below
            assert pv is not None and pv.kind == "linear approximation"
            first = first or time.perf_counter() - t0
        images = pipe.to_images(state.x)
        total = time.perf_counter() - t0
        key = "first" if run.startswith("first") else "second"
        res[f"{key}_preview_s"], res[f"{key}_total_s"] = first, total
        print(f"{run}: first preview after {first * 1000:.0f} ms, {len(images)} images in {total:.2f} s")
    res["peak_memory_mib"] = peak_memory_mib(device)
    print(
        f"peak memory: {res['peak_memory_mib']:.0f} MiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})"
    )
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
