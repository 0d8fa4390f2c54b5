"""Train a DiMR (or baseline) model. One command for one CPU, one GPU, or many GPUs:

    python train/train.py --config train/configs/emoji-32.json --run-dir runs/emoji-32
    accelerate launch --num_processes 8 train/train.py --config ... --run-dir ...

The run folder holds the resolved config, JSONL metrics, sample grids from the EMA model and the
full training state (model, EMA, optimizer, step), written atomically every `save_every` steps.
Starting the same command again resumes from the newest complete state by itself; SIGTERM/SIGINT
save the state and the EMA model and exit cleanly. Batches, flips, noise and label dropout are functions of
(seed, step, position in the global batch), so a resumed run ends with the same weights as an
uninterrupted one, and N processes train the model one process trains at the same global batch.
`num_workers` > 0 prepares batches ahead in data-loader processes (same batches).
`--set init_from=weights/NAME` starts a new run (a fine-tune) from an exported model's weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mrdit import save_model
from mrdit.build import build_model
from mrdit.checkpoint import CheckpointError
from mrdit.config import ConfigError, ModelConfig, changed_fields
from mrdit.data import ImageFolderDataset, LatentDataset, load_emoji
from mrdit.pipeline import DEFAULT_SAMPLER, InputError, LatentDecoder, PixelDecoder
from mrdit.sampling import noise_for_seeds, sample
from mrdit.schedule import NoiseSchedule
from mrdit.shards import ShardedLatentDataset
from mrdit.training import (
    EMA,
    StepBatches,
    TrainConfig,
    compile_for_training,
    initial_weights,
    list_states,
    load_latest_state,
    lr_at,
    make_optimizer,
    preset_with_overrides,
    save_ema,
    save_state,
    step_batches,
    train_step,
)
from mrdit.visual import save_grid


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, required=True, help="training config JSON (see train/configs/)")
    p.add_argument("--run-dir", type=Path, required=True, help="run folder: config, metrics, samples, states")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields (JSON values)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--force", action="store_true", help="resume even if the config differs from the run's saved one")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after this many minutes of training in this invocation: save the state and the EMA model "
        "(run the same command to continue); 0 = no limit",
    )
    p.add_argument(
        "--export-every",
        type=int,
        default=0,
        help="also write the EMA model to RUN_DIR/ema-STEP every this many steps (float16), e.g. to compare "
        "runs at equal steps; 0 = off",
    )
    args = p.parse_args(argv)
    if args.max_minutes < 0 or args.export_every < 0:
        p.error("--max-minutes and --export-every must be >= 0")
    return p, args


def resolved_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The config file with the `--set` overrides; a bad file or field is a usage error."""
    try:
        return TrainConfig.from_dict(json.loads(args.config.read_text())).with_overrides(args.set)
    except (ConfigError, OSError, json.JSONDecodeError) as e:
        p.error(str(e))


def dry_run(p: argparse.ArgumentParser, cfg: TrainConfig) -> int:
    """Print the model the run would build: the preset with its `model_overrides` (the classes are
    set from the data when the run starts)."""
    try:
        model = preset_with_overrides(cfg)
    except ConfigError as e:
        p.error(str(e))
    print(f"model ({cfg.model} with model_overrides; classes from the data):", model.to_json())
    return 0


def config_change(run: Path, cfg: TrainConfig) -> list[str]:
    """The fields in which `cfg` differs from the config the run folder was started with (none for a new run)."""
    saved = run / "train_config.json"
    if not saved.is_file():
        return []
    old = json.loads(saved.read_text())
    new = json.loads(json.dumps(cfg.to_dict()))
    # Thread and worker counts change speed, not results; anything else must match to resume.
    return changed_fields(old, new, ignore=("threads", "num_workers"))


def load_dataset(cfg: TrainConfig, model_config: ModelConfig):
    if cfg.data == "emoji":
        return load_emoji(cfg.data_path, "train", cfg.image_size)
    if cfg.data == "image-folder":
        return ImageFolderDataset(cfg.data_path, cfg.image_size)
    if model_config.autoencoder is None:
        raise ConfigError("data: latents need a model config with an autoencoder")
    if Path(cfg.data_path).is_dir():  # shards from train/encode_latents.py, read a batch at a time
        return ShardedLatentDataset(cfg.data_path, model_config.autoencoder.scale_factor)
    return LatentDataset(cfg.data_path, model_config.autoencoder.scale_factor)


def resolve_model_config(cfg: TrainConfig, class_names: list[str]) -> ModelConfig:
    """The preset with its overrides, sized to the dataset's classes (plus the null label)."""
    d = preset_with_overrides(cfg).to_dict()
    d.update(num_classes=len(class_names) + 1, null_label=len(class_names), class_names=list(class_names))
    return ModelConfig.from_dict(d)


def run_inputs(
    p: argparse.ArgumentParser, cfg: TrainConfig, run: Path, processes: int
) -> tuple[Any, ModelConfig, dict[str, torch.Tensor] | None]:
    """The dataset, the model config sized to it, and the weights of `init_from` for a new run (None
    otherwise); every problem is a usage error raised before the run folder is written."""
    try:
        dataset = load_dataset(cfg, preset_with_overrides(cfg))
    except (ValueError, OSError) as e:  # a missing or unfinished dataset: say which, without a traceback
        p.error(f"data: {e}")
    mc = resolve_model_config(cfg, dataset.class_names)
    if dataset.image_size != mc.image_size:
        p.error(f"data image size {dataset.image_size} != model image_size {mc.image_size}")
    if cfg.batch_size % processes:
        p.error(f"batch_size {cfg.batch_size} is not divisible by {processes} processes")
    init = None
    if cfg.init_from and not list_states(run):
        try:
            init = initial_weights(cfg.init_from, mc)
        except CheckpointError as e:
            p.error(str(e))
    return dataset, mc, init


def write_run_files(run: Path, cfg: TrainConfig, mc: ModelConfig) -> None:
    """The resolved configs and the command line (appended: one line per invocation)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (run / "model_config.json").write_text(mc.to_json())
    with open(run / "command.txt", "a") as f:
        f.write(" ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) + "\n")
    print("model config:", mc.to_json(), flush=True)


@dataclass
class Trainer:
    """The model, its EMA and optimizer as prepared by the accelerator, and where the run stands."""

    accelerator: Any
    cfg: TrainConfig
    mc: ModelConfig
    run: Path
    model: nn.Module  # as prepared (wrapped for data parallelism over processes)
    unwrapped: nn.Module  # the module itself: what the EMA follows and the state saves
    train_model: nn.Module  # what the step calls: the prepared model, perhaps compiled
    ema: EMA
    optimizer: torch.optim.Optimizer
    step: int = 0
    elapsed: float = 0.0

    @property
    def main_proc(self) -> bool:
        return self.accelerator.is_main_process

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """One optimisation step and EMA update on a batch (xn, n, y, eps) of `step_batches`."""
        xn, n, y, eps = batch
        dev = self.accelerator.device
        if self.cfg.channels_last:
            xn = xn.contiguous(memory_format=torch.channels_last)
        xn, n, y, eps = (t.to(dev, non_blocking=True) for t in (xn, n, y, eps))
        lr = lr_at(self.step, self.cfg)
        m = train_step(
            self.train_model,
            self.optimizer,
            self.accelerator,
            xn,
            n,
            y,
            eps,
            self.mc.loss_weights,
            lr,
            self.cfg.grad_clip,
        )
        self.ema.update(self.unwrapped, self.step)
        self.step += 1
        return m

    def checkpoint(self) -> None:
        """The full training state of this step (rank 0 writes it; every process waits)."""
        if self.main_proc:
            state = {
                "step": self.step,
                "elapsed": self.elapsed,
                "model": self.unwrapped.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "train_config": json.dumps(self.cfg.to_dict()),
                "model_config": self.mc.to_json(),
            }
            save_state(self.run, self.step, state, self.cfg.keep_states)
        self.accelerator.wait_for_everyone()


def build_trainer(
    cfg: TrainConfig, mc: ModelConfig, run: Path, init: dict[str, torch.Tensor] | None, accelerator: Any
) -> Trainer:
    """A fresh model, resumed from the run's newest state or started from `init`, then prepared."""
    main_proc = accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    model = build_model(mc)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    ema = EMA(model, cfg.ema_decay)
    optimizer = make_optimizer(model, cfg)
    step, elapsed = 0, 0.0
    state = load_latest_state(run)
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
        if main_proc:
            print(f"resumed from step {step}", flush=True)
    elif init is not None:
        model.load_state_dict(init)
        ema.load_state_dict(init)
        if main_proc:
            print(f"initialised from {cfg.init_from}", flush=True)
    return prepare(accelerator, cfg, mc, run, model, ema, optimizer, step, elapsed)


def prepare(
    accelerator: Any,
    cfg: TrainConfig,
    mc: ModelConfig,
    run: Path,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    step: int,
    elapsed: float,
) -> Trainer:
    """The Trainer of a built (and perhaps resumed) model: laid out, prepared and compiled as configured."""
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.model.to(accelerator.device)
    train_model = compile_for_training(model, cfg.compile, cfg.activation_memory_budget)
    unwrapped = accelerator.unwrap_model(model)
    return Trainer(accelerator, cfg, mc, run, model, unwrapped, train_model, ema, optimizer, step, elapsed)


class StopSignal:
    """Remembers a SIGTERM or SIGINT, so the loop saves and stops at the end of the step."""

    def __init__(self) -> None:
        self.received: int | None = None
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.received = signum


class Progress:
    """The progress bar and the metrics log: one record per `log_every` steps, over the steps since the last."""

    def __init__(self, t: Trainer) -> None:
        self.cfg = t.cfg
        self.file = open(t.run / "metrics.jsonl", "a") if t.main_proc else None
        self.bar = tqdm(
            total=t.cfg.steps, initial=t.step, desc="train", unit="step", disable=not t.main_proc, dynamic_ncols=True
        )
        self.window_t, self.window_imgs, self.losses = time.perf_counter(), 0, []

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)
        self.window_imgs += self.cfg.batch_size
        self.bar.update(1)

    def log(self, step: int, elapsed: float) -> float:
        """Write the record of the window ending at `step`; returns its mean loss (not finite: not written)."""
        now = time.perf_counter()
        rate = self.window_imgs / max(now - self.window_t, 1e-9)
        loss = float(torch.stack(self.losses).mean())  # waits for the device, once per log interval
        if not math.isfinite(loss):
            return loss
        rec = {"step": step, "loss": loss, "lr": lr_at(step - 1, self.cfg), "img_per_s": rate, "elapsed_s": elapsed}
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rate:.0f}")
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        self.window_t, self.window_imgs, self.losses = now, 0, []
        return loss


def diverged(progress: Progress, run: Path, what: str) -> int:
    """Stop without writing a state: the last good one stays the newest."""
    progress.bar.close()
    print(
        f"error: {what}; stopping without saving (the last good state in {run / 'states'} is kept). "
        "Lower lr or set grad_clip.",
        file=sys.stderr,
    )
    return 3


def out_of_time(t: Trainer, started: float, max_minutes: float) -> bool:
    """Every process must stop at the same step: rank 0's clock decides."""
    late = torch.tensor(float(time.perf_counter() - started > max_minutes * 60), device=t.accelerator.device)
    if t.accelerator.num_processes > 1:
        late = t.accelerator.reduce(late, reduction="max")
    return bool(late)


def train_loop(
    t: Trainer, loader, progress: Progress, stop: StopSignal, decoder, args: argparse.Namespace
) -> int | None:
    """Steps until the end, a time limit or a signal, with logs, grids, exports and states on their
    schedules; an exit code when the run diverged, else None."""
    cfg, run = t.cfg, t.run
    started, late = time.perf_counter(), False
    while t.step < cfg.steps:
        t0 = time.perf_counter()
        m = t.train_step(next(loader))
        t.elapsed += time.perf_counter() - t0
        progress.add(m["loss"])
        step = t.step
        if args.max_minutes and step % cfg.log_every == 0:
            late = out_of_time(t, started, args.max_minutes)
        if step % cfg.log_every == 0 or step == cfg.steps or late:
            loss = progress.log(step, t.elapsed)
            if not math.isfinite(loss):
                return diverged(progress, run, f"the loss is not finite ({loss}) near step {step}")
        if decoder is not None and (step % cfg.sample_every == 0 or step == cfg.steps):
            sample_grid(t.ema.model, cfg, t.mc, run / "samples" / f"step-{step:08d}.png", t.accelerator.device, decoder)
        if t.main_proc and args.export_every and step % args.export_every == 0:
            save_model(t.ema.model, run / f"ema-{step:08d}", dtype=torch.float16)
        scheduled = step % cfg.save_every == 0 or step == cfg.steps or late
        if (scheduled or stop.received is not None) and not finite(t.unwrapped):
            return diverged(progress, run, f"the weights are not finite at step {step}")
        if scheduled or stop.received is not None:
            t.checkpoint()
        if late or stop.received is not None:
            break
    progress.bar.close()
    return None


def finish(t: Trainer, stop: StopSignal) -> None:
    """Rank 0 writes the EMA model (the inference export, for train/export.py or mrdit.load_model) and
    says how the run ended: finished (DONE), stopped by the time limit (PAUSED) or by a signal."""
    run, step = t.run, t.step
    stopped_early = step < t.cfg.steps  # a limit or signal reached on the last step still finishes the run
    if t.main_proc:
        save_ema(run, t.ema.model, step, t.elapsed, t.cfg)
        info = {"step": step, "elapsed_s": t.elapsed, "hardware": hardware(t.accelerator)}
        if stopped_early and stop.received is not None:
            print(
                f"stopped by signal {stop.received} at step {step}; state saved and EMA model in {run / 'ema'}, "
                "run the same command to resume",
                flush=True,
            )
        elif stopped_early:
            (run / "PAUSED").write_text(json.dumps(info))
            print(
                f"time limit: stopped at step {step} of {t.cfg.steps} after {t.elapsed / 60:.1f} min; state saved and "
                f"EMA model in {run / 'ema'}; run the same command to continue",
                flush=True,
            )
        else:
            (run / "PAUSED").unlink(missing_ok=True)
            (run / "DONE").write_text(json.dumps(info))
            print(f"done: {step} steps in {t.elapsed / 60:.1f} min; EMA model in {run / 'ema'}", flush=True)
    t.accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    cfg = resolved_config(p, args)
    print("training config:", json.dumps(cfg.to_dict(), indent=2), flush=True)
    if args.dry_run:
        return dry_run(p, cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    from accelerate import Accelerator  # imported late so --help and --dry-run stay fast

    # cpu=True without a GPU: under a multi-process launcher that gives DDP over gloo on the CPU.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    run = args.run_dir
    changed = config_change(run, cfg)
    if changed and not args.force:
        print(
            f"error: {run} was started with a different config (changed: {', '.join(changed)}); use --force to resume anyway",
            file=sys.stderr,
        )
        return 2
    dataset, mc, init = run_inputs(p, cfg, run, accelerator.num_processes)
    if accelerator.is_main_process:
        write_run_files(run, cfg, mc)
    t = build_trainer(cfg, mc, run, init, accelerator)
    if t.main_proc:
        n_params = sum(p.numel() for p in t.unwrapped.parameters())
        print(
            f"parameters: {n_params:,}; dataset: {len(dataset)} images, {len(dataset.class_names)} classes; processes: {accelerator.num_processes}"
        )
    stop = StopSignal()
    progress = Progress(t)
    batches = StepBatches(
        dataset, NoiseSchedule(mc.schedule), mc.null_label, cfg, accelerator.process_index, accelerator.num_processes
    )
    loader = step_batches(batches, t.step, cfg.steps, cfg.num_workers, pin_memory=accelerator.device.type == "cuda")
    decoder = grid_decoder(mc, accelerator.device) if t.main_proc and cfg.sample_every else None
    code = train_loop(t, loader, progress, stop, decoder, args)
    if code is not None:
        return code
    finish(t, stop)
    return 0


def grid_decoder(mc: ModelConfig, device):
    """What turns samples into images for the grids: the data itself, or the configured autoencoder;
    None (with a log line) when a latent model's autoencoder cannot be loaded here."""
    if mc.autoencoder is None:
        return PixelDecoder()
    try:
        return LatentDecoder.from_config(mc, device)
    except InputError as e:
        print(f"sample grids skipped: {e}", flush=True)
        return None


def sample_grid(ema_model, cfg: TrainConfig, mc: ModelConfig, path: Path, device, decoder) -> None:
    """Two rows of the first (at most 16) classes from the EMA model, image i from seed i, with the
    default sampler: the same images at every grid of a run, so grids compare across steps."""
    classes = min(mc.num_classes - 1, 16)
    labels = torch.arange(classes).repeat(2).to(device)
    noise, gens = noise_for_seeds(range(len(labels)), (mc.channels, mc.image_size, mc.image_size), device)
    x = sample(
        ema_model,
        noise,
        labels,
        sampler=DEFAULT_SAMPLER,
        steps=cfg.sample_steps,
        guidance=cfg.sample_guidance,
        generators=gens,
    )
    save_grid(decoder(x).clamp(-1, 1), path, cols=classes)


def finite(model: torch.nn.Module) -> bool:
    """Whether every weight is finite (one device sync; called only when a state is about to be written)."""
    return bool(torch.stack([p.detach().float().abs().max() for p in model.parameters()]).isfinite().all())


def hardware(accelerator) -> str:
    if torch.cuda.is_available():
        return f"{accelerator.num_processes} x {torch.cuda.get_device_name(0)}"
    return f"{accelerator.num_processes} x CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    sys.exit(main())
