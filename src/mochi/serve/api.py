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
  GET  /api/jobs/{id}/video   the mp4 (?download=1 for an attachment); 409 until the job is done
  DELETE /api/jobs/{id}       cancel (also POST /api/jobs/{id}/cancel)
Without a token, requests whose Host is not a loopback name get 400 (``LoopbackHostOnly``).
"""

from __future__ import annotations

import secrets
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from mochi.request import GenerationRequest
from mochi.serve.jobs import DONE, JobManager, QueueFull
from mochi.serve.server import is_loopback

# Upper bounds that keep one request from exhausting the server; the released model's defaults
# (163 frames, 848x480, 64 steps) sit well inside them.
LIMITS = {"frames": 511, "height": 1280, "width": 1280, "steps": 500, "prompt_chars": 4000}
# Module level: FastAPI resolves the (string) annotations of route functions against module globals.
BEARER = HTTPBearer(auto_error=False)


class JobRequest(BaseModel):
    """A generation request. Unset numbers take the model's defaults; an unset seed is drawn at random."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=LIMITS["prompt_chars"], description="what the video shows")
    negative_prompt: str = Field("", max_length=LIMITS["prompt_chars"], description="what to steer away from")
    frames: int | None = Field(None, ge=1, le=LIMITS["frames"], description="frame count, 6k+1")
    height: int | None = Field(None, ge=16, le=LIMITS["height"], description="pixels, a multiple of 16")
    width: int | None = Field(None, ge=16, le=LIMITS["width"], description="pixels, a multiple of 16")
    steps: int | None = Field(None, ge=1, le=LIMITS["steps"], description="sampling steps")
    guidance: float | None = Field(None, ge=0, le=100, description="classifier-free guidance; 1.0 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="random seed; unset draws one")
    lora: str | None = Field(None, description="a file name from GET /api/info's loras; unset = none")
    lora_scale: float = Field(1.0, ge=-10, le=10, description="strength of the LoRA")
    cache: str = Field(
        "none",
        max_length=32,
        description="step caching: none (exact), teacache, fbcache, or a preset: teacache:quality, "
        "teacache:fast, fbcache:quality, fbcache:fast",
    )
    cache_threshold: float | None = Field(None, gt=0, description="the cache's threshold; unset: its default")


def lora_supported(pipeline: object) -> bool:
    """Whether the pipeline applies ``GenerationRequest.loras`` (``MochiPipeline.load_lora``)."""
    return callable(getattr(pipeline, "load_lora", None))


def list_loras(lora_dir: Path | None) -> list[str]:
    """The .safetensors file names directly inside ``lora_dir`` (names only: clients never send paths)."""
    if lora_dir is None or not lora_dir.is_dir():
        return []
    return sorted(p.name for p in lora_dir.iterdir() if p.is_file() and p.suffix == ".safetensors")


def _field_errors(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        name = ".".join(loc) or "body"
        given = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        parts.append(f"{name}: {err.get('msg', 'invalid')}{given}")
    return "; ".join(parts)


class LoopbackHostOnly:
    """ASGI middleware: answer 400 to requests whose Host header is not a loopback name.

    A server without a token trusts whoever can reach it, which on loopback means this machine. A web page
    elsewhere can still reach it through DNS rebinding (its own name resolving to 127.0.0.1), so such a
    request is recognised by its foreign Host header and refused.
    """

    def __init__(self, app: object) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host[: host.find("]") + 1] if host.startswith("[") else host.split(":")[0]
            if not is_loopback(name):
                reply = JSONResponse(
                    {"detail": f"host {name!r} is not this machine; without a token only loopback is served"},
                    status_code=400,
                )
                await reply(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    jobs: JobManager, *, token: str | None = None, lora_dir: str | Path | None = None, title: str = "mochi"
) -> FastAPI:
    """The FastAPI app serving ``jobs``. With ``token``, every /api route but /api/health requires it;
    without one, only requests addressed to a loopback name are served (see ``LoopbackHostOnly``)."""
    lora_path = Path(lora_dir) if lora_dir is not None else None
    app = FastAPI(
        title=f"{title} serve",
        description="Text-to-video generation with Mochi 1: submit jobs, follow their progress, fetch mp4s.",
        version="1",
    )
    app.state.jobs = jobs
    if token is None:
        app.add_middleware(LoopbackHostOnly)

    def authorised(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if token is None:
            return
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": 'Bearer realm="mochi"'}
            )

    auth = [Depends(authorised)]

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str})
        return JSONResponse({"detail": _field_errors(exc), "errors": errors}, status_code=422)

    def found(job_id: str):  # noqa: ANN202 - a Job
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} on this server")
        return job

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        html = resources.files("mochi.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/api/health")
    def health() -> dict:
        return {"status": "ok", "auth_required": token is not None}

    @app.get("/api/info", dependencies=auth)
    def info() -> dict:
        pipe = jobs.pipeline
        return {
            "model": getattr(pipe.components, "name", None),
            "device": str(pipe.device),
            "defaults": dict(jobs.defaults),
            "limits": LIMITS,
            "queue_size": jobs.queue_size,
            "loras": list_loras(lora_path),
            "lora_supported": lora_supported(pipe),
        }

    @app.post("/api/jobs", status_code=202, dependencies=auth)
    def submit(body: JobRequest) -> dict:
        loras: list[tuple[str, float]] = []
        if body.lora:
            available = list_loras(lora_path)
            if body.lora not in available:
                choices = ", ".join(available) or "none (start the server with --lora-dir DIR)"
                raise HTTPException(
                    422, f"lora={body.lora!r} is not a file in the LoRA folder; choose: {choices}"
                )
            if not lora_supported(jobs.pipeline):
                raise HTTPException(
                    501,
                    "LoRA support not available: this server's pipeline cannot apply LoRAs; leave lora unset",
                )
            loras = [(str(lora_path / body.lora), body.lora_scale)]
        values = body.model_dump(exclude={"lora", "lora_scale"})
        try:
            job = jobs.submit(GenerationRequest(**values, loras=loras), lora=body.lora)
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
        except QueueFull as e:
            raise HTTPException(429, str(e), headers={"Retry-After": "5"}) from e
        return jobs.summary(job)

    @app.get("/api/jobs", dependencies=auth)
    def history() -> list[dict]:
        return [jobs.summary(job) for job in jobs.jobs()]

    @app.get("/api/jobs/{job_id}", dependencies=auth)
    def status(job_id: str) -> dict:
        return jobs.summary(found(job_id))

    @app.get("/api/jobs/{job_id}/video", dependencies=auth, response_class=FileResponse)
    def video(job_id: str, download: bool = False) -> FileResponse:
        job = found(job_id)
        if job.status != DONE or job.video is None:
            raise HTTPException(409, f"job {job_id!r} is {job.status}; its video exists once status is done")
        if not job.video.is_file():
            raise HTTPException(404, f"the video of job {job_id!r} was removed from the output folder")
        name = f"mochi-{job.request.seed}-{job_id}.mp4" if download else None
        return FileResponse(job.video, media_type="video/mp4", filename=name)

    @app.delete("/api/jobs/{job_id}", dependencies=auth)
    def cancel(job_id: str) -> dict:
        found(job_id)
        return jobs.summary(jobs.cancel(job_id))

    @app.post("/api/jobs/{job_id}/cancel", dependencies=auth)
    def cancel_post(job_id: str) -> dict:
        return cancel(job_id)

    return app
