"""Measure coarse-to-fine refinement on shipped models: when each frequency band of the estimate
settles, and what each finer branch adds (the app's Watch plots, over many seeds and classes).

    python train/coarse_to_fine.py weights/mrdit-emoji-32 weights/mrdit-emoji-64 --seeds-per-class 16

For every class and seed (seeds from 10,000 on: the project tunes on seeds below 10,000), one run at
the default settings; per image and band (the bands of the model's own grids, `mrdit.measures`):

- the step from which the finest estimate's band stays within `--threshold` (relative distance) of the
  final image's band, and the same for the coarse branch's own estimate of the layout band;
- per step, the mean relative distance of each band, and the share of each finer branch's addition
  that lies in the band its coarser neighbour cannot hold.

Writes a JSON (`--out`) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mrdit.measures import band_names, new_detail_shares, settle_index, settling_curves
from mrdit.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, Pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model directories (pixel-space DiMR models)")
    p.add_argument("--seeds-per-class", type=int, default=16)
    p.add_argument("--first-seed", type=int, default=10_000, help="seeds below 10,000 are for tuning")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--threshold", type=float, default=0.1, help="a band has settled when within this relative distance")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/coarse-to-fine.json"))
    args = p.parse_args(argv)
    if args.seeds_per_class < 1 or args.steps < 1 or not 0 < args.threshold < 1:
        p.error("--seeds-per-class and --steps must be positive and --threshold in (0, 1)")
    return args


def measure_batch(pipe: Pipeline, label: int, seeds: list[int], args) -> dict[str, np.ndarray]:
    """One run of len(seeds) images: settle steps (B, nb), the coarse branch's layout settle step (B,),
    per-step band distances (T, B, nb) and per-step new-detail shares (T, K-1)."""
    settings = pipe.validate([label] * len(seeds), seeds, args.steps, args.guidance, args.sampler)
    finest, coarse, shares = [], [], []
    for state, _ in pipe.stream(settings, previews=False):
        finest.append(state.x0[-1].cpu())
        coarse.append(state.x0[0].cpu())
        shares.append(new_detail_shares([x.cpu() for x in state.x0]))
    final = state.x.clamp(-1, 1).cpu()
    grids = [b.grid for b in pipe.config.branches]
    B = len(seeds)
    curves = torch.stack([settling_curves([f[i : i + 1] for f in finest], final[i : i + 1], grids) for i in range(B)], 1)
    layout = torch.stack([settling_curves([c[i : i + 1] for c in coarse], final[i : i + 1], grids)[:, 0] for i in range(B)], 1)
    T = curves.shape[0]

    def settled(curve: torch.Tensor) -> float:
        k = settle_index(curve, args.threshold)
        return float(T + 1 if k is None else k + 1)  # 1-based step; T + 1 = never within the threshold

    return {
        "settle": np.array([[settled(curves[:, i, j]) for j in range(curves.shape[2])] for i in range(B)]),
        "layout_settle": np.array([settled(layout[:, i]) for i in range(B)]),
        "distance": curves.numpy(),
        "shares": np.array(shares),
    }


def measure_model(path: str, args) -> dict:
    pipe = Pipeline.from_pretrained(path)
    if pipe.config.architecture != "dimr" or pipe.config.autoencoder is not None:
        raise SystemExit(f"{path}: the measure needs a pixel-space DiMR model")
    grids = [b.grid for b in pipe.config.branches]
    classes = range(len(pipe.class_names))
    parts = []
    for label in tqdm(classes, desc=Path(path).name, unit="class"):
        seeds = [args.first_seed + label * args.seeds_per_class + i for i in range(args.seeds_per_class)]
        parts.append(measure_batch(pipe, label, seeds, args))
    settle = np.concatenate([p["settle"] for p in parts])  # (N, nb)
    layout = np.concatenate([p["layout_settle"] for p in parts])
    distance = np.concatenate([p["distance"] for p in parts], axis=1)  # (T, N, nb)
    shares = np.mean([p["shares"] for p in parts], axis=0)  # (T, K-1)
    q = lambda a: [float(v) for v in np.percentile(a, [25, 50, 75])]  # noqa: E731
    return {
        "model": path,
        "grids": grids,
        "bands": band_names(grids),
        "images": int(settle.shape[0]),
        "settle_quartiles": {n: q(settle[:, j]) for j, n in enumerate(band_names(grids))},
        "never_settled": {n: int((settle[:, j] > args.steps).sum()) for j, n in enumerate(band_names(grids))},
        "coarse_branch_layout_quartiles": q(layout),
        "mean_distance": {n: [float(v) for v in distance[:, :, j].mean(1)] for j, n in enumerate(band_names(grids))},
        "new_detail_share": {f"branch {k + 1}": [float(v) for v in shares[:, k]] for k in range(shares.shape[1])},
    }


def markdown(result: dict, steps: int, threshold: float) -> str:
    lines = [f"### {result['model']} ({result['images']} images)", "",
             f"Step from which each band of the estimate stays within {threshold:.0%} of the final image's (quartiles):", "",
             "| band | 25% | median | 75% | never within |", "|---|---|---|---|---|"]
    for n, (a, b, c) in result["settle_quartiles"].items():
        lines.append(f"| {n} | {a:.0f} | {b:.0f} | {c:.0f} | {result['never_settled'][n]} |")
    a, b, c = result["coarse_branch_layout_quartiles"]
    lines.append(f"| {result['bands'][0]}, coarse branch's own estimate | {a:.0f} | {b:.0f} | {c:.0f} | |")
    marks = sorted({1, 2, 3, 5, steps // 2, steps - 2, steps})
    lines += ["", "Mean relative distance of each band to the final image, and the share of new detail in what each "
              "finer branch adds, at steps " + ", ".join(map(str, marks)) + ":", "",
              "| | " + " | ".join(f"step {m}" for m in marks) + " |", "|---" * (len(marks) + 1) + "|"]
    for n, v in result["mean_distance"].items():
        lines.append(f"| distance, {n} | " + " | ".join(f"{v[m - 1]:.2f}" for m in marks if m <= len(v)) + " |")
    for n, v in result["new_detail_share"].items():
        lines.append(f"| new-detail share, {n} | " + " | ".join(f"{v[m - 1]:.2f}" for m in marks if m <= len(v)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, indent=1))
    results = [measure_model(m, args) for m in args.models]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "models", "threads")}
    args.out.write_text(json.dumps({"settings": settings, "command": " ".join(["python", "train/coarse_to_fine.py", *sys.argv[1:]]), "results": results}, indent=1))
    for r in results:
        print(markdown(r, args.steps, args.threshold) + "\n")


if __name__ == "__main__":
    main()
