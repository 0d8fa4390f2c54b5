"""The generation pipeline: a model with its decoder, requests turned into checked `Settings`,
streaming of per-step, per-branch previews, and a `generate` call that returns a dataclass.

The CLI (`python -m mrdit.generate`) and the app both go through `Pipeline.validate` and `Pipeline.stream`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .batching import Request, RequestBatcher
from .checkpoint import load_model, resolve_model_dir
from .classes import ClassIndex, ClassLookupError, read_synonyms
from .compiled import FastForward
from .config import ModelConfig
from .forwards import SharedForward, TracedNetwork
from .interventions import BranchGuidance, FreezeCoarse, Intervention, check_intervention
from .preview import VAE_KIND, cached_linear_preview
from .sampling import SamplerSettings, StepState, iterate, iterate_rows, noise_for_seeds
from .settings import InputError, Settings
from .visual import to_uint8

# The demos' guidance and sampler, chosen by measured sample quality (docs/experiments.md, Samplers and guidance).
DEFAULT_GUIDANCE = 4.0
DEFAULT_SAMPLER = "dpm++2m-sde"
PREVIEW_MAX = 128  # decoded previews of latent models are stored at most this size
VAE_DIR = "vae"  # a model directory's own copy of its autoencoder (AutoencoderKL.save_pretrained)
SYNONYMS_NAME = "class_synonyms.json"  # optional other class names beside config.json (mrdit.classes)


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
    shape compiles on its first call, a wait of about a minute for a large model, then faster steps:
    bench/NOTES.md); on the CPU it waits for the compile that `compile_in_background` starts. Worth it
    for many images, not for one."""

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
        self._batcher: RequestBatcher | None = None
        self._batcher_lock = threading.Lock()
        self.shared: SharedForward | None = None  # `share_forwards()`: one network thread for all callers
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

    def compile_in_background(self, batches: Sequence[int] = (2, 16), idle_s: float = 0.0) -> threading.Thread | None:
        """On the CPU: compile the network (`torch.compile`) in a background thread for the batch sizes a
        sampler uses (2 and 16 cover 2..any), once the network has been idle for `idle_s` seconds (0: at
        once). Requests meanwhile run the plain network; afterwards the compiled, faster one
        (bench/NOTES.md). Returns the thread, or None on a GPU (CUDA graphs serve there; see `compile=True`)."""
        if self.device.type != "cpu":
            return None
        if not (isinstance(self.net, FastForward) and self.net.compile):
            self.net = FastForward(self.model, None, cuda_graphs=False, compile=True)
        if idle_s > 0:
            return self.net.warm_up_when_idle(idle_s, batches)
        return self.net.warm_up_async(batches)

    def share_forwards(
        self,
        max_rows: int = 64,
        trace: bool = False,
        first_lane: bool = False,
        omp_threads: int | None = None,
        nice: int = 0,
    ) -> SharedForward:
        """Run every sampling forward of this pipeline (`stream`, `stream_batched`, `generate`) on one
        network thread that joins the calls of concurrent requests into one batch of at most `max_rows`
        rows (`mrdit.forwards`): for a server with many requests at once on a CPU. The network behind it
        is `self.net` at each call, so a background compile takes over there when it is ready; with
        `trace`, a TorchScript trace of the model instead (`TracedNetwork`, falling back to `self.net`
        where a trace fails), which other threads' Python work slows far less. `first_lane`,
        `omp_threads` and `nice` are `SharedForward`'s: the forwards of `forwards_first()` blocks on a
        thread of their own, OpenMP threads per network thread, the long requests' thread's priority.
        The first call's settings stay."""
        if self.shared is None:

            def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
                return self.net(x, t, y)

            chosen = TracedNetwork(self.model, fallback=net) if trace else net
            self.shared = SharedForward(
                chosen, self.config, max_rows=max_rows, first_lane=first_lane, omp_threads=omp_threads, nice=nice
            )
        return self.shared

    def forwards_first(self) -> contextlib.AbstractContextManager:
        """A block whose sampling forwards, in this thread, go ahead of other requests' on the shared
        network thread (`SharedForward.first`); without one, a block that changes nothing."""
        return self.shared.first() if self.shared is not None else contextlib.nullcontext()

    @property
    def sampling_net(self):
        """What the samplers call: the shared network thread if `share_forwards()` was called, else `net`."""
        return self.shared if self.shared is not None else self.net

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
        eta: float | None = None,
    ) -> Settings:
        """The request as checked `Settings` (an InputError with a message for users otherwise): class
        names resolved to ids, one class for every seed or one seed (seed, seed + 1, ...) for every class."""
        labels, seeds = _as_list(labels), _as_list(seeds)
        first = seeds[0] if len(seeds) == 1 else None
        if len(labels) > 1 and isinstance(first, numbers.Integral) and not isinstance(first, bool):
            seeds = [int(first) + i for i in range(len(labels))]
        if len(labels) == 1 and len(seeds) > 1:
            labels = labels * len(seeds)
        return Settings(
            labels=tuple(self.resolve_label(lb) for lb in labels),
            seeds=tuple(seeds),
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            guidance_schedule=guidance_schedule,
            guidance_power=guidance_power,
            eta=eta,
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
            self.sampling_net if intervention is None else self.model,
            noise,
            labels,
            sampler=settings.sampler,
            steps=settings.steps,
            guidance=settings.guidance,
            guidance_schedule=settings.guidance_schedule,
            guidance_power=settings.guidance_power,
            eta=settings.eta,
            generators=gens,
            intervention=intervention,
        ):
            if intervention is not None and isinstance(self.net, FastForward):
                self.net.touch()  # the plain network ran: not idle
            yield state, (self.preview(state) if previews else None)

    def stream_batched(
        self, settings: Settings, previews: bool = True, max_rows: int = 32
    ) -> Iterator[tuple[StepState, Preview | None]]:
        """`stream`, with concurrent calls that share a sampling plan (`plan_key`) joined into one
        batched sampler run of at most `max_rows` images (`mrdit.batching`): each call gets exactly its
        own images and steps, as if it ran alone, and closing the iterator cancels only this call."""
        with self._batcher_lock:
            if self._batcher is None:
                self._batcher = RequestBatcher(lambda reqs: self._run_requests(reqs), plan_key, max_rows=max_rows)
        for state in self._batcher.stream(settings, rows=len(settings.seeds)):
            yield state, (self.preview(state) if previews else None)

    def _run_requests(self, requests: Sequence[Request]) -> Iterator[StepState]:
        """One sampler run for batched requests: their seeds, labels and guidance weights side by side."""
        every = [r.settings for r in requests]
        c = self.config
        seeds = [seed for s in every for seed in s.seeds]
        noise, gens = noise_for_seeds(seeds, (c.channels, c.image_size, c.image_size), self.device)
        labels = torch.tensor([label for s in every for label in s.labels], device=self.device)
        guidance = [s.guidance for s in every for _ in s.seeds]
        plan = every[0]
        opts = SamplerSettings(
            plan.sampler, plan.steps, plan.guidance, plan.guidance_schedule, plan.guidance_power, plan.eta
        )
        yield from iterate_rows(self.sampling_net, noise, labels, opts, guidance, gens)

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
        eta: float | None = None,
        batch_size: int = 16,
        intervention: BranchGuidance | FreezeCoarse | None = None,
    ) -> GenerationResult:
        """Images for a request (see `validate`), sampled and decoded `batch_size` images at a time to
        bound memory; each image has its own seed's generator, so the batch size does not change it.
        An `intervention` that acts on every row alike (per-branch guidance, a frozen coarse branch)
        applies to each batch (see `stream`)."""
        if intervention is not None and not isinstance(intervention, (BranchGuidance, FreezeCoarse)):
            raise InputError(
                f"generate takes BranchGuidance or FreezeCoarse (a swap names rows of one batch: use stream), "
                f"got {intervention!r}"
            )
        settings = self.validate(labels, seeds, steps, guidance, sampler, guidance_schedule, guidance_power, eta)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        images: list[Image.Image] = []
        chunks: list[list[Preview]] = []
        sampling_s = decode_s = 0.0
        for i in range(0, len(settings.seeds), batch_size):
            part = dataclasses.replace(
                settings, labels=settings.labels[i : i + batch_size], seeds=settings.seeds[i : i + batch_size]
            )
            t0 = time.perf_counter()
            state, trajectory = None, []
            for state, pv in self.stream(part, keep_trajectory, intervention):  # noqa: B007 - the last state is the result
                if pv is not None:
                    trajectory.append(pv)
            assert state is not None
            t1 = time.perf_counter()
            images += self.to_images(state.x)
            decode_s += time.perf_counter() - t1
            sampling_s += t1 - t0
            chunks.append(trajectory)
        timings = {
            "sampling_s": sampling_s,
            "decode_s": decode_s,
            "total_s": sampling_s + decode_s,
            "per_image_s": (sampling_s + decode_s) / len(settings.labels),
            "nfe": state.nfe,
        }
        trajectory = [_concat(step) for step in zip(*chunks)] if keep_trajectory else []
        return GenerationResult(images=images, settings=settings, trajectory=trajectory, timings=timings)


def _as_list(v: object) -> list:
    """A request field as a list: a sequence as it is, anything else (a name, a number) as one item."""
    return list(v) if isinstance(v, Iterable) and not isinstance(v, (str, bytes)) else [v]


def _concat(previews: Sequence[Preview]) -> Preview:
    """One step's previews of consecutive batches as one batch."""
    first = previews[0]
    if len(previews) == 1:
        return first
    cat = lambda parts: [torch.cat(p) for p in zip(*parts)]  # elementwise over the batches' lists
    return dataclasses.replace(
        first,
        x_t=torch.cat([p.x_t for p in previews]),
        branches=cat([p.branches for p in previews]),
        latents=None if first.latents is None else cat([p.latents for p in previews]),
    )


def settings_dict(settings: Settings) -> dict:
    return asdict(settings)


def plan_key(settings: Settings) -> tuple:
    """What requests must share to run as one batch: everything but seeds, classes and the guidance
    weight, and whether guidance is on at all (w = 1 runs the conditional pass only)."""
    return (
        settings.sampler,
        settings.steps,
        settings.guidance_schedule,
        settings.guidance_power,
        settings.eta,
        settings.guidance == 1.0,
    )
