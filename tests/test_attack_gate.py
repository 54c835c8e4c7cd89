"""One gate for every route: without credentials every mounted route (REST, docs, the Gradio page, its
API, uploads and files) answers 401, only GET/HEAD /api/health stays open; failed logins are throttled;
Gradio's file route never serves the store or another credential's job; bodies are capped while they
stream in."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.routing import Mount

from service.api import ServiceInfo, create_app
from service.jobs import JobStore
from service.ui import build_ui, mount_ui
from service.validation import Limits

TOKEN = "t0ken-for-tests"
USERS = {"ann": "pw-ann"}


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def gated(tmp_path: Path):
    store = JobStore(tmp_path / "outputs" / "jobs.db", tmp_path / "outputs", min_free_bytes=0)
    limits = Limits(max_request_bytes=64 * 1024, max_upload_bytes=32 * 1024)
    app = create_app(store, ServiceInfo(), auth_token=TOKEN, users=USERS, limits=limits)
    blocks = build_ui(store, submit=lambda form, files: "x", tts_preview=None, info=lambda: {}, limits=limits)
    mount_ui(app, blocks, store)
    with TestClient(app) as client:
        yield store, app, client
    store.close()


def _routes(app) -> list[tuple[str, str]]:
    """(method, concrete path) for every route of the app and of every mounted sub-app."""
    out: list[tuple[str, str]] = []

    def walk(routes, prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount):
                walk(route.routes, prefix + route.path)
                continue
            if hasattr(route, "original_router"):  # FastAPI's record of an included router
                walk(route.original_router.routes, prefix + route.include_context.prefix)
                continue
            path = getattr(route, "path", None)
            if path is None:
                continue
            concrete = re.sub(r"\{[^}/]+:path\}", "x/y", prefix + path)
            concrete = re.sub(r"\{[^}]+\}", "0" * 32, concrete)
            for method in sorted(getattr(route, "methods", None) or {"GET"}):
                out.append((method, concrete))

    walk(app.routes, "")
    return out


def test_every_mounted_route_needs_credentials(gated) -> None:
    _, app, client = gated
    routes = _routes(app)
    assert len(routes) > 40 and any("gradio_api" in p for _, p in routes)  # Gradio's own routes are there
    open_ones = []
    for method, path in routes:
        resp = client.request(method, path)
        if resp.status_code != 401:
            open_ones.append((method, path, resp.status_code))
    assert open_ones == [("GET", "/api/health", 503), ("HEAD", "/api/health", 503)]  # no engine attached
    # Things a browser and Gradio's client really fetch, none of them open.
    for path in ("/", "/config", "/gradio_api/info", "/gradio_api/upload", "/gradio_api/queue/join", "/docs"):
        assert client.get(path).status_code == 401, path
    assert client.post("/gradio_api/upload", files={"files": ("a.png", b"x")}).status_code == 401
    page = client.get("/")
    assert page.headers["www-authenticate"].startswith("Basic")  # a browser asks for the login
    # With credentials the page and the API answer.
    assert client.get("/", headers=_basic("ann", "pw-ann")).status_code == 200
    assert client.get("/config", headers=_basic("anyone", TOKEN)).status_code == 200
    assert client.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/api/jobs", headers=_basic("ann", "pw-ann")).status_code == 200


def test_failed_logins_are_throttled(gated) -> None:
    _, _, client = gated
    codes = [client.get("/api/jobs", headers=_basic("ann", f"guess{i}")).status_code for i in range(30)]
    assert codes[:10] == [401] * 10 and set(codes[10:]) == {429}
    # The right password is throttled too while the address is locked out (no oracle).
    locked = client.get("/api/jobs", headers=_basic("ann", "pw-ann"))
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) >= 1


def test_gradio_file_route_serves_only_own_jobs(gated, tmp_path: Path) -> None:
    store, _, client = gated
    token, ann = {"Authorization": f"Bearer {TOKEN}"}, _basic("ann", "pw-ann")
    mine = store.submit({"kind": "test"}, {}, {"audio1.wav": b"RIFF"}, owner="user:ann")
    theirs = store.submit({"kind": "test"}, {}, {"audio1.wav": b"RIFF"}, owner="token")
    for job in (mine, theirs):
        (store.job_dir(job.id) / "video.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    outputs = store.outputs_dir
    url = "/gradio_api/file=" + str(outputs / mine.id / "video.mp4")
    assert client.get(url, headers=ann).status_code == 200
    assert client.get(url, headers=token).status_code == 404  # another credential's job
    for target in ("jobs.db", "jobs.db-wal", f"{theirs.id}/inputs/audio1.wav", f"{mine.id}/.frames/x"):
        assert client.get("/gradio_api/file=" + str(outputs / target), headers=ann).status_code == 404, target
    # The REST routes keep the same rule.
    assert client.get(f"/api/status/{mine.id}", headers=ann).status_code == 200
    assert client.get(f"/api/status/{mine.id}", headers=token).status_code == 404
    listed = client.get("/api/jobs", headers=token).json()
    assert [j["task_id"] for j in listed["jobs"]] == [theirs.id] and listed["total"] == 1


def test_bodies_are_capped_on_every_route(gated) -> None:
    _, _, client = gated
    ann = _basic("ann", "pw-ann")
    big = b"x" * (80 * 1024)
    resp = client.post("/gradio_api/upload", files={"files": ("a.png", big)}, headers=ann)
    assert resp.status_code == 413 and resp.json()["error"]["field"] == "body"
    resp = client.post("/api/generate", content=big, headers={**ann, "content-type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["field"] == "body"
