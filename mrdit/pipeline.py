"""The generation pipeline: a model with its decoder, input validation in one place, streaming of
per-step, per-branch previews, and a `generate` call that returns a dataclass.

The CLI (`python -m mrdit.sample`) and the app both go through `Pipeline.validate` and `Pipeline.stream`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import load_model, resolve_model_dir
from .classes import ClassIndex, ClassLookupError, read_synonyms
from .config import ModelConfig
from .fast import FastForward
from .interventions import Intervention, check_intervention
from .preview import VAE_KIND, cached_linear_preview
from .sampling import MAX_STEPS, SAMPLERS, StepState, iterate, noise_for_seeds
from .visual import to_uint8

MAX_IMAGES = 16
MAX_SEED = 2**63 - 1
DEFAULT_GUIDANCE = 4.0  # w for the demos: best Frechet distance of 4/5/6/8 (train/evaluate.py)
# The demos' sampler: at 25 steps, 4 points more class accuracy than dpm++2m on the shipped emoji model
# (93.2% vs 89.2% over 600 samples) for 1.2 more Frechet distance, at the same cost (README, Quality).
DEFAULT_SAMPLER = "dpm++2m-sde"
PREVIEW_MAX = 128  # decoded previews of latent models are stored at most this size
VAE_DIR = "vae"  # a model directory's own copy of its autoencoder (AutoencoderKL.save_pretrained)
SYNONYMS_NAME = "class_synonyms.json"  # optional other class names beside config.json (mrdit.classes)


class InputError(ValueError):
    """A request setting is invalid; the message is meant for the user."""


@dataclass(frozen=True)
class Settings:
    """A reproducible recipe: the same settings and model give the same images."""

    labels: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    sampler: str
    guidance_schedule: str = "constant"
    guidance_power: float = 1.0
    model: str = ""


@dataclass
class Preview:
    """One solver update, decoded to image space ([-1, 1], float16, CPU): x_t and each branch's
    clean estimate at its own resolution, coarse to fine."""

    index: int
    total: int
    t: float
    log_snr: float
    nfe: int
    x_t: torch.Tensor  # (B, 3, H, W)
    branches: list[torch.Tensor]  # K x (B, 3, h_k, w_k)
    kind: str = ""  # how it was decoded: "pixels", "VAE decode" or "linear approximation"
    latents: list[torch.Tensor] | None = None  # x_t and each x0 (bfloat16, CPU) when kind is an approximation
    full: Preview | None = None  # the VAE decode of `latents`, once asked for (`Pipeline.full_preview`)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    settings: Settings
    trajectory: list[Preview] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def arrays(self) -> np.ndarray:
        return np.stack([np.asarray(im) for im in self.images])


class PixelDecoder:
    """Pixel-space models: the data is the image."""

    kind = "pixels"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LatentDecoder:
    """Latent models: the Stable Diffusion VAE (diffusers.AutoencoderKL), decode(z / scale_factor).

    A model directory with a `vae/` folder (`AutoencoderKL.save_pretrained`) uses that copy, so that a
    converted release loads without the Hub."""

    kind = VAE_KIND

    def __init__(self, vae: torch.nn.Module, scale_factor: float) -> None:
        self.vae = vae.eval()
        self.scale_factor = scale_factor

    @classmethod
    def from_config(
        cls, config: ModelConfig, device: str | torch.device = "cpu", directory: str | Path | None = None
    ) -> LatentDecoder:
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise InputError("latent models need the optional dependency diffusers (pip install diffusers)") from e
        ae = config.autoencoder
        assert ae is not None
        local = Path(directory) / VAE_DIR if directory is not None else None
        source = str(local) if local is not None and (local / "config.json").is_file() else ae.repo_id
        try:
            vae = AutoencoderKL.from_pretrained(source).to(device)
        except Exception as e:
            raise InputError(f"could not load the autoencoder {source!r}: {type(e).__name__}: {e}") from None
        return cls(vae, ae.scale_factor)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        return self.vae.decode(z.to(p.device, p.dtype) / self.scale_factor).sample.float()


class Pipeline:
    """A model, its decoder and validated sampling. On a CUDA device the network runs through
    `FastForward` (bfloat16 autocast, CUDA graph replay) unless `fast=False`; on the CPU in float32,
    and through `torch.compile` once `compile_in_background()` has compiled it.

    `compile=True` compiles up front: on a GPU the graphs then capture the compiled network (each batch
    shape compiles on its first call, about a minute for DiMR-XL on an H100, after which 250 guided steps
    take 1.8 s instead of 3.0 s); on the CPU it waits for the compile that `compile_in_background` starts.
    Worth it for many images, not for one."""

    def __init__(
        self,
        model: torch.nn.Module,
        decoder=None,
        name: str = "",
        fast: bool | None = None,
        compile: bool = False,
        previewer=None,
        synonyms: Mapping[int, Sequence[str]] | None = None,
    ) -> None:
        self.model = model.eval()
        self.config: ModelConfig = model.config
        self.decoder = decoder if decoder is not None else (PixelDecoder() if self.config.autoencoder is None else None)
        if self.decoder is None:
            raise ValueError("a latent model needs a decoder (LatentDecoder.from_config)")
        # Per-step previews: the decoder itself unless a cheaper map is given (LinearPreview for latents).
        self.previewer = previewer if previewer is not None else self.decoder
        self.synonyms = dict(synonyms or {})
        self._classes: ClassIndex | None = None
        self.name = name
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        if fast is None:
            fast = cuda
        self.net: torch.nn.Module | FastForward = self.model
        if fast:
            self.net = FastForward(self.model, torch.bfloat16, cuda_graphs=cuda, compile=compile and cuda)
        if compile and not cuda:
            thread = self.compile_in_background()
            if thread is not None:
                thread.join()

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path,
        device: str | torch.device = "cpu",
        compile: bool = False,
        full_previews: bool = False,
    ) -> Pipeline:
        """Load a model directory; latent models get their VAE (the directory's `vae/` if there) and a
        linear preview (cached beside the model as `preview.safetensors`) unless `full_previews`."""
        directory = resolve_model_dir(path_or_repo)
        model = load_model(directory, device=device)
        decoder, previewer = None, None
        ae = model.config.autoencoder
        if ae is not None:
            decoder = LatentDecoder.from_config(model.config, device, directory)
            if not full_previews:
                previewer = cached_linear_preview(directory, decoder.vae, ae.scale_factor, model.config.image_size)
        syn = directory / SYNONYMS_NAME
        synonyms = read_synonyms(syn) if syn.is_file() else None
        return cls(model, decoder, name=str(path_or_repo), compile=compile, previewer=previewer, synonyms=synonyms)

    def compile_in_background(self, batches: Sequence[int] = (2, 16)) -> threading.Thread | None:
        """On the CPU: compile the network (`torch.compile`) in a background thread for the batch sizes a
        sampler uses (2 and 16 cover 2..any). Requests meanwhile run the plain network; afterwards the
        compiled one (about 1.5x faster on 2 cores for the emoji models). Returns the thread, or None
        on a GPU (CUDA graphs serve there; see `compile=True`)."""
        if self.device.type != "cpu":
            return None
        if not (isinstance(self.net, FastForward) and self.net.compile):
            self.net = FastForward(self.model, None, cuda_graphs=False, compile=True)
        return self.net.warm_up_async(batches)

    @property
    def class_names(self) -> list[str]:
        n = self.config.num_classes - 1
        return list(self.config.class_names) if self.config.class_names else [f"class {i}" for i in range(n)]

    @property
    def classes(self) -> ClassIndex:
        """The class lookup (names, ids, synonyms); `class_synonyms.json` beside the model adds synonyms."""
        if self._classes is None or len(self._classes) != len(self.class_names):
            self._classes = ClassIndex(self.class_names, self.synonyms)
        return self._classes

    def resolve_label(self, label: int | str) -> int:
        """A class id from an id, a name (exact first, then case-insensitive) or a synonym; never the null label."""
        if isinstance(label, np.integer):
            label = int(label)
        try:
            return self.classes.lookup(label)
        except ClassLookupError as e:
            raise InputError(str(e)) from None

    def validate(
        self,
        labels: Sequence[int | str] | int | str,
        seeds: Sequence[int] | int,
        steps: int,
        guidance: float,
        sampler: str,
        guidance_schedule: str = "constant",
        guidance_power: float = 1.0,
    ) -> Settings:
        """Check every setting once, with messages for users; returns the resolved recipe."""
        if isinstance(labels, (str, int)):
            labels = [labels]
        if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
            seeds = [int(seeds)]
        labels, seeds = list(labels), list(seeds)
        if not labels:
            raise InputError("need at least one class")
        if len(seeds) == 1 and len(labels) > 1:
            seeds = [seeds[0] + i for i in range(len(labels))]
        if len(labels) == 1 and len(seeds) > 1:
            labels = labels * len(seeds)
        if len(labels) != len(seeds):
            raise InputError(f"got {len(labels)} classes but {len(seeds)} seeds")
        if len(labels) > MAX_IMAGES:
            raise InputError(f"at most {MAX_IMAGES} images per request, got {len(labels)}")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) <= MAX_SEED:
                raise InputError(f"seed must be an integer in [0, {MAX_SEED}], got {s!r}")
        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= int(steps) <= MAX_STEPS:
            raise InputError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
        for name, v in (("guidance", guidance), ("guidance power", guidance_power)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not math.isfinite(v) or v < 0:
                raise InputError(f"{name} must be a finite number >= 0, got {v!r}")
        if guidance_schedule not in ("constant", "power-cosine"):
            raise InputError(f"guidance schedule must be 'constant' or 'power-cosine', got {guidance_schedule!r}")
        return Settings(
            labels=tuple(self.resolve_label(lb) for lb in labels),
            seeds=tuple(int(s) for s in seeds),
            steps=int(steps),
            guidance=float(guidance),
            sampler=sampler,
            guidance_schedule=guidance_schedule,
            guidance_power=float(guidance_power),
            model=self.name,
        )

    @property
    def preview_kind(self) -> str:
        """What the per-step panels show: "pixels", "VAE decode" or "linear approximation"."""
        return getattr(self.previewer, "kind", "")

    def decode_preview(self, x: torch.Tensor, decode=None) -> torch.Tensor:
        """To image space, float16 on the CPU, at most PREVIEW_MAX pixels (memory-bounded trajectories)."""
        img = (decode or self.previewer)(x).clamp(-1, 1)
        if img.shape[-1] > PREVIEW_MAX:
            img = F.interpolate(img, size=(PREVIEW_MAX, PREVIEW_MAX), mode="area")
        return img.to("cpu", torch.float16)

    def preview(self, state: StepState) -> Preview:
        approximate = self.previewer is not self.decoder
        return Preview(
            index=state.index,
            total=state.total,
            t=state.t,
            log_snr=state.log_snr,
            nfe=state.nfe,
            x_t=self.decode_preview(state.x),
            branches=[self.decode_preview(x0) for x0 in state.x0],
            kind=self.preview_kind,
            latents=[z.to("cpu", torch.bfloat16) for z in (state.x, *state.x0)] if approximate else None,
        )

    def full_preview(self, pv: Preview) -> Preview:
        """The same step decoded by the full decoder (for a step the user is looking at); cached on `pv`."""
        if pv.latents is None:
            return pv
        if pv.full is None:
            x_t, *x0 = (self.decode_preview(z.to(self.device, torch.float32), self.decoder) for z in pv.latents)
            pv.full = Preview(
                pv.index,
                pv.total,
                pv.t,
                pv.log_snr,
                pv.nfe,
                x_t,
                list(x0),
                kind=getattr(self.decoder, "kind", VAE_KIND),
            )
        return pv.full

    def stream(
        self, settings: Settings, previews: bool = True, intervention: Intervention | None = None
    ) -> Iterator[tuple[StepState, Preview | None]]:
        """Run the sampler for validated settings, yielding each state with its decoded preview.

        With an `intervention` (`mrdit.interventions`) the plain network runs: its hand-offs are edited
        per call, which a captured graph or compiled wrapper cannot do."""
        c = self.config
        if intervention is not None:
            try:
                check_intervention(intervention, self.model, len(settings.seeds), settings.steps)
            except ValueError as e:
                raise InputError(str(e)) from None
        noise, gens = noise_for_seeds(settings.seeds, (c.channels, c.image_size, c.image_size), self.device)
        labels = torch.tensor(settings.labels, device=self.device)
        for state in iterate(
            self.net if intervention is None else self.model,
            noise,
            labels,
            sampler=settings.sampler,
            steps=settings.steps,
            guidance=settings.guidance,
            guidance_schedule=settings.guidance_schedule,
            guidance_power=settings.guidance_power,
            generators=gens,
            intervention=intervention,
        ):
            yield state, (self.preview(state) if previews else None)

    def to_images(self, x: torch.Tensor) -> list[Image.Image]:
        return [Image.fromarray(a) for a in to_uint8(self.decoder(x).clamp(-1, 1))]

    def generate(
        self,
        labels: Sequence[int | str] | int | str,
        seeds: Sequence[int] | int,
        steps: int = 25,
        guidance: float = DEFAULT_GUIDANCE,
        sampler: str = DEFAULT_SAMPLER,
        keep_trajectory: bool = False,
        guidance_schedule: str = "constant",
        guidance_power: float = 1.0,
    ) -> GenerationResult:
        settings = self.validate(labels, seeds, steps, guidance, sampler, guidance_schedule, guidance_power)
        t0 = time.perf_counter()
        trajectory: list[Preview] = []
        state = None
        for state, pv in self.stream(settings, previews=keep_trajectory):  # noqa: B007 - the last state is the result
            if pv is not None:
                trajectory.append(pv)
        assert state is not None
        t1 = time.perf_counter()
        images = self.to_images(state.x)
        t2 = time.perf_counter()
        timings = {
            "sampling_s": t1 - t0,
            "decode_s": t2 - t1,
            "total_s": t2 - t0,
            "per_image_s": (t2 - t0) / len(settings.labels),
            "nfe": state.nfe,
        }
        return GenerationResult(images=images, settings=settings, trajectory=trajectory, timings=timings)


def settings_dict(settings: Settings) -> dict:
    return asdict(settings)
