"""The app: input handling and paths (unit), and a live server driven through gradio_client."""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(ROOT))
import app  # noqa: E402
from mrdit.sampling import MAX_STEPS  # noqa: E402
from mrdit.settings import MAX_SEED  # noqa: E402


def _read(path: str) -> np.ndarray:
    """An image the app hands out as a file of its own (app.image_file)."""
    return np.asarray(Image.open(path).convert("RGB"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("weights")
    shutil.copytree(tiny_model_dir, root / "tiny")
    old = app.WEIGHTS
    app.WEIGHTS = root
    app.MODELS.items.clear()
    yield root
    app.WEIGHTS = old
    app.MODELS.items.clear()


def test_model_paths_stay_inside_roots(weights, tmp_path):
    assert app.resolve_model("tiny") == (weights / "tiny").resolve()
    for bad in ["../tiny", "/etc", "~/x", "tiny/../../etc", "a\\b", ""]:
        with pytest.raises(app.InputError):
            app.resolve_model(bad)
    outside = tmp_path / "outside"
    shutil.copytree(weights / "tiny", outside)
    os.symlink(outside, weights / "link")
    with pytest.raises(app.InputError, match="outside"):
        app.resolve_model("link")


def test_released_models_offline_give_a_clear_message(weights, monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(app, "CACHE", tmp_path)
    name = next(iter(app.RELEASED))
    with pytest.raises(app.InputError, match="unavailable"):
        app.resolve_model(name)
    with pytest.raises(gr.Error):
        list(app.generate("face", 0, 3, 2.0, "ddim", 1, name))


@pytest.mark.parametrize(
    "args",
    [
        ("nope", 0, 5, 2.0, "ddim", 1),
        ("face", -1, 5, 2.0, "ddim", 1),
        ("face", 0, 0, 2.0, "ddim", 1),
        ("face", 0, 5, float("nan"), "ddim", 1),
        ("face", 0, 5, float("inf"), "ddim", 1),
        ("face", 0, 5, -2.0, "ddim", 1),
        ("face", 0, 5, 2.0, "euler", 1),
        ("face", 0, 5, 2.0, "ddim", 99),
        ("face", 2**64, 5, 2.0, "ddim", 1),
        ("face", 1.5, 5, 2.0, "ddim", 1),
        ("face", "abc", 5, 2.0, "ddim", 1),
        (None, 0, 5, 2.0, "ddim", 1),
    ],
)
def test_bad_inputs_are_gr_errors(weights, args):
    with pytest.raises(gr.Error):
        list(app.generate(*args, model="tiny"))


# The fuzzed inputs, each with whether the app must accept it. The model "tiny" of the `weights`
# fixture has the classes face and heart (ids 0 and 1); names are case-insensitive, ids may be strings.
CLASS_CASES = {"face": True, "Heart": True, " face ": True, "1": True, "0": True, 0: True, 1: True}
CLASS_CASES |= {"2": False, "-1": False, "dragon": False, "": False, 2: False, -1: False, None: False, 1.5: False}
SAMPLER_CASES = {s: True for s in app.SAMPLERS} | {"x": False, "": False, "DDIM": False}


# Each field of a request: (valid values, invalid values).
FIELDS = [
    (
        st.sampled_from([k for k, ok in CLASS_CASES.items() if ok]),
        st.sampled_from([k for k, ok in CLASS_CASES.items() if not ok]),
    ),
    (
        st.one_of(st.integers(0, MAX_SEED), st.integers(0, 99).map(float), st.just("7")),
        st.one_of(st.integers(-3, -1), st.integers(MAX_SEED + 1, 2**64), st.floats(), st.sampled_from(["x", "-1"])),
    ),
    (
        st.one_of(st.integers(1, 3), st.just(2.0)),
        st.one_of(st.integers(-2, 0), st.sampled_from([2.5, float("nan"), MAX_STEPS + 1, True])),
    ),
    (st.floats(0, 8), st.one_of(st.floats(max_value=-1e-6), st.sampled_from([float("nan"), float("inf")]))),
    (
        st.sampled_from([k for k, ok in SAMPLER_CASES.items() if ok]),
        st.sampled_from([k for k, ok in SAMPLER_CASES.items() if not ok]),
    ),
]


@st.composite
def requests(draw):
    """Requests with none, one or two fields drawn from the invalid values (measured: two thirds valid)."""
    broken = draw(st.sets(st.integers(0, len(FIELDS) - 1), max_size=2)) if draw(st.booleans()) else set()
    return tuple(draw(bad if i in broken else good) for i, (good, bad) in enumerate(FIELDS))


def _seed_ok(seed) -> bool:
    if isinstance(seed, str):
        return seed.isdigit()
    if isinstance(seed, float):
        return math.isfinite(seed) and seed.is_integer() and 0 <= seed <= MAX_SEED
    return 0 <= seed <= MAX_SEED


def _steps_ok(steps) -> bool:
    ok_type = isinstance(steps, int) or (isinstance(steps, float) and math.isfinite(steps) and steps.is_integer())
    return ok_type and not isinstance(steps, bool) and 1 <= steps <= MAX_STEPS


def test_fuzz_inputs_give_results_or_gr_errors(weights):
    """Every fuzzed request either streams to final images or is a gr.Error with a message for the user
    (never the catch-all of a crash); exactly the valid ones produce images."""
    seen: dict[tuple, bool] = {}

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(requests())
    def run(request):
        class_label, seed, steps, guidance, sampler = request
        valid = (
            CLASS_CASES[class_label]
            and _seed_ok(seed)
            and _steps_ok(steps)
            and math.isfinite(guidance)
            and guidance >= 0
            and SAMPLER_CASES[sampler]
        )
        try:
            out = list(app.generate(class_label, seed, steps, guidance, sampler, 1, "tiny"))
        except gr.Error as e:
            assert "Something went wrong" not in e.message, (class_label, seed, steps, guidance, sampler)
            produced = False
        else:
            final = [_read(f) for f in out[-1][1]]
            assert len(final) == 1 and final[0].shape == (16, 16, 3) and final[0].dtype == np.uint8
            assert "done" in out[-1][2]
            produced = True
        assert produced == valid, (class_label, seed, steps, guidance, sampler)
        seen[(repr(class_label), repr(seed), repr(steps), repr(guidance), sampler)] = produced

    run()
    share = sum(seen.values()) / len(seen)
    assert len(seen) >= 40 and 0.15 <= share <= 0.85, (len(seen), share)  # both well exercised (measured: 0.68 of 59)


def test_stochastic_sampler_is_offered_and_repeats_per_seed(weights):
    """dpm++2m-sde draws fresh noise every step, from the seed's own generator: the same request gives
    the same images, another seed another."""

    def final(seed):
        return [_read(f) for f in list(app.generate("heart", seed, 5, 2.0, "dpm++2m-sde", 2, "tiny"))[-1][1]]

    assert "dpm++2m-sde" in app.SAMPLERS
    a, b, c = final(4), final(4), final(5)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not (a[0] == c[0]).all()


def test_generate_streams_then_scrub_step_mode_and_gif(weights, tmp_path, monkeypatch):
    monkeypatch.setattr(app, "CACHE", tmp_path)
    outs = list(app.generate("heart", 3, 6, 2.0, "dpm++2m", 2, "tiny"))
    panels, final, status, run, slider, sched, settle, adds = outs[-1]
    panels, final = _read(panels), [_read(f) for f in final]
    assert len(final) == 2 and final[0].shape == (16, 16, 3)
    assert "done" in status and len(run.traj.frames) == 6
    headers = run.headers
    assert headers[:4] == ["x_t (noisy)", "branch 0: 4x4", "branch 1: 8x8", "branch 2: 16x16"]
    # panels: 2 rows (images) x (x_t + 3 branches + 2 additions) at the display size, plus a header
    assert panels.shape[1] >= 6 * app.DISPLAY and panels.shape[0] >= 2 * app.DISPLAY
    img, st_, *_ = app.scrub(2, run)
    assert "step 2 / 6" in st_
    gif = app.export_gif(run)
    assert Path(gif).stat().st_size > 0
    # step mode: one solver update per click, state per session object
    r2, msg, *_ = app.step_start("face", 0, 3, 2.0, "ddim", 1, "tiny")
    for i in range(3):
        res = app.step_next(r2)
        assert f"step {i + 1} / 3" in res[2]
    assert res[1] is not None and r2.stepper is None
    with pytest.raises(gr.Error):
        app.step_next(r2)
    assert len(run.traj.frames) == 6  # the other session's trajectory is untouched


@pytest.fixture(scope="module")
def client(weights):
    """A live server of the demo on the tiny model, and a gradio_client connected to it."""
    from gradio_client import Client

    demo = app.build_demo(default_model="tiny")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def _tile(sheet: np.ndarray, row: int, col: int) -> np.ndarray:
    """Panel (row, col) of a panel sheet: a 22-pixel header, then DISPLAY-sized tiles 4 pixels apart."""
    y, x = 22 + 4 + row * (app.DISPLAY + 4), 4 + col * (app.DISPLAY + 4)
    return sheet[y : y + app.DISPLAY, x : x + app.DISPLAY].astype(int)


def _blocks(x: torch.Tensor) -> np.ndarray:
    """(3, g, g) in [-1, 1] -> the (DISPLAY, DISPLAY, 3) uint8 tile a panel must show: each pixel a block."""
    u = ((x.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    f = app.DISPLAY // x.shape[-1]
    return np.repeat(np.repeat(u, f, axis=0), f, axis=1).astype(int)


def test_live_server_with_gradio_client(weights, client):
    from mrdit.pipeline import Pipeline

    job = client.submit(class_label="heart", seed=1, steps=12, guidance=2.0, sampler="ddim", api_name="/generate")
    updates = list(job)
    assert len(updates) >= 2  # streamed steps, then the final result
    panels, final, status = updates[-1][:3]
    assert len(final) == 4  # the default number of images
    assert "done" in status and Path(panels).is_file()

    # One panel per branch plus x_t, per image, each showing that branch's estimate at its own grid:
    # checked against the sampler's last state for the same settings, computed here.
    pipe = Pipeline.from_pretrained(weights / "tiny")
    *_, (state, _) = pipe.stream(pipe.validate("heart", [1, 2, 3, 4], 12, 2.0, "ddim"))
    K = len(pipe.config.branches)
    sheet = np.asarray(Image.open(panels).convert("RGB"))
    cols = 1 + K + (K - 1)  # x_t, each branch, what each finer branch added
    assert sheet.shape == (22 + 4 + 4 * (app.DISPLAY + 4), 4 + cols * (app.DISPLAY + 4), 3)
    for i in range(4):
        expected = [_blocks(state.x[i])] + [_blocks(state.x0[k][i]) for k in range(K)]
        assert all(np.abs(a - b).max() > 8 for a, b in zip(expected, expected[1:])), "branches look alike"
        for col, want in enumerate(expected):
            assert np.abs(_tile(sheet, i, col) - want).max() <= 1, (i, col)
        assert Image.open(final[i]["image"]).size == (16, 16)  # the gallery's format is lossy: size only

    # class ids work too; bad input is a clean error and the server keeps serving
    assert (
        "done"
        in client.predict(class_label="1", seed=2, steps=3, guidance=1.0, sampler="ddpm", api_name="/generate")[2]
    )
    with pytest.raises(Exception, match="unknown class"):
        client.predict(class_label="dragon", seed=1, steps=3, guidance=2.0, sampler="ddim", api_name="/generate")
    assert (
        "done"
        in client.predict(class_label="face", seed=1, steps=3, guidance=2.0, sampler="ddim", api_name="/generate")[2]
    )


@pytest.mark.parametrize("batched", [False, True])
def test_stop_cancels_a_running_generation(client, monkeypatch, batched):
    """Stop is wired to cancel Generate, and cancelling through the client stops the sampler on the
    server mid-run, alone or through the request batcher; the server then serves the next request."""
    from mrdit.pipeline import Pipeline

    monkeypatch.setattr(app, "BATCH", batched)

    config = client.config
    stop = [c["id"] for c in config["components"] if c.get("props", {}).get("value") == "Stop"]
    gen = [d["id"] for d in config["dependencies"] if d.get("api_name") == "generate"]
    assert len(stop) == 1 and len(gen) == 1
    assert any(gen[0] in d["cancels"] and any(t[0] == stop[0] for t in d["targets"]) for d in config["dependencies"]), (
        "the Stop button does not cancel Generate"
    )

    produced = []
    name = "_run_requests" if batched else "stream"  # the sampler run behind a Generate request
    real_run = getattr(Pipeline, name)

    def counting(self, *args, **kwargs):
        for item in real_run(self, *args, **kwargs):
            produced.append(item.index if batched else item[0].index)
            time.sleep(0.05)  # at least 5 s for the run: the cancel lands mid-run on any machine
            yield item

    monkeypatch.setattr(Pipeline, name, counting)
    job = client.submit(
        class_label="face", seed=0, steps=100, guidance=2.0, sampler="ddim", num_images=8, api_name="/generate"
    )
    deadline = time.time() + 120
    while len(produced) < 3 and time.time() < deadline:
        time.sleep(0.02)
    assert produced, "the generation never started"
    assert job.cancel()
    settled = len(produced)
    for _ in range(100):  # wait until the server stops stepping (it finishes the step in flight)
        time.sleep(0.3)
        if len(produced) == settled:
            break
        settled = len(produced)
    time.sleep(1.0)
    assert len(produced) == settled < 100, (len(produced), settled)
    statuses = [u[2] for u in job.outputs()]
    assert not any("done" in s for s in statuses)
    assert (
        "done"
        in client.predict(class_label="face", seed=1, steps=2, guidance=2.0, sampler="ddim", api_name="/generate")[2]
    )


def test_the_app_refuses_more_than_its_limit(weights):
    """The limit is the app's (the library has none): MAX_IMAGES pass the count check, one more does not."""
    assert app.MAX_IMAGES == 16
    pipe = app.MODELS.get("tiny")
    assert len(app._settings(pipe, "face", 0, app.MAX_IMAGES, 2, 2.0, "ddim").seeds) == app.MAX_IMAGES
    for n in (app.MAX_IMAGES + 1, 0, "abc"):
        with pytest.raises(gr.Error, match="number of images"):
            list(app.generate("face", 0, 2, 2.0, "ddim", n, "tiny"))


@pytest.mark.parametrize(
    "kw,field",
    [(dict(seed="abc"), "seeds"), (dict(steps="10; rm -rf /"), "steps"), (dict(guidance="lots"), "guidance")],
)
def test_bad_fields_from_widgets_are_gr_errors_naming_them(weights, kw, field):
    args = dict(class_label="face", seed=0, steps=2, guidance=2.0, sampler="ddim", num_images=1, model="tiny") | kw
    with pytest.raises(gr.Error, match=f"{field} must"):
        list(app.generate(**args))


def test_strings_through_the_api_get_messages_naming_the_field(weights, client):
    """Gradio's own preprocessing of a number widget fails on a string with its generic "raised an
    exception"; the app's request widgets pass such values on to the checks that name the field."""
    base = dict(class_label="face", seed=1, steps=2, guidance=2.0, sampler="ddim", num_images=1, model="tiny")
    cases = ((dict(seed="abc"), "seeds"), (dict(steps="10; rm -rf /"), "steps"), (dict(num_images="x"), "number of images"))
    for kw, field in cases:
        with pytest.raises(Exception, match=f"{field} must") as e:
            client.predict(**base | kw, api_name="/generate")
        assert "raised an exception" not in str(e.value)
    with pytest.raises(Exception, match="less than minimum"):  # numbers still get gradio's bounds check
        client.predict(**base | dict(seed=-1), api_name="/generate")
    client.predict(**base | dict(seed=7.0, steps=2.0), api_name="/generate")


def test_on_the_cpu_requests_share_one_network_thread(weights, monkeypatch):
    """Concurrent Generate requests go through the pipeline's shared forward (and get their images);
    MRDIT_SHARED=0 (SHARED False) leaves every request its own forwards, as before. The network there is
    traced (MRDIT_TRACE), both traces made by the warm-up at load, before any request."""
    import threading

    from mrdit.forwards import TracedNetwork

    assert app.SHARED and app.TRACE, "the CPU default is to share the network thread, traced"
    pipe = app.MODELS.get("tiny")
    assert pipe.shared is not None and pipe.shared.max_rows == app.SHARED_ROWS
    assert isinstance(pipe.shared.net, TracedNetwork)
    traces = dict(pipe.shared.net.traces)
    assert len(traces) == 2 and all(v is not None for v in traces.values())
    before = pipe.shared.calls
    finals: dict[int, object] = {}
    threads = [
        threading.Thread(target=lambda i=i: finals.setdefault(i, list(app.generate("heart", i, 4, 2.0, "ddim", 2, "tiny"))[-1][1]))
        for i in range(3)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert pipe.shared.calls - before == 3 * 4  # every step of every request went through it
    assert all(len(finals[i]) == 2 for i in range(3))
    assert pipe.shared.net.traces == traces, "a request made a trace of its own: the warm-up missed a kind"
    monkeypatch.setattr(app, "SHARED", False)
    assert app.ModelCache().get("tiny").shared is None


def test_sheets_go_out_as_png_files_of_their_own(weights):
    """The Experiments, Inside and Compare sheets leave as fresh PNG files with the same pixels (not
    arrays, which gradio writes to a shared cache path); other outputs and updates pass through."""
    from PIL import Image

    sheet = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    wrapped = app.sheet_as_file(lambda a, b=None: (sheet, "caption", b))
    path, caption, extra = wrapped(1, b=7)
    assert isinstance(path, str) and np.array_equal(np.asarray(Image.open(path)), sheet)
    assert (caption, extra) == ("caption", 7)
    assert app.sheet_as_file(lambda: sheet)() != app.sheet_as_file(lambda: sheet)()  # a fresh name each time
    update = app.gr.update()
    assert app.sheet_as_file(lambda: update)() is update

    demo = app.build_demo(default_model="tiny")
    wired = {f.api_name: f.fn for f in demo.fns.values() if f.api_name in ("experiment", "attention", "compare")}
    assert len(wired) == 3
    assert all(getattr(fn, "__wrapped__", None) is getattr(app, name if name != "experiment" else "run_experiment")
               for name, fn in wired.items())
