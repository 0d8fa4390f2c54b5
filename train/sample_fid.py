"""Draw N class-balanced samples for FID-50K and the other ImageNet metrics, on one or many processes,
and write them as the ADM evaluation suite's `.npz` (`arr_0`: uint8 (N, H, W, 3); `arr_1`: labels).

    python train/sample_fid.py MODEL --out samples/dimr-xl-2r-50k.npz
    accelerate launch --num_processes 8 train/sample_fid.py MODEL --out samples/dimr-xl-2r-50k.npz

Image i has class i mod C (C classes, so 50,000 images of ImageNet's 1,000 are 50 per class) and seed
SEED + i: the set depends on neither the process count nor the order of work. Images are drawn in
fixed chunks of `--chunk` images (chunk c on process c mod P); each finished chunk is written to
OUT.parts/ atomically, so after a kill the same command draws only the missing chunks. The main process
then streams the chunks, in order, into OUT. `--preset release` is the release's evaluation setting
(250-step `dpm-fast`, constant guidance w = 1.4, i.e. its "0.4"); any flag overrides it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mrdit.checkpoint import CheckpointError, atomic_write
from mrdit.config import changed_fields
from mrdit.guidance import GUIDANCE_SCHEDULES
from mrdit.pipeline import InputError, Pipeline, Settings
from mrdit.visual import to_uint8

PRESETS = {
    # The release's sampler and guidance (DIMR_SPEC.md, section 5).
    "release": {
        "sampler": "dpm-fast",
        "steps": 250,
        "guidance": 1.4,
        "guidance_schedule": "constant",
        "guidance_power": 1.0,
    },
    # A quick look at the same guidance with a tenth of the evaluations.
    "quick": {
        "sampler": "dpm++2m",
        "steps": 25,
        "guidance": 1.4,
        "guidance_schedule": "constant",
        "guidance_power": 1.0,
    },
}
PLAN_NAME = "plan.json"


@dataclass(frozen=True)
class Plan:
    """Which images make up the set: image i has class i mod `classes` and seed `seed` + i."""

    num: int
    classes: int
    seed: int
    chunk: int

    @property
    def chunks(self) -> int:
        return math.ceil(self.num / self.chunk)

    def images(self, c: int) -> range:
        return range(c * self.chunk, min((c + 1) * self.chunk, self.num))

    def labels(self, c: int) -> list[int]:
        return [i % self.classes for i in self.images(c)]

    def seeds(self, c: int) -> list[int]:
        return [self.seed + i for i in self.images(c)]


def part_path(parts: Path, c: int) -> Path:
    return parts / f"part-{c:06d}.npz"


def part_done(path: Path, count: int) -> bool:
    try:
        with np.load(path) as z:
            return z["arr_0"].shape[0] == count and z["arr_1"].shape == (count,)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False


def draw_chunk(pipe: Pipeline, settings: Settings, plan: Plan, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk c's images (uint8 (n, H, W, 3)) and labels, one seed per image."""
    chunk = dataclasses.replace(settings, labels=tuple(plan.labels(c)), seeds=tuple(plan.seeds(c)))
    state = None
    for state, _ in pipe.stream(chunk, previews=False):  # noqa: B007 - the last state is the sample
        pass
    assert state is not None
    return to_uint8(pipe.decoder(state.x).clamp(-1, 1)), np.asarray(chunk.labels, dtype=np.int64)


def write_npz(out: Path, parts: list[Path], image_shape: tuple[int, ...], num: int) -> None:
    """The ADM suite's `.npz` (uncompressed, as `np.savez` writes it), streamed chunk by chunk so that
    memory stays at one chunk even for 50,000 images at 512 px."""

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("arr_0.npy", "w", force_zip64=True) as e:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
                np.lib.format.write_array_header_1_0(e, header | {"shape": (num, *image_shape)})
                labels = []
                for p in parts:
                    with np.load(p) as part:
                        e.write(np.ascontiguousarray(part["arr_0"]).tobytes())
                        labels.append(part["arr_1"])
            with z.open("arr_1.npy", "w") as e:
                np.lib.format.write_array(e, np.concatenate(labels))

    atomic_write(out, write)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="model directory or Hub repo id")
    p.add_argument("--out", type=Path, required=True, help="output .npz")
    p.add_argument("--num", type=int, default=50_000, help="number of images (default 50000)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="release", help="sampling settings (default release)")
    p.add_argument("--sampler", help="override the preset's sampler")
    p.add_argument("--steps", type=int, help="override the preset's steps")
    p.add_argument("--guidance", type=float, help="override the preset's guidance w")
    p.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, help="override the preset's schedule")
    p.add_argument("--guidance-power", type=float, help="override the preset's power (power-cosine)")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed SEED + i (default 0)")
    p.add_argument("--chunk", type=int, default=64, help="images per chunk: one sampler batch, one part file")
    p.add_argument(
        "--precision", choices=["bf16", "fp32"], default="bf16", help="network precision on a GPU (CPU: fp32)"
    )
    args = p.parse_args(argv)
    if args.out.suffix != ".npz":
        p.error("--out must end in .npz")
    for name in ("num", "chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return p, args


def record_plan(parts: Path, record: dict, state) -> bool:
    """Write the set's settings beside its parts; False if parts of a set with other settings are there."""
    saved = parts / PLAN_NAME
    if saved.is_file():
        changed = changed_fields(json.loads(saved.read_text()), record)
        if changed:
            print(
                f"error: {parts} holds a set drawn with other settings (changed: {', '.join(changed)})", file=sys.stderr
            )
            return False
    state.wait_for_everyone()  # every process has read the old plan before the main one writes
    if state.is_main_process:
        atomic_write(saved, lambda f: f.write(json.dumps(record, indent=2).encode()))
    return True


def draw_my_chunks(pipe: Pipeline, settings, plan: Plan, parts: Path, state) -> None:
    """This process's chunks that are not on disk yet, each written atomically as it is drawn."""
    mine = range(state.process_index, plan.chunks, state.num_processes)
    todo = [k for k in mine if not part_done(part_path(parts, k), len(plan.images(k)))]
    print(f"process {state.process_index}: {len(mine)} of {plan.chunks} chunks, {len(todo)} to draw", flush=True)
    bar = tqdm(
        total=sum(len(plan.images(k)) for k in todo), desc="sampling", unit="img", disable=not state.is_main_process
    )
    for k in todo:
        images, labels = draw_chunk(pipe, settings, plan, k)
        atomic_write(part_path(parts, k), lambda f, a=images, y=labels: np.savez(f, arr_0=a, arr_1=y))
        bar.update(len(labels))
    bar.close()


def gather(out: Path, parts: Path, plan: Plan) -> bool:
    """Stream every chunk into the ADM suite's .npz; False if a chunk is missing."""
    files = [part_path(parts, k) for k in range(plan.chunks)]
    missing = [f.name for k, f in enumerate(files) if not part_done(f, len(plan.images(k)))]
    if missing:
        print(f"error: chunks missing: {', '.join(missing[:10])}", file=sys.stderr)
        return False
    with np.load(files[0]) as first:
        image_shape = first["arr_0"].shape[1:]
    write_npz(out, files, image_shape, plan.num)
    print(f"wrote {out}: {plan.num} images {image_shape}, {plan.classes} classes", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    sampling = PRESETS[args.preset] | {
        k: getattr(args, k) for k in PRESETS[args.preset] if getattr(args, k) is not None
    }

    from accelerate import PartialState  # imported late so --help stays fast

    state = PartialState(cpu=not torch.cuda.is_available())
    try:
        pipe = Pipeline.from_pretrained(args.model, device=state.device)
        if state.device.type == "cuda" and args.precision == "fp32":
            pipe = Pipeline(pipe.model, pipe.decoder, name=pipe.name, fast=False)
        settings = pipe.validate([0], [0], **sampling)
    except (CheckpointError, InputError, OSError) as e:
        p.error(str(e))
    c = pipe.config
    plan = Plan(num=args.num, classes=c.num_classes - 1, seed=args.seed, chunk=args.chunk)
    record = {"model": args.model, **plan.__dict__, **sampling, "precision": args.precision}
    if state.is_main_process:
        print("config:", json.dumps(record | {"out": str(args.out), "processes": state.num_processes}), flush=True)

    parts = args.out.with_name(args.out.name + ".parts")
    if not record_plan(parts, record, state):
        return 2
    draw_my_chunks(pipe, settings, plan, parts, state)
    state.wait_for_everyone()
    if state.is_main_process and not gather(args.out, parts, plan):
        return 3
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
