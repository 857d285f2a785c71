"""`mochi serve`'s web UI in headless Chromium (Debian's package) driven by Playwright, on a loopback server.

Set MOCHI_SERVE_SCREENSHOT=PATH to also save the page after a generation there (with the random test model;
docs/serve-ui.png, with the embedded model, comes from docs/make_serve_screenshot.py).
"""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra (fastapi, uvicorn)")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")

from mochi.pipeline import MochiPipeline  # noqa: E402
from mochi.weights.lora import save_lora  # noqa: E402

from .serve_harness import LiveServer  # noqa: E402
from .test_lora import random_lora  # noqa: E402
from .test_pipeline import tiny_components  # noqa: E402

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("loras")
    pipe = MochiPipeline(tiny_components(), device="cpu")
    save_lora(random_lora(pipe.components.dit), lora_dir / "watercolour.safetensors")
    (lora_dir / "broken.safetensors").write_bytes(b"")
    with LiveServer(pipe, tmp_path_factory.mktemp("out"), lora_dir=lora_dir) as live:
        yield live


@pytest.fixture(scope="module")
def page(server):
    # Playwright gives the browser a fresh temporary profile; it never downloads a browser of its own here.
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(30_000)
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('frames').placeholder !== ''")
            yield page
        finally:
            browser.close()


def test_generate_shows_progress_then_a_playing_video(page, server):
    assert page.locator("#frames").get_attribute("placeholder") == "7"  # the model's defaults are shown
    page.click("#randomise")
    assert page.input_value("#seed").isdigit()
    page.fill("#seed", "11")
    page.fill("#prompt", "a red circle moving right")
    page.fill("#negative", "blurry")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
    assert page.locator("#status").text_content().endswith("(seed 11)")
    assert page.eval_on_selector("#progress", "p => p.value") == 1
    page.wait_for_function(
        "(() => { const v = document.getElementById('video');"
        " return v.readyState >= 2 && !v.paused && v.currentTime > 0; })()"
    )
    assert page.eval_on_selector("#video", "v => [v.videoWidth, v.videoHeight]") == [32, 32]
    link = page.locator("#download")
    assert link.is_visible() and link.get_attribute("download").startswith("mochi-11-")
    # The history refreshes once more after the video is shown.
    page.wait_for_function("document.querySelector('#history tr td:nth-child(2)')?.textContent === 'done'")
    rows = page.locator("#history tr")
    assert rows.count() == 1
    cells = rows.first.locator("td").all_text_contents()
    assert cells[1:9] == ["done", "a red circle moving right", "11", "7", "32×32", "3", "4", ""]
    (job,) = server.jobs.jobs()
    assert job.request.negative_prompt == "blurry" and job.request.seed == 11
    if path := os.environ.get("MOCHI_SERVE_SCREENSHOT"):
        page.screenshot(path=path, full_page=True)


def generate_and_wait(page) -> None:
    """Click Generate and wait for this job's final status (the status line is blanked first, so that a
    job that ends before the first check is still seen)."""
    page.evaluate("document.getElementById('status').textContent = ''")
    page.click("#generate")
    page.wait_for_function(
        "(() => /^(done|failed|cancelled)/.test(document.getElementById('status').textContent)"
        " && !document.getElementById('generate').disabled)()"
    )


def test_lora_picker_runs_a_lora_and_shows_a_failing_one(page, server):
    options = page.locator("#lora option").all_text_contents()
    assert options == ["none", "broken.safetensors", "watercolour.safetensors"]
    page.fill("#prompt", "a blue square")
    page.select_option("#lora", "watercolour.safetensors")
    page.fill("#lora-scale", "0.5")
    generate_and_wait(page)
    assert page.locator("#status").text_content().startswith("done")
    page.wait_for_function("document.querySelector('#history tr td:nth-child(2)')?.textContent === 'done'")
    lora_cell = page.locator("#history tr").first.locator("td").nth(8)
    assert lora_cell.text_content() == "watercolour.safetensors ×0.5"
    assert server.jobs.jobs()[0].request.loras[0][1] == 0.5

    page.select_option("#lora", "broken.safetensors")
    generate_and_wait(page)
    assert page.locator("#status").text_content() == "failed"
    assert page.locator("#error").text_content().startswith("ValueError: LoRA 'broken.safetensors' cannot")
    page.select_option("#lora", "")


def test_bad_input_shows_the_servers_message(page):
    page.fill("#frames", "8")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.includes('6k+1')")
    assert page.locator("#error").text_content().startswith("422: frames=8 is not of the form 6k+1")
    page.fill("#frames", "")
