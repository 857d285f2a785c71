"""The live queue: every job on the server with its position, progress and ETA, pushed as Server-Sent Events.

``GET /api/events`` is a ``text/event-stream`` that sends a ``queue`` event (the ``GET /api/queue`` snapshot)
at once and again whenever any job changed (``JobManager.version``), at most ``1 / MIN_INTERVAL`` times a
second, and a comment every ``KEEPALIVE`` seconds so that proxies keep the connection open. Every client
sees the same queue, so two tabs (or a tab and a script) follow one set of jobs. Why SSE rather than a
WebSocket: the stream only flows to the client (actions stay plain HTTP calls), it is one long GET that
carries the bearer token like any other, and it needs nothing beyond the HTTP server we already run. The
page reads it with ``fetch`` (``EventSource`` cannot send an ``Authorization`` header).

ETAs are estimates: the running job's from its own seconds per denoising step (plus a decode share), a
queued job's from the seconds per step·token of the server's latest finished job, added up along the queue.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from mochi.serve.errors import documented

if TYPE_CHECKING:
    from mochi.serve.jobs import Job, JobManager

MIN_INTERVAL = 0.2  # seconds between two snapshots of one stream
KEEPALIVE = 15.0
RECENT = 10  # finished jobs a snapshot carries (so that clients see their jobs end)


def _work(job: Job) -> float:
    """Steps × DiT tokens: what a job's run time is about proportional to."""
    r = job.request
    return r.steps * ((r.frames - 1) // 6 + 1) * (r.height // 16) * (r.width // 16)


def estimates(jobs: list[Job], now: float) -> dict[str, float | None]:
    """Seconds until each unfinished job of ``jobs`` (newest first, as ``JobManager.jobs``) should be done."""
    from mochi.serve.jobs import DONE, QUEUED, RUNNING

    rate = None  # seconds per unit of _work, from the latest finished job
    for job in jobs:
        if job.status == DONE and job.seconds:
            rate = sum(job.seconds.values()) / max(_work(job), 1.0)
            break
    out: dict[str, float | None] = {}
    ahead: float | None = 0.0
    for job in sorted((j for j in jobs if j.status == RUNNING), key=lambda j: j.started or 0):
        remaining = None
        if job.stage == "denoise" and job.step >= 1 and job.stage_started is not None:
            per_step = (now - job.stage_started) / job.step
            remaining = per_step * (job.total - job.step) * 1.1  # the decode takes about a tenth more
        elif rate is not None:
            remaining = max(rate * _work(job) - (now - (job.started or now)), 0.0)
        out[job.id] = None if remaining is None else round(remaining, 1)
        ahead = None if remaining is None or ahead is None else ahead + remaining
    for job in sorted((j for j in jobs if j.status == QUEUED), key=lambda j: j.created):
        ahead = None if rate is None or ahead is None else ahead + rate * _work(job)
        out[job.id] = None if ahead is None else round(ahead, 1)
    return out


def snapshot(jobs: JobManager) -> dict:
    """Every unfinished job (running first, then the queue in order) and the ``RECENT`` latest finished
    ones, each as ``GET /api/jobs/{id}`` gives it plus ``eta`` (seconds, or null when unknown)."""
    from mochi.serve.jobs import FINAL

    version = jobs.version
    table = jobs.jobs()
    now = time.time()
    eta = estimates(table, now)
    active = [j for j in table if j.status not in FINAL]
    active.sort(key=lambda j: (j.status != "running", j.created))
    # The latest to finish (a job cancelled last, though created first, is one): a client following its own
    # job sees it end.
    finished = sorted((j for j in table if j.status in FINAL), key=lambda j: j.finished or 0, reverse=True)
    finished = finished[:RECENT]
    out = []
    for job in active + finished:
        summary = jobs.summary(job)
        summary["eta"] = eta.get(job.id)
        out.append(summary)
    return {"version": version, "time": now, "jobs": out}


def add_routes(app: Any, jobs: JobManager, auth: list) -> None:
    @app.get("/api/queue", dependencies=auth, responses=documented(400, 401), tags=["queue"])
    def queue() -> dict:
        """The live queue once: ``{"version", "time", "jobs": [...]}`` (running, queued in order, then the
        latest finished), each job with ``eta`` in seconds."""
        return snapshot(jobs)

    @app.get(
        "/api/events",
        dependencies=auth,
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, **documented(400, 401)},
        tags=["queue"],
    )
    async def events(request: Request) -> StreamingResponse:
        """Server-Sent Events: ``event: queue`` with the ``GET /api/queue`` snapshot as ``data``, sent at
        once and after every change to any job; ``: keep-alive`` comments in between."""

        async def stream():  # noqa: ANN202 - an async iterator of str
            sent, quiet = -1, 0.0
            while not await request.is_disconnected() and not jobs.stopping:
                if jobs.version != sent:
                    state = snapshot(jobs)
                    sent, quiet = state["version"], 0.0
                    yield f"event: queue\nid: {sent}\ndata: {json.dumps(state)}\n\n"
                elif quiet >= KEEPALIVE:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(MIN_INTERVAL)
                quiet += MIN_INTERVAL

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
