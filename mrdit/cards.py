"""Model cards: the README.md of a model directory, rendered from typed records of how the weights
were made (`run_info.json`: a training run or a growth) and how they score (`eval.json`).

`train/export.py` writes the run record, `train/init_grown.py` the growth record, `train/evaluate.py`
the evaluation; each then calls `write_card`, so a card always says what the files beside it say.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig, ScheduleConfig
from .judge import NEAR_COPY_QUANTILE, REFERENCE_DRAWS, REPORT_FIRST_SEED, protocol_problems, wilson_interval
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER

RUN_INFO_NAME = "run_info.json"
EVAL_NAME = "eval.json"
CARD_NAME = "README.md"
GRID_SEEDS = 8  # the card's sample grid: one row per class, seeds 0..GRID_SEEDS-1
GRID_STEPS = 25

EMOJI_CREDITS = """- **Twemoji** graphics by Twitter, Inc. and other contributors, CC-BY 4.0
  (https://creativecommons.org/licenses/by/4.0/), via the npm package `emoji-datasource-twitter@16.0.0`.
- **Noto Emoji** by Google, Apache-2.0, via `emoji-datasource-google@16.0.0`.
- **Fluent Emoji** by Microsoft, MIT, via `@lobehub/fluent-emoji-3d@1.1.0`."""


class CardError(ValueError):
    """A run or evaluation record cannot be read; the message names the field."""


def _known(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise CardError(f"{what}: unknown field(s) {', '.join(unknown)}")
    return d


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """The optimisation recipe of a training run: the `TrainConfig` fields its card names."""

    lr: float
    warmup_steps: int
    decay_steps: int = 0
    betas: tuple[float, float]
    weight_decay: float
    ema_decay: float
    label_dropout: float
    flips: bool = True
    class_balanced: bool = False  # records from before the field read as unbalanced
    mixed_precision: str

    @classmethod
    def from_train_config(cls, cfg: dict[str, Any]) -> Recipe:
        """The recipe of a saved training config (`TrainConfig.to_dict()`)."""
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        d = _known(cls, d, "recipe")
        try:
            return cls(**d | {"betas": tuple(d["betas"])})
        except (KeyError, TypeError) as e:
            raise CardError(f"recipe: {e}") from None


@dataclass(frozen=True, kw_only=True)
class TrainingRun:
    """How exported weights were trained (`train/export.py`): the commands of the run, its length and
    recipe, and, for a fine-tune (`init_from`), the record of the model it started from."""

    commands: tuple[str, ...] = ()  # in order: the first started the run, the others resumed it
    step: int | None = None
    batch_size: int | str | None = None  # a string describes a batch size that changed during the run
    elapsed_min: str | None = None
    hardware: str | None = None
    recipe: Recipe | None = None  # None for exports that predate it
    recipe_then: str = ""  # a later phase of the same run (a resume with another batch size or schedule)
    init_from: str = ""
    source: RunInfo | None = None  # the run_info of `init_from`, when it had one


@dataclass(frozen=True, kw_only=True)
class GrownModel:
    """How a model was grown from a trained one (`train/init_grown.py`): its branches copied (patchify
    kernels widened by `patch_factor`, MLPs perhaps widened), the `added_branches` fresh."""

    grown_from: str
    command: str = ""
    copied_branches: int | None = None
    added_branches: tuple[int, ...] = ()
    patch_factor: int | None = None
    widened: str = ""  # `widened_text` of the growth; "" when no MLP is wider
    source: RunInfo | None = None  # the run_info of `grown_from`, when it had one


RunInfo = TrainingRun | GrownModel


def run_info_from_dict(d: dict[str, Any]) -> RunInfo:
    """The record of a `run_info.json` (a growth when it names `grown_from`, else a training run)."""
    d = dict(d)
    source = run_info_from_dict(d.pop("source")) if d.get("source") is not None else None
    if d.get("grown_from"):
        d = _known(GrownModel, d, "run_info")
        return GrownModel(**d | {"added_branches": tuple(d.get("added_branches", ())), "source": source})
    command = d.pop("command", None)
    commands = tuple(d.pop("commands", None) or ([command] if command is not None else []))
    recipe = d.pop("recipe", None)
    recipe = Recipe.from_dict(recipe) if recipe else None
    return TrainingRun(**_known(TrainingRun, d, "run_info"), commands=commands, recipe=recipe, source=source)


def run_info_to_dict(info: RunInfo) -> dict[str, Any]:
    """The JSON form of a record: what `run_info_from_dict` reads back (a training run also keeps its
    first command under `command`); empty optional fields are left out."""
    d = dataclasses.asdict(info)
    d["source"] = run_info_to_dict(info.source) if info.source is not None else None
    if isinstance(info, TrainingRun):
        d = {"command": info.commands[0] if info.commands else None} | d
    optional = ("recipe_then", "init_from", "source")
    return {k: v for k, v in d.items() if not (k in optional and not v)}


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """A model's scores from `train/evaluate.py` (`eval.json`): the judge's accuracy on its samples, the
    Frechet distance to the validation split, the memorisation check, the sampling settings, seeds and
    time, and the judge's own scores on real emoji (what it can recognise, and the ceiling it puts on the
    samples'). The rules a reported record follows: docs/evaluation.md."""

    accuracy: float
    per_class_accuracy: dict[str, float | None]
    fd: float
    sec_per_image: float
    samples_per_class: int
    first_seed: int | None = None  # None: seeds 0.. (evaluations that predate the protocol)
    tuning: bool = False  # measured on tuning seeds: printed, never written into a card
    judge_size: int | None = None  # None: the model's own size (evaluations that predate the field)
    steps: int
    guidance: float
    sampler: str
    guidance_schedule: str = "constant"
    guidance_power: float = 1.0
    eta: float | None = None  # the sampler's own default when None
    branch_guidance: tuple[float, ...] | None = None  # per-branch guidance weights (measurement only)
    fd_floor: float
    fd_low: float | None = None  # low-level Frechet distance (mrdit.judge.low_level_features); None before it
    fd_low_floor: float | None = None
    # both distances for real training images drawn as the samples are (mrdit.judge.balanced_reference)
    fd_reference: float | None = None
    fd_low_reference: float | None = None
    near_copies: float | None = None  # the memorisation check (mrdit.judge.near_copies); None before it
    near_copies_reference: float | None = None
    near_copy_threshold: float | None = None
    classifier_val_accuracy: float | None = None
    classifier_val_images: int | None = None
    classifier_val_per_class_accuracy: dict[str, float | None] | None = None
    classifier_val_per_class_images: dict[str, int] | None = None
    classifier_train_accuracy: float | None = None
    classifier_train_per_class_accuracy: dict[str, float | None] | None = None
    classifier_recipe: dict[str, str] | None = None
    command: str
    hardware: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluation:
        try:
            return cls(**_known(cls, d, "evaluation"))
        except TypeError as e:
            raise CardError(f"evaluation: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def samples(self) -> int:
        return self.samples_per_class * len(self.per_class_accuracy)

    @property
    def judge_version(self) -> str | None:
        """The judge's recipe version (`mrdit.judge.JUDGE_RECIPE` when it was measured)."""
        return (self.classifier_recipe or {}).get("judge_recipe")

    def protocol_problems(self) -> list[str]:
        """Why this record may not be reported (docs/evaluation.md); [] when it may."""
        if self.tuning:
            return ["measured on tuning seeds (--tuning)"]
        epochs = (self.classifier_recipe or {}).get("epochs")
        problems = protocol_problems(self.first_seed or 0, self.samples_per_class, epochs=int(epochs or 0))
        if self.judge_version is None:
            problems.append("the judge's version is not recorded")
        if self.classifier_val_accuracy is None or self.classifier_val_images is None:
            problems.append("the judge's accuracy on real validation emoji is not recorded")
        if self.near_copies is None:
            problems.append("the memorisation check is missing")
        return problems


def read_run_info(model_dir: Path) -> RunInfo:
    """The directory's run record; an empty training run when it has none."""
    path = Path(model_dir) / RUN_INFO_NAME
    return run_info_from_dict(json.loads(path.read_text())) if path.is_file() else TrainingRun()


def write_run_info(model_dir: Path, info: RunInfo) -> None:
    from .checkpoint import atomic_write

    text = json.dumps(run_info_to_dict(info), indent=2)
    atomic_write(Path(model_dir) / RUN_INFO_NAME, lambda f: f.write(text.encode()))


def read_evaluation(model_dir: Path) -> Evaluation | None:
    path = Path(model_dir) / EVAL_NAME
    return Evaluation.from_dict(json.loads(path.read_text())) if path.is_file() else None


def write_evaluation(model_dir: Path, evaluation: Evaluation) -> None:
    """Write `eval.json`: only a record that follows the protocol, since the card reports it."""
    problems = evaluation.protocol_problems()
    if problems:
        raise CardError(f"{model_dir}: not a reportable evaluation: {'; '.join(problems)}")
    (Path(model_dir) / EVAL_NAME).write_text(json.dumps(evaluation.to_dict(), indent=2))


def percent(a: float | None) -> str:
    """An accuracy in whole percent; "-" for a class without examples (None)."""
    return "-" if a is None else f"{a * 100:.0f}%"


def interval_text(share: float, n: int, unit: str = "samples") -> str:
    """ "75.0% (95% interval 69.2-80.1%, 240 samples)": a share measured on n things, with its Wilson interval."""
    lo, hi = wilson_interval(share, n)
    return f"{share * 100:.1f}% (95% interval {lo * 100:.1f}-{hi * 100:.1f}%, {n:,} {unit})"


def accuracy_text(evaluation: Evaluation) -> str:
    """ "75.0% (95% interval 69.2-80.1%, 240 samples)" for an evaluation's sample accuracy."""
    return interval_text(evaluation.accuracy, evaluation.samples)


def judge_accuracy_text(evaluation: Evaluation) -> str:
    """The judge's accuracy on real validation emoji with its interval, printed beside every sample accuracy;
    "not recorded" for evaluations that predate the field."""
    acc, n = evaluation.classifier_val_accuracy, evaluation.classifier_val_images
    if acc is None:
        return "not recorded"
    return interval_text(acc, n, "images") if n else f"{acc * 100:.1f}%"


def seeds_text(evaluation: Evaluation) -> str:
    """ "seeds 10,000-10,049 of each class (held out: ...)", or why the seeds are not the protocol's."""
    first = evaluation.first_seed or 0
    text = f"seeds {first:,}-{first + evaluation.samples_per_class - 1:,} of each class"
    if evaluation.first_seed is None:
        return text + " (measured before the protocol of docs/evaluation.md)"
    if evaluation.tuning or first < REPORT_FIRST_SEED:
        return text + " (tuning seeds)"
    return text + f" (held out: seeds below {REPORT_FIRST_SEED:,} are for tuning)"


def near_copies_text(evaluation: Evaluation) -> str:
    """The memorisation check's share of samples with its interval, beside the validation images' own."""
    if evaluation.near_copies is None:
        return "not measured"
    reference = evaluation.near_copies_reference
    return interval_text(evaluation.near_copies, evaluation.samples) + (
        f"; real validation emoji: {reference * 100:.1f}%" if reference is not None else ""
    )


def schedule_text(schedule: ScheduleConfig) -> str:
    """ "cosine, 1000 steps", with the signal-to-noise scale when there is one."""
    text = f"{schedule.kind}, {schedule.num_steps} steps"
    if schedule.snr_scale != 1:
        text += f", signal-to-noise ratio scaled by {schedule.snr_scale:g}"
    return text


def guidance_text(evaluation: Evaluation) -> str:
    """ "4.0", or "power-cosine to 8.0 (p 1.0)" for the scheduled guidance."""
    if evaluation.guidance_schedule == "constant":
        return f"{evaluation.guidance}"
    return f"power-cosine to {evaluation.guidance} (p {evaluation.guidance_power})"


def widened_text(source: ModelConfig, target: ModelConfig) -> str:
    """ "wider MLP in branch 0 (256 -> 512)" / "wider MLPs in branches 0 (256 -> 512), 1 (96 -> 192)", or
    "" when no copied branch's MLP is wider: how a grown model's card and log say it."""
    parts = [
        f"{k} ({s.mlp_width} -> {t.mlp_width})"
        for k, (s, t) in enumerate(zip(source.branches, target.branches, strict=False))
        if t.mlp_width != s.mlp_width
    ]
    if not parts:
        return ""
    many = len(parts) > 1
    return f"wider MLP{'s' if many else ''} in branch{'es' if many else ''} " + ", ".join(parts)


def added_text(added: tuple[int, ...] | list[int]) -> str:
    """ "branches 3, 4 new" / "branch 3 new" / "no new branch": how a grown model's card and log say it."""
    if not added:
        return "no new branch"
    return f"branch{'es' if len(added) > 1 else ''} {', '.join(map(str, added))} new"


def _known_or(value: object) -> str:
    return "?" if value is None or value == "" else str(value)


def commands_line(run: TrainingRun) -> str:
    commands = run.commands or ("?",)
    if len(commands) == 1:
        return f"Command: `{commands[0]}`"
    return "Commands, in order (the run resumed itself from its saved state): " + "; ".join(f"`{c}`" for c in commands)


def recipe_line(recipe: Recipe | None, then: str = "") -> str:
    """The card's recipe line (none for exports that predate the record); `then` describes a later
    phase of the same run (a resume with another batch size or schedule)."""
    if recipe is None:
        return ""
    lr = f"{recipe.lr:g} after {recipe.warmup_steps:,} warm-up steps"
    decay = recipe.decay_steps
    lr += f", constant, then a linear cool-down over the last {decay:,} steps" if decay else ", then constant"
    data = "random horizontal flips" if recipe.flips else "no flips"
    if recipe.class_balanced:
        data += "; class-balanced batches"
    precision = "float32" if recipe.mixed_precision == "no" else f"{recipe.mixed_precision} autocast"
    return (
        f"- Recipe: AdamW (betas {tuple(recipe.betas)}, weight decay {recipe.weight_decay:g}), learning rate {lr}; "
        f"EMA {recipe.ema_decay:g}; label dropout {recipe.label_dropout:g}; {data}; {precision}"
        + (f"; then {then}" if then else "")
        + "\n"
    )


def indented(lines: str) -> str:
    """Markdown list lines nested one level deeper."""
    return "".join("  " + line + "\n" for line in lines.splitlines())


def training_lines(info: RunInfo) -> str:
    """The card's lines for one training run; a fine-tune (a run started with `init_from`) first describes
    the training of the model it started from, as recorded in that model's run_info.json."""
    if isinstance(info, GrownModel):
        return grown_lines(info)
    lines = ""
    if info.source is not None:
        made = "made" if isinstance(info.source, GrownModel) else "trained"
        lines += f"- Started from `{info.init_from}`, {made} as follows:\n"
        lines += indented(training_lines(info.source))
        lines += "- Then fine-tuned from those weights (fresh optimizer):\n"
    elif info.init_from:
        lines += f"- Fine-tuned from `{info.init_from}` (fresh optimizer); that model's training is not recorded here\n"
    indent = "  " if info.source is not None else ""
    recipe = recipe_line(info.recipe, info.recipe_then)
    return lines + (
        f"{indent}- {commands_line(info)}\n"
        f"{indent}- Steps: {_known_or(info.step)} at batch {_known_or(info.batch_size)}; "
        f"wall time {_known_or(info.elapsed_min)} min\n"
        + (indent + recipe if recipe else "")
        + f"{indent}- Hardware: {_known_or(info.hardware)}\n"
    )


def grown_lines(info: GrownModel) -> str:
    """The card's lines for a grown model, then the training of the model it grew from."""
    factor = _known_or(info.patch_factor)
    how = [f"patchify kernels widened {factor}x"] if info.patch_factor != 1 else []
    how += [info.widened] if info.widened else []
    detail = " (" + "; ".join(how) + ")" if how else ""
    lines = (
        f"- Grown from `{info.grown_from}` with `{_known_or(info.command)}`: its {_known_or(info.copied_branches)} "
        f"branches copied{detail}, {added_text(info.added_branches)}\n"
    )
    if info.source is None:
        return lines + "  - that model's training is not recorded here\n"
    lines += f"- `{info.grown_from}` was trained as follows:\n"
    return lines + indented(training_lines(info.source))


def quality_table(ev: Evaluation) -> str:
    """The measured numbers, one row each, with the judge that measured them and the seeds."""
    rows = [
        ("class accuracy of samples", accuracy_text(ev)),
        ("the judge's accuracy on real validation emoji (what it can recognise)", judge_accuracy_text(ev)),
    ]
    if ev.classifier_train_accuracy is not None:
        rows.append(
            (
                "the judge's accuracy on the real training images, class-balanced (what a model that "
                "reproduced them exactly would score)",
                f"{ev.classifier_train_accuracy * 100:.1f}%",
            )
        )
    rows += [
        ("Frechet distance to the validation split (judge features)", f"{ev.fd:.2f}"),
        ("the same distance, train split vs validation split (floor)", f"{ev.fd_floor:.2f}"),
    ]
    if ev.fd_low is not None and ev.fd_low_floor is not None:
        rows.append(
            (
                "low-level Frechet distance (statistics of the judge's first layer: blur, speckle, colour "
                "noise), with its floor",
                f"{ev.fd_low:.3f} (floor {ev.fd_low_floor:.3f}, {ev.fd_low / ev.fd_low_floor:.1f}x)",
            )
        )
    if ev.fd_reference is not None and ev.fd_low_reference is not None and ev.fd_low_floor is not None:
        rows.append(
            (
                f"both distances for real training images drawn as the samples are ({ev.samples_per_class} per "
                f"class, mean of {REFERENCE_DRAWS} draws): what a model that reproduced them exactly would score",
                f"{ev.fd_reference:.2f} ({ev.fd_reference / ev.fd_floor:.1f}x floor); low-level "
                f"{ev.fd_low_reference:.3f} ({ev.fd_low_reference / ev.fd_low_floor:.1f}x)",
            )
        )
    rows += [
        (
            "near-copies: samples at least as close to a training image (judge features) as the closest "
            f"{NEAR_COPY_QUANTILE:.0%} of real validation emoji are",
            near_copies_text(ev),
        ),
        (
            f"sampling time per image ({ev.sampler}, {ev.steps} steps, guidance {guidance_text(ev)})",
            f"{ev.sec_per_image * 1000:.0f} ms",
        ),
    ]
    version = repr(ev.judge_version) if ev.judge_version else "not recorded"
    epochs = (ev.classifier_recipe or {}).get("epochs")
    judge = f"judge version {version}" + (f", {epochs} epochs" if epochs else "")
    return (
        f"Measured with `{ev.command}` on {ev.hardware}; {judge} (`mrdit/judge.py`, protocol: "
        "[docs/evaluation.md](../../docs/evaluation.md)):\n\n"
        "| metric | value |\n|---|---|\n"
        + "".join(f"| {name} | {value} |\n" for name, value in rows)
        + f"\n{ev.samples_per_class} samples per class, {seeds_text(ev)}."
    )


def judge_notes(ev: Evaluation, image_size: int) -> str:
    """At what size the samples were judged: numbers of other judges or sizes do not compare."""
    judge = ev.judge_size or image_size
    if judge == image_size:
        return ""
    return (
        f" The samples were judged at {judge} px (area-averaged from {image_size} px), by the judge "
        f"and against the validation split at {judge} px, so the numbers compare with the {judge} px models'."
    )


def per_class_section(ev: Evaluation) -> str:
    """Per class, the samples' accuracy (with its interval) next to the judge's own on real emoji: the
    ceiling it puts on them."""
    real = ev.classifier_val_per_class_accuracy
    if not real:
        return ""

    def sampled(a: float | None) -> str:
        if a is None:
            return "-"
        lo, hi = wilson_interval(a, ev.samples_per_class)
        return f"{percent(a)} ({lo * 100:.0f}-{hi * 100:.0f}%)"

    counts = ev.classifier_val_per_class_images or {}
    columns = {
        f"samples ({ev.samples_per_class} each, 95% interval)": {
            c: sampled(a) for c, a in ev.per_class_accuracy.items()
        }
    }
    overall = []
    if ev.classifier_train_per_class_accuracy is not None and ev.classifier_train_accuracy is not None:
        columns["real training emoji"] = {c: percent(a) for c, a in ev.classifier_train_per_class_accuracy.items()}
        overall.append(f"real training emoji (class-balanced {ev.classifier_train_accuracy * 100:.1f}%)")
    columns["real validation emoji"] = {
        c: percent(a) + (f" of {counts[c]}" if c in counts else "") for c, a in real.items()
    }
    val = ev.classifier_val_accuracy
    overall.append("real validation emoji" + (f" (overall {val * 100:.1f}%)" if val is not None else ""))
    rows = "\n".join(f"| {c} | " + " | ".join(col[c] for col in columns.values()) + " |" for c in real)
    return (
        f"\n\nPer class, the samples' accuracy next to the judge's own accuracy on {' and on '.join(overall)}:\n\n"
        f"| class | {' | '.join(columns)} |\n" + "|---" * (len(columns) + 1) + f"|\n{rows}"
    )


def quality_section(name: str, mc: ModelConfig, ev: Evaluation | None) -> str:
    if ev is None:
        return "Not measured yet: run `python train/evaluate.py weights/" + name + "`."
    return quality_table(ev) + judge_notes(ev, mc.image_size) + per_class_section(ev)


def branches_table(mc: ModelConfig) -> str:
    rows = "\n".join(
        f"| {k} | {b.kind} | {b.grid}x{b.grid} (patch {b.patch}) | {b.width} | {b.blocks} | {b.heads or '-'} |"
        for k, b in enumerate(mc.branches)
    )
    return f"| branch | kind | grid | width | blocks | heads |\n|---|---|---|---|---|---|\n{rows}"


def card(name: str, mc: ModelConfig, n_params: int, info: RunInfo, evaluation: Evaluation | None) -> str:
    """The model card of an emoji model: architecture, samples, quality, training, data credits, use."""
    arch = (
        "DiMR (multi-resolution)"
        if mc.architecture == "dimr"
        else "single-resolution baseline (transformer + linear unpatchify head)"
    )
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

{branches_table(mc)}

Classes ({mc.num_classes - 1}, plus the null label {mc.null_label} for guidance): {", ".join(mc.class_names)}.
Noise schedule: {schedule_text(mc.schedule)}; loss weights {list(mc.loss_weights)}.

![samples](samples.png)

*One row per class, seeds 0-{GRID_SEEDS - 1}, `{DEFAULT_SAMPLER}`, {GRID_STEPS} steps, guidance {DEFAULT_GUIDANCE}.*

## Quality

{quality_section(name, mc, evaluation)}

## Training

{training_lines(info)}- Data: `python train/prepare_emoji.py` (three emoji styles from the npm registry, {mc.num_classes - 1} classes, {mc.image_size} px)

{USE_SECTIONS.format(credits=EMOJI_CREDITS, name=name, guidance=DEFAULT_GUIDANCE)}"""


USE_SECTIONS = """## Data, licences and attribution

The training images come from:

{credits}

The weights are released under Apache-2.0. Generated images resemble these emoji styles; attribute
the sources above when you publish them.

## Use

```python
from mrdit.pipeline import Pipeline

pipe = Pipeline.from_pretrained("weights/{name}")
result = pipe.generate("face", seeds=[0, 1, 2, 3], steps=25, guidance={guidance})
result.images[0].save("face.png")
```

Model: DiMR, Q. Liu et al., "Alleviating Distortion in Image Generation via Multi-Resolution Diffusion
Models", NeurIPS 2024 (arXiv:2406.09416).
"""


def render_card(model_dir: Path) -> str:
    """The card of a model directory, from its config.json, run_info.json and eval.json (if present)."""
    from .build import build_model
    from .checkpoint import read_config

    model_dir = Path(model_dir)
    mc = read_config(model_dir)
    n_params = sum(p.numel() for p in build_model(mc, device="meta").parameters())
    return card(model_dir.name, mc, n_params, read_run_info(model_dir), read_evaluation(model_dir))


GENERATED_SECTIONS = ("Quality", "Training", "Data, licences and attribution", "Use")


def hand_written_sections(text: str) -> str:
    """The `## ` sections of a card that `card` does not write (a note added by hand), in order."""
    parts = re.split(r"(?m)^(?=## )", text)[1:]
    return "".join(part for part in parts if part.split("\n", 1)[0][3:] not in GENERATED_SECTIONS)


def write_card(model_dir: Path) -> None:
    """(Re)write the directory's README.md (`render_card`), keeping the sections added to it by hand
    (before the attribution)."""
    path = Path(model_dir) / CARD_NAME
    text = render_card(model_dir)
    kept = hand_written_sections(path.read_text()) if path.is_file() else ""
    if kept:
        text = text.replace("## Data, licences and attribution", kept + "## Data, licences and attribution", 1)
    path.write_text(text)
