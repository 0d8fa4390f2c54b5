"""Training units: config, learning-rate schedule, optimizer groups, EMA, deterministic batch order,
one training step, and the full training state (written atomically, resumed automatically).

`train/train.py` is the command-line loop around these; tests call them directly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .build import no_decay_parameter_names
from .checkpoint import CheckpointError, atomic_write, load_model, save_model
from .config import ConfigError, ModelConfig, changed_fields
from .losses import multiscale_loss, noised
from .presets import get_preset
from .rng import BALANCED_STREAM, example_generators, order_seed, rand_rows, randint_rows, randn_rows
from .schedule import NoiseSchedule

STATE_PATTERN = re.compile(r"^state-(\d{8})\.pt$")
EMA_DIR = "ema"  # the run's EMA model as a model directory (safetensors + config.json), written when it stops
EMA_RECORD = "ema.json"  # beside it: the step, time and training config it belongs to


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run. Saved as `train_config.json` in the run folder."""

    model: str = "emoji-32"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: str = "emoji"  # emoji | image-folder | latents
    data_path: str = "data/emoji"
    image_size: int = 32
    batch_size: int = 32  # global, over all processes
    steps: int = 20000
    lr: float = 5e-4
    warmup_steps: int = 500
    decay_steps: int = 0  # linear cool-down to 0 over the last decay_steps; 0 = constant (the release)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.03
    label_dropout: float = 0.1
    ema_decay: float = 0.999
    mixed_precision: str = "no"  # no | bf16 | fp16
    grad_clip: float = 0.0  # 0 = off
    grad_checkpointing: bool = False
    compile: bool | str = False  # False | True (whole model) | "blocks" (each block compiled in place)
    activation_memory_budget: float = 1.0  # compiled backward keeps this fraction of activations (< 1: recompute)
    channels_last: bool = False
    flips: bool = True
    class_balanced: bool = False  # draw classes uniformly (then an image within the class), not images uniformly
    seed: int = 0
    log_every: int = 50
    sample_every: int = 2000
    save_every: int = 1000
    keep_states: int = 2
    sample_steps: int = 25
    sample_guidance: float = 2.0
    threads: int = 0  # torch CPU threads; 0 = leave the default
    num_workers: int = 0  # data-loader processes per rank that prepare batches ahead; 0 = in the loop
    init_from: str = ""  # a model directory or Hub repo id whose weights start a new run (fine-tuning); "" = random

    def __post_init__(self) -> None:
        self._check_types()
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        checks = [
            ("data", self.data in ("emoji", "image-folder", "latents"), "must be emoji, image-folder or latents"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("steps", self.steps >= 1, "must be >= 1"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "must be positive"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("decay_steps", 0 <= self.decay_steps <= self.steps, "must be in [0, steps]"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "must be two numbers in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("label_dropout", 0 <= self.label_dropout < 1, "must be in [0, 1)"),
            ("ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1)"),
            ("mixed_precision", self.mixed_precision in ("no", "bf16", "fp16"), "must be no, bf16 or fp16"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0"),
            ("save_every", self.save_every >= 1, "must be >= 1"),
            ("keep_states", self.keep_states >= 1, "must be >= 1"),
            ("num_workers", self.num_workers >= 0, "must be >= 0"),
            ("compile", self.compile in (False, True, "blocks"), 'must be false, true or "blocks"'),
            ("activation_memory_budget", 0 < self.activation_memory_budget <= 1, "must be in (0, 1]"),
            (
                "activation_memory_budget",
                self.activation_memory_budget == 1 or self.compile is not False,
                'below 1 needs compile (true or "blocks")',
            ),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ConfigError(f"{name}: {msg}, got {getattr(self, name)!r}")

    def _check_types(self) -> None:
        """Each field has its declared type, so a typo in a config file or `--set` (`steps=2e3x` arrives as
        a string) is a clear error rather than a failed comparison deep in the checks."""
        wanted = {
            "int": ((int,), "an integer"),
            "float": ((int, float), "a number"),
            "str": ((str,), "a string"),
            "bool": ((bool,), "true or false"),
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in wanted:
                types, what = wanted[f.type]
                ok = isinstance(value, types) and (f.type == "bool" or not isinstance(value, bool))
            elif f.name == "betas":
                what = "two numbers"
                ok = isinstance(value, (list, tuple)) and all(
                    isinstance(b, (int, float)) and not isinstance(b, bool) for b in value
                )
            elif f.name == "model_overrides":
                ok, what = isinstance(value, dict), "an object of model config fields"
            else:
                continue
            if not ok:
                raise ConfigError(f"{f.name}: must be {what}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training config field(s): {', '.join(unknown)}")
        return cls(**d)

    def with_overrides(self, pairs: list[str]) -> TrainConfig:
        """Apply `key=value` overrides (value parsed as JSON, else a string); unknown keys are errors."""
        d = self.to_dict()
        for pair in pairs:
            if "=" not in pair:
                raise ConfigError(f"override {pair!r} is not key=value")
            k, v = pair.split("=", 1)
            if k not in d:
                raise ConfigError(f"unknown training config field {k!r}")
            try:
                d[k] = json.loads(v)
            except json.JSONDecodeError:
                d[k] = v
        return TrainConfig.from_dict(d)


def compile_regions(model: nn.Module) -> list[nn.Module]:
    """What regional compilation compiles: every block, every U-ViT skip join and every upsampler, of
    every branch (DiMR) or of the trunk (baseline). Modules of the same kind and shape share one graph."""
    trunks = [model.trunk] if hasattr(model, "trunk") else list(model.branches)
    out: list[nn.Module] = []
    for t in trunks:
        out += [*t.blocks, *t.skips] + ([t.upsample] if t.upsample is not None else [])
    return out


def allow_regional_recompiles(limit: int = 64) -> None:
    """Compiled modules share one compile cache (`nn.Module.compile` compiles `Module._call_impl`), so
    a few kinds of region x grad modes x shapes exceed the default limit of 8 graphs, past which the
    compiler silently runs the rest eagerly."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(limit, getattr(dynamo_config, name)))


def compile_for_training(model: nn.Module, mode: bool | str, memory_budget: float = 1.0) -> nn.Module:
    """The module to call in training. `mode`: False (as is), True (`torch.compile` of the whole model) or
    "blocks" (regional compilation of `compile_regions` in place: identical modules share one compiled
    graph, so compiling takes seconds, and it works inside activation checkpointing). `memory_budget` < 1
    lets the compiled backward keep only that fraction of the activations and recompute the rest,
    cheapest first (measured speed and memory: docs/training.md). The budget is a process-wide compiler setting."""
    if memory_budget < 1:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = memory_budget
    if mode == "blocks":
        allow_regional_recompiles()
        for module in compile_regions(getattr(model, "module", model)):  # through a DistributedDataParallel wrapper
            module.compile()
        return model
    return torch.compile(model) if mode else model


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then constant (the release's schedule).

    With `decay_steps` > 0 the last `decay_steps` steps cool down linearly towards 0 (warm-up, stable,
    decay), which lets a long constant-rate run be finished off without restarting it.
    """
    lr = cfg.lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        lr = cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_steps and step >= cfg.steps - cfg.decay_steps:
        lr = min(lr, cfg.lr * (cfg.steps - step) / cfg.decay_steps)
    return lr


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the TD parameters' gates (w, b) get no weight decay, as released."""
    no_decay = no_decay_parameter_names(model)
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if name in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


class EMA:
    """Exponential moving average of a model's weights (float32), with the usual early warm-up."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """e <- e + (1 - d) (p - e) for every parameter, as one multi-tensor operation (few kernels)."""
        d = min(self.decay, (1 + step) / (10 + step))
        ema = list(self.model.parameters())
        live = [p.detach().float() for p in model.parameters()]
        if len(ema) != len(live):
            raise ValueError(f"EMA holds {len(ema)} parameters, the model has {len(live)}")
        torch._foreach_lerp_(ema, live, 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)


def preset_with_overrides(cfg: TrainConfig) -> ModelConfig:
    """The model a training config names: its preset with `model_overrides` applied."""
    d = get_preset(cfg.model).to_dict()
    for k, v in cfg.model_overrides.items():
        if k not in d:
            raise ConfigError(f"model_overrides: unknown model config field {k!r}")
        d[k] = v
    return ModelConfig.from_dict(d)


def initial_weights(source: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The float32 weights of the model directory (or Hub repo id) `source`, to start a fine-tune from.

    Its config must equal the run's, field for field (the data's classes included), so a fine-tune
    never silently loads weights into a different network; the error names the fields that differ.
    """
    model = load_model(source)  # strict: missing, mis-shaped, non-finite or corrupt weights are errors
    changed = changed_fields(model.config.to_dict(), config.to_dict())
    if changed:
        raise CheckpointError(f"init_from {source}: its config differs from this run's in {', '.join(changed)}")
    return model.state_dict()


def batch_indices(step: int, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's dataset indices for `step`: a fresh permutation per epoch, seeded by (seed, epoch),
    so the data position is a function of the step alone (exact resume, any world size)."""
    pos = torch.arange(step * global_batch, (step + 1) * global_batch)
    epochs, offsets = pos // n, pos % n
    out = torch.empty_like(pos)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(order_seed(seed, e)))
        mask = epochs == e
        out[mask] = perm[offsets[mask]]
    per_rank = global_batch // world
    return out[rank * per_rank : (rank + 1) * per_rank]


class ClassBalancedOrder:
    """Batches with every class equally likely: a class drawn uniformly among those present in `labels`
    (N,), then one of its images uniformly, with replacement. For data whose classes are unequally
    common (rare classes would otherwise get few updates) when every class will be asked for equally
    often. The grouping by class is done once here, not per step."""

    def __init__(self, labels: torch.Tensor) -> None:
        _, self.counts = labels.unique(return_counts=True)
        self.by_class = labels.argsort(stable=True)  # indices grouped by class, classes ascending
        self.starts = self.counts.cumsum(0) - self.counts

    def indices(self, step: int, global_batch: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This rank's dataset indices for `step`. Seeded by (seed, step) alone, so resume is exact at
        any world size, like `batch_indices`."""
        g = torch.Generator().manual_seed(order_seed(seed, step, BALANCED_STREAM))
        c = torch.randint(len(self.counts), (global_batch,), generator=g)
        within = (torch.rand(global_batch, generator=g, dtype=torch.float64) * self.counts[c]).long()
        out = self.by_class[self.starts[c] + within.minimum(self.counts[c] - 1)]
        per_rank = global_batch // world
        return out[rank * per_rank : (rank + 1) * per_rank]


def balanced_batch_indices(
    step: int, labels: torch.Tensor, global_batch: int, seed: int, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """`ClassBalancedOrder(labels).indices(...)` for one step (a loop keeps one `ClassBalancedOrder`)."""
    return ClassBalancedOrder(labels).indices(step, global_batch, seed, rank, world)


def noisy_batch(
    x0: torch.Tensor,
    y: torch.Tensor,
    schedule: NoiseSchedule,
    null_label: int,
    label_dropout: float,
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw steps n ~ U{1..N}, noise and label dropout, example i from `generators[i]` (on the CPU, so a
    resumed or differently parallel run draws the same; see `mrdit.rng`)."""
    B = x0.shape[0]
    if len(generators) != B:
        raise ValueError(f"need one generator per example: {B} examples, {len(generators)} generators")
    n = randint_rows(1, schedule.N + 1, generators)  # (B,)
    eps = randn_rows(tuple(x0.shape[1:]), generators)  # (B, C, H, W)
    drop = rand_rows(generators) < label_dropout  # (B,)
    y = torch.where(drop, torch.full_like(y, null_label), y.cpu())
    return noised(x0.cpu(), n, eps, schedule), n.float(), y, eps


class StepBatches(torch.utils.data.Dataset):
    """Item `step`: this rank's noised training batch (xn, n, y, eps) of that step.

    A function of (seed, step, rank, world) alone: the indices come from `batch_indices` (or the
    class-balanced order), every random draw from the example's own generator (`mrdit.rng`). So a
    data loader can prepare steps ahead in worker processes (images decoded, shards read there) and
    the run stays exactly what the plain loop computes, resumable at any step and any world size.
    """

    def __init__(
        self,
        dataset: Any,
        schedule: NoiseSchedule,
        null_label: int,
        cfg: TrainConfig,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.dataset, self.schedule, self.null_label, self.cfg = dataset, schedule, null_label, cfg
        self.rank, self.world = rank, world
        self.per_rank = cfg.batch_size // world
        self.balanced = ClassBalancedOrder(dataset.labels) if cfg.class_balanced else None

    def indices(self, step: int) -> torch.Tensor:
        where = (self.cfg.batch_size, self.cfg.seed, self.rank, self.world)
        if self.balanced is not None:
            return self.balanced.indices(step, *where)
        return batch_indices(step, len(self.dataset), *where)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        first = self.rank * self.per_rank
        gens = example_generators(self.cfg.seed, step, range(first, first + self.per_rank))
        flips = rand_rows(gens) < 0.5 if self.cfg.flips else None
        x0, y = self.dataset.batch(self.indices(step), flips, generator=gens)
        return noisy_batch(x0, y, self.schedule, self.null_label, self.cfg.label_dropout, gens)


def step_batches(batches: StepBatches, start: int, stop: int, workers: int, pin_memory: bool = False) -> Iterator:
    """The batches of steps start..stop-1 in order: prepared in the loop (`workers` = 0) or ahead by a
    torch DataLoader's worker processes (pinned for fast copies to a GPU when `pin_memory`)."""
    if workers == 0:
        return (batches[s] for s in range(start, stop))
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, stop), num_workers=workers, pin_memory=pin_memory
    )
    return iter(loader)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Any,
    xn: torch.Tensor,
    n: torch.Tensor,
    y: torch.Tensor,
    eps: torch.Tensor,
    loss_weights: tuple[float, ...],
    lr: float,
    grad_clip: float,
) -> dict[str, torch.Tensor]:
    """One optimisation step on a noised batch; returns metrics (loss, grad norm) as 0-d tensors.

    Metrics stay on the device: reading them (float()) waits for the GPU, so the loop does that only
    when it logs, and the next step's launches overlap this step's work.
    """
    for g in optimizer.param_groups:
        g["lr"] = lr
    with accelerator.autocast():
        preds = model(xn, n, y)
    loss = multiscale_loss(preds, eps, loss_weights).mean()
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    metrics = {"loss": loss.detach()}
    if grad_clip > 0:
        metrics["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return metrics


def list_states(run_dir: Path) -> list[tuple[int, Path]]:
    states = []
    for p in (run_dir / "states").glob("state-*.pt"):
        m = STATE_PATTERN.match(p.name)
        if m:
            states.append((int(m.group(1)), p))
    return sorted(states)


def save_state(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write the full training state atomically (temporary file, fsync, rename), keep the last `keep`."""
    folder = run_dir / "states"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"state-{step:08d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    for _, old in list_states(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest_state(run_dir: Path) -> dict[str, Any] | None:
    """The newest training state that loads; a damaged newest file falls back to the one before.

    Loaded with `weights_only=True`: tensors, numbers and containers only, never code.
    """
    for step, path in reversed(list_states(run_dir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("step") == step:
                return state
        except Exception as e:  # a truncated or corrupt state: say so and try the previous one
            print(f"warning: skipping unreadable training state {path}: {e}")
    return None


@dataclass(frozen=True)
class EmaExport:
    """What a run folder's `ema` model directory holds: the EMA weights at `step`, after `elapsed_s`
    seconds of training under `train_config` (a `TrainConfig.to_dict()`)."""

    step: int
    elapsed_s: float
    train_config: dict[str, Any]


def save_ema(run_dir: Path, model: nn.Module, step: int, elapsed_s: float, cfg: TrainConfig) -> Path:
    """Write the EMA model to `run_dir/ema` (float32 safetensors, the inference format) and its record."""
    out = save_model(model, run_dir / EMA_DIR)
    record = json.dumps(dataclasses.asdict(EmaExport(step, elapsed_s, cfg.to_dict())), indent=2)
    atomic_write(run_dir / EMA_RECORD, lambda f: f.write(record.encode()))
    return out


def load_ema(run_dir: Path) -> tuple[nn.Module, EmaExport]:
    """The EMA model of the run's newest training state, read from its safetensors copy `run_dir/ema`
    (nothing is unpickled), and its record. Errors say what to run when the copy is missing or older
    than the newest state (a run stopped by SIGKILL writes states but not the copy)."""
    states = list_states(run_dir)
    if not states:
        raise CheckpointError(f"{run_dir} has no training state to export")
    ema_dir, record_path = run_dir / EMA_DIR, run_dir / EMA_RECORD
    again = "run the training command again: it resumes from the newest state and writes them when it stops"
    if not (ema_dir / "config.json").is_file() or not record_path.is_file():
        raise CheckpointError(f"{run_dir} has no EMA model ({ema_dir} and {record_path}); {again}")
    try:
        record = EmaExport(**json.loads(record_path.read_text()))
    except (TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{record_path}: not an EMA record ({e}); {again}") from None
    newest = states[-1][0]
    if record.step != newest:
        raise CheckpointError(
            f"{ema_dir} holds step {record.step} but the newest training state is step {newest}; {again}"
        )
    return load_model(ema_dir), record
