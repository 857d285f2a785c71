"""The HTTP API and the page that uses it, on one FastAPI app.

Why FastAPI: it validates JSON bodies against typed models and serves the OpenAPI description (/openapi.json,
/docs) from the same declarations, so the documented API cannot drift from the real one; it runs on uvicorn,
a small, widely used ASGI server. Why a static page rather than Gradio: the page is one HTML file that
talks to this very API (so every UI action is also an API action, tested by the same tests), Gradio would
bring some twenty packages (pandas, pillow, ...) and a second job queue with its own protocol beside ours,
and its front end fetches web fonts and update checks that an offline machine cannot reach.

Routes (all under /api need ``Authorization: Bearer TOKEN`` when the server has a token, except /api/health):
  GET  /                      the web UI
  GET  /api/health            {"status": "ok", "auth_required": bool}
  GET  /api/info              model, device, defaults, limits, LoRA files
  POST /api/jobs              submit a job (JSON) → 202 with the job; 422 bad values, 429 queue full,
                              501 a LoRA named on a pipeline without LoRA support
  GET  /api/jobs              this server's jobs, newest first
  GET  /api/jobs/{id}         one job: status, progress {stage, step, total, fraction}, parameters, error
  GET  /api/jobs/{id}/video   the mp4 (?download=1 for an attachment; HEAD too); 409 until the job is done
  DELETE /api/jobs/{id}       cancel a queued or running job; forget a finished one and delete its files
  POST /api/jobs/{id}/cancel  cancel only
  GET  /api/jobs/{id}/preview the latest latent preview PNG while sampling (mochi.serve.preview)
  GET  /api/queue, /api/events  the live queue of every job, once or as Server-Sent Events (serve.events)
  GET  /api/history           every job, live and from earlier runs' sidecars, paged (mochi.serve.history)
  POST /api/batches           several seeds of one request; POST /api/tokens: a prompt's token count
                              (mochi.serve.submit); POST /api/uploads: a video for video-to-video
  GET  /openapi.json          the OpenAPI description (no /docs or /redoc: they load scripts from a CDN)
HEAD is answered wherever GET is and OPTIONS everywhere; a method not served at a path is 405 with every
method served there in Allow (``guards``).
Every error is ``ErrorBody`` (``errors``); ``guards.RequestGuard`` checks host, token, Content-Type and body
size before any body is read.
"""

from __future__ import annotations

import os
import secrets
import stat
import weakref
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ConfigDict, Field

from mochi.serve import events, preview
from mochi.serve import history as job_history
from mochi.serve import submit as extras
from mochi.serve import uploads as video_uploads
from mochi.serve.errors import check_range, documented, install_error_handlers, quote
from mochi.serve.guards import DEFAULT_MAX_BODY, RequestGuard, Uploads
from mochi.serve.jobs import DONE, FINAL, JobManager

# Upper bounds that keep one request from exhausting the server; the released model's defaults
# (163 frames, 848x480, 64 steps) sit well inside them.
LIMITS = {"frames": 511, "height": 1280, "width": 1280, "steps": 500, "prompt_chars": 4000}
# Module level: FastAPI resolves the (string) annotations of route functions against module globals.
BEARER = HTTPBearer(auto_error=False)


class JobRequest(extras.JobExtras):
    """A generation request. Unset numbers take the model's defaults; an unset seed is drawn at random."""

    # allow_inf_nan: NaN, Infinity and 1e999 (which JSON parsers read as inf) are invalid numbers, not 500s.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=LIMITS["prompt_chars"], description="what the video shows")
    negative_prompt: str = Field("", max_length=LIMITS["prompt_chars"], description="what to steer away from")
    frames: extras.Whole | None = Field(None, ge=1, le=LIMITS["frames"], description="frame count, 6k+1")
    height: extras.Whole | None = Field(
        None, ge=16, le=LIMITS["height"], description="pixels, a multiple of 16"
    )
    width: extras.Whole | None = Field(
        None, ge=16, le=LIMITS["width"], description="pixels, a multiple of 16"
    )
    steps: extras.Whole | None = Field(None, ge=1, le=LIMITS["steps"], description="sampling steps")
    guidance: extras.Number | None = Field(
        None, ge=0, le=100, description="classifier-free guidance; 1.0 = off"
    )
    seed: extras.Whole | None = Field(None, ge=0, le=2**63 - 1, description="random seed; unset draws one")
    eta: extras.Number | None = Field(
        None, ge=0, le=1, description="ancestral sampling: share of each step's noise drawn afresh; 0 = Euler"
    )
    eta_above: extras.Number | None = Field(
        None, ge=0, lt=1, description="ancestral sampling only at steps from σ above this"
    )
    lora: str | None = Field(
        None, min_length=1, max_length=255, description="a file name from GET /api/info's loras"
    )
    lora_scale: extras.Number | None = Field(1.0, ge=-10, le=10, description="strength of the LoRA; null = 1")
    cache: str = Field(
        "none",
        max_length=80,
        description="step caching: none (exact), teacache, fbcache, or a preset: teacache:quality, "
        "teacache:fast, teacache:2x, fbcache:quality, fbcache:fast, fbcache:3x; options after commas: "
        "max-skips=N, keep=LO-HI, extrapolate[=F]",
    )
    cache_threshold: extras.Number | None = Field(
        None, gt=0, description="the cache's threshold; unset: its default"
    )


def lora_supported(pipeline: object) -> bool:
    """Whether the pipeline applies ``GenerationRequest.loras`` (``MochiPipeline.load_lora``)."""
    return callable(getattr(pipeline, "load_lora", None))


def list_loras(lora_dir: Path | None) -> list[str]:
    """The .safetensors file names directly inside ``lora_dir`` (names only: clients never send paths)."""
    if lora_dir is None or not lora_dir.is_dir():
        return []
    return sorted(p.name for p in lora_dir.iterdir() if p.is_file() and p.suffix == ".safetensors")


def create_app(
    jobs: JobManager,
    *,
    token: str | None = None,
    lora_dir: str | Path | None = None,
    title: str = "mochi",
    max_body: int = DEFAULT_MAX_BODY,
    uploads: Uploads | None = None,
) -> FastAPI:
    """The FastAPI app serving ``jobs``. With ``token``, every /api route but /api/health requires it;
    without one, only requests addressed to a loopback name are served. ``max_body``: the largest JSON body
    accepted, bytes; ``uploads``: routes taking other bodies (see ``guards.RequestGuard``)."""
    lora_path = Path(lora_dir) if lora_dir is not None else None
    # No /docs or /redoc: FastAPI's pages load Swagger UI and ReDoc from a CDN and fonts from Google, which
    # is third-party script on the API's origin and a blank page offline. /openapi.json stays.
    app = FastAPI(
        title=f"{title} serve",
        description="Text-to-video generation with Mochi 1: submit jobs, follow their progress, fetch mp4s.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    app.state.jobs = jobs  # the app holds the manager; its routes reach it through a weak proxy:
    # FastAPI keeps route functions in process-wide caches (4096 entries), so routes closing over the manager
    # kept it, and its pipeline's weights, alive after the app was gone (a server swapped for another
    # model's kept both models).
    jobs = weakref.proxy(jobs)
    uploads = {**video_uploads.GUARD_RULE, **(uploads or {})}
    app.add_middleware(RequestGuard, token=token, max_body=max_body, uploads=uploads)
    install_error_handlers(app)

    def authorised(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if token is None:
            return
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": 'Bearer realm="mochi"'}
            )

    auth = [Depends(authorised)]
    # What each route may answer besides success (the guard's 400 applies to every route without a token).
    read = documented(400) if token is None else documented(401)
    one = {**read, **documented(404, 422)}  # 422: a query parameter of the wrong type
    change = {**one, **documented(413, 415)}

    def found(job_id: str):  # noqa: ANN202 - a Job
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {quote(job_id)} on this server")
        return job

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        html = resources.files("mochi.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/api/health", responses=documented(400) if token is None else None)
    def health() -> dict:
        return {"status": "ok", "auth_required": token is not None}

    @app.get("/api/info", dependencies=auth, responses=read)
    def info() -> dict:
        pipe = jobs.pipeline
        return {
            "model": getattr(pipe.components, "name", None),
            "device": str(pipe.device),
            "defaults": dict(jobs.defaults),
            "limits": {**LIMITS, **jobs.work_limits},
            "queue_size": jobs.queue_size,
            "loras": list_loras(lora_path),
            "lora_supported": lora_supported(pipe),
            "video_to_video": getattr(pipe.components, "encoder", None) is not None,
            "text_tokens": extras.TEXT_TOKENS,
            "max_batch": extras.MAX_BATCH,
            "preview": jobs.rgb_map.source,
        }

    @app.post(
        "/api/jobs",
        status_code=202,
        dependencies=auth,
        responses={**read, **documented(413, 415, 422, 429, 501)},
    )
    def submit(body: JobRequest) -> dict:
        request, details = extras.build_request(body, jobs, lora_path)
        (job,) = extras.queue(jobs, [request], details)
        return jobs.summary(job)

    @app.get("/api/jobs", dependencies=auth, responses=read)
    def history() -> list[dict]:
        return [jobs.summary(job) for job in jobs.jobs()]

    @app.get("/api/jobs/{job_id}", dependencies=auth, responses=one)
    def status(job_id: str) -> dict:
        return jobs.summary(found(job_id))

    video_responses = {**one, **documented(409, 410), 200: {"content": {"video/mp4": {}}}}

    @app.get(
        "/api/jobs/{job_id}/video", dependencies=auth, response_class=FileResponse, responses=video_responses
    )
    def video(job_id: str, request: Request, download: bool = False) -> FileResponse:
        job = found(job_id)
        if job.status in FINAL and job.status != DONE:  # 409 invited retries of a job that never will be
            raise HTTPException(410, f"job {job_id!r} is {job.status}: it has no video, and never will")
        if job.status != DONE or job.video is None:
            raise HTTPException(409, f"job {job_id!r} is {job.status}; its video exists once status is done")
        try:  # opened here: a DELETE from now on unlinks a name, not the file being sent
            fd = os.open(job.video, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError):
            raise HTTPException(
                404, f"the video of job {job_id!r} was removed from the output folder"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # a folder of that name opens too, then fails mid-transfer
                raise HTTPException(404, f"the video of job {job_id!r} is not a file in the output folder")
            spans = check_range(request.headers.get("range"), info.st_size)
        except BaseException:
            os.close(fd)
            raise
        name = f"mochi-{job.request.seed}-{job_id}.mp4" if download else None
        return OpenFileResponse(fd, job.video, info, media_type="video/mp4", filename=name, spans=spans)

    # Players and download managers ask HEAD first (size, type, ranges); Starlette sends headers only.
    @app.head(
        "/api/jobs/{job_id}/video", dependencies=auth, response_class=FileResponse, responses=video_responses
    )
    def video_head(job_id: str, request: Request, download: bool = False) -> FileResponse:
        return video(job_id, request, download)

    @app.delete("/api/jobs/{job_id}", dependencies=auth, responses=one)
    def cancel_or_delete(job_id: str) -> dict:
        """Cancel a queued or running job; forget a finished one and delete its video and parameters.
        ``deleted`` says which was done: a queued job cancelled is kept (as cancelled) until deleted again."""
        job = found(job_id)
        if job.status in FINAL:
            summary = jobs.summary(job)
            if not jobs.remove(job_id):  # removed meanwhile by another request
                raise HTTPException(404, f"no job {quote(job_id)} on this server")
            return {**summary, "deleted": True}
        return {**jobs.summary(jobs.cancel(job_id)), "deleted": False}

    @app.post("/api/jobs/{job_id}/cancel", dependencies=auth, responses=change)
    def cancel(job_id: str) -> dict:
        found(job_id)
        return jobs.summary(jobs.cancel(job_id))

    for module in (events, job_history, preview, video_uploads):
        module.add_routes(app, jobs, auth)
    extras.add_routes(app, jobs, auth, JobRequest, lora_path)
    return app


class OpenFileResponse(FileResponse):
    """A FileResponse that sends a file opened beforehand (``fd``, closed when the response ends), so that
    the file being deleted between the route and the transfer gives neither a 500 nor a cut-off body.
    ``path`` only names it (Content-Disposition, ETag: as for the path). ``spans``: the Range header to
    serve in place of the request's (``check_range``), or None."""

    def __init__(
        self, fd: int, path: Path, info: os.stat_result, *, spans: str | None = None, **kwargs: object
    ) -> None:
        super().__init__(path, stat_result=info, **kwargs)
        self.fd = fd
        self.spans = spans

    @asynccontextmanager
    async def _open_file(self):  # noqa: ANN202 - Starlette's hook: each transfer reads a copy of the handle
        file = anyio.wrap_file(os.fdopen(os.dup(self.fd), "rb"))
        try:
            await file.seek(0)
            yield file
        finally:
            with anyio.CancelScope(shield=True):
                await file.aclose()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if self.spans is not None:
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]
            scope = {**scope, "headers": [*headers, (b"range", self.spans.encode("latin-1"))]}
        try:
            await super().__call__(scope, receive, send)
        finally:
            os.close(self.fd)
