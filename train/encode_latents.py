"""Encode an image folder into Stable Diffusion VAE latents for latent-space training, as the release
stores them: the posterior (mean, log-variance) of every centre-cropped image and of its horizontal
flip. Training then draws a fresh latent from that posterior each step and scales it.

    python train/encode_latents.py IMAGES --out data/imagenet256_latents --size 256
    accelerate launch --num_processes 8 train/encode_latents.py IMAGES --out data/imagenet256_latents

IMAGES is `root/<class name>/*.jpg|png...`. OUT is a folder of fixed-size shards written as encoding
goes (`shard-000000.safetensors`, ... each written atomically) and `index.json`, written once all are
done (see mrdit/shards.py). Started again after a kill, the same command skips the finished shards.
Under accelerate each process encodes its own shards (shard k on process k mod N); images are decoded
in data-loader workers. An OUT ending in `.safetensors` writes one in-memory file instead (small sets).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mrdit.checkpoint import atomic_save_safetensors, atomic_write
from mrdit.config import changed_fields
from mrdit.data import ImageFolderDataset
from mrdit.shards import read_header, shard_name, shard_rows, write_index, write_shard

PLAN_NAME = "encode.json"  # the settings a shard folder was started with; a resume must match them


def load_vae(vae_id: str, device: str | torch.device):
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise SystemExit("error: encoding needs the optional dependency diffusers (pip install diffusers)") from None
    return AutoencoderKL.from_pretrained(vae_id).to(device).eval()


@torch.no_grad()
def posteriors(vae, x: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior of each image and of its horizontal flip: mean and logvar, each (B, 2, C, h, w)."""
    B = x.shape[0]
    both = torch.cat([x, x.flip(-1)]).to(device)  # (2B, 3, S, S): the images, then their flips
    dist = vae.encode(both).latent_dist
    m, lv = dist.mean.float().cpu(), dist.logvar.float().cpu()  # (2B, C, h, w)
    return torch.stack([m[:B], m[B:]], 1), torch.stack([lv[:B], lv[B:]], 1)


def encode_range(vae, data: ImageFolderDataset, first: int, stop: int, args, device, bar) -> dict[str, torch.Tensor]:
    """Images first..stop-1 encoded in batches, decoded by `args.workers` data-loader processes."""
    subset = torch.utils.data.Subset(data, range(first, stop))
    loader = torch.utils.data.DataLoader(subset, batch_size=args.batch, num_workers=args.workers)
    means, logvars, labels = [], [], []
    for x, y in loader:  # (B, 3, S, S) in [-1, 1], centre-cropped; (B,)
        m, lv = posteriors(vae, x, device)
        means.append(m)
        logvars.append(lv)
        labels.append(y.long())
        bar.update(len(y))
    return {"mean": torch.cat(means), "logvar": torch.cat(logvars), "labels": torch.cat(labels)}


def plan_of(data: ImageFolderDataset, args) -> dict:
    """What the shards are made of: a resume with other images or settings would mix two datasets."""
    listing = "".join(f"{f.relative_to(data.root).as_posix()}\t{c}\n" for f, c in data.files)
    return {
        "size": args.size,
        "vae": args.vae,
        "shard_size": args.shard_size,
        "count": len(data),
        "class_names": data.class_names,
        "files_sha256": hashlib.sha256(listing.encode()).hexdigest(),
    }


def encode_shards(data: ImageFolderDataset, args, state) -> int:
    out: Path = args.out
    plan = plan_of(data, args)
    saved = out / PLAN_NAME
    if saved.is_file():
        changed = changed_fields(json.loads(saved.read_text()), plan)
        if changed:
            print(
                f"error: {out} was started with other settings or images (changed: {', '.join(changed)})",
                file=sys.stderr,
            )
            return 2
    state.wait_for_everyone()  # every process has read the old plan before the main one writes
    if state.is_main_process:
        atomic_write(saved, lambda f: f.write(json.dumps(plan, indent=2).encode()))
    n_shards = math.ceil(len(data) / args.shard_size)
    bounds = [(k * args.shard_size, min((k + 1) * args.shard_size, len(data))) for k in range(n_shards)]
    mine = range(state.process_index, n_shards, state.num_processes)
    todo = [k for k in mine if shard_rows(out / shard_name(k)) != bounds[k][1] - bounds[k][0]]
    print(
        f"process {state.process_index}: {len(mine)} of {n_shards} shards, {len(mine) - len(todo)} already done, "
        f"{len(todo)} to encode",
        flush=True,
    )
    device = args.device or state.device
    vae = load_vae(args.vae, device) if todo else None
    images = sum(bounds[k][1] - bounds[k][0] for k in todo)
    bar = tqdm(total=images, desc="encoding", unit="img", disable=not state.is_main_process, dynamic_ncols=True)
    for k in todo:
        write_shard(out, k, encode_range(vae, data, *bounds[k], args, device, bar))
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        counts = [shard_rows(out / shard_name(k)) for k in range(n_shards)]
        missing = [shard_name(k) for k, (c, (a, b)) in enumerate(zip(counts, bounds, strict=True)) if c != b - a]
        if missing:
            print(f"error: shards missing or incomplete: {', '.join(missing[:10])}", file=sys.stderr)
            return 3
        latent_shape = read_header(out / shard_name(0))[0]["mean"]["shape"][2:]  # (C, h, w)
        write_index(
            out,
            {k: plan[k] for k in ("size", "vae", "shard_size", "class_names")} | {"latent_shape": latent_shape},
            counts,
        )
        print(f"wrote {out}: {len(data)} images in {n_shards} shards, {len(data.class_names)} classes", flush=True)
    state.wait_for_everyone()
    return 0


def encode_file(data: ImageFolderDataset, args) -> int:
    """Everything into one file (small sets; the in-memory `LatentDataset` reads it)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae(args.vae, device)
    with tqdm(total=len(data), desc="encoding", unit="img", dynamic_ncols=True) as bar:
        tensors = encode_range(vae, data, 0, len(data), args, device, bar)
    atomic_save_safetensors(tensors, args.out)
    meta = {"class_names": data.class_names, "size": args.size, "vae": args.vae, "count": len(data)}
    atomic_write(args.out.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
    print(f"wrote {args.out}: {len(data)} images, {len(data.class_names)} classes")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("images", type=Path, help="image folder: root/<class>/*")
    p.add_argument("--out", type=Path, required=True, help="output folder of shards (or a .safetensors file)")
    p.add_argument("--size", type=int, default=256, help="centre-crop size in pixels (default 256)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="AutoencoderKL Hub id or local folder")
    p.add_argument("--batch", type=int, default=32, help="images per encoder call")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard (default 4096)")
    p.add_argument("--workers", type=int, default=4, help="data-loader processes decoding images (0 = none)")
    p.add_argument("--device", default=None, help="default: this process's accelerator device, else cpu")
    args = p.parse_args(argv)
    for name in ("size", "batch", "shard_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    print("config:", json.dumps({k: str(v) for k, v in vars(args).items()}), flush=True)
    try:
        data = ImageFolderDataset(args.images, args.size)
    except (OSError, ValueError) as e:
        p.error(f"images: {e}")
    if args.out.suffix == ".safetensors":
        return encode_file(data, args)
    from accelerate import PartialState  # imported late so --help stays fast

    return encode_shards(data, args, PartialState(cpu=not torch.cuda.is_available()))


if __name__ == "__main__":
    sys.exit(main())
