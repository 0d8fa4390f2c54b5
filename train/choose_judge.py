"""Compare judge recipes on real images only: a held-out fold of the training split.

    python train/choose_judge.py --json docs/judge-choice.json

Each recipe of `mrdit.judge.RECIPES` is trained on the training split without one fold of its emoji
(a fifth, chosen by a hash of each emoji's code, so all styles of one emoji are on the same side) and,
where the recipe says so, on the emoji of no class; it is scored on that fold. The rule, fixed before
the first run (docs/evaluation.md): the recipe with the highest class-balanced accuracy on the fold
becomes the judge. The validation split is never looked at here: it stays for the chosen judge's
reported accuracy, and samples are never looked at either.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path

from mrdit.judge import FOLDS, JUDGE_EPOCHS, RECIPES, fold_mask, fold_score, judge_images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--data", type=Path, default=Path("data/emoji"), help="prepared emoji data (default: data/emoji)")
    p.add_argument("--size", type=int, default=32, help="image size to judge at (default 32)")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES), help="recipes to compare")
    p.add_argument("--epochs", type=int, default=JUDGE_EPOCHS, help=f"epochs per recipe (default {JUDGE_EPOCHS})")
    p.add_argument("--fold", type=int, default=0, help=f"which of {FOLDS} folds is held out (default 0)")
    p.add_argument("--jobs", type=int, default=2, help="recipes trained at once, one thread each (default 2)")
    p.add_argument("--json", type=Path, help="write the scores here")
    args = p.parse_args(argv)
    print("config:", json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}))
    if not 0 <= args.fold < FOLDS:
        p.error(f"--fold must be in 0..{FOLDS - 1}")
    if args.epochs < 1 or args.jobs < 1:
        p.error("--epochs and --jobs must be >= 1")
    try:
        images = judge_images(args.data, args.size, others=True)
    except (OSError, ValueError) as e:
        p.error(f"cannot read the judge's images: {e}")
    held = int(fold_mask(images, args.fold).sum())
    if held == 0 or held == int((images.labels >= 0).sum()):
        p.error(f"fold {args.fold} holds {held} of the training split's images: choose another --fold")
    del images
    jobs = [(args.data, args.size, name, args.epochs, args.fold) for name in args.recipes]
    with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
        results = pool.starmap(fold_score, jobs)
    best = max(results, key=lambda r: r["balanced_accuracy"])
    print(f"\n{'recipe':<40} {'balanced':>8} {'accuracy (95% interval)':>26} {'images':>6} {'minutes':>7}")
    for r in results:
        lo, hi = r["interval"]
        print(
            f"{r['recipe']:<40} {r['balanced_accuracy'] * 100:7.1f}% {r['accuracy'] * 100:9.1f}% "
            f"({lo * 100:.1f}-{hi * 100:.1f}%) {r['held_out_images']:6d} {r['train_seconds'] / 60:7.1f}"
        )
    print(f"chosen by the rule (highest class-balanced accuracy on the held-out fold): {best['recipe']!r}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = vars(args) | {"data": str(args.data), "json": str(args.json)}
        record = {"rule": "highest class-balanced accuracy on the held-out fold", "chosen": best["recipe"]}
        args.json.write_text(json.dumps(record | {"config": config, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
