"""Video uploads for video-to-video: ``POST /api/uploads`` takes the file as the raw body.

The body is the video itself with its own ``Content-Type`` (``video/mp4``, ``video/webm``, ...), not a
multipart form: a browser sends ``fetch(url, {method: "POST", body: file})`` as it is, no form parser is
needed, and a cross-site page cannot send a ``video/*`` body without a CORS preflight (which this server
never grants), whereas ``multipart/form-data`` is a "simple" type that it could. The upload is streamed to
``<out-dir>/uploads/<id>`` (at most ``MAX_UPLOAD`` bytes, 413 above), decoded once to check it is a video,
and then named by its id in ``POST /api/jobs``' ``init_video``; its path never reaches the client.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from mochi.files import partial_name, sweep_once
from mochi.serve.errors import documented
from mochi.serve.history import JOB_ID
from mochi.video import MAX_FRAME_PIXELS, UncappedContainer, display_size, open_video, sample_aspect

MAX_UPLOAD = 512 * 1024 * 1024  # bytes
# What the uploads folder may hold, kept uploads and those arriving together: uploads stay until deleted,
# so without a bound a client could fill the disk 512 MiB at a time (507 beyond, naming DELETE).
MAX_UPLOADS = 64
MAX_UPLOADS_BYTES = 8 * MAX_UPLOAD
UPLOAD_TYPES = ("video/", "application/octet-stream")
# The largest frame an upload may have: 8K UHD, the most any video is decoded at. Frames are fitted to the
# output size as they are decoded, but one decoded frame still lies in memory whole (7680×4320: 100 MB as
# uint8, 400 MB while resized).
MAX_UPLOAD_PIXELS = MAX_FRAME_PIXELS
# What ``guards.RequestGuard`` lets through to this route before the body is read: media types ("video/"
# takes any video type; none of them is a type a cross-site form may send without a preflight).
GUARD_RULE = {"/api/uploads": (UPLOAD_TYPES, MAX_UPLOAD)}


def upload_dir(out_dir: Path) -> Path:
    return out_dir / "uploads"


def upload_path(out_dir: Path, upload_id: str) -> Path | None:
    """The file of upload ``upload_id``, or None when there is no such upload (or it is not an id)."""
    if not isinstance(upload_id, str) or not JOB_ID.fullmatch(upload_id):
        return None
    path = upload_dir(out_dir) / upload_id
    return path if path.is_file() else None


def _kept(folder: Path) -> tuple[int, int]:
    """(count, bytes) of the uploads kept in ``folder``."""
    sizes = [p.stat().st_size for p in folder.iterdir() if JOB_ID.fullmatch(p.name) and p.is_file()]
    return len(sizes), sum(sizes)


def _full(count: int, size: int) -> HTTPException:
    return HTTPException(
        507,
        f"the server's upload space is full ({count} uploads, {size / 2**20:.0f} MiB; at most {MAX_UPLOADS} "
        f"and {MAX_UPLOADS_BYTES // 2**20} MiB are kept): delete uploads no job needs with "
        "DELETE /api/uploads/{id}",
    )


def add_routes(app: Any, jobs: Any, auth: list) -> None:
    # An upload cut short by a killed server left its temporary: named with the pid, it is removed as the
    # server starts, that process being gone (an id's name never starts with a dot, so no upload is
    # touched); it held the space the uploads are counted against until the first upload otherwise.
    sweep_once(upload_dir(jobs.out_dir))
    arriving = {"count": 0, "bytes": 0}  # uploads being received now (one event loop: no lock needed)

    @app.post(
        "/api/uploads",
        status_code=201,
        dependencies=auth,
        responses=documented(400, 401, 413, 415, 422, 507),
        tags=["uploads"],
    )
    async def upload(request: Request) -> dict:
        """Upload a video (the raw file as the body, ``Content-Type: video/...``) for video-to-video:
        201 with ``{"id", "frames", "width", "height", "fps"}``; give the id as ``init_video`` in
        ``POST /api/jobs``. 413 above 512 MiB, 415 for another content type or a container that cannot be
        decoded under the frame-size cap (an MPEG program stream: convert it to .mp4), 422 if it is not a
        video (or its frames are larger than 8K), 507 when the server's disk is full or its uploads fill
        their space (``MAX_UPLOADS`` files, ``MAX_UPLOADS_BYTES``)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not kind.startswith(UPLOAD_TYPES):
            raise HTTPException(
                415, f"Content-Type {kind or 'none'!r}: send the video file as video/mp4 (or video/*)"
            )
        folder = upload_dir(jobs.out_dir)
        try:
            folder.mkdir(exist_ok=True)
        except OSError as e:  # a file of that name in the output folder (it was a 500 with a traceback)
            why = "a file has its name" if folder.is_file() else e.strerror
            raise HTTPException(
                500, f"upload refused: the server cannot store it (its {folder.name!r} folder: {why})"
            ) from None
        kept, kept_bytes = _kept(folder)
        if kept + arriving["count"] >= MAX_UPLOADS:
            raise _full(kept + arriving["count"], kept_bytes + arriving["bytes"])
        upload_id = secrets.token_urlsafe(12)
        final, partial = folder / upload_id, folder / partial_name(upload_id)
        size = 0
        arriving["count"] += 1
        try:
            try:
                with open(partial, "wb") as f:
                    async for chunk in request.stream():
                        size += len(chunk)
                        arriving["bytes"] += len(chunk)
                        if size > MAX_UPLOAD:
                            raise HTTPException(413, f"the upload exceeds {MAX_UPLOAD // 2**20} MiB")
                        if kept_bytes + arriving["bytes"] > MAX_UPLOADS_BYTES:
                            raise _full(kept + arriving["count"], kept_bytes + arriving["bytes"])
                        f.write(chunk)
            except ClientDisconnect:
                # Nobody is left to answer; an ordinary 400 keeps a client's hang-up out of the error log.
                raise HTTPException(400, f"the client left after {size} bytes; upload dropped") from None
            except OSError as e:  # the output folder's disk is full, or cannot be written
                status = 507 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 500
                why = "the server's disk is full" if status == 507 else "the server cannot store it"
                raise HTTPException(
                    status, f"upload dropped after {size} bytes: {why} ({e.strerror})"
                ) from None
            if size == 0:
                raise HTTPException(422, "the upload is empty; send the video file as the body")
            # Counting a long file's packets takes seconds: off the event loop, so other clients go on.
            info = await run_in_threadpool(probe, partial)
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
            arriving["count"] -= 1
            arriving["bytes"] -= size
        return {"id": upload_id, **info, "bytes": size}

    @app.delete("/api/uploads/{upload_id}", dependencies=auth, responses=documented(401, 404, 409, 422))
    def delete_upload(upload_id: str) -> dict:
        """Delete an upload (uploads are kept until deleted: they are not a job's files). 409 while a queued
        or running job starts from it."""
        from mochi.serve.errors import quote
        from mochi.serve.jobs import FINAL

        path = upload_path(jobs.out_dir, upload_id)
        if path is None:
            raise HTTPException(404, f"no upload {quote(upload_id)} on this server")
        users = [j.id for j in jobs.jobs() if j.status not in FINAL and j.request.init_video == str(path)]
        if users:
            raise HTTPException(409, f"job {users[0]!r} starts from upload {upload_id!r}; cancel it first")
        path.unlink(missing_ok=True)
        return {"id": upload_id, "deleted": True}


def probe(path: Path) -> dict:
    """Frame count, size and rate of a video; 422 if it is not one (or its frames are too large), 415 for a
    container ``open_video`` cannot open under the frame-size cap (an MPEG program stream). A frame is
    counted only if it decodes, as ``read_video`` stops at a damaged one: the first ``LIMITS["frames"]``
    frames (all a job may ask for) are decoded one at a time, none kept, and the count ends at the first
    that fails; an undamaged clip longer than that has its packets counted (it is not decoded whole)."""
    import av

    from mochi.serve.api import LIMITS

    packets, frames, first, damaged, declared = 0, 0, None, False, (0, 0)
    try:
        # ffmpeg refuses frames above the cap before allocating them (a 730 KB file of 16000x16000 frames
        # took 770 MB per upload while its size was checked; later frames larger than the first, a PNG
        # sequence's, went on to the job's decode).
        with open_video(path, MAX_UPLOAD_PIXELS) as container:
            stream = container.streams.video[0]
            # Read while the container is open: the stream's fields point into it.
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            declared = (stream.codec_context.width, stream.codec_context.height)  # the header's, if it says
            sar = sample_aspect(stream)
            for packet in container.demux(stream):  # ends with an empty packet, which flushes the decoder
                packets += 1 if packet.size else 0
                if damaged or frames >= LIMITS["frames"]:
                    continue
                try:
                    for frame in stream.decode(packet):
                        if first is None:
                            first = frame
                            _check_size(frame)
                        frames += 1
                except av.error.FFmpegError:
                    damaged = True
    except UncappedContainer as e:
        raise HTTPException(
            415,
            f"the upload is {e.kind}, which is not read: its decoder cannot be given the frame-size cap "
            f"before it is probed; convert it to .mp4 first, e.g. ffmpeg -i clip{e.suffix} clip.mp4",
        ) from None
    except (av.error.FFmpegError, IndexError, ValueError):
        first = None
    if first is None and declared[0] * declared[1] > MAX_UPLOAD_PIXELS:
        _refuse_size(*declared)
    if first is None:
        raise HTTPException(
            422,
            "the upload is not a video that can be decoded (mp4, webm, mov, ...), or its frames are larger "
            f"than {MAX_UPLOAD_PIXELS:,} pixels (7680x4320)",
        )
    height, width = display_size(first, sar)  # as players show it (turned, non-square pixels widened)
    frames = frames if damaged or frames < LIMITS["frames"] else max(frames, packets)
    return {"frames": frames, "width": width, "height": height, "fps": rate}


def _check_size(frame) -> None:  # noqa: ANN001 - av.VideoFrame
    """422 for a frame larger than ``MAX_UPLOAD_PIXELS`` (found on the first, before any more decode)."""
    height, width = display_size(frame)
    if width * height > MAX_UPLOAD_PIXELS:
        _refuse_size(width, height)


def _refuse_size(width: int, height: int) -> None:
    raise HTTPException(
        422,
        f"the upload's frames are {width}x{height}, more than {MAX_UPLOAD_PIXELS:,} pixels (7680x4320); "
        "scale the video down first",
    )
