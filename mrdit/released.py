"""The authors' released ImageNet checkpoints, made ready to serve: download, convert, cache.

`prepare(release, cache)` downloads the release's `.pth` and the SD VAE from the Hugging Face Hub,
converts the checkpoint (`mrdit.convert`), copies the VAE beside it (`vae/`), fits the linear preview
(`preview.safetensors`) and only then renames the finished directory into place. A later call finds
the directory and does nothing; an interrupted one leaves only a `.NAME.partial-*` folder, which
is never taken for a model and is removed by the next `prepare`.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import CONFIG_NAME, atomic_write
from .config import ModelConfig
from .presets import get_preset

VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


@dataclass(frozen=True)
class Release:
    """One released checkpoint: where it is on the Hub and the config that describes it."""

    name: str  # the cache folder
    repo_id: str
    filename: str
    preset: str = ""  # our preset for it; or `config` for anything else
    config: Callable[[], ModelConfig] | None = None
    vae_repo: str = "stabilityai/sd-vae-ft-ema"
    vae_files: tuple[str, ...] = field(default=VAE_FILES)

    def model_config(self) -> ModelConfig:
        return self.config() if self.config is not None else get_preset(self.preset)


RELEASES: dict[str, Release] = {
    "DiMR-XL/2R (ImageNet 256, authors' release)": Release(
        "dimr-xl-2r", "QHL067/DiMR", "DiMR-XL_2R_800epochs.pth", preset="dimr-xl-2r"
    ),
    "DiMR-G/2R (ImageNet 256, authors' release)": Release(
        "dimr-g-2r", "QHL067/DiMR", "DiMR-G_2R_800epochs.pth", preset="dimr-g-2r"
    ),
}


def is_ready(directory: Path) -> bool:
    """A finished model directory (only finished ones are ever renamed to their final name)."""
    return (directory / CONFIG_NAME).is_file()


def _download(repo_id: str, filename: str) -> Path:
    import huggingface_hub  # looked up at call time, so that tests can stand in for the Hub

    return Path(huggingface_hub.hf_hub_download(repo_id, filename))


def _build(
    release: Release,
    staging: Path,
    class_names: Sequence[str] | None,
    synonyms: Mapping[int, Sequence[str]] | None,
) -> None:
    """Everything the served model needs, written into `staging`."""
    from diffusers import AutoencoderKL

    from .convert import convert
    from .pipeline import SYNONYMS_NAME, VAE_DIR
    from .preview import PREVIEW_NAME, fit_linear_preview, fit_size

    config = release.model_config()
    if class_names:
        config = config.replace(class_names=tuple(class_names))
    src = _download(release.repo_id, release.filename)
    vae_dir = staging / VAE_DIR
    vae_dir.mkdir(parents=True)
    for name in release.vae_files:
        shutil.copyfile(_download(release.vae_repo, name), vae_dir / name)
    convert(src, staging, config)
    ae = config.autoencoder
    if ae is not None:
        vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
        fit = fit_linear_preview(vae, ae.scale_factor, size=fit_size(vae, config.image_size))
        fit.save(staging / PREVIEW_NAME)
    if synonyms:
        text = json.dumps({str(k): list(v) for k, v in synonyms.items()}, indent=1)
        atomic_write(staging / SYNONYMS_NAME, lambda f: f.write(text.encode()))


def prepare(
    release: Release,
    cache: Path,
    class_names: Sequence[str] | None = None,
    synonyms: Mapping[int, Sequence[str]] | None = None,
) -> Path:
    """The served model directory of `release` under `cache`, built on first use (see the module doc)."""
    from filelock import FileLock

    cache = Path(cache)
    out = cache / release.name
    if is_ready(out):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{release.name}.lock")):  # one builder per cache, across processes
        if is_ready(out):  # another request or process finished it meanwhile
            return out
        for stale in cache.glob(f".{release.name}.partial-*"):  # left by an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        staging = cache / f".{release.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            _build(release, staging, class_names, synonyms)
            if out.exists():  # a directory without config.json: an old, unfinished layout
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out
