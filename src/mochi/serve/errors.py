"""One error body for every refusal of the API, documented in its OpenAPI description.

Every 4xx/5xx reply of ``mochi serve`` — whether raised by a route (``HTTPException``), by FastAPI's body
validation, or by the guard in front of the app (401, 413, 415, 400) — is ``ErrorBody``:
``{"detail": one line, "errors": [{"field": ..., "message": ...}]}``, ``errors`` listing the fields at fault
(empty when no field is). Replies never echo unbounded input: quoted values are cut to ``QUOTE_CHARS``
characters, and bodies are rendered as ASCII JSON, so nothing a client sends (a lone surrogate, a NaN) can
make the error reply itself fail.
"""

from __future__ import annotations

import json
import re
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

QUOTE_CHARS = 60

# Statuses the API documents (with ErrorBody) and why each is sent.
STATUS_MEANING = {
    400: "the Host header is not a loopback name on a server without a token",
    401: "missing or wrong bearer token",
    404: "no such job (or its video was removed)",
    408: "the request was not received in time",
    409: "the job's video does not exist yet",
    410: "the job failed or was cancelled: it has no video, and never will",
    413: "the request body is larger than the server accepts",
    415: "a request with a body must be sent as Content-Type: application/json",
    422: "invalid values: detail names each field, the rule and the nearest valid choice",
    429: "the queue is full; retry after Retry-After seconds",
    501: "the feature asked for is not supported by this server's pipeline",
    507: "the server's disk is full: the upload was not kept",
}


class FieldError(BaseModel):
    field: str = Field(description="the field at fault, dotted for nested ones; 'body' for the whole body")
    message: str = Field(description="the rule it breaks")


class ErrorBody(BaseModel):
    """The body of every error reply."""

    detail: str = Field(description="one line: what was refused, why, and what would be accepted")
    errors: list[FieldError] = Field(default_factory=list, description="the fields at fault (may be empty)")


def documented(*statuses: int) -> dict[int | str, dict]:
    """``responses=`` for a route: each status documented with ``ErrorBody``."""
    return {s: {"model": ErrorBody, "description": STATUS_MEANING[s]} for s in statuses}


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (with the full length said), for quoting input safely."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:limit]}…{size}"


def error_json(detail: str, errors: list[dict] | None = None) -> bytes:
    """The ErrorBody JSON, ASCII-only (so any text encodes) and without NaN (which JSON cannot hold)."""
    return json.dumps({"detail": detail, "errors": errors or []}, ensure_ascii=True, allow_nan=False).encode()


class ErrorResponse(JSONResponse):
    def render(self, content: object) -> bytes:
        return error_json(content["detail"], content.get("errors"))


MAX_ERRORS = 20  # field errors one reply lists (a body of 100000 unknown keys made an 11 MB reply)


def _validation_errors(exc: RequestValidationError) -> tuple[str, list[dict]]:
    parts, fields = [], []
    errors = exc.errors()
    for err in errors[:MAX_ERRORS]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        message = str(err.get("msg", "invalid"))
        if err.get("type") == "json_invalid":  # its loc is the byte offset, not a field
            message, loc = f"{message} at character {loc[0]}" if loc else message, []
        name = ".".join(loc) or "body"
        got = err.get("input")
        shown = f" (got {quote(got)})" if "input" in err and not isinstance(got, dict | list) else ""
        parts.append(f"{name}: {message}{shown}")
        fields.append({"field": name, "message": message})
    if len(errors) > MAX_ERRORS:
        parts.append(f"and {len(errors) - MAX_ERRORS} more errors")
    return "; ".join(parts), fields


def install_error_handlers(app: FastAPI) -> None:
    """Make every HTTPException and validation failure reply with ``ErrorBody``."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> ErrorResponse:
        detail, fields = _validation_errors(exc)
        return ErrorResponse({"detail": detail, "errors": fields}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> ErrorResponse:
        unreadable = body_refusal(exc)
        if unreadable is not None:
            fields = [{"field": "body", "message": unreadable}]
            return ErrorResponse({"detail": f"body: {unreadable}", "errors": fields}, status_code=422)
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":  # the router's: no route has this path
            detail = f"no route {quote(request.url.path)}; the API's routes are listed in /openapi.json"
        return ErrorResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


def body_refusal(exc: StarletteHTTPException) -> str | None:
    """What was wrong with a JSON body FastAPI could not parse, when ``exc`` is its catch-all "error parsing
    the body" (400) over a cause it does not name: bytes that are not UTF-8, nesting too deep to parse, or
    an integer longer than Python converts."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        bad = cause.object[cause.start]
        return f"not UTF-8 (byte {bad:#04x} at offset {cause.start}); send JSON as UTF-8"
    if isinstance(cause, RecursionError):
        return "JSON nested too deeply to parse; the API's requests are flat objects"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):  # sys.int_max_str_digits
        return (
            f"a number has more than {sys.get_int_max_str_digits()} digits, too long to parse; the API's "
            "whole numbers are at most 2**63-1 (19 digits)"
        )
    return None


_SPAN = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def check_range(header: str | None, size: int) -> str | None:
    """Refuse a ``Range`` header Starlette's FileResponse would refuse, as ``ErrorBody`` (400 malformed,
    416 with ``Content-Range: bytes */size`` when no span starts inside the file) rather than its plain
    text; a valid one is left to FileResponse. Returns the header FileResponse is to see instead, or None
    to leave it: the spans that start inside the file, when some do not (RFC 9110 serves a set of ranges
    of which one is satisfiable; Starlette answered such a set 416 with an empty text/plain body)."""
    if header is None:
        return None
    unit, _, spans = header.partition("=")
    parsed = [_SPAN.match(part) for part in spans.split(",")] if unit.strip().lower() == "bytes" else [None]
    if any(m is None or m.groups() == ("", "") for m in parsed):
        raise StarletteHTTPException(400, f"Range {quote(header)} is not of the form bytes=START-END[, …]")
    bounds = [(int(a) if a else None, int(b) if b else None) for a, b in (m.groups() for m in parsed)]
    if any(a is not None and b is not None and a > b for a, b in bounds):
        raise StarletteHTTPException(400, f"Range {quote(header)} has a span that ends before it starts")
    # A suffix span (bytes=-N) starts N bytes before the end: bytes=-0 starts past it, as Starlette sees it.
    inside = [(a if a is not None else size - b) < size for a, b in bounds]
    if not any(inside):
        raise StarletteHTTPException(
            416, f"Range {quote(header)} starts past the video's {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )  # fmt: skip
    if all(inside):
        return None
    return "bytes=" + ",".join(m.group(0).strip() for m, kept in zip(parsed, inside) if kept)
