"""Generation jobs: a bounded queue in front of one worker thread per pipeline.

The worker, not the HTTP handlers, runs the pipeline, so a client that disconnects never interrupts a
generation, and a job that raises is marked "failed" with its message while the worker goes on to the next.
One generation runs at a time per device (a lock per device, shared by every manager in the process);
other jobs wait in a queue of at most ``queue_size`` entries, and a submission to a full queue is refused
with ``QueueFull``. A running job is cancelled at its next progress report (every denoising step): the
callback raises ``JobCancelled`` inside the pipeline, which unwinds it and frees its memory.

Each finished job leaves ``<id>.mp4`` and ``<id>.json`` (its parameters) in the output folder, both written
atomically. Job ids are ``secrets.token_urlsafe`` strings, and files are found only through the job table,
never from a client-given name.
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mochi.files import atomic_write_text
from mochi.request import GenerationRequest
from mochi.video import write_video

log = logging.getLogger("mochi.serve")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL = (DONE, FAILED, CANCELLED)

# Share of the whole job each stage stands for in the overall fraction: denoising dominates the run time.
_STAGE_SPAN = {"text": (0.0, 0.05), "encode": (0.05, 0.1), "denoise": (0.1, 0.9), "decode": (0.9, 1.0)}

# What a job reports of its request: the fields the API accepts, resolved.
PARAMETERS = (
    "prompt",
    "negative_prompt",
    "frames",
    "height",
    "width",
    "steps",
    "guidance",
    "seed",
    "cache",
    "cache_threshold",
)

_DEVICE_LOCKS: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
_DEVICE_LOCKS_GUARD = threading.Lock()


def device_lock(device: str | torch.device) -> threading.Lock:
    """The lock that serialises generations on ``device`` across every manager in this process."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:N" name one GPU: one lock
        device = torch.device("cuda", torch.cuda.current_device())
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS[str(device)]


class Pipeline(Protocol):
    """What the server needs of ``mochi.pipeline.MochiPipeline``."""

    components: Any
    device: Any

    def generate(self, request: GenerationRequest, progress: Any = None, init_frames: Any = None) -> Any: ...


class QueueFull(RuntimeError):
    """The queue already holds ``queue_size`` waiting jobs."""


class JobCancelled(Exception):
    """Raised from the progress callback to stop a running job at its next step."""


@dataclass
class Job:
    """One request's life: queued → running → done | failed | cancelled. Times are Unix seconds."""

    id: str
    request: GenerationRequest
    lora: str | None = None
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    stage: str | None = None
    step: int = 0
    total: int = 0
    fraction: float = 0.0
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    video: Path | None = None
    cancel_requested: bool = False

    def parameters(self) -> dict:
        """The request's API fields as JSON-ready values (seed included: it is drawn at submission)."""
        values = {k: getattr(self.request, k) for k in PARAMETERS}
        values["lora"] = self.lora
        values["lora_scale"] = self.request.loras[0][1] if self.request.loras else None
        return values

    def summary(self, position: int | None = None) -> dict:
        return {
            "id": self.id,
            "status": self.status,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "queue_position": position,
            "progress": {
                "stage": self.stage,
                "step": self.step,
                "total": self.total,
                "fraction": self.fraction,
            },
            "parameters": self.parameters(),
            "error": self.error,
            "seconds": self.seconds,
        }


class JobManager:
    """Queue and worker for one pipeline, writing videos to ``out_dir``.

    queue_size: how many jobs may wait behind the running one. fps: frame rate of the written videos.
    history: how many finished jobs (and their files' entries) the table keeps; older ones are forgotten,
    their files stay on disk.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        out_dir: str | Path,
        *,
        queue_size: int = 8,
        fps: float = 30.0,
        history: int = 200,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size} must be at least 1")
        self.pipeline = pipeline
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.queue_size = queue_size
        self.fps = fps
        self.history = history
        self._jobs: dict[str, Job] = {}
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="mochi-serve-worker", daemon=True)
        self._worker.start()

    @property
    def defaults(self) -> dict:
        return self.pipeline.components.defaults

    # -- the client side ------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, lora: str | None = None) -> Job:
        """Resolve ``request`` against the model's defaults (drawing its seed) and queue it.

        Raises ValueError for an invalid request and QueueFull when ``queue_size`` jobs already wait.
        """
        resolved = request.resolved(self.defaults)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} jobs waiting); retry later")
            job = Job(id=secrets.token_urlsafe(12), request=resolved, lora=lora)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._forget_old()
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def summary(self, job: Job) -> dict:
        with self._cond:
            position = self._waiting.index(job) if job.status == QUEUED and job in self._waiting else None
            return job.summary(position)

    def jobs(self) -> list[Job]:
        """Every job this server knows, newest first."""
        with self._cond:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now, or a running one at its next step. Finished jobs are left as they are."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.status in FINAL:
                return job
            job.cancel_requested = True
            if job.status == QUEUED:
                self._waiting.remove(job)
                job.status, job.finished = CANCELLED, time.time()
                job.error = "cancelled before it started"
            return job

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the worker (waiting up to ``timeout`` seconds for the running job)."""
        with self._cond:
            self._stopping = True
            for job in list(self._waiting):
                job.status, job.finished, job.error = CANCELLED, time.time(), "server shut down"
            self._waiting.clear()
            for job in self._jobs.values():
                job.cancel_requested = True
            self._cond.notify_all()
        self._worker.join(timeout)

    # -- the worker side ------------------------------------------------------------------------------------

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.status in FINAL]
        finished.sort(key=lambda j: j.created)
        for job in finished[: max(0, len(self._jobs) - self.history)]:
            del self._jobs[job.id]

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            job = self._waiting.popleft()
            job.status, job.started = RUNNING, time.time()
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._run(job)
            except JobCancelled:
                self._finish(job, CANCELLED, "cancelled while running")
            except Exception as e:  # one job's failure must not stop the server
                log.exception("job %s failed", job.id)
                self._finish(job, FAILED, f"{type(e).__name__}: {e}")

    def _progress(self, job: Job):  # noqa: ANN202 - the pipeline's progress callback
        def report(stage: str, done: int, total: int) -> None:
            if job.cancel_requested:
                raise JobCancelled(job.id)
            lo, hi = _STAGE_SPAN.get(stage, (0.0, 1.0))
            with self._cond:  # readers see stage, step and fraction of one report, never a mix
                job.stage, job.step, job.total = stage, done, total
                job.fraction = round(lo + (hi - lo) * (done / total if total else 1.0), 4)

        return report

    def _run(self, job: Job) -> None:
        with device_lock(self.pipeline.device):
            if job.cancel_requested:
                raise JobCancelled(job.id)
            self._apply_loras(job)
            result = self.pipeline.generate(job.request, progress=self._progress(job))
        video = self.out_dir / f"{job.id}.mp4"
        write_video(result.frames[0], video, fps=self.fps)
        job.seconds = {k: round(v, 3) for k, v in result.seconds.items()}
        job.video = video
        sidecar = {**job.parameters(), "id": job.id, "fps": self.fps, "seconds": job.seconds}
        sidecar["model"] = getattr(self.pipeline.components, "name", None)
        atomic_write_text(self.out_dir / f"{job.id}.json", json.dumps(sidecar, indent=2) + "\n")
        self._finish(job, DONE, None)

    def _apply_loras(self, job: Job) -> None:
        """Make the pipeline's LoRAs exactly the job's (none included), naming the file that fails to load.

        The pipeline itself keeps the last request's LoRAs when a request names none; a server's next job
        must not inherit another client's choice.
        """
        loaded = getattr(self.pipeline, "loras", None)
        wanted = [(str(p), float(s)) for p, s in job.request.loras]
        if loaded is None or [(p, s) for p, s, _ in loaded] == wanted:
            return
        self.pipeline.unload_loras()
        for path, scale in wanted:
            try:
                self.pipeline.load_lora(path, scale)
            except Exception as e:
                self.pipeline.unload_loras()
                name = Path(path).name
                raise ValueError(f"LoRA {name!r} cannot be applied: {type(e).__name__}: {e}") from e

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        with self._cond:
            job.status, job.error, job.finished = status, error, time.time()
            if status == DONE:
                job.stage, job.fraction = "done", 1.0
