"""mrdit demo: watch every resolution branch of a DiMR model refine the image, step by step.

    python app.py            # serves on GRADIO_SERVER_PORT (default 7860)

One page, five tabs that read the same run: Watch (every branch's estimate at every step, Play, step
mode, the coarse-to-fine measure), Experiments (swap, freeze and guide the coarse branch), Inside the
network (the class token's attention, the time-dependent norms), Compare (DiMR beside the
single-resolution baseline) and Runs (GIF, MP4 and trajectory bundles, export and load).

The app is a thin layer over `mrdit`: `Pipeline` validates and streams, `mrdit.trajectory` keeps a
run within a byte budget and reads and writes bundles, `mrdit.measures` computes the coarse-to-fine
measure, `mrdit.interventions` and `mrdit.probes` the experiments, `mrdit.visual` draws.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch
from PIL import Image

from mrdit.cards import EMOJI_CREDITS
from mrdit.checkpoint import REPO_ID, CheckpointError
from mrdit.classes import read_synonyms
from mrdit.cost import forward_flops
from mrdit.hubguard import fetch_model
from mrdit.interventions import BranchGuidance, FreezeCoarse, SwapCoarse, plan_swap
from mrdit.measures import band_names, band_split, new_detail_shares, settling_curves
from mrdit.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, InputError, Pipeline, Preview, Settings
from mrdit.probes import TDCurves, class_token_attention, curves_by_branch, td_norm_curves
from mrdit.released import RELEASES, prepare
from mrdit.sampling import SAMPLERS, StepState, planned_times
from mrdit.schedule import NoiseSchedule
from mrdit.space import cap_malloc_arenas, gpu_seconds, on_space, on_zero_gpu
from mrdit.threads import omp_limited, one_omp_thread
from mrdit.trajectory import MAX_BUNDLE_BYTES, BundleError, Frame, Trajectory, load_bundle, save_bundle, thinned
from mrdit.visual import (
    attention_sheet,
    branch_headers,
    labelled_rows,
    panel_sheet,
    save_gif,
    save_mp4,
    side_by_side,
    to_uint8,
)

ROOT = Path(__file__).resolve().parent
WEIGHTS = ROOT / "weights"
DEFAULT_MODEL = os.environ.get("MRDIT_MODEL", "mrdit-emoji-32")
# Pixel-space demo models on the CPU are compiled in the background after loading (MRDIT_COMPILE=0: never;
# never on ZeroGPU, which does not support torch.compile).
COMPILE = os.environ.get("MRDIT_COMPILE", "1") != "0" and not on_zero_gpu()
# ... once the model has been idle this long (MRDIT_COMPILE_IDLE=0: at once, sharing the cores with the
# first requests), so the first request after a start runs at the plain network's full speed.
COMPILE_IDLE_S = float(os.environ.get("MRDIT_COMPILE_IDLE", "30"))
# Concurrent Generate requests with one sampling plan share one batched sampler run: on by default on a
# GPU, where a forward costs about the same at any small batch; off on a CPU, where the cost per image is
# flat from 4 images on and batching measured no gain (bench/NOTES.md). MRDIT_BATCH=1 / 0 overrides.
# BATCH_IMAGES caps a batch, GENERATE_CONCURRENCY the requests let in.
BATCH = os.environ.get("MRDIT_BATCH", "1" if torch.cuda.is_available() else "0") != "0"
BATCH_IMAGES = 32
# On a CPU every sampling forward (Generate, step mode, Compare) runs on one network thread that joins the
# forwards of concurrent requests into one batch of at most SHARED_ROWS rows, and the server's other
# threads run their tensor work on one OpenMP thread each (mrdit.forwards, mrdit.threads; bench/NOTES.md).
# MRDIT_SHARED=0: every request runs its own forwards, in its own thread, as before.
SHARED = os.environ.get("MRDIT_SHARED", "0" if torch.cuda.is_available() else "1") != "0"
# 16 rows: two default requests per forward; a step-mode click, which goes first, waits at most for one
# such forward (a larger batch costs memory and the clicks' wait, and saves little per row).
SHARED_ROWS = int(os.environ.get("MRDIT_SHARED_ROWS", "16"))
# Step-mode clicks (one forward a person waits on) run on a network thread of their own, so that they never
# wait for a long request's forward; each network thread then runs on one OpenMP thread while both are
# busy (two teams of two on two cores stall each other at every barrier), and the long requests' thread
# runs at NETWORK_NICE (Linux), so that clicks and request handling take the cores first.
# MRDIT_FIRST_LANE=0: one network thread on PyTorch's threads, clicks first in its queue, as before.
FIRST_LANE = os.environ.get("MRDIT_FIRST_LANE", "1") != "0"
NETWORK_NICE = int(os.environ.get("MRDIT_NETWORK_NICE", "10"))
# The network thread runs a TorchScript trace of the network (mrdit.forwards.TracedNetwork), which the other
# threads' Python work slows far less than the eager or compiled network; no background compile then.
# MRDIT_TRACE=0: the network as before (eager, compiled when idle).
TRACE = SHARED and os.environ.get("MRDIT_TRACE", "1") != "0"
# Per-step previews streamed and kept for replay (MRDIT_PREVIEWS=0: the final step only, to measure what
# previews cost: bench/stream_overhead.py).
PREVIEWS = os.environ.get("MRDIT_PREVIEWS", "1") != "0"
GENERATE_CONCURRENCY = 16 if BATCH or SHARED else 2
# Heap arenas for the server's threads (MRDIT_MALLOC_ARENAS=0: glibc's default, up to 8 per core); fewer
# arenas keep less freed memory: mrdit.space.cap_malloc_arenas.
MALLOC_ARENAS = int(os.environ.get("MRDIT_MALLOC_ARENAS", "2"))
MAX_IMAGES = 16  # images per request: the app's limit (the library has none)
DISPLAY = 96  # every panel is shown at this size, nearest-neighbour, so model pixels stay honest
STREAM_INTERVAL = float(os.environ.get("MRDIT_STREAM_INTERVAL", "0.5"))  # s between streamed frames; the last is always shown
# Per-session trajectory budget: beyond it an evenly spaced subset of steps (first and last included) is kept.
TRAJECTORY_MB = float(os.environ.get("MRDIT_TRAJECTORY_MB", "48"))
RELEASED = RELEASES  # menu label -> mrdit.released.Release
CACHE = Path(os.environ.get("MRDIT_CACHE", Path.home() / ".cache" / "mrdit"))
EXPORTS = Path(tempfile.gettempdir()) / "mrdit-exports"  # gradio serves files from the temp dir
IMAGENET_CLASSES = ROOT / "assets" / "imagenet_classes.json"
IMAGENET_SYNONYMS = ROOT / "assets" / "imagenet_synonyms.json"

log = logging.getLogger("mrdit.app")


def request_seconds(fn, *args, **kwargs) -> int:
    """ZeroGPU duration for one call of an event function, from its `steps` and `num_images` inputs."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
    except TypeError:
        values = {}
    return gpu_seconds(values.get("steps", 1), values.get("num_images", 1))


try:  # Hugging Face ZeroGPU: request a GPU for the generation functions; a no-op elsewhere
    import spaces  # type: ignore

    def gpu(fn):
        return spaces.GPU(duration=lambda *a, **k: request_seconds(fn, *a, **k))(fn)

except ImportError:  # pragma: no cover - depends on the host

    def gpu(fn):
        return fn


def shared_threads(fn):
    """A handler whose sampling forwards the network thread runs (SHARED): its own tensor work runs on one
    OpenMP thread, in whichever server thread runs it (mrdit.threads)."""
    return omp_limited(fn) if SHARED else fn


def shipped_models() -> list[str]:
    return sorted(p.name for p in WEIGHTS.iterdir() if (p / "config.json").is_file()) if WEIGHTS.is_dir() else []


def model_choices() -> list[str]:
    return shipped_models() + list(RELEASED)


def resolve_model(choice: str) -> Path:
    """A model choice to a directory inside the allowed roots (weights/, the Hub cache, our cache).

    `..`, absolute paths and symlinks that leave the roots are refused."""
    choice = (choice or "").strip()
    if not choice:
        raise InputError("choose a model")
    if choice in RELEASED:
        return released_model(choice)
    if choice.startswith(("/", "~")) or ".." in Path(choice).parts or "\\" in choice:
        raise InputError(f"model {choice!r}: only models under weights/ or Hugging Face Hub repo ids are allowed")
    local = WEIGHTS / choice
    if local.exists():
        real = local.resolve()
        if not real.is_relative_to(WEIGHTS.resolve()):
            raise InputError(f"model {choice!r} points outside weights/")
        if not (real / "config.json").is_file():
            raise InputError(f"model {choice!r} is not a model directory")
        return real
    if REPO_ID.match(choice):
        try:  # typed ids only within mrdit.hubguard's limits (MRDIT_HUB_IDS, MRDIT_HUB_MAX_BYTES)
            return fetch_model(choice)
        except (CheckpointError, ValueError) as e:
            raise InputError(str(e)) from None
    raise InputError(
        f"unknown model {choice!r}; choose one of: {', '.join(model_choices())}, or a Hub repo id like user/model"
    )


def imagenet_names() -> tuple[list[str] | None, dict[int, list[str]] | None]:
    """Human ImageNet class names and their synonyms, so that users (and the API) can say "goldfish"."""
    names = json.loads(IMAGENET_CLASSES.read_text()) if IMAGENET_CLASSES.is_file() else None
    synonyms = read_synonyms(IMAGENET_SYNONYMS) if IMAGENET_SYNONYMS.is_file() else None
    return names, synonyms


def released_model(choice: str) -> Path:
    """Download an authors' checkpoint and the SD VAE, convert once, cache the model directory."""
    release = RELEASED[choice]
    try:
        return prepare(release, CACHE, *imagenet_names())
    except Exception as e:  # offline, no disk space, ...: one clear message
        log.warning("preparing %s failed: %s: %s", choice, type(e).__name__, e)
        raise InputError(
            f"{choice} is unavailable: it is downloaded from the Hugging Face Hub ({release.repo_id}) on first use "
            f"and that failed ({type(e).__name__}). It needs a network connection and about 2-4 GB of disk."
        ) from None


def prepare_released_in_background() -> threading.Thread:
    """On a Space: download and convert the released models at start-up, not in a user's request."""

    def run() -> None:
        for choice in RELEASED:
            try:
                released_model(choice)
            except InputError as e:
                log.warning("%s", e)

    thread = threading.Thread(target=run, daemon=True, name="mrdit-prepare")
    thread.start()
    return thread


class ModelCache:
    """A few loaded pipelines, shared by all users (inference holds no per-request state in the model)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.items: OrderedDict[Path, Pipeline] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, choice: str) -> Pipeline:
        path = resolve_model(choice)
        with self.lock:
            if path in self.items:
                self.items.move_to_end(path)
                return self.items[path]
            try:
                device = "cuda" if torch.cuda.is_available() else "cpu"
                pipe = Pipeline.from_pretrained(path, device=device)
            except CheckpointError as e:
                raise InputError(f"model {choice!r} could not be loaded: {e}") from None
            pipe.name = choice
            shared = SHARED and device == "cpu"
            if COMPILE and pipe.config.autoencoder is None and not (shared and TRACE):
                pipe.compile_in_background(idle_s=COMPILE_IDLE_S)
            if shared:
                try:  # the traces, before any request
                    pipe.share_forwards(
                        max_rows=SHARED_ROWS,
                        trace=TRACE,
                        first_lane=FIRST_LANE,
                        omp_threads=1 if FIRST_LANE else None,
                        nice=NETWORK_NICE,  # the long requests' thread, when clicks have their own
                    ).warm_up()
                except Exception as e:  # the requests meet it too, with their own message
                    log.warning("warming up %s failed: %s", choice, e)
            self.items[path] = pipe
            while len(self.items) > self.size:
                self.items.popitem(last=False)
            return pipe


MODELS = ModelCache()


def class_choices(pipe: Pipeline) -> list[tuple[str, str]]:
    """(label, value) pairs for the filterable class picker: "golden retriever (207)" -> "golden retriever"."""
    return pipe.classes.choices()



# Runs: what a session keeps


@dataclass
class Run:
    """A session's current run: the kept trajectory and what the views need to draw it."""

    traj: Trajectory
    headers: list[str]
    settings: Settings | None = None  # None for a run loaded from a bundle
    stepper: Iterator | None = None  # the paused sampler of step mode
    cache: dict = field(default_factory=dict)  # plots of the finished run, full decodes, step mode's pipeline
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def model(self) -> str:
        return self.traj.meta.get("model", "")


SAMPLER_STEPS = [0]  # solver updates computed by this server, all sessions (how tests see Stop end a loop)


def new_trajectory(pipe: Pipeline, settings: Settings) -> Trajectory:
    schedule = NoiseSchedule(pipe.config.schedule)
    ts = planned_times(settings.sampler, settings.steps, schedule)
    lam = [float(schedule.log_snr(torch.tensor(t))) for t in ts]
    meta = {
        "model": settings.model,
        "settings": asdict(settings),
        "headers": branch_headers(pipe.config),
        "preview": pipe.preview_kind,
    }
    meta = json.loads(json.dumps(meta))  # the form a bundle gives back: lists, not tuples
    return Trajectory(total=len(ts), budget_bytes=int(TRAJECTORY_MB * 2**20), planned_t=ts, planned_log_snr=lam, meta=meta)


def to_frame(state: StepState, pv: Preview) -> Frame:
    return Frame(
        step=state.index + 1,
        t=state.t,
        log_snr=state.log_snr,
        nfe=state.nfe,
        x_t=pv.x_t,
        branches=pv.branches,
        x=state.x.detach().to("cpu", torch.float16),
        latents=pv.latents,
    )


class ActiveStreams:
    """How many Generate requests are streaming: frames are spaced so that all of them together send
    about two frames per STREAM_INTERVAL (drawing and encoding frames for many users would otherwise
    take the cores from the sampler they all wait on)."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def __enter__(self) -> ActiveStreams:
        with self.lock:
            self.count += 1
        return self

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.count -= 1

    def interval(self) -> float:
        return STREAM_INTERVAL * max(1.0, self.count / 2)


STREAMS = ActiveStreams()


def sweep_old(folder: Path, pattern: str, max_age_s: float) -> None:
    """Bounded disk use: remove files in `folder` matching `pattern` older than `max_age_s`."""
    now = time.time()
    for old in folder.glob(pattern):
        with contextlib.suppress(OSError):  # another session may have removed it first
            if now - old.stat().st_mtime > max_age_s:
                old.unlink()


FRAMES = EXPORTS / "frames"
_last_frame_sweep = [0.0]


def image_file(image: np.ndarray, compress_level: int = 1) -> str:
    """An output image as a PNG file of its own (a fresh name), for gradio to copy into its cache. Low
    compression: a panel sheet encodes about 3x faster than at zlib's default level 6 and comes out
    about 13% larger, and under many users the encoding took a quarter of the request threads' time.

    Gradio writes an array output to a path named by the image's content, rewriting that file each time
    the same image goes out again; two sessions showing the same image at once (the default class and
    seed, say) could then be sent a half-written file. A file of our own is copied under its name and
    renamed into place. Files older than a minute are swept, at most every 5 s (copied by then)."""
    FRAMES.mkdir(parents=True, exist_ok=True)
    path = FRAMES / f"{uuid.uuid4().hex}.png"
    Image.fromarray(image).save(path, compress_level=compress_level)
    if time.time() - _last_frame_sweep[0] > 5.0:
        _last_frame_sweep[0] = time.time()
        sweep_old(FRAMES, "*.png", 60.0)
    return str(path)


def sheet_as_file(fn):
    """`fn` with an array among its outputs (the first, or the only one) sent as a PNG file of its
    own (`image_file`), for the same reason as the Watch panels: two sessions showing the same sheet
    at once could otherwise be sent a half-written cache file. Other outputs pass through."""

    def as_file(x):
        return image_file(x) if isinstance(x, np.ndarray) else x

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        return (as_file(out[0]), *out[1:]) if isinstance(out, tuple) else as_file(out)

    return wrapped


def render(run: Run, frame: Frame) -> np.ndarray:
    return panel_sheet(frame.x_t.float(), [b.float() for b in frame.branches], DISPLAY, run.headers)


def status_text(frame: Frame, traj: Trajectory, elapsed: float | None = None) -> str:
    s = f"**step {frame.step} / {traj.total}** · t = {frame.t:.3f} · network evaluations {frame.nfe}"
    if elapsed is not None:
        s += f" · {elapsed:.2f} s"
    kind = traj.meta.get("preview")
    if kind and kind != "pixels":  # latent models: say whether the panels are the VAE's or a cheap map
        s += f" · preview: {kind}"
    return s


def schedule_plot(traj: Trajectory, step: int | None) -> pd.DataFrame:
    """The whole planned schedule (log-SNR after each step) and a vertical marker at `step`."""
    rows = [
        {"step": i + 1, "log-SNR": v, "series": "planned schedule"}
        for i, v in enumerate(traj.planned_log_snr)
        if math.isfinite(v)
    ]
    if rows and step is not None:
        lo, hi = min(r["log-SNR"] for r in rows), max(r["log-SNR"] for r in rows)
        rows += [{"step": step, "log-SNR": v, "series": "current step"} for v in (lo, hi)]
    return pd.DataFrame(rows or [{"step": 0, "log-SNR": 0.0, "series": "planned schedule"}])


def _with_marker(df: pd.DataFrame, y: str, color: str, step: int | None) -> pd.DataFrame:
    if df.empty or step is None:
        return df
    lo, hi = float(df[y].min()), float(df[y].max())
    marker = pd.DataFrame([{"step": step, y: v, color: "current step"} for v in (lo, hi)])
    return pd.concat([df, marker], ignore_index=True)


def measure_frames(run: Run) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The coarse-to-fine measure of a finished run (cached): per band, the finest estimate's relative
    distance to the final image; per finer branch, the share of what it added that its coarser grid
    cannot hold."""
    if "settle" in run.cache:
        return run.cache["settle"], run.cache["adds"]
    if not run.traj.finished:  # nothing to compare with yet
        return pd.DataFrame([{"step": 0, "distance to final": 0.0, "band": "-"}]), pd.DataFrame(
            [{"step": 0, "new-detail share": 0.0, "branch": "-"}]
        )
    traj = run.traj
    settle = pd.DataFrame([{"step": 0, "distance to final": 0.0, "band": "-"}])
    adds = pd.DataFrame([{"step": 0, "new-detail share": 0.0, "branch": "-"}])
    grids = [b.shape[-1] for b in traj.frames[0].branches] if traj.frames else []
    if len(grids) > 1 and all(b > a and b % a == 0 for a, b in zip(grids, grids[1:])):
        final = traj.frames[-1].branches[-1].float()
        curves = settling_curves([f.branches[-1] for f in traj.frames], final, grids)  # (T, nb)
        names = band_names(grids)
        coarse = settling_curves([f.branches[0] for f in traj.frames], final, grids)[:, 0]  # branch 0's own layout
        settle = pd.DataFrame(
            [
                {"step": f.step, "distance to final": float(curves[i, j]), "band": names[j]}
                for i, f in enumerate(traj.frames)
                for j in range(len(names))
            ]
            + [
                {"step": f.step, "distance to final": float(coarse[i]), "band": f"{names[0]}, branch 0's own"}
                for i, f in enumerate(traj.frames)
            ]
        )
        rows = []
        for f in traj.frames:
            shares = new_detail_shares([b.float() for b in f.branches])
            rows += [
                {"step": f.step, "new-detail share": v, "branch": f"branch {k} ({grids[k]}x{grids[k]})"}
                for k, v in enumerate(shares, start=1)
            ]
        adds = pd.DataFrame(rows)
    run.cache.update(settle=settle, adds=adds)
    return settle, adds


def plots(run: Run, step: int | None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    settle, adds = measure_frames(run)
    return (
        schedule_plot(run.traj, step),
        _with_marker(settle, "distance to final", "band", step),
        _with_marker(adds, "new-detail share", "branch", step),
    )


def slider_for(run: Run, value: int) -> dict:
    t = run.traj
    return gr.update(minimum=1, maximum=max(t.total, 2), value=value, step=1, interactive=len(t.frames) > 1)


def final_images(run: Run) -> list[str] | None:
    return None if run.traj.final is None else [image_file(a) for a in run.traj.final]


# Events: Watch


def _gr_error(e: Exception) -> gr.Error:
    if isinstance(e, (InputError, CheckpointError, BundleError, ValueError)):
        return gr.Error(str(e), print_exception=False)
    log.exception("request failed")
    return gr.Error("Something went wrong; please try again with other settings.", print_exception=False)


def _settings(pipe: Pipeline, class_label, seed, num_images, steps, guidance, sampler) -> Settings:
    """Widget values to checked settings (`Pipeline.validate`): `num_images` images of one class, seeds
    seed, seed + 1, ...; a bad value is a gr.Error whose message names the field."""
    try:
        try:
            n = int(num_images)
        except (TypeError, ValueError):
            n = 0  # refused just below
        if not 1 <= n <= MAX_IMAGES:
            raise InputError(f"number of images must be an integer in [1, {MAX_IMAGES}], got {num_images!r}")
        if isinstance(seed, float):
            if not seed.is_integer():
                raise InputError(f"seed must be an integer, got {seed}")
            seed = int(seed)
        if isinstance(seed, str):
            seed = int(seed) if seed.strip().isdigit() else seed
        return pipe.validate(
            [class_label] * n, [seed + i if isinstance(seed, int) else seed for i in range(n)], steps, guidance, sampler
        )
    except (TypeError, ValueError) as e:
        raise gr.Error(str(e), print_exception=False) from None


def _new_run(model, class_label, seed, num_images, steps, guidance, sampler) -> tuple[Pipeline, Run]:
    """The model and a fresh run for validated settings; any problem becomes a gr.Error."""
    try:
        pipe = MODELS.get(model)
        settings = _settings(pipe, class_label, seed, num_images, steps, guidance, sampler)
        traj = new_trajectory(pipe, settings)
    except gr.Error:
        raise
    except Exception as e:
        raise _gr_error(e) from None
    return pipe, Run(traj=traj, headers=list(traj.meta["headers"]), settings=settings)


def _finish(pipe: Pipeline, run: Run, x: torch.Tensor) -> None:
    run.traj.final = np.stack([np.asarray(im) for im in pipe.to_images(x)])


def _shown(run: Run, frame: Frame, status: str) -> tuple:
    """The eight Watch outputs for a finished or loaded run, showing `frame`."""
    return (image_file(render(run, frame)), final_images(run), status, run, slider_for(run, frame.step), *plots(run, frame.step))


@shared_threads
@gpu
def generate(class_label, seed, steps, guidance, sampler, num_images=4, model=DEFAULT_MODEL):
    """Stream every step: (panels, final images, status, run, slider, schedule, settling, additions)."""
    pipe, run = _new_run(model, class_label, seed, num_images, steps, guidance, sampler)
    t0 = time.perf_counter()
    last_emit = 0.0
    state = frame = None
    try:
        kw = {"previews": PREVIEWS}
        states = pipe.stream_batched(run.settings, max_rows=BATCH_IMAGES, **kw) if BATCH else pipe.stream(run.settings, **kw)
        with closing(states), STREAMS:  # on Stop: this request's deliveries end, its batch goes on
            for state, pv in states:
                SAMPLER_STEPS[0] += 1
                if pv is None and state.index + 1 < state.total:
                    continue  # previews off: only the last step is shown and kept
                frame = to_frame(state, pv or pipe.preview(state))
                run.traj.add(state.index, frame)
                now = time.perf_counter()
                if now - last_emit >= STREAMS.interval() or state.index + 1 == state.total:
                    last_emit = now
                    status = status_text(frame, run.traj, now - t0)
                    yield (image_file(render(run, frame)), None, status, run, *([gr.update()] * 4))
        assert state is not None and frame is not None
        _finish(pipe, run, state.x)
    except Exception as e:
        raise _gr_error(e) from None
    total = time.perf_counter() - t0
    kept = len(run.traj.frames)
    note = f" · {kept} of {run.traj.total} steps kept to replay" if kept < run.traj.total else ""
    status = status_text(frame, run.traj, total) + f" · done: {len(run.settings.seeds)} images in {total:.2f} s{note}"
    yield _shown(run, run.traj.frames[-1], status)


@shared_threads
def scrub(step, run: Run | None):
    """Show the kept step at or before `step`: (panels, status, schedule, settling, additions)."""
    if run is None or not run.traj.frames:
        return gr.update(), "Generate first, then scrub the trajectory.", *([gr.update()] * 3)
    traj = run.traj
    frame = traj.frames[traj.position(int(step or 1))]
    status = status_text(frame, traj)
    if frame is traj.frames[-1] and traj.finished:
        status += " · done"
    return image_file(render(run, frame)), status, *plots(run, frame.step)


@shared_threads
@gpu
def full_decode(step, run: Run | None):
    """The shown step of a latent model decoded by the full VAE instead of the cheap preview: (panels, status)."""
    if run is None or not run.traj.frames:
        raise gr.Error("Generate first, then decode a step.", print_exception=False)
    frame = run.traj.frames[run.traj.position(int(step or 1))]
    if frame.latents is None:
        if run.traj.meta.get("preview", "pixels") != "pixels":
            return gr.update(), status_text(frame, run.traj) + " · a loaded bundle keeps the previews only: no full decode"
        return gr.update(), status_text(frame, run.traj) + " · these panels are exact already"
    try:
        pipe = MODELS.get(run.model)
        cache = run.cache.setdefault("full", {})
        if frame.step not in cache:
            pv = Preview(frame.step - 1, run.traj.total, frame.t, frame.log_snr, frame.nfe, frame.x_t, frame.branches,
                         latents=frame.latents)
            cache[frame.step] = pipe.full_preview(pv)
        full = cache[frame.step]
    except Exception as e:
        raise _gr_error(e) from None
    shown = replace(frame, x_t=full.x_t, branches=full.branches)
    return image_file(render(run, shown)), status_text(frame, run.traj).split(" · preview:")[0] + f" · preview: {full.kind}"


def next_step(step, run: Run | None) -> int | None:
    """The kept step after `step`, or None at the end."""
    if run is None:
        return None
    later = [f.step for f in run.traj.frames if f.step > int(step or 0)]
    return later[0] if later else None


def play(step, run: Run | None, fps):
    """Start replaying: from the first step when the slider stands at the last one."""
    if run is None or len(run.traj.frames) < 2:
        return gr.update(), gr.Timer(active=False)
    start = int(step or 1)
    if next_step(start, run) is None:
        start = run.traj.frames[0].step
    return gr.update(value=start), gr.Timer(value=1.0 / float(fps or 4), active=True)


def play_tick(step, run: Run | None):
    """Advance the slider to the next kept step; stop the timer at the end."""
    nxt = next_step(step, run)
    if nxt is None:
        return gr.update(), gr.Timer(active=False)
    return gr.update(value=nxt), gr.Timer(active=True)


def set_speed(fps):
    return gr.Timer(value=1.0 / float(fps or 4))


@shared_threads
@gpu
def step_start(class_label, seed, steps, guidance, sampler, num_images, model):
    """Step mode: a paused sampler for this session (nothing computed yet) and the whole planned schedule."""
    pipe, run = _new_run(model, class_label, seed, num_images, steps, guidance, sampler)
    run.stepper = pipe.stream(run.settings)
    run.cache["pipe"] = pipe
    msg = (
        f"Step mode ready: {run.traj.total} steps of {run.settings.sampler}, all {run.traj.total} planned on the "
        "schedule plot. Press **Next step**."
    )
    return run, msg, None, gr.update(interactive=True), schedule_plot(run.traj, 1)


@shared_threads
@gpu
def step_next(run: Run | None):
    """One solver update: (panels, final, status, run, slider, schedule, settling, additions, next button)."""
    if run is None or run.stepper is None:
        raise gr.Error("Start step mode first.", print_exception=False)
    try:
        with run.cache["pipe"].forwards_first():  # a person waits on this one forward: it goes first
            state, pv = next(run.stepper)
    except StopIteration:
        run.stepper = None
        raise gr.Error("The sampler has finished; start again for a new run.", print_exception=False) from None
    except Exception as e:
        raise _gr_error(e) from None
    SAMPLER_STEPS[0] += 1
    frame = to_frame(state, pv)
    run.traj.add(state.index, frame)
    done = state.index + 1 == state.total
    if done:
        _finish(run.cache.pop("pipe"), run, state.x)
        run.stepper = None
    status = status_text(frame, run.traj) + (" · finished" if done else " · paused")
    sched, settle, adds = plots(run, frame.step) if done else (schedule_plot(run.traj, frame.step), gr.update(), gr.update())
    return (image_file(render(run, frame)), final_images(run), status, run, slider_for(run, frame.step), sched, settle, adds,
            gr.update(interactive=not done))


# Events: Runs (export and load)


def _export_path(run: Run, suffix: str) -> Path:
    EXPORTS.mkdir(parents=True, exist_ok=True)
    sweep_old(EXPORTS, "trajectory-*", 3600.0)
    return EXPORTS / f"trajectory-{run.id[:8]}{suffix}"


def _require_finished(run: Run | None, what: str) -> Run:
    if run is None or not run.traj.frames or not run.traj.finished:
        raise gr.Error(f"Generate (or load) a run first; the {what} shows the last finished run.", print_exception=False)
    return run


def export_gif(run: Run | None) -> str:
    """The kept trajectory as an animated GIF (shown on the page, downloadable)."""
    run = _require_finished(run, "GIF")
    return str(save_gif([render(run, f) for f in run.traj.frames], _export_path(run, ".gif"), fps=6))


def export_mp4(run: Run | None) -> str:
    """The kept trajectory as an H.264 MP4."""
    run = _require_finished(run, "MP4")
    try:
        return str(save_mp4([render(run, f) for f in run.traj.frames], _export_path(run, ".mp4"), fps=6))
    except Exception as e:
        raise _gr_error(e) from None


def export_bundle(run: Run | None) -> str:
    """The kept trajectory as a bundle: one safetensors file that the Runs tab (or /load_bundle) replays."""
    run = _require_finished(run, "bundle")
    return str(save_bundle(run.traj, _export_path(run, ".safetensors")))


def load_run(path) -> tuple:
    """Replay a bundle without the model: the eight Watch outputs."""
    if not path:
        raise gr.Error("Choose a trajectory bundle (.safetensors) to load.", print_exception=False)
    try:
        traj = thinned(load_bundle(path), int(TRAJECTORY_MB * 2**20))
    except BundleError as e:
        raise gr.Error(str(e), print_exception=False) from None
    headers = traj.meta.get("headers")
    if not (isinstance(headers, list) and all(isinstance(h, str) for h in headers)):
        headers = ["x_t"] + [f"branch {k}" for k in range(len(traj.frames[0].branches))]
    if not isinstance(traj.meta.get("model"), str):
        traj.meta["model"] = ""
    if not isinstance(traj.meta.get("settings"), dict):
        traj.meta["settings"] = {}
    run = Run(traj=traj, headers=[h[:40] for h in headers])
    status = status_text(traj.frames[-1], traj) + f" · loaded run of {run.model[:60] or 'an unnamed model'} · done"
    try:
        return _shown(run, traj.frames[-1], status)
    except Exception as e:  # consistent but unusual content (odd sizes): refuse it, keep serving
        log.warning("bundle could not be drawn: %s: %s", type(e).__name__, e)
        raise gr.Error("This trajectory bundle could not be drawn (its images have unusual sizes).", print_exception=False) from None


def on_model_change(model):
    try:
        pipe = MODELS.get(model)
    except Exception as e:
        raise _gr_error(e) from None
    names = class_choices(pipe)
    return gr.update(choices=names, value=names[0][1])


# Events: Experiments

EXPERIMENTS = ("swap-coarse", "freeze-coarse", "branch-guidance")


def _int_in(value, name: str, lo: int, hi: int) -> int:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be an integer, got {value!r}", print_exception=False) from None
    if not math.isfinite(v) or not v.is_integer() or not lo <= v <= hi:
        raise gr.Error(f"{name} must be an integer in [{lo}, {hi}], got {value!r}", print_exception=False)
    return int(v)


def parse_weights(text, branches: int) -> tuple[float, ...]:
    """'4, 1, 1' -> (4.0, 1.0, 1.0): one guidance weight per branch, coarse to fine."""
    try:
        ws = tuple(float(w) for w in str(text).replace(";", ",").split(",") if w.strip())
    except ValueError:
        raise gr.Error(f"branch weights must be numbers separated by commas, got {text!r}", print_exception=False) from None
    if len(ws) != branches or not all(math.isfinite(w) and 0 <= w <= 20 for w in ws):
        raise gr.Error(f"branch weights: give {branches} numbers in [0, 20], coarse to fine; got {text!r}", print_exception=False)
    return ws


def _final_x(pipe: Pipeline, settings: Settings, intervention=None) -> torch.Tensor:
    state = None
    extra = {} if intervention is None else {"intervention": intervention}
    for state, _ in pipe.stream(settings, previews=False, **extra):  # noqa: B007 - the last state
        SAMPLER_STEPS[0] += 1
    assert state is not None
    return state.x


def _band_report(pipe: Pipeline, pairs: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> str:
    """For pixel models: per band, ||band(x) - band(ref)|| / ||band(ref) - band(other)|| for each pair."""
    if pipe.config.autoencoder is not None or pipe.config.architecture != "dimr":
        return ""
    grids = [b.grid for b in pipe.config.branches]
    names = band_names(grids)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, x, ref, scale_ref in pairs:
        bx, br, bs = (band_split(v.float().cpu(), grids) for v in (x, ref, scale_ref))
        vals = [float((a - b).norm() / (b - c).norm().clamp_min(1e-8)) for a, b, c in zip(bx, br, bs)]
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def experiment_card(experiment):
    """The question and hint of an experiment, and only its own controls."""
    question, hint = CARDS.get(experiment, ("", ""))
    show = {
        "swap-coarse": (True, True, True, False, False),
        "freeze-coarse": (False, False, True, False, True),
        "branch-guidance": (False, False, False, True, False),
    }.get(experiment, (True,) * 5)
    return (question, hint, *(gr.update(visible=v) for v in show))


def _experiment_pipe(model) -> Pipeline:
    try:
        pipe = MODELS.get(model)
    except Exception as e:
        raise _gr_error(e) from None
    if pipe.config.architecture != "dimr" or len(pipe.config.branches) < 2:
        raise gr.Error("Experiments need a multi-branch DiMR model (not the single-resolution baseline).", print_exception=False)
    return pipe


def _swap(pipe, a: Settings, other_class, other_seed, k: int):
    n = len(a.seeds)
    b = _settings(pipe, other_class if other_class not in (None, "") else a.labels[0], other_seed, n, a.steps, a.guidance, a.sampler)
    seeds, labels, swap = plan_swap(a.seeds, a.labels, b.seeds, b.labels, from_step=k)
    x = _final_x(pipe, replace(a, seeds=tuple(seeds), labels=tuple(labels)), swap)
    xa, xb, xh = x[:n], x[n : 2 * n], x[2 * n :]
    rows = [("A", xa), ("B", xb), ("hybrid: B with A's coarse branch", xh)]
    table = _band_report(pipe, [("hybrid vs A", xh, xa, xb), ("hybrid vs B", xh, xb, xa)])
    note = "Distance of the hybrid's bands to A's and to B's, in units of the A-B distance (0 = the same)."
    return rows, table, note


def _plain(pipe, a: Settings) -> torch.Tensor:
    """The plain run through the same network as an intervened one (an identity swap is bit-equal to
    no intervention), so that a GPU's reduced-precision wrapper does not enter the comparison."""
    return _final_x(pipe, a, SwapCoarse(tuple(range(len(a.seeds)))))


def _step_word(a: Settings) -> str:
    return "network evaluation" if a.sampler == "dpm-fast" else "step"  # dpm-fast takes several per step


def _freeze(pipe, a: Settings, k: int, zero: bool):
    plain = _plain(pipe, a)
    frozen = _final_x(pipe, a, FreezeCoarse(from_step=k, zero=bool(zero)))
    what = f"zeroed from {_step_word(a)} {k + 1}" if zero else f"frozen at {_step_word(a)} {k + 1}"
    table = _band_report(pipe, [(f"coarse features {what}", frozen, plain, torch.zeros_like(plain))])
    note = "Each band's distance to the plain run, relative to the plain run's band (0 = unchanged)."
    return [("plain run", plain), (f"coarse features {what}", frozen)], table, note


def _branch_guidance(pipe, a: Settings, weights):
    ws = parse_weights(weights, len(pipe.config.branches))
    plain = _plain(pipe, a)
    guided = _final_x(pipe, a, BranchGuidance(weights=ws))
    label = "weights " + ", ".join(f"{w:g}" for w in ws)
    table = _band_report(pipe, [(label, guided, plain, torch.zeros_like(plain))])
    note = f"Each band's distance to ordinary guidance (w = {a.guidance:g}), relative to its band."
    return [(f"ordinary guidance w = {a.guidance:g}", plain), (label, guided)], table, note


@gpu
def run_experiment(
    experiment, class_label, seed, steps, guidance, sampler, num_images=2, model=DEFAULT_MODEL,
    other_seed=1, other_class=None, from_step=1, branch_weights="4, 1, 1", zero=False,
):
    """One experiment on the branches beside the plain run at the same seed: (sheet, summary)."""
    if experiment not in EXPERIMENTS:
        raise gr.Error(f"experiment must be one of {', '.join(EXPERIMENTS)}, got {experiment!r}", print_exception=False)
    pipe = _experiment_pipe(model)
    n = _int_in(num_images, "number of images", 1, 4)
    a = _settings(pipe, class_label, seed, n, steps, guidance, sampler)
    k = _int_in(from_step, "from step", 1, a.steps) - 1
    t0 = time.perf_counter()
    try:
        if experiment == "swap-coarse":
            rows, table, note = _swap(pipe, a, other_class, other_seed, k)
        elif experiment == "freeze-coarse":
            rows, table, note = _freeze(pipe, a, k, zero)
        else:
            rows, table, note = _branch_guidance(pipe, a, branch_weights)
        sheet = labelled_rows([(label, to_uint8(pipe.decoder(x).clamp(-1, 1))) for label, x in rows], DISPLAY)
    except gr.Error:
        raise
    except Exception as e:
        raise _gr_error(e) from None
    summary = f"**{experiment}** · {time.perf_counter() - t0:.1f} s\n\n" + (f"{note}\n\n{table}" if table else "")
    return sheet, summary


# Events: Inside the network


def _run_model(run: Run | None) -> tuple[Run, Pipeline]:
    """The run and its model; a loaded bundle's model must be one of the shipped ones (its name is untrusted)."""
    if run is None or not run.traj.frames:
        raise gr.Error("Generate (or load) a run first: the views inside the network read its steps.", print_exception=False)
    if run.settings is None and run.model not in shipped_models():
        raise gr.Error(f"This bundle's model {run.model[:60]!r} is not one of the shipped models here.", print_exception=False)
    try:
        return run, MODELS.get(run.model)
    except Exception as e:
        raise _gr_error(e) from None


def run_labels(run: Run, pipe: Pipeline, batch: int) -> torch.Tensor:
    """The classes of a run's images, checked against its model (a loaded bundle's are untrusted)."""
    labels = run.traj.meta.get("settings", {}).get("labels") if isinstance(run.traj.meta.get("settings"), dict) else None
    n = len(pipe.class_names)
    ok = isinstance(labels, list) and len(labels) == batch
    ok = ok and all(isinstance(y, int) and not isinstance(y, bool) and 0 <= y < n for y in labels)
    if not ok:
        raise gr.Error("This run does not record valid classes for its model; generate it again.", print_exception=False)
    return torch.tensor(labels, device=pipe.device)


@gpu
def attention(step, layer, head, run: Run | None):
    """The class token's attention over the coarse grid at a kept step: (heat maps, caption)."""
    run, pipe = _run_model(run)
    frame = run.traj.frames[run.traj.position(int(step or 1))]
    labels = run_labels(run, pipe, frame.x.shape[0])
    c = pipe.config
    if tuple(frame.x.shape[1:]) != (c.channels, c.image_size, c.image_size):
        raise gr.Error("This run's states do not fit its model.", print_exception=False)
    N = pipe.config.schedule.num_steps
    t = torch.full((frame.x.shape[0],), max(frame.t, 1.0 / N) * N)
    try:
        probs = class_token_attention(pipe.model, frame.x.float().to(pipe.device), t.to(pipe.device), labels)
    except Exception as e:
        raise _gr_error(e) from None
    L, H = probs.shape[1], probs.shape[2]
    li = _int_in(layer, "layer", 1, L) - 1
    maps = probs[:, li].mean(1) if head in (None, "", "mean") else probs[:, li, _int_in(head, "head", 1, H) - 1]
    sheet = attention_sheet(frame.x_t.float(), frame.branches[-1].float(), maps, DISPLAY)
    which = "mean over heads" if head in (None, "", "mean") else f"head {head}"
    peak = float(maps.flatten(1).max(1).values.mean())
    caption = (
        f"step {frame.step} / {run.traj.total} · layer {li + 1} of {L} · {which}: how much the class token attends to each "
        f"cell of the {maps.shape[-1]}x{maps.shape[-1]} grid (white 0, red = the map's maximum; mean maximum {peak:.3f})"
    )
    return sheet, caption


TDLN_VIEWS = ("scales (RMS over channels)", "mixing gates s(t)")


@gpu
def tdln(model, step=None, run: Run | None = None, view: str = TDLN_VIEWS[0]):
    """The time-dependent norms of a model as functions of t, with the current step's t marked."""
    if view not in TDLN_VIEWS:
        raise gr.Error(f"view must be one of {', '.join(TDLN_VIEWS)}, got {view!r}", print_exception=False)
    try:
        pipe = MODELS.get(model)
        curves = td_norm_curves(pipe.model)
    except Exception as e:
        raise _gr_error(e) from None
    df = tdln_frame(curves, gates=view == TDLN_VIEWS[1])
    if run is not None and run.traj.frames and run.model == pipe.name:
        t = run.traj.frames[run.traj.position(int(step or 1))].t
        lo, hi = float(df["value"].min()), float(df["value"].max())
        df = pd.concat([df, pd.DataFrame([{"t": t, "value": v, "series": "current step"} for v in (lo, hi)])], ignore_index=True)
    return df


def follow_step(step, run: Run | None):
    total = run.traj.total if run is not None else 2
    return gr.update(value=step, maximum=max(total, 2), interactive=run is not None)


def attention_ranges(model):
    """Layer and head choices for the transformer branch of the chosen model."""
    try:
        spec = MODELS.get(model).config.branches[0]
    except Exception:
        return gr.update(), gr.update()
    return gr.update(maximum=max(spec.blocks, 2), value=1), gr.update(choices=["mean"] + [str(h) for h in range(1, spec.heads + 1)], value="mean")


def latent_only(model):
    """The full-decode button is for latent models only (pixel panels are exact)."""
    try:
        return gr.update(visible=MODELS.get(model).config.autoencoder is not None)
    except Exception:
        return gr.update()


def tdln_frame(curves: TDCurves, gates: bool = False) -> pd.DataFrame:
    """TD-norm curves as a long table for the line plot: per branch and kind (mean over blocks), the
    scales and weights (RMS over channels; biases left out) or their mean mixing gates."""
    by = curves_by_branch(curves)
    rows = []
    for i, name in enumerate(by.names):
        if by.kind[i].endswith("bias"):
            continue
        values = by.gates[i] if gates else by.values[i]
        rows += [{"t": float(t), "value": float(v), "series": name} for t, v in zip(by.t, values)]
    return pd.DataFrame(rows)


# Events: Compare

BASELINE = os.environ.get("MRDIT_BASELINE", "baseline-emoji-32")
PAIR_DIMR, PAIR_BASELINE = "pair-dimr-", "pair-baseline-"  # the matched pair's folders: docs/matched-pair.md


def baseline_for(model) -> str:
    """The baseline a DiMR model is compared with: for a model of the matched pair (`pair-dimr-32-s0`) its
    partner trained on the same budget (`pair-baseline-32-s0`), for any other BASELINE."""
    name = Path(str(model)).name
    if name.startswith(PAIR_DIMR):
        partner = PAIR_BASELINE + name[len(PAIR_DIMR) :]
        if (WEIGHTS / partner / "config.json").is_file():
            return partner
    return BASELINE


def _compare_pipes(model) -> tuple[Pipeline, Pipeline]:
    baseline = baseline_for(model)
    try:
        dimr, base = MODELS.get(model), MODELS.get(baseline)
    except Exception as e:
        raise _gr_error(e) from None
    if dimr.config.architecture != "dimr":
        raise gr.Error("Pick a DiMR model in the Model box to compare it with the baseline.", print_exception=False)
    same = dimr.class_names == base.class_names and dimr.config.image_size == base.config.image_size
    if not same:
        raise gr.Error(f"The baseline {baseline} is trained on other data; compare it with an emoji model of its size.", print_exception=False)
    return dimr, base


def mflops(pipe: Pipeline) -> float:
    """Compute of one network evaluation for one image, in MFLOP (counted once per model)."""
    if "mflops" not in pipe.__dict__:
        pipe.__dict__["mflops"] = forward_flops(pipe.model) / 1e6
    return pipe.__dict__["mflops"]


def training_line(pipe: Pipeline) -> str:
    """Parameters, compute and optimiser steps of a shipped model, from its weights and run_info.json."""
    params = sum(p.numel() for p in pipe.model.parameters())
    try:
        info = json.loads((resolve_model(pipe.name) / "run_info.json").read_text())
    except (OSError, ValueError, InputError):
        info = {}
    steps = lineage_steps(info)
    trained = f", {steps:,} optimiser steps" if steps else ""
    return f"`{pipe.name}`: {params:,} parameters, {mflops(pipe):.0f} MFLOP per image and step{trained}"


def lineage_steps(info) -> int:
    """Optimiser steps of a model and of every run it was fine-tuned or grown from (run_info "source")."""
    if not isinstance(info, dict):
        return 0
    step = info.get("step", 0)
    own = step if isinstance(step, int) and not isinstance(step, bool) and step > 0 else 0
    return own + lineage_steps(info.get("source"))


@shared_threads
@gpu
def compare(class_label, seed, steps, guidance, sampler, num_images=2, model=DEFAULT_MODEL):
    """DiMR and the baseline on the same class, seeds and sampler: (sheet, status, state, slider)."""
    dimr, base = _compare_pipes(model)
    n = _int_in(num_images, "number of images", 1, 4)
    runs = []
    for pipe in (dimr, base):
        s = _settings(pipe, class_label, seed, n, steps, guidance, sampler)
        run = Run(traj=new_trajectory(pipe, s), headers=[], settings=s)
        run.traj.budget_bytes //= 2
        try:
            for state, pv in pipe.stream(s):
                SAMPLER_STEPS[0] += 1
                run.traj.add(state.index, to_frame(state, pv))
        except Exception as e:
            raise _gr_error(e) from None
        runs.append(run)
    status = f"DiMR {training_line(dimr)} · baseline {training_line(base)}. {match_text(dimr, base)}"
    last = runs[0].traj.frames[-1].step
    return compare_sheet(runs, last), status, runs, gr.update(minimum=1, maximum=max(last, 2), value=last, interactive=True)


def match_text(dimr: Pipeline, base: Pipeline) -> str:
    """Whether the two are matched in parameters and compute per image (within 10%) and in training
    (the same optimiser steps, batch and recipe), and what a reader may conclude from the comparison."""
    params = [sum(p.numel() for p in pipe.model.parameters()) for pipe in (dimr, base)]
    runs = [run_record(p) for p in (dimr, base)]
    same = {
        "parameters": abs(params[0] / params[1] - 1) <= 0.1,
        "compute per image": abs(mflops(dimr) / mflops(base) - 1) <= 0.1,
        "training (steps, batch and recipe)": runs[0] is not None and runs[0] == runs[1],
    }
    if all(same.values()):
        return (
            "Matched in parameters, compute per image and training (the matched pair, docs/matched-pair.md): which is "
            "better is measured over seeds in the models' cards, not by one run here."
        )
    yes, no = [k for k, v in same.items() if v], [k for k, v in same.items() if not v]
    head = f"Matched in {' and '.join(yes)}, not in {' or '.join(no)}" if yes else f"Not matched in {', '.join(no)}"
    return head + " (the baseline's card): this shows the two designs side by side, not which is better."


def run_record(pipe: Pipeline) -> tuple[int, int, str] | None:
    """(optimiser steps over the model's whole lineage, batch size, recipe) from its run_info.json; None if
    unknown."""
    try:
        info = json.loads((resolve_model(pipe.name) / "run_info.json").read_text())
    except (OSError, ValueError, InputError):
        return None
    if not isinstance(info, dict):
        return None
    steps, batch = lineage_steps(info), info.get("batch_size")
    recipe = json.dumps(info.get("recipe"), sort_keys=True)
    return (steps, batch, recipe) if steps and isinstance(batch, int) else None


def compare_sheet(runs: list[Run], step: int) -> np.ndarray:
    frames = [r.traj.frames[r.traj.position(step)] for r in runs]
    groups = [("DiMR", frames[0]), ("baseline", frames[1])]
    return side_by_side([(name, f.x_t.float(), [b.float() for b in f.branches]) for name, f in groups], DISPLAY)


def compare_scrub(step, runs):
    if not runs:
        return gr.update()
    return compare_sheet(runs, int(step or 1))


# Layout

INTRO = """# mrdit: watch a multi-resolution diffusion model think
**DiMR** runs a *transformer* on a coarse grid and *convolutional branches* on grids twice as fine, each
making its own prediction. Every solver step below shows the noisy image **x_t** and **each branch's
own estimate of the clean image at its own resolution**, coarse to fine: the layout settles first,
the fine detail in the last few steps."""

FINDINGS = """**What the measure shows** (`mrdit-emoji-32`, 192 images, default settings:
`docs/coarse-to-fine.md`). The 8x8 layout of the estimate is within 10% of the final image's from
step 15 of 25 (median), the finer bands only from steps 23 and 24: coarse to fine (the 64 px model:
15, 23, 24, 24). In the first three steps 29-63% of what a finer branch adds is detail its coarser
neighbour cannot hold (the rest changes the layout); at step 12 it is 94-95% (the 64 px model's
finest branch: 83%), and 98-100% from step 23 on."""

EXPLAIN = """**Reading the panels.** *x_t* is the current noisy image the sampler holds. A *branch* is one
resolution of the network; its panel is that branch's estimate of the finished image (its noise
prediction turned into x0 = (x_t - sigma eps) / alpha, at its own grid). *branch k added* is the finer
estimate minus the coarser one enlarged: red where the finer branch brightened, blue where it darkened
(full colour = a change of 1, half the image's range of -1 to 1). **Guidance** w mixes the class-conditional and
unconditional predictions as eps_u + w (eps_c - eps_u): w = 1 is off, larger w follows the class more
strongly (the paper's "0.4" is w = 1.4).

**The coarse-to-fine measure.** Each estimate and the final image are split into frequency bands on the
model's own grids: the *layout* visible at the coarsest grid, then each band of detail between one grid
and the next, finer one. *When each band settles*: per step, how far each band of the current estimate
still is from the final image's, relative to that band's size (0.1 = within 10%; early estimates,
full of noise, can be more than 1 away). *What each finer
branch adds*: the share of a branch's addition that lies in the band its coarser neighbour cannot hold
(1 = only new detail, 0 = it only corrects the coarser layout)."""

FOOTER = f"""Model: DiMR, Q. Liu et al., *Alleviating Distortion in Image Generation via Multi-Resolution Diffusion
Models*, NeurIPS 2024 (arXiv:2406.09416). Emoji training data:

{EMOJI_CREDITS}"""

CARDS = {
    "swap-coarse": (
        "**Swap the coarse branch.** Does the layout come from the coarse branch? Run B again, but hand its "
        "finer branches the coarse features that A's transformer computed for A's own x_t.",
        "Measured (96 hybrids, `docs/branch-experiments.md`): the hybrid's layout is far closer to A's than to B's "
        "(0.53 vs 0.93 of the A-B distance; 89% of hybrids nearer A), and even its detail leans to A.",
    ),
    "freeze-coarse": (
        "**Freeze the coarse branch.** What does the coarse branch still contribute late in sampling? From "
        "step k on, the finer branches get the coarse features of step k (or zeros).",
        "Measured: frozen from step 13 of 25 the layout stays (0.14 of its size off) but the detail drifts "
        "(0.41, 0.61); zeroed, the class is lost (17% recognised against 92%).",
    ),
    "branch-guidance": (
        "**Guidance per branch.** Where is the class decided? Classifier-free guidance with one weight per "
        "branch: each branch's hand-off (and the finest branch's prediction) is extrapolated by its own w.",
        "Ordinary guidance with w is `1, ..., 1, w`; `4, 1, 1` guides only what the transformer hands on. "
        "Measured: guiding one hand-off alone, `4, 1, 1` or `1, 4, 1`, recovers guidance's class accuracy "
        "(70% without guidance, 92-95% with): the class travels in what the branches hand on.",
    ),
}

CSS = """
#panels img, #exp_sheet img, #att_sheet img, #cmp_sheet img { image-rendering: pixelated; }
#final .thumbnail-item img { image-rendering: pixelated; }
"""


def _numbers_only(preprocess, payload):
    """Gradio's preprocessing for numbers; anything else (a string sent through the API) reaches the
    handler unchanged, whose checks name the field, instead of failing in gradio with a generic error."""
    return preprocess(payload) if isinstance(payload, (int, float)) and not isinstance(payload, bool) else payload


def _request_field(component: gr.Number | gr.Slider) -> gr.Number | gr.Slider:
    """A number widget of a request, preprocessed by `_numbers_only` (an instance attribute: a subclass
    of a gradio component would make gradio write a .pyi stub beside app.py on import)."""
    component.preprocess = functools.partial(_numbers_only, component.preprocess)
    return component


def _controls(choices: list[str], default: str, names: list[str]) -> dict:
    """The shared control column: model, class, seed, images, steps, guidance, sampler, run buttons."""
    c = {}
    c["model"] = gr.Dropdown(
        choices, value=default, label="Model", allow_custom_value=True,
        info="shipped weights, a Hub repo id (user/model), or the authors' ImageNet models",
    )
    c["class_label"] = gr.Dropdown(
        names, value=names[0][1] if names else None, label="Class", allow_custom_value=True, filterable=True,
        info="type to filter by name or id; ids, names and synonyms can also be typed",
    )
    with gr.Row():
        c["seed"] = _request_field(gr.Number(0, label="Seed", precision=0, minimum=0, scale=3))
        c["dice"] = gr.Button("Random", scale=1, min_width=60)
    c["num_images"] = _request_field(gr.Slider(1, 8, value=4, step=1, label="Images"))
    c["steps"] = _request_field(gr.Slider(1, 1000, value=25, step=1, label="Steps", elem_id="steps_ctl"))
    c["guidance"] = _request_field(gr.Slider(1.0, 8.0, value=DEFAULT_GUIDANCE, step=0.1, label="Guidance w  (eps_u + w·(eps_c − eps_u); 1 = off)"))
    c["sampler"] = gr.Dropdown(
        list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler",
        info="dpm++2m-sde: default, stochastic, sharper classes · dpm++2m: deterministic, most varied · dpm-fast: the release's · ddim / ddpm: the classics",
    )
    with gr.Row():
        c["run"] = gr.Button("Generate", variant="primary")
        c["stop"] = gr.Button("Stop", variant="stop")
    gr.Markdown("**Step mode** (for teaching): one solver step per click.")
    with gr.Row():
        c["step_begin"] = gr.Button("Start step mode")
        c["step_btn"] = gr.Button("Next step", interactive=False)
    return c


def _watch_tab(latent: bool) -> dict:
    w = {}
    w["status"] = gr.Markdown("Press **Generate** to watch the branches refine the image.", elem_id="status")
    gr.Markdown(
        "One row per image: the noisy **x_t**, then **each branch's estimate**, coarse to fine, then **what each "
        "finer branch added** (red brighter, blue darker). Branch 0 is the transformer on the coarsest grid; the "
        "finer branches are convolutional."
    )
    w["panels"] = gr.Image(label="Panels", show_label=False, elem_id="panels", format="png", interactive=False, buttons=["download"])
    with gr.Row():
        w["slider"] = gr.Slider(1, 2, value=1, step=1, label="Step", interactive=False, scale=4, elem_id="step_slider")
        w["play"] = gr.Button("Play", scale=1, min_width=60)
        w["pause"] = gr.Button("Pause", scale=1, min_width=60)
        w["fps"] = gr.Slider(1, 20, value=4, step=1, label="Steps per second", scale=2)
        w["full"] = gr.Button("Full VAE decode", scale=1, min_width=80, visible=latent)
    w["final"] = gr.Gallery(label="Final images", elem_id="final", columns=8, rows=1, height=200, object_fit="contain")
    with gr.Row():
        w["sched"] = gr.LinePlot(x="step", y="log-SNR", color="series", title="Noise schedule (log-SNR)", height=240, elem_id="sched_plot")
        w["settle"] = gr.LinePlot(x="step", y="distance to final", color="band", title="When each band settles", height=240, elem_id="settle_plot")
        w["adds"] = gr.LinePlot(x="step", y="new-detail share", color="branch", title="What finer branches add", height=240, elem_id="adds_plot")
    gr.Markdown(FINDINGS)
    gr.Markdown(EXPLAIN)
    return w


def _experiments_tab(names: list[str]) -> dict:
    e = {}
    gr.Markdown("Each experiment changes one thing inside the network and shows the result beside the plain run at the same seed (the class, seed, steps, guidance and sampler of the left column; at most 4 images).")
    e["experiment"] = gr.Radio(list(EXPERIMENTS), value="swap-coarse", label="Experiment")
    e["question"] = gr.Markdown(CARDS["swap-coarse"][0])
    with gr.Row():
        e["other_seed"] = _request_field(gr.Number(100, label="B: seed", precision=0, minimum=0))
        e["other_class"] = gr.Dropdown(
            names, value=names[1][1] if len(names) > 1 else None, label="B: class", allow_custom_value=True, filterable=True
        )
        e["from_step"] = _request_field(gr.Number(1, label="From step", precision=0, minimum=1))
        e["weights"] = gr.Textbox("4, 1, 1", label="Guidance per branch (coarse to fine)", visible=False)
        e["zero"] = gr.Checkbox(False, label="Zero instead of freeze", visible=False)
    e["run"] = gr.Button("Run experiment", variant="primary")
    e["sheet"] = gr.Image(label="Result", elem_id="exp_sheet", format="png", interactive=False)
    e["summary"] = gr.Markdown(elem_id="exp_summary")
    e["hint"] = gr.Markdown(CARDS["swap-coarse"][1])
    return e


def _inside_tab(layers: int, heads: int) -> dict:
    i = {}
    gr.Markdown("**Attention of the class token.** The transformer prepends a class token to the coarse grid. For a step of the current run, a block (layer) and a head, the heat map shows how strongly the class token attends to each grid cell, over x_t and over the finest estimate.")
    with gr.Row():
        i["step"] = gr.Slider(1, 2, value=1, step=1, label="Step")
        i["layer"] = gr.Slider(1, max(layers, 2), value=1, step=1, label="Layer (block)")
        i["head"] = gr.Dropdown(["mean"] + [str(h) for h in range(1, heads + 1)], value="mean", label="Head")
    i["show"] = gr.Button("Show attention")
    i["sheet"] = gr.Image(label="Class-token attention", elem_id="att_sheet", format="png", interactive=False)
    i["caption"] = gr.Markdown()
    gr.Markdown("**Time-dependent norms.** DiMR's only time input: every norm's scale (and shift) is a learnt blend of two values, gated by t. The plot shows, per branch, the RMS over channels of each kind of norm parameter as a function of t, with the current step's t marked.")
    with gr.Row():
        i["tdln_view"] = gr.Radio(list(TDLN_VIEWS), value=TDLN_VIEWS[0], label="Show")
        i["tdln_btn"] = gr.Button("Plot the norms of the current model")
    i["tdln"] = gr.LinePlot(x="t", y="value", color="series", title="Time-dependent norm parameters over t", height=300, elem_id="tdln_plot")
    return i


def _compare_tab() -> dict:
    c = {}
    gr.Markdown(
        f"**DiMR beside a single-resolution model.** The same class, seeds, sampler, steps and guidance through the "
        f"selected DiMR model and a single-resolution baseline (one transformer, linear unpatchify head), step by step. "
        f"`mrdit-emoji-32` runs beside `{BASELINE}`: matched in compute per image, not in parameters or training (its "
        "card). Pick `pair-dimr-32-s0` or `-s1` in the Model box to run the matched pair: the same parameters and "
        "compute within 5%, the same data, recipe and steps (docs/matched-pair.md)."
    )
    c["run"] = gr.Button("Run both", variant="primary")
    c["status"] = gr.Markdown(elem_id="cmp_status")
    c["sheet"] = gr.Image(label="DiMR | baseline", elem_id="cmp_sheet", format="png", interactive=False)
    c["slider"] = gr.Slider(1, 2, value=1, step=1, label="Step", interactive=False)
    c["state"] = gr.State(None)
    return c


def _runs_tab() -> dict:
    r = {}
    gr.Markdown(f"Keep a run: export its trajectory as an animation or as a **bundle** (one safetensors file with x_t and every branch's estimate at every kept step, and the settings), and load a bundle back to replay it in Watch without the model. Bundles up to {MAX_BUNDLE_BYTES >> 20} MiB.")
    with gr.Row():
        r["gif_btn"] = gr.Button("Export GIF")
        r["mp4_btn"] = gr.Button("Export MP4")
        r["bundle_btn"] = gr.Button("Export bundle")
    r["gif"] = gr.Image(label="Trajectory animation", type="filepath", interactive=False, elem_id="gif_view")
    with gr.Row():
        r["mp4"] = gr.Video(label="Trajectory MP4", interactive=False)
        r["bundle"] = gr.File(label="Trajectory bundle", interactive=False, elem_id="bundle_file")
    r["upload"] = gr.File(label="Load a bundle", file_types=[".safetensors"], type="filepath", elem_id="bundle_upload")
    r["load_status"] = gr.Markdown()
    return r


def _wire_watch(c: dict, w: dict, run, timer) -> None:
    inputs = [c["class_label"], c["seed"], c["steps"], c["guidance"], c["sampler"], c["num_images"], c["model"]]
    watch_out = [w["panels"], w["final"], w["status"], run, w["slider"], w["sched"], w["settle"], w["adds"]]
    gen_event = c["run"].click(generate, inputs, watch_out, api_name="generate", concurrency_limit=GENERATE_CONCURRENCY, show_progress="hidden")
    c["stop"].click(None, None, None, cancels=[gen_event], api_visibility="private")
    c["dice"].click(lambda: int(np.random.default_rng().integers(0, 2**31 - 1)), None, c["seed"], api_visibility="private", queue=False)
    # The slider shows a step when a person moves it (.input) or Play moves it (.then below); not on
    # .change, which would also fire when Generate or Next step set it, redrawing what they just sent.
    shown = [w["panels"], w["status"], w["sched"], w["settle"], w["adds"]]
    w["slider"].input(scrub, [w["slider"], run], shown, api_name="scrub", show_progress="hidden", trigger_mode="always_last")
    w["full"].click(full_decode, [w["slider"], run], [w["panels"], w["status"]], api_name="full_decode")
    w["play"].click(play, [w["slider"], run, w["fps"]], [w["slider"], timer], api_visibility="private", queue=False).then(
        scrub, [w["slider"], run], shown, api_visibility="private", show_progress="hidden"
    )
    w["pause"].click(lambda: gr.Timer(active=False), None, timer, api_visibility="private", queue=False)
    w["fps"].change(set_speed, w["fps"], timer, api_visibility="private", queue=False)
    timer.tick(play_tick, [w["slider"], run], [w["slider"], timer], api_visibility="private", show_progress="hidden").then(
        scrub, [w["slider"], run], shown, api_visibility="private", show_progress="hidden"
    )
    c["step_begin"].click(step_start, inputs, [run, w["status"], w["final"], c["step_btn"], w["sched"]], api_name="step_start", show_progress="hidden")
    c["step_btn"].click(step_next, [run], watch_out + [c["step_btn"]], api_name="step_next", concurrency_limit=GENERATE_CONCURRENCY, show_progress="hidden")
    c["model"].change(on_model_change, c["model"], c["class_label"], api_visibility="private")


def _wire_experiments(c: dict, e: dict) -> None:
    e["experiment"].change(
        experiment_card, e["experiment"],
        [e["question"], e["hint"], e["other_seed"], e["other_class"], e["from_step"], e["weights"], e["zero"]],
        api_visibility="private", queue=False,
    )
    e["run"].click(
        sheet_as_file(run_experiment),
        [e["experiment"], c["class_label"], c["seed"], c["steps"], c["guidance"], c["sampler"], c["num_images"], c["model"],
         e["other_seed"], e["other_class"], e["from_step"], e["weights"], e["zero"]],
        [e["sheet"], e["summary"]],
        api_name="experiment",
        concurrency_limit=2,
    )
    c["model"].change(on_model_change, c["model"], e["other_class"], api_visibility="private")


def _wire_inside(c: dict, i: dict, w: dict, run) -> None:
    i["show"].click(sheet_as_file(attention), [i["step"], i["layer"], i["head"], run], [i["sheet"], i["caption"]], api_name="attention")
    i["tdln_btn"].click(tdln, [c["model"], w["slider"], run, i["tdln_view"]], i["tdln"], api_name="tdln")
    # The attention step follows the Watch slider, so both tabs look at the same step.
    w["slider"].change(follow_step, [w["slider"], run], i["step"], api_visibility="private", queue=False)
    c["model"].change(attention_ranges, c["model"], [i["layer"], i["head"]], api_visibility="private")
    c["model"].change(latent_only, c["model"], w["full"], api_visibility="private")


def _wire_compare(c: dict, k: dict) -> None:
    inputs = [c["class_label"], c["seed"], c["steps"], c["guidance"], c["sampler"], c["num_images"], c["model"]]
    k["run"].click(sheet_as_file(compare), inputs, [k["sheet"], k["status"], k["state"], k["slider"]], api_name="compare", concurrency_limit=2)
    k["slider"].input(
        sheet_as_file(compare_scrub), [k["slider"], k["state"]], k["sheet"], api_visibility="private", show_progress="hidden",
        trigger_mode="always_last",  # as the Watch slider: a person's moves, not Run both's own update
    )


def _wire_runs(r: dict, w: dict, run) -> None:
    r["gif_btn"].click(export_gif, [run], r["gif"], api_name="export_gif", show_progress="minimal")
    r["mp4_btn"].click(export_mp4, [run], r["mp4"], api_name="export_mp4", show_progress="minimal")
    r["bundle_btn"].click(export_bundle, [run], r["bundle"], api_name="export_bundle", show_progress="minimal")
    watch_out = [w["panels"], w["final"], w["status"], run, w["slider"], w["sched"], w["settle"], w["adds"]]
    r["upload"].upload(load_run, r["upload"], watch_out, api_name="load_bundle").success(
        lambda: "Loaded: the run replays in **Watch**.", None, r["load_status"], api_visibility="private"
    )


def build_demo(default_model: str | None = None) -> gr.Blocks:
    choices = model_choices()
    default = default_model or (DEFAULT_MODEL if DEFAULT_MODEL in choices else (choices[0] if choices else DEFAULT_MODEL))
    try:
        pipe = MODELS.get(default)
        names, spec = class_choices(pipe), pipe.config.branches[0]
        layers, heads, latent = spec.blocks, max(spec.heads, 1), pipe.config.autoencoder is not None
    except Exception:  # the page still loads; choosing a working model fills the classes
        log.exception("default model %s failed to load", default)
        names, layers, heads, latent = [], 8, 16, False
    with gr.Blocks(title="mrdit: multi-resolution diffusion, step by step", delete_cache=(600, 3600)) as demo:
        gr.Markdown(INTRO)
        run = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                c = _controls(choices, default, names)
            with gr.Column(scale=3), gr.Tabs():
                with gr.Tab("Watch"):
                    w = _watch_tab(latent)
                with gr.Tab("Experiments"):
                    e = _experiments_tab(names)
                with gr.Tab("Inside the network"):
                    i = _inside_tab(layers, heads)
                with gr.Tab("Compare"):
                    k = _compare_tab()
                with gr.Tab("Runs"):
                    r = _runs_tab()
        gr.Markdown(FOOTER)
        timer = gr.Timer(0.25, active=False)
        _wire_watch(c, w, run, timer)
        _wire_experiments(c, e)
        _wire_inside(c, i, w, run)
        _wire_compare(c, k)
        _wire_runs(r, w, run)
    demo.queue(max_size=32, default_concurrency_limit=2)
    return demo


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    cap_malloc_arenas(MALLOC_ARENAS)
    if SHARED:
        one_omp_thread()  # before the model loads: only the network thread keeps an OpenMP pool
    if on_space() and os.environ.get("MRDIT_PREPARE_RELEASED", "1") != "0":
        prepare_released_in_background()
    build_demo().launch(css=CSS, max_file_size=MAX_BUNDLE_BYTES)
