"""The app in a real browser (Debian chromium, headless, through Playwright): generate, watch the
final step arrive, check the branch panels, scrub, use step mode, export a GIF, take a screenshot."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import ROOT

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


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium is installed by `make test` (.ci/run); not on this machine"
)
def test_browser_flow(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shot = Path(os.environ.get("MRDIT_SCREENSHOT", tmp_path / "screenshot.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(server)
        page.get_by_role("button", name="Generate").click()
        status = page.locator("#status")
        expect(status).to_contain_text("done", timeout=120_000)
        expect(status).to_contain_text("step 25 / 25")
        panels = page.locator("#panels img")
        expect(panels).to_be_visible()
        assert panels.evaluate("img => img.naturalWidth") >= 6 * app.DISPLAY  # x_t + 3 branches + 2 additions
        assert page.locator("#final img").count() >= 4

        # scrub the trajectory with the step slider (keyboard on its range input)
        slider = page.locator("input[type=range]").last
        slider.focus()
        for _ in range(5):
            slider.press("ArrowLeft")
        expect(status).to_contain_text("step 20 / 25", timeout=20_000)
        page.screenshot(path=str(shot), full_page=True)

        # step mode: one solver update per click
        page.get_by_role("button", name="Start step mode").click()
        expect(status).to_contain_text("Step mode ready", timeout=20_000)
        nxt = page.get_by_role("button", name="Next step")
        nxt.click()
        expect(status).to_contain_text("step 1 / 25", timeout=20_000)
        nxt.click()
        expect(status).to_contain_text("step 2 / 25", timeout=20_000)

        # export the trajectory as a GIF
        page.get_by_role("button", name="Export trajectory as GIF").click()
        expect(page.get_by_text(".gif").first).to_be_visible(timeout=60_000)
        browser.close()
    assert shot.stat().st_size > 10_000
