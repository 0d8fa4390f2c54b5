"""Experiments on the branches of a DiMR model: swap, freeze and guide the coarse branch.

    python train/branch_experiments.py --out docs/branch-experiments.json

Every image is compared band by band (`mrdit.measures.band_split` on the model's grids: the coarsest
grid's layout, then each finer grid's detail). For each class and each of --seeds-per-class seeds
(from --first-seed on; seeds below 10000 are for tuning):

- swap: seeds paired (i, i + n/2) within a class, and classes paired (c - 1, c) at one seed. A hybrid has
  B's seed and class and A's coarse features; per band, ||H - A|| / ||A - B|| and ||H - B|| / ||A - B||
  (pooled over pairs: root of summed squares) and the share of hybrids closer to A than to B.
- freeze: the coarse features frozen (or zeroed) from evaluation k on; per band, the final image's
  distance to the plain run's, relative to the plain band's size. Two seeds of one class give the
  scale of "another image".
- branch guidance: per-branch weights; per band, the distance to the ordinary-guidance run.

With --judge-data (prepared emoji data, as for train/evaluate.py) the judge's class accuracy and its
95% Wilson interval is added for each condition, and for the class swap the share of hybrids the
judge assigns to A's class and to B's. The final images are kept in --images, so `--reuse-images`
measures them again without sampling. Last, the class token's attention and the time-dependent norms
are summarised on the plain images (`mrdit.probes`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from mrdit.checkpoint import atomic_save_safetensors, atomic_write, load_model
from mrdit.interventions import BranchGuidance, FreezeCoarse, Intervention, SwapCoarse
from mrdit.judge import JUDGE_RECIPE, RECIPES, classifier, judge_images, wilson_interval
from mrdit.measures import band_names, band_split
from mrdit.pipeline import DEFAULT_SAMPLER
from mrdit.sampling import SAMPLERS, noise_for_seeds, sample


def band_sq(x: torch.Tensor, grids: list[int]) -> torch.Tensor:
    """Squared norm of each band of each image: (B, C, S, S) -> (B, len(grids))."""
    return torch.stack([b.pow(2).sum((1, 2, 3)) for b in band_split(x, grids)], 1)


def pooled_ratio(num: torch.Tensor, den: torch.Tensor) -> list[float]:
    """sqrt(sum num) / sqrt(sum den) per band, for per-image squared norms (N, nb)."""
    return (num.sum(0).sqrt() / den.sum(0).sqrt().clamp_min(1e-12)).tolist()


def parse_weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--branch-weights: expected comma-separated numbers, got {text!r}") from None


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """The image as saved (8 bits per channel), back in [-1, 1]: what is measured is what is shown."""
    return to_uint8(x).float() / 127.5 - 1


class Runner:
    """Samples rows (seed, label) with an intervention at the run's settings; counts images sampled."""

    def __init__(self, model: torch.nn.Module, sampler: str, steps: int, guidance: float) -> None:
        self.model, self.sampler, self.steps, self.guidance = model, sampler, steps, guidance
        self.images = 0

    def __call__(self, seeds: list[int], labels: list[int], intervention: Intervention | None = None) -> torch.Tensor:
        c = self.model.config
        noise, gens = noise_for_seeds(seeds, (c.channels, c.image_size, c.image_size))
        x = sample(
            self.model,
            noise,
            torch.tensor(labels),
            sampler=self.sampler,
            steps=self.steps,
            guidance=self.guidance,
            generators=gens,
            intervention=intervention,
        )
        self.images += len(seeds)
        return quantise(x)  # (B, C, S, S)


def seed_swap_batch(classes: int, seed_a: int, seed_b: int) -> tuple[list[int], list[int], SwapCoarse]:
    """One run for a seed pair: plain rows (c, a), plain rows (c, b), then hybrids with b's seed and
    class c and the coarse features of (c, a)."""
    C = classes
    return [seed_a] * C + [seed_b] * 2 * C, list(range(C)) * 3, SwapCoarse((*range(2 * C), *range(C)))


def class_swap_batch(classes: int, seed_a: int, seed_b: int, from_step: int) -> tuple[list[int], list[int], SwapCoarse]:
    """One run for a seed pair: plain rows (c, a) and (c, b), then at each seed hybrids of class c with
    the coarse features of class c - 1 at that seed. (From evaluation 0 on such a hybrid is exactly
    its A: the class enters only through the coarse branch.)"""
    C = classes
    source = [*range(2 * C)] + [(c - 1) % C for c in range(C)] + [C + (c - 1) % C for c in range(C)]
    return ([seed_a] * C + [seed_b] * C) * 2, list(range(C)) * 4, SwapCoarse(tuple(source), from_step)


def run_experiments(args: argparse.Namespace, model: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    C = model.config.num_classes - 1
    grids = list(model.config.output_sizes)
    n = args.seeds_per_class
    seeds = list(range(args.first_seed, args.first_seed + n))
    pairs = [(seeds[i], seeds[i + n // 2]) for i in range(n // 2)]
    run = Runner(model, args.sampler, args.steps, args.guidance)
    images: dict[str, list[torch.Tensor]] = {}
    sq: dict[str, list[torch.Tensor]] = {}
    plain_by_pair = []
    t0 = time.perf_counter()
    for a, b in tqdm(pairs, desc="seed swap (with the plain runs)", unit="seed pair"):
        s, y, swap = seed_swap_batch(C, a, b)
        x = run(s, y, swap)
        A, B, H = x[:C], x[C : 2 * C], x[2 * C :]
        plain_by_pair.append(x[: 2 * C])  # classes 0..C-1 at seed a, then at seed b
        for key, d in (("seed ha", H - A), ("seed hb", H - B), ("seed ab", A - B), ("seed a", A)):
            sq.setdefault(key, []).append(band_sq(d, grids))
        images.setdefault("plain", []).append(x[: 2 * C])
        images.setdefault("seed hybrid", []).append(H)
    for k in args.class_swap_steps:
        for a, b in tqdm(pairs, desc=f"class swap from {k}", unit="seed pair"):
            s, y, swap = class_swap_batch(C, a, b, k)
            x = run(s, y, swap)
            B, H = x[: 2 * C], x[2 * C :]
            A = B[list(swap.source[2 * C :])]  # the rows whose coarse features each hybrid got
            for key, d in (("ha", H - A), ("hb", H - B), ("ab", A - B)):
                sq.setdefault(f"class {k} {key}", []).append(band_sq(d, grids))
            images.setdefault(f"class hybrid from {k}", []).append(H)
    swap_seconds = time.perf_counter() - t0
    sqs = {k: torch.cat(v) for k, v in sq.items()}
    plain_all = torch.cat(plain_by_pair)
    plain_sq = band_sq(plain_all, grids)

    def swap_summary(prefix: str) -> dict:
        ha, hb, ab = sqs[f"{prefix} ha"], sqs[f"{prefix} hb"], sqs[f"{prefix} ab"]
        return {
            "hybrids": int(ha.shape[0]),
            "hybrid_to_a_over_a_to_b": pooled_ratio(ha, ab),
            "hybrid_to_b_over_a_to_b": pooled_ratio(hb, ab),
            "share_closer_to_a": (ha < hb).float().mean(0).tolist(),
        }

    swaps = {"same class, other seed, from 0": swap_summary("seed")}
    swaps |= {f"other class, same seed, from {k}": swap_summary(f"class {k}") for k in args.class_swap_steps}
    results: dict = {
        "bands": band_names(grids),
        "swap": swaps,
        "another_seed": pooled_ratio(sqs["seed ab"], sqs["seed a"]),
        "conditions": {},
    }
    conditions: list[tuple[str, Intervention]] = [(f"freeze from {k}", FreezeCoarse(k)) for k in args.freeze_steps]
    conditions += [(f"zero from {k}", FreezeCoarse(k, zero=True)) for k in args.zero_steps]
    conditions += [(f"weights {','.join(f'{w:g}' for w in ws)}", BranchGuidance(ws)) for ws in args.branch_weights]
    t1 = time.perf_counter()
    for name, iv in conditions:
        outs = []
        for a, b in tqdm(pairs, desc=name, unit="seed pair"):
            outs.append(run([a] * C + [b] * C, list(range(C)) * 2, iv))
        x = torch.cat(outs)
        images[name] = [x]
        results["conditions"][name] = {"distance_to_plain": pooled_ratio(band_sq(x - plain_all, grids), plain_sq)}
    results["seconds"] = {"swap": swap_seconds, "conditions": time.perf_counter() - t1}
    results["images_sampled"] = run.images
    results["labels"] = list(range(C)) * 2 * len(pairs)  # of the plain rows and every condition's
    return results, {k: torch.cat(v) for k, v in images.items()}


def judge(results: dict, images: dict[str, torch.Tensor], data: Path, classes: int) -> None:
    """Adds the judge's class accuracy (with its 95% interval) per condition, and for the class swap
    the share of hybrids assigned to A's class (the coarse features') and to B's (the label's)."""
    clf, val_acc, _ = classifier(data, images["plain"].shape[-1], 30)
    labels = torch.tensor(results["labels"])
    out = {"version": JUDGE_RECIPE, "validation_accuracy": val_acc}
    with torch.no_grad():
        for name, x in images.items():
            pred = torch.cat([clf(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
            if name.startswith("class hybrid"):
                out[name] = {
                    "share_class_a": float((pred == (labels - 1) % classes).float().mean()),
                    "share_class_b": float((pred == labels).float().mean()),
                    "n": len(pred),
                }
                continue
            truth = labels if name != "seed hybrid" else labels.view(-1, 2 * classes)[:, :classes].reshape(-1)
            acc = float((pred == truth).float().mean())
            out[name] = {"accuracy": acc, "interval": wilson_interval(acc, len(pred)), "n": len(pred)}
    results["judge"] = out


@torch.no_grad()
def probe_summary(model: torch.nn.Module, plain: torch.Tensor, labels: list[int], times: list[float]) -> dict:
    """The class token's attention and the TD norms on the plain images. For each t, x_t = alpha x0 +
    sigma eps (eps from seed 0): per block, the attention mass on the grid (the rest is on the class
    token itself) and how much more of that mass lands on the object than its area would give
    (foreground: pixels off the white background; 1 = no preference)."""
    from mrdit.probes import class_token_attention, curves_by_branch, td_norm_curves
    from mrdit.schedule import NoiseSchedule

    ns = NoiseSchedule(model.config.schedule)
    g = model.config.branches[0].grid
    S = plain.shape[-1]
    fg = ((plain - 1).abs().amax(1, keepdim=True) > 0.2).float()  # (B, 1, S, S) off-white pixels
    fg_cells = torch.nn.functional.avg_pool2d(fg, S // g)[:, 0]  # (B, g, g) foreground fraction per cell
    eps = torch.randn(plain.shape, generator=torch.Generator().manual_seed(0))
    out: dict = {"times": times, "grid_mass": [], "object_preference": []}
    for t in times:
        tt = torch.tensor(float(t))
        x = float(ns.alpha(tt)) * plain + float(ns.sigma(tt)) * eps
        maps = class_token_attention(model, x, ns.network_step(tt).reshape(1), torch.tensor(labels))  # (B, L, H, g, g)
        mass = maps.sum((-1, -2))  # (B, L, H)
        on_fg = (maps * fg_cells[:, None, None]).sum((-1, -2)) / mass.clamp_min(1e-12)  # (B, L, H)
        area = fg_cells.mean((-1, -2))[:, None, None]  # (B, 1, 1)
        out["grid_mass"].append(mass.mean((0, 2)).tolist())
        out["object_preference"].append((on_fg.mean(0) / area.mean()).mean(-1).tolist())
    curves = curves_by_branch(td_norm_curves(model, num_points=11))
    out["td"] = {
        name: {"t0": float(v[0]), "t0.5": float(v[5]), "t1": float(v[-1])}
        for name, v in zip(curves.names, curves.values)
    }
    return out


def tables(results: dict) -> str:
    bands = results["bands"]
    head = "| | " + " | ".join(bands) + " |\n|---|" + "---|" * len(bands) + "\n"
    fmt = lambda v: " | ".join(f"{x:.2f}" for x in v)  # noqa: E731
    lines = ["**Swap** (hybrid: B's seed and class, A's coarse features)", ""]
    for kind, s in results["swap"].items():
        lines += [f"{kind} ({s['hybrids']} hybrids)", "", head.rstrip()]
        lines.append(f"| \\|H - A\\| / \\|A - B\\| | {fmt(s['hybrid_to_a_over_a_to_b'])} |")
        lines.append(f"| \\|H - B\\| / \\|A - B\\| | {fmt(s['hybrid_to_b_over_a_to_b'])} |")
        lines.append(f"| share closer to A | {fmt(s['share_closer_to_a'])} |")
        lines.append("")
    lines += ["**Freeze and per-branch guidance**: distance to the plain run / size of the plain band", ""]
    lines.append(head.rstrip())
    lines.append(f"| another seed, same class | {fmt(results['another_seed'])} |")
    for name, c in results["conditions"].items():
        lines.append(f"| {name} | {fmt(c['distance_to_plain'])} |")
    if "probes" in results:
        pr = results["probes"]
        L = len(pr["grid_mass"][0])
        lines += ["", "**Class token attention** (mean over heads and images): grid mass / object preference", ""]
        lines += ["| t | " + " | ".join(f"block {i}" for i in range(L)) + " |", "|---|" + "---|" * L]
        for t, m, o in zip(pr["times"], pr["grid_mass"], pr["object_preference"]):
            lines.append(f"| {t:g} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(m, o)) + " |")
        lines += ["", "**Time-dependent norms** (RMS over channels, mean over blocks)", ""]
        lines += ["| parameter | t = 0 | t = 0.5 | t = 1 |", "|---|---|---|---|"]
        for name, v in pr["td"].items():
            lines.append(f"| {name} | {v['t0']:.3f} | {v['t0.5']:.3f} | {v['t1']:.3f} |")
    if "judge" in results:
        j = results["judge"]
        version = f"version {j['version']!r}, " if "version" in j else ""
        lines += ["", f"**Judge** ({version}validation accuracy {j['validation_accuracy'] * 100:.1f}%)", ""]
        lines += ["| images | class accuracy (95% interval) |", "|---|---|"]
        for name, v in j.items():
            if not isinstance(v, dict):  # the version and the validation accuracy, above
                continue
            if "accuracy" in v:
                lo, hi = v["interval"]
                lines.append(f"| {name} | {v['accuracy'] * 100:.1f}% ({lo * 100:.1f}-{hi * 100:.1f}%, n={v['n']}) |")
            else:
                lines.append(
                    f"| {name} | A's class {v['share_class_a'] * 100:.1f}%, B's class {v['share_class_b'] * 100:.1f}%"
                    f" (n={v['n']}) |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, default=Path("weights/mrdit-emoji-32"), help="a DiMR model directory")
    p.add_argument("--seeds-per-class", type=int, default=16, help="even, >= 2 (default 16)")
    p.add_argument("--first-seed", type=int, default=10000, help="seeds from here on (default 10000)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help=f"(default {DEFAULT_SAMPLER})")
    p.add_argument("--class-swap-steps", type=int, nargs="*", default=[8], help="evaluations to swap the class from")
    p.add_argument("--freeze-steps", type=int, nargs="*", default=[0, 8, 16], help="evaluations to freeze from")
    p.add_argument("--zero-steps", type=int, nargs="*", default=[8], help="evaluations to zero the features from")
    p.add_argument(
        "--branch-weights",
        type=parse_weights,
        nargs="*",
        default=[(4.0, 1.0, 1.0), (1.0, 4.0, 1.0), (1.0, 1.0, 1.0)],
        help="per-branch guidance settings, each comma-separated, coarse to fine (default 4,1,1 1,4,1 1,1,1; "
        "ordinary guidance 1,1,w is the plain run)",
    )
    p.add_argument("--judge-data", type=Path, help="prepared emoji data: also score every condition with the judge")
    p.add_argument("--images", type=Path, default=Path("runs/branch-experiments.safetensors"), help="final images")
    p.add_argument(
        "--reuse-images", action="store_true", help="no sampling: measure the saved --images into --out again"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=Path("docs/branch-experiments.json"), help="results (JSON)")
    args = p.parse_args(argv)
    if args.seeds_per_class < 2 or args.seeds_per_class % 2:
        p.error(f"--seeds-per-class must be even and >= 2, got {args.seeds_per_class}")
    if args.steps < 1 or args.guidance < 0 or args.first_seed < 0:
        p.error("--steps must be >= 1, --guidance and --first-seed >= 0")
    if any(k < 0 for k in args.freeze_steps + args.zero_steps + args.class_swap_steps):
        p.error("--class-swap-steps, --freeze-steps and --zero-steps must be >= 0")
    print("config:", json.dumps(vars(args), default=str))
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    for ws in args.branch_weights:
        if len(ws) != len(model.config.branches):
            p.error(f"--branch-weights {ws}: need one weight per branch ({len(model.config.branches)})")
    classes = model.config.num_classes - 1
    if args.judge_data is not None:  # a judge that cannot be built is said now, not after the sampling
        try:
            judge_images(args.judge_data, model.config.image_size, RECIPES[JUDGE_RECIPE].others)
        except (OSError, ValueError) as e:
            p.error(f"--judge-data: {e}")
    if args.reuse_images:
        results = json.loads(args.out.read_text())
        images = {k.replace("_", " "): v.float() / 127.5 - 1 for k, v in load_file(str(args.images)).items()}
    else:
        with torch.no_grad():
            results, images = run_experiments(args, model)
        results["command"] = "python train/branch_experiments.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
        )
        results["settings"] = {
            "model": str(args.model),
            "sampler": args.sampler,
            "steps": args.steps,
            "guidance": args.guidance,
            "seeds": [args.first_seed, args.first_seed + args.seeds_per_class - 1],
            "classes": classes,
        }
        atomic_save_safetensors({k.replace(" ", "_"): to_uint8(v) for k, v in images.items()}, args.images)
    results["probes"] = probe_summary(model, images["plain"], results["labels"], [0.9, 0.5, 0.1])
    if args.judge_data is not None:
        judge(results, images, args.judge_data, classes)
    atomic_write(args.out, lambda f: f.write(json.dumps(results, indent=2).encode()))
    print(tables(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
