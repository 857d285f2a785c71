"""`mochi serve`'s HTTP API against a real server on 127.0.0.1, running the tiny random pipeline."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra (fastapi, uvicorn)")

from mochi.cli import main  # noqa: E402
from mochi.pipeline import MochiPipeline  # noqa: E402
from mochi.request import GenerationRequest  # noqa: E402
from mochi.serve.server import check_binding, check_port, is_loopback  # noqa: E402
from mochi.video import read_video, write_video  # noqa: E402
from mochi.weights.lora import save_lora  # noqa: E402

from .serve_harness import (  # noqa: E402
    FAIL_PROMPT,
    OOM_PROMPT,
    AppServer,
    GatedPipeline,
    LiveServer,
    call,
    call_json,
    settle,
    wait_for,
)
from .test_lora import random_lora  # noqa: E402
from .test_pipeline import tiny_components  # noqa: E402

TOKEN = "s3cret-test-token"


@pytest.fixture(scope="module")
def pipe():
    return GatedPipeline(MochiPipeline(tiny_components(), device="cpu"))


@pytest.fixture(scope="module")
def live(pipe, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("loras")
    save_lora(random_lora(pipe.components.dit), lora_dir / "style.safetensors")
    (lora_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
    with LiveServer(pipe, tmp_path_factory.mktemp("out"), queue_size=2, lora_dir=lora_dir) as server:
        yield server


@pytest.fixture
def url(live, pipe):
    pipe.gate.set()
    yield live.url
    pipe.gate.set()
    settle(live)


def hold(pipe, url):
    """Submit a job that stops after its first denoising step until ``pipe.gate`` is set; return its id."""
    pipe.gate.clear()
    pipe.entered.clear()
    status, job = call_json("POST", f"{url}/api/jobs", {"prompt": "held", "seed": 1})
    assert status == 202, job
    assert pipe.entered.wait(20), "the held job never reached its first step"
    return job["id"]


def test_submit_poll_and_fetch_a_playable_mp4(url, pipe, live, tmp_path):
    body = {"prompt": "a red circle moving right", "seed": 7}
    status, headers, data = call("POST", f"{url}/api/jobs", body)
    job = json.loads(data)
    assert status == 202 and job["status"] in ("queued", "running")
    assert len(job["id"]) >= 16 and job["parameters"]["seed"] == 7
    assert job["parameters"]["frames"] == 7 and job["parameters"]["steps"] == 3  # the tiny model's defaults
    done = wait_for(url, job["id"], ("done", "failed"))
    assert done["status"] == "done", done["error"]
    assert done["progress"] == {"stage": "done", "step": 1, "total": 1, "fraction": 1.0}
    assert set(done["seconds"]) == {"text", "denoise", "decode"}

    status, headers, mp4 = call("GET", f"{url}/api/jobs/{job['id']}/video")
    assert status == 200 and headers["content-type"] == "video/mp4"
    assert "content-disposition" not in {k.lower() for k in headers}
    (tmp_path / "got.mp4").write_bytes(mp4)
    frames, fps = read_video(tmp_path / "got.mp4")
    assert frames.shape == (7, 32, 32, 3) and fps == 30

    # The served video is this request's generation (seed and all). x264's threads make encodings of equal
    # frames differ by a level or two, and another seed's noise differs by far more.
    def encoded(seed: int) -> np.ndarray:
        out = pipe.pipe.generate(GenerationRequest("a red circle moving right", seed=seed)).frames[0]
        return read_video(write_video(out, tmp_path / f"{seed}.mp4"))[0].astype(float)

    same, other = np.abs(frames - encoded(7)).mean(), np.abs(frames - encoded(8)).mean()
    assert same < 4 and other > 10, (same, other)

    status, headers, _ = call("GET", f"{url}/api/jobs/{job['id']}/video?download=1")
    assert status == 200 and headers["content-disposition"].startswith("attachment;")
    assert f"mochi-7-{job['id']}.mp4" in headers["content-disposition"]

    sidecar = json.loads((live.jobs.out_dir / f"{job['id']}.json").read_text())
    assert sidecar["seed"] == 7 and sidecar["prompt"] == "a red circle moving right"
    assert sidecar["frames"] == 7 and sidecar["model"] == "test-tiny"
    assert not [p for p in live.jobs.out_dir.iterdir() if ".partial" in p.name]

    status, history = call_json("GET", f"{url}/api/jobs")
    assert status == 200 and history[0]["id"] == job["id"]
    # The same request and seed again: the same bytes (the job's id and clock times stay in the sidecar).
    again = wait_for(url, call_json("POST", f"{url}/api/jobs", body)[1]["id"], ("done", "failed"))
    assert again["id"] != job["id"] and call("GET", f"{url}/api/jobs/{again['id']}/video")[2] == mp4


def test_ancestral_sampling_is_a_job_parameter(url, live):
    body = {"prompt": "a red circle moving right", "seed": 7, "eta": 1, "eta_above": 0.3}
    status, job = call_json("POST", f"{url}/api/jobs", body)
    assert status == 202 and (job["parameters"]["eta"], job["parameters"]["eta_above"]) == (1, 0.3)
    assert wait_for(url, job["id"], ("done", "failed"))["status"] == "done"
    sidecar = json.loads((live.jobs.out_dir / f"{job['id']}.json").read_text())
    assert (sidecar["eta"], sidecar["eta_above"]) == (1, 0.3)


def test_a_jobs_sidecar_records_what_ran(url, live):
    """It held the request alone: a cached job's forwards and skipped steps (which the CLI's sidecar has)
    were missing, and so were the dtypes, attention backend and VAE split."""
    body = {
        "prompt": "a red circle moving right",
        "seed": 7,
        "steps": 8,
        "cache": "fbcache",
        "cache_threshold": 100,
    }
    status, job = call_json("POST", f"{url}/api/jobs", body)
    assert wait_for(url, job["id"], ("done", "failed"))["status"] == "done"
    sidecar = json.loads((live.jobs.out_dir / f"{job['id']}.json").read_text())
    assert sidecar["cache"] == job["parameters"]["cache"]  # the API's field, as submitted
    assert 1 <= sidecar["dit_forwards"] < 8 and len(sidecar["skipped_steps"]) == 8 - sidecar["dit_forwards"]
    assert (sidecar["dtype"], sidecar["vae_dtype"], sidecar["offload"]) == ("float32", "float32", "none")
    assert sidecar["attention"] and sidecar["vae_plans"]["decode"]["chunk"] >= 1
    assert sidecar["device"] == "cpu" and sidecar["parallel"] is None and sidecar["quantization"] is None


def test_a_coefficient_files_path_stays_out_of_the_served_video(tmp_path):
    """A TeaCache job's sidecar named the server's coefficient file by its absolute path, and the served mp4
    carries a copy of the sidecar."""
    pipe = MochiPipeline(tiny_components(), device="cpu")
    pipe.cache_coefficients = [1.0, 0.0]
    pipe.cache_coefficients_source = "/home/Alice Smith/models/mochi.teacache.json"
    with LiveServer(pipe, tmp_path / "out") as server:
        body = {"prompt": "a red circle", "seed": 1, "steps": 4, "cache": "teacache"}
        job = wait_for(
            server.url, call_json("POST", f"{server.url}/api/jobs", body)[1]["id"], ("done", "failed")
        )
        sidecar = json.loads((server.jobs.out_dir / f"{job['id']}.json").read_text())
        video = call("GET", f"{server.url}/api/jobs/{job['id']}/video")[2]
    assert sidecar["cache_coefficients"] == "…/mochi.teacache.json"
    assert b"mochi.teacache.json" in video and b"Alice" not in video  # the mp4's copy of the sidecar


def test_an_unset_eta_is_the_models():
    from mochi.serve.api import JobRequest
    from mochi.serve.jobs import PARAMETERS

    request = GenerationRequest(**JobRequest(prompt="x").model_dump(include=set(PARAMETERS)))
    assert request.eta is None and request.eta_above is None
    defaults = {**tiny_components().defaults, "eta": 1.0, "eta_above": 0.3}
    assert (request.resolved(defaults).eta, request.resolved(defaults).eta_above) == (1.0, 0.3)
    explicit = GenerationRequest(**JobRequest(prompt="x", eta=0).model_dump(include=set(PARAMETERS)))
    assert explicit.resolved(defaults).eta == 0.0


def test_unset_seed_is_drawn_and_reported(url):
    status, job = call_json("POST", f"{url}/api/jobs", {"prompt": "x", "steps": 1})
    assert status == 202 and isinstance(job["parameters"]["seed"], int)
    assert wait_for(url, job["id"], ("done", "failed"))["status"] == "done"


def test_progress_while_running_then_cancel_at_the_next_step(url, pipe):
    job_id = hold(pipe, url)
    status, job = call_json("GET", f"{url}/api/jobs/{job_id}")
    assert job["status"] == "running"
    assert job["progress"]["stage"] == "denoise"
    assert (job["progress"]["step"], job["progress"]["total"]) == (1, 3)
    assert 0.1 < job["progress"]["fraction"] < 0.9
    assert call("GET", f"{url}/api/jobs/{job_id}/video")[0] == 409

    status, job = call_json("DELETE", f"{url}/api/jobs/{job_id}")
    assert status == 200 and job["status"] == "running"  # it stops at its next step, not mid-step
    pipe.gate.set()
    job = wait_for(url, job_id, ("done", "failed", "cancelled"))
    assert job["status"] == "cancelled" and job["error"] == "cancelled while running"
    assert job["progress"]["step"] == 1  # step 2 never reported: the job stopped there
    status, _, body = call("GET", f"{url}/api/jobs/{job_id}/video")  # 409 invited retries forever
    assert status == 410 and b"is cancelled: it has no video, and never will" in body


def test_full_queue_is_429_and_queued_jobs_cancel_at_once(url, pipe):
    running = hold(pipe, url)
    waiting = [call_json("POST", f"{url}/api/jobs", {"prompt": f"wait {i}", "steps": 1})[1] for i in range(2)]
    assert [j["status"] for j in waiting] == ["queued", "queued"]
    assert [j["queue_position"] for j in waiting] == [0, 1]
    status, headers, data = call("POST", f"{url}/api/jobs", {"prompt": "one too many"})
    assert status == 429 and headers["retry-after"] == "5"
    assert json.loads(data)["detail"] == "the queue is full (2 jobs waiting); retry later"

    status, job = call_json("POST", f"{url}/api/jobs/{waiting[0]['id']}/cancel")
    assert status == 200 and job["status"] == "cancelled" and job["error"] == "cancelled before it started"
    assert call_json("GET", f"{url}/api/jobs/{waiting[1]['id']}")[1]["queue_position"] == 0
    pipe.gate.set()
    assert wait_for(url, running, ("done", "failed"))["status"] == "done"
    assert wait_for(url, waiting[1]["id"], ("done", "failed"))["status"] == "done"


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": "x", "frames": 8}, "frames=8 is not of the form 6k+1"),
        ({"prompt": "x", "frames": 8}, "nearest valid: 7 or 13"),
        ({"prompt": "x", "width": 100}, "width=100 must be a positive multiple of 16; nearest valid: 96 or"),
        ({"prompt": "x", "frames": "many"}, "frames: Input should be a valid integer"),
        ({"prompt": "x", "steps": 0}, "steps: Input should be greater than or equal to 1 (got 0)"),
        ({"prompt": "x", "guidance": -1}, "guidance: Input should be greater than or equal to 0"),
        ({"prompt": "x", "eta": 1.5}, "eta: Input should be less than or equal to 1 (got 1.5)"),
        ({"prompt": "x", "eta_above": 1}, "eta_above: Input should be less than 1 (got 1)"),
        ({"prompt": "x", "stepz": 3}, "stepz: Extra inputs are not permitted"),
        ({"prompt": ""}, "prompt: String should have at least 1 character"),
        ({"negative_prompt": "y"}, "prompt: Field required"),
        ({"prompt": "x", "lora": "../secret.safetensors"}, "lora='../secret.safetensors' is not a file in"),
    ],
)
def test_bad_input_is_422_naming_the_field_and_rule(url, body, message):
    status, reply = call_json("POST", f"{url}/api/jobs", body)
    assert status == 422 and message in reply["detail"], reply


def test_body_that_is_not_json_is_422_and_not_sent_as_json_415(url, live):
    status, _, data = call("POST", f"{url}/api/jobs", raw=b"{not json")
    assert status == 422 and "JSON decode error" in json.loads(data)["detail"]
    # A truncated body: the parser's byte offset is where, not a field called "16".
    status, _, data = call("POST", f"{url}/api/jobs", raw=b'{"prompt": "a r')
    reply = json.loads(data)
    assert status == 422 and reply["errors"][0]["field"] == "body", reply
    assert reply["detail"].startswith("body: JSON decode error at character "), reply
    # What a cross-site form can send without a CORS preflight is not accepted as a job.
    known = len(live.jobs.jobs())
    for kind in ("text/plain", "application/x-www-form-urlencoded"):
        request = urllib.request.Request(f"{url}/api/jobs", data=b'{"prompt": "x"}', method="POST")
        request.add_header("Content-Type", kind)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 415
    assert len(live.jobs.jobs()) == known


def video_of(url: str, body: dict, tmp_path) -> np.ndarray:
    status, job = call_json("POST", f"{url}/api/jobs", body)
    assert status == 202, job
    job = wait_for(url, job["id"], ("done", "failed"))
    assert job["status"] == "done", job["error"]
    (tmp_path / f"{job['id']}.mp4").write_bytes(call("GET", f"{url}/api/jobs/{job['id']}/video")[2])
    return read_video(tmp_path / f"{job['id']}.mp4")[0].astype(float)


def test_lora_applies_to_its_job_only(url, pipe, live, tmp_path):
    status, info = call_json("GET", f"{url}/api/info")
    assert info["loras"] == ["broken.safetensors", "style.safetensors"] and info["lora_supported"] is True
    plain = {"prompt": "a red circle", "seed": 3}
    before = video_of(url, plain, tmp_path)
    styled = video_of(url, {**plain, "lora": "style.safetensors", "lora_scale": 0.8}, tmp_path)
    assert [(p.rsplit("/", 1)[-1], s) for p, s, _ in pipe.pipe.loras] == [("style.safetensors", 0.8)]
    (job,) = [j for j in live.jobs.jobs() if j.lora][:1]
    assert job.parameters()["loras"] == [{"name": "style.safetensors", "scale": 0.8}]
    assert job.parameters()["lora"] is None and job.parameters()["lora_scale"] is None  # said once, in loras
    sidecar = json.loads((live.jobs.out_dir / f"{job.id}.json").read_text())
    assert sidecar["loras"] == [{"name": "style.safetensors", "scale": 0.8}] and sidecar["lora"] is None
    after = video_of(url, plain, tmp_path)  # the next job without a LoRA must not inherit it
    assert pipe.pipe.loras == []
    assert np.abs(after - before).mean() < 4 < np.abs(styled - before).mean()


def test_broken_lora_fails_its_job_only(url):
    status, job = call_json("POST", f"{url}/api/jobs", {"prompt": "x", "lora": "broken.safetensors"})
    job = wait_for(url, job["id"], ("done", "failed"))
    assert job["status"] == "failed"
    assert job["error"].startswith("ValueError: LoRA 'broken.safetensors' cannot be applied: WeightsError: ")
    assert "is not a readable safetensors file" in job["error"] and "/tmp/" not in job["error"]
    status, job = call_json("POST", f"{url}/api/jobs", {"prompt": "x", "steps": 1})
    assert wait_for(url, job["id"], ("done", "failed"))["status"] == "done"


def test_lora_choice_without_lora_support_is_a_clear_error(pipe, tmp_path):
    class NoLora(GatedPipeline):
        load_lora = None  # a pipeline that cannot apply LoRAs

    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "style.safetensors").write_bytes(b"")
    with LiveServer(NoLora(pipe.pipe), tmp_path, lora_dir=tmp_path / "loras") as server:
        status, info = call_json("GET", f"{server.url}/api/info")
        assert info["loras"] == ["style.safetensors"] and info["lora_supported"] is False
        body = {"prompt": "x", "lora": "style.safetensors"}
        status, reply = call_json("POST", f"{server.url}/api/jobs", body)
        assert status == 501 and reply["detail"].startswith("LoRA support not available")
        assert server.jobs.jobs() == []


def test_failing_job_is_reported_and_the_server_keeps_serving(url):
    status, bad = call_json("POST", f"{url}/api/jobs", {"prompt": FAIL_PROMPT})
    status, good = call_json("POST", f"{url}/api/jobs", {"prompt": "after the failure", "steps": 1})
    bad = wait_for(url, bad["id"], ("done", "failed"))
    assert bad["status"] == "failed" and bad["error"] == "RuntimeError: synthetic failure for the test"
    assert wait_for(url, good["id"], ("done", "failed"))["status"] == "done"
    # Out of memory: the job says so in one line and what shrinks it, not the allocator's C++ location.
    oom = wait_for(url, call_json("POST", f"{url}/api/jobs", {"prompt": OOM_PROMPT})[1]["id"], ("failed",))
    assert oom["error"].startswith("out of memory: the CPU could not allocate 1000000.0 GB; use fewer frames")


def test_video_ranges_are_served_and_bad_ones_answered_in_json(url):
    job = wait_for(
        url, call_json("POST", f"{url}/api/jobs", {"prompt": "ranged", "steps": 1})[1]["id"], ("done",)
    )
    video = f"{url}/api/jobs/{job['id']}/video"
    whole = call("GET", video)[2]

    def ranged(value: str) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(video, headers={"Range": value})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    assert ranged("bytes=0-9")[::2] == (206, whole[:10])
    assert ranged("bytes=-5")[::2] == (206, whole[-5:])
    # A set of spans of which one starts inside the file is served, the others dropped (RFC 9110): it was an
    # empty text/plain 416, Starlette's, past check_range.
    for value in (
        f"bytes=0-9, {len(whole)}-",
        "bytes=-0,0-9",
        f"bytes=0-9,{len(whole) + 5}-{len(whole) + 9}",
    ):
        code, headers, data = ranged(value)
        assert (code, headers["content-range"], data) == (206, f"bytes 0-9/{len(whole)}", whole[:10]), value
    code, headers, data = ranged(f"bytes=0-1,4-5,{len(whole)}-")
    assert code == 206 and headers["content-type"].startswith("multipart/byteranges")
    assert data.count(b"Content-Range: bytes") == 2, data
    for value, status, words in [
        ("bytes=abc", 400, "is not of the form bytes=START-END"),
        ("items=0-1", 400, "is not of the form bytes=START-END"),
        ("bytes=-", 400, "is not of the form bytes=START-END"),
        ("bytes=5-2", 400, "a span that ends before it starts"),
        (f"bytes={len(whole)}-", 416, f"starts past the video's {len(whole)} bytes"),
        ("bytes=-0", 416, f"starts past the video's {len(whole)} bytes"),  # was an empty plain-text 416
        (f"bytes={len(whole)}-,-0", 416, f"starts past the video's {len(whole)} bytes"),
    ]:
        code, headers, data = ranged(value)
        assert code == status and words in json.loads(data)["detail"], (value, code, data)
        assert headers["content-type"] == "application/json"
        if status == 416:
            assert headers["content-range"] == f"bytes */{len(whole)}"


def test_clients_that_disconnect_do_not_hurt_the_server(url, live):
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "orphan", "steps": 1}).encode()
    head = f"POST /api/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as s:  # body cut short, then gone
        s.sendall(f"{head}Content-Length: {len(body) + 50}\r\n\r\n".encode() + body)
    with socket.create_connection((host, int(port)), timeout=10) as s:  # whole request, reply never read
        s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    orphan = None
    for _ in range(100):
        orphan = next((j for j in live.jobs.jobs() if j.request.prompt == "orphan"), None)
        if orphan is not None:
            break
        time.sleep(0.05)
    assert orphan is not None, "the complete request was not accepted"
    assert wait_for(url, orphan.id, ("done", "failed"))["status"] == "done"
    with socket.create_connection((host, int(port)), timeout=10) as s:  # a download dropped after the headers
        s.sendall(f"GET /api/jobs/{orphan.id}/video HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert s.recv(12) == b"HTTP/1.1 200"
    assert call_json("GET", f"{url}/api/health") == (200, {"status": "ok", "auth_required": False})
    assert sum(j.request.prompt == "orphan" for j in live.jobs.jobs()) == 1
    # An upload cut short: no partial file stays, and the hang-up is no "Exception in ASGI application".
    errors: list[logging.LogRecord] = []
    catch = logging.Handler(logging.ERROR)
    catch.emit = errors.append
    logging.getLogger("uvicorn.error").addHandler(catch)
    try:
        head = f"POST /api/uploads HTTP/1.1\r\nHost: {host}\r\nContent-Type: video/mp4\r\n"
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"{head}Content-Length: 100\r\n\r\nabc".encode())
        time.sleep(0.5)
        assert call_json("GET", f"{url}/api/health")[0] == 200
    finally:
        logging.getLogger("uvicorn.error").removeHandler(catch)
    assert errors == [], [r.getMessage() for r in errors]
    uploads = live.jobs.out_dir / "uploads"
    assert not uploads.is_dir() or not list(uploads.glob("*.partial"))


@pytest.mark.parametrize(
    "path",
    [
        "/api/jobs/..%2F..%2F..%2Fetc%2Fpasswd/video",
        "/api/jobs/%2e%2e/video",
        "/api/jobs/..%2Fpyproject.toml",
        "/api/jobs/%2Fetc%2Fpasswd/video",
        "/api/jobs/does-not-exist/video",
    ],
)
def test_unknown_or_traversing_job_ids_are_404(url, path):
    status, _, data = call("GET", url + path)
    assert status == 404 and b"root:" not in data and b"[project]" not in data


def test_output_file_names_are_not_job_ids(url):
    status, job = call_json("POST", f"{url}/api/jobs", {"prompt": "x", "steps": 1})
    wait_for(url, job["id"], ("done",))
    assert call("GET", f"{url}/api/jobs/{job['id']}.mp4/video")[0] == 404
    assert call("GET", f"{url}/{job['id']}.mp4")[0] == 404


def test_openapi_description_and_page_are_served(url):
    status, spec = call_json("GET", f"{url}/openapi.json")
    assert status == 200
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/video", "/api/info"} <= set(spec["paths"])
    assert {"post", "get"} == set(spec["paths"]["/api/jobs"])
    assert "prompt" in spec["components"]["schemas"]["JobRequest"]["required"]
    assert call("GET", f"{url}/docs")[0] == 404  # it would load Swagger UI from a CDN
    status, _, page = call("GET", f"{url}/")
    assert status == 200 and b'id="generate"' in page and b'id="video"' in page


def test_token_is_required_when_set(pipe, tmp_path):
    with LiveServer(pipe, tmp_path, token=TOKEN) as server:
        u = server.url
        assert call_json("GET", f"{u}/api/health") == (200, {"status": "ok", "auth_required": True})
        for method, path in [("GET", "/api/info"), ("GET", "/api/jobs"), ("GET", "/api/jobs/x/video")]:
            status, headers, data = call(method, u + path)
            assert status == 401 and headers["www-authenticate"].startswith("Bearer")
            assert json.loads(data)["detail"] == "missing or wrong bearer token"
            assert call(method, u + path, token="wrong")[0] == 401
        assert call("POST", f"{u}/api/jobs", {"prompt": "x"})[0] == 401
        assert call("DELETE", f"{u}/api/jobs/x")[0] == 401
        assert server.jobs.jobs() == []
        assert call("GET", f"{u}/api/info", token=TOKEN)[0] == 200
        assert call("GET", f"{u}/api/jobs/x/video", token=TOKEN)[0] == 404


def test_a_closed_server_lets_its_pipeline_go(tmp_path):
    # FastAPI keeps route functions in process-wide caches (4096 entries): routes closing over the job
    # manager kept it, and the pipeline's weights, alive after the server and its app were gone.
    import gc
    import weakref

    pipeline = MochiPipeline(tiny_components(), device="cpu")
    with LiveServer(pipeline, tmp_path) as server:
        status, job = call_json("POST", f"{server.url}/api/jobs", {"prompt": "x", "steps": 1})
        assert status == 202 and wait_for(server.url, job["id"], ("done",))["status"] == "done"
    weights = weakref.ref(pipeline.components.dit)
    del pipeline, server
    gc.collect()
    assert weights() is None


def test_binding_beyond_loopback_needs_a_token(capsys, monkeypatch):
    monkeypatch.delenv("MOCHI_SERVE_TOKEN", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.5")
    with pytest.raises(ValueError, match=r"--host 0.0.0.0 exposes the server .* pass --token TOKEN"):
        check_binding("0.0.0.0", None)
    check_binding("0.0.0.0", TOKEN)
    check_binding("127.0.0.1", None)
    with pytest.raises(ValueError, match="--token has 0 characters; a bearer token needs at least 16"):
        check_binding("0.0.0.0", " ")
    # Beyond visible ASCII a token cannot be presented reliably in a header (clients encode it as latin-1 or
    # UTF-8), so it is refused at start rather than locking every request out.
    with pytest.raises(
        ValueError, match=r"--token holds 'ä' at position 1; a bearer token must be visible ASCII"
    ):
        check_binding("127.0.0.1", "pässwörd-ünïcode-1234")
    with pytest.raises(ValueError, match=r"--token holds ' ' at position 8; .* no spaces"):
        check_binding("127.0.0.1", "abcdefgh ijklmnopq")
    with pytest.raises(ValueError, match=r"--token holds '\\t' at position 16"):
        check_binding("127.0.0.1", TOKEN[:16] + "\t")
    # The command refuses before loading any model.
    assert main(["serve", "--host", "0.0.0.0", "--port", "1", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mochi: error: --host 0.0.0.0 exposes the server beyond this machine")


def test_cli_serve_wires_its_options_into_the_server(monkeypatch, tmp_path, capsys):
    """`mochi serve` end to end, with the model loader and uvicorn.run swapped for the tiny model and a
    loopback server that submits one job and stops."""
    import mochi.serve.server

    loaded, seen = {}, {}
    tiny = MochiPipeline(tiny_components(), device="cpu")

    def from_pretrained(model, **kw):
        loaded.update(kw, model=model)
        return tiny

    def run(app, host, port, ready, **kw):
        seen.update(host=host, port=port)
        ready(mochi.serve.server.url(host, port))
        with AppServer(app) as server:
            seen["unauthorised"] = call("GET", f"{server.url}/api/jobs")[0]
            body = {"prompt": "cli", "seed": 5}
            status, job = call_json("POST", f"{server.url}/api/jobs", body, token=TOKEN)
            seen["job"] = wait_for(server.url, job["id"], ("done", "failed"), token=TOKEN)
            seen["info"] = call_json("GET", f"{server.url}/api/info", token=TOKEN)[1]

    monkeypatch.setattr(MochiPipeline, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(mochi.serve.server, "run", run)
    monkeypatch.setattr(mochi.serve.server, "check_port", lambda h, p: seen.update(checked=(h, p)))
    monkeypatch.setenv("MOCHI_SERVE_TOKEN", TOKEN)
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "a.safetensors").write_bytes(b"")
    out = tmp_path / "videos"
    argv = ["serve", "--host", "0.0.0.0", "--port", "8123", "--out-dir", str(out), "--queue-size", "3"]
    model = tmp_path / "model"  # a path that exists: serve checks --model before loading
    model.mkdir()
    argv += ["--lora-dir", str(tmp_path / "loras"), "--device", "cpu", "--model", str(model), "--fps", "24"]
    assert main(argv) == 0
    assert loaded["model"] == str(model) and loaded["device"] == "cpu" and loaded["offload"] is False
    assert seen["checked"] == ("0.0.0.0", 8123)
    assert seen["host"] == "0.0.0.0" and seen["port"] == 8123 and seen["unauthorised"] == 401
    assert seen["job"]["status"] == "done" and seen["info"]["queue_size"] == 3
    assert seen["info"]["loras"] == ["a.safetensors"]
    assert read_video(out / f"{seen['job']['id']}.mp4")[1] == 24
    assert "open http://0.0.0.0:8123/" in capsys.readouterr().out


def test_the_printed_address_is_one_a_browser_opens():
    from mochi.serve.server import url

    assert url("127.0.0.1", 7860) == "http://127.0.0.1:7860/"
    assert url("::1", 47123) == url("[::1]", 47123) == "http://[::1]:47123/"  # was http://::1:47123/
    assert url("localhost", 80) == "http://localhost:80/"


def test_a_taken_port_is_refused_with_a_clear_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"cannot listen on 127.0.0.1:{port}: .*pick another --port"):
            check_port("127.0.0.1", port)
    with pytest.raises(ValueError, match="--port 70000 must be in 0..65535"):
        check_port("127.0.0.1", 70000)


def test_the_port_check_takes_the_host_as_run_binds_it():
    """``run`` binds ``--host [::1]`` (brackets stripped); the check before it refused that host as a name
    that does not resolve, and blamed the port for a host that is not this machine's."""
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"cannot listen on \[::1\]:{port}: .*pick another --port"):
            check_port("[::1]", port)
    check_port("[::1]", 0)
    with pytest.raises(ValueError, match=r"cannot listen on 192.0.2.1:0: .*pick an address of this machine"):
        check_port("192.0.2.1", 0)  # TEST-NET-1: never a local address
    with pytest.raises(ValueError, match=r"cannot listen on nowhere.invalid:0: .*pick an address of this"):
        check_port("nowhere.invalid", 0)


def test_one_lock_per_device():
    from mochi.serve.jobs import device_lock

    assert device_lock("cpu") is device_lock(torch.device("cpu"))
    assert device_lock("meta") is not device_lock("cpu")


def test_without_a_token_only_loopback_host_names_are_served(url):
    host, port = url.removeprefix("http://").split(":")
    replies = {}
    for name in ("evil.example", f"evil.example:{port}", "192.168.1.5", "localhost", f"[::1]:{port}", ""):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"GET /api/health HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            replies[name] = b"".join(iter(lambda: s.recv(4096), b""))
    for name in ("evil.example", f"evil.example:{port}", "192.168.1.5", ""):
        assert replies[name].startswith(b"HTTP/1.1 400"), replies[name]
    assert b"host 'evil.example' is not this machine" in replies["evil.example"]
    assert replies["localhost"].startswith(b"HTTP/1.1 200")
    assert replies[f"[::1]:{port}"].startswith(b"HTTP/1.1 200")


def test_ctrl_c_with_a_page_open_stops_at_once(tmp_path):
    """`mochi serve` (the embedded model) interrupted while a client holds the event stream, as every open
    page does: the stream ends as the shutdown begins. uvicorn waited its 5 s grace for it, then cancelled
    it with "Exception in ASGI application" and a CancelledError traceback in the log."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "mochi", "serve", "--port", "0", "--out-dir", str(tmp_path / "out")]
    server = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert "open http://127.0.0.1:" in line, (line, server.stderr.read() if server.poll() else "")
        host, port = line.rsplit("http://", 1)[1].strip().rstrip("/").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as stream:
            stream.sendall(f"GET /api/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            seen = b""
            while b"event: queue" not in seen:  # the head may come alone
                seen += stream.recv(65536)
            started = time.monotonic()
            server.send_signal(signal.SIGINT)
            _, err = server.communicate(timeout=30)
            took = time.monotonic() - started
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    # 130 ("mochi: interrupted") when the signal lands inside serve, 0 when uvicorn took it first.
    assert server.returncode in (0, 130) and took < 4, (took, err)
    assert "Traceback" not in err and "timeout graceful shutdown exceeded" not in err, err
