"""mrdit demo: watch every resolution branch of a DiMR model refine the image, step by step.

    python app.py            # serves on GRADIO_SERVER_PORT (default 7860)

The app is a thin layer over `mrdit`: `Pipeline.validate` checks every input, `Pipeline.stream`
yields each solver step with each branch's clean-image estimate, and `mrdit.visual` draws the panels.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch

from mrdit.checkpoint import CheckpointError
from mrdit.classes import read_synonyms
from mrdit.hubguard import fetch_model
from mrdit.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, MAX_IMAGES, InputError, Pipeline, Preview, Settings
from mrdit.released import RELEASES, prepare
from mrdit.sampling import SAMPLERS
from mrdit.space import gpu_seconds, on_space, on_zero_gpu
from mrdit.visual import branch_headers, panel_sheet, save_gif

ROOT = Path(__file__).resolve().parent
WEIGHTS = ROOT / "weights"
DEFAULT_MODEL = os.environ.get("MRDIT_MODEL", "mrdit-emoji-32")
# Pixel-space demo models on the CPU are compiled in the background after loading (MRDIT_COMPILE=0: never;
# never on ZeroGPU, which does not support torch.compile).
COMPILE = os.environ.get("MRDIT_COMPILE", "1") != "0" and not on_zero_gpu()
DISPLAY = 96  # every panel is shown at this size, nearest-neighbour, so model pixels stay honest
STREAM_INTERVAL = 0.08  # seconds between streamed frames (the last step is always shown)
MAX_SESSION_STEPS = 250  # trajectory memory bound per session
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


# ---------------------------------------------------------------- models


def shipped_models() -> list[str]:
    return sorted(p.name for p in WEIGHTS.iterdir() if (p / "config.json").is_file()) if WEIGHTS.is_dir() else []


def model_choices() -> list[str]:
    return shipped_models() + list(RELEASED)


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    if _REPO_ID.match(choice):
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
            if COMPILE and pipe.config.autoencoder is None:
                pipe.compile_in_background()
            self.items[path] = pipe
            while len(self.items) > self.size:
                self.items.popitem(last=False)
            return pipe


MODELS = ModelCache()


def class_choices(pipe: Pipeline) -> list[tuple[str, str]]:
    """(label, value) pairs for the filterable class picker: "golden retriever (207)" -> "golden retriever"."""
    return pipe.classes.choices()


# ---------------------------------------------------------------- trajectories


@dataclass
class Trajectory:
    """What a session keeps after a run: decoded previews of every step (float16, model resolution)."""

    settings: Settings | None = None
    previews: list[Preview] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    schedule_t: list[float] = field(default_factory=list)
    final: list[np.ndarray] = field(default_factory=list)
    stepper: object | None = None  # the paused sampler of step mode
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


def render(traj: Trajectory, i: int) -> np.ndarray:
    pv = traj.previews[i]
    return panel_sheet(pv.x_t.float(), [b.float() for b in pv.branches], DISPLAY, traj.headers)


def status_text(pv: Preview, settings: Settings, elapsed: float | None = None) -> str:
    s = f"**step {pv.index + 1} / {pv.total}** · t = {pv.t:.3f} · network evaluations {pv.nfe}"
    if elapsed is not None:
        s += f" · {elapsed:.2f} s"
    if pv.kind and pv.kind != "pixels":  # latent models: say whether the panels are the VAE's or a cheap map
        s += f" · preview: {pv.kind}"
    return s


def schedule_plot(traj: Trajectory, i: int) -> pd.DataFrame:
    """log-SNR at each step (finite ones) and a marker at the current step."""
    rows = [
        {"step": k + 1, "log-SNR": p.log_snr, "series": "schedule"}
        for k, p in enumerate(traj.previews)
        if np.isfinite(p.log_snr)
    ]
    if rows:  # the current step as a vertical line across the plotted range
        lo, hi = min(r["log-SNR"] for r in rows), max(r["log-SNR"] for r in rows)
        rows += [{"step": i + 1, "log-SNR": v, "series": "current step"} for v in (lo, hi)]
    return pd.DataFrame(rows or [{"step": 0, "log-SNR": 0.0, "series": "schedule"}])


def change_plot(traj: Trajectory) -> pd.DataFrame:
    """How much each branch's estimate still changes per step (mean |x0_k(i) - x0_k(i-1)|, image units)."""
    rows = []
    for k in range(len(traj.previews[0].branches) if traj.previews else 0):
        for i in range(1, len(traj.previews)):
            d = (traj.previews[i].branches[k].float() - traj.previews[i - 1].branches[k].float()).abs().mean()
            rows.append({"step": i + 1, "change": float(d), "branch": traj.headers[1 + k]})
    return pd.DataFrame(rows or [{"step": 0, "change": 0.0, "branch": "-"}])


# ---------------------------------------------------------------- events


def _settings(pipe: Pipeline, class_label, seed, num_images, steps, guidance, sampler) -> Settings:
    try:
        n = int(num_images)
        if not 1 <= n <= MAX_IMAGES:
            raise InputError(f"number of images must be in [1, {MAX_IMAGES}]")
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


def _new_run(model, class_label, seed, num_images, steps, guidance, sampler) -> tuple[Pipeline, Trajectory]:
    """The model and a fresh trajectory for validated settings; any problem becomes a gr.Error."""
    try:
        pipe = MODELS.get(model)
        settings = _settings(pipe, class_label, seed, num_images, steps, guidance, sampler)
    except Exception as e:
        raise _gr_error(e) from None
    return pipe, Trajectory(settings=settings, headers=branch_headers(pipe.config))


def _finalise(pipe: Pipeline, traj: Trajectory, x: torch.Tensor) -> list[np.ndarray]:
    return [np.asarray(im) for im in pipe.to_images(x)]


def _gr_error(e: Exception) -> gr.Error:
    if isinstance(e, (InputError, CheckpointError, ValueError)):
        return gr.Error(str(e), print_exception=False)
    log.exception("generation failed")
    return gr.Error(
        "Something went wrong while generating; please try again with other settings.", print_exception=False
    )


@gpu
def generate(
    class_label, seed, steps, guidance, sampler, num_images=4, model=DEFAULT_MODEL, traj: Trajectory | None = None
):
    """Stream every step: (panels, final images, status, trajectory state, slider, plots)."""
    pipe, traj = _new_run(model, class_label, seed, num_images, steps, guidance, sampler)
    settings = traj.settings
    t0 = time.perf_counter()
    last_emit = 0.0
    state = None
    try:
        for state, pv in pipe.stream(settings):
            if len(traj.previews) < MAX_SESSION_STEPS:
                traj.previews.append(pv)
            now = time.perf_counter()
            if now - last_emit >= STREAM_INTERVAL or state.index + 1 == state.total:
                last_emit = now
                yield (
                    render(traj, len(traj.previews) - 1),
                    None,
                    status_text(pv, settings, now - t0),
                    traj,
                    gr.update(),
                    gr.update(),
                    gr.update(),
                )
        assert state is not None
        traj.final = _finalise(pipe, traj, state.x)
    except Exception as e:
        raise _gr_error(e) from None
    n = len(traj.previews)
    total = time.perf_counter() - t0
    status = status_text(traj.previews[-1], settings, total) + f" · done: {len(settings.seeds)} images in {total:.2f} s"
    yield (
        render(traj, n - 1),
        traj.final,
        status,
        traj,
        gr.update(minimum=1, maximum=max(n, 2), value=n, step=1, interactive=n > 1),
        schedule_plot(traj, n - 1),
        change_plot(traj),
    )


def scrub(step, traj: Trajectory | None):
    if traj is None or not traj.previews:
        return gr.update(), "Generate first, then scrub the trajectory.", gr.update()
    i = int(min(max(int(step or 1), 1), len(traj.previews))) - 1
    status = status_text(traj.previews[i], traj.settings)
    if i == len(traj.previews) - 1 and traj.final:  # the slider also moves when a run ends: keep saying so
        status += " · done"
    return render(traj, i), status, schedule_plot(traj, i)


def play_tick(step, traj: Trajectory | None):
    """Advance the slider one step (Play); stops the timer at the end."""
    if traj is None or not traj.previews:
        return gr.update(), gr.Timer(active=False)
    nxt = int(step or 0) + 1
    if nxt > len(traj.previews):
        return gr.update(), gr.Timer(active=False)
    return gr.update(value=nxt), gr.Timer(active=True)


@gpu
def step_start(class_label, seed, steps, guidance, sampler, num_images, model):
    """Educator step mode: prepare a paused sampler for this session; nothing is computed yet."""
    pipe, traj = _new_run(model, class_label, seed, num_images, steps, guidance, sampler)
    settings = traj.settings
    traj.stepper = (pipe, pipe.stream(settings))
    return (
        traj,
        f"Step mode ready: {settings.steps} steps of {settings.sampler}. Press **Next step**.",
        None,
        gr.update(interactive=True),
    )


@gpu
def step_next(traj: Trajectory | None):
    if traj is None or traj.stepper is None:
        raise gr.Error("Start step mode first.", print_exception=False)
    pipe, it = traj.stepper
    try:
        state, pv = next(it)
    except StopIteration:
        traj.stepper = None
        raise gr.Error("The sampler has finished; start again for a new run.", print_exception=False) from None
    except Exception as e:
        raise _gr_error(e) from None
    traj.previews.append(pv)
    n = len(traj.previews)
    done = state.index + 1 == state.total
    final = None
    if done:
        traj.final = _finalise(pipe, traj, state.x)
        traj.stepper = None
        final = traj.final
    status = status_text(pv, traj.settings) + (" · finished" if done else " · paused")
    return (
        render(traj, n - 1),
        final,
        status,
        traj,
        gr.update(minimum=1, maximum=max(n, 2), value=n, step=1, interactive=n > 1),
        schedule_plot(traj, n - 1),
        change_plot(traj),
        gr.update(interactive=not done),
    )


def export_gif(traj: Trajectory | None):
    if traj is None or not traj.previews:
        raise gr.Error("Generate first; the GIF shows the trajectory of the last run.", print_exception=False)
    frames = [render(traj, i) for i in range(len(traj.previews))]
    folder = EXPORTS
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("trajectory-*.gif"):  # bounded disk use: drop exports older than an hour
        if time.time() - old.stat().st_mtime > 3600:
            old.unlink(missing_ok=True)
    return str(save_gif(frames, folder / f"trajectory-{traj.id[:8]}.gif", fps=6))


def on_model_change(model):
    try:
        pipe = MODELS.get(model)
    except Exception as e:
        raise _gr_error(e) from None
    names = class_choices(pipe)
    return gr.update(choices=names, value=names[0][1])


# ---------------------------------------------------------------- layout

INTRO = """# mrdit: watch a multi-resolution diffusion model think
**DiMR** runs a *transformer* on a coarse grid and *convolutional branches* on grids twice as fine, each
making its own prediction. Below, every solver step shows the noisy image **x_t** and **each branch's
own estimate of the clean image at its own resolution**, coarse to fine: the coarse branch settles the
layout early, the fine branches add detail later."""

EXPLAIN = """**Reading the panels.** *x_t* is the current noisy image the sampler holds. A *branch* is one
resolution of the network; its panel is that branch's estimate of the finished image (its noise
prediction turned into x0 = (x_t - sigma eps) / alpha, at its own grid). *branch k added* is the finer
estimate minus the coarser one upsampled: red where the finer branch brightened, blue where it darkened.
**Guidance** w mixes the class-conditional and unconditional predictions as eps_u + w (eps_c - eps_u):
w = 1 is off, larger w follows the class more strongly (the paper's "0.4" is w = 1.4)."""

FOOTER = """Model: DiMR, Q. Liu et al., *Alleviating Distortion in Image Generation via Multi-Resolution Diffusion
Models*, NeurIPS 2024 (arXiv:2406.09416). Emoji training data: **Twemoji** by Twitter, Inc. and other
contributors (CC-BY 4.0), **Noto Emoji** by Google (Apache-2.0), **Fluent Emoji** by Microsoft (MIT)."""

CSS = """
#panels img { image-rendering: pixelated; }
#final .thumbnail-item img { image-rendering: pixelated; }
"""


def build_demo(default_model: str | None = None) -> gr.Blocks:
    choices = model_choices()
    default = default_model or (
        DEFAULT_MODEL if DEFAULT_MODEL in choices else (choices[0] if choices else DEFAULT_MODEL)
    )
    try:
        names = class_choices(MODELS.get(default))
    except Exception:  # the page still loads; choosing a working model fills the classes
        log.exception("default model %s failed to load", default)
        names = []
    with gr.Blocks(title="mrdit: multi-resolution diffusion, step by step", delete_cache=(600, 3600)) as demo:
        gr.Markdown(INTRO)
        traj = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                model = gr.Dropdown(
                    choices,
                    value=default,
                    label="Model",
                    allow_custom_value=True,
                    info="shipped weights, a Hub repo id (user/model), or the authors' ImageNet models",
                )
                class_label = gr.Dropdown(
                    names,
                    value=names[0][1] if names else None,
                    label="Class",
                    allow_custom_value=True,
                    filterable=True,
                    info="type to filter by name or id; ids, names and synonyms can also be typed",
                )
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, scale=3)
                    dice = gr.Button("Random", scale=1, min_width=60)
                num_images = gr.Slider(1, 8, value=4, step=1, label="Images")
                steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                guidance = gr.Slider(
                    1.0, 8.0, value=DEFAULT_GUIDANCE, step=0.1, label="Guidance w  (eps_u + w·(eps_c − eps_u); 1 = off)"
                )
                sampler = gr.Dropdown(
                    list(SAMPLERS),
                    value=DEFAULT_SAMPLER,
                    label="Sampler",
                    info="dpm++2m-sde: default, stochastic, sharper classes · dpm++2m: deterministic, most varied · dpm-fast: the release's · ddim / ddpm: the classics",
                )
                with gr.Row():
                    run = gr.Button("Generate", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
                gr.Markdown("**Step mode** (for teaching): one solver step per click.")
                with gr.Row():
                    step_begin = gr.Button("Start step mode")
                    step_btn = gr.Button("Next step", interactive=False)
            with gr.Column(scale=3):
                status = gr.Markdown("Press **Generate** to watch the branches refine the image.", elem_id="status")
                gr.Markdown(
                    "One row per image: the noisy **x_t**, then **each branch's estimate**, coarse to fine, "
                    "then **what each finer branch added** (red brighter, blue darker). Branch 0 is the transformer on the "
                    "coarsest grid; the finer branches are convolutional."
                )
                panels = gr.Image(
                    label="Panels",
                    show_label=False,
                    elem_id="panels",
                    format="png",
                    interactive=False,
                    buttons=["download"],
                )
                with gr.Row():
                    slider = gr.Slider(1, 2, value=1, step=1, label="Trajectory step", interactive=False, scale=4)
                    play = gr.Button("Play", scale=1, min_width=60)
                    pause = gr.Button("Pause", scale=1, min_width=60)
                with gr.Row():
                    gif_btn = gr.Button("Export trajectory as GIF")
                    gif_file = gr.File(label="Trajectory GIF", interactive=False)
                final = gr.Gallery(
                    label="Final images", elem_id="final", columns=8, rows=1, height=200, object_fit="contain"
                )
                gr.Markdown(EXPLAIN)
                with gr.Row():
                    sched = gr.LinePlot(
                        x="step", y="log-SNR", color="series", title="Noise schedule: log-SNR at each step", height=240
                    )
                    changes = gr.LinePlot(
                        x="step",
                        y="change",
                        color="branch",
                        title="How much each branch's estimate still changes",
                        height=240,
                    )
        gr.Markdown(FOOTER)
        timer = gr.Timer(0.4, active=False)

        inputs = [class_label, seed, steps, guidance, sampler, num_images, model]
        gen_event = run.click(
            generate,
            inputs + [traj],
            [panels, final, status, traj, slider, sched, changes],
            api_name="generate",
            concurrency_limit=2,
            show_progress="hidden",
        )
        stop.click(None, None, None, cancels=[gen_event], api_visibility="private")
        dice.click(
            lambda: int(np.random.default_rng().integers(0, 2**31 - 1)),
            None,
            seed,
            api_visibility="private",
            queue=False,
        )
        slider.change(scrub, [slider, traj], [panels, status, sched], api_name="scrub", show_progress="hidden")
        play.click(lambda: gr.Timer(active=True), None, timer, api_visibility="private", queue=False)
        pause.click(lambda: gr.Timer(active=False), None, timer, api_visibility="private", queue=False)
        timer.tick(play_tick, [slider, traj], [slider, timer], api_visibility="private", show_progress="hidden")
        step_begin.click(
            step_start, inputs, [traj, status, final, step_btn], api_name="step_start", show_progress="hidden"
        )
        step_btn.click(
            step_next,
            [traj],
            [panels, final, status, traj, slider, sched, changes, step_btn],
            api_name="step_next",
            show_progress="hidden",
        )
        gif_btn.click(export_gif, [traj], gif_file, api_name="export_gif", show_progress="minimal")
        model.change(on_model_change, model, class_label, api_visibility="private")
    demo.queue(max_size=32, default_concurrency_limit=2)
    return demo


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if on_space() and os.environ.get("MRDIT_PREPARE_RELEASED", "1") != "0":
        prepare_released_in_background()
    build_demo().launch(css=CSS)
