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
from pathlib import Path

import torch
from tqdm import tqdm

from mrdit import get_preset, save_model
from mrdit.build import build_model
from mrdit.checkpoint import CheckpointError
from mrdit.config import ConfigError, ModelConfig, changed_fields
from mrdit.data import ImageFolderDataset, LatentDataset, load_emoji
from mrdit.pipeline import InputError, LatentDecoder, PixelDecoder
from mrdit.sampling import sample
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
    save_state,
    step_batches,
    train_step,
)
from mrdit.visual import save_grid


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
    classes = min(mc.num_classes - 1, 16)
    labels = torch.arange(classes).repeat(2).to(device)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn((len(labels), mc.channels, mc.image_size, mc.image_size), generator=g).to(device)
    x = sample(ema_model, noise, labels, sampler="dpm++2m", steps=cfg.sample_steps, guidance=cfg.sample_guidance)
    save_grid(decoder(x).clamp(-1, 1), path, cols=classes)


def main(argv: list[str] | None = None) -> int:
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

    try:
        cfg = TrainConfig.from_dict(json.loads(args.config.read_text())).with_overrides(args.set)
    except (ConfigError, OSError, json.JSONDecodeError) as e:
        p.error(str(e))
    print("training config:", json.dumps(cfg.to_dict(), indent=2), flush=True)
    if args.dry_run:
        print("model preset:", get_preset(cfg.model).to_json())
        return 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    from accelerate import Accelerator  # imported late so --help and --dry-run stay fast

    # cpu=True without a GPU: under a multi-process launcher that gives DDP over gloo on the CPU.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    main_proc = accelerator.is_main_process
    run = args.run_dir
    saved_cfg = run / "train_config.json"
    if saved_cfg.is_file():
        old = json.loads(saved_cfg.read_text())
        new = json.loads(json.dumps(cfg.to_dict()))
        # Thread and worker counts change speed, not results; anything else must match to resume.
        changed = changed_fields(old, new, ignore=("threads", "num_workers"))
        if changed and not args.force:
            print(
                f"error: {run} was started with a different config (changed: {', '.join(changed)}); use --force to resume anyway",
                file=sys.stderr,
            )
            return 2

    try:
        dataset = load_dataset(cfg, preset_with_overrides(cfg))
    except (ValueError, OSError) as e:  # a missing or unfinished dataset: say which, without a traceback
        p.error(f"data: {e}")
    mc = resolve_model_config(cfg, dataset.class_names)
    if dataset.image_size != mc.image_size:
        p.error(f"data image size {dataset.image_size} != model image_size {mc.image_size}")
    if cfg.batch_size % accelerator.num_processes:
        p.error(f"batch_size {cfg.batch_size} is not divisible by {accelerator.num_processes} processes")
    init = None
    if cfg.init_from and not list_states(run):  # checked before the run folder is written
        try:
            init = initial_weights(cfg.init_from, mc)
        except CheckpointError as e:
            p.error(str(e))
    if main_proc:
        run.mkdir(parents=True, exist_ok=True)
        saved_cfg.write_text(json.dumps(cfg.to_dict(), indent=2))
        (run / "model_config.json").write_text(mc.to_json())
        with open(run / "command.txt", "a") as f:
            f.write(" ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) + "\n")
        print("model config:", mc.to_json(), flush=True)

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
    n_params = sum(p.numel() for p in model.parameters())
    if main_proc:
        print(
            f"parameters: {n_params:,}; dataset: {len(dataset)} images, {len(dataset.class_names)} classes; processes: {accelerator.num_processes}"
        )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.model.to(accelerator.device)
    train_model = compile_for_training(model, cfg.compile, cfg.activation_memory_budget)
    unwrapped = accelerator.unwrap_model(model)
    schedule = NoiseSchedule(mc.schedule)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def checkpoint(at: int) -> None:
        if main_proc:
            save_state(
                run,
                at,
                {
                    "step": at,
                    "elapsed": elapsed,
                    "model": unwrapped.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "train_config": json.dumps(cfg.to_dict()),
                    "model_config": mc.to_json(),
                },
                cfg.keep_states,
            )
        accelerator.wait_for_everyone()

    def diverged(what: str) -> int:
        """Stop without writing a state: the last good one stays the newest."""
        bar.close()
        print(
            f"error: {what}; stopping without saving (the last good state in {run / 'states'} is kept). "
            "Lower lr or set grad_clip.",
            file=sys.stderr,
        )
        return 3

    metrics_file = open(run / "metrics.jsonl", "a") if main_proc else None
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not main_proc, dynamic_ncols=True)
    batches = StepBatches(dataset, schedule, mc.null_label, cfg, accelerator.process_index, accelerator.num_processes)
    loader = step_batches(batches, step, cfg.steps, cfg.num_workers, pin_memory=accelerator.device.type == "cuda")
    decoder = grid_decoder(mc, accelerator.device) if main_proc and cfg.sample_every else None
    window_t, window_imgs, losses = time.perf_counter(), 0, []
    started = time.perf_counter()
    out_of_time = False
    while step < cfg.steps:
        t0 = time.perf_counter()
        xn, n, y, eps = next(loader)
        dev = accelerator.device
        if cfg.channels_last:
            xn = xn.contiguous(memory_format=torch.channels_last)
        m = train_step(
            train_model,
            optimizer,
            accelerator,
            xn.to(dev, non_blocking=True),
            n.to(dev, non_blocking=True),
            y.to(dev, non_blocking=True),
            eps.to(dev, non_blocking=True),
            mc.loss_weights,
            lr_at(step, cfg),
            cfg.grad_clip,
        )
        ema.update(unwrapped, step)
        step += 1
        elapsed += time.perf_counter() - t0
        losses.append(m["loss"])
        window_imgs += cfg.batch_size
        bar.update(1)
        if args.max_minutes and step % cfg.log_every == 0:
            # Every process must stop at the same step: rank 0's clock decides.
            late = torch.tensor(float(time.perf_counter() - started > args.max_minutes * 60), device=accelerator.device)
            if accelerator.num_processes > 1:
                late = accelerator.reduce(late, reduction="max")
            out_of_time = bool(late)
        if step % cfg.log_every == 0 or step == cfg.steps or out_of_time:
            now = time.perf_counter()
            rate = window_imgs / max(now - window_t, 1e-9)
            loss = float(torch.stack(losses).mean())  # waits for the device, once per log interval
            if not math.isfinite(loss):
                return diverged(f"the loss is not finite ({loss}) near step {step}")
            rec = {
                "step": step,
                "loss": loss,
                "lr": lr_at(step - 1, cfg),
                "img_per_s": rate,
                "elapsed_s": elapsed,
            }
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rate:.0f}")
            if metrics_file:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            window_t, window_imgs, losses = now, 0, []
        if decoder is not None and (step % cfg.sample_every == 0 or step == cfg.steps):
            sample_grid(ema.model, cfg, mc, run / "samples" / f"step-{step:08d}.png", accelerator.device, decoder)
        if main_proc and args.export_every and step % args.export_every == 0:
            save_model(ema.model, run / f"ema-{step:08d}", dtype=torch.float16)
        scheduled = step % cfg.save_every == 0 or step == cfg.steps or out_of_time
        if (scheduled or stop["signal"] is not None) and not finite(unwrapped):
            return diverged(f"the weights are not finite at step {step}")
        if scheduled:
            checkpoint(step)
        if stop["signal"] is not None and not scheduled:
            checkpoint(step)
        if out_of_time or stop["signal"] is not None:
            break
    bar.close()
    stopped_early = step < cfg.steps  # a limit or signal reached on the last step still finishes the run
    if main_proc:
        # The inference export of the EMA weights, ready for train/export.py or mrdit.load_model.
        save_model(ema.model, run / "ema")
        info = {"step": step, "elapsed_s": elapsed, "hardware": hardware(accelerator)}
        if stopped_early and stop["signal"] is not None:
            print(
                f"stopped by signal {stop['signal']} at step {step}; state saved and EMA model in {run / 'ema'}, "
                "run the same command to resume",
                flush=True,
            )
        elif stopped_early:
            (run / "PAUSED").write_text(json.dumps(info))
            print(
                f"time limit: stopped at step {step} of {cfg.steps} after {elapsed / 60:.1f} min; state saved and "
                f"EMA model in {run / 'ema'}; run the same command to continue",
                flush=True,
            )
        else:
            (run / "PAUSED").unlink(missing_ok=True)
            (run / "DONE").write_text(json.dumps(info))
            print(f"done: {step} steps in {elapsed / 60:.1f} min; EMA model in {run / 'ema'}", flush=True)
    accelerator.wait_for_everyone()
    return 0


def finite(model: torch.nn.Module) -> bool:
    """Whether every weight is finite (one device sync; called only when a state is about to be written)."""
    return bool(torch.stack([p.detach().float().abs().max() for p in model.parameters()]).isfinite().all())


def hardware(accelerator) -> str:
    if torch.cuda.is_available():
        return f"{accelerator.num_processes} x {torch.cuda.get_device_name(0)}"
    return f"{accelerator.num_processes} x CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    sys.exit(main())
