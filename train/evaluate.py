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
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from mrdit.checkpoint import CheckpointError, atomic_save_safetensors, read_config
from mrdit.data import TensorImageDataset, load_emoji
from mrdit.guidance import GUIDANCE_SCHEDULES
from mrdit.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, Pipeline
from mrdit.sampling import SAMPLERS, SamplerSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import accuracy_text, percent, write_card  # noqa: E402

JUDGE_LR = 2e-3
# Bumped whenever the classifier's training changes, so that no cache made by another recipe is reused.
JUDGE_RECIPE = "2: cosine"


class EmojiClassifier(nn.Module):
    """A small CNN; its 64-d penultimate layer is the feature space for the Frechet distance."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()

        def block(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.Conv2d(o, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feat = nn.Sequential(nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat(self.body(x))  # (B, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(train: TensorImageDataset, epochs: int, seed: int = 0) -> EmojiClassifier:
    """AdamW at 2e-3 with a one-epoch warm-up and a cosine decay to zero, so that the judge ends
    converged rather than wherever a constant rate leaves it (which also made it depend on the run)."""
    torch.manual_seed(seed)
    clf = EmojiClassifier(len(train.class_names))
    opt = torch.optim.AdamW(clf.parameters(), lr=JUDGE_LR, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    n = len(train)
    per_epoch = math.ceil(n / 64)
    total, step = epochs * per_epoch, 0
    for _ in tqdm(range(epochs), desc="classifier", unit="epoch"):
        clf.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 64):
            for group in opt.param_groups:
                group["lr"] = JUDGE_LR * min(1.0, (step + 1) / per_epoch) * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[i : i + 64]
            x, y = train.batch(idx, torch.rand(len(idx), generator=g) < 0.5)
            # light augmentation so that generated (slightly noisy, shifted) images are judged fairly
            x = x + 0.05 * torch.randn(x.shape, generator=g)
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(clf(x), y, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return clf.eval()


def per_class_accuracy(pred: torch.Tensor, y: torch.Tensor, class_names: list[str]) -> dict[str, float | None]:
    """Accuracy within each class (None for a class with no examples)."""
    return {
        name: float((pred[y == c] == c).float().mean()) if bool((y == c).any()) else None
        for c, name in enumerate(class_names)
    }


def judge_recipe(epochs: int, train: TensorImageDataset) -> dict[str, str]:
    """What a cached classifier was trained with and on (recipe, epochs, the training split's size and
    classes); a cache made any other way is retrained."""
    return {
        "judge_recipe": JUDGE_RECIPE,
        "epochs": str(epochs),
        "train_images": str(len(train)),
        "classes": ",".join(train.class_names),
    }


def classifier(data: Path, size: int, epochs: int) -> tuple[EmojiClassifier, float, dict[str, float | None]]:
    """The cached classifier for a dataset (trained on first use, or again when the cache was made by
    another recipe, epoch count or training split), its accuracy on the validation split and that accuracy per class:
    how well the judge itself recognises real emoji of each class."""
    train, val = load_emoji(data, "train", size), load_emoji(data, "val", size)
    path = data / f"classifier-{size}.safetensors"
    clf = EmojiClassifier(len(train.class_names))
    recipe = judge_recipe(epochs, train)
    cached = None
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                cached = f.metadata() or {}
        except Exception as e:  # a corrupt cache is only a cache: say so and train again
            print(f"cached classifier {path} is unreadable ({e}); training it again")
    if cached is not None and {k: cached.get(k) for k in recipe} == recipe:
        clf.load_state_dict(load_file(str(path)))
        clf.eval()
    else:
        if cached is not None:
            print(
                f"cached classifier {path} was trained with {cached or 'an older recipe'}, not {recipe}; training again"
            )
        clf = train_classifier(train, epochs)
        atomic_save_safetensors(clf.state_dict(), path, metadata=recipe)  # never a half-written cache
    pred, y = predictions(clf, val)
    return clf, float((pred == y).float().mean()), per_class_accuracy(pred, y, val.class_names)


def predictions(clf: EmojiClassifier, data: TensorImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's predicted class for every real image of a split, and the true classes."""
    x, y = data.batch(torch.arange(len(data)))
    with torch.no_grad():
        return torch.cat([clf(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)]), y


def judge_real(clf: EmojiClassifier, data: TensorImageDataset) -> tuple[float, dict[str, float | None]]:
    """The classifier on real images of a split: the class-balanced mean of its per-class accuracy and
    those accuracies. On the training split this is the score of a model that reproduced its training
    images exactly (the samples are class-balanced too): a ceiling the judge puts on the samples' score."""
    pred, y = predictions(clf, data)
    per_class = per_class_accuracy(pred, y, data.class_names)
    present = [a for a in per_class.values() if a is not None]
    return sum(present) / len(present), per_class


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with the trace of the root from the
    eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric, so no general matrix square root is needed)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    ea, va = torch.linalg.eigh(sa)
    root_a = va @ torch.diag(ea.clamp(min=0).sqrt()) @ va.T
    cross = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + sa.trace() + sb.trace() - 2 * cross)


@torch.no_grad()
def features_of(clf: EmojiClassifier, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([clf.features(x[i : i + 256]) for i in range(0, len(x), 256)])


def to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, C, H, W) at the judge's size: area-averaged down (or bilinear up) when they differ."""
    if x.shape[-1] == size:
        return x
    mode = "area" if x.shape[-1] > size else "bilinear"
    return F.interpolate(x, size=(size, size), mode=mode)


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


def main(argv: list[str] | None = None) -> int:
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
    print("config:", json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, default=str))
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {}
    for m in args.models:
        try:
            sizes[m] = read_config(m).image_size
        except CheckpointError as e:
            p.error(str(e))
    if args.judge_size is None and len(set(sizes.values())) > 1:
        p.error(f"the models make different image sizes ({sorted(set(sizes.values()))}); pass --judge-size")
    size = args.judge_size or next(iter(sizes.values()))
    try:
        clf, val_acc, val_per_class = classifier(args.data, size, args.classifier_epochs)
    except (OSError, ValueError) as e:  # no such prepared size, or no prepared data at all
        p.error(f"cannot judge at {size} px: {e}")
    train, val = load_emoji(args.data, "train", size), load_emoji(args.data, "val", size)
    xt, _ = train.batch(torch.arange(len(train)))
    xv, _ = val.batch(torch.arange(len(val)))
    floor = frechet_distance(features_of(clf, xt), features_of(clf, xv))
    print(f"classifier accuracy on the validation split: {val_acc * 100:.1f}%; FD floor (train vs val): {floor:.2f}")
    train_acc, train_per_class = judge_real(clf, train)
    print(
        f"classifier accuracy on the training images (class-balanced; a model that reproduced them exactly "
        f"would score this): {train_acc * 100:.1f}%"
    )
    command = "python train/evaluate.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    hardware = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    sampling = {
        "steps": args.steps,
        "guidance": args.guidance,
        "sampler": args.sampler,
        "guidance_schedule": args.guidance_schedule,
        "guidance_power": args.guidance_power,
    }
    rows = []
    for m in args.models:
        r = evaluate(m, clf, args.data, args.per_class, sampling, size)
        r |= {
            "fd_floor": floor,
            "classifier_val_accuracy": val_acc,
            "classifier_val_per_class_accuracy": val_per_class,
            "classifier_train_accuracy": train_acc,
            "classifier_train_per_class_accuracy": train_per_class,
            "classifier_recipe": judge_recipe(args.classifier_epochs, train),
            "command": command,
            "hardware": hardware,
        }
        rows.append((m.name, r))
        if not args.no_card:
            (m / "eval.json").write_text(json.dumps(r, indent=2))
            write_card(m)
    if args.figure:
        side_by_side(
            [Pipeline.from_pretrained(m) for m in args.models],
            [m.name for m in args.models],
            args.figure,
            sampling,
        )
        print(f"wrote {args.figure}")
    print(f"\n| model | accuracy | FD (floor {floor:.2f}) | s / image |\n|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {accuracy_text(r)} | {r['fd']:.2f} | {r['sec_per_image']:.3f} |")
    print("\n" + per_class_table(rows, train_per_class, val_per_class))
    return 0


def per_class_table(
    rows: list[tuple[str, dict]], train_per_class: dict[str, float | None], val_per_class: dict[str, float | None]
) -> str:
    """Markdown: per class, each model's sample accuracy next to the classifier's on real training and
    validation emoji."""
    head = "| class | " + " | ".join(name for name, _ in rows) + " | real training emoji | real validation emoji |"
    lines = [head, "|---" * (len(rows) + 3) + "|"]
    for cname, real in val_per_class.items():
        cells = " | ".join(percent(r["per_class_accuracy"][cname]) for _, r in rows)
        lines.append(f"| {cname} | {cells} | {percent(train_per_class[cname])} | {percent(real)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
