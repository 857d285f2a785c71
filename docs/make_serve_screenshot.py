"""Remake docs/serve-ui.png: `mochi serve` with the embedded model, caught mid-run with its preview showing.

    python docs/make_serve_screenshot.py [--out docs/serve-ui.png] [--prompt "a red circle moving right"]

One quick job runs to the end (so that the history has a row and the queue an ETA to go by), then a batch of
three seeds with more steps is submitted, and the page is taken while the first of them is about halfway
through its denoising, its latent preview in place of the video and the other two queued. Needs the dev extra
(playwright) and Debian's chromium, as tests/test_serve_ui.py does. The server runs as the real `mochi serve`
command in a subprocess, on a free loopback port, writing to a fresh temporary folder.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mochi serve exited with code {server.returncode}")
        try:
            urllib.request.urlopen(url + "/api/health", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mochi serve did not answer at {url} within {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("serve-ui.png"))
    parser.add_argument("--prompt", default="a red circle moving right")
    parser.add_argument("--seed", default="3")
    parser.add_argument("--steps", default="120", help="steps of the batch caught mid-run")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out_dir = tempfile.mkdtemp(prefix="mochi-serve-shot-")
    server = subprocess.Popen(
        [sys.executable, "-m", "mochi", "serve", "--port", str(port), "--out-dir", out_dir]
    )
    try:
        wait_until_up(url, server)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1360, "height": 860})
            page.set_default_timeout(300_000)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('live').textContent.includes('live')")
            page.fill("#prompt", "a yellow triangle moving left on a gray background")
            page.fill("#seed", "7")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
            page.fill("#prompt", args.prompt)
            page.fill("#seed", args.seed)
            page.fill("#steps", args.steps)
            page.fill("#count", "3")
            page.click("#generate")
            half = int(args.steps) // 2
            page.wait_for_function(
                "(() => { const s = document.getElementById('status').textContent;"
                " const m = /denoising (\\d+)\\//.exec(s), i = document.getElementById('preview');"
                f" return m && +m[1] >= {half}"
                " && !i.hidden && i.complete && i.naturalWidth > 0; })()"
            )
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
