"""`mochi serve`'s web UI in headless Chromium (Debian's package) driven by Playwright, on a loopback server.

Set MOCHI_SERVE_SCREENSHOT=PATH to also save the page after a generation there (with the random test model;
docs/serve-ui.png, with the embedded model, comes from docs/make_serve_screenshot.py).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra (fastapi, uvicorn)")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")

from mochi.pipeline import MochiPipeline  # noqa: E402
from mochi.serve.jobs import FINAL  # noqa: E402
from mochi.video import write_video  # noqa: E402
from mochi.weights.lora import save_lora  # noqa: E402

from .serve_harness import GatedPipeline, LiveServer  # noqa: E402
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
    pipe = GatedPipeline(MochiPipeline(tiny_components(), device="cpu"))
    save_lora(random_lora(pipe.components.dit), lora_dir / "watercolour.safetensors")
    (lora_dir / "broken.safetensors").write_bytes(b"")
    with LiveServer(pipe, tmp_path_factory.mktemp("out"), lora_dir=lora_dir) as live:
        yield live


@pytest.fixture(scope="module")
def context(server):
    # Playwright gives the browser a fresh temporary profile; it never downloads a browser of its own here.
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
            yield context
        finally:
            browser.close()


def open_tab(context, server):
    """A new tab on the page, once it has loaded the server's info and opened its event stream."""
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('frames').placeholder !== ''")
    page.wait_for_function("document.getElementById('live').textContent.includes('live')")
    return page


@pytest.fixture(scope="module")
def page(context, server):
    return open_tab(context, server)


@pytest.fixture
def tab(context, server):
    """A fresh tab for one test (its own session storage), with no job of another test left running."""
    server.jobs.pipeline.gate.set()
    page = open_tab(context, server)
    yield page
    page.close()
    server.jobs.pipeline.gate.set()
    for job in server.jobs.jobs():
        server.jobs.cancel(job.id)
    # A cancelled job that is running ends at its next step: a test starting before then found it running
    # and its own jobs one place later in the queue than it expected.
    deadline = time.monotonic() + 20
    while any(j.status not in FINAL for j in server.jobs.jobs()) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_generate_shows_progress_then_a_playing_video(page, server):
    assert page.locator("#frames").get_attribute("placeholder") == "7"  # the model's defaults are shown
    assert page.locator("#eta").get_attribute("placeholder") == "0"  # its defaults name no eta: Euler
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
    # The newest history row must be this job's (an earlier test's finished job may be on top until the
    # history refreshes).
    page.wait_for_function(
        "(() => { const r = document.querySelector('#history tr');"
        " return r?.children[1]?.textContent === 'done'"
        " && r.children[2].textContent === 'a blue square'; })()"
    )
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


def status(page) -> str:
    return page.locator("#status").text_content()


def wait_status(page, start: str) -> None:
    page.wait_for_function(f"document.getElementById('status').textContent.startsWith({start!r})")


def until(page, condition, seconds: float = 20) -> None:
    """Wait (polling every 50 ms, at most ``seconds``) until ``condition()`` holds on the server's side."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        page.wait_for_timeout(50)
    raise AssertionError("the condition never held")


def hold(server, page, prompt: str) -> None:
    """Generate from ``page`` with the worker held after the first denoising step."""
    server.jobs.pipeline.gate.clear()
    server.jobs.pipeline.entered.clear()
    page.fill("#prompt", prompt)
    page.click("#generate")
    assert server.jobs.pipeline.entered.wait(20)


def test_reload_mid_job_reattaches_and_shows_the_preview(tab, server):
    hold(server, tab, "a job to come back to")
    wait_status(tab, "denoising 1/3")
    # The preview of step 1: two latent frames of 4×4 side by side.
    tab.wait_for_function(
        "(() => { const i = document.getElementById('preview'); return !i.hidden && i.naturalWidth; })()"
    )
    assert tab.eval_on_selector("#preview", "i => [i.naturalWidth, i.naturalHeight]") == [9, 4]
    assert tab.locator("#shown").text_content().startswith("preview, step 1:")
    tab.reload()
    tab.wait_for_function("document.getElementById('frames').placeholder !== ''")
    wait_status(tab, "denoising 1/3")  # the page took its running job up again
    assert not tab.locator("#cancel").is_disabled()
    tab.wait_for_function(
        "(() => { const i = document.getElementById('preview'); return !i.hidden && i.naturalWidth; })()"
    )
    server.jobs.pipeline.gate.set()
    wait_status(tab, "done")
    tab.wait_for_function(
        "(() => { const v = document.getElementById('video'); return !v.hidden && v.readyState >= 2; })()"
    )
    assert tab.locator("#preview").is_hidden()


def test_the_queue_stays_put_while_the_preview_and_the_video_come_and_go(tab, server):
    """The preview and the video sized the box above the queue (an empty player 120 px high, a preview as
    high as its shape made it at full width): the table jumped when a preview arrived or a video replaced
    it, and a click on a queue button landed beside it when that happened under the pointer."""

    def queue_top() -> float:
        return tab.evaluate("document.getElementById('queue').getBoundingClientRect().top")

    empty = queue_top()
    hold(server, tab, "a job whose preview arrives " + "and a long prompt " * 12)
    tab.wait_for_function(
        "(() => { const i = document.getElementById('preview');"
        " return !i.hidden && i.complete && i.naturalWidth; })()"
    )
    assert tab.locator("#shown").text_content().startswith("preview, step 1:")
    assert queue_top() == empty
    server.jobs.pipeline.gate.set()
    wait_status(tab, "done")
    tab.wait_for_function(
        "(() => { const v = document.getElementById('video'); return !v.hidden && v.readyState >= 2; })()"
    )
    assert not tab.locator("#download").is_hidden()
    assert queue_top() == empty


def test_a_job_followed_while_the_queue_stands_still_gets_its_buttons_at_once(tab, server):
    """A row's buttons depend on whether the page follows its job, but were made again only at the next
    queue snapshot: when the snapshot with a new job came before the page's submission returned and the
    queue then stood still (the worker held), the row kept a "follow" button for the job the page followed
    (the wait for it timed out in a loaded full run)."""

    def after_the_snapshot(route):  # the reply reaches the page a second after the job is on the server
        if route.request.method != "POST":
            route.continue_()
            return
        response = route.fetch()
        time.sleep(1)
        route.fulfill(response=response)

    hold(server, tab, "runs on")
    wait_status(tab, "denoising 1/3")
    tab.route("**/api/jobs", after_the_snapshot)
    try:
        tab.fill("#prompt", "followed late")
        tab.click("#generate")
        until(tab, lambda: any(j.status == "queued" for j in server.jobs.jobs()))
        job = next(j for j in server.jobs.jobs() if j.status == "queued")
        row = f"#queue tr[data-id='{job.id}']"
        tab.wait_for_function(
            f'document.querySelector("{row}")?.dataset.offer === "queued true"', timeout=10_000
        )
        assert tab.locator(f"{row} button").all_text_contents() == ["cancel", "reuse", "seed"]
        assert "mine" in tab.get_attribute(row, "class")  # marked as this tab's job in the same redraw
        # The running job, no longer followed, offers "follow" again.
        running = next(j for j in server.jobs.jobs() if j.status == "running")
        buttons = tab.locator(f"#queue tr[data-id='{running.id}'] button").all_text_contents()
        assert buttons == ["cancel", "follow", "reuse", "seed"]
    finally:
        tab.unroute("**/api/jobs")


def test_two_tabs_see_one_queue_and_either_cancels(tab, context, server):
    hold(server, tab, "a job both tabs see")
    other = open_tab(context, server)
    try:
        (job,) = [j for j in server.jobs.jobs() if j.status == "running"]
        row = f"#queue tr[data-id='{job.id}']"
        for page in (tab, other):
            page.wait_for_selector(row)
            page.wait_for_function(f"document.querySelector(\"{row} td\")?.textContent === 'running'")
            assert page.locator(f"{row} td.prompt").text_content() == "a job both tabs see"
        other.click(f"{row} button:text('cancel')")
        server.jobs.pipeline.gate.set()  # the held job then stops at its next step
        wait_status(tab, "cancelled")
        tab.wait_for_function(f"document.querySelector(\"{row} td\")?.textContent === 'cancelled'")
        # The history refreshes itself and shows the job as it ended.
        cell = f"#history tr[data-id='{job.id}'] td:nth-child(2)"
        tab.wait_for_function(f"document.querySelector(\"{cell}\")?.textContent === 'cancelled'")
    finally:
        other.close()


def test_double_click_starts_one_job_and_cancel_stops_the_one_shown(tab, server):
    before = len(server.jobs.jobs())
    hold(server, tab, "first")
    tab.fill("#prompt", "second")
    tab.dblclick("#generate")
    # The button is enabled again once the reply is in and the page follows the new job. Until then the
    # status may still be the first job's own "queued (position 1" (its reply can predate the worker), and
    # Cancel would stop that one.
    tab.wait_for_function("!document.getElementById('generate').disabled")
    wait_status(tab, "queued (position 1")
    jobs = server.jobs.jobs()
    assert len(jobs) == before + 2 and [j.request.prompt for j in jobs[:2]] == ["second", "first"]
    tab.click("#cancel")
    row = f"#queue tr[data-id='{jobs[0].id}'] td"
    # The row appears with the first snapshot that holds the job, which may come after the reply.
    tab.wait_for_function(f"document.querySelector(\"{row}\")?.textContent === 'cancelled'")
    assert jobs[0].status == "cancelled" and jobs[1].status == "running"
    wait_status(tab, "denoising 1/3")  # the page goes on to follow this tab's other job


def test_numbers_that_are_not_whole_are_refused(tab, server):
    before = len(server.jobs.jobs())
    tab.fill("#prompt", "anything")
    cases = [("frames", "16.5", "17"), ("seed", "1.9", "2"), ("seed", "1e3", "1000"), ("steps", "2.0", "2")]
    for field, text, nearest in [*cases, ("count", "2.5", "3")]:
        tab.evaluate("document.getElementById('error').textContent = ''")
        tab.fill(f"#{field}", text)
        tab.click("#generate")
        name = "videos" if field == "count" else field
        expected = f"{name}: {text} is not a whole number; give digits only, e.g. {nearest}"
        tab.wait_for_function(f"document.getElementById('error').textContent === {expected!r}")
        tab.fill(f"#{field}", "1" if field == "count" else "")
    assert len(server.jobs.jobs()) == before


def test_a_negative_prompt_of_only_whitespace_is_sent_as_none(tab, server):
    # A stray newline in the box cannot be seen; at guidance 1 the server refuses any negative text (422).
    seen = {j.id for j in server.jobs.jobs()}

    def new_job():  # noqa: ANN202
        (job,) = [j for j in server.jobs.jobs() if j.id not in seen]
        seen.add(job.id)
        return job

    tab.fill("#prompt", "a red circle moving right")
    tab.fill("#negative", "\n  ")
    tab.fill("#guidance", "1")
    generate_and_wait(tab)
    assert tab.locator("#status").text_content().startswith("done")
    job = new_job()
    assert job.request.negative_prompt == "" and job.request.guidance == 1.0
    tab.fill("#negative", " blurry ")  # text is sent as typed, spaces included
    tab.fill("#guidance", "2")
    generate_and_wait(tab)
    assert new_job().request.negative_prompt == " blurry "


def test_the_greyed_eta_follows_the_step_cache(tab):
    """A cached request runs Euler unless it names η; the page still showed the model's η greyed."""
    tab.evaluate("info.defaults.eta = 1; info.defaults.eta_above = 0.3; etaPlaceholders()")  # the embedded's
    placeholders = "['eta', 'eta-above'].map((id) => document.getElementById(id).placeholder)"
    assert tab.evaluate(placeholders) == ["1", "0.3"]
    tab.select_option("#cache", "teacache:fast")
    assert tab.evaluate(placeholders) == ["0", "0"]
    tab.fill("#eta", "0.5")  # a cached request naming η keeps the model's σ bound (as resolved does)
    assert tab.evaluate(placeholders)[1] == "0.3"
    tab.fill("#eta", "")
    assert tab.evaluate(placeholders) == ["0", "0"]
    tab.select_option("#cache", "none")
    assert tab.evaluate(placeholders) == ["1", "0.3"]


def test_long_prompt_warns_while_typing_and_ctrl_enter_generates(tab, server):
    tab.fill("#prompt", "a red circle")
    tab.wait_for_function("document.getElementById('tokens').textContent === '13 / 256 tokens'")
    tab.fill("#prompt", "a red circle moving right " * 12)
    tab.wait_for_function("document.getElementById('tokens').className === 'over'")
    assert (
        tab.locator("#tokens").text_content()
        == "313 tokens: the text encoder reads 256, the last 57 are ignored"
    )
    tab.fill("#seed", "8")
    tab.focus("#prompt")
    tab.keyboard.press("Control+Enter")
    wait_status(tab, "done")
    assert "the last 57 tokens are ignored" in tab.locator("#error").text_content()
    assert server.jobs.jobs()[0].request.seed == 8


def submit_batch(page, server, prompt: str, seed: int, steps: int) -> list:
    """Generate two videos from ``page``; the server's two new jobs, newest first."""
    page.fill("#prompt", prompt)
    page.fill("#seed", str(seed))
    page.fill("#steps", str(steps))
    page.fill("#count", "2")
    before = len(server.jobs.jobs())
    page.click("#generate")
    until(page, lambda: len(server.jobs.jobs()) == before + 2)
    return server.jobs.jobs()[:2]


def test_batch_then_reuse_parameters_and_copy_seed(tab, server):
    tab.fill("#eta", "1")
    tab.fill("#eta-above", "0.3")
    jobs = submit_batch(tab, server, "a green square moving up", seed=20, steps=2)
    assert [j.request.seed for j in jobs] == [21, 20] and {j.request.steps for j in jobs} == {2}
    assert {(j.request.eta, j.request.eta_above) for j in jobs} == {(1.0, 0.3)}
    # The page follows the batch to its end: the second job after the first.
    tab.wait_for_function("document.getElementById('status').textContent.endsWith('(seed 21)')")
    tab.wait_for_function("document.querySelectorAll('#history tr').length >= 2")
    first = tab.locator(f"#history tr[data-id='{jobs[1].id}']")
    for field in ("prompt", "seed", "steps", "eta", "eta-above"):
        tab.fill(f"#{field}", "")
    tab.fill("#count", "1")
    first.locator("button:text('reuse')").click()
    assert tab.input_value("#prompt") == "a green square moving up"
    assert tab.input_value("#seed") == "20" and tab.input_value("#steps") == "2"
    assert tab.input_value("#eta") == "1" and tab.input_value("#eta-above") == "0.3"
    for field in ("eta", "eta-above"):  # the tab is shared: later tests sample with Euler
        tab.fill(f"#{field}", "")
    first.locator("button:text('seed')").click()
    wait_status(tab, "seed 20 copied")
    assert tab.evaluate("navigator.clipboard.readText()") == "20"


def test_reuse_keeps_an_euler_jobs_eta_0(tab, server):
    """A job that ran the Euler sampler refills η with 0, not a blank: on a model whose default is the
    ancestral sampler (the embedded one), a blank would run that instead."""
    jobs = submit_batch(tab, server, "a red circle moving left", seed=30, steps=2)
    assert {(j.request.eta, j.request.eta_above) for j in jobs} == {(0.0, 0.0)}
    tab.fill("#count", "1")
    tab.fill("#seed", "")  # so that a reuse that did not happen cannot pass for one
    # Both jobs done and shown so (a "show" button): the history no longer re-renders under the click.
    for job in jobs:
        tab.wait_for_selector(f"#history tr[data-id='{job.id}'] button:text('show')")
    tab.locator(f"#history tr[data-id='{jobs[1].id}'] button:text('reuse')").click()
    assert tab.input_value("#seed") == "30"
    assert tab.input_value("#eta") == "0" and tab.input_value("#eta-above") == "0"
    for field in ("eta", "eta-above"):  # the tab is shared
        tab.fill(f"#{field}", "")


def test_a_batch_job_that_ends_while_the_page_shows_the_one_before_is_still_shown(tab, server):
    # The page fetches the first job's video while the second runs; hold that download until the second has
    # ended on the server, so that the page, when it comes to the second, finds it already done.
    def when_second_done(route):
        second = server.jobs.jobs()[0]
        for _ in range(400):  # the page's own waits cannot run inside a route handler: poll the server
            if second.status == "done":
                break
            time.sleep(0.05)
        time.sleep(1)  # and the page has had the snapshot that says so
        route.continue_()

    tab.route("**/api/jobs/*/video", when_second_done)
    try:
        submit_batch(tab, server, "a batch that outruns the page", seed=30, steps=1)
        tab.wait_for_function("document.getElementById('status').textContent.endsWith('(seed 31)')")
        assert [j.status for j in server.jobs.jobs()[:2]] == ["done", "done"]
    finally:
        tab.unroute("**/api/jobs/*/video")
        tab.fill("#count", "1")


def test_two_loras_and_video_to_video_from_the_page(tab, server, tmp_path):
    clip = torch.randint(
        0, 256, (9, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    tab.set_input_files("#init-video", str(write_video(clip, tmp_path / "source.mp4")))
    tab.wait_for_function("document.getElementById('upload').textContent === 'source clip: 9 frames, 32×32'")
    tab.fill("#strength", "0.6")
    tab.fill("#prompt", "restyled")
    tab.select_option("#lora", "watercolour.safetensors")
    tab.fill("#lora-scale", "0.5")
    tab.click("#add-lora")
    tab.select_option("#lora-1", "watercolour.safetensors")
    tab.fill("#lora-scale-1", "0.25")
    tab.click("#generate")
    wait_status(tab, "done")
    job = server.jobs.jobs()[0]
    assert job.lora_names == ("watercolour.safetensors",) * 2 and [s for _, s in job.request.loras] == [
        0.5,
        0.25,
    ]
    assert job.request.strength == 0.6 and job.init_video is not None
    row = tab.locator(f"#history tr[data-id='{job.id}'] td").nth(8)
    tab.wait_for_function(f"document.querySelector(\"#history tr[data-id='{job.id}']\") !== null")
    assert row.text_content() == "watercolour.safetensors ×0.5, watercolour.safetensors ×0.25, v2v 0.6"


def test_lora_rows_keep_their_own_names_and_scales_after_a_removal(tab):
    """Rows added after a removal get ids of their own, and each row's scale is read from that row."""
    tab.click("#add-lora")
    tab.click("#add-lora")
    rows = tab.locator("#loras .lora-row")
    rows.nth(1).locator("button:text('×')").click()
    tab.click("#add-lora")
    assert rows.count() == 3
    choices = [
        ("watercolour.safetensors", "1"),
        ("broken.safetensors", "0.5"),
        ("watercolour.safetensors", "-3"),
    ]
    for i, (name, scale) in enumerate(choices):
        rows.nth(i).locator("select").select_option(name)
        rows.nth(i).locator("input").fill(scale)
    assert tab.evaluate("body().loras") == [{"name": n, "scale": float(s)} for n, s in choices]
    ids = tab.evaluate("[...document.querySelectorAll('#loras [id]')].map((e) => e.id)")
    assert len(ids) == len(set(ids)) == 6


BIG_SEED = 2**53 + 1  # 9007199254740993: a JavaScript number would read it as 2**53


def test_a_seed_above_2_53_is_sent_shown_reused_and_copied_exactly(tab, server):
    tab.fill("#prompt", "a seed past the safe integers")
    tab.fill("#seed", str(BIG_SEED))
    tab.fill("#steps", "1")
    generate_and_wait(tab)
    job = server.jobs.jobs()[0]
    assert job.request.seed == BIG_SEED
    assert status(tab).endswith(f"(seed {BIG_SEED})")
    tab.wait_for_function("!document.getElementById('download').hidden")  # once the video is fetched
    assert tab.locator("#download").get_attribute("download") == f"mochi-{BIG_SEED}-{job.id}.mp4"
    row = f"#history tr[data-id='{job.id}']"
    tab.wait_for_selector(row)
    assert tab.locator(f"{row} td").nth(3).text_content() == str(BIG_SEED)
    tab.fill("#seed", "")
    tab.locator(f"{row} button:text('reuse')").click()
    assert tab.input_value("#seed") == str(BIG_SEED)
    assert tab.evaluate("body().seed") == str(BIG_SEED)  # sent as a JSON string of its digits
    tab.locator(f"{row} button:text('seed')").click()
    wait_status(tab, f"seed {BIG_SEED} copied")
    assert tab.evaluate("navigator.clipboard.readText()") == str(BIG_SEED)
    # A browser that cannot read a big seed exactly (it holds the rounded number) refuses it, visibly.
    tab.evaluate("fill({ prompt: 'rounded', seed: 2 ** 53 + 2 })")
    assert tab.input_value("#seed") == ""
    assert "too large for this browser to read exactly" in tab.locator("#notes").text_content()
    tab.evaluate("copySeed(2 ** 53 + 2)")
    assert "not copied" in status(tab)
    # Past the API's largest seed: refused with the limit, nothing submitted.
    before = len(server.jobs.jobs())
    tab.fill("#seed", str(2**63))
    tab.click("#generate")
    expected = f"seed: {2**63} is above the largest seed, 2**63-1 = {2**63 - 1}"
    tab.wait_for_function(f"document.getElementById('error').textContent === {expected!r}")
    assert len(server.jobs.jobs()) == before


def test_reuse_restores_the_step_cache_or_says_it_could_not(tab, server):
    tab.fill("#prompt", "a cached job")
    tab.fill("#steps", "2")
    tab.select_option("#cache", "fbcache:3x")
    generate_and_wait(tab)
    job = server.jobs.jobs()[0]
    assert (job.request.cache, job.request.cache_threshold) == ("fbcache,extrapolate", 0.2)
    row = f"#history tr[data-id='{job.id}']"
    tab.wait_for_selector(row)
    tab.select_option("#cache", "none")
    tab.locator(f"{row} button:text('reuse')").click()
    assert tab.input_value("#cache") == "fbcache:3x"
    assert tab.locator("#notes").text_content() == ""
    cases = [
        ("'teacache', 0.09", "teacache:fast"),
        ("'teacache,max-skips=3,keep=0.85-0.975,extrapolate=0.5', 0.15", "teacache:2x"),
        ("'none', null", "none"),
    ]
    for args, option in cases:
        tab.select_option("#cache", "fbcache:quality")
        tab.evaluate(
            f"(([cache, cache_threshold]) => fill({{ prompt: 'p', cache, cache_threshold }}))([{args}])"
        )
        assert tab.input_value("#cache") == option
        assert tab.locator("#notes").text_content() == ""
    tab.select_option("#cache", "fbcache:quality")
    tab.evaluate("fill({ prompt: 'p', cache: 'teacache', cache_threshold: 0.12 })")
    assert tab.input_value("#cache") == "none"
    notes = tab.locator("#notes")
    assert notes.is_visible() and "step cache teacache (threshold 0.12)" in notes.text_content()


def test_reuse_names_a_lora_the_server_does_not_have(tab):
    tab.evaluate(
        "fill({ prompt: 'p', loras: [{ name: 'gone.safetensors', scale: 0.5 },"
        " { name: 'watercolour.safetensors', scale: 0.25 }] })"
    )
    notes = tab.locator("#notes")
    assert notes.is_visible() and "gone.safetensors" in notes.text_content()
    assert "watercolour" not in notes.text_content()
    assert tab.evaluate("body().loras") == [{"name": "watercolour.safetensors", "scale": 0.25}]
    tab.evaluate("fill({ prompt: 'p', loras: [] })")
    assert notes.text_content() == "" and not notes.is_visible()


def test_reuse_resets_the_count_and_a_reused_source_clip_can_be_dropped(tab):
    tab.fill("#count", "3")
    tab.evaluate("fill({ prompt: 'p', init_video: 'abc123', strength: 0.5 })")
    assert tab.input_value("#count") == "1"
    assert tab.locator("#upload").text_content() == "source clip: upload abc123"
    assert tab.evaluate("body().init_video") == "abc123"
    tab.click("#clear-upload")
    assert tab.locator("#upload").text_content() == ""
    assert tab.locator("#clear-upload").is_hidden()
    assert tab.evaluate("'init_video' in body()") is False


def test_a_server_without_lora_files_shows_no_lora_picker(context, server):
    def no_loras(route):
        response = route.fetch()
        route.fulfill(response=response, json={**response.json(), "loras": []})

    page = context.new_page()
    try:
        page.route("**/api/info", no_loras)
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('frames').placeholder !== ''")
        assert page.locator("#lora").is_hidden() and page.locator("#add-lora").is_hidden()
        assert page.evaluate("'loras' in body()") is False
    finally:
        page.close()


def test_the_pages_cache_presets_match_the_library(page):
    """Reuse maps a job's resolved cache (kind and options, threshold) back to a preset with the page's own
    table; it must say what mochi.accel.cache resolves each of the select's presets to."""
    from mochi.accel.cache import PRESETS, CacheSetting

    options = page.evaluate("[...document.getElementById('cache').options].map((o) => o.value)")
    assert options == ["none", *PRESETS]
    table = page.evaluate("CACHE_PRESETS")
    resolved = {name: CacheSetting.parse(name) for name in PRESETS}
    assert table == {name: [s.spec, s.threshold] for name, s in resolved.items()}


def test_an_error_stays_shown_while_the_page_follows_a_running_job(tab, server):
    """The followed job's state rewrote #error at every queue update (a refused submission's message went)."""
    hold(server, tab, "a long job")
    wait_status(tab, "denoising 1/3")
    tab.fill("#frames", "10")
    tab.click("#generate")
    tab.wait_for_function("document.getElementById('error').textContent.includes('frames=10')")
    server.jobs.pipeline.gate.set()  # the job goes on: queue updates for every step, then done
    wait_status(tab, "done")
    assert "frames=10" in tab.locator("#error").text_content()


def test_uploads_the_page_drops_are_deleted_and_a_failed_one_is_unselected(tab, server, tmp_path):
    uploads = server.jobs.out_dir / "uploads"
    clip = torch.zeros((7, 16, 16, 3), dtype=torch.uint8)
    tab.set_input_files("#init-video", str(write_video(clip, tmp_path / "a.mp4")))
    tab.wait_for_function("document.getElementById('upload').textContent.startsWith('source clip: 7 frames')")
    first = tab.evaluate("uploadId")
    assert (uploads / first).is_file()
    # Another clip replaces it: the first is deleted on the server (it was left behind).
    tab.set_input_files("#init-video", str(write_video(clip[:1], tmp_path / "b.mp4")))
    tab.wait_for_function("document.getElementById('upload').textContent.startsWith('source clip: 1 frames')")
    second = tab.evaluate("uploadId")
    until(tab, lambda: not (uploads / first).exists())
    # "no source clip" deletes the second; a clip a submitted job used is kept (for reuse).
    tab.click("#clear-upload")
    until(tab, lambda: not (uploads / second).exists())
    # A file that is not a video: the message stays and the file is unselected (Generate ignored it).
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    tab.set_input_files("#init-video", str(tmp_path / "junk.mp4"))
    tab.wait_for_function("document.getElementById('error').textContent.includes('not a video')")
    assert tab.evaluate("document.getElementById('init-video').value") == ""
    assert not tab.locator("#generate").is_disabled()


def press_on(tab, target, tries: int = 5) -> None:
    """Press the mouse button on ``target`` and hold it. On a loaded machine the page's layout could move
    between the pointer's move and the press (a late preview above the queue), so that the press landed
    beside the button and the click was lost for a reason other than the one tested: retried until the
    press lands on ``target``, each miss released over the header (a click there does nothing)."""
    tab.evaluate(
        "window.pressed = null; if (!window.watching) { window.watching = true;"
        " document.addEventListener('mousedown', (e) => { window.pressed = e.target; }, true);"
        " document.addEventListener('mouseup', (e) => { window.released = e.target; }, true); }"
    )
    for _ in range(tries):
        target.hover()
        tab.mouse.down()
        if target.evaluate("(b) => window.pressed === b"):
            return
        tab.mouse.move(5, 5)
        tab.mouse.up()
    raise AssertionError(f"the press never landed on {target} in {tries} tries")


def release_on(tab, target) -> None:
    """Release the held mouse button over ``target`` wherever it is now, and check that the release landed
    on it (a miss is a layout that moved under the pointer, not a lost click: said so)."""
    box = target.bounding_box()
    tab.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    tab.mouse.up()
    landed = tab.evaluate("window.released && window.released.outerHTML.slice(0, 80)")
    assert target.evaluate("(b) => window.released === b"), f"the release landed on {landed}, not on {target}"


def test_a_slow_click_on_a_queue_button_survives_queue_updates(tab, server):
    """The queue table was rebuilt at every update: a click whose press and release fell on either side of
    a rebuild was lost (3 of 8 at 100 ms)."""
    from .serve_harness import call_json

    hold(server, tab, "runs on")
    wait_status(tab, "denoising 1/3")
    tab.fill("#prompt", "waits")
    tab.click("#generate")
    until(tab, lambda: any(j.status == "queued" for j in server.jobs.jobs()))
    waiting = next(j for j in server.jobs.jobs() if j.status == "queued")
    # The page follows its new job once its submission returns, which rebuilds the row's buttons once: the
    # job is queued on the server before that (a press before it was lost on a loaded machine).
    row = f"#queue tr[data-id='{waiting.id}']"
    tab.wait_for_function(f'document.querySelector("{row}")?.dataset.offer === "queued true"')
    button = tab.locator(f"{row} button", has_text="cancel")
    press_on(tab, button)
    for i in range(2):  # other clients' jobs: queue updates while the button is held
        assert call_json("POST", f"{server.url}/api/jobs", {"prompt": f"other {i}", "steps": 1})[0] == 202
        tab.wait_for_function(f"document.querySelectorAll('#queue tr').length >= {i + 3}")
    release_on(tab, button)
    until(tab, lambda: waiting.status == "cancelled")


def test_a_held_click_survives_another_client_cancelling_a_job_above_it(tab, server):
    """A queued job above the held row, cancelled elsewhere, moves to the finished part of the queue: the
    table moved every row below it (removed and inserted again), and a click held on one was lost."""
    from .serve_harness import call_json

    hold(server, tab, "runs on")
    wait_status(tab, "denoising 1/3")
    status, above = call_json("POST", f"{server.url}/api/jobs", {"prompt": "above", "steps": 1})
    assert status == 202
    tab.fill("#prompt", "held")
    tab.click("#generate")
    until(tab, lambda: sum(j.status == "queued" for j in server.jobs.jobs()) == 2)
    held = next(j for j in server.jobs.jobs() if j.request.prompt == "held")
    row = f"#queue tr[data-id='{held.id}']"
    tab.wait_for_function(f'document.querySelector("{row}")?.dataset.offer === "queued true"')
    press_on(tab, tab.locator(f"{row} button", has_text="cancel"))
    assert call_json("POST", f"{server.url}/api/jobs/{above['id']}/cancel")[0] == 200
    tab.wait_for_function(
        f"document.querySelector(\"#queue tr[data-id='{above['id']}']\").sectionRowIndex === 2"
    )
    release_on(tab, tab.locator(f"{row} button", has_text="cancel"))
    until(tab, lambda: held.status == "cancelled")
