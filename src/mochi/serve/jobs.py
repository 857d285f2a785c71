"""Generation jobs: a bounded queue in front of one worker thread per pipeline.

The worker, not the HTTP handlers, runs the pipeline, so a client that disconnects never interrupts a
generation, and a job that raises is marked "failed" with its message while the worker goes on to the next.
One generation runs at a time per device (a lock per device, shared by every manager in the process);
other jobs wait in a queue of at most ``queue_size`` entries, and a submission to a full queue is refused
with ``QueueFull``. A running job is cancelled at its next module call (``mochi.interrupt.stop_checks``:
between DiT blocks and layers, inside the text encoder and the VAE decode), or at its next progress report:
the exception unwinds the pipeline and frees its memory.

Work per job is capped (``mochi.serve.limits``): frames × height × width (which bounds one module call,
hence how long a cancel can take, and the decode's size) and that times the steps (the whole job); a
request above either is a ValueError (422) naming the nearest size that fits.

Each finished job leaves ``<id>.mp4`` and ``<id>.json`` (its parameters) in the output folder, both written
atomically; at start the newest ``history`` of them are read back into the table (``mochi.serve.history``),
and older ones are found there on demand. Job ids are ``secrets.token_urlsafe`` strings, and files are found
only through the job table or a checked id, never from a client-given name.

``version`` counts changes to any job (submission, start, progress, preview, end), so that the event stream
(``mochi.serve.events``) pushes a new snapshot only when something changed.
"""

from __future__ import annotations

import collections
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mochi.accel.calibrate import UNCALIBRATED, coefficients_path, uncalibrated_message
from mochi.errors import out_of_memory
from mochi.interrupt import Interrupted, stop_checks
from mochi.outputs import sidecar_path, write_video_and_sidecar
from mochi.request import GenerationRequest
from mochi.serve import history as sidecars
from mochi.serve import preview
from mochi.serve.limits import check_work, default_caps
from mochi.serve.redact import last_component, redact_paths

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
    "eta",
    "eta_above",
)
# The text encoder reads this many tokens (the end token included); the rest of a prompt is dropped.
TEXT_TOKENS = 256

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
    """What the server needs of ``mochi.pipeline.MochiPipeline`` (whose ``generate`` reads a request's
    ``init_video`` itself)."""

    components: Any
    device: Any

    def generate(
        self, request: GenerationRequest, progress: Any = None, init_frames: Any = None, denoised: Any = None
    ) -> Any: ...


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
    lora_names: tuple[str, ...] = ()  # the LoRA files' names, in request.loras' order
    init_video: str | None = None  # the upload id of a video-to-video job
    tokens: int | None = None  # the prompt's length in text-encoder tokens, end token included
    warnings: list[str] = field(default_factory=list)
    preview: bytes | None = None  # PNG of the latest denoised estimate
    preview_step: int = 0
    stage_started: float | None = None
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
        names = self.lora_names or ((self.lora,) if self.lora else ())
        # Every LoRA once, in ``loras``: a job's parameters submitted again make the same job (the first one
        # also in ``lora`` applied it twice).
        values["lora"] = None
        values["lora_scale"] = None
        values["loras"] = [{"name": n, "scale": s} for n, (_, s) in zip(names, self.request.loras)]
        values["init_video"] = self.init_video
        values["strength"] = self.request.strength if self.init_video else None
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
            "prompt_tokens": {"count": self.tokens, "limit": TEXT_TOKENS},
            "warnings": self.warnings,
            "preview_step": self.preview_step if self.preview is not None else None,
        }


class JobManager:
    """Queue and worker for one pipeline, writing videos to ``out_dir``.

    queue_size: how many jobs may wait behind the running one. fps: frame rate of the written videos.
    history: how many finished jobs (and their files' entries) the table keeps; older ones are forgotten,
    their files stay on disk. max_pixels, max_pixel_steps: the work caps (``check_work``; default: by
    the pipeline's device, ``limits.default_caps``).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        out_dir: str | Path,
        *,
        queue_size: int = 8,
        fps: float = 30.0,
        history: int = 200,
        max_pixels: int | None = None,
        max_pixel_steps: int | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size} must be at least 1")
        self.pipeline = pipeline
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.queue_size = queue_size
        self.fps = fps
        self.history = history
        pixels, pixel_steps = default_caps(torch.device(pipeline.device).type)
        self.work_limits = {
            "pixels": pixels if max_pixels is None else max_pixels,
            "pixel_steps": pixel_steps if max_pixel_steps is None else max_pixel_steps,
        }
        self._jobs: dict[str, Job] = {}
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.version = 0
        self.rgb_map = preview.map_for(pipeline.components)
        for job in sidecars.restore(self.out_dir, history_size=history):
            self._jobs[job.id] = job
        self._worker = threading.Thread(target=self._work, name="mochi-serve-worker", daemon=True)
        self._worker.start()

    @property
    def defaults(self) -> dict:
        return self.pipeline.components.defaults

    # -- the client side ------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, lora: str | None = None, **details: Any) -> Job:
        """Resolve ``request`` against the model's defaults (drawing its seed) and queue it.

        Raises ValueError for an invalid request and QueueFull when ``queue_size`` jobs already wait.
        details: ``lora_names`` and ``init_video`` (see ``Job``).
        """
        if lora is not None:
            details.setdefault("lora_names", (lora,))
        return self.submit_batch([request], **details)[0]

    def submit_batch(self, requests: list[GenerationRequest], **details: Any) -> list[Job]:
        """Queue every request or none (QueueFull when fewer than ``len(requests)`` places are free)."""
        resolved = [r.resolved(self.defaults) for r in requests]
        for r in resolved:
            check_work(r, self.work_limits["pixels"], self.work_limits["pixel_steps"])
        tokens = self.count_tokens(resolved[0].prompts[0]) if resolved else None
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = self.queue_size - len(self._waiting)
            if free <= 0:
                raise QueueFull(f"the queue is full ({self.queue_size} jobs waiting); retry later")
            if len(resolved) > free:
                raise QueueFull(
                    f"the queue has {max(free, 0)} free places of {self.queue_size} and this asks for "
                    f"{len(resolved)}; retry later"
                )
            jobs = []
            for request in resolved:
                job = Job(id=secrets.token_urlsafe(12), request=request, tokens=tokens, **details)
                if tokens is not None and tokens > TEXT_TOKENS:
                    job.warnings.append(truncation_warning(tokens))
                job.lora = job.lora_names[0] if job.lora_names else None
                self._jobs[job.id] = job
                self._waiting.append(job)
                jobs.append(job)
            self._forget_old()
            self._touch()
        return jobs

    def count_tokens(self, text: str) -> int | None:
        """The length of ``text`` in the text encoder's tokens, end token included (0 for "")."""
        tokenizer = getattr(self.pipeline.components, "tokenizer", None)
        if tokenizer is None:
            return None
        return len(tokenizer.encode(text)) + 1 if text else 0

    def get(self, job_id: str) -> Job | None:
        """The job from the table, or else rebuilt from its sidecar in the output folder."""
        with self._cond:
            job = self._jobs.get(job_id)
        return job if job is not None else sidecars.load(self.out_dir, job_id)

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
            if job is None:  # a finished job of an earlier run, or none
                return sidecars.load(self.out_dir, job_id)
            if job.status in FINAL:
                return job
            job.cancel_requested = True
            if job.status == QUEUED:
                self._waiting.remove(job)
                job.status, job.finished = CANCELLED, time.time()
                job.error = "cancelled before it started"
            self._touch()
            return job

    def remove(self, job_id: str) -> bool:
        """Forget a finished job and delete its video and parameters; False if it is not finished (or there
        is no such job). A job of the output folder that the table no longer holds (an earlier run's, or one
        past the history kept in memory) is found by its sidecar, as ``get`` finds it."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                job = sidecars.load(self.out_dir, job_id)
                if job is None or job.status not in FINAL:
                    return False
            elif job.status not in FINAL:
                return False
            else:
                del self._jobs[job_id]
            self._touch()
        for path in (self.out_dir / f"{job_id}.mp4", self.out_dir / f"{job_id}.json"):
            if not path.is_dir():  # a folder of that name is not the job's: left (unlink was a 500)
                path.unlink(missing_ok=True)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the worker (waiting up to ``timeout`` seconds for the running job)."""
        with self._cond:
            self._stopping = True
            for job in list(self._waiting):
                job.status, job.finished, job.error = CANCELLED, time.time(), "server shut down"
            self._waiting.clear()
            for job in self._jobs.values():
                job.cancel_requested = True
            self._touch()
        self._worker.join(timeout)

    def _touch(self) -> None:
        """Record a change (the caller holds ``_cond``) and wake whoever waits on it."""
        self.version += 1
        self._cond.notify_all()

    @property
    def stopping(self) -> bool:
        """True once ``close`` began (event streams end then)."""
        return self._stopping

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
            self._touch()
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._run(job)
            except (JobCancelled, Interrupted):
                self._finish(job, CANCELLED, "cancelled while running")
            except Exception as e:  # one job's failure must not stop the server
                log.exception("job %s failed", job.id)  # the log, for the operator, keeps the full paths
                self._finish(job, FAILED, redact_paths(out_of_memory(e) or f"{type(e).__name__}: {e}"))

    def _progress(self, job: Job):  # noqa: ANN202 - the pipeline's progress callback
        def report(stage: str, done: int, total: int) -> None:
            if job.cancel_requested:
                raise JobCancelled(job.id)
            lo, hi = _STAGE_SPAN.get(stage, (0.0, 1.0))
            with self._cond:  # readers see stage, step and fraction of one report, never a mix
                if job.stage != stage:
                    job.stage_started = time.time()
                job.stage, job.step, job.total = stage, done, total
                job.fraction = round(lo + (hi - lo) * (done / total if total else 1.0), 4)
                self._touch()

        return report

    def _preview(self, job: Job):  # noqa: ANN202 - the pipeline's denoised callback
        def show(done: int, total: int, x0: torch.Tensor) -> None:
            if done % preview.every(total) and done != total:
                return
            png = preview.encode_png(preview.preview_image(x0, self.rgb_map))
            with self._cond:
                job.preview, job.preview_step = png, done
                self._touch()

        return show

    def _run(self, job: Job) -> None:
        with device_lock(self.pipeline.device):
            if job.cancel_requested:
                raise JobCancelled(job.id)
            self._apply_loras(job)
            with stop_checks(self.pipeline.components.modules(), lambda: job.cancel_requested):
                # A video-to-video job's request names its upload; the pipeline reads and fits it.
                result = self.pipeline.generate(
                    job.request, progress=self._progress(job), denoised=self._preview(job)
                )
        if job.cancel_requested:
            raise JobCancelled(job.id)
        video = self.out_dir / f"{job.id}.mp4"
        job.seconds = {k: round(v, 3) for k, v in result.seconds.items()}
        sidecar = {**job.parameters(), "id": job.id, "seconds": job.seconds}
        sidecar["model"] = getattr(self.pipeline.components, "name", None)
        record = getattr(self.pipeline, "run_record", None)  # what ran: cache, forwards, dtypes, splits
        if record is not None:
            sidecar.update({k: v for k, v in record(result).items() if k not in sidecar})
        source = sidecar.get("cache_coefficients")
        if isinstance(source, str) and re.search(r"[/\\]", source):  # a file: clients get the video's copy
            sidecar["cache_coefficients"] = last_component(source)
        model = getattr(self.pipeline.components, "source", None)
        if source == UNCALIBRATED and model is not None:  # said on the server's log only, before
            absent = last_component(str(coefficients_path(model)))  # clients are not shown server paths
            with self._cond:
                job.warnings.append(uncalibrated_message(absent))
        finished = time.time()  # one time for the sidecar and the job (a restart read an earlier one)
        sidecar.update(created=job.created, started=job.started, finished=finished)
        sidecar.update(prompt_tokens=job.tokens, warnings=job.warnings)
        write_video_and_sidecar(result.frames[0], video, self.fps, sidecar)  # the sidecar first
        with self._cond:  # a cancel answered while the video was written is honoured, not dropped
            if not job.cancel_requested:
                job.video = video
                self._finish(job, DONE, None, finished)
                return
        for path in (video, sidecar_path(video)):
            path.unlink(missing_ok=True)
        raise JobCancelled(job.id)

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

    def _finish(self, job: Job, status: str, error: str | None, finished: float | None = None) -> None:
        with self._cond:
            job.status, job.error, job.finished = status, error, finished or time.time()
            if status == DONE:
                job.stage, job.fraction = "done", 1.0
            self._touch()


def truncation_warning(tokens: int) -> str:
    """What a job says of a prompt longer than the text encoder reads."""
    return (
        f"the prompt is {tokens} tokens long (end token included) but the text encoder reads {TEXT_TOKENS}: "
        f"the last {tokens - TEXT_TOKENS} tokens are ignored; shorten the prompt"
    )
