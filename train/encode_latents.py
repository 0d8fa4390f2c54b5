"""Encode an image folder into Stable Diffusion VAE latents for latent-space training, as the release
stores them: the posterior (mean, log-variance) of every centre-cropped image and of its horizontal
flip. Training then draws a fresh latent from that posterior each step and scales it.

    python train/encode_latents.py IMAGES --out data/imagenet256_latents.safetensors --size 256

IMAGES is `root/<class name>/*.jpg|png...`. Writes OUT and OUT with `.json` (class names, settings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from mrdit.data import ImageFolderDataset


def encode(images: Path, out: Path, size: int, vae_id: str, batch: int, device: str) -> dict:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise SystemExit("error: encoding needs the optional dependency diffusers (pip install diffusers)") from None
    data = ImageFolderDataset(images, size)
    vae = AutoencoderKL.from_pretrained(vae_id).to(device).eval()
    means, logvars = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(data), batch), desc="encoding", unit="batch"):
            idx = torch.arange(i, min(i + batch, len(data)))
            x, _ = data.batch(idx)  # (B, 3, S, S) in [-1, 1], centre-cropped
            both = torch.cat([x, x.flip(-1)]).to(device)  # the image and its horizontal flip
            dist = vae.encode(both).latent_dist
            m, lv = dist.mean.float().cpu(), dist.logvar.float().cpu()  # (2B, C, h, w)
            B = len(idx)
            means.append(torch.stack([m[:B], m[B:]], 1))  # (B, 2, C, h, w)
            logvars.append(torch.stack([lv[:B], lv[B:]], 1))
    labels = torch.tensor([lbl for _, lbl in data.files])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mean": torch.cat(means), "logvar": torch.cat(logvars), "labels": labels}, str(out))
    meta = {"class_names": data.class_names, "size": size, "vae": vae_id, "count": len(data)}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("images", type=Path, help="image folder: root/<class>/*")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors")
    p.add_argument("--size", type=int, default=256, help="centre-crop size in pixels (default 256)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="AutoencoderKL Hub id or local folder")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    print("config:", json.dumps({k: str(v) for k, v in vars(args).items()}))
    meta = encode(args.images, args.out, args.size, args.vae, args.batch, args.device)
    print(f"wrote {args.out}: {meta['count']} images, {len(meta['class_names'])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
