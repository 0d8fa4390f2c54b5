"""Visualisation helpers: tensors to images, grids, panels at one display size, signed heat maps, GIFs."""

from __future__ import annotations

import functools
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


def trajectory_frame(x_t: torch.Tensor, branches: Sequence[torch.Tensor], display: int = 96) -> np.ndarray:
    """A frame of a trajectory animation: one row per image (x_t (B, 3, H, W), branches K x (B, 3, h, w)),
    x_t then each branch's estimate, coarse to fine."""
    return panel_sheet(x_t, branches, display, additions=False)


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


def with_headers(sheet: np.ndarray, headers: Sequence[str], width: int, pad: int = 4) -> np.ndarray:
    """Column titles above a sheet of equal columns `width` px wide with `pad` px gaps."""
    head = header_strip(tuple(headers), width, sheet.shape[1], pad)
    return np.concatenate([head, sheet], axis=0)


@functools.lru_cache(maxsize=64)
def header_strip(headers: tuple[str, ...], width: int, total_width: int, pad: int = 4) -> np.ndarray:
    """The white strip of column titles drawn by `with_headers` (cached: a streamed run redraws its
    panels every frame under the same titles)."""
    from PIL import ImageDraw, ImageFont

    canvas = Image.new("RGB", (total_width, 22), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13 if width >= 110 else 11)
    for c, text in enumerate(headers):
        x0 = pad + c * (width + pad)
        while font.getlength(text) > width and len(text) > 4:
            text = text.rstrip("…")[:-1] + "…"
        draw.text((x0 + (width - font.getlength(text)) / 2, 4), text, fill=(30, 30, 30), font=font)
    strip = np.asarray(canvas)
    strip.flags.writeable = False
    return strip


def panel_sheet(
    x_t: torch.Tensor,
    branches: Sequence[torch.Tensor],
    display: int,
    headers: Sequence[str] | None = None,
    additions: bool = True,
) -> np.ndarray:
    """All panels of a step for a batch, one row per image: x_t, each branch's estimate (coarse to fine),
    then (with `additions`) what each finer branch added (signed heat map of finer minus enlarged coarser,
    full colour at 1), all at one display size with nearest-neighbour upscaling. Optional column headers."""
    tiles = []
    for i in range(x_t.shape[0]):
        tiles.append(upscale_nearest(to_uint8(x_t[i]), display))
        tiles.extend(upscale_nearest(to_uint8(b[i]), display) for b in branches)
        for k in range(1, len(branches) if additions else 1):
            add = branch_addition(branches[k][i : i + 1].float(), branches[k - 1][i : i + 1].float())[0]
            tiles.append(upscale_nearest(signed_heatmap(add, scale=1.0), display))
    cols = 1 + len(branches) + (max(len(branches) - 1, 0) if additions else 0)
    sheet = grid(tiles, cols=cols, pad=4)
    return with_headers(sheet, list(headers)[:cols], display) if headers else sheet


def labelled_rows(rows: Sequence[tuple[str, np.ndarray]], display: int) -> np.ndarray:
    """Groups of images, one row each, titled: [(title, (B, H, W, 3) uint8), ...] at `display` px."""
    from PIL import ImageDraw, ImageFont

    cols = max(len(ims) for _, ims in rows)
    font = ImageFont.load_default(size=14)
    blocks = []
    for title, ims in rows:
        tiles = [upscale_nearest(im, display) for im in ims]
        tiles += [np.full_like(tiles[0], 255)] * (cols - len(tiles))
        body = grid(tiles, cols=cols, pad=4)
        head = Image.new("RGB", (body.shape[1], 22), (255, 255, 255))
        ImageDraw.Draw(head).text((6, 4), title, fill=(30, 30, 30), font=font)
        blocks += [np.asarray(head), body]
    return np.concatenate(blocks, axis=0)


def heat_overlay(img: np.ndarray, att: np.ndarray) -> np.ndarray:
    """A (g, g) map in [0, 1] over an (H, W, 3) uint8 image (H a multiple of g): white-to-red, the image faint."""
    f = img.shape[0] // att.shape[0]
    a = np.repeat(np.repeat(att, f, axis=0), f, axis=1)[..., None]  # (H, W, 1)
    red = np.array([220.0, 30.0, 30.0])
    base = 0.35 * img.astype(np.float64) + 0.65 * 255
    return (base * (1 - a) + red * a).round().clip(0, 255).astype(np.uint8)


def attention_sheet(x_t: torch.Tensor, estimate: torch.Tensor, maps: torch.Tensor, display: int) -> np.ndarray:
    """Per image: x_t, the map over x_t, the map over the estimate, and the map alone, each scaled to its
    own maximum (maps: (B, g, g); x_t (B, 3, H, W) and estimate (B, 3, h, w) in [-1, 1])."""
    size = display - display % maps.shape[-1] or maps.shape[-1]
    tiles = []
    for i in range(maps.shape[0]):
        m = maps[i].detach().float().cpu()
        m = (m / m.max().clamp_min(1e-12)).numpy()
        xt = upscale_nearest(to_uint8(x_t[i]), size)
        est = upscale_nearest(to_uint8(estimate[i]), size)
        blank = np.full_like(xt, 255)
        tiles += [xt, heat_overlay(xt, m), heat_overlay(est, m), heat_overlay(blank, m)]
    sheet = grid(tiles, cols=4, pad=4)
    return with_headers(sheet, ["x_t", "attention over x_t", "over the estimate", "attention"], size)


def side_by_side(groups: Sequence[tuple[str, torch.Tensor, Sequence[torch.Tensor]]], display: int) -> np.ndarray:
    """Models next to each other, one row per image: for each (name, x_t, branches), x_t then every
    branch's estimate, coarse to fine, with titled columns."""
    tiles, headers = [], []
    for name, _, branches in groups:
        headers += [f"{name}: x_t"] + [f"{name}: {b.shape[-1]}x{b.shape[-1]}" for b in branches]
    for i in range(groups[0][1].shape[0]):
        for _, x_t, branches in groups:
            tiles.append(upscale_nearest(to_uint8(x_t[i]), display))
            tiles.extend(upscale_nearest(to_uint8(b[i]), display) for b in branches)
    return with_headers(grid(tiles, cols=len(headers), pad=4), headers, display)


def save_mp4(frames: Sequence[np.ndarray], path: str | Path, fps: float = 8.0, hold_last: int = 8) -> Path:
    """H.264 MP4 (yuv420p, playable in browsers) of (H, W, 3) uint8 frames, padded white to even sizes."""
    if not frames:
        raise ValueError("no frames")
    try:
        import imageio.v3 as iio
    except ImportError as e:  # pragma: no cover - imageio is a runtime requirement of the app
        raise RuntimeError("MP4 export needs imageio and imageio-ffmpeg") from e
    h, w = frames[0].shape[:2]
    H, W = h + h % 2, w + w % 2
    padded = []
    for f in list(frames) + [frames[-1]] * (hold_last - 1):
        canvas = np.full((H, W, 3), 255, dtype=np.uint8)
        canvas[:h, :w] = f
        padded.append(canvas)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    iio.imwrite(tmp, np.stack(padded), extension=".mp4", fps=fps, codec="libx264", macro_block_size=1, pixelformat="yuv420p")
    tmp.replace(path)
    return path
