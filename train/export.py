"""Export the EMA weights of a training run as a model directory with a model card and sample grid.

    python train/export.py runs/emoji-32 --name mrdit-emoji-32

writes weights/NAME/{config.json, model.safetensors, README.md, samples.png}. If the directory has an
`eval.json` (written by train/evaluate.py), its numbers go into the card.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from mrdit import save_model
from mrdit.build import build_model
from mrdit.config import ModelConfig
from mrdit.grow import added_text
from mrdit.pipeline import DEFAULT_GUIDANCE, Pipeline
from mrdit.training import load_latest_state
from mrdit.visual import grid, upscale_nearest

EMOJI_CREDITS = """- **Twemoji** graphics by Twitter, Inc. and other contributors, CC-BY 4.0
  (https://creativecommons.org/licenses/by/4.0/), via the npm package `emoji-datasource-twitter@16.0.0`.
- **Noto Emoji** by Google, Apache-2.0, via `emoji-datasource-google@16.0.0`.
- **Fluent Emoji** by Microsoft, MIT, via `@lobehub/fluent-emoji-3d@1.1.0`."""


def sample_rows(
    pipe: Pipeline, per_class: int = 8, steps: int = 25, guidance: float = DEFAULT_GUIDANCE, display: int = 64
):
    """One row per class, seeds 0..per_class-1, as a uint8 grid."""
    tiles = []
    for c in range(len(pipe.class_names)):
        res = pipe.generate([c] * per_class, list(range(per_class)), steps=steps, guidance=guidance, sampler="dpm++2m")
        tiles += [upscale_nearest(np.asarray(im), display) for im in res.images]
    return grid(tiles, cols=per_class)


def commands_line(run_info: dict) -> str:
    commands = run_info.get("commands") or [run_info.get("command", "?")]
    if len(commands) == 1:
        return f"Command: `{commands[0]}`"
    return "Commands, in order (the run resumed itself from its saved state): " + "; ".join(f"`{c}`" for c in commands)


RECIPE_KEYS = (
    "lr",
    "warmup_steps",
    "decay_steps",
    "betas",
    "weight_decay",
    "ema_decay",
    "label_dropout",
    "flips",
    "class_balanced",
    "mixed_precision",
)


def percent(a: float | None) -> str:
    """An accuracy in whole percent; "-" for a class without examples (None)."""
    return "-" if a is None else f"{a * 100:.0f}%"


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy measured on n samples: how far the true rate may be
    from the measured one by the luck of the seeds (it stays inside [0, 1], unlike p +- 2 SE)."""
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_text(evaluation: dict) -> str:
    """ "84.2% (95% interval 79.0-88.2%, 240 samples)" for an evaluation's sample accuracy."""
    n = evaluation["samples_per_class"] * len(evaluation["per_class_accuracy"])
    lo, hi = wilson_interval(evaluation["accuracy"], n)
    return f"{evaluation['accuracy'] * 100:.1f}% (95% interval {lo * 100:.1f}-{hi * 100:.1f}%, {n} samples)"


def recipe_line(cfg: dict, then: str = "") -> str:
    """The card's recipe line from a saved training config (none for exports that predate it); `then`
    describes a later phase of the same run (a resume with another batch size or schedule)."""
    if not cfg:
        return ""
    lr = f"{cfg['lr']:g} after {cfg['warmup_steps']:,} warm-up steps"
    decay = cfg.get("decay_steps", 0)
    lr += f", constant, then a linear cool-down over the last {decay:,} steps" if decay else ", then constant"
    data = "random horizontal flips" if cfg.get("flips", True) else "no flips"
    if cfg.get("class_balanced", False):
        data += "; class-balanced batches"
    precision = "float32" if cfg["mixed_precision"] == "no" else f"{cfg['mixed_precision']} autocast"
    return (
        f"- Recipe: AdamW (betas {tuple(cfg['betas'])}, weight decay {cfg['weight_decay']:g}), learning rate {lr}; "
        f"EMA {cfg['ema_decay']:g}; label dropout {cfg['label_dropout']:g}; {data}; {precision}"
        + (f"; then {then}" if then else "")
        + "\n"
    )


def training_lines(run_info: dict) -> str:
    """The card's lines for one training run; a fine-tune (a run started with `init_from`) first describes
    the training of the model it started from, as recorded in that model's run_info.json."""
    if run_info.get("grown_from"):
        return grown_lines(run_info)
    lines = ""
    source = run_info.get("source")
    if source is not None:
        made = "made" if source.get("grown_from") else "trained"
        lines += f"- Started from `{run_info['init_from']}`, {made} as follows:\n"
        lines += indented(training_lines(source))
        lines += "- Then fine-tuned from those weights (fresh optimizer):\n"
    elif run_info.get("init_from"):
        lines += f"- Fine-tuned from `{run_info['init_from']}` (fresh optimizer); that model's training is not recorded here\n"
    indent = "  " if source is not None else ""
    recipe = recipe_line(run_info.get("recipe", {}), run_info.get("recipe_then", ""))
    lines += (
        f"{indent}- {commands_line(run_info)}\n"
        f"{indent}- Steps: {run_info.get('step', '?')} at batch {run_info.get('batch_size', '?')}; "
        f"wall time {run_info.get('elapsed_min', '?')} min\n"
        + (indent + recipe if recipe else "")
        + f"{indent}- Hardware: {run_info.get('hardware', '?')}\n"
    )
    return lines


def indented(lines: str) -> str:
    """Markdown list lines nested one level deeper."""
    return "".join("  " + line + "\n" for line in lines.splitlines())


def grown_lines(run_info: dict) -> str:
    """The card's lines for a model made by train/grow.py, then the training of the model it grew from."""
    copied, added = run_info.get("copied_branches", "?"), run_info.get("added_branches", [])
    factor = run_info.get("patch_factor", "?")
    how = [f"patchify kernels widened {factor}x"] if factor != 1 else []
    how += [run_info["widened"]] if run_info.get("widened") else []
    detail = " (" + "; ".join(how) + ")" if how else ""
    lines = (
        f"- Grown from `{run_info['grown_from']}` with `{run_info.get('command', '?')}`: its {copied} branches "
        f"copied{detail}, {added_text(added)}\n"
    )
    source = run_info.get("source")
    if source is None:
        return lines + "  - that model's training is not recorded here\n"
    lines += f"- `{run_info['grown_from']}` was trained as follows:\n"
    return lines + indented(training_lines(source))


def schedule_text(schedule) -> str:
    """ "cosine, 1000 steps", with the signal-to-noise scale when there is one."""
    text = f"{schedule.kind}, {schedule.num_steps} steps"
    if schedule.snr_scale != 1:
        text += f", signal-to-noise ratio scaled by {schedule.snr_scale:g}"
    return text


def guidance_text(evaluation: dict) -> str:
    """ "4.0", or "power-cosine to 8.0 (p 1.0)" for the scheduled guidance."""
    if evaluation.get("guidance_schedule", "constant") == "constant":
        return f"{evaluation['guidance']}"
    return f"power-cosine to {evaluation['guidance']} (p {evaluation['guidance_power']})"


def card(name: str, mc: ModelConfig, n_params: int, run_info: dict, evaluation: dict | None) -> str:
    branches = "\n".join(
        f"| {k} | {b.kind} | {b.grid}x{b.grid} (patch {b.patch}) | {b.width} | {b.blocks} | {b.heads or '-'} |"
        for k, b in enumerate(mc.branches)
    )
    arch = (
        "DiMR (multi-resolution)"
        if mc.architecture == "dimr"
        else "single-resolution baseline (transformer + linear unpatchify head)"
    )
    classes = ", ".join(mc.class_names)
    if evaluation:
        quality = (
            f"Measured with `{evaluation['command']}` on {evaluation['hardware']}:\n\n"
            f"| metric | value |\n|---|---|\n"
            f"| class accuracy of samples (classifier trained on the train split) | {accuracy_text(evaluation)} |\n"
            f"| Frechet distance to the validation split (classifier features) | {evaluation['fd']:.2f} |\n"
            f"| the same distance, train split vs validation split (floor) | {evaluation['fd_floor']:.2f} |\n"
            + (
                "| the classifier's accuracy on the real training images, class-balanced (what a model that "
                f"reproduced them exactly would score) | {evaluation['classifier_train_accuracy'] * 100:.1f}% |\n"
                if "classifier_train_accuracy" in evaluation
                else ""
            )
            + f"| sampling time per image ({evaluation['sampler']}, {evaluation['steps']} steps, guidance {guidance_text(evaluation)}) | {evaluation['sec_per_image'] * 1000:.0f} ms |\n"
            f"\n{evaluation['samples_per_class']} samples per class, seeds 0..{evaluation['samples_per_class'] - 1}."
        )
        recipe = evaluation.get("classifier_recipe")
        if recipe:  # which judge: numbers from judges of other recipes do not compare
            quality += (
                f" The classifier: recipe {recipe['judge_recipe']!r}, {recipe['epochs']} epochs (`train/evaluate.py`)."
            )
        judge = evaluation.get("judge_size", mc.image_size)
        if judge != mc.image_size:
            quality += (
                f" The samples were judged at {judge} px (area-averaged from {mc.image_size} px), by the classifier "
                f"and against the validation split at {judge} px, so the numbers compare with the {judge} px models'."
            )
        real = evaluation.get("classifier_val_per_class_accuracy")
        if real:  # how the judge does on real emoji of each class: the ceiling it puts on the samples' score
            columns = {"samples": evaluation["per_class_accuracy"]}
            overall = []
            if "classifier_train_per_class_accuracy" in evaluation:  # evaluations since the training column
                columns["real training emoji"] = evaluation["classifier_train_per_class_accuracy"]
                overall.append(
                    f"real training emoji (class-balanced {evaluation['classifier_train_accuracy'] * 100:.1f}%)"
                )
            columns["real validation emoji"] = real
            overall.append(f"real validation emoji (overall {evaluation['classifier_val_accuracy'] * 100:.1f}%)")
            rows = "\n".join(f"| {c} | " + " | ".join(percent(col[c]) for col in columns.values()) + " |" for c in real)
            quality += (
                f"\n\nPer class, the samples' accuracy next to the classifier's own accuracy on {' and on '.join(overall)}:\n\n"
                f"| class | {' | '.join(columns)} |\n" + "|---" * (len(columns) + 1) + f"|\n{rows}"
            )
    else:
        quality = "Not measured yet: run `python train/evaluate.py weights/" + name + "`."
    return f"""---
license: apache-2.0
library_name: mrdit
tags:
- diffusion
- dimr
- class-conditional
- emoji
---

# {name}

A class-conditional pixel-space {arch} model for {mc.image_size}x{mc.image_size} emoji, trained with
`mrdit`'s own training script. {n_params:,} parameters.

| branch | kind | grid | width | blocks | heads |
|---|---|---|---|---|---|
{branches}

Classes ({mc.num_classes - 1}, plus the null label {mc.null_label} for guidance): {classes}.
Noise schedule: {schedule_text(mc.schedule)}; loss weights {list(mc.loss_weights)}.

![samples](samples.png)

*One row per class, seeds 0-7, `dpm++2m`, 25 steps, guidance {DEFAULT_GUIDANCE}.*

## Quality

{quality}

## Training

{training_lines(run_info)}- Data: `python train/prepare_emoji.py` (three emoji styles from the npm registry, {mc.num_classes - 1} classes, {mc.image_size} px)

## Data, licences and attribution

The training images come from:

{EMOJI_CREDITS}

The weights are released under Apache-2.0. Generated images resemble these emoji styles; attribute
the sources above when you publish them.

## Use

```python
from mrdit.pipeline import Pipeline

pipe = Pipeline.from_pretrained("weights/{name}")
result = pipe.generate("face", seeds=[0, 1, 2, 3], steps=25, guidance={DEFAULT_GUIDANCE})
result.images[0].save("face.png")
```

Model: DiMR, Q. Liu et al., "Alleviating Distortion in Image Generation via Multi-Resolution Diffusion
Models", NeurIPS 2024 (arXiv:2406.09416).
"""


def export(run: Path, out: Path, dtype: torch.dtype = torch.float32, samples: bool = True) -> Path:
    state = load_latest_state(run)
    if state is None:
        raise SystemExit(f"error: {run} has no training state to export")
    train_cfg = json.loads(state["train_config"])
    # A fine-tune records the training of the model it started from; read it before `out` is written,
    # which may be that very directory.
    init_from = train_cfg.get("init_from", "")
    source_info = Path(init_from) / "run_info.json" if init_from else None
    source = json.loads(source_info.read_text()) if source_info is not None and source_info.is_file() else None
    mc = ModelConfig.from_dict(json.loads(state["model_config"]))
    model = build_model(mc)
    model.load_state_dict(state["ema"])
    model.eval()
    save_model(model, out, dtype=dtype)
    stale = out / "eval.json"
    if stale.is_file():  # numbers of the weights just replaced must not reach the new card
        stale.unlink()
        print(f"removed {stale} (it measured the previous weights): run train/evaluate.py again")
    # DONE (finished) or PAUSED (stopped by --max-minutes): whichever describes the exported step.
    infos = [json.loads((run / f).read_text()) for f in ("DONE", "PAUSED") if (run / f).is_file()]
    done = next((i for i in infos if i.get("step") == state["step"]), {})
    commands = (run / "command.txt").read_text().strip().splitlines() if (run / "command.txt").is_file() else ["?"]
    run_info = {
        "command": "python " + commands[0],
        "commands": ["python " + c for c in commands],
        "step": state["step"],
        "batch_size": train_cfg["batch_size"],
        "elapsed_min": f"{state.get('elapsed', 0) / 60:.0f}",
        "hardware": done.get("hardware", "see run folder"),
        "recipe": {k: train_cfg[k] for k in RECIPE_KEYS if k in train_cfg},
    }
    if init_from:
        run_info["init_from"] = init_from
        if source is not None:
            run_info["source"] = source
    (out / "run_info.json").write_text(json.dumps(run_info, indent=2))
    write_card(out)
    if samples:
        from PIL import Image

        pipe = Pipeline.from_pretrained(out)
        Image.fromarray(sample_rows(pipe)).save(out / "samples.png")
    return out


def write_card(out: Path) -> None:
    """(Re)write README.md from config.json, run_info.json and eval.json (if present)."""
    from mrdit.checkpoint import read_config

    mc = read_config(out)
    n_params = sum(p.numel() for p in build_model(mc, device="meta").parameters())
    run_info = json.loads((out / "run_info.json").read_text()) if (out / "run_info.json").is_file() else {}
    evaluation = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else None
    (out / "README.md").write_text(card(out.name, mc, n_params, run_info, evaluation))


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
    out = export(args.run, args.weights_dir / args.name, getattr(torch, args.dtype), samples=not args.no_samples)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
