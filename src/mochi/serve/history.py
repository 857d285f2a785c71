"""History that survives a restart: finished jobs rebuilt from the ``<id>.json`` sidecars in the out folder.

The sidecars are the record (the job table in memory is a cache of the newest ``history`` jobs): at start
the manager reads the newest back (``restore``), a job older than the table is rebuilt on demand (``load``),
and ``GET /api/history`` pages through the live table and every sidecar on disk together, newest first.
Only names of the server's own form (``secrets.token_urlsafe(12)``: 16 URL-safe characters) are read, so a
client-given id can never name another file. A sidecar that is not a job's (unreadable, foreign) is skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Query

from mochi.request import GenerationRequest
from mochi.serve.errors import documented

if TYPE_CHECKING:
    from mochi.serve.jobs import Job, JobManager

JOB_ID = re.compile(r"[A-Za-z0-9_-]{16}")
PAGE_LIMIT = 200  # most jobs one page returns
NUMBER = (int, float)


def _valid(value: Any, kind: type | tuple[type, ...]) -> bool:
    """Whether ``value`` is of ``kind``, a number never a bool and always finite."""
    finite = not isinstance(value, float) or math.isfinite(value)
    return isinstance(value, kind) and not isinstance(value, bool) and finite


def _field(data: dict, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """``data[key]`` if it is of ``kind`` (see ``_valid``), else TypeError: the file is not a job's sidecar.
    With a ``default``, a missing key or null gives it."""
    value = data[key] if default is ... else data.get(key)
    if value is None and default is not ...:
        return default
    if not _valid(value, kind):
        raise TypeError(f"{key}={value!r:.60} is not a {kind}")
    return value


def job_from_sidecar(data: dict, video: Path) -> Job:
    """A finished job as its sidecar describes it (raises KeyError/TypeError/ValueError if it is not one).

    Every field the job reports is checked for its type: a sidecar read back as it stood (a ``finished``
    that is a string, ``frames`` as "25", a NaN) broke every later snapshot of the queue (a 500, and the
    page's event stream with it), not only that job's."""
    from mochi.serve.jobs import DONE, Job

    values = {k: _field(data, k, int) for k in ("frames", "height", "width", "steps", "seed")}
    values.update(prompt=_field(data, "prompt", str), guidance=_field(data, "guidance", NUMBER))
    times = {k: _field(data, k, NUMBER, None) for k in ("created", "started", "finished")}
    seconds = _field(data, "seconds", dict, {})
    warnings = _field(data, "warnings", list, [])
    if not all(_valid(v, NUMBER) for v in seconds.values()) or not all(_valid(w, str) for w in warnings):
        raise TypeError("seconds are not numbers, or warnings not strings")
    loras = data.get("loras") or (
        [{"name": data["lora"], "scale": data.get("lora_scale")}] if data.get("lora") else []
    )
    request = GenerationRequest(
        **values,
        negative_prompt=_field(data, "negative_prompt", str, ""),
        loras=[(_field(x, "name", str), _field(x, "scale", NUMBER, 1.0)) for x in loras],
        strength=_field(data, "strength", NUMBER, 0.7),
        eta=_field(data, "eta", NUMBER, 0.0),
        eta_above=_field(data, "eta_above", NUMBER, 0.0),
        cache=_field(data, "cache", str, "none"),
        cache_threshold=_field(data, "cache_threshold", NUMBER, None),
    )
    created = float(times["created"] or video.stat().st_mtime)
    job = Job(
        id=str(data["id"]),
        request=request,
        status=DONE,
        created=created,
        started=times["started"],
        finished=times["finished"] or created,
        stage="done",
        step=1,
        total=1,
        fraction=1.0,
        seconds=dict(seconds),
        video=video,
        lora_names=tuple(name for name, _ in request.loras),
        init_video=_field(data, "init_video", str, None),
        tokens=_field(data, "prompt_tokens", int, None),
        warnings=list(warnings),
    )
    job.lora = job.lora_names[0] if job.lora_names else None
    return job


def load(out_dir: Path, job_id: str) -> Job | None:
    """The finished job ``job_id`` from its sidecar, or None (no such job, not an id, not a job's file)."""
    if not JOB_ID.fullmatch(job_id):
        return None
    sidecar, video = out_dir / f"{job_id}.json", out_dir / f"{job_id}.mp4"
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        if data.get("id") != job_id:
            return None
        return job_from_sidecar(data, video)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class Archive:
    """The sidecars of one output folder: (created, id) of each, re-read only when a file changes."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._seen: dict[str, tuple[float, float | None]] = {}  # name -> (mtime, created or None)
        self._lock = threading.Lock()

    def entries(self) -> list[tuple[float, str]]:
        """(created, id) of every job sidecar, newest first."""
        with self._lock:
            current: dict[str, tuple[float, float | None]] = {}
            with os.scandir(self.out_dir) as found:
                for entry in found:
                    if not entry.name.endswith(".json") or not JOB_ID.fullmatch(entry.name[:-5]):
                        continue
                    try:  # a dangling link, or a sidecar deleted since the scan, is no job's
                        mtime = entry.stat().st_mtime
                    except OSError:
                        continue
                    known = self._seen.get(entry.name)
                    if known is not None and known[0] == mtime:
                        current[entry.name] = known
                        continue
                    job = load(self.out_dir, entry.name[:-5])
                    current[entry.name] = (mtime, None if job is None else job.created)
            self._seen = current
            return sorted(((c, n[:-5]) for n, (_, c) in current.items() if c is not None), reverse=True)


def restore(out_dir: Path, history_size: int) -> list[Job]:
    """The newest ``history_size`` finished jobs on disk (for the manager's table at start)."""
    jobs = [load(out_dir, job_id) for _, job_id in Archive(out_dir).entries()[:history_size]]
    return [job for job in jobs if job is not None]


def add_routes(app: Any, jobs: JobManager, auth: list) -> None:
    """``GET /api/history``: every job, live and on disk, newest first, a page at a time."""
    archive = Archive(jobs.out_dir)

    @app.get("/api/history", dependencies=auth, responses=documented(400, 401, 422), tags=["history"])
    def history_page(
        offset: Annotated[int, Query(ge=0, description="jobs to skip, newest first")] = 0,
        limit: Annotated[int, Query(ge=1, le=PAGE_LIMIT, description="jobs to return")] = 50,
    ) -> dict:
        """Jobs of this server and of earlier runs on the same output folder, newest first:
        ``{"total", "offset", "limit", "jobs": [job, ...]}``, each job as ``GET /api/jobs/{id}`` gives it."""
        live = {job.id: job for job in jobs.jobs()}
        order = [(job.created, job.id) for job in live.values()]
        order += [(created, job_id) for created, job_id in archive.entries() if job_id not in live]
        order.sort(reverse=True)
        page = []
        for _, job_id in order[offset : offset + limit]:
            job = live.get(job_id) or load(jobs.out_dir, job_id)
            if job is not None:
                page.append(jobs.summary(job))
        return {"total": len(order), "offset": offset, "limit": limit, "jobs": page}
