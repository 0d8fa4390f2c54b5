"""Grow a trained DiMR into a model for larger images or with wider MLPs, as the start of a training run.

    python train/grow.py weights/mrdit-emoji-32 --config train/configs/emoji-64.json --out runs/emoji-64-grown
    python train/train.py --config train/configs/emoji-64.json --run-dir runs/emoji-64

(that training config names `runs/emoji-64-grown` as its `init_from`). `--preset NAME` grows into a
named preset instead of the model of a training config (its preset and `model_overrides`). The shipped
64 px model was grown this way from the 32 px weights of git commit 094c078; today's 32 px weights have
a 512-wide transformer MLP, and a target narrower than its source is refused, so growing them needs a
target with `mlp_width` >= 512 in branch 0 (`model_overrides`, as in emoji-32-wide.json).

The source's branches are copied into the target preset's first branches, with each patchify kernel
widened to the target's larger patch (so a copied branch reads the larger image exactly as the source
read it average-pooled); the target's added finer branches start from their usual random
initialisation. A copied branch may have a wider MLP (`mlp_width`): the source's hidden units are
copied and the added ones start with zero output weights, so the grown model computes what the source
did. With the same image size and no added branch, that gives a trained model more capacity:

    python train/grow.py weights/mrdit-emoji-32 --config train/configs/emoji-32-wide.json --out runs/emoji-32-wide-grown

The output is a model directory (config.json, model.safetensors) with a
run_info.json that records the growth and the source's own training, which the exported model's
card repeats.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from mrdit import CheckpointError, ConfigError, build_model, get_preset, load_model, save_model
from mrdit.checkpoint import atomic_write
from mrdit.grow import added_text, grow, widened_text
from mrdit.presets import PRESETS
from mrdit.training import TrainConfig, preset_with_overrides


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", help="model directory (or Hub repo id) of the trained smaller model")
    into = p.add_mutually_exclusive_group(required=True)
    into.add_argument("--config", type=Path, help="training config whose model (preset + model_overrides) to grow into")
    into.add_argument("--preset", choices=sorted(PRESETS), help="a named preset to grow into")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the added branches' initialisation (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it already holds a model")
    args = p.parse_args(argv)
    print("config:", json.dumps({k: str(v) for k, v in vars(args).items()}))
    if (args.out / "config.json").exists() and not args.force:
        p.error(f"{args.out} already holds a model; pass --force to overwrite it")
    try:
        source = load_model(args.source)
        torch.manual_seed(args.seed)
        sc = source.config  # the target is sized to the source's classes, as train.py sizes it to the data's
        if args.config is not None:
            named = preset_with_overrides(TrainConfig.from_dict(json.loads(args.config.read_text())))
        else:
            named = get_preset(args.preset)
        config = named.replace(num_classes=sc.num_classes, null_label=sc.null_label, class_names=sc.class_names)
        target = build_model(config)
        fresh = grow(source, target)
    except (CheckpointError, ConfigError, OSError, json.JSONDecodeError) as e:
        p.error(str(e))
    copied = len(source.config.branches)
    added = list(range(copied, len(target.config.branches)))
    args.out.mkdir(parents=True, exist_ok=True)
    save_model(target, args.out)
    source_info = Path(args.source) / "run_info.json"
    run_info = {
        "grown_from": str(args.source),
        "command": "python train/grow.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "copied_branches": copied,
        "added_branches": added,
        "patch_factor": target.config.image_size // source.config.image_size,
        "widened": widened_text(source.config, target.config),
    }
    if source_info.is_file():
        run_info["source"] = json.loads(source_info.read_text())
    atomic_write(args.out / "run_info.json", lambda f: f.write(json.dumps(run_info, indent=2).encode()))
    n_fresh = sum(target.state_dict()[name].numel() for name in fresh)
    total = sum(p.numel() for p in target.parameters())
    wider = f", {run_info['widened']}" if run_info["widened"] else ""
    print(
        f"wrote {args.out}: branches 0-{copied - 1} from {args.source}{wider}, {added_text(added)} "
        f"({n_fresh:,} of {total:,} parameters fresh)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
