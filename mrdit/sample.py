"""Generate images from the command line, optionally with the trajectory as a GIF.

    python -m mrdit.sample --model weights/mrdit-emoji-32 --class face --seed 0 --steps 25 \
        --guidance 2 --sampler dpm++2m --out grid.png --gif trajectory.gif
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from .checkpoint import CheckpointError
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, InputError, Pipeline, settings_dict
from .sampling import SAMPLERS
from .visual import grid, save_gif, trajectory_frame, upscale_nearest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mrdit.sample", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--guidance-schedule", choices=["constant", "power-cosine"], default="constant")
    p.add_argument("--guidance-power", type=float, default=1.0)
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help=f"(default {DEFAULT_SAMPLER})")
    p.add_argument("--out", type=Path, required=True, help="PNG grid of the final images")
    p.add_argument("--gif", type=Path, help="also write the trajectory (x_t and each branch's estimate) as a GIF")
    p.add_argument(
        "--display", type=int, default=96, help="panel size in the GIF and grid (nearest-neighbour, default 96)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the network before sampling (torch.compile; on a GPU, graphs of the compiled network): "
        "a one-off wait (about a minute per batch shape for a large model), then faster steps",
    )
    args = p.parse_args(argv)
    try:
        pipe = Pipeline.from_pretrained(args.model, device=args.device, compile=args.compile)
        if args.num_images < 1:
            raise InputError("--num-images must be >= 1")
        settings = pipe.validate(
            args.label,
            [args.seed + i for i in range(args.num_images)],
            args.steps,
            args.guidance,
            args.sampler,
            args.guidance_schedule,
            args.guidance_power,
        )
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
