"""Training data: in-memory tensor datasets (the prepared emoji shards, encoded latents) and a plain
image folder. Every dataset answers `batch(indices, flips)` with model-ready float tensors, so the
training loop can fetch by index from a deterministic order (and resume mid-epoch exactly).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from .rng import randn_rows

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class TensorImageDataset:
    """uint8 NHWC images in memory, scaled to [-1, 1]. `flip_ok[label]` says whether flips suit a class."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], flip_ok: list[bool] | None = None
    ) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.class_names = class_names
        self.flip_ok = torch.tensor(flip_ok if flip_ok is not None else [True] * len(class_names))

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[1]

    def batch(
        self, indices: torch.Tensor, flips: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[indices].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        y = self.labels[indices]
        if flips is not None:
            flip = flips & self.flip_ok[y]
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y


def load_emoji(folder: str | Path, split: str, size: int) -> TensorImageDataset:
    """A split of the prepared emoji set (see train/prepare_emoji.py)."""
    folder = Path(folder)
    meta = json.loads((folder / "classes.json").read_text())
    shard = load_file(str(folder / f"{split}.safetensors"))
    key = f"images_{size}"
    if key not in shard:
        raise ValueError(f"{folder}/{split}.safetensors has no {size}px images (sizes: {meta.get('sizes')})")
    return TensorImageDataset(
        shard[key], shard["labels"], [c["name"] for c in meta["classes"]], [c["flip"] for c in meta["classes"]]
    )


class ImageFolderDataset:
    """`root/<class name>/*.png|jpg...`: classes sorted by folder name; images centre-cropped and resized."""

    def __init__(self, root: str | Path, size: int) -> None:
        self.root = Path(root)
        self.size = size
        self.class_names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.class_names:
            raise ValueError(f"{self.root}: no class folders")
        self.files: list[tuple[Path, int]] = [
            (f, i)
            for i, c in enumerate(self.class_names)
            for f in sorted((self.root / c).rglob("*"))
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.files:
            raise ValueError(f"{self.root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.labels = torch.tensor([c for _, c in self.files])  # (N,)
        self.flip_ok = torch.ones(len(self.class_names), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_size(self) -> int:
        return self.size

    def load(self, i: int) -> torch.Tensor:
        return center_crop_tensor(Image.open(self.files[i][0]), self.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Image i (3, S, S) and its label, for a torch DataLoader that decodes in worker processes."""
        return self.load(i), self.files[i][1]

    def batch(
        self, indices: torch.Tensor, flips: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([self.load(int(i)) for i in indices])  # (B, 3, S, S)
        y = torch.tensor([self.files[int(i)][1] for i in indices])
        if flips is not None:
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        return x, y


def center_crop_tensor(im: Image.Image, size: int) -> torch.Tensor:
    """Centre crop to a square, resize to `size`, return (3, size, size) in [-1, 1]."""
    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class PosteriorDataset:
    """Latent posteriors, the release's way of storing data: `batch` draws a fresh latent from the
    posterior of each image (or of its flip) and scales it. Subclasses say where the posteriors are
    (`posteriors`) and hold `labels`, `class_names` and `scale_factor`."""

    labels: torch.Tensor
    scale_factor: float

    def posteriors(self, indices: torch.Tensor, which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and logvar (B, C, h, w) of examples `indices`, posterior `which` (0 image, 1 flip)."""
        raise NotImplementedError

    def batch(
        self,
        indices: torch.Tensor,
        flips: torch.Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        which = flips.long() if flips is not None else torch.zeros(len(indices), dtype=torch.long)
        mean, logvar = self.posteriors(indices, which)  # (B, C, h, w) each
        return posterior_sample(mean, logvar, self.scale_factor, generator), self.labels[indices]


class LatentDataset(PosteriorDataset):
    """Encoded latents in one file, held in memory: the posterior (mean, logvar) of every image and of
    its horizontal flip (train/encode_latents.py with an OUT ending in .safetensors)."""

    def __init__(self, path: str | Path, scale_factor: float) -> None:
        d = load_file(str(path))
        self.mean, self.logvar, self.labels = d["mean"], d["logvar"], d["labels"].long()  # (N, 2, C, h, w) x2, (N,)
        meta = json.loads(Path(path).with_suffix(".json").read_text())
        self.class_names = meta["class_names"]
        self.scale_factor = scale_factor
        self.flip_ok = torch.ones(len(self.class_names), dtype=torch.bool)

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def image_size(self) -> int:
        return self.mean.shape[-1]

    def posteriors(self, indices: torch.Tensor, which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean[indices, which], self.logvar[indices, which]


def posterior_sample(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    scale_factor: float,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """A scaled draw z = s (mean + exp(logvar / 2) e) from each (B, C, h, w) posterior; the noise e
    comes from one generator, or row i from `generator[i]` (per-example streams, `mrdit.rng`)."""
    if generator is None or isinstance(generator, torch.Generator):
        e = torch.randn(mean.shape, generator=generator)
    else:
        e = randn_rows(tuple(mean.shape[1:]), generator)
    return (mean + (0.5 * logvar).exp() * e) * scale_factor
