"""What a job request may carry beyond the basics, and the routes that build on it.

``JobExtras`` (fields of ``POST /api/jobs``): several LoRAs, each a file of the LoRA folder with its scale;
video-to-video from an upload (``init_video``, ``strength``). ``build_request`` turns a body into the
pipeline's ``GenerationRequest`` with every name checked (422 naming the value and the choices).
Routes: ``POST /api/batches`` (several seeds of one prompt in one call, queued all or none) and
``POST /api/tokens`` (a prompt's length in the text encoder's tokens, for a warning while typing).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

from fastapi import HTTPException
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from mochi.request import MAX_SEED, GenerationRequest, check_prompt
from mochi.serve.errors import documented, quote
from mochi.serve.jobs import PARAMETERS, TEXT_TOKENS, QueueFull
from mochi.serve.uploads import probe, upload_path

MAX_LORAS = 8
MAX_BATCH = 16


def _not_bool(value: Any) -> Any:
    # JSON true/false are not numbers: pydantic's lax mode reads them as 1/0 (a 1-frame job, seed 1).
    # Numeric strings stay accepted (the page sends seeds beyond 2**53 as strings).
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


Whole = Annotated[int, BeforeValidator(_not_bool)]
Number = Annotated[float, BeforeValidator(_not_bool)]


class LoraChoice(BaseModel):
    # NaN, Infinity and 1e999 are invalid scales (422), as in JobRequest.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=255, description="a file name from GET /api/info's loras")
    scale: Number = Field(1.0, ge=-10, le=10, description="strength of this LoRA")


class JobExtras(BaseModel):
    """LoRAs (any number up to 8, applied in order) and video-to-video."""

    loras: list[LoraChoice] = Field(
        default_factory=list, max_length=MAX_LORAS, description="LoRAs applied together, in order"
    )
    init_video: str | None = Field(
        None, description="video-to-video: an id from POST /api/uploads; unset = text-to-video"
    )
    strength: Number | None = Field(
        0.7,
        gt=0,
        le=1,
        description="video-to-video: how much of the schedule runs (1 = ignore the video); null = 0.7",
    )


class TokenQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=20000, description="the text to measure")


def build_request(body: Any, jobs: Any, lora_dir: Path | None) -> tuple[GenerationRequest, dict]:
    """A ``JobRequest`` body → (the pipeline request, the job's details for ``JobManager.submit``)."""
    from mochi.serve.api import list_loras, lora_supported

    # A value that only applies with another field is refused without it (as the CLI's options are), rather
    # than silently dropped: the client meant something the job would not do.
    # A field sent as null is not given: a job's parameters (strength null without init_video, lora_scale
    # null without lora) are a body to submit again.
    given = {k for k in body.model_fields_set if getattr(body, k) is not None}
    try:
        check_prompt(body.prompt)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    if "strength" in given and body.init_video is None:
        raise HTTPException(422, "strength applies only to video-to-video; give init_video or leave it out")
    if "lora_scale" in given and getattr(body, "lora", None) is None:
        raise HTTPException(422, "lora_scale applies only with lora; name the LoRA or leave lora_scale out")
    scale = 1.0 if body.lora_scale is None else body.lora_scale
    choices = ([LoraChoice(name=body.lora, scale=scale)] if body.lora else []) + list(body.loras)
    if len(choices) > MAX_LORAS:
        raise HTTPException(422, f"{len(choices)} LoRAs given; at most {MAX_LORAS} per job")
    loras = []
    if choices:
        available = list_loras(lora_dir)
        for choice in choices:
            if choice.name not in available:
                names = ", ".join(available) or "none (start the server with --lora-dir DIR)"
                raise HTTPException(
                    422, f"lora={quote(choice.name)} is not a file in the LoRA folder; choose: {names}"
                )
        if not lora_supported(jobs.pipeline):
            raise HTTPException(
                501, "LoRA support not available: this server's pipeline cannot apply LoRAs; leave lora unset"
            )
        loras = [(str(lora_dir / c.name), c.scale) for c in choices]
    init = None
    if body.init_video is not None:
        init = upload_path(jobs.out_dir, body.init_video)
        if init is None:
            raise HTTPException(
                422, f"init_video={quote(body.init_video)} is not an upload; POST the video to /api/uploads"
            )
        if getattr(jobs.pipeline.components, "encoder", None) is None:
            raise HTTPException(422, "video-to-video needs the VAE encoder, and this server's model has none")
        frames, info = body.frames or jobs.defaults["frames"], None
        with contextlib.suppress(Exception):  # an unreadable upload fails its job, with the reader's reason
            info = probe(init)
        if info is not None and info["frames"] < frames:
            raise HTTPException(
                422,
                f"init_video={quote(body.init_video)} has {info['frames']} frames, fewer than the {frames} "
                "to generate; ask for fewer frames or upload a longer clip",
            )
        if info is not None:  # a clip too small or thin to crop to the output's shape fails every job
            from mochi.video import VideoError, crop_box

            size = (body.height or jobs.defaults["height"], body.width or jobs.defaults["width"])
            try:
                crop_box(info["height"], info["width"], *size)
            except VideoError as e:
                raise HTTPException(422, f"init_video={quote(body.init_video)}: {e}") from None
    values = body.model_dump(include=set(PARAMETERS))  # the request fields a job records
    request = GenerationRequest(
        **values, loras=loras, init_video=None if init is None else str(init), strength=body.strength or 0.7
    )
    details = {"lora_names": tuple(c.name for c in choices), "init_video": body.init_video}
    return request, details


def queue(jobs: Any, requests: list[GenerationRequest], details: dict) -> list:
    """``JobManager.submit_batch`` with its refusals as HTTP errors: 422 an invalid request, 429 a full
    queue (with ``Retry-After``). Every job route queues through here."""
    try:
        return jobs.submit_batch(requests, **details)
    except ValueError as e:
        raise HTTPException(422, str(e)) from e
    except QueueFull as e:
        raise HTTPException(429, str(e), headers={"Retry-After": "5"}) from e


def add_routes(app: Any, jobs: Any, auth: list, job_request: type[BaseModel], lora_dir: Path | None) -> None:
    batch_request = create_model(
        "BatchRequest",
        __base__=job_request,
        count=(Whole, Field(2, ge=1, le=MAX_BATCH, description="how many videos, one seed each")),
    )

    def submit_batch(body: BaseModel) -> dict:
        """Queue ``count`` jobs of one request, seeds ``seed``, ``seed``+1, … (each drawn at random when
        seed is unset): 202 with ``{"jobs": [job, ...]}``; 429 unless the queue has room for all of them."""
        request, details = build_request(body, jobs, lora_dir)
        if request.seed is not None and request.seed + body.count - 1 > MAX_SEED:
            raise HTTPException(
                422, f"seed={request.seed} + count={body.count} passes the largest seed 2**63-1"
            )
        requests = []
        for i in range(body.count):
            seed = None if request.seed is None else request.seed + i
            requests.append(GenerationRequest(**{**vars(request), "seed": seed}))
        return {"jobs": [jobs.summary(job) for job in queue(jobs, requests, details)]}

    # The body's model is built above, so FastAPI is handed it as an object, not as a name to resolve.
    submit_batch.__annotations__["body"] = batch_request
    app.post(
        "/api/batches",
        status_code=202,
        dependencies=auth,
        responses=documented(400, 401, 413, 415, 422, 429, 501),
        tags=["jobs"],
    )(submit_batch)

    @app.post(
        "/api/tokens", dependencies=auth, responses=documented(400, 401, 413, 415, 422), tags=["prompts"]
    )
    def tokens(body: TokenQuery) -> dict:
        """A prompt's length in the text encoder's tokens (end token included) and what it reads:
        ``{"count", "limit", "truncated"}``; tokens past ``limit`` are dropped at generation."""
        count = jobs.count_tokens(body.prompt)
        return {"count": count, "limit": TEXT_TOKENS, "truncated": count is not None and count > TEXT_TOKENS}
