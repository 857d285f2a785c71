"""`mochi serve` against hostile or careless clients (issue 19): content types, non-finite numbers, body
size and authentication before the body, cancellation inside a stage, the cap on work, one error schema,
start-up checks, response headers, paths in errors, HEAD, DELETE and slow requests. Real servers on
127.0.0.1, the tiny random pipeline."""

from __future__ import annotations

import json
import select
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra (fastapi, uvicorn)")
jsonschema = pytest.importorskip("jsonschema", reason="needs jsonschema (the dev extra)")

from mochi.cli import main  # noqa: E402
from mochi.pipeline import MochiPipeline  # noqa: E402
from mochi.serve.guards import RequestGuard  # noqa: E402
from mochi.serve.jobs import JobManager  # noqa: E402
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


# -- 1. Content-Type -------------------------------------------------------------------------------


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


# -- 2. Non-finite numbers, lone surrogates, echoed input ------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"prompt": "x", "guidance": NaN}', "guidance: Input should be a finite number"),
        ('{"prompt": "x", "guidance": Infinity}', "guidance: Input should be a finite number"),
        ('{"prompt": "x", "guidance": -Infinity}', "guidance: Input should be a finite number"),
        ('{"prompt": "x", "guidance": 1e999}', "guidance: Input should be a finite number"),
        ('{"prompt": "x", "lora_scale": NaN}', "lora_scale: Input should be a finite number"),
        (
            '{"prompt": "x", "loras": [{"name": "a.safetensors", "scale": NaN}]}',
            "loras.0.scale: Input should be a finite number",
        ),
        (
            '{"prompt": "a\\ud800b"}',
            "prompt: Input should be a valid string, unable to parse raw data as a unicode string "
            "(got 'a\\ud800b')",
        ),
        (
            '{"prompt": "x", "negative_prompt": "\\udfff"}',
            "negative_prompt: Input should be a valid string, unable to parse raw data",
        ),
        # JSON true/false are not numbers (pydantic's lax mode read "frames": true as a 1-frame job).
        ('{"prompt": "x", "frames": true}', "frames: Value error, must be a number, not true"),
        ('{"prompt": "x", "seed": false}', "seed: Value error, must be a number, not false"),
        ('{"prompt": "x", "guidance": true}', "guidance: Value error, must be a number, not true"),
        (
            '{"prompt": "x", "loras": [{"name": "a.safetensors", "scale": true}]}',
            "loras.0.scale: Value error, must be a number, not true",
        ),
        # An empty LoRA name is no name (it dropped lora and lora_scale without a word).
        ('{"prompt": "x", "lora": "", "lora_scale": 2}', "lora: String should have at least 1 character"),
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
    status, _, data = call("GET", f"{live.url}/api/jobs/{'j' * 5000}/preview")
    assert status == 404 and len(data) < 300, len(data)
    # A body of many unknown fields: the reply lists the first 20 and counts the rest.
    status, _, data = call(
        "POST", f"{live.url}/api/jobs", {"prompt": "x", **{str(i): 0 for i in range(5000)}}
    )
    reply = json.loads(data)
    assert status == 422 and len(reply["errors"]) == 20 and reply["detail"].endswith("and 4980 more errors")
    assert len(data) < 5000, len(data)


def test_batches_take_no_boolean_count(live):
    status, reply = call_json("POST", f"{live.url}/api/batches", {"prompt": "x", "count": True})
    assert status == 422 and "count: Value error, must be a number, not true" in reply["detail"], reply


# -- 3. Body size, and the token before the body ---------------------------------------------------


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


def test_an_upload_route_takes_its_own_type_and_size_but_never_a_form():
    async def echo(scope, receive, send) -> None:  # noqa: ANN001
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        reply = b"%d" % len(body)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(reply))],
            }
        )
        await send({"type": "http.response.body", "body": reply})

    uploads = {"/up": (("video/mp4", "multipart/form-data"), 100)}
    with AppServer(RequestGuard(echo, token=None, max_body=10, uploads=uploads)) as server:

        def post(path: str, kind: str, size: int) -> bytes:
            head = (
                f"POST {path} HTTP/1.1\r\nConnection: close\r\nContent-Type: {kind}\r\nContent-Length: {size}"
            )
            return raw(server.url, head, b"x" * size)

        assert post("/up/1", "video/mp4", 100).endswith(b"\r\n\r\n100")
        assert status_of(post("/up/1", "video/mp4", 101)) == 413
        assert status_of(post("/up/1", "multipart/form-data; boundary=b", 5)) == 415  # a form: never
        assert status_of(post("/other", "video/mp4", 5)) == 415
        assert status_of(post("/other", "application/json", 11)) == 413
        assert post("/other", "application/json", 10).endswith(b"\r\n\r\n10")


# -- 4. Cancel inside a stage; the cap on work -----------------------------------------------------


class Holder:
    """Holds the first call of any submodule of ``component`` once ``ready()`` (the server's worker waits
    there) until released, and counts every module call of the pipeline after the release."""

    def __init__(self, pipe: MochiPipeline, component: str, ready) -> None:  # noqa: ANN001
        self.ready = ready
        self.entered, self.gate = threading.Event(), threading.Event()
        self.after = 0
        self.handles = []
        held = {m for m in getattr(pipe.components, component).modules()}
        for model in pipe.components.modules():
            for m in model.modules():
                self.handles.append(m.register_forward_pre_hook(self.hook(m in held)))

    def hook(self, held: bool):  # noqa: ANN201
        def pre(module, args) -> None:  # noqa: ANN001
            if self.gate.is_set():
                self.after += 1
            elif held and self.ready():
                self.entered.set()
                self.gate.wait(20)

        return pre

    def remove(self) -> None:
        self.gate.set()
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize(
    "stage, component", [("text", "text_encoder"), ("denoise", "dit"), ("decode", "decoder")]
)
def test_cancel_stops_a_job_inside_any_stage(live, pipe, stage, component):
    """A cancel during one module call stops the job before the next one: no further module of any
    model runs (before, a job ran on to the end of its denoising step or of the whole decode)."""

    def reached() -> bool:  # the denoising stage is reported before its first step: hold in that one
        return any(j.status == "running" and j.stage == stage for j in live.jobs.jobs())

    holder = Holder(pipe, component, reached)
    try:
        status, job = call_json("POST", f"{live.url}/api/jobs", {"prompt": "held", "seed": 1})
        assert holder.entered.wait(20), "the job never reached the held module"
        assert call_json("DELETE", f"{live.url}/api/jobs/{job['id']}")[1]["status"] == "running"
        holder.gate.set()
        job = wait_for(live.url, job["id"], FINAL)
        assert job["status"] == "cancelled" and job["error"] == "cancelled while running"
        assert job["progress"]["stage"] == stage and job["progress"]["step"] == 0
        assert holder.after == 0, f"{holder.after} module calls after the cancel"
    finally:
        holder.remove()
    assert not (live.jobs.out_dir / f"{job['id']}.mp4").exists()
    # The checks are gone with the job: the next one runs to the end.
    status, job = call_json("POST", f"{live.url}/api/jobs", {"prompt": "x", "steps": 1})
    assert wait_for(live.url, job["id"], FINAL)["status"] == "done"


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {"prompt": "x", "frames": 13},
            "frames x height x width = 13x32x32 = 13312 pixels exceeds this server's limit of 7168 per job; "
            "ask for at most 7 frames at 32x32",
        ),
        (
            {"prompt": "x", "width": 48, "height": 160},
            "frames x height x width = 7x160x48 = 53760 pixels exceeds this server's limit of 7168 per job; "
            "ask for a smaller size",
        ),
        (
            {"prompt": "x", "steps": 4},
            "7168 pixels x 4 steps = 28672 exceeds this server's limit of 21504 pixel-steps per job; "
            "ask for at most 3 steps",
        ),
    ],
)
def test_work_above_the_cap_is_422(live, body, message):
    status, reply = call_json("POST", f"{live.url}/api/jobs", body)
    assert status == 422 and reply["detail"] == message


def test_the_cap_is_published(live, pipe, tmp_path):
    limits = call_json("GET", f"{live.url}/api/info")[1]["limits"]
    assert (limits["pixels"], limits["pixel_steps"]) == (7168, 21504)
    assert limits["frames"] == 511  # the per-field bounds are still there
    # Unset, the caps follow the device: a CPU gets smaller ones (its attention calls are slower).
    jobs = JobManager(pipe, tmp_path)
    try:
        assert jobs.work_limits == {"pixels": 25 * 128 * 128, "pixel_steps": 25 * 128 * 128 * 64}
    finally:
        jobs.close()


# -- 6. One error schema, documented and sent ------------------------------------------------------


def error_replies(live, locked) -> list[tuple[str, str, int, dict]]:
    """(method, OpenAPI path, status, body) for each refusal the API makes, provoked on live servers."""
    u, got = live.url, []

    def add(method: str, path: str, status: int, reply: bytes) -> None:
        got.append((method, path, status, body_of(reply)))

    add("get", "/api/jobs/{job_id}", 404, raw(u, "GET /api/jobs/nope HTTP/1.1\r\nConnection: close"))
    head = "POST /api/jobs HTTP/1.1\r\nConnection: close\r\nContent-Type: application/json"
    add(
        "post",
        "/api/jobs",
        415,
        raw(u, "POST /api/jobs HTTP/1.1\r\nConnection: close\r\nContent-Length: 2", b"{}"),
    )
    add("post", "/api/jobs", 413, raw(u, f"{head}\r\nContent-Length: 2000000"))
    add("post", "/api/jobs", 422, raw(u, f"{head}\r\nContent-Length: 2", b"{}"))  # validation
    lora = b'{"prompt": "x", "lora": "none.safetensors"}'
    add("post", "/api/jobs", 422, raw(u, f"{head}\r\nContent-Length: {len(lora)}", lora))  # a route's own
    bad_host = "GET /api/info HTTP/1.1\r\nConnection: close\r\nHost: evil.example\r\n\r\n"
    host, port = u.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(bad_host.encode())
        add("get", "/api/info", 400, read_reply(s))
    add("get", "/api/jobs", 401, raw(locked.url, "GET /api/jobs HTTP/1.1\r\nConnection: close"))
    add("post", "/api/jobs", 401, raw(locked.url, f"{head}\r\nContent-Length: 2", b"{}"))

    holder = Holder(live.jobs.pipeline, "dit", lambda: True)
    try:
        status, running = call_json("POST", f"{u}/api/jobs", {"prompt": "held"})
        assert holder.entered.wait(20)
        add(
            "get",
            "/api/jobs/{job_id}/video",
            409,
            raw(u, f"GET /api/jobs/{running['id']}/video HTTP/1.1\r\nConnection: close"),
        )
        queued = [call_json("POST", f"{u}/api/jobs", {"prompt": "q"})[1] for _ in range(2)]
        body = b'{"prompt": "one too many"}'
        add("post", "/api/jobs", 429, raw(u, f"{head}\r\nContent-Length: {len(body)}", body))
    finally:
        for job in [running, *queued]:
            live.jobs.cancel(job["id"])
        holder.remove()
    return got


def test_every_error_is_the_documented_error_body(live, locked):
    spec = call_json("GET", f"{live.url}/openapi.json")[1]
    locked_spec = call_json("GET", f"{locked.url}/openapi.json")[1]
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas  # FastAPI's own shape
    assert set(schemas["ErrorBody"]["required"]) == {"detail"}
    # Every documented error status of every route refers to ErrorBody.
    for paths in (spec["paths"], locked_spec["paths"]):
        for path, methods in paths.items():
            for method, op in methods.items():
                for status, response in op["responses"].items():
                    if int(status) >= 400:
                        ref = response["content"]["application/json"]["schema"]["$ref"]
                        assert ref == "#/components/schemas/ErrorBody", (path, method, status)
    validator = jsonschema.Draft202012Validator({**schemas["ErrorBody"], "components": spec["components"]})
    seen = set()
    replies = error_replies(live, locked)
    for method, path, status, body in replies:
        # ...and every refusal the servers make is ErrorBody, at a status its route documents.
        validator.validate(body)
        assert set(body) == {"detail", "errors"} and body["detail"], body
        documented = (locked_spec if status == 401 else spec)["paths"][path][method]["responses"]
        assert str(status) in documented, (method, path, status)
        seen.add(status)
    assert seen == {400, 401, 404, 409, 413, 415, 422, 429}
    (empty,) = [b for m, p, s, b in replies if s == 422 and "Field required" in b["detail"]]
    assert empty["errors"] == [{"field": "prompt", "message": "Field required"}]


# -- 8. `mochi serve` refuses bad options before loading a model -----------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (["--fps", "0"], "--fps 0.0 must be a number from 0.1 to 240; nearest valid: 0.1 (Mochi's"),
        (["--fps", "-1"], "--fps -1.0 must be a number from 0.1 to 240; nearest valid: 0.1"),
        (["--fps", "0.05"], "--fps 0.05 must be a number from 0.1 to 240; nearest valid: 0.1"),  # passed here
        (["--fps", "241"], "--fps 241.0 must be a number from 0.1 to 240; nearest valid: 240"),
        (["--queue-size", "0"], "--queue-size 0 must be at least 1"),
        (["--token", "short"], "--token has 5 characters; a bearer token needs at least 16"),
        (["--out-dir", "FILE"], "is a file, not a folder; name a folder (it is created)"),
        (["--max-pixels", "0"], "--max-pixels and --max-pixel-steps must be positive"),
    ],
)
def test_serve_refuses_bad_options_before_loading_the_model(monkeypatch, tmp_path, capsys, options, message):
    import mochi.serve.server

    def no_load(*args, **kw):  # noqa: ANN002, ANN003
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(MochiPipeline, "from_pretrained", staticmethod(no_load))
    monkeypatch.setattr(mochi.serve.server, "check_port", lambda host, port: None)
    monkeypatch.delenv("MOCHI_SERVE_TOKEN", raising=False)
    (tmp_path / "FILE").write_text("not a folder")
    options = [str(tmp_path / o) if o == "FILE" else o for o in options]
    argv = ["serve", "--out-dir", str(tmp_path / "out"), *options, "--model", "/nonexistent"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mochi: error: ") and message in err, err
    assert "Traceback" not in err


# -- 9. Headers, docs, paths in errors, HEAD, DELETE, slow requests --------------------------------


def test_no_page_may_be_framed_and_no_cdn_docs(live):
    for path in ("/", "/api/health", "/api/jobs/nope", "/openapi.json"):
        status, headers, _ = call("GET", live.url + path)
        assert headers["x-frame-options"] == "DENY", path
        assert headers["content-security-policy"] == "frame-ancestors 'none'", path
    assert call("GET", f"{live.url}/docs")[0] == 404 and call("GET", f"{live.url}/redoc")[0] == 404
    status, _, spec = call("GET", f"{live.url}/openapi.json")
    assert status == 200
    _, _, page = call("GET", f"{live.url}/")
    assert b"https://" not in page and b"http://" not in page  # nothing fetched from elsewhere


class FailingWithPath:
    """A pipeline whose generation fails with an error naming an absolute server path."""

    def __init__(self, pipe: MochiPipeline, path: str) -> None:
        self.pipe, self.path = pipe, path

    def __getattr__(self, name: str) -> object:
        return getattr(self.pipe, name)

    def generate(self, request, progress=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        raise FileNotFoundError(2, "No such file or directory", self.path)


def test_job_errors_do_not_show_server_paths(pipe, tmp_path):
    secret = tmp_path / "home" / "alice" / "models" / "dit.safetensors"
    with LiveServer(FailingWithPath(pipe, str(secret)), tmp_path / "out") as server:
        status, job = call_json("POST", f"{server.url}/api/jobs", {"prompt": "x"})
        job = wait_for(server.url, job["id"], FINAL)
    assert job["status"] == "failed"
    assert job["error"] == "FileNotFoundError: [Errno 2] No such file or directory: '…/dit.safetensors'"
    assert str(tmp_path) not in json.dumps(job)


def test_redact_paths():
    assert redact_paths("cannot open /srv/x/y.pt or C:\\Users\\bob\\m.pt, but 1/2 and /tmp stay") == (
        "cannot open …/y.pt or …/m.pt, but 1/2 and /tmp stay"
    )
    # A quoted path is taken whole: a space in a folder name ("Alice Smith") left the rest of it shown.
    message = "'/d/Alice Smith/My LoRAs/bad.safetensors' and \"C:\\Users\\Alice Smith\\x.pt\" and '/one'"
    assert redact_paths(message) == "'…/bad.safetensors' and \"…/x.pt\" and '/one'"


def test_head_of_a_video_and_delete_of_a_finished_job(live):
    status, job = call_json("POST", f"{live.url}/api/jobs", {"prompt": "x", "steps": 1})
    job = wait_for(live.url, job["id"], FINAL)
    assert job["status"] == "done"
    files = [live.jobs.out_dir / f"{job['id']}{ext}" for ext in (".mp4", ".json")]
    status, headers, body = call("HEAD", f"{live.url}/api/jobs/{job['id']}/video")
    assert status == 200 and body == b"" and headers["content-type"] == "video/mp4"
    assert int(headers["content-length"]) == files[0].stat().st_size > 0
    assert call("HEAD", f"{live.url}/api/jobs/nope/video")[0] == 404

    status, gone = call_json("DELETE", f"{live.url}/api/jobs/{job['id']}")
    assert status == 200 and gone["id"] == job["id"] and gone["status"] == "done"
    assert not any(f.exists() for f in files)
    assert call("GET", f"{live.url}/api/jobs/{job['id']}")[0] == 404
    assert job["id"] not in [j["id"] for j in call_json("GET", f"{live.url}/api/jobs")[1]]
    assert call("DELETE", f"{live.url}/api/jobs/{job['id']}")[0] == 404


def test_head_is_served_wherever_get_is(live):
    """FastAPI routes do not add HEAD as Starlette's do: `curl -I /api/health` was 405 ("Allow: GET")."""
    for path in ("/", "/api/health", "/api/info", "/api/jobs", "/api/queue", "/api/history"):
        get_status, get_headers, get_body = call("GET", live.url + path)
        status, headers, body = call("HEAD", live.url + path)
        assert (status, body) == (get_status, b""), path
        assert headers["content-type"] == get_headers["content-type"], path
        assert int(headers["content-length"]) > 0, path
        if path in ("/", "/api/health", "/api/info"):  # the others name the time or jobs' progress
            assert headers["content-length"] == get_headers["content-length"] == str(len(get_body)), path
    assert call("HEAD", f"{live.url}/api/jobs/nope")[0] == 404
    # An event stream sends its head and ends instead of streaming on.
    status, headers, body = call("HEAD", f"{live.url}/api/events")
    assert status == 200 and body == b"" and headers["content-type"].startswith("text/event-stream")


def test_head_needs_the_token_as_get_does(locked):
    assert call("HEAD", f"{locked.url}/api/info")[0] == 401
    assert call("HEAD", f"{locked.url}/api/info", token=TOKEN)[0] == 200
    assert call("HEAD", f"{locked.url}/api/health")[0] == 200


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/api/jobs/abc", "DELETE, GET, HEAD, OPTIONS"),  # said "GET": DELETE is a second route
        ("PUT", "/api/jobs/abc", "DELETE, GET, HEAD, OPTIONS"),
        ("PATCH", "/api/jobs", "GET, HEAD, OPTIONS, POST"),  # said "POST"
        ("POST", "/api/health", "GET, HEAD, OPTIONS"),
        ("GET", "/api/uploads/abc", "DELETE, OPTIONS"),
        ("HEAD", "/api/uploads/abc", "DELETE, OPTIONS"),
    ],
)
def test_a_method_not_served_is_405_with_every_method_allowed(live, method, path, allow):
    status, headers, body = call(method, live.url + path)
    assert status == 405 and headers["allow"] == allow
    if method != "HEAD":
        assert json.loads(body)["detail"] == f"{method} is not served at {path}; it takes {allow}"


def test_options_lists_the_methods_and_405_comes_after_the_token(live, locked):
    status, headers, body = call("OPTIONS", f"{live.url}/api/jobs/abc")
    assert (status, body, headers["allow"]) == (204, b"", "DELETE, GET, HEAD, OPTIONS")
    assert call("PUT", f"{locked.url}/api/info")[0] == 401  # nothing about the routes without the token
    assert call("PUT", f"{locked.url}/api/info", token=TOKEN)[0] == 405


def test_an_unknown_path_names_where_the_routes_are(live):
    status, body = call_json("GET", f"{live.url}/api/job")
    assert status == 404
    assert body["detail"] == "no route '/api/job'; the API's routes are listed in /openapi.json"


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        (b'{"prompt": "\xff\xfe"}', "not UTF-8 (byte 0xff at offset 12); send JSON as UTF-8"),
        # UTF-16 and UTF-32, which FastAPI's json.loads(bytes) read though the docs promised a 422.
        ('{"prompt": "x"}'.encode("utf-16"), "not UTF-8 (byte 0xff at offset 0); send JSON as UTF-8"),
        (
            '{"prompt": "x"}'.encode("utf-16-le"),
            "not UTF-8 (a NUL byte at offset 1: UTF-16 or UTF-32?); send JSON as UTF-8",
        ),
        (b"[" * 10**5 + b"]" * 10**5, "JSON nested too deeply to parse; the API's requests are flat objects"),
        (
            b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
            "a number has more than 4300 digits, too long to parse; the API's whole numbers are at most "
            "2**63-1 (19 digits)",
        ),
    ],
    ids=["not-utf8", "utf16-bom", "utf16-le", "nested", "long-integer"],
)
def test_a_body_that_cannot_be_parsed_says_why(live, sent, message):
    """FastAPI answered both with a 400 "There was an error parsing the body"."""
    status, body = call_json("POST", f"{live.url}/api/jobs", raw=sent)
    assert status == 422
    assert body == {"detail": f"body: {message}", "errors": [{"field": "body", "message": message}]}
    # A path no route serves is still the router's 404, whatever the body.
    status, body = call_json("POST", f"{live.url}/api/job", raw=sent)
    assert status == 404 and body["detail"].startswith("no route '/api/job'")


@pytest.mark.parametrize(
    "sent",
    [
        "POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty",  # headers cut short
        "POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        'Content-Length: 40\r\n\r\n{"pro',  # body cut short
    ],
)
def test_a_request_that_stops_arriving_is_408_and_closed(pipe, tmp_path, sent):
    """Before, uvicorn waited for the rest for ever (the socket's 20 s timeout would fail this test)."""
    from mochi.serve.api import create_app

    jobs = JobManager(pipe, tmp_path)
    try:
        with AppServer(create_app(jobs), http=slow_request_protocol(0.5)) as server:
            host, port = server.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=20) as s:
                s.sendall(sent.encode())
                reply = read_reply(s)
                assert s.recv(10) == b""  # closed
            assert status_of(reply) == 408
            assert body_of(reply)["detail"] == "the request did not arrive within 0.5 s"
            # A connection that sends nothing is closed too; a whole request is served as before.
            with socket.create_connection((host, int(port)), timeout=20) as s:
                assert s.recv(10) == b""
            assert call_json("GET", f"{server.url}/api/health")[0] == 200
    finally:
        jobs.close()


def test_an_upload_may_take_longer_than_the_timeout_while_it_keeps_arriving(pipe, tmp_path):
    """An upload's body counts the timeout from its last piece (a 4 MB file at 100 kB/s was cut at 30 s)."""
    import numpy as np

    from mochi.serve.api import create_app
    from mochi.video import write_video

    data = write_video(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / "c.mp4").read_bytes()
    jobs = JobManager(pipe, tmp_path / "out")
    head = "POST /api/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: video/mp4\r\n"
    head += f"Content-Length: {len(data)}"
    try:
        with AppServer(create_app(jobs), http=slow_request_protocol(0.5)) as server:
            host, port = server.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=20) as s:
                s.sendall(f"{head}\r\n\r\n".encode())
                pieces = [data[i : i + len(data) // 5 + 1] for i in range(0, len(data), len(data) // 5 + 1)]
                for piece in pieces:  # five pieces 0.3 s apart: 1.5 s in all, never 0.5 s idle
                    time.sleep(0.3)
                    s.sendall(piece)
                reply = read_reply(s)
            assert status_of(reply) == 201 and body_of(reply)["frames"] == 3
            with socket.create_connection((host, int(port)), timeout=20) as s:
                s.sendall(f"{head}\r\n\r\n".encode() + data[:10])  # then nothing
                assert status_of(read_reply(s)) == 408
    finally:
        jobs.close()
