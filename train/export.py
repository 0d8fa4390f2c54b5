"""Export the EMA weights of a training run as a model directory with a model card and sample grid.

    python train/export.py runs/emoji-32 --name mrdit-emoji-32

writes weights/NAME/{config.json, model.safetensors, run_info.json, README.md, samples.png}. The weights
come from the run's safetensors EMA model (RUN/ema, written whenever training stops), which must be
that of the newest training state. If the directory has an `eval.json` (written by train/evaluate.py),
its numbers go into the card.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mrdit import save_model
from mrdit.cards import (
    EVAL_NAME,
    GRID_SEEDS,
    GRID_STEPS,
    RUN_INFO_NAME,
    CardError,
    Recipe,
    RunInfo,
    TrainingRun,
    read_run_info,
    write_card,
    write_run_info,
)
from mrdit.checkpoint import CheckpointError
from mrdit.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, Pipeline
from mrdit.training import EmaExport, load_ema
from mrdit.visual import grid, upscale_nearest


def sample_rows(
    pipe: Pipeline,
    per_class: int = GRID_SEEDS,
    steps: int = GRID_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    display: int = 64,
) -> np.ndarray:
    """One row per class, seeds 0..per_class-1, with the default sampler, as a uint8 grid (the card's)."""
    tiles = []
    for c in range(len(pipe.class_names)):
        res = pipe.generate(
            [c] * per_class, list(range(per_class)), steps=steps, guidance=guidance, sampler=DEFAULT_SAMPLER
        )
        tiles += [upscale_nearest(np.asarray(im), display) for im in res.images]
    return grid(tiles, cols=per_class)


def run_record(run: Path, ema: EmaExport, source: RunInfo | None) -> TrainingRun:
    """The record of the training that made the EMA weights: the run folder's commands, the step and
    time, the hardware (from DONE or PAUSED, whichever describes that step) and the recipe."""
    cfg = ema.train_config
    infos = [json.loads((run / f).read_text()) for f in ("DONE", "PAUSED") if (run / f).is_file()]
    done = next((i for i in infos if i.get("step") == ema.step), {})
    commands = (run / "command.txt").read_text().strip().splitlines() if (run / "command.txt").is_file() else ["?"]
    return TrainingRun(
        commands=tuple("python " + c for c in commands),
        step=ema.step,
        batch_size=cfg["batch_size"],
        elapsed_min=f"{ema.elapsed_s / 60:.0f}",
        hardware=done.get("hardware", "see run folder"),
        recipe=Recipe.from_train_config(cfg),
        init_from=cfg.get("init_from", ""),
        source=source,
    )


def export(run: Path, out: Path, dtype: torch.dtype = torch.float32, samples: bool = True) -> Path:
    """Write the model directory `out` from the run folder `run`; returns `out`."""
    model, ema = load_ema(run)
    # A fine-tune records the training of the model it started from; read it before `out` is written,
    # which may be that very directory.
    init_from = ema.train_config.get("init_from", "")
    has_source = bool(init_from) and (Path(init_from) / RUN_INFO_NAME).is_file()
    source = read_run_info(Path(init_from)) if has_source else None
    save_model(model.eval(), out, dtype=dtype)
    stale = out / EVAL_NAME
    if stale.is_file():  # numbers of the weights just replaced must not reach the new card
        stale.unlink()
        print(f"removed {stale} (it measured the previous weights): run train/evaluate.py again")
    write_run_info(out, run_record(run, ema, source))
    write_card(out)
    if samples:
        from PIL import Image

        pipe = Pipeline.from_pretrained(out)
        Image.fromarray(sample_rows(pipe)).save(out / "samples.png")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", type=Path, help="run folder of train/train.py")
    p.add_argument("--name", required=True, help="model name; written to WEIGHTS_DIR/NAME")
    p.add_argument("--weights-dir", type=Path, default=Path("weights"))
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--no-samples", action="store_true", help="skip the sample grid")
    args = p.parse_args(argv)
    print("config:", json.dumps({k: str(v) for k, v in vars(args).items()}))
    try:
        out = export(args.run, args.weights_dir / args.name, getattr(torch, args.dtype), samples=not args.no_samples)
        print(f"wrote {out}")
        return 0
    except (CheckpointError, CardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
