"""The app in a real browser (Debian chromium, headless, through Playwright): generate and watch the
final step arrive, scrub, Play after a run, Stop ending the server's loop, step mode with the whole
schedule, the inline animation, a bundle exported and loaded back, and a screenshot."""

from __future__ import annotations

import io
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

sys.path.insert(0, str(ROOT))
from test_app import free_port  # noqa: E402

import app  # noqa: E402

CHROMIUM = shutil.which("chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium is installed by `make test` (.ci/run); not on this machine"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The shipped default model when present (what users see), else the tiny test model."""
    root = app.WEIGHTS
    default = app.DEFAULT_MODEL if (root / app.DEFAULT_MODEL / "config.json").is_file() else None
    if default is None:
        from mrdit import build_model, get_preset, save_model

        root = tmp_path_factory.mktemp("weights")
        cfg = get_preset("tiny").replace(num_classes=3, null_label=2, class_names=("face", "heart"))
        save_model(build_model(cfg), root / "tiny")
        default = "tiny"
    old = app.WEIGHTS
    app.WEIGHTS = root
    app.MODELS.items.clear()
    demo = app.build_demo(default_model=default)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=app.CSS)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    app.WEIGHTS = old
    app.MODELS.items.clear()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def page_at(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.goto(server)
    return page


def generate_and_wait(page, steps: int = 25):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Watch").click()
    if steps != 25:
        box = page.locator("#steps_ctl input[type=number]")
        box.fill(str(steps))
        box.press("Enter")
    page.get_by_role("button", name="Generate").click()
    status = page.locator("#status")
    expect(status).to_contain_text("done", timeout=120_000)
    expect(status).to_contain_text(f"step {steps} / {steps}")
    return status


def panel_pixels(page) -> np.ndarray:
    src = page.locator("#panels img").get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def shown_step(page) -> int:
    return int(page.locator("#status").inner_text().split("step ")[1].split(" /")[0])


@needs_chromium
def test_browser_flow(server, browser, tmp_path):
    from playwright.sync_api import expect

    shot = Path(os.environ.get("MRDIT_SCREENSHOT", tmp_path / "screenshot.png"))
    page = page_at(browser, server)
    status = generate_and_wait(page)
    panels = page.locator("#panels img")
    expect(panels).to_be_visible()
    page.wait_for_function("() => { const i = document.querySelector('#panels img'); return i && i.complete && i.naturalWidth > 0 }")
    assert panels.evaluate("img => img.naturalWidth") >= 6 * app.DISPLAY  # x_t + 3 branches + 2 additions
    assert page.locator("#final img").count() >= 4
    for plot in ("#sched_plot", "#settle_plot", "#adds_plot"):
        expect(page.locator(f"{plot} canvas, {plot} svg").first).to_be_visible(timeout=20_000)

    slider = page.locator("#step_slider input[type=range]")
    slider.focus()
    for _ in range(5):
        slider.press("ArrowLeft")
    expect(status).to_contain_text("step 20 / 25", timeout=20_000)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


@needs_chromium
def test_play_after_a_run_replays_from_step_one(server, browser):
    page = page_at(browser, server)
    generate_and_wait(page)
    page.get_by_role("button", name="Play").click()
    seen = []
    deadline = time.time() + 60
    while time.time() < deadline and not (seen and min(seen) <= 2 and seen[-1] >= 6):
        seen.append(shown_step(page))
        time.sleep(0.1)
    page.get_by_role("button", name="Pause").click()
    assert min(seen) <= 2, seen  # it went back to the start ...
    replay = seen[seen.index(min(seen)) :]
    assert replay[-1] >= 6 and replay == sorted(replay), seen  # ... and moved forward, step by step


@needs_chromium
def test_stop_ends_the_servers_sampling_loop(server, browser):
    from playwright.sync_api import expect

    page = page_at(browser, server)
    box = page.locator("#steps_ctl input[type=number]")
    box.fill("1000")
    box.press("Enter")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text("/ 1000", timeout=60_000)
    page.get_by_role("button", name="Stop").click()
    time.sleep(1.5)
    before = app.SAMPLER_STEPS[0]
    time.sleep(2.0)
    assert app.SAMPLER_STEPS[0] == before, "the cancelled run kept sampling"
    start = time.time()
    generate_and_wait(page, steps=3)
    assert time.time() - start < 60


@needs_chromium
def test_step_mode_starts_with_the_whole_schedule(server, browser):
    from playwright.sync_api import expect

    page = page_at(browser, server)
    page.get_by_role("button", name="Start step mode").click()
    status = page.locator("#status")
    expect(status).to_contain_text("all 25 planned on the schedule plot", timeout=30_000)
    expect(page.locator("#sched_plot canvas, #sched_plot svg").first).to_be_visible(timeout=20_000)
    nxt = page.get_by_role("button", name="Next step")
    nxt.click()
    expect(status).to_contain_text("step 1 / 25", timeout=20_000)
    nxt.click()
    expect(status).to_contain_text("step 2 / 25", timeout=20_000)


@needs_chromium
def test_a_step_click_and_a_run_are_one_request_each(server, browser):
    """Next step and Generate send their panels with the slider: moving the slider by output must not
    fire a second request that redraws the same step (the slider listens to a person's input)."""
    from playwright.sync_api import expect

    page = page_at(browser, server)
    joins = []
    page.on("request", lambda r: joins.append(r.url) if r.method == "POST" and "queue/join" in r.url else None)
    generate_and_wait(page, steps=5)
    time.sleep(1.0)
    assert len(joins) == 1, joins
    page.get_by_role("button", name="Start step mode").click()
    status = page.locator("#status")
    expect(status).to_contain_text("planned on the schedule plot", timeout=30_000)
    nxt = page.get_by_role("button", name="Next step")
    for k in (1, 2, 3):
        nxt.click()
        expect(status).to_contain_text(f"step {k} / 5", timeout=20_000)  # the steps set for the run above
    time.sleep(1.0)
    assert len(joins) == 1 + 1 + 3, joins  # Generate, Start step mode, three clicks


@needs_chromium
def test_animation_inline_and_a_bundle_loaded_back_shows_the_same_panels(server, browser, tmp_path):
    from playwright.sync_api import expect

    page = page_at(browser, server)
    generate_and_wait(page)
    before = panel_pixels(page)
    page.get_by_role("tab", name="Runs").click()
    page.get_by_role("button", name="Export GIF").click()
    gif = page.locator("#gif_view img")
    expect(gif).to_be_visible(timeout=60_000)
    assert ".gif" in (gif.get_attribute("src") or "")
    assert gif.evaluate("img => img.naturalWidth") > 100

    page.get_by_role("button", name="Export bundle").click()
    link = page.locator("#bundle_file a[href*='.safetensors']").first
    expect(link).to_be_visible(timeout=60_000)
    bundle = tmp_path / "run.safetensors"
    bundle.write_bytes(page.request.get(link.get_attribute("href")).body())

    other = page_at(browser, server)  # a new session: nothing generated there
    other.get_by_role("tab", name="Runs").click()
    other.locator("#bundle_upload input[type=file]").set_input_files(str(bundle))
    other.get_by_role("tab", name="Watch").click()
    expect(other.locator("#status")).to_contain_text("loaded", timeout=60_000)
    expect(other.locator("#status")).to_contain_text("step 25 / 25")
    assert np.array_equal(panel_pixels(other), before)


@needs_chromium
def test_experiments_inside_and_compare_tabs(server, browser):
    from playwright.sync_api import expect

    page = page_at(browser, server)
    page.get_by_role("tab", name="Experiments").click()
    page.get_by_role("button", name="Run experiment").click()
    expect(page.locator("#exp_summary")).to_contain_text("swap-coarse", timeout=120_000)
    expect(page.locator("#exp_sheet img")).to_be_visible()
    assert page.locator("#exp_sheet img").evaluate("img => img.naturalHeight") > 3 * app.DISPLAY  # A, B, hybrid
    page.get_by_label("freeze-coarse").check()
    expect(page.get_by_text("Freeze the coarse branch.")).to_be_visible()
    page.get_by_role("button", name="Run experiment").click()
    expect(page.locator("#exp_summary")).to_contain_text("freeze-coarse", timeout=120_000)

    generate_and_wait(page, steps=5)
    page.get_by_role("tab", name="Inside the network").click()
    page.get_by_role("button", name="Show attention").click()
    expect(page.locator("#att_sheet img")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("how much the class token attends")).to_be_visible()
    page.get_by_role("button", name="Plot the norms of the current model").click()
    expect(page.locator("#tdln_plot canvas, #tdln_plot svg").first).to_be_visible(timeout=60_000)

    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("button", name="Run both").click()
    expect(page.locator("#cmp_status")).to_contain_text("baseline", timeout=120_000)
    expect(page.locator("#cmp_sheet img")).to_be_visible()
