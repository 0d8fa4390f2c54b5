"""The judge of the emoji models' samples: a small classifier trained on the training split, and the
numbers made with it (class accuracy with its Wilson interval, Frechet distance of its features).

`train/evaluate.py` scores model directories with it; `train/branch_experiments.py` scores the images
of its conditions. The trained classifier is cached beside the data, stamped with its recipe, and
trained again when the recipe or the data change. The rules a reported number follows (the judge's
version, held-out seeds, sample counts, the memorisation check) are in docs/evaluation.md.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from .checkpoint import atomic_save_safetensors
from .data import TensorImageDataset, load_emoji

JUDGE_LR = 2e-3
# The judge's version. Any change to the classifier's training is a new version, and every reported number
# is measured again with it in the same change (docs/evaluation.md); a cache made by another version is
# never reused.
JUDGE_RECIPE = "3: subcategories"
JUDGE_EPOCHS = 30  # part of the frozen recipe: a judge trained for other epochs measures for tuning only
# Seeds below REPORT_FIRST_SEED are for tuning and selection; reported numbers use seeds from it on, with
# at least REPORT_MIN_PER_CLASS samples per class (docs/evaluation.md).
REPORT_FIRST_SEED = 10_000
REPORT_MIN_PER_CLASS = 50
NEAR_COPY_QUANTILE = 0.05  # the memorisation check's threshold, as a quantile of real validation images' distances


@dataclass(frozen=True)
class Recipe:
    """How a judge is trained. `fine`: a second head learns every image's emoji.json subcategory (99 finer
    labels), so the features must tell a teapot from a cup; `others`: the base emoji of no class (about
    3,000 images) are learnt too, through that head; `strong`: random scale, rotation, shift, contrast,
    blur and noise instead of the light noise and shift."""

    fine: bool = True
    others: bool = True
    strong: bool = True
    epochs: int = JUDGE_EPOCHS


# The recipes train/choose_judge.py compared on a held-out fold of the training split (docs/evaluation.md);
# JUDGE_RECIPE names the one chosen.
RECIPES = {
    "2: cosine": Recipe(fine=False, others=False, strong=False),
    "3: subcategories": Recipe(fine=True, others=True, strong=False),
    "3: subcategories, strong": Recipe(fine=True, others=True, strong=True),
    "3: subcategories, strong, no others": Recipe(fine=True, others=False, strong=True),
}


class EmojiClassifier(nn.Module):
    """A small CNN; its 64-d penultimate layer is the feature space for the Frechet distance. `head` gives
    this project's classes; `fine_head`, when there is one, the subcategories it learnt from."""

    def __init__(self, num_classes: int, num_fine: int = 0) -> None:
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
        self.fine_head = nn.Linear(64, num_fine) if num_fine else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat(self.body(x))  # (B, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class JudgeImages:
    """What a judge learns from: real images (N, 3, S, S) in [-1, 1], their class (-1 for an emoji of no
    class), their subcategory, whether a flip keeps them what they are, and which emoji each one shows."""

    x: torch.Tensor
    labels: torch.Tensor
    fine: torch.Tensor
    flip_ok: torch.Tensor
    emoji: torch.Tensor
    class_names: list[str]
    num_fine: int

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: torch.Tensor) -> JudgeImages:
        """The images where `keep` (a boolean mask or indices) says so."""
        return replace(self, **{f: getattr(self, f)[keep] for f in ("x", "labels", "fine", "flip_ok", "emoji")})


def judge_images(data: Path, size: int, others: bool) -> JudgeImages:
    """The training split at one size, and with `others` the emoji of no class (data/emoji/others.safetensors)."""
    meta = json.loads((Path(data) / "classes.json").read_text())
    if "subcategories" not in meta:
        raise ValueError(f"{data} was prepared before the judge's subcategory labels: run train/prepare_emoji.py again")
    names = [c["name"] for c in meta["classes"]]
    no_flip = torch.tensor([not c["flip"] for c in meta["classes"]])
    parts = []
    for split in ("train", "others") if others else ("train",):
        shard = load_file(str(Path(data) / f"{split}.safetensors"))
        if f"images_{size}" not in shard:
            raise ValueError(f"{data}/{split}.safetensors has no {size}px images (sizes: {meta.get('sizes')})")
        labels, fine = shard["labels"], shard["subcategories"]
        # flags and symbols (letters, signs) are not themselves mirrored
        fine_no_flip = torch.tensor([n.split("/")[0] in ("Flags", "Symbols") for n in meta["subcategories"]])
        flip_ok = ~fine_no_flip[fine] & ~torch.where(labels >= 0, no_flip[labels.clamp(min=0)], False)
        x = shard[f"images_{size}"].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        parts.append((x, labels, fine, flip_ok, shard["emoji_ids"]))
    x, labels, fine, flip_ok, emoji = (torch.cat(t) for t in zip(*parts))
    return JudgeImages(x, labels, fine, flip_ok, emoji, names, len(meta["subcategories"]))


def augment(x: torch.Tensor, flip_ok: torch.Tensor, strong: bool, g: torch.Generator) -> torch.Tensor:
    """Training augmentation of real images (B, 3, S, S), so that samples (shifted, noisier, a little
    blurred or off in contrast) are judged by what they show. Light: flips, noise 0.05, a shift of up
    to 2 px. Strong: flips, scale 0.8-1.15, rotation up to 10 degrees, shift up to 10%, contrast and
    brightness +-15%, a blur on a third of the images, noise of standard deviation up to 0.15."""
    b = len(x)
    flip = (torch.rand(b, generator=g) < 0.5) & flip_ok
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if not strong:
        x = x + 0.05 * torch.randn(x.shape, generator=g)
        return torch.roll(x, shifts=torch.randint(-2, 3, (2,), generator=g).tolist(), dims=(2, 3))
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    scale, angle, shift = 0.8 + 0.35 * u(b), (2 * u(b) - 1) * math.pi / 18, (2 * u(b, 2) - 1) * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1  # white outside
    contrast, brightness = 0.85 + 0.3 * u(b, 1, 1, 1), 0.3 * u(b, 1, 1, 1) - 0.15
    x = (x * contrast + brightness).clamp(-1, 1)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where((u(b) < 1 / 3)[:, None, None, None], 0.5 * x + 0.5 * blurred, x)
    return x + 0.15 * u(b, 1, 1, 1) * torch.randn(x.shape, generator=g)


def train_classifier(images: JudgeImages, recipe: Recipe, seed: int = 0) -> EmojiClassifier:
    """AdamW at 2e-3 with a one-epoch warm-up and a cosine decay to zero, so that the judge ends
    converged rather than wherever a constant rate leaves it (which also made it depend on the run).
    The class head learns from the images of a class; the subcategory head (`recipe.fine`) from all."""
    torch.manual_seed(seed)
    clf = EmojiClassifier(len(images.class_names), images.num_fine if recipe.fine else 0)
    opt = torch.optim.AdamW(clf.parameters(), lr=JUDGE_LR, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    n = len(images)
    per_epoch = math.ceil(n / 64)
    total, step = recipe.epochs * per_epoch, 0
    for _ in tqdm(range(recipe.epochs), desc="judge", unit="epoch"):
        clf.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 64):
            for group in opt.param_groups:
                group["lr"] = JUDGE_LR * min(1.0, (step + 1) / per_epoch) * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[i : i + 64]
            x = augment(images.x[idx], images.flip_ok[idx], recipe.strong, g)
            y, fine = images.labels[idx], images.fine[idx]
            h = clf.features(x)
            known = y >= 0
            loss = F.cross_entropy(clf.head(h[known]), y[known], label_smoothing=0.05) if known.any() else 0.0
            if clf.fine_head is not None:
                loss = loss + F.cross_entropy(clf.fine_head(h), fine, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return clf.eval()


FOLDS = 5  # train/choose_judge.py holds out one fifth of the training split's emoji


def fold_score(data: Path, size: int, name: str, epochs: int, fold: int) -> dict:
    """Recipe `name` trained on the training split without fold `fold` of its emoji (all styles of an
    emoji on one side) and, if it says so, on the emoji of no class; its accuracy on that fold, on one
    thread (train/choose_judge.py runs several at once)."""
    torch.set_num_threads(1)
    recipe = replace(RECIPES[name], epochs=epochs)
    images = judge_images(data, size, recipe.others)
    held = fold_mask(images, fold)
    start = time.perf_counter()
    clf = train_classifier(images.subset(~held), recipe)
    seconds = time.perf_counter() - start
    x, y = images.x[held], images.labels[held]
    with torch.no_grad():
        pred = torch.cat([clf(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])
    per_class = per_class_accuracy(pred, y, images.class_names)
    accuracy = float((pred == y).float().mean())
    return {
        "recipe": name,
        "settings": vars(recipe),
        "fold": fold,
        "held_out_images": len(y),
        "trained_on": int((~held).sum()),
        "balanced_accuracy": balanced(per_class),
        "accuracy": accuracy,
        "interval": wilson_interval(accuracy, len(y)),
        "per_class_accuracy": per_class,
        "train_seconds": seconds,
    }


def fold_mask(images: JudgeImages, fold: int) -> torch.Tensor:
    """The training-split images of one of `FOLDS` folds of emoji (every style of an emoji in the same fold)."""
    return (images.labels >= 0) & (images.emoji % FOLDS == fold)


def balanced(per_class: dict[str, float | None]) -> float:
    """The mean of the per-class accuracies of the classes present."""
    present = [a for a in per_class.values() if a is not None]
    return sum(present) / len(present)


def per_class_accuracy(pred: torch.Tensor, y: torch.Tensor, class_names: list[str]) -> dict[str, float | None]:
    """Accuracy within each class (None for a class with no examples)."""
    return {
        name: float((pred[y == c] == c).float().mean()) if bool((y == c).any()) else None
        for c, name in enumerate(class_names)
    }


def judge_recipe(epochs: int, images: JudgeImages) -> dict[str, str]:
    """What a cached classifier was trained with and on (recipe, epochs, the number of training images of
    a class and of none, the classes); a cache made any other way is retrained."""
    return {
        "judge_recipe": JUDGE_RECIPE,
        "epochs": str(epochs),
        "train_images": str(int((images.labels >= 0).sum())),
        "other_images": str(int((images.labels < 0).sum())),
        "classes": ",".join(images.class_names),
    }


def classifier(data: Path, size: int, epochs: int) -> tuple[EmojiClassifier, float, dict[str, float | None]]:
    """The cached classifier for a dataset (trained on first use, or again when the cache was made by
    another recipe, epoch count or training data), its accuracy on the validation split and that accuracy
    per class: how well the judge itself recognises real emoji of each class."""
    chosen = RECIPES[JUDGE_RECIPE]
    images, val = judge_images(data, size, chosen.others), load_emoji(data, "val", size)
    path = data / f"classifier-{size}.safetensors"
    clf = EmojiClassifier(len(images.class_names), images.num_fine if chosen.fine else 0)
    recipe = judge_recipe(epochs, images)
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
        clf = train_classifier(images, replace(chosen, epochs=epochs))
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
    return balanced(per_class), per_class


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (the Frechet distance of FID, Heusel et al.
    2017, here in the judge's features), with the trace of the root from the
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
    """The classifier's 64-d features of images (B, C, S, S), in chunks: (B, 64)."""
    return torch.cat([clf.features(x[i : i + 256]) for i in range(0, len(x), 256)])


@torch.no_grad()
def low_level_features(clf: EmojiClassifier, x: torch.Tensor) -> torch.Tensor:
    """Statistics of the judge's first layer (3x3 convolution, normalisation, ReLU at full resolution):
    each of its 32 channels' mean and standard deviation over the image, (B, 64). Their Frechet distance
    rises with blur, speckle and colour noise, which the pooled penultimate features hardly see."""
    first = clf.body[0][:3]

    def stats(chunk: torch.Tensor) -> torch.Tensor:
        h = first(chunk)  # (b, 32, S, S)
        return torch.cat([h.mean((2, 3)), h.std((2, 3))], dim=1)

    return torch.cat([stats(x[i : i + 256]) for i in range(0, len(x), 256)])


def to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, C, H, W) at the judge's size: area-averaged down (or bilinear up) when they differ."""
    if x.shape[-1] == size:
        return x
    mode = "area" if x.shape[-1] > size else "bilinear"
    return F.interpolate(x, size=(size, size), mode=mode)


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval (Wilson 1927) of an accuracy measured on n samples: how far the true rate may be
    from the measured one by the luck of the seeds (it stays inside [0, 1], unlike p +- 2 SE)."""
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def protocol_problems(first_seed: int, per_class: int, tuning: bool = False, epochs: int = JUDGE_EPOCHS) -> list[str]:
    """Why samples at seeds first_seed..first_seed+per_class-1 (of each class), judged by a judge trained
    for `epochs`, break the protocol (docs/evaluation.md): reported numbers use the frozen judge, held-out
    seeds (from REPORT_FIRST_SEED) and at least REPORT_MIN_PER_CLASS samples per class; tuning uses only
    the seeds below REPORT_FIRST_SEED."""
    last = first_seed + per_class - 1
    if tuning:
        if last >= REPORT_FIRST_SEED:
            return [
                f"tuning uses seeds below {REPORT_FIRST_SEED:,} only (seeds {first_seed:,}-{last:,} reach the "
                "held-out ones)"
            ]
        return []
    problems = []
    if first_seed < REPORT_FIRST_SEED:
        problems.append(
            f"seeds {first_seed:,}-{last:,}: seeds below {REPORT_FIRST_SEED:,} are for tuning and selection, "
            f"reported numbers use seeds from {REPORT_FIRST_SEED:,}"
        )
    if per_class < REPORT_MIN_PER_CLASS:
        problems.append(f"{per_class} samples per class: reported numbers use at least {REPORT_MIN_PER_CLASS}")
    if epochs != JUDGE_EPOCHS:
        problems.append(f"a judge trained for {epochs} epochs: the reported judge trains for {JUDGE_EPOCHS}")
    return problems


def nearest_distances(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each query feature (Q, D), the L2 distance to its nearest reference feature (R, D): (Q,)."""
    q, r = queries.double(), references.double()
    exact = "donot_use_mm_for_euclid_dist"  # exact zeros for copies, and the same distance in any chunk
    return torch.cat([torch.cdist(q[i : i + 512], r, compute_mode=exact).min(1).values for i in range(0, len(q), 512)])


@dataclass(frozen=True)
class NearCopies:
    """The memorisation check: the share of samples at least as close to some training image (L2, judge
    features) as the closest `quantile` of real validation images are to theirs, next to the validation
    images' own share under that threshold (the reference, `quantile` up to ties)."""

    share: float
    reference: float
    threshold: float
    quantile: float = NEAR_COPY_QUANTILE


def near_copies(
    sample_features: torch.Tensor,
    train_features: torch.Tensor,
    val_features: torch.Tensor,
    quantile: float = NEAR_COPY_QUANTILE,
) -> NearCopies:
    """The memorisation check (docs/evaluation.md) on features (N, D): a model that copied its training
    images scores about 1, one whose samples are as novel as unseen real emoji about `quantile`."""
    val = nearest_distances(val_features, train_features)
    threshold = float(torch.quantile(val, quantile))
    share = (nearest_distances(sample_features, train_features) <= threshold).double().mean()
    reference = (val <= threshold).double().mean()
    return NearCopies(float(share), float(reference), threshold, quantile)


REFERENCE_DRAWS = 10  # class-balanced sets of training images scored beside every measurement


def reference_draws(labels: torch.Tensor, count: int, per_class: bool, draws: int, seed: int = 0) -> list[torch.Tensor]:
    """`draws` index sets into a split with these labels (N,), each drawn without replacement: `count`
    images of every class (`per_class`, the samples' class mix) or `count` images at random (the split's
    own mix). Draw k uses a generator seeded with `seed + k`. Scoring real training images drawn like the
    samples gives the distances a model that reproduced them exactly would get (docs/evaluation.md)."""
    classes = torch.unique(labels)
    smallest = min(int((labels == c).sum()) for c in classes)
    if per_class and count > smallest:
        raise ValueError(f"{count} images per class asked, but a class has only {smallest}")
    if not per_class and count > len(labels):
        raise ValueError(f"{count} images asked, but the split has only {len(labels)}")
    sets = []
    for k in range(draws):
        g = torch.Generator().manual_seed(seed + k)
        if per_class:
            picked = [torch.nonzero(labels == c).flatten() for c in classes]
            sets.append(torch.cat([idx[torch.randperm(len(idx), generator=g)[:count]] for idx in picked]))
        else:
            sets.append(torch.randperm(len(labels), generator=g)[:count])
    return sets


def draws_distances(
    clf: EmojiClassifier, x: torch.Tensor, sets: list[torch.Tensor], val_features: torch.Tensor, val_low: torch.Tensor
) -> list[tuple[float, float]]:
    """For each index set into images x (N, 3, S, S): its semantic and low-level Frechet distances to
    the validation split (its judge features and first-layer statistics)."""
    return [
        (
            frechet_distance(features_of(clf, x[i]), val_features),
            frechet_distance(low_level_features(clf, x[i]), val_low),
        )
        for i in sets
    ]


def balanced_reference(
    clf: EmojiClassifier,
    train: TensorImageDataset,
    per_class: int,
    val_features: torch.Tensor,
    val_low: torch.Tensor,
    draws: int = REFERENCE_DRAWS,
) -> tuple[float, float] | None:
    """The mean semantic and low-level distances of real training images drawn as the samples are
    (`per_class` of every class, `draws` sets): what a model that reproduced them exactly would score
    under the protocol. None when a class has fewer than `per_class` training images."""
    try:
        sets = reference_draws(train.labels, per_class, True, draws)
    except ValueError:
        return None
    measured = draws_distances(clf, train.batch(torch.arange(len(train)))[0], sets, val_features, val_low)
    return sum(m[0] for m in measured) / draws, sum(m[1] for m in measured) / draws
