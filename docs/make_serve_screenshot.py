"""Remake docs/serve-ui.png: `mochi serve` with the embedded model, one generation in headless Chromium.

    python docs/make_serve_screenshot.py [--out docs/serve-ui.png] [--prompt "a red circle moving right"]

Needs the dev extra (playwright) and Debian's chromium, as tests/test_serve_ui.py does. The server runs as
the real `mochi serve` command in a subprocess, on a free loopback port.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
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
    args = parser.parse_args()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [shutil.which("mochi") or "mochi", "serve", "--port", str(port), "--out-dir", "/tmp/mochi-serve-shot"]
    )
    try:
        wait_until_up(url, server)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(120_000)
            page.goto(url + "/")
            page.fill("#prompt", args.prompt)
            page.fill("#seed", args.seed)
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
            page.wait_for_function(
                "(() => { const v = document.getElementById('video');"
                " return v.readyState >= 2 && v.currentTime > 0.4; })()"
            )
            page.evaluate("(() => { const v = document.getElementById('video'); v.pause(); })()")
            page.wait_for_function(
                "document.querySelector('#history tr td:nth-child(2)')?.textContent === 'done'"
            )
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
