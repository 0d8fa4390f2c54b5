"""Measure a model's sample quality on the emoji set, by the protocol of docs/evaluation.md.

    python train/evaluate.py weights/mrdit-emoji-32 weights/baseline-emoji-32

A small classifier, the judge, is trained once on the training split (cached beside the data, and
trained again when its recipe version or the data change). For each model directory, N samples per
class are generated at the default settings and at held-out seeds (from 10,000; seeds below it are for
tuning), and the script reports (a) the judge's accuracy on the samples with its 95% interval and
sample count, beside the judge's own accuracy on the real validation split, overall and per class,
(b) the Frechet distance between judge features of the samples and of the validation split, next to
the same distance between the training and validation splits (the floor) and for real training
images drawn as the samples are (what a model that reproduced them exactly would score), (c) the memorisation check:
the share of samples at least as close to a training image as the closest 5% of real validation
images are, and (d) sampling time per image on this machine. It also scores the real training images,
class-balanced as the samples are: what a model that reproduced them exactly would get, the ceiling
this judge puts on (a). Results go to `eval.json` in each model directory and into its model card.

With --tuning the seeds are tuning seeds (from 0 unless --first-seed says otherwise, all below
10,000), any sample count is allowed, and nothing is written into the model directories; --json
keeps the records of either kind.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mrdit.cards import (
    Evaluation,
    accuracy_text,
    judge_accuracy_text,
    near_copies_text,
    percent,
    seeds_text,
    write_card,
    write_evaluation,
)
from mrdit.checkpoint import CheckpointError, read_config
from mrdit.data import load_emoji
from mrdit.guidance import GUIDANCE_SCHEDULES
from mrdit.interventions import BranchGuidance
from mrdit.judge import (
    JUDGE_EPOCHS,
    JUDGE_RECIPE,
    RECIPES,
    REFERENCE_DRAWS,
    REPORT_FIRST_SEED,
    REPORT_MIN_PER_CLASS,
    EmojiClassifier,
    balanced_reference,
    classifier,
    features_of,
    frechet_distance,
    judge_images,
    judge_real,
    judge_recipe,
    low_level_features,
    near_copies,
    per_class_accuracy,
    protocol_problems,
    to_size,
)
from mrdit.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, Pipeline
from mrdit.sampling import SAMPLER_REGISTRY, SAMPLERS, SamplerSettings, sample_dpmpp_2m_sde
from mrdit.settings import InputError


def generate_kwargs(sampling: dict[str, Any]) -> dict[str, Any]:
    """`Pipeline.generate`'s keywords for recorded sampling settings: per-branch guidance weights become
    the intervention that applies them."""
    kwargs = {k: v for k, v in sampling.items() if k != "branch_guidance"}
    if "branch_guidance" in sampling:
        kwargs["intervention"] = BranchGuidance(sampling["branch_guidance"])
    return kwargs


def draw_samples(
    pipe: Pipeline, per_class: int, first_seed: int, sampling: dict[str, Any], name: str = "model"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`per_class` samples of every class at seeds first_seed.. (the same seeds for each class): images
    (N, 3, S, S) in [-1, 1], their classes (N,) and the seconds spent sampling."""
    images, labels, seconds = [], [], 0.0
    settings = generate_kwargs(sampling)
    for c in tqdm(range(len(pipe.class_names)), desc=f"sampling {name}", unit="class"):
        t0 = time.perf_counter()
        for start in range(0, per_class, 10):  # batches of 10 images, as the recorded evaluations ran
            seeds = list(range(first_seed + start, first_seed + min(start + 10, per_class)))
            res = pipe.generate([c] * len(seeds), seeds, **settings)
            images.append(torch.from_numpy(res.arrays).permute(0, 3, 1, 2).float() / 127.5 - 1)
        seconds += time.perf_counter() - t0
        labels += [c] * per_class
    return torch.cat(images), torch.tensor(labels), seconds


def evaluate(model_dir: Path, judge: Judge, per_class: int, first_seed: int, sampling: dict[str, Any]) -> dict:
    """`sampling`: the keyword settings of `Pipeline.generate` (steps, guidance, sampler, schedule).
    Samples are judged at the judge's size, resized if the model makes another size."""
    pipe = Pipeline.from_pretrained(model_dir)
    if pipe.class_names != judge.class_names:
        raise SystemExit(f"error: {model_dir} classes {pipe.class_names} differ from the data's {judge.class_names}")
    x, y, seconds = draw_samples(pipe, per_class, first_seed, sampling, model_dir.name)
    x = to_size(x, judge.size)
    with torch.no_grad():
        pred = judge.clf(x).argmax(1)
    features = features_of(judge.clf, x)
    copies = near_copies(features, judge.train_features, judge.val_features)
    return {
        "accuracy": float((pred == y).float().mean()),
        "per_class_accuracy": per_class_accuracy(pred, y, pipe.class_names),
        "fd": frechet_distance(features, judge.val_features),
        "fd_low": frechet_distance(low_level_features(judge.clf, x), judge.val_low_features),
        "near_copies": copies.share,
        "near_copies_reference": copies.reference,
        "near_copy_threshold": copies.threshold,
        "sec_per_image": seconds / len(y),
        "samples_per_class": per_class,
        "first_seed": first_seed,
        "judge_size": judge.size,
    } | sampling


def side_by_side(pipes: list[Pipeline], names: list[str], path: Path, sampling: dict[str, Any], seeds: int = 4) -> None:
    """One row per class; for each model, `seeds` samples at seeds 0..seeds-1 (same noise for every model)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from mrdit.visual import grid, upscale_nearest

    display, pad, gap, head, left = 64, 2, 16, 24, 130
    blocks = []
    for pipe in pipes:
        tiles = []
        for c in range(len(pipe.class_names)):
            res = pipe.generate([c] * seeds, list(range(seeds)), **generate_kwargs(sampling))
            tiles += [upscale_nearest(np.asarray(im), display) for im in res.images]
        blocks.append(grid(tiles, cols=seeds, pad=pad))
    h = blocks[0].shape[0]
    width = left + sum(b.shape[1] for b in blocks) + gap * (len(blocks) - 1)
    canvas = Image.new("RGB", (width, h + head), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    x = left
    for b, name in zip(blocks, names, strict=True):
        canvas.paste(Image.fromarray(b), (x, head))
        draw.text((x + 4, 4), name, fill=(20, 20, 20), font=font)
        x += b.shape[1] + gap
    for c, cname in enumerate(pipes[0].class_names):
        draw.text((6, head + pad + c * (display + pad) + display // 2 - 8), cname, fill=(20, 20, 20), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def branch_weights(text: str) -> tuple[float, ...]:
    """'4,1,1' -> (4.0, 1.0, 1.0): per-branch guidance weights (checked against the model when it loads)."""
    try:
        return BranchGuidance(tuple(float(w) for w in text.split(","))).weights
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("models", type=Path, nargs="+", help="model directories")
    p.add_argument("--data", type=Path, default=Path("data/emoji"), help="prepared emoji data (default data/emoji)")
    p.add_argument(
        "--per-class",
        type=int,
        default=REPORT_MIN_PER_CLASS,
        help=f"samples per class (default {REPORT_MIN_PER_CLASS}, the fewest a reported number may use)",
    )
    p.add_argument(
        "--first-seed",
        type=int,
        help=f"seeds first-seed.. of each class (default {REPORT_FIRST_SEED:,}; 0 with --tuning). Reported "
        f"numbers use seeds from {REPORT_FIRST_SEED:,}; those below are for tuning and selection",
    )
    p.add_argument(
        "--tuning",
        action="store_true",
        help=f"measure for tuning: seeds below {REPORT_FIRST_SEED:,}, any sample count or judge epochs; "
        "printed as tuning, never written into eval.json or the card",
    )
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="w (the maximum w with power-cosine)")
    p.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default="constant")
    p.add_argument("--guidance-power", type=float, default=1.0, help="p of the power-cosine schedule")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help=f"(default {DEFAULT_SAMPLER})")
    p.add_argument(
        "--eta", type=float, help="the sampler's fresh noise, for dpm++2m-sde, ddim and ddpm (default: the sampler's)"
    )
    p.add_argument(
        "--sde-variant",
        choices=sorted(SDE_VARIANTS),
        help="a variant of dpm++2m-sde's last steps, for tuning (docs/evaluation.md): 'ode-tail' takes the "
        "deterministic update for the steps that start at t <= 0.2, 'second-order-end' keeps the step to "
        "t = 1/N second order. Needs --sampler dpm++2m-sde and --tuning or --no-card",
    )
    p.add_argument(
        "--branch-guidance",
        type=branch_weights,
        help="per-branch guidance weights, coarse to fine, e.g. 4,1,1 (mrdit.interventions.BranchGuidance; "
        "replaces --guidance), for measurement: needs --tuning or --no-card",
    )
    p.add_argument(
        "--classifier-epochs",
        type=int,
        default=JUDGE_EPOCHS,
        help=f"epochs of the judge's training (default {JUDGE_EPOCHS}, the frozen recipe's; others only "
        "with --tuning); a cached judge trained otherwise is retrained",
    )
    p.add_argument(
        "--judge-size",
        type=int,
        help="judge at this image size (a prepared size of the data); samples of another size are resized "
        "(area-averaged down). Default: the models' own size, which must then be the same for all",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--no-card", action="store_true", help="do not write eval.json / update the model cards")
    p.add_argument("--json", type=Path, help="also write every model's record here (JSON; tuning ones too)")
    p.add_argument("--figure", type=Path, help="also write a side-by-side figure of the models at the same seeds (PNG)")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, checked: settings the sampler or the protocol refuses end in a usage error."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.per_class < 1:
        p.error("--per-class must be >= 1")
    try:  # the sampler's own checks, with messages that name the field
        SamplerSettings(args.sampler, args.steps, args.guidance, args.guidance_schedule, args.guidance_power, args.eta)
    except ValueError as e:
        p.error(str(e))
    if args.sde_variant and args.sampler != "dpm++2m-sde":
        p.error("--sde-variant needs --sampler dpm++2m-sde")
    if args.sde_variant and not (args.tuning or args.no_card):
        p.error("--sde-variant is for measurement only: pass --tuning or --no-card (the cards keep the default)")
    if args.branch_guidance and not (args.tuning or args.no_card):
        p.error("--branch-guidance is for measurement only: pass --tuning or --no-card (the cards keep the default)")
    if args.classifier_epochs < 1:
        p.error("--classifier-epochs must be >= 1")
    if args.judge_size is not None and args.judge_size < 1:
        p.error("--judge-size must be >= 1")
    if args.first_seed is None:
        args.first_seed = 0 if args.tuning else REPORT_FIRST_SEED
    if args.first_seed < 0:
        p.error("--first-seed must be >= 0")
    problems = protocol_problems(args.first_seed, args.per_class, args.tuning, args.classifier_epochs)
    if problems:
        p.error("; ".join(problems) + ("" if args.tuning else " (pass --tuning to measure for tuning)"))
    return p, args


def judge_size(p: argparse.ArgumentParser, models: list[Path], requested: int | None) -> int:
    """The size to judge at: `requested`, or the models' common image size."""
    sizes = {}
    for m in models:
        try:
            sizes[m] = read_config(m).image_size
        except CheckpointError as e:
            p.error(str(e))
    if requested is None and len(set(sizes.values())) > 1:
        p.error(f"the models make different image sizes ({sorted(set(sizes.values()))}); pass --judge-size")
    return requested or next(iter(sizes.values()))


@dataclass(frozen=True)
class Judge:
    """The classifier at one size, its features of the real images and its scores on them: what every
    model's samples are set against."""

    clf: EmojiClassifier
    size: int
    class_names: list[str]
    train_features: torch.Tensor  # (N_train, 64)
    val_features: torch.Tensor  # (N_val, 64)
    fd_floor: float  # Frechet distance, training split vs validation split
    val_low_features: torch.Tensor  # (N_val, 64): first-layer statistics (mrdit.judge.low_level_features)
    fd_low_floor: float  # the low-level Frechet distance, training split vs validation split
    val_accuracy: float
    val_per_class: dict[str, float | None]
    val_per_class_images: dict[str, int]
    train_accuracy: float  # class-balanced: the score of a model that reproduced its training images
    train_per_class: dict[str, float | None]
    recipe: dict[str, str]
    # the distances of real training images drawn as the samples are (mrdit.judge.balanced_reference);
    # None when a class has too few training images
    fd_reference: float | None = None
    fd_low_reference: float | None = None

    @property
    def val_images(self) -> int:
        return len(self.val_features)


def make_judge(p: argparse.ArgumentParser, data: Path, size: int, epochs: int, per_class: int) -> Judge:
    try:
        clf, val_acc, val_per_class = classifier(data, size, epochs)
    except (OSError, ValueError) as e:  # no such prepared size, or no prepared data at all
        p.error(f"cannot judge at {size} px: {e}")
    train, val = load_emoji(data, "train", size), load_emoji(data, "val", size)
    ft = features_of(clf, train.batch(torch.arange(len(train)))[0])
    fv = features_of(clf, val.batch(torch.arange(len(val)))[0])
    floor = frechet_distance(ft, fv)
    low_t = low_level_features(clf, train.batch(torch.arange(len(train)))[0])
    low_v = low_level_features(clf, val.batch(torch.arange(len(val)))[0])
    low_floor = frechet_distance(low_t, low_v)
    recipe = judge_recipe(epochs, judge_images(data, size, RECIPES[JUDGE_RECIPE].others))
    print(
        f"judge version {recipe['judge_recipe']!r}, {epochs} epochs: accuracy on the real validation split "
        f"{val_acc * 100:.1f}% of {len(val)}; FD floor (train vs val): {floor:.2f}, low-level {low_floor:.3f}"
    )
    train_acc, train_per_class = judge_real(clf, train)
    print(
        f"judge accuracy on the training images (class-balanced; a model that reproduced them exactly "
        f"would score this): {train_acc * 100:.1f}%"
    )
    counts = {name: int((val.labels == c).sum()) for c, name in enumerate(val.class_names)}
    reference = balanced_reference(clf, train, per_class, fv, low_v) or (None, None)
    if reference[0] is not None:
        print(
            f"real training images drawn as the samples are ({per_class} per class, mean of {REFERENCE_DRAWS} "
            f"draws; what a model that reproduced them exactly would score): FD {reference[0]:.2f}, "
            f"low-level {reference[1]:.3f}"
        )
    return Judge(
        clf,
        size,
        val.class_names,
        ft,
        fv,
        floor,
        low_v,
        low_floor,
        val_acc,
        val_per_class,
        counts,
        train_acc,
        train_per_class,
        recipe,
        *reference,
    )


# The variants of dpm++2m-sde's tail that --sde-variant measures (keyword settings of sample_dpmpp_2m_sde).
SDE_VARIANTS: dict[str, dict[str, Any]] = {
    "ode-tail": {"ode_below": 0.2},
    "second-order-end": {"second_order_end": True},
}


def use_sde_variant(name: str) -> None:
    """Sample 'dpm++2m-sde' with the named tail variant in this process (a measurement switch, not a setting)."""
    spec = SAMPLER_REGISTRY["dpm++2m-sde"]
    variant = functools.partial(sample_dpmpp_2m_sde, **SDE_VARIANTS[name])
    SAMPLER_REGISTRY["dpm++2m-sde"] = replace(spec, fn=variant)


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword settings of `Pipeline.generate` every model is sampled with."""
    return (
        {
            "steps": args.steps,
            "guidance": args.guidance,
            "sampler": args.sampler,
            "guidance_schedule": args.guidance_schedule,
            "guidance_power": args.guidance_power,
        }
        | ({} if args.eta is None else {"eta": args.eta})
        | ({"branch_guidance": args.branch_guidance} if args.branch_guidance else {})
    )


def evaluation_record(measured: dict, judge: Judge, command: str, hardware: str, tuning: bool) -> Evaluation:
    """One model's numbers (`evaluate`) with the judge's own, the command and the machine."""
    return Evaluation.from_dict(
        measured
        | {
            "tuning": tuning,
            "fd_floor": judge.fd_floor,
            "fd_low_floor": judge.fd_low_floor,
            "fd_reference": judge.fd_reference,
            "fd_low_reference": judge.fd_low_reference,
            "classifier_val_accuracy": judge.val_accuracy,
            "classifier_val_images": judge.val_images,
            "classifier_val_per_class_accuracy": judge.val_per_class,
            "classifier_val_per_class_images": judge.val_per_class_images,
            "classifier_train_accuracy": judge.train_accuracy,
            "classifier_train_per_class_accuracy": judge.train_per_class,
            "classifier_recipe": judge.recipe,
            "command": command,
            "hardware": hardware,
        }
    )


def print_results(rows: list[tuple[str, Evaluation]], judge: Judge) -> None:
    """The summary and per-class tables; a tuning measurement says so above them."""
    first = rows[0][1]
    if first.tuning:
        print("\nTUNING (not for reporting; nothing written into the model cards):")
    print(f"\njudge version {first.judge_version!r}, {seeds_text(first)}, {first.samples_per_class} per class")
    print(
        f"\n| model | accuracy | judge on real validation emoji | FD (floor {judge.fd_floor:.2f}) | "
        f"low-level FD (floor {judge.fd_low_floor:.3f}) | near-copies | s / image |\n|---|---|---|---|---|---|---|"
    )
    for name, r in rows:
        print(
            f"| {name} | {accuracy_text(r)} | {judge_accuracy_text(r)} | {r.fd:.2f} | {r.fd_low:.3f} | "
            f"{near_copies_text(r)} | {r.sec_per_image:.3f} |"
        )
    if judge.fd_reference is not None:
        print(
            f"(real training images drawn as the samples are score FD {judge.fd_reference:.2f}, low-level "
            f"{judge.fd_low_reference:.3f}: docs/evaluation.md)"
        )
    print("\n" + per_class_table(rows, judge))


def hardware_text() -> str:
    """ "x86_64 CPU, 2 threads, load average 1.2 at the start": the sampling time depends on all three."""
    text = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    if hasattr(os, "getloadavg"):
        text += f", load average {os.getloadavg()[0]:.1f} at the start"
    return text


def write_records(rows: list[tuple[str, Evaluation]], path: Path) -> None:
    """Every model's record, by model directory name (for tuning runs, whose records go nowhere else)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: r.to_dict() for name, r in rows}, indent=2))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    print("config:", json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, default=str))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sde_variant:
        use_sde_variant(args.sde_variant)
    size = judge_size(p, args.models, args.judge_size)
    judge = make_judge(p, args.data, size, args.classifier_epochs, args.per_class)
    command = "python train/evaluate.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    hardware = hardware_text()
    sampling = sampling_settings(args)
    rows = []
    for m in args.models:
        try:
            measured = evaluate(m, judge, args.per_class, args.first_seed, sampling)
        except InputError as e:  # settings this model cannot take (per-branch weights for other branches)
            raise SystemExit(f"error: {m}: {e}") from None
        r = evaluation_record(measured, judge, command, hardware, args.tuning)
        rows.append((m.name, r))
        if not (args.no_card or args.tuning):
            write_evaluation(m, r)
            write_card(m)
    if args.figure:
        side_by_side(
            [Pipeline.from_pretrained(m) for m in args.models],
            [m.name for m in args.models],
            args.figure,
            sampling,
        )
        print(f"wrote {args.figure}")
    if args.json:
        write_records(rows, args.json)
    print_results(rows, judge)
    return 0


def per_class_table(rows: list[tuple[str, Evaluation]], judge: Judge) -> str:
    """Markdown: per class, each model's sample accuracy next to the judge's on real training and
    validation emoji (with the number of validation images)."""
    head = "| class | " + " | ".join(name for name, _ in rows) + " | real training emoji | real validation emoji |"
    lines = [head, "|---" * (len(rows) + 3) + "|"]
    for cname, real in judge.val_per_class.items():
        cells = " | ".join(percent(r.per_class_accuracy[cname]) for _, r in rows)
        seen = percent(judge.train_per_class[cname])
        lines.append(f"| {cname} | {cells} | {seen} | {percent(real)} of {judge.val_per_class_images[cname]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
