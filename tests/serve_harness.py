"""A real `mochi serve` app on 127.0.0.1 for the serve tests: uvicorn in a thread, the tiny random pipeline.

``GatedPipeline`` wraps the pipeline so that a test can hold a job at its first denoising step (to see it
running, cancel it, or fill the queue behind it) and make a prompt fail on purpose.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
import uvicorn

from mochi.serve.api import create_app
from mochi.serve.jobs import JobManager

FAIL_PROMPT = "raise an error please"
OOM_PROMPT = "run out of memory please"


class GatedPipeline:
    """Delegates to a pipeline; while ``gate`` is clear, a job waits (≤ 60 s) after denoising step 1.

    The bound only keeps a broken test from hanging: a test holding a job for a few seconds took over 20 on a
    loaded 2-core machine (the web-UI tests drive a browser meanwhile), and the job it held ran on."""

    def __init__(self, pipe: object) -> None:
        self.pipe = pipe
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.pipe, name)

    def generate(self, request, progress=None, init_frames=None, denoised=None):  # noqa: ANN001, ANN201
        if request.prompt == FAIL_PROMPT:
            raise RuntimeError("synthetic failure for the test")
        if request.prompt == OOM_PROMPT:
            torch.empty(10**15, dtype=torch.uint8)  # the CPU allocator's real failure, at once

        def report(stage: str, done: int, total: int) -> None:
            progress(stage, done, total)
            if stage == "denoise" and done == 1:
                self.entered.set()
                self.gate.wait(60)

        return self.pipe.generate(request, progress=report, init_frames=init_frames, denoised=denoised)


class AppServer:
    """uvicorn serving ``app`` on a free loopback port, in a thread, for the life of a ``with`` block."""

    def __init__(self, app: object, **config: object) -> None:
        self.app = app
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        options = {"log_level": "warning", "lifespan": "off", "timeout_graceful_shutdown": 2, **config}
        config = uvicorn.Config(app, **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> AppServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class LiveServer(AppServer):
    """``AppServer`` for ``create_app(JobManager(pipeline, out_dir, ...))``; closes the manager on exit."""

    def __init__(self, pipeline: object, out_dir: Path, *, token: str | None = None, **options: object):
        lora_dir = options.pop("lora_dir", None)
        self.jobs = JobManager(pipeline, out_dir, **options)
        super().__init__(create_app(self.jobs, token=token, lora_dir=lora_dir))

    def __exit__(self, *exc: object) -> None:
        self.jobs.close(timeout=5)
        super().__exit__(*exc)


def call(
    method: str,
    url: str,
    body: object = None,
    *,
    token: str | None = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, dict, bytes]:
    """One HTTP request → (status, headers, body bytes); error statuses are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None or method in ("POST", "PUT", "PATCH"):  # the server refuses them otherwise (415)
        request.add_header("Content-Type", content_type)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def call_json(method: str, url: str, body: object = None, **kw: object) -> tuple[int, object]:
    status, _, data = call(method, url, body, **kw)
    return status, json.loads(data)


def wait_for(url: str, job_id: str, statuses: tuple[str, ...], *, timeout: float = 30, **kw: object) -> dict:
    """Poll a job every 50 ms until its status is one of ``statuses`` (at most ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        status, job = call_json("GET", f"{url}/api/jobs/{job_id}", **kw)
        assert status == 200, job
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s, expected {statuses}")


def settle(live: LiveServer) -> None:
    """Leave no job behind for the next test: cancel what is queued or running, wait for the worker."""
    for job in live.jobs.jobs():
        live.jobs.cancel(job.id)
    for job in live.jobs.jobs():
        wait_for(live.url, job.id, ("done", "failed", "cancelled"))
