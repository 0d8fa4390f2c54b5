"""Generate images from the command line, optionally with the trajectory as a GIF.

    python -m mrdit.generate --model weights/mrdit-emoji-32 --class face --seed 0 --steps 25 \
        --guidance 2 --sampler dpm++2m --out grid.png --gif trajectory.gif
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CheckpointError
from .guidance import GUIDANCE_SCHEDULES
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, InputError, Pipeline, settings_dict
from .sampling import SAMPLERS, SamplerSettings
from .visual import grid, save_gif, trajectory_frame, upscale_nearest


def check_device(name: str) -> torch.device:
    """The device `name`, or an InputError if this machine cannot run on it (instead of torch's trace)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device torch knows (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    return device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mrdit.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory or Hugging Face Hub repo id")
    p.add_argument("--class", dest="label", required=True, help="class name or id")
    p.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i (default 0)")
    p.add_argument("--num-images", type=int, default=4, help="images to generate (default 4)")
    p.add_argument("--steps", type=int, default=25, help="solver steps (default 25)")
    p.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"w in eps_u + w (eps_c - eps_u); 1 = none (default {DEFAULT_GUIDANCE})",
    )
    p.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default="constant")
    p.add_argument("--guidance-power", type=float, default=1.0)
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help=f"(default {DEFAULT_SAMPLER})")
    p.add_argument(
        "--eta",
        type=float,
        help="fresh noise of dpm++2m-sde (default 1; 0 is dpm++2m), ddim (default 0) and ddpm (default 1)",
    )
    p.add_argument("--out", type=Path, required=True, help="PNG grid of the final images")
    p.add_argument("--gif", type=Path, help="also write the trajectory (x_t and each branch's estimate) as a GIF")
    p.add_argument(
        "--display", type=int, default=96, help="panel size in the GIF and grid (nearest-neighbour, default 96)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ... (default cpu)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the network before sampling (torch.compile; on a GPU, graphs of the compiled network): "
        "a one-off wait (about a minute per batch shape for a large model), then faster steps",
    )
    args = p.parse_args(argv)
    names = ("sampler", "steps", "guidance", "guidance_schedule", "guidance_power", "eta")
    sampler = {name: getattr(args, name) for name in names}  # the flags of SamplerSettings
    try:  # what can be checked before the model loads
        SamplerSettings(**sampler)
        device = check_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.num_images < 1:
        p.error("--num-images must be >= 1")
    try:
        pipe = Pipeline.from_pretrained(args.model, device=device, compile=args.compile)
        settings = pipe.validate(args.label, [args.seed + i for i in range(args.num_images)], **sampler)
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("settings:", json.dumps(settings_dict(settings)))
    frames = []
    state = None
    with tqdm(desc="sampling", unit="step") as bar:
        for state, pv in pipe.stream(settings, previews=args.gif is not None):
            bar.total = state.total
            bar.update(1)
            if pv is not None:
                frames.append(trajectory_frame(pv.x_t, pv.branches, args.display))
    assert state is not None
    images = pipe.to_images(state.x)
    import numpy as np
    from PIL import Image

    size = max(args.display, pipe.config.image_size)
    tiles = [upscale_nearest(np.asarray(im), size) for im in images]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(tiles, cols=min(len(tiles), 8))).save(args.out)
    print(f"wrote {args.out}")
    if args.gif:
        save_gif(frames, args.gif)
        print(f"wrote {args.gif} ({len(frames)} frames: x_t, then branches coarse to fine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
