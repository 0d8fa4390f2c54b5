"""Write the initial weights of a grown model: a trained DiMR grown into a model for larger images or
with wider MLPs (`mrdit.grow`), as the `init_from` of a training run.

    python train/init_grown.py weights/mrdit-emoji-32 --config train/configs/emoji-64.json --out runs/emoji-64-grown
    python train/train.py --config train/configs/emoji-64.json --run-dir runs/emoji-64

(that training config names `runs/emoji-64-grown` as its `init_from`). `--preset NAME` grows into a
named preset instead of the model of a training config (its preset and `model_overrides`). A target
narrower than its source is refused: growing a model whose transformer MLP is 512 wide needs a target
with `mlp_width` >= 512 in branch 0 (`model_overrides`, as in emoji-32-wide.json).

The source's branches are copied into the target preset's first branches, with each patchify kernel
widened to the target's larger patch (so a copied branch reads the larger image exactly as the source
read it average-pooled); the target's added finer branches start from their usual random
initialisation. A copied branch may have a wider MLP (`mlp_width`): the source's hidden units are
copied and the added ones start with zero output weights, so the grown model computes what the source
did. With the same image size and no added branch, that gives a trained model more capacity:

    python train/init_grown.py weights/mrdit-emoji-32 --config train/configs/emoji-32-wide.json --out runs/emoji-32-wide-grown

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
from mrdit.cards import RUN_INFO_NAME, CardError, GrownModel, added_text, read_run_info, widened_text, write_run_info
from mrdit.config import ModelConfig
from mrdit.grow import grow
from mrdit.presets import PRESETS
from mrdit.training import TrainConfig, preset_with_overrides


def grown_record(source: str, sc: ModelConfig, tc: ModelConfig, argv: list[str]) -> GrownModel:
    """How the model was grown (the card repeats it), with the source's own record when it has one."""
    copied = len(sc.branches)
    source_dir = Path(source)
    return GrownModel(
        grown_from=str(source),
        command="python train/init_grown.py " + shlex.join(argv),
        copied_branches=copied,
        added_branches=tuple(range(copied, len(tc.branches))),
        patch_factor=tc.image_size // sc.image_size,
        widened=widened_text(sc, tc),
        source=read_run_info(source_dir) if (source_dir / RUN_INFO_NAME).is_file() else None,
    )


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
    try:
        record = grown_record(args.source, source.config, target.config, sys.argv[1:] if argv is None else argv)
    except (CardError, OSError, json.JSONDecodeError) as e:  # the source's own record is unreadable
        p.error(f"{Path(args.source) / RUN_INFO_NAME}: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    save_model(target, args.out)
    write_run_info(args.out, record)
    n_fresh = sum(target.state_dict()[name].numel() for name in fresh)
    total = sum(p.numel() for p in target.parameters())
    wider = f", {record.widened}" if record.widened else ""
    print(
        f"wrote {args.out}: branches 0-{record.copied_branches - 1} from {args.source}{wider}, "
        f"{added_text(record.added_branches)} "
        f"({n_fresh:,} of {total:,} parameters fresh)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
