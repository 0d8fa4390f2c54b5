"""What real training images score under the protocol's distances, drawn as the samples are.

    python train/reference_distances.py --json docs/reference-distances.json

The floors of docs/evaluation.md compare the whole training split, in its own class mix, with the
validation split; the samples are scored as 50 per class. The Frechet distance grows as the set
shrinks and with a class mix unlike the validation split's, so a model that reproduced its training
images exactly would not score the floor. This script scores, with the cached judge and no model,
sets of real training images drawn without replacement:

- natural: N images at random, in the training split's own mix (the sample size alone);
- balanced: N / classes images of every class (the samples' mix);
- balanced, from S px (for each --from-size S above the judge's size): the same draws taken from the
  S px training images and area-averaged to the judge's size, as an S px model's samples are.

Each set is drawn --draws times (generator seeds 0..draws-1); the report gives the mean and range of
the semantic and low-level distances to the validation split and their ratios to the floors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mrdit.data import load_emoji
from mrdit.judge import (
    JUDGE_EPOCHS,
    classifier,
    draws_distances,
    features_of,
    frechet_distance,
    low_level_features,
    reference_draws,
    to_size,
)


def summary(values: list[float], floor: float) -> dict[str, float]:
    mean = sum(values) / len(values)
    return {"mean": mean, "min": min(values), "max": max(values), "ratio_to_floor": mean / floor}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--data", type=Path, default=Path("data/emoji"), help="prepared emoji data (default: data/emoji)")
    p.add_argument("--size", type=int, default=32, help="the judge's image size (default 32)")
    p.add_argument("--from-size", type=int, nargs="*", default=[64], help="larger training sizes to area-average")
    p.add_argument("--per-class", type=int, default=50, help="images per class in a balanced set (default 50)")
    p.add_argument("--draws", type=int, default=10, help="sets drawn of each kind (default 10)")
    p.add_argument("--classifier-epochs", type=int, default=JUDGE_EPOCHS, help="the judge's epochs (tests only)")
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads (default: PyTorch's own choice)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    print("config:", json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}))
    if args.per_class < 2 or args.draws < 1:
        p.error("--per-class must be >= 2 and --draws >= 1")
    if any(s <= args.size for s in args.from_size):
        p.error(f"--from-size sizes must be larger than --size {args.size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        clf, val_acc, _ = classifier(args.data, args.size, args.classifier_epochs)
        train, val = load_emoji(args.data, "train", args.size), load_emoji(args.data, "val", args.size)
        larger = {s: load_emoji(args.data, "train", s) for s in args.from_size}
    except (OSError, ValueError) as e:
        p.error(f"cannot read the judge or the data: {e}")
    x_train, x_val = train.batch(torch.arange(len(train)))[0], val.batch(torch.arange(len(val)))[0]
    val_features, val_low = features_of(clf, x_val), low_level_features(clf, x_val)
    floors = (
        frechet_distance(features_of(clf, x_train), val_features),
        frechet_distance(low_level_features(clf, x_train), val_low),
    )
    count = args.per_class * len(torch.unique(train.labels))  # classes with training images
    try:
        kinds = {
            "natural": reference_draws(train.labels, count, False, args.draws),
            "balanced": reference_draws(train.labels, args.per_class, True, args.draws),
        }
    except ValueError as e:
        p.error(f"{e}: lower --per-class")
    sources = {"natural": x_train, "balanced": x_train}
    for s, data in larger.items():
        kinds[f"balanced, from {s} px"] = kinds["balanced"]
        sources[f"balanced, from {s} px"] = to_size(data.batch(torch.arange(len(data)))[0], args.size)
    results = {}
    for kind, sets in tqdm(kinds.items(), desc="reference sets", unit="kind"):
        measured = draws_distances(clf, sources[kind], sets, val_features, val_low)
        results[kind] = {
            "fd": summary([m[0] for m in measured], floors[0]),
            "fd_low": summary([m[1] for m in measured], floors[1]),
        }
    print(
        f"judge accuracy on the real validation split {val_acc * 100:.1f}% of {len(val)}; floors (all "
        f"{len(train)} training images vs validation): FD {floors[0]:.2f}, low-level {floors[1]:.3f}"
    )
    print(f"\n{'set of ' + str(count) + ' training images':<34} {'FD (range)':>22} {'low-level FD (range)':>26}")
    for kind, r in results.items():
        fd, low = r["fd"], r["fd_low"]
        print(
            f"{kind:<34} {fd['mean']:6.2f} ({fd['min']:.2f}-{fd['max']:.2f}) {fd['ratio_to_floor']:4.2f}x"
            f" {low['mean']:7.3f} ({low['min']:.3f}-{low['max']:.3f}) {low['ratio_to_floor']:4.2f}x"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = vars(args) | {"data": str(args.data), "json": str(args.json)}
        record = {
            "config": config,
            "images_per_set": count,
            "judge_val_accuracy": val_acc,
            "floors": {"fd": floors[0], "fd_low": floors[1]},
            "results": results,
        }
        args.json.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
