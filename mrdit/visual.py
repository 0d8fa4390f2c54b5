"""Visualisation helpers: tensors to images, grids, panels at one display size, signed heat maps, GIFs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) or (H, W, 3)."""
    x = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def upscale_nearest(img: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of (H, W, 3) uint8 to (size, size, 3), so every model pixel stays a block."""
    h, w = img.shape[:2]
    if size % h == 0 and size % w == 0:
        return np.repeat(np.repeat(img, size // h, axis=0), size // w, axis=1)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.NEAREST))


def signed_heatmap(diff: torch.Tensor, scale: float | None = None) -> np.ndarray:
    """(3, H, W) signed difference -> (H, W, 3) uint8: blue negative, white zero, red positive (channel mean)."""
    d = diff.detach().float().cpu().mean(0)  # (H, W)
    s = scale if scale is not None else max(float(d.abs().max()), 1e-6)
    v = (d / s).clamp(-1, 1).numpy()
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    r = 1 - neg
    g = 1 - pos - neg
    b = 1 - pos
    return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)


def branch_addition(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """What the finer branch added: its estimate minus the coarser one upsampled (nearest), (B, C, H, W)."""
    return fine - F.interpolate(coarse, size=fine.shape[-2:], mode="nearest")


def grid(images: Sequence[np.ndarray], cols: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile equally sized (H, W, 3) uint8 images into rows of `cols`."""
    if not images:
        raise ValueError("no images to tile")
    h, w, _ = images[0].shape
    rows = (len(images) + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), fill, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    return out


def save_grid(x: torch.Tensor, path: str | Path, cols: int, display: int | None = None) -> Path:
    """Save a batch (B, 3, H, W) in [-1, 1] as a PNG grid, optionally upscaled (nearest) to `display` px."""
    ims = list(to_uint8(x))
    if display:
        ims = [upscale_nearest(im, display) for im in ims]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(ims, cols)).save(path)
    return path


def save_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float = 8.0, hold_last: int = 8) -> Path:
    """Animated GIF of (H, W, 3) uint8 frames, holding the last frame a little longer."""
    if not frames:
        raise ValueError("no frames")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ims = [Image.fromarray(f) for f in frames]
    durations = [int(1000 / fps)] * len(ims)
    durations[-1] *= hold_last
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=durations, loop=0, optimize=False)
    return path


def panel_row(x_t: torch.Tensor, branches: Sequence[torch.Tensor], display: int) -> np.ndarray:
    """One image's panels side by side at one display size: x_t, then each branch coarse to fine."""
    ims = [upscale_nearest(to_uint8(x_t), display)] + [upscale_nearest(to_uint8(b), display) for b in branches]
    return grid(ims, cols=len(ims), pad=2)


def trajectory_frame(x_t: torch.Tensor, branches: Sequence[torch.Tensor], display: int = 96) -> np.ndarray:
    """A frame of a trajectory animation: one row of panels per image (x_t (B, 3, H, W), branches K x (B, 3, h, w))."""
    rows = [panel_row(x_t[i], [b[i] for b in branches], display) for i in range(x_t.shape[0])]
    return np.concatenate(rows, axis=0)


def branch_headers(config) -> list[str]:
    """Column titles for a model's panels: x_t, each branch (grid, kind), and what each finer branch added."""
    heads = ["x_t (noisy)"]
    if config.architecture == "unpatchify":
        return heads + [f"estimate {config.image_size}x{config.image_size}"]
    for k, b in enumerate(config.branches):
        heads.append(f"branch {k}: {b.grid}x{b.grid}")
    for k in range(1, len(config.branches)):
        heads.append(f"branch {k} added")
    return heads


def panel_sheet(
    x_t: torch.Tensor, branches: Sequence[torch.Tensor], display: int, headers: Sequence[str] | None = None
) -> np.ndarray:
    """All panels of a step for a batch, one row per image: x_t, each branch's estimate (coarse to fine),
    then what each finer branch added (signed heat map of finer minus upsampled coarser), all at one
    display size with nearest-neighbour upscaling. Optional column headers on top."""
    from PIL import ImageDraw, ImageFont

    B = x_t.shape[0]
    tiles = []
    for i in range(B):
        row = [upscale_nearest(to_uint8(x_t[i]), display)] + [
            upscale_nearest(to_uint8(b[i]), display) for b in branches
        ]
        for k in range(1, len(branches)):
            add = branch_addition(branches[k][i : i + 1].float(), branches[k - 1][i : i + 1].float())[0]
            row.append(upscale_nearest(signed_heatmap(add, scale=1.0), display))
        tiles.extend(row)
    cols = 1 + len(branches) + max(len(branches) - 1, 0)
    sheet = grid(tiles, cols=cols, pad=4)
    if not headers:
        return sheet
    head_h = 22
    canvas = Image.new("RGB", (sheet.shape[1], sheet.shape[0] + head_h), (255, 255, 255))
    canvas.paste(Image.fromarray(sheet), (0, head_h))
    draw = ImageDraw.Draw(canvas)
    size = 13 if display >= 110 else 11
    font = ImageFont.load_default(size=size)
    for c, text in enumerate(headers[:cols]):
        x0 = 4 + c * (display + 4)
        while font.getlength(text) > display and len(text) > 4:
            text = text[:-2] + "…" if not text.endswith("…") else text[:-2] + "…"
        draw.text((x0 + (display - font.getlength(text)) / 2, 4), text, fill=(30, 30, 30), font=font)
    return np.asarray(canvas)
