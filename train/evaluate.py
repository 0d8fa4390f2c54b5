"""Measure a model's sample quality on the emoji set, honestly and cheaply.

    python train/evaluate.py weights/mrdit-emoji-32 weights/baseline-emoji-32

A small classifier is trained once on the training split (cached beside the data, and trained again
when its recipe or the data change). For each model
directory, N samples per class are generated at fixed seeds and settings; the script reports
(a) the classifier's accuracy on the samples, (b) the Frechet distance between classifier features
of the samples and of the validation split, next to the same distance between the training and
validation splits (the floor), and (c) sampling time per image on this machine. It also scores the
real training images, class-balanced as the samples are: what a model that reproduced them exactly
would get, the ceiling this judge puts on (a). Results go to `eval.json` in each model directory and
into its model card.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mrdit.cards import Evaluation, accuracy_text, percent, write_card, write_evaluation
from mrdit.checkpoint import CheckpointError, read_config
from mrdit.data import load_emoji
from mrdit.guidance import GUIDANCE_SCHEDULES
from mrdit.judge import (
    EmojiClassifier,
    classifier,
    features_of,
    frechet_distance,
    judge_real,
    judge_recipe,
    per_class_accuracy,
    to_size,
)
from mrdit.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, Pipeline
from mrdit.sampling import SAMPLERS, SamplerSettings


def evaluate(
    model_dir: Path, clf: EmojiClassifier, data: Path, per_class: int, sampling: dict[str, Any], judge_size: int
) -> dict:
    """`sampling`: the keyword settings of `Pipeline.generate` (steps, guidance, sampler, schedule).
    Samples are judged at `judge_size` (the classifier's), resized if the model makes another size."""
    pipe = Pipeline.from_pretrained(model_dir)
    val = load_emoji(data, "val", judge_size)
    if pipe.class_names != val.class_names:
        raise SystemExit(f"error: {model_dir} classes {pipe.class_names} differ from the data's {val.class_names}")
    images, labels, seconds = [], [], 0.0
    for c in tqdm(range(len(pipe.class_names)), desc=f"sampling {model_dir.name}", unit="class"):
        t0 = time.perf_counter()
        for start in range(0, per_class, 10):  # batches of 10 images, as the recorded evaluations ran
            seeds = list(range(start, min(start + 10, per_class)))
            res = pipe.generate([c] * len(seeds), seeds, **sampling)
            images.append(torch.from_numpy(res.arrays).permute(0, 3, 1, 2).float() / 127.5 - 1)
        seconds += time.perf_counter() - t0
        labels += [c] * per_class
    x, y = to_size(torch.cat(images), judge_size), torch.tensor(labels)
    with torch.no_grad():
        pred = clf(x).argmax(1)
    xv, _ = val.batch(torch.arange(len(val)))
    per_class_acc = per_class_accuracy(pred, y, pipe.class_names)
    return {
        "accuracy": float((pred == y).float().mean()),
        "per_class_accuracy": per_class_acc,
        "fd": frechet_distance(features_of(clf, x), features_of(clf, xv)),
        "sec_per_image": seconds / len(y),
        "samples_per_class": per_class,
        "judge_size": judge_size,
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
            res = pipe.generate([c] * seeds, list(range(seeds)), **sampling)
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


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("models", type=Path, nargs="+", help="model directories")
    p.add_argument("--data", type=Path, default=Path("data/emoji"), help="prepared emoji data (default data/emoji)")
    p.add_argument("--per-class", type=int, default=20, help="samples per class (default 20)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="w (the maximum w with power-cosine)")
    p.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default="constant")
    p.add_argument("--guidance-power", type=float, default=1.0, help="p of the power-cosine schedule")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help=f"(default {DEFAULT_SAMPLER})")
    p.add_argument(
        "--classifier-epochs",
        type=int,
        default=30,
        help="epochs of the judge's training (default 30); a cached judge trained otherwise is retrained",
    )
    p.add_argument(
        "--judge-size",
        type=int,
        help="judge at this image size (a prepared size of the data); samples of another size are resized "
        "(area-averaged down). Default: the models' own size, which must then be the same for all",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--no-card", action="store_true", help="do not write eval.json / update the model cards")
    p.add_argument("--figure", type=Path, help="also write a side-by-side figure of the models at the same seeds (PNG)")
    args = p.parse_args(argv)
    if args.per_class < 1:
        p.error("--per-class must be >= 1")
    try:  # the sampler's own checks, with messages that name the field
        SamplerSettings(args.sampler, args.steps, args.guidance, args.guidance_schedule, args.guidance_power)
    except ValueError as e:
        p.error(str(e))
    if args.classifier_epochs < 1:
        p.error("--classifier-epochs must be >= 1")
    if args.judge_size is not None and args.judge_size < 1:
        p.error("--judge-size must be >= 1")
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
    """The classifier at one size and its scores on real emoji: what every model's samples are set against."""

    clf: EmojiClassifier
    size: int
    fd_floor: float  # Frechet distance, training split vs validation split
    val_accuracy: float
    val_per_class: dict[str, float | None]
    train_accuracy: float  # class-balanced: the score of a model that reproduced its training images
    train_per_class: dict[str, float | None]
    recipe: dict[str, str]


def make_judge(p: argparse.ArgumentParser, data: Path, size: int, epochs: int) -> Judge:
    try:
        clf, val_acc, val_per_class = classifier(data, size, epochs)
    except (OSError, ValueError) as e:  # no such prepared size, or no prepared data at all
        p.error(f"cannot judge at {size} px: {e}")
    train, val = load_emoji(data, "train", size), load_emoji(data, "val", size)
    xt, _ = train.batch(torch.arange(len(train)))
    xv, _ = val.batch(torch.arange(len(val)))
    floor = frechet_distance(features_of(clf, xt), features_of(clf, xv))
    print(f"classifier accuracy on the validation split: {val_acc * 100:.1f}%; FD floor (train vs val): {floor:.2f}")
    train_acc, train_per_class = judge_real(clf, train)
    print(
        f"classifier accuracy on the training images (class-balanced; a model that reproduced them exactly "
        f"would score this): {train_acc * 100:.1f}%"
    )
    return Judge(clf, size, floor, val_acc, val_per_class, train_acc, train_per_class, judge_recipe(epochs, train))


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword settings of `Pipeline.generate` every model is sampled with."""
    return {
        "steps": args.steps,
        "guidance": args.guidance,
        "sampler": args.sampler,
        "guidance_schedule": args.guidance_schedule,
        "guidance_power": args.guidance_power,
    }


def evaluation_record(measured: dict, judge: Judge, command: str, hardware: str) -> Evaluation:
    """One model's numbers (`evaluate`) with the judge's own, the command and the machine."""
    return Evaluation.from_dict(
        measured
        | {
            "fd_floor": judge.fd_floor,
            "classifier_val_accuracy": judge.val_accuracy,
            "classifier_val_per_class_accuracy": judge.val_per_class,
            "classifier_train_accuracy": judge.train_accuracy,
            "classifier_train_per_class_accuracy": judge.train_per_class,
            "classifier_recipe": judge.recipe,
            "command": command,
            "hardware": hardware,
        }
    )


def print_results(rows: list[tuple[str, Evaluation]], judge: Judge) -> None:
    print(f"\n| model | accuracy | FD (floor {judge.fd_floor:.2f}) | s / image |\n|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {accuracy_text(r)} | {r.fd:.2f} | {r.sec_per_image:.3f} |")
    print("\n" + per_class_table(rows, judge.train_per_class, judge.val_per_class))


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    print("config:", json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, default=str))
    if args.threads:
        torch.set_num_threads(args.threads)
    size = judge_size(p, args.models, args.judge_size)
    judge = make_judge(p, args.data, size, args.classifier_epochs)
    command = "python train/evaluate.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    hardware = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    sampling = sampling_settings(args)
    rows = []
    for m in args.models:
        r = evaluation_record(
            evaluate(m, judge.clf, args.data, args.per_class, sampling, size), judge, command, hardware
        )
        rows.append((m.name, r))
        if not args.no_card:
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
    print_results(rows, judge)
    return 0


def per_class_table(
    rows: list[tuple[str, Evaluation]], train_per_class: dict[str, float | None], val_per_class: dict[str, float | None]
) -> str:
    """Markdown: per class, each model's sample accuracy next to the classifier's on real training and
    validation emoji."""
    head = "| class | " + " | ".join(name for name, _ in rows) + " | real training emoji | real validation emoji |"
    lines = [head, "|---" * (len(rows) + 3) + "|"]
    for cname, real in val_per_class.items():
        cells = " | ".join(percent(r.per_class_accuracy[cname]) for _, r in rows)
        lines.append(f"| {cname} | {cells} | {percent(train_per_class[cname])} | {percent(real)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
