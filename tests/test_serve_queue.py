"""`mochi serve`'s daily-use API on a real server: live queue (SSE), previews, history across restarts,
batches, several LoRAs, video-to-video uploads and prompt token counts."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading

import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra (fastapi, uvicorn)")

from mochi.pipeline import MochiPipeline  # noqa: E402
from mochi.serve.jobs import JobManager  # noqa: E402
from mochi.video import write_video  # noqa: E402
from mochi.weights.lora import save_lora  # noqa: E402

from .serve_harness import GatedPipeline, LiveServer, call, call_json, settle, wait_for  # noqa: E402
from .test_lora import random_lora  # noqa: E402
from .test_pipeline import tiny_components  # noqa: E402
from .test_serve_preview import read_png  # noqa: E402

FINAL = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def pipe():
    return GatedPipeline(MochiPipeline(tiny_components(), device="cpu"))


@pytest.fixture(scope="module")
def live(pipe, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("loras")
    save_lora(random_lora(pipe.components.dit, seed=2), lora_dir / "a.safetensors")
    save_lora(random_lora(pipe.components.dit, seed=3), lora_dir / "b.safetensors")
    with LiveServer(pipe, tmp_path_factory.mktemp("out"), queue_size=3, lora_dir=lora_dir) as server:
        yield server


@pytest.fixture
def url(live, pipe):
    pipe.gate.set()
    yield live.url
    pipe.gate.set()
    settle(live)


def hold(pipe, url, **body):
    pipe.gate.clear()
    pipe.entered.clear()
    status, job = call_json("POST", f"{url}/api/jobs", {"prompt": "held", "seed": 1, **body})
    assert status == 202, job
    assert pipe.entered.wait(20), "the held job never reached its first step"
    return job["id"]


class Events:
    """A client of GET /api/events on a raw socket, in a thread, keeping every ``queue`` event it receives.

    A raw socket because ``close`` must end the blocked read at once (shutting the socket down does), where
    ``http.client`` would wait for the next keep-alive. Each event is one chunk of the chunked reply, so the
    chunk-size lines between them are simply skipped.
    """

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.sendall(f"GET /api/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        self.events: list[dict] = []
        self.head = ""
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        try:
            while data := self.sock.recv(65536):
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in (raw.decode().rstrip("\r") for raw in lines):
                    if line.startswith("data: "):
                        with self.changed:
                            self.events.append(json.loads(line[6:]))
                            self.changed.notify_all()
                    elif not self.events:
                        self.head += line + "\n"
        except OSError:  # shut down by close()
            pass

    def wait(self, predicate, timeout: float = 30) -> dict:
        """The first event (old or new) whose snapshot satisfies ``predicate``."""
        with self.changed:
            found = self.changed.wait_for(lambda: [e for e in self.events if predicate(e)], timeout)
        assert found, f"no event matched; last: {self.events[-1:] if self.events else None}"
        return found[0]

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def status_of(event: dict, job_id: str) -> str | None:
    return next((j["status"] for j in event["jobs"] if j["id"] == job_id), None)


def test_two_clients_see_one_queue_with_positions_progress_and_eta(url, pipe):
    first, second = Events(url), Events(url)
    try:
        first.wait(lambda e: "jobs" in e)  # the snapshot comes at once
        assert (
            first.head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in first.head.lower()
        )
        done = call_json("POST", f"{url}/api/jobs", {"prompt": "warm-up", "seed": 2})[1]
        wait_for(url, done["id"], FINAL)
        held = hold(pipe, url)
        waiting = [call_json("POST", f"{url}/api/jobs", {"prompt": f"w{i}"})[1]["id"] for i in range(2)]
        for client in (first, second):
            event = client.wait(lambda e: status_of(e, waiting[1]) == "queued")
            ids = [j["id"] for j in event["jobs"]]
            assert ids[:3] == [held, *waiting]  # running first, then the queue in order
            assert [j["queue_position"] for j in event["jobs"][:3]] == [None, 0, 1]
            running = event["jobs"][0]
            assert running["status"] == "running" and running["progress"]["stage"] == "denoise"
            etas = [j["eta"] for j in event["jobs"][:3]]
            assert all(e is not None and e >= 0 for e in etas) and etas[0] <= etas[1] <= etas[2], etas
            assert done["id"] in ids[3:]  # the latest finished jobs follow
        # A cancel from anyone reaches everyone.
        call("DELETE", f"{url}/api/jobs/{waiting[0]}")
        for client in (first, second):
            client.wait(lambda e: status_of(e, waiting[0]) == "cancelled")
        pipe.gate.set()
        for client in (first, second):
            event = client.wait(lambda e: status_of(e, waiting[1]) == "done")
            assert status_of(event, held) == "done"
        status, snapshot = call_json("GET", f"{url}/api/queue")
        assert status == 200 and snapshot["version"] >= event["version"]
    finally:
        first.close()
        second.close()


def test_preview_appears_while_sampling_and_stays_after(url, pipe):
    job_id = hold(pipe, url, frames=13, width=48, height=32)
    status, job = call_json("GET", f"{url}/api/jobs/{job_id}")
    assert job["status"] == "running" and job["preview_step"] == 1  # every step of a 3-step run
    status, headers, png = call("GET", f"{url}/api/jobs/{job_id}/preview")
    assert status == 200 and headers["content-type"] == "image/png"
    image = read_png(png)
    assert image.shape == (4, 3 * 6 + 2, 3)  # 3 latent frames of 4×6 side by side
    behind = call_json("POST", f"{url}/api/jobs", {"prompt": "behind", "steps": 1})[1]["id"]
    status, error = call_json("GET", f"{url}/api/jobs/{behind}/preview")
    assert status == 404 and "no preview yet (status queued)" in error["detail"]
    pipe.gate.set()
    done = wait_for(url, job_id, FINAL)
    assert done["preview_step"] == 3
    status, _, last = call("GET", f"{url}/api/jobs/{job_id}/preview")
    assert status == 200 and read_png(last).shape == image.shape and last != png
    wait_for(url, behind, FINAL)


def test_long_prompts_are_counted_and_their_truncation_reported(url, live):
    status, count = call_json("POST", f"{url}/api/tokens", {"prompt": "a red circle"})
    assert status == 200 and count == {"count": 13, "limit": 256, "truncated": False}  # bytes + end token
    long_prompt = "a red circle moving right " * 12  # 312 bytes
    status, count = call_json("POST", f"{url}/api/tokens", {"prompt": long_prompt})
    assert count == {"count": 313, "limit": 256, "truncated": True}
    status, job = call_json("POST", f"{url}/api/jobs", {"prompt": long_prompt, "seed": 4})
    assert job["prompt_tokens"] == {"count": 313, "limit": 256}
    assert job["warnings"] == [
        "the prompt is 313 tokens long (end token included) but the text encoder reads 256: "
        "the last 57 tokens are ignored; shorten the prompt"
    ]
    done = wait_for(url, job["id"], FINAL)
    assert done["status"] == "done" and done["warnings"] == job["warnings"]
    sidecar = json.loads((live.jobs.out_dir / f"{job['id']}.json").read_text())
    assert sidecar["warnings"] == job["warnings"] and sidecar["prompt_tokens"] == 313
    short = call_json("POST", f"{url}/api/jobs", {"prompt": "short", "steps": 1})[1]
    assert short["warnings"] == [] and short["prompt_tokens"]["count"] == 6


def test_an_uncalibrated_teacache_is_in_the_jobs_warnings_naming_no_server_path(url, live, pipe, monkeypatch):
    """A TeaCache job on a model file with no calibration beside it warned on the server's log only: the
    client saw no warning on the job or in its sidecar (the CLI's `mochi: warning:` has it)."""
    model = live.jobs.out_dir.parent / "models" / "finetune.safetensors"
    monkeypatch.setattr(pipe.components, "source", str(model))  # no finetune.teacache.json beside it
    body = {"prompt": "a red circle", "seed": 2, "steps": 3, "cache": "teacache"}
    job = wait_for(url, call_json("POST", f"{url}/api/jobs", body)[1]["id"], FINAL)
    said = (
        "no TeaCache calibration for this model (…/finetune.teacache.json is absent): thresholds apply to "
        "the raw input change; run `mochi calibrate-cache` for calibrated ones"
    )
    assert job["status"] == "done" and job["warnings"] == [said]
    sidecar = json.loads((live.jobs.out_dir / f"{job['id']}.json").read_text())
    assert sidecar["warnings"] == [said] and sidecar["cache_coefficients"] == "identity (uncalibrated)"
    plain = wait_for(url, call_json("POST", f"{url}/api/jobs", {**body, "cache": "fbcache"})[1]["id"], FINAL)
    assert plain["status"] == "done" and plain["warnings"] == []  # only TeaCache reads a calibration


def test_batch_queues_consecutive_seeds_all_or_none(url, pipe, live):
    status, batch = call_json("POST", f"{url}/api/batches", {"prompt": "a batch", "seed": 40, "count": 3})
    assert status == 202, batch
    seeds = [j["parameters"]["seed"] for j in batch["jobs"]]
    assert seeds == [40, 41, 42]
    for job in batch["jobs"]:
        assert wait_for(url, job["id"], FINAL)["status"] == "done"
    status, drawn = call_json("POST", f"{url}/api/batches", {"prompt": "random", "count": 2, "steps": 1})
    assert status == 202 and len({j["parameters"]["seed"] for j in drawn["jobs"]}) == 2
    for job in drawn["jobs"]:
        wait_for(url, job["id"], FINAL)

    hold(pipe, url)
    before = len(live.jobs.jobs())
    status, error = call_json("POST", f"{url}/api/batches", {"prompt": "too many", "count": 4})
    assert status == 429 and "3 free places of 3 and this asks for 4" in error["detail"]
    assert len(live.jobs.jobs()) == before  # none of the four was queued
    status, error = call_json("POST", f"{url}/api/batches", {"prompt": "x", "count": 17})
    assert status == 422
    status, error = call_json("POST", f"{url}/api/batches", {"prompt": "x", "count": 2, "seed": 2**63 - 1})
    assert status == 422 and "passes the largest seed" in error["detail"]


def test_several_loras_per_job(url, live):
    body = {
        "prompt": "styled",
        "seed": 3,
        "loras": [{"name": "a.safetensors", "scale": 0.5}, {"name": "b.safetensors"}],
    }
    status, job = call_json("POST", f"{url}/api/jobs", body)
    assert status == 202, job
    assert job["parameters"]["loras"] == [
        {"name": "a.safetensors", "scale": 0.5},
        {"name": "b.safetensors", "scale": 1.0},
    ]
    # Every LoRA once, in loras: submitted again, the first one was applied twice (it was in lora too).
    assert job["parameters"]["lora"] is None and job["parameters"]["lora_scale"] is None
    assert wait_for(url, job["id"], FINAL)["status"] == "done"
    status, again = call_json("POST", f"{url}/api/jobs", job["parameters"])  # strength null was a 422
    assert status == 202, again
    assert again["parameters"] == job["parameters"]
    assert wait_for(url, again["id"], FINAL)["status"] == "done"
    first, second = (call("GET", f"{url}/api/jobs/{j['id']}/video")[2] for j in (job, again))
    assert first == second
    (applied,) = [j for j in live.jobs.jobs() if j.id == job["id"]]
    assert [(p.rsplit("/", 1)[1], s) for p, s in applied.request.loras] == [
        ("a.safetensors", 0.5),
        ("b.safetensors", 1.0),
    ]
    status, error = call_json(
        "POST", f"{url}/api/jobs", {"prompt": "x", "loras": [{"name": "../a.safetensors"}]}
    )
    assert (
        status == 422
        and "not a file in the LoRA folder; choose: a.safetensors, b.safetensors" in error["detail"]
    )
    status, _ = call_json(
        "POST", f"{url}/api/jobs", {"prompt": "x", "loras": [{"name": "a.safetensors"}] * 9}
    )
    assert status == 422


def test_video_to_video_from_an_upload(url, live, pipe, tmp_path):
    clip = torch.randint(0, 256, (9, 32, 48, 3), dtype=torch.uint8)
    data = write_video(clip, tmp_path / "init.mp4").read_bytes()
    status, _, body = call("POST", f"{url}/api/uploads", raw=data, content_type="video/mp4")
    upload = json.loads(body)
    assert status == 201, upload
    assert {k: upload[k] for k in ("frames", "width", "height", "fps")} == {
        "frames": 9,
        "width": 48,
        "height": 32,
        "fps": 30,
    }
    assert upload["bytes"] == len(data) and (live.jobs.out_dir / "uploads" / upload["id"]).is_file()
    body = {"prompt": "restyle", "seed": 1, "init_video": upload["id"], "strength": 0.5}
    status, job = call_json("POST", f"{url}/api/jobs", body)
    assert status == 202, job
    assert job["parameters"]["init_video"] == upload["id"] and job["parameters"]["strength"] == 0.5
    done = wait_for(url, job["id"], FINAL)
    assert done["status"] == "done", done["error"]
    assert set(done["seconds"]) == {"text", "denoise", "decode"}
    # 13 frames asked of a 9-frame upload: refused at once, saying why.
    status, error = call_json("POST", f"{url}/api/jobs", {**body, "frames": 13})
    assert status == 422 and "has 9 frames, fewer than the 13 to generate" in error["detail"], error
    # Fields that apply only with another are refused without it, not dropped.
    status, error = call_json("POST", f"{url}/api/jobs", {"prompt": "x", "strength": 0.5})
    assert status == 422 and "strength applies only to video-to-video" in error["detail"]
    status, error = call_json("POST", f"{url}/api/jobs", {"prompt": "x", "lora_scale": 0.5})
    assert status == 422 and "lora_scale applies only with lora" in error["detail"]
    # "" is refused by the schema (min_length 1), and so is a prompt of whitespace only.
    status, error = call_json("POST", f"{url}/api/jobs", {"prompt": " \t\n "})
    assert status == 422 and "prompt: is blank" in error["detail"]

    status, error = call_json("POST", f"{url}/api/jobs", {**body, "init_video": "../../etc/passwd"})
    assert status == 422 and "is not an upload" in error["detail"]
    status, _, reply = call("POST", f"{url}/api/uploads", raw=b"not a video at all", content_type="video/mp4")
    assert status == 422 and "not a video" in json.loads(reply)["detail"]
    # An upload is deleted on request, not while a job starts from it.
    pipe.gate.clear()
    pipe.entered.clear()
    held = call_json("POST", f"{url}/api/jobs", body)[1]
    assert pipe.entered.wait(20)
    status, error = call_json("DELETE", f"{url}/api/uploads/{upload['id']}")
    assert status == 409 and f"job {held['id']!r} starts from upload" in error["detail"], error
    pipe.gate.set()
    wait_for(url, held["id"], FINAL)
    assert call_json("DELETE", f"{url}/api/uploads/{upload['id']}") == (
        200,
        {"id": upload["id"], "deleted": True},
    )
    assert not (live.jobs.out_dir / "uploads" / upload["id"]).exists()
    assert call("DELETE", f"{url}/api/uploads/{upload['id']}")[0] == 404
    assert call_json("POST", f"{url}/api/jobs", body)[0] == 422
    status, _, reply = call("POST", f"{url}/api/uploads", raw=data, content_type="text/plain")
    assert (
        status == 415
        and "send the body as video/* or application/octet-stream" in json.loads(reply)["detail"]
    )
    # Any video type is taken (the page sends the picked file's own type: .avi, .mpg, .ogv ...).
    for kind in ("video/x-msvideo", "video/mpeg", "video/ogg"):
        status, _, reply = call("POST", f"{url}/api/uploads", raw=data, content_type=kind)
        assert status == 201, (kind, reply)
    assert not [p for p in (live.jobs.out_dir / "uploads").iterdir() if p.name.endswith(".partial")]


def test_an_upload_too_small_to_crop_to_the_output_is_422_at_submission(url, live, tmp_path):
    """A 2x2 clip fitted to 128x16 keeps no row: refused when the job is asked for, not failed later."""
    data = write_video(torch.zeros((7, 2, 2, 3), dtype=torch.uint8), tmp_path / "tiny.mp4").read_bytes()
    status, _, reply = call("POST", f"{url}/api/uploads", raw=data, content_type="video/mp4")
    assert status == 201, reply
    upload = json.loads(reply)["id"]
    body = {"prompt": "x", "frames": 7, "width": 128, "height": 16, "init_video": upload, "strength": 0.5}
    status, error = call_json("POST", f"{url}/api/jobs", body)
    assert status == 422, error
    assert "2x2 frames are too small to crop to the shape of the 128x16 output" in error["detail"]
    assert call_json("DELETE", f"{url}/api/uploads/{upload}")[0] == 200


def _mpeg_program_stream(path, fmt="mpeg", codec="mpeg1video"):  # noqa: ANN001, ANN202 - write_video makes none
    import av
    import numpy as np

    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for level in range(0, 180, 20):
            image = np.full((32, 32, 3), level, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_an_mpeg_program_stream_upload_is_415_naming_the_format_and_the_conversion(url, live, tmp_path):
    """An .mpg upload was 422 "not a video that can be decoded (mp4, webm, mov, ...), or its frames are larger
    than 8K": PyAV cannot give an MPEG program stream's decoder the frame-size cap before it probes the file,
    so ``open_video`` refuses it (as prepare-data does), and the server now says so."""
    data = _mpeg_program_stream(tmp_path / "clip.mpg").read_bytes()
    uploads = live.jobs.out_dir / "uploads"
    kept = set(uploads.iterdir()) if uploads.is_dir() else set()  # made by the first upload kept
    status, _, reply = call("POST", f"{url}/api/uploads", raw=data, content_type="video/mpeg")
    detail = json.loads(reply)["detail"]
    assert status == 415, reply
    assert detail.startswith("the upload is an MPEG program stream (.mpg, .mpeg, .vob), which is not read: ")
    assert "frame-size cap" in detail and detail.endswith("e.g. ffmpeg -i clip.mpg clip.mp4")
    assert (set(uploads.iterdir()) if uploads.is_dir() else set()) == kept  # nothing kept, no temporary
    # An FLV is refused alike, the example naming its own suffix (it said clip.mpg).
    data = _mpeg_program_stream(tmp_path / "clip.flv", "flv", "flv").read_bytes()
    status, _, reply = call("POST", f"{url}/api/uploads", raw=data, content_type="video/x-flv")
    detail = json.loads(reply)["detail"]
    assert status == 415 and detail.startswith("the upload is a Flash video (.flv), which is not read: "), (
        reply
    )
    assert detail.endswith("e.g. ffmpeg -i clip.flv clip.mp4")


def test_a_killed_servers_partial_upload_is_removed_when_the_server_starts(pipe, tmp_path, monkeypatch):
    """An upload is written to a temporary named as ``atomic_path`` names them (with the pid), so that what
    a killed server left (nothing swept ``<id>.partial``; DELETE cannot name it) is removed. It was removed
    on the first upload after a restart; it is now removed as the server starts."""
    import subprocess
    import sys

    from mochi import files
    from mochi.serve import uploads

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = tmp_path / "out" / "uploads"
    folder.mkdir(parents=True)
    stale = folder / f".AAAAAAAAAAAAAAAA.{gone.pid}.0a1b.partial"
    stale.write_bytes(b"\0" * 100)
    mine = folder / f".BBBBBBBBBBBBBBBB.{os.getpid()}.0a1b.partial"  # a live process's: kept
    mine.write_bytes(b"\0" * 100)
    monkeypatch.setattr(files, "_swept", set())  # as in a server started afresh
    seen = []
    real_probe = uploads.probe
    monkeypatch.setattr(uploads, "probe", lambda path: seen.append(path) or real_probe(path))
    with LiveServer(pipe, tmp_path / "out") as server:
        assert not stale.exists() and mine.exists()  # before any upload
        data = write_video(torch.zeros((2, 32, 32, 3), dtype=torch.uint8), tmp_path / "v.mp4").read_bytes()
        status, _, reply = call("POST", f"{server.url}/api/uploads", raw=data, content_type="video/mp4")
        assert status == 201, reply
        assert files._PARTIAL.match(seen[0].name) and f".{os.getpid()}." in seen[0].name
        assert mine.exists()  # this process is alive: never its temporary
        mine.unlink()
        assert call_json("DELETE", f"{server.url}/api/uploads/{json.loads(reply)['id']}")[0] == 200


def test_an_upload_with_a_damaged_frame_counts_the_frames_that_decode(url, live, tmp_path):
    """Packets were counted as frames: a clip damaged at its 9th packet was taken as 31 frames, and a job
    of 25 was accepted and failed later. Only frames that decode count, so the submission check refuses."""
    import av
    import numpy as np

    from mochi.video import read_video

    clip = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (31, 32, 32, 3), dtype=np.uint8))
    path = write_video(clip, tmp_path / "damaged.mp4")
    with av.open(str(path)) as container:
        packets = sorted((p.pos, p.size) for p in container.demux(video=0) if p.size)
    data = bytearray(path.read_bytes())
    pos, size = packets[8]
    data[pos : pos + size] = b"\xff" * size
    path.write_bytes(data)
    status, _, reply = call("POST", f"{url}/api/uploads", raw=bytes(data), content_type="video/mp4")
    assert status == 201, reply
    upload = json.loads(reply)
    assert 1 <= upload["frames"] < 31
    assert read_video(path, max_frames=upload["frames"])[0].shape[0] == upload["frames"]  # what a job reads
    body = {"prompt": "x", "frames": 25, "init_video": upload["id"], "strength": 0.5}
    status, error = call_json("POST", f"{url}/api/jobs", body)
    assert status == 422 and f"has {upload['frames']} frames, fewer than the 25" in error["detail"], error
    assert call_json("DELETE", f"{url}/api/uploads/{upload['id']}")[0] == 200


def test_an_upload_with_frames_too_large_is_422_and_kept_nowhere(url, live, tmp_path, monkeypatch):
    from mochi.serve import uploads

    clip = torch.zeros((2, 32, 48, 3), dtype=torch.uint8)
    data = write_video(clip, tmp_path / "wide.mp4").read_bytes()
    monkeypatch.setattr(uploads, "MAX_UPLOAD_PIXELS", 32 * 48 - 1)
    before = (
        set((live.jobs.out_dir / "uploads").glob("*")) if (live.jobs.out_dir / "uploads").is_dir() else set()
    )
    status, _, reply = call("POST", f"{url}/api/uploads", raw=data, content_type="video/mp4")
    assert status == 422 and "frames are 48x32, more than 1,535 pixels" in json.loads(reply)["detail"]
    assert set((live.jobs.out_dir / "uploads").glob("*")) == before


def test_an_upload_on_a_full_disk_is_507_and_leaves_no_file(url, live, monkeypatch):
    import errno

    from mochi.serve import uploads

    real_open = open

    class Full:
        def __init__(self, path, mode):  # noqa: ANN001
            self.file = real_open(path, mode)

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc):  # noqa: ANN002, ANN204
            self.file.close()

        def write(self, data):  # noqa: ANN001, ANN201
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(uploads, "open", Full, raising=False)
    status, _, reply = call("POST", f"{url}/api/uploads", raw=b"x" * 1000, content_type="video/mp4")
    detail = json.loads(reply)["detail"]
    assert status == 507 and "upload dropped after 1000 bytes: the server's disk is full" in detail, reply
    assert not [p for p in (live.jobs.out_dir / "uploads").iterdir() if p.name.endswith(".partial")]


def test_an_upload_with_a_file_where_its_folder_goes_is_a_json_500(pipe, tmp_path):
    (tmp_path / "uploads").write_text("not a folder")
    with LiveServer(pipe, tmp_path) as server:
        status, _, reply = call("POST", f"{server.url}/api/uploads", raw=b"x" * 10, content_type="video/mp4")
    assert (status, json.loads(reply)["detail"]) == (
        500,
        "upload refused: the server cannot store it (its 'uploads' folder: a file has its name)",
    )
    assert (tmp_path / "uploads").read_text() == "not a folder"


def test_a_video_deleted_while_it_is_sent_arrives_whole(tmp_path):
    """The file is opened by the route: unlinking it afterwards (a DELETE racing a download) leaves the
    transfer whole, a range included (it was a 500 or a cut-off body)."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from mochi.serve.api import OpenFileResponse

    video = tmp_path / "v.mp4"
    video.write_bytes(bytes(range(256)) * 1000)
    app = FastAPI()

    @app.get("/v")
    def send() -> OpenFileResponse:
        fd = os.open(video, os.O_RDONLY)
        response = OpenFileResponse(fd, video, os.fstat(fd), media_type="video/mp4")
        video.unlink()
        return response

    with TestClient(app) as client:
        reply = client.get("/v")
        assert reply.status_code == 200 and reply.content == bytes(range(256)) * 1000
        video.write_bytes(bytes(range(256)) * 1000)
        reply = client.get("/v", headers={"Range": "bytes=10-19"})
        assert reply.status_code == 206 and reply.content == bytes(range(10, 20))


def test_history_survives_a_restart_and_pages_beyond_the_table(url, live, pipe, tmp_path):
    body = {"prompt": "kept", "seed": 9, "negative_prompt": "no", "eta": 0.5, "eta_above": 0.2}
    body["cache"] = "fbcache:fast"  # the restarted history keeps it (it read "none" before)
    job = call_json("POST", f"{url}/api/jobs", body)[1]
    wait_for(url, job["id"], FINAL)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(live.jobs.out_dir / f"{job['id']}.mp4", out)
    sidecar = json.loads((live.jobs.out_dir / f"{job['id']}.json").read_text())
    (out / f"{job['id']}.json").write_text(json.dumps(sidecar))
    # 250 older jobs, as an earlier run would have left them, and files that are not job sidecars.
    for i in range(250):
        old = {**sidecar, "id": f"old-{i:012d}", "seed": i, "created": sidecar["created"] - 1000 + i}
        (out / f"old-{i:012d}.json").write_text(json.dumps(old))
    (out / "notes.json").write_text("{}")
    (out / "AAAAAAAAAAAAAAAA.json").write_text("not json")

    with LiveServer(pipe, out, history=100) as restarted:
        assert len(restarted.jobs.jobs()) == 100  # the table holds the newest, the rest stay on disk
        status, page = call_json("GET", f"{restarted.url}/api/history?limit=200")
        assert status == 200 and page["total"] == 251 and len(page["jobs"]) == 200
        first = page["jobs"][0]
        assert first["id"] == job["id"] and first["status"] == "done"
        assert first["parameters"] == job["parameters"] and first["seconds"] == sidecar["seconds"]
        assert [j["parameters"]["seed"] for j in page["jobs"][1:4]] == [249, 248, 247]
        rest = call_json("GET", f"{restarted.url}/api/history?offset=200&limit=200")[1]
        assert [j["parameters"]["seed"] for j in rest["jobs"]] == list(range(50, -1, -1))
        # A job older than the table is still found, with its video.
        status, old = call_json("GET", f"{restarted.url}/api/jobs/old-000000000003")
        assert status == 200 and old["parameters"]["seed"] == 3
        status, headers, _ = call("GET", f"{restarted.url}/api/jobs/{job['id']}/video")
        assert status == 200 and headers["content-type"] == "video/mp4"
        assert call("GET", f"{restarted.url}/api/jobs/AAAAAAAAAAAAAAAA")[0] == 404
        status, old = call_json("POST", f"{restarted.url}/api/jobs/old-000000000004/cancel")
        assert status == 200 and old["status"] == "done"  # nothing to cancel: it ended in an earlier run
        # New jobs come first.
        new = call_json("POST", f"{restarted.url}/api/jobs", {"prompt": "new", "steps": 1})[1]
        wait_for(restarted.url, new["id"], FINAL)
        page = call_json("GET", f"{restarted.url}/api/history?limit=2")[1]
        assert page["total"] == 252 and [j["id"] for j in page["jobs"]] == [new["id"], job["id"]]
        assert call_json("GET", f"{restarted.url}/api/history?limit=201")[0] == 422
        # DELETE of a job older than the table deletes its files (it answered 200 and deleted nothing).
        (out / "old-000000000005.mp4").write_bytes(b"video")
        status, gone = call_json("DELETE", f"{restarted.url}/api/jobs/old-000000000005")
        assert status == 200 and gone["parameters"]["seed"] == 5
        assert not (out / "old-000000000005.json").exists() and not (out / "old-000000000005.mp4").exists()
        assert call("GET", f"{restarted.url}/api/jobs/old-000000000005")[0] == 404
        assert call_json("GET", f"{restarted.url}/api/history?limit=1")[1]["total"] == 251


def test_info_names_the_preview_factors_and_limits(url):
    info = call_json("GET", f"{url}/api/info")[1]
    assert "ComfyUI" in info["preview"]  # the test model has the released VAE's statistics
    assert info["text_tokens"] == 256 and info["max_batch"] == 16 and info["video_to_video"] is True


def test_job_manager_restores_nothing_from_an_empty_folder(tmp_path, pipe):
    jobs = JobManager(pipe, tmp_path)
    try:
        assert jobs.jobs() == [] and jobs.get("AAAAAAAAAAAAAAAA") is None and jobs.get("../x") is None
    finally:
        jobs.close()


def test_uploads_are_kept_within_their_space_and_deleting_makes_room(url, live, tmp_path, monkeypatch):
    """Uploads stay until deleted and nothing bounded them: a client could fill the server's disk."""
    from mochi.serve import uploads

    folder = live.jobs.out_dir / "uploads"
    for old in folder.glob("*"):  # earlier tests' uploads
        old.unlink()
    clip = write_video(torch.zeros((7, 32, 32, 3), dtype=torch.uint8), tmp_path / "c.mp4").read_bytes()

    def send() -> tuple[int, dict]:
        status, _, reply = call("POST", f"{url}/api/uploads", raw=clip, content_type="video/mp4")
        return status, json.loads(reply)

    monkeypatch.setattr(uploads, "MAX_UPLOADS", 2)
    first, second = send()[1], send()[1]
    status, error = send()
    assert status == 507 and error["detail"].startswith("the server's upload space is full (2 uploads, 0 MiB")
    assert "DELETE /api/uploads/{id}" in error["detail"]
    assert call_json("DELETE", f"{url}/api/uploads/{first['id']}")[0] == 200
    status, third = send()
    assert status == 201  # room again
    monkeypatch.setattr(uploads, "MAX_UPLOADS", 64)
    monkeypatch.setattr(uploads, "MAX_UPLOADS_BYTES", 2 * len(clip) + len(clip) // 2)
    status, error = send()  # the bytes would pass the space: refused while arriving, nothing kept
    assert status == 507 and "upload space is full" in error["detail"]
    assert {p.name for p in folder.iterdir()} == {second["id"], third["id"]}  # no partial left


def test_delete_says_what_it_did_and_the_queue_keeps_the_jobs_that_ended_last(url, pipe):
    """DELETE on a queued job and on the cancelled job it left gave one body (the first kept the job, the
    second forgot it); /api/queue kept the 10 finished jobs created last, not those that ended last, so a
    job cancelled last but created first vanished from it."""
    held = hold(pipe, url)
    status, first = call_json("POST", f"{url}/api/jobs", {"prompt": "queued first", "seed": 2})
    assert status == 202
    for i in range(10):
        status, job = call_json("POST", f"{url}/api/jobs", {"prompt": f"later {i}", "seed": 3})
        assert status == 202, job
        assert call_json("DELETE", f"{url}/api/jobs/{job['id']}")[1]["deleted"] is False
    status, cancelled = call_json("DELETE", f"{url}/api/jobs/{first['id']}")
    assert status == 200 and cancelled["status"] == "cancelled" and cancelled["deleted"] is False
    queue = call_json("GET", f"{url}/api/queue")[1]["jobs"]
    assert first["id"] in [j["id"] for j in queue]
    status, forgotten = call_json("DELETE", f"{url}/api/jobs/{first['id']}")
    assert status == 200 and forgotten["deleted"] is True
    assert call_json("GET", f"{url}/api/jobs/{first['id']}")[0] == 404
    pipe.gate.set()
    assert wait_for(url, held, FINAL)["status"] == "done"


def test_a_cancel_while_the_video_is_written_is_honoured(url, live, monkeypatch):
    """A cancel answered 200 while the job wrote its video was dropped: the job ended done, files kept."""
    import mochi.serve.jobs as jobs_module

    real = jobs_module.write_video_and_sidecar

    def cancelled_meanwhile(frames, path, fps, sidecar):
        live.jobs.cancel(sidecar["id"])  # as a DELETE arriving during the encode
        return real(frames, path, fps, sidecar)

    monkeypatch.setattr(jobs_module, "write_video_and_sidecar", cancelled_meanwhile)
    status, job = call_json("POST", f"{url}/api/jobs", {"prompt": "written", "seed": 4})
    assert status == 202
    final = wait_for(url, job["id"], FINAL)
    assert final["status"] == "cancelled", final
    assert not (live.jobs.out_dir / f"{job['id']}.mp4").exists()
    assert not (live.jobs.out_dir / f"{job['id']}.json").exists()


@pytest.mark.parametrize(
    "damage",
    [
        {"finished": "yesterday"},
        {"started": "noon"},
        {"created": float("nan")},
        {"frames": "25"},
        {"seconds": {"denoise": "slow"}},
        {"seconds": {"denoise": float("nan")}},
        {"prompt_tokens": "many"},
        {"warnings": "oops"},
        {"init_video": ["x"]},
        {"eta": "0.5"},
    ],
)
def test_a_sidecar_with_a_field_of_the_wrong_type_is_skipped(url, live, pipe, tmp_path, damage):
    """A sidecar whose field has the wrong type (edited, or another program's) is not a job's: read back as
    it stood, a string ``finished`` or ``frames`` made every /api/queue (and the event stream) a 500."""
    job = call_json("POST", f"{url}/api/jobs", {"prompt": "kept", "seed": 9, "steps": 2})[1]
    wait_for(url, job["id"], FINAL)
    sidecar = json.loads((live.jobs.out_dir / f"{job['id']}.json").read_text())
    out = tmp_path / "out"
    out.mkdir()
    for name, values in (("GoodGoodGoodGood", {}), ("BadBadBadBadBadB", damage)):
        (out / f"{name}.json").write_text(json.dumps({**sidecar, "id": name, **values}))
        shutil.copy(live.jobs.out_dir / f"{job['id']}.mp4", out / f"{name}.mp4")
    with LiveServer(pipe, out) as restarted:
        status, queue = call_json("GET", f"{restarted.url}/api/queue")
        assert status == 200 and [j["id"] for j in queue["jobs"]] == ["GoodGoodGoodGood"]
        status, page = call_json("GET", f"{restarted.url}/api/history")
        assert status == 200 and page["total"] == 1
        assert call("GET", f"{restarted.url}/api/jobs/BadBadBadBadBadB")[0] == 404


def test_a_dangling_link_among_the_sidecars_is_skipped(url, live, pipe, tmp_path):
    """A ``<id>.json`` that cannot be stat'ed (a dangling link; a sidecar deleted between the folder's scan
    and its stat) stopped the server from starting ("No such file or directory"), and /api/history with
    it."""
    job = call_json("POST", f"{url}/api/jobs", {"prompt": "kept", "seed": 9, "steps": 2})[1]
    wait_for(url, job["id"], FINAL)
    out = tmp_path / "out"
    out.mkdir()
    for suffix in (".json", ".mp4"):
        shutil.copy(live.jobs.out_dir / f"{job['id']}{suffix}", out)
    (out / "BrokenLinkBroken.json").symlink_to(tmp_path / "gone.json")
    with LiveServer(pipe, out) as restarted:
        status, page = call_json("GET", f"{restarted.url}/api/history")
        assert status == 200 and [j["id"] for j in page["jobs"]] == [job["id"]]


def test_a_folder_where_a_jobs_video_goes_is_not_sent_nor_deleted(url, live, pipe, tmp_path):
    """A folder named ``<id>.mp4`` beside a job's sidecar opened like a file: GET answered 200 with a
    4096-byte length and no body (IsADirectoryError mid-transfer), and DELETE was a 500 that left the
    sidecar."""
    job = call_json("POST", f"{url}/api/jobs", {"prompt": "kept", "seed": 9, "steps": 2})[1]
    wait_for(url, job["id"], FINAL)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(live.jobs.out_dir / f"{job['id']}.json", out)
    (out / f"{job['id']}.mp4").mkdir()
    with LiveServer(pipe, out) as restarted:
        video = f"{restarted.url}/api/jobs/{job['id']}/video"
        status, error = call_json("GET", video)
        assert (status, error["detail"]) == (
            404,
            f"the video of job {job['id']!r} is not a file in the output folder",
        )
        assert call("HEAD", video)[0] == 404
        status, gone = call_json("DELETE", f"{restarted.url}/api/jobs/{job['id']}")
        assert status == 200 and gone["deleted"] is True
        assert not (out / f"{job['id']}.json").exists() and (out / f"{job['id']}.mp4").is_dir()
        assert call("GET", f"{restarted.url}/api/jobs/{job['id']}")[0] == 404
