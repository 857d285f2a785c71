"""`mochi serve` against hostile or careless clients (issue 19): content types, non-finite numbers, body
size and authentication before the body, cancellation inside a stage, the cap on work, one error schema,
start-up checks, response headers, paths in errors, HEAD, DELETE and slow requests. Real servers on
127.0.0.1, the tiny random pipeline."""

from __future__ import annotations

import json
import select
import socket
import threading

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra (fastapi, uvicorn)")
jsonschema = pytest.importorskip("jsonschema", reason="needs jsonschema (the dev extra)")

from mochi.cli import main  # noqa: E402
from mochi.pipeline import MochiPipeline  # noqa: E402
from mochi.serve.redact import redact_paths  # noqa: E402
from mochi.serve.server import slow_request_protocol  # noqa: E402

from .serve_harness import AppServer, LiveServer, call, call_json, wait_for  # noqa: E402
from .test_pipeline import tiny_components  # noqa: E402

TOKEN = "s3cret-test-token"
FINAL = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def pipe():
    return MochiPipeline(tiny_components(), device="cpu")


@pytest.fixture(scope="module")
def live(pipe, tmp_path_factory):
    # The tiny model's default (7 frames at 32x32, 3 steps) is exactly at the cap.
    limits = {"max_pixels": 7 * 32 * 32, "max_pixel_steps": 7 * 32 * 32 * 3}
    with LiveServer(pipe, tmp_path_factory.mktemp("out"), queue_size=2, **limits) as server:
        yield server


@pytest.fixture(scope="module")
def locked(pipe, tmp_path_factory):
    with LiveServer(pipe, tmp_path_factory.mktemp("out"), token=TOKEN) as server:
        yield server


def raw(url: str, head: str, body: bytes = b"", *, timeout: float = 20) -> bytes:
    """Send ``head`` (request line and headers, without the blank line) and ``body``; read the reply."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(f"{head}\r\nHost: {host}\r\n\r\n".encode() + body)
        return read_reply(s)


def read_reply(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or len(data) < reply_length(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def reply_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return len(data) + 1


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def body_of(reply: bytes) -> dict:
    return json.loads(reply.partition(b"\r\n\r\n")[2], parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


# -- 1. Content-Type ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "multipart/form-data; boundary=x", "application/jsonx", ""]
)
def test_state_changing_requests_not_sent_as_json_are_415(live, content_type):
    """What a cross-origin no-cors fetch, a Blob without a type or sendBeacon can send starts nothing."""
    known = len(live.jobs.jobs())
    body = b'{"prompt": "x", "steps": 1}'
    head = f"POST /api/jobs HTTP/1.1\r\nContent-Length: {len(body)}\r\nConnection: close"
    if content_type is not None:
        head += f"\r\nContent-Type: {content_type}"
    reply = raw(live.url, head, body)
    assert status_of(reply) == 415, reply
    assert "send the body as application/json" in body_of(reply)["detail"]
    assert len(live.jobs.jobs()) == known


def test_json_with_a_charset_is_accepted_and_cancel_needs_json_too(live):
    body = b'{"prompt": "x", "steps": 1}'
    head = "POST /api/jobs HTTP/1.1\r\nContent-Type: application/json; charset=utf-8\r\nConnection: close"
    reply = raw(live.url, f"{head}\r\nContent-Length: {len(body)}", body)
    assert status_of(reply) == 202, reply
    job_id = body_of(reply)["id"]
    reply = raw(
        live.url, f"POST /api/jobs/{job_id}/cancel HTTP/1.1\r\nContent-Length: 0\r\nConnection: close"
    )
    assert status_of(reply) == 415
    wait_for(live.url, job_id, FINAL)


# -- 2. Non-finite numbers, lone surrogates, echoed input -----------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"prompt": "x", "guidance": NaN}', "guidance: Input should be a finite number"),
        ('{"prompt": "x", "guidance": Infinity}', "guidance: Input should be a finite number"),
        ('{"prompt": "x", "guidance": -Infinity}', "guidance: Input should be a finite number"),
        ('{"prompt": "x", "guidance": 1e999}', "guidance: Input should be a finite number"),
        ('{"prompt": "x", "lora_scale": NaN}', "lora_scale: Input should be a finite number"),
        (
            '{"prompt": "a\\ud800b"}',
            "prompt: Input should be a valid string, unable to parse raw data as a unicode string (got 'a\\ud800b')",
        ),
        (
            '{"prompt": "x", "negative_prompt": "\\udfff"}',
            "negative_prompt: Input should be a valid string, unable to parse raw data",
        ),
    ],
)
def test_non_finite_numbers_and_lone_surrogates_are_422(live, body, message):
    status, _, data = call("POST", f"{live.url}/api/jobs", raw=body.encode())
    reply = json.loads(data, parse_constant=lambda c: pytest.fail(f"{c} in the reply"))
    assert status == 422 and message in reply["detail"], reply


def test_error_replies_do_not_echo_long_input(live):
    status, _, data = call("POST", f"{live.url}/api/jobs", {"prompt": "p" * 100_000})
    assert status == 422 and len(data) < 600, len(data)
    assert "prompt: String should have at most 4000 characters (got 'ppp" in json.loads(data)["detail"]
    assert "(100000 characters)" in json.loads(data)["detail"]
    status, _, data = call("POST", f"{live.url}/api/jobs", {"prompt": "x", "lora": "l" * 5000})
    assert status == 422 and len(data) < 600, len(data)
    status, _, data = call("GET", f"{live.url}/api/jobs/{'j' * 5000}")
    assert status == 404 and len(data) < 300, len(data)


# -- 3. Body size, and the token before the body --------------------------------------------------------------


def test_without_the_token_a_huge_body_is_refused_before_it_is_read(locked):
    """Only the headers are sent: a server that reads the body before checking the token never replies."""
    head = "POST /api/jobs HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 1000000000"
    reply = raw(locked.url, head)
    assert status_of(reply) == 401 and body_of(reply)["detail"] == "missing or wrong bearer token"
    assert b"www-authenticate: Bearer" in reply
    reply = raw(locked.url, f"{head}\r\nAuthorization: Bearer wrong-token-of-some-length")
    assert status_of(reply) == 401
    assert locked.jobs.jobs() == []


def test_a_declared_body_over_the_cap_is_413_before_it_is_read(locked):
    head = "POST /api/jobs HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 1000000000"
    reply = raw(locked.url, f"{head}\r\nAuthorization: Bearer {TOKEN}")
    assert status_of(reply) == 413
    assert body_of(reply)["detail"] == (
        "request body of 1000000000 bytes refused: at most 1048576 bytes are accepted"
    )


def test_a_chunked_body_is_cut_off_at_the_cap(live):
    """64 KiB chunks are sent until the server answers: it must answer 413 long before 64 MiB."""
    host, port = live.url.removeprefix("http://").split(":")
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(
            f"POST /api/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        while sent < 64 << 20 and not select.select([s], [], [], 0)[0]:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 65536
        reply = read_reply(s)
    assert status_of(reply) == 413, (sent, reply[:200])
    assert (
        body_of(reply)["detail"]
        == "request body of more than 1048576 bytes refused: at most 1048576 bytes are accepted"
    )
    assert sent < 64 << 20


def test_a_chunked_body_under_the_cap_is_a_job(live):
    body = json.dumps({"prompt": "chunked", "steps": 1}).encode()
    chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    head = "POST /api/jobs HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
    reply = raw(live.url, f"{head}\r\nConnection: close", chunks)
    assert status_of(reply) == 202, reply
    assert wait_for(live.url, body_of(reply)["id"], FINAL)["status"] == "done"
