"""REST API: every endpoint, every bad-input class, auth, path traversal, queue/disk limits, concurrency.

The engine is not part of the API: a test fills the store the way an engine would (claim, progress,
outputs, done) and reports live state through ``ServiceInfo.engine_status`` (a plain callable).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import threading
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
import soundfile
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from service.api import EngineStatus, Limits, ServiceInfo, WorkerStatus, create_app, create_router
from service.jobs import JobState, JobStore


def _has(module: str, attr: str) -> bool:
    try:
        if importlib.util.find_spec(module) is None:
            return False
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


needs_voices = pytest.mark.skipif(not _has("tts.voices", "get_voice"), reason="tts/voices.py not there yet")
needs_script = pytest.mark.skipif(
    not (_has("dialogue", "parse_script") and _has("tts.voices", "get_voice")),
    reason="dialogue.parse_script or tts/voices.py not there yet",
)

TOKEN = "s3cret-token"


# ---------------------------------------------------------------------------------------------- inputs


def _png(
    w: int = 320, h: int = 384, colour: tuple[int, int, int] = (200, 120, 90), fmt: str = "PNG"
) -> bytes:
    img = Image.new("RGB", (w, h), colour)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _wav(seconds: float = 0.4, sr: int = 16000, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr, format=fmt)
    return buf.getvalue()


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


LEFT, RIGHT = _png(), _png(colour=(90, 120, 200), fmt="JPEG")
SCENE = _png(640, 360)
BOXES = [[20, 20, 340, 300], [20, 340, 340, 620]]
AUDIO1, AUDIO2 = _wav(), _wav(0.6, fmt="FLAC")


def _audio_form(**extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    files = {
        "left_image": ("left.png", LEFT, "image/png"),
        "right_image": ("right.jpg", RIGHT, "image/jpeg"),
        "audio1": ("a.wav", AUDIO1, "audio/wav"),
        "audio2": ("b.flac", AUDIO2, "audio/flac"),
    }
    data: dict[str, Any] = {
        "prompt": "two friends in a cafe",
        "preset": "fast",
        "settings": '{"steps": 6, "seed": 3}',
    }
    for k, v in extra.items():
        if v is None:
            files.pop(k, None)
            data.pop(k, None)
        elif isinstance(v, tuple):
            files[k] = v
            data.pop(k, None)
        else:
            data[k] = v
            files.pop(k, None)
    return data, files


def _upstream_json(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": "a studio interview",
        "cond_image": _data_url(SCENE, "image/png"),
        "audio_type": "para",
        "cond_audio": {"person1": _data_url(AUDIO1, "audio/wav"), "person2": _data_url(AUDIO2, "audio/flac")},
        "bbox": {"person1": BOXES[0], "person2": BOXES[1]},
    }
    for k, v in extra.items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    return body


# ---------------------------------------------------------------------------------------------- fixtures


class EngineDouble:
    """Live state the entry point would report (heartbeat time, per-rank work)."""

    def __init__(self) -> None:
        self.alive = True
        self.last_heartbeat: float | None = time.time()
        self.workers = (
            WorkerStatus(0, True, "a" * 32, "rendering", "cuda:0"),
            WorkerStatus(1, True, "a" * 32),
        )

    def __call__(self) -> EngineStatus:
        return EngineStatus(
            self.alive, self.last_heartbeat, self.workers, "" if self.alive else "rank 1 died"
        )


def _make(tmp_path: Path, *, token: str | None = None, limits: Limits = Limits(), tts=None, **store_kw: Any):
    kw = {"min_free_bytes": 0, **store_kw}
    store = JobStore(tmp_path / "jobs.sqlite", tmp_path / "outputs", **kw)
    engine = EngineDouble()
    info = ServiceInfo(
        world_size=2,
        ulysses_size=2,
        dit_fsdp=True,
        versions={"torch": "2.13.0"},
        weights={"dit": "weights/Wan2.1-I2V-14B-480P"},
        engine_status=engine,
        heartbeat_timeout_s=30,
    )
    app = create_app(store, info, auth_token=token, limits=limits, tts_preview=tts)
    return store, engine, TestClient(app)


@pytest.fixture
def env(tmp_path: Path):
    store, engine, client = _make(tmp_path)
    yield store, engine, client
    store.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    """One app for the many bad-request cases (each must leave the store as it found it)."""
    store, engine, client = _make(tmp_path_factory.mktemp("shared"))
    yield store, engine, client
    store.close()


def _err(resp, status: int, field: str | None, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["success"] is False and set(body["error"]) == {"field", "message"}, body
    assert body["error"]["field"] == field, body
    for w in words:
        assert w.lower() in body["error"]["message"].lower(), body
    return body


_SUBMISSION: list[Any] = []


def _quick_submit(store: JobStore) -> str:
    """Submit like POST /api/generate does, reusing one validated request (scene composition costs
    ~0.2 s per request on this CPU; the generate tests above go through HTTP)."""
    if not _SUBMISSION:
        from inference.render.intake import build_job
        from inference.render.spec import JobInput

        req = JobInput(left_image=LEFT, right_image=RIGHT, audio1=AUDIO1, audio2=AUDIO2, preset="fast",
                       settings={"steps": 6})  # fmt: skip
        _SUBMISSION.append(build_job(req, Limits()))
    sub = _SUBMISSION[0]
    return store.submit(sub.spec, sub.settings, sub.files).id


def _finish(store: JobStore, job_id: str, outputs: dict[str, bytes]) -> None:
    """What an engine does with a claimed job."""
    job = store.claim_next(worker="rank0")
    assert job is not None and job.id == job_id
    store.update_progress(job_id, 50, "clip 1/2")
    store.add_timing(job_id, "tts_time", 1.25)
    store.set_state(job_id, "rendering")
    store.add_timing(job_id, "video_time", 10.0)
    store.set_state(job_id, "encoding")
    for name, data in outputs.items():
        (store.job_dir(job_id) / name).write_bytes(data)
    store.set_outputs(job_id, list(outputs))
    store.set_state(job_id, "done")


# ---------------------------------------------------------------------------------------------- generate


def test_generate_multipart_portraits_with_audio_files(env) -> None:
    store, _, client = env
    data, files = _audio_form(audio_mode="para", layout="backdrop")
    resp = client.post("/api/generate", data=data, files=files)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["success"] is True and body["status_url"] == f"/api/status/{body['task_id']}"
    assert body["queue_position"] == 1
    job = store.get(body["task_id"])
    assert job.inputs == ("audio1.wav", "audio2.flac", "left_image.png", "right_image.jpg")
    assert store.input_path(job.id, "right_image.jpg").read_bytes() == RIGHT
    spec = job.spec
    assert spec["layout"] == "portraits" and spec["images"] == {
        "left": "left_image.png",
        "right": "right_image.jpg",
    }
    assert spec["audio_source"] == "files" and spec["audio_mode"] == "para"
    assert spec["audio_seconds"] == {"person1": 0.4, "person2": 0.6}
    assert spec["scene"]["layout"] == "backdrop" and len(spec["scene"]["scene_boxes"]) == 2
    assert spec["prompt"] == "two friends in a cafe" and spec["preset"] == "fast"
    from inference.render.settings import PRESETS, GenerationSettings

    settings = GenerationSettings.from_dict(job.settings)  # the engine rebuilds settings like this
    assert settings.steps == 6 and settings.seed == 3
    assert settings.text_guidance == PRESETS["fast"].settings.text_guidance


def test_generate_multipart_scene_with_boxes(env) -> None:
    store, _, client = env
    data, files = _audio_form(left_image=None, right_image=None, scene_image=("s.png", SCENE, "image/png"))
    data["boxes"] = json.dumps(BOXES)
    resp = client.post("/api/generate", data=data, files=files)
    assert resp.status_code == 200, resp.text
    spec = store.get(resp.json()["task_id"]).spec
    assert spec["layout"] == "scene" and spec["images"] == {"scene": "scene_image.png"}
    assert spec["scene"]["boxes"] == BOXES and spec["audio_mode"] == "add"  # add is the default


def test_generate_upstream_json_with_data_urls(env) -> None:
    store, _, client = env
    resp = client.post("/api/generate", json=_upstream_json())
    assert resp.status_code == 200, resp.text
    job = store.get(resp.json()["task_id"])
    assert job.spec["source"] == "json" and job.spec["layout"] == "scene"
    assert job.spec["scene"]["boxes"] == BOXES and job.spec["audio_mode"] == "para"
    assert store.input_path(job.id, "audio2.flac").read_bytes() == AUDIO2
    assert job.spec["preset"] == "balanced"  # the default preset


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"cond_image": "examples/multi/1/multi1.png"}, "cond_image", ["server file paths", "data URL"]),
        ({"cond_image": "/etc/passwd"}, "cond_image", ["server file paths"]),
        ({"cond_image": "https://example.com/a.png"}, "cond_image", ["not fetched"]),
        ({"cond_image": "data:image/png,rawbytes"}, "cond_image", ["base64"]),
        ({"cond_image": "data:image/png;base64,@@@@"}, "cond_image", ["valid base64"]),
        ({"cond_image": 42}, "cond_image", ["string"]),
        (
            {"cond_audio": {"person1": "a.wav", "person2": "b.wav"}},
            "cond_audio.person1",
            ["server file paths"],
        ),
        ({"cond_audio": {"person1": _data_url(AUDIO1, "audio/wav")}}, "cond_audio.person2", ["required"]),
        (
            {"cond_audio": {"person1": _data_url(AUDIO1, "audio/wav"), "person2": "None"}},
            "cond_audio.person2",
            ["silent"],
        ),  # fmt: skip
        ({"cond_audio": "a.wav"}, "cond_audio", ["object"]),
        ({"audio_type": "mix"}, "audio_type", ["add", "para"]),
        ({"bbox": {"person1": BOXES[0]}}, "bbox", ["person2"]),
        ({"bbox": {"person1": [0, 0, 9999, 9999], "person2": BOXES[1]}}, "bbox", ["outside"]),
        ({"cond_video": "x.mp4"}, "cond_video", ["not supported"]),
        ({"sample_steps": 4}, "sample_steps", ["unknown key"]),
        ({"cond_audio": None}, "tts_audio", ["required"]),
        ({"tts_audio": {"text": "(s1) hi"}}, "cond_audio", ["either"]),
        ({"tts_audio": "hello"}, "tts_audio", ["object"]),
        ({"prompt": ["a"]}, "prompt", ["string"]),
        ({"settings": {"steps": 0}}, "settings.steps", ["out of range"]),
        ({"left_image": _data_url(LEFT, "image/png")}, "cond_image", ["not both"]),
    ],
)
def test_generate_json_bad_input(shared, change: dict[str, Any], field: str, words: list[str]) -> None:
    store, _, client = shared
    _err(client.post("/api/generate", json=_upstream_json(**change)), 400, field, *words)
    assert store.count() == 0


def test_generate_json_body_must_be_an_object_of_valid_json(env) -> None:
    _, _, client = env
    headers = {"content-type": "application/json"}
    _err(client.post("/api/generate", content=b"{not json", headers=headers), 400, "body", "not valid json")
    _err(client.post("/api/generate", content=b"[1, 2]", headers=headers), 400, "body", "object")
    _err(client.post("/api/generate", content=b"\xff\xfe", headers=headers), 400, "body")
    _err(client.post("/api/generate", content=b"[" * 100_000, headers=headers), 400, "body", "nested")
    resp = client.post("/api/generate", content=b"x", headers={"content-type": "text/plain"})
    _err(resp, 415, "content-type", "multipart/form-data")


def _corrupt_png() -> bytes:
    return LEFT[: len(LEFT) // 2]


@pytest.mark.parametrize(
    ("change", "status", "field", "words"),
    [
        ({"left_image": None, "right_image": None}, 400, "left_image", ["required"]),
        ({"right_image": None}, 400, "right_image", ["required"]),
        ({"scene_image": ("s.png", SCENE, "image/png")}, 400, "scene_image", ["not both"]),
        (
            {"left_image": ("l.png", b"hello, not an image", "image/png")},
            400,
            "left_image",
            ["not a supported image"],
        ),
        ({"left_image": ("l.png", _corrupt_png(), "image/png")}, 400, "left_image", ["corrupt"]),
        ({"right_image": ("r.png", _png(100, 100), "image/png")}, 400, "right_image", ["short side"]),
        ({"left_image": ("l.gif", _png(fmt="GIF"), "image/gif")}, 400, "left_image", ["gif"]),
        ({"left_image": ("l.png", b"", "image/png")}, 400, "left_image", ["empty"]),
        ({"boxes": json.dumps(BOXES)}, 400, "boxes", ["scene image only"]),
        ({"audio2": None}, 400, "audio2", ["required"]),
        (
            {"audio1": ("a.wav", b"RIFF\x00\x00garbage-not-audio", "audio/wav")},
            400,
            "audio1",
            ["not a readable"],
        ),
        ({"audio_mode": "sideways"}, 400, "audio_mode", ["add", "para"]),
        ({"script": "(s1) hi"}, 400, "script", ["not both"]),
        ({"voice1": "af_heart"}, 400, "voice1", ["script only"]),
        ({"audio1": None, "audio2": None}, 400, "script", ["required"]),
        ({"preset": "ultra"}, 400, "preset", ["fast", "balanced", "quality"]),
        ({"settings": "{steps: 4"}, 400, "settings", ["not valid json"]),
        ({"settings": "[1]"}, 400, "settings", ["object"]),
        ({"settings": '{"steps": 1000}'}, 400, "settings.steps", ["out of range", "1..100"]),
        ({"settings": '{"steps": "many"}'}, 400, "settings.steps", ["integer"]),
        ({"settings": '{"resolution": 1080}'}, 400, "settings.resolution", ["480 or 720"]),
        ({"settings": '{"turbo": true}'}, 400, "settings.turbo", ["unknown setting"]),
        ({"prompt": "x" * 2001}, 400, "prompt", ["too long", "2000"]),
        ({"layout": "circle"}, 400, "layout", ["side_by_side"]),
        (
            {
                "left_image": None,
                "right_image": None,
                "scene_image": ("s.png", SCENE, "image/png"),
                "layout": "backdrop",
            },
            400,
            "layout",
            ["two portraits only"],
        ),
        (
            {
                "left_image": None,
                "right_image": None,
                "scene_image": ("s.png", SCENE, "image/png"),
                "boxes": "[[1, 2], [3, 4]]",
            },
            400,
            "boxes",
            ["4 numbers"],
        ),
        ({"image1": "x"}, 400, "image1", ["unknown form field"]),
        ({"prompt": ("p.txt", b"a prompt", "text/plain")}, 400, "prompt", ["text value"]),
    ],
)
def test_generate_form_bad_input(shared, change, status, field, words) -> None:
    store, _, client = shared
    data, files = _audio_form(**change)
    _err(client.post("/api/generate", data=data, files=files), status, field, *words)
    assert store.count() == 0 and list(store.outputs_dir.iterdir()) == []


def test_generate_form_text_in_a_file_field_and_duplicates(env) -> None:
    _, _, client = env
    data, files = _audio_form(audio1=None)
    data["audio1"] = "not a file"
    _err(client.post("/api/generate", data=data, files=files), 400, "audio1", "file upload")
    data, files = _audio_form()
    files_list = [*files.items(), ("audio1", ("c.wav", AUDIO1, "audio/wav"))]
    _err(client.post("/api/generate", data=data, files=files_list), 400, "audio1", "more than once")
    resp = client.post(
        "/api/generate", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["field"] == "body"


def test_generate_size_limits(tmp_path: Path) -> None:
    limits = Limits(max_upload_bytes=20_000, max_request_bytes=200_000, max_audio_seconds=1.0)
    store, _, client = _make(tmp_path, limits=limits)
    big = _png(800, 800, fmt="PNG") + b"\x00" * 30_000
    data, files = _audio_form(left_image=("l.png", big, "image/png"))
    _err(client.post("/api/generate", data=data, files=files), 413, "left_image", "20000")
    data, files = _audio_form(audio1=("a.wav", _wav(2.0, sr=4000), "audio/wav"))
    _err(client.post("/api/generate", data=data, files=files), 400, "audio1", "2.0 s", "limit")
    data, files = _audio_form()
    files["audio2"] = ("b.bin", b"\x00" * 300_000, "application/octet-stream")
    _err(client.post("/api/generate", data=data, files=files), 413, "body", "200000")
    body = _upstream_json(cond_image=_data_url(b"\x00" * 30_000, "image/png"))
    _err(client.post("/api/generate", json=body), 413, "cond_image", "larger than")

    def chunks():  # no Content-Length: the streamed size is still enforced
        for _ in range(30):
            yield b"x" * 10_000

    resp = client.post("/api/generate", content=chunks(), headers={"content-type": "application/json"})
    _err(resp, 413, "body")
    data, files = _audio_form(audio1=None, audio2=None, script="x" * 5001)
    _err(client.post("/api/generate", data=data, files=files), 400, "script", "too long")
    assert store.count() == 0
    store.close()


def test_queue_full_is_429_and_disk_full_is_507(tmp_path: Path) -> None:
    free = {"bytes": 10 * 2**30}
    store, _, client = _make(tmp_path, max_queue=1, min_free_bytes=2**30, free_space=lambda p: free["bytes"])
    data, files = _audio_form()
    assert client.post("/api/generate", data=data, files=files).status_code == 200
    resp = client.post("/api/generate", data=data, files=files)
    _err(resp, 429, None, "queue is full")
    assert resp.headers["retry-after"] == "30"
    store.claim_next()
    free["bytes"] = 2**30 + 10
    _err(client.post("/api/generate", data=data, files=files), 507, None, "disk space")
    assert store.count() == 1
    store.close()


@needs_script
def test_generate_with_a_script_and_voices(env) -> None:
    store, _, client = env
    data, files = _audio_form(audio1=None, audio2=None, voice1="af_bella", voice2="am_adam")
    data["script"] = "(s1) Hello there, how are you?\n(s2) Fine, thanks. And you?"
    resp = client.post("/api/generate", data=data, files=files)
    assert resp.status_code == 200, resp.text
    spec = store.get(resp.json()["task_id"]).spec
    assert spec["audio_source"] == "tts" and spec["voices"] == ["af_bella", "am_adam"] and spec["turns"] == 2
    assert spec["speakers"] == ["Speaker 1", "Speaker 2"]
    assert spec["script"].startswith("(s1) Hello")


@needs_script
def test_generate_upstream_json_tts_mode(env) -> None:
    store, _, client = env
    tts = {
        "text": "(s1) do you know multi-talk? (s2) yes, I know it. (s1) Me too.",
        "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt",  # upstream names voices by path
        "human2_voice": "am_adam",
    }
    resp = client.post("/api/generate", json=_upstream_json(cond_audio={}, audio_type=None, tts_audio=tts))
    assert resp.status_code == 200, resp.text
    spec = store.get(resp.json()["task_id"]).spec
    assert spec["voices"] == ["af_heart", "am_adam"] and spec["audio_source"] == "tts"


@needs_script
@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"voice1": "xx_nobody"}, "voice1", ["xx_nobody"]),
        ({"voice2": "../../etc/passwd"}, "voice2", ["not a voice id"]),
        ({"script": "(s1) hello\n(s9) who am I?"}, "script", ["line 2"]),
        ({"script": "   "}, "script", ["required"]),
    ],
)
def test_generate_script_errors(shared, change, field, words) -> None:
    store, _, client = shared
    data, files = _audio_form(audio1=None, audio2=None, script="(s1) Hi!\n(s2) Hello.")
    data.update(change)
    _err(client.post("/api/generate", data=data, files=files), 400, field, *words)
    assert store.count() == 0


def test_twenty_concurrent_api_submissions(env) -> None:
    store, _, client = env
    data, files = _audio_form()
    results: list[Any] = []
    lock = threading.Lock()

    def submit() -> None:
        resp = client.post("/api/generate", data=data, files=files)
        with lock:
            results.append((resp.status_code, resp.json().get("task_id")))

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [code for code, _ in results] == [200] * 20
    ids = {tid for _, tid in results}
    assert len(ids) == 20 and {j.id for j in store.queue()} == ids


# ---------------------------------------------------------------------------------------------- read side


def test_status_list_and_queue(env) -> None:
    store, engine, client = env
    ids = [_quick_submit(store) for _ in range(3)]
    store.claim_next(worker="rank0")
    store.update_progress(ids[0], 42.0, "clip 2/5")
    store.add_timing(ids[0], "tts_time", 2.5)

    st = client.get(f"/api/status/{ids[0]}").json()
    assert (st["status"], st["progress"], st["stage"], st["queue_position"]) == (
        "preparing",
        42.0,
        "clip 2/5",
        None,
    )
    assert st["timing"] == {"tts_time": 2.5} and st["error"] is None and st["attempts"] == 1
    assert (
        st["created_at"].endswith("Z")
        and st["spec"]["layout"] == "portraits"
        and st["settings"]["steps"] == 6
    )
    assert client.get(f"/api/status/{ids[2]}").json()["queue_position"] == 2

    listed = client.get("/api/jobs", params={"limit": 2}).json()
    assert [j["task_id"] for j in listed["jobs"]] == ids[::-1][:2] and listed["total"] == 3
    assert listed["jobs"][0]["spec"] is None  # lists stay small
    assert [j["task_id"] for j in client.get("/api/jobs?limit=2&offset=2").json()["jobs"]] == [ids[0]]
    assert [j["task_id"] for j in client.get("/api/jobs?state=preparing").json()["jobs"]] == [ids[0]]

    q = client.get("/api/queue").json()
    assert q["queue_size"] == 2 and [j["task_id"] for j in q["queue"]] == ids[1:]
    assert [j["queue_position"] for j in q["queue"]] == [1, 2]
    assert [j["task_id"] for j in q["running"]] == [ids[0]]
    assert q["workers"][0] == {
        "rank": 0,
        "busy": True,
        "task_id": "a" * 32,
        "stage": "rendering",
        "device": "cuda:0",
        "group": None,  # the replica group (``--replicas``); None from an engine without groups
    }
    assert q["groups"] == []


@pytest.mark.parametrize(
    ("url", "status", "field"),
    [
        ("/api/status/not-an-id", 400, "id"),
        ("/api/status/" + "A" * 32, 400, "id"),
        ("/api/status/" + "0" * 32, 404, "id"),
        ("/api/status/..%2F..%2Fetc%2Fpasswd", 404, None),
        ("/api/jobs?limit=0", 400, "limit"),
        ("/api/jobs?limit=100000", 400, "limit"),
        ("/api/jobs?limit=abc", 400, "limit"),
        ("/api/jobs?offset=-1", 400, "offset"),
        ("/api/jobs?state=exploded", 400, "state"),
        ("/api/nothing-here", 404, None),
    ],
)
def test_read_side_bad_requests(shared, url: str, status: int, field: str | None) -> None:
    _, _, client = shared
    _err(client.get(url), status, field)


def test_cancel(env) -> None:
    store, _, client = env
    a, b, c = (_quick_submit(store) for _ in range(3))
    store.claim_next()  # a is running
    resp = client.delete(f"/api/jobs/{b}")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert store.get(b).state == JobState.CANCELLED
    resp = client.delete(f"/api/jobs/{a}").json()
    assert resp["status"] == "preparing" and resp["cancel_requested"] is True
    assert store.is_cancel_requested(a)
    store.set_state(a, "cancelled")  # the engine saw the flag
    _err(client.delete(f"/api/jobs/{a}"), 409, "id", "already finished")
    _err(client.delete("/api/jobs/" + "0" * 32), 404, "id")
    _err(client.delete("/api/jobs/xyz"), 400, "id")
    assert client.get(f"/api/status/{c}").json()["queue_position"] == 1


def test_download_and_path_traversal(env, tmp_path: Path) -> None:
    store, _, client = env
    job_id = _quick_submit(store)
    _err(client.get(f"/api/download/{job_id}"), 409, "id", "queued")
    (tmp_path / "secret.txt").write_text("top secret")
    _finish(
        store, job_id, {"video.mp4": b"MP4DATA", "subtitles.srt": b"1\n00:00:00,000 --> 00:00:01,000\nHi\n"}
    )

    st = client.get(f"/api/status/{job_id}").json()
    assert (
        st["status"] == "done" and st["progress"] == 100 and st["download_url"] == f"/api/download/{job_id}"
    )
    assert st["timing"] == {"tts_time": 1.25, "video_time": 10.0}
    assert st["files"]["subtitles.srt"] == f"/api/download/{job_id}?file=subtitles.srt"
    resp = client.get(f"/api/download/{job_id}")
    assert resp.status_code == 200 and resp.content == b"MP4DATA"
    assert resp.headers["content-type"] == "video/mp4" and "attachment" in resp.headers["content-disposition"]
    resp = client.get(f"/api/download/{job_id}", params={"file": "subtitles.srt"})
    assert resp.status_code == 200 and resp.content.startswith(b"1\n")

    for bad in ("../secret.txt", "../../../etc/passwd", "/etc/passwd", "inputs/left_image.png", "..", ".x"):
        _err(
            client.get(f"/api/download/{job_id}", params={"file": bad}),
            400,
            "file",
            "not an output file name",
        )
    for unknown in ("inputs", "left_image.png", "jobs.sqlite", "other.mp4"):
        _err(client.get(f"/api/download/{job_id}", params={"file": unknown}), 404, "file")
    for path in (
        "/api/download/../../etc/passwd",
        "/api/download/..%2F..%2Fetc%2Fpasswd",
        f"/api/download/{job_id}/../../secret.txt",
        f"/api/download/{job_id}%2F..%2F..%2Fsecret.txt",
        "/api/download/..",
        "/api/download/%2e%2e",
    ):
        resp = client.get(path)
        assert resp.status_code in (400, 404), (path, resp.status_code)
        assert b"top secret" not in resp.content and b"root:" not in resp.content
    _err(client.get("/api/download/" + "0" * 32), 404, "id")
    _err(client.get("/api/download/abc.def"), 400, "id")


def test_download_of_a_purged_job(tmp_path: Path) -> None:
    store, _, client = _make(tmp_path, retention_days=1)
    job_id = _quick_submit(store)
    _finish(store, job_id, {"video.mp4": b"v"})
    assert store.cleanup(now=time.time() + 2 * 86400) == [job_id]
    assert client.get(f"/api/status/{job_id}").json()["purged"] is True
    _err(client.get(f"/api/download/{job_id}"), 404, "file")
    store.close()


def test_info(env) -> None:
    _, _, client = env
    info = client.get("/api/info").json()
    assert (info["world_size"], info["ulysses_size"], info["fsdp"]) == (2, 2, {"dit": True, "t5": False})
    assert set(info["presets"]) == {"fast", "balanced", "quality"} and info["presets"]["fast"]["steps"] > 0
    assert info["versions"] == {"torch": "2.13.0"} and info["weights"]["dit"].startswith("weights/")
    assert info["engine"]["alive"] is True and info["engine"]["workers"][1]["rank"] == 1
    assert info["limits"]["max_upload_bytes"] == Limits().max_upload_bytes and info["auth_required"] is False


def test_health(env, tmp_path: Path) -> None:
    store, engine, client = env
    resp = client.get("/api/health")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ok" and body["store"]["writable"] and body["engine"]["last_heartbeat_age_s"] < 5
    engine.last_heartbeat = time.time() - 300
    resp = client.get("/api/health")
    assert resp.status_code == 503 and "heartbeat 300 s ago" in " ".join(resp.json()["problems"])
    engine.last_heartbeat, engine.alive = time.time(), False
    assert "rank 1 died" in " ".join(client.get("/api/health").json()["problems"])
    engine.alive = True

    def broken() -> EngineStatus:
        raise RuntimeError("engine thread gone")

    app = create_app(store, ServiceInfo(engine_status=broken))
    resp = TestClient(app).get("/api/health")
    assert resp.status_code == 503 and "engine thread gone" in resp.json()["problems"][0]
    resp = TestClient(create_app(store, ServiceInfo())).get("/api/health")
    assert resp.status_code == 503 and resp.json()["problems"] == ["no engine attached"]


def test_health_reports_an_unwritable_store(env) -> None:
    import shutil

    store, _, client = env
    shutil.rmtree(store.outputs_dir)  # e.g. the outputs volume went away
    resp = client.get("/api/health")
    assert resp.status_code == 503 and resp.json()["store"]["writable"] is False
    assert "not writable" in resp.json()["store"]["message"]


@needs_voices
def test_voices(env) -> None:
    _, _, client = env
    voices = client.get("/api/voices").json()["voices"]
    ids = [v["id"] for v in voices]
    assert "af_heart" in ids and all({"id", "gender", "language"} <= set(v) for v in voices)


def test_tts_preview_without_engine_is_503(env) -> None:
    _, _, client = env
    if _has("tts.voices", "get_voice"):
        _err(client.post("/api/tts/preview", json={"voice": "af_heart"}), 503, None, "not attached")
    _err(client.post("/api/tts/preview", json={}), 400, "voice", "field required")
    _err(client.post("/api/tts/preview", json={"voice": 5}), 400, "voice")
    resp = client.post("/api/tts/preview", content=b"{oops", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["success"] is False


@needs_voices
def test_tts_preview_with_an_injected_synthesizer(tmp_path: Path) -> None:
    calls: list[tuple[str, str | None]] = []

    def speak(voice: str, text: str | None) -> bytes:  # test double of the Kokoro-backed callable
        calls.append((voice, text))
        if text == "boom":
            from tts.errors import TTSInputError

            raise TTSInputError("text", "nothing speakable in 'boom'")
        return _wav(0.1)

    store, _, client = _make(tmp_path, tts=speak, limits=Limits(max_preview_chars=20))
    resp = client.post("/api/tts/preview", json={"voice": "am_adam", "text": "Hello!"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "audio/wav"
    assert soundfile.info(io.BytesIO(resp.content)).samplerate == 16000
    assert calls == [("am_adam", "Hello!")]
    _err(client.post("/api/tts/preview", json={"voice": "zz_none"}), 400, "voice", "zz_none")
    _err(
        client.post("/api/tts/preview", json={"voice": "am_adam", "text": "x" * 21}), 400, "text", "too long"
    )
    _err(client.post("/api/tts/preview", json={"voice": "am_adam", "text": "boom"}), 400, "text", "speakable")
    store.close()


# ---------------------------------------------------------------------------------------------- auth, docs, 500


def test_auth(tmp_path: Path) -> None:
    store, _, client = _make(tmp_path, token=TOKEN)
    for method, url in (("get", "/api/jobs"), ("get", "/api/info"), ("get", "/api/queue"), ("post", "/api/generate"),
                        ("get", "/api/status/" + "0" * 32), ("delete", "/api/jobs/" + "0" * 32),
                        ("get", "/api/download/" + "0" * 32), ("get", "/api/voices")):  # fmt: skip
        resp = getattr(client, method)(url)
        _err(resp, 401, "authorization", "Bearer")
        assert resp.headers["www-authenticate"] == "Bearer"
    _err(
        client.get("/api/jobs", headers={"Authorization": "Bearer wrong"}),
        401,
        "authorization",
        "invalid token",
    )
    _err(client.get("/api/jobs", headers={"Authorization": f"Basic {TOKEN}"}), 401, "authorization")
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/jobs", headers=good).status_code == 200
    data, files = _audio_form()
    assert client.post("/api/generate", data=data, files=files, headers=good).status_code == 200
    assert client.get("/api/info", headers=good).json()["auth_required"] is True
    assert client.get("/api/health").status_code == 200  # open for load balancers
    assert client.head("/api/health").status_code == 200
    # One gate for the whole app: the schema and the docs need the token too.
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json", headers=good).status_code == 200
    with pytest.raises(ValueError, match="non-empty"):
        create_app(store, ServiceInfo(), auth_token="  ")
    store.close()


def test_openapi_and_docs(env) -> None:
    _, _, client = env
    schema = client.get("/openapi.json").json()
    for path in ("/api/generate", "/api/status/{job_id}", "/api/jobs", "/api/jobs/{job_id}", "/api/queue",
                 "/api/download/{job_id}", "/api/info", "/api/health", "/api/voices", "/api/tts/preview"):  # fmt: skip
        assert path in schema["paths"], path
    content = schema["paths"]["/api/generate"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert client.get("/docs").status_code == 200


def test_unexpected_errors_are_a_logged_500_with_an_id(env, caplog) -> None:
    store, _, client = env

    def explode(*a: Any, **k: Any) -> Any:
        raise RuntimeError("database on fire")

    store.get = explode  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="service.api"):
        resp = client.get("/api/status/" + "0" * 32)
    body = _err(resp, 500, None, "internal error")
    error_id = body["error"]["message"].split("(id ")[1].split(")")[0]
    assert "database on fire" not in resp.text
    assert any(error_id in r.getMessage() for r in caplog.records)


def test_router_keeps_its_error_contract_on_a_bare_app(tmp_path: Path) -> None:
    """Mounted on someone else's app (e.g. Gradio's), the routes still answer in the JSON error shape."""
    store = JobStore(tmp_path / "db.sqlite", tmp_path / "out", min_free_bytes=0)
    app = FastAPI()
    app.include_router(create_router(store, ServiceInfo(), auth_token=TOKEN))
    client = TestClient(app)
    _err(client.get("/api/jobs"), 401, "authorization")
    good = {"Authorization": f"Bearer {TOKEN}"}
    _err(client.get("/api/status/nope", headers=good), 400, "id")
    _err(client.get("/api/jobs?limit=-5", headers=good), 400, "limit")
    _err(client.delete("/api/jobs/" + "1" * 32, headers=good), 404, "id")
    store.close()


def _m4a(seconds: float = 0.3, sr: int = 16000) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=sr)
        samples = (0.2 * np.sin(2 * np.pi * 330 * np.arange(int(seconds * sr)) / sr)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def test_m4a_audio_is_accepted_and_bad_audio_named(shared) -> None:
    store, _, client = shared
    data, files = _audio_form(audio2=("b.m4a", _m4a(), "audio/mp4"), audio_mode="para")
    resp = client.post("/api/generate", data=data, files=files)
    assert resp.status_code == 200, resp.text
    job = store.get(resp.json()["task_id"])
    assert job.spec["audio"] == {"person1": "audio1.wav", "person2": "audio2.m4a"}
    assert 0.25 < job.spec["audio_seconds"]["person2"] < 0.45
    store.request_cancel(job.id)
    silent = io.BytesIO()
    soundfile.write(silent, np.zeros(8000, dtype=np.float32), 16000, format="WAV")
    data, files = _audio_form(audio1=("a.wav", silent.getvalue(), "audio/wav"))
    _err(client.post("/api/generate", data=data, files=files), 400, "audio1", "silent")
    audio = {"person1": _data_url(AUDIO1, "audio/wav"), "person2": _data_url(b"\x00" * 999, "audio/wav")}
    _err(
        client.post("/api/generate", json=_upstream_json(cond_audio=audio)),
        400,
        "cond_audio.person2",
        "readable",
    )


def test_random_garbage_never_reaches_the_500_handler(shared) -> None:
    """User input of any shape is answered 4xx: a seeded sweep over types, keys and bytes."""
    store, _, client = shared
    rng = np.random.default_rng(0)
    values: list[Any] = [None, 0, -1, 1.5, True, "", "x", [], {}, [1, 2], {"a": 1}, "data:,", "data:;base64,AAAA",
                         [[0, 0, 1, 1]], "\x00", "é" * 3, 10**30]  # fmt: skip
    keys = [
        *_upstream_json(),
        "tts_audio",
        "left_image",
        "right_image",
        "settings",
        "preset",
        "layout",
        "aspect",
    ]
    for _ in range(40):
        body = _upstream_json()
        for key in rng.choice(keys, size=int(rng.integers(1, 4)), replace=False):
            body[str(key)] = values[int(rng.integers(len(values)))]
        resp = client.post("/api/generate", json=body)
        assert 400 <= resp.status_code < 500 or resp.status_code == 200, (body, resp.text)
    fields = ["left_image", "right_image", "scene_image", "audio1", "audio2", "boxes", "settings", "script"]
    for _ in range(15):
        data, files = _audio_form()
        for key in rng.choice(fields, size=int(rng.integers(1, 3)), replace=False):
            junk = rng.bytes(int(rng.integers(0, 400)))
            if key in ("boxes", "settings", "script"):
                data[str(key)] = junk.decode("latin-1")
            else:
                files[str(key)] = ("f.bin", junk, "application/octet-stream")
        resp = client.post("/api/generate", data=data, files=files)
        assert 400 <= resp.status_code < 500 or resp.status_code == 200, resp.text  # "" script/boxes is blank
    for job in store.list(limit=100):  # anything accepted really is a valid job
        assert job.spec["kind"] == "dialogue"
        if job.state == JobState.QUEUED:
            store.request_cancel(job.id)


def test_unknown_api_paths_stay_json_with_a_ui_mounted_at_root(env) -> None:
    """Gradio is mounted at "/" (gr.mount_gradio_app): /api/* must still be ours, the rest theirs."""
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount

    store, _, client = env
    ui = PlainTextResponse("the UI")
    client.app.router.routes.append(Mount("/", app=ui))
    assert client.get("/").text == "the UI"
    _err(client.get("/api/no/such/thing"), 404, None, "no such api endpoint")
    _err(client.put("/api/jobs"), 404, None, "PUT /api/jobs")
    _err(client.get("/api/download/..%2F..%2Fetc%2Fpasswd"), 404, None)
    assert client.get("/api/jobs").status_code == 200


def test_voices_not_installed_are_refused_at_submission(tmp_path: Path) -> None:
    installed = frozenset({"af_heart", "am_adam"})
    store, _, client = _make(tmp_path, limits=Limits(installed_voices=installed))
    files = {"left_image": ("l.png", _png(), "image/png"), "right_image": ("r.png", _png(), "image/png")}
    form = {"script": "(s1) Hello there.\n(s2) Hi!", "voice1": "af_heart", "voice2": "bf_emma"}
    _err(client.post("/api/generate", data=form, files=files), 400, "voice2", "not installed", "am_adam")
    assert store.count() == 0
    ok = client.post("/api/generate", data={**form, "voice2": "am_adam"}, files=files)
    assert ok.status_code == 200, ok.text
    voices = {v["id"]: v["installed"] for v in client.get("/api/voices").json()["voices"]}
    assert voices["af_heart"] and not voices["bf_emma"] and len(voices) > 50
    _err(client.post("/api/tts/preview", json={"voice": "zf_xiaobei"}), 400, "voice", "not installed")
    assert client.get("/api/info").json()["limits"]["installed_voices"] == ["af_heart", "am_adam"]
    store.close()


def test_info_serves_read_only_start_up_defaults(tmp_path: Path) -> None:
    store, _, client = _make(tmp_path, limits=Limits(job_defaults=MappingProxyType({"steps": 7})))
    r = client.get("/api/info")
    assert r.status_code == 200, r.text
    assert r.json()["limits"]["job_defaults"] == {"steps": 7}
    store.close()


def test_ui_lists_only_installed_voices() -> None:
    from service.ui import voice_choices

    assert [vid for _, vid in voice_choices(frozenset({"am_adam", "zf_xiaobei"}))] == [
        "am_adam",
        "zf_xiaobei",
    ]
    assert len(voice_choices()) > 50


def test_start_up_defaults_apply_over_the_preset_under_the_jobs_own_settings(tmp_path: Path) -> None:
    store, _, client = _make(tmp_path, limits=Limits(job_defaults={"steps": 7, "frame_num": 41}))
    files = {"left_image": ("l.png", _png(), "image/png"), "right_image": ("r.png", _png(), "image/png")}
    form = {"script": "(s1) Hello there.\n(s2) Hi!", "preset": "quality"}
    plain = client.post("/api/generate", data=form, files=files).json()["task_id"]
    own = client.post("/api/generate", data={**form, "settings": '{"steps": 9}'}, files=files).json()[
        "task_id"
    ]
    assert store.get(plain).settings["steps"] == 7 and store.get(plain).settings["frame_num"] == 41
    assert store.get(own).settings["steps"] == 9 and store.get(own).settings["frame_num"] == 41
    store.close()


def test_a_random_seed_is_drawn_once_at_submission(tmp_path: Path) -> None:
    store, _, client = _make(tmp_path)
    files = {"left_image": ("l.png", _png(), "image/png"), "right_image": ("r.png", _png(), "image/png")}
    form = {"script": "(s1) Hello there.\n(s2) Hi!", "settings": '{"seed": -1}'}
    job_id = client.post("/api/generate", data=form, files=files).json()["task_id"]
    seed = store.get(job_id).settings["seed"]
    assert (
        isinstance(seed, int) and seed >= 0
    )  # stored concrete: a re-run after a restart renders the same video
    store.close()


@needs_script
def test_one_person_jobs(env) -> None:
    """One image with one recording or a speaker-1 script: the single-person path, as upstream's
    single_example_*.json; a second person on a one-image job is refused, naming what brought it."""
    store, _, client = env
    portrait = _png(400, 600)
    resp = client.post("/api/generate", files={"image": ("me.png", portrait, "image/png"),
                                               "audio1": ("a.wav", AUDIO1, "audio/wav")})  # fmt: skip
    assert resp.status_code == 200, resp.text
    spec = store.get(resp.json()["task_id"]).spec
    assert (spec["people"], spec["layout"], spec["images"]) == (1, "single", {"image": "image.png"})
    h, w = spec["scene"]["bucket"]
    assert spec["scene"]["scene_boxes"] == [[0, 0, h, w]] and spec["audio"] == {"person1": "audio1.wav"}

    form = {"script": "Hello, I am the only one here.", "voice1": "af_bella"}
    resp = client.post("/api/generate", data=form, files={"left_image": ("l.png", portrait, "image/png")})
    assert resp.status_code == 200, resp.text
    spec = store.get(resp.json()["task_id"]).spec
    assert (spec["people"], spec["voices"], spec["speakers"]) == (1, ["af_bella"], ["Speaker 1"])

    body = {"prompt": "A woman sings.", "cond_image": _data_url(portrait, "image/png"),
            "cond_audio": {"person1": _data_url(AUDIO1, "audio/wav")}}  # fmt: skip
    resp = client.post("/api/generate", json=body)
    assert resp.status_code == 200, resp.text
    assert store.get(resp.json()["task_id"]).spec["layout"] == "single"

    count = store.count()
    two = {"script": "(s1) Hi there.\n(s2) Hello!"}
    _err(client.post("/api/generate", data=two, files={"image": ("me.png", portrait, "image/png")}), 400, "script",
         "one-person job", "speaker 2")  # fmt: skip
    files = {"image": ("me.png", portrait, "image/png"), "audio1": ("a.wav", AUDIO1, "audio/wav"),
             "audio2": ("b.flac", AUDIO2, "audio/flac")}  # fmt: skip
    _err(client.post("/api/generate", files=files), 400, "audio2", "one recording")
    _err(client.post("/api/generate", data=two, files={"left_image": ("l.png", portrait, "image/png")}), 400,
         "right_image", "required")  # fmt: skip
    assert store.count() == count
