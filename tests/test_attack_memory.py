"""Memory bombs against the real API in a process of its own (``tests/attack_server.py``): tiny files
that declare huge decoded sizes and bodies past every limit each raise the server's peak resident
memory by less than 300 MB; stalled bodies are cut off by the body timeout; voice previews never hold
the API's threads."""

from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from fastapi.testclient import TestClient

from service.api import ServiceInfo, create_app
from service.jobs import JobStore
from service.previews import PreviewLimits, PreviewPool
from tests.attack_cases import flac_bomb, form, peak_rise_mb, png_bomb
from tests.dist_harness import free_port

ROOT = Path(__file__).resolve().parents[1]
BUDGET_MB = 300.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("attack")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.attack_server", "--root", str(root), "--port", str(port),
                             "--body_timeout_s", "2"], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield f"http://127.0.0.1:{port}", port, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.timeout(300)
def test_memory_bombs_stay_within_the_budget(server) -> None:
    base, _, pid = server
    bombs = {
        # 8 channels x 96 kHz x 80 s = 61 M samples: over the 600 s budget (57.6 M), refused by its header.
        "flac": (form(audio1=("b.flac", flac_bomb(seconds=80), "audio/flac")), 400, "audio1"),
        "grey16 portrait": (form(left_image=("g.png", png_bomb("I;16"), "image/png")), 200, None),
        "rgba scene": (
            form(left_image=None, right_image=None, scene_image=("s.png", png_bomb("RGBA"), "image/png")),
            200,
            None,
        ),  # fmt: skip
    }
    for name, (kwargs, status, field) in bombs.items():
        rise, resp = peak_rise_mb(
            pid, lambda kw=kwargs: requests.post(base + "/api/generate", timeout=120, **kw)
        )
        assert resp.status_code == status, (name, resp.text[:300])
        if field is not None:
            assert resp.json()["error"]["field"] == field, (name, resp.text[:300])
        assert rise < BUDGET_MB, (name, rise)


@pytest.mark.timeout(300)
def test_concurrent_oversized_bodies_stay_within_the_budget(server) -> None:
    base, _, pid = server
    big = b"x" * (100 * 2**20)  # under the 110 MB body cap: read (spooled), then refused as JSON

    def flood() -> list[int]:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(requests.post, base + "/api/generate", data=big, timeout=120,
                                   headers={"content-type": "application/json"}) for _ in range(6)]  # fmt: skip
            return [f.result().status_code for f in futures]

    rise, codes = peak_rise_mb(pid, flood)
    assert codes == [400] * 6 and rise < BUDGET_MB, (codes, rise)
    over = requests.post(base + "/api/generate", data=b"x" * (111 * 2**20), timeout=120,
                         headers={"content-type": "application/json"})  # fmt: skip
    assert over.status_code == 413 and over.json()["error"]["field"] == "body"


@pytest.mark.timeout(120)
def test_stalled_bodies_are_cut_off(server) -> None:
    _, port, _ = server
    socks = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{")  # fmt: skip
        s.settimeout(30)  # far past the server's 2 s body timeout
        socks.append(s)
    answers = []
    for s in socks:
        data = b""
        while chunk := s.recv(4096):  # the server answers and closes the connection
            data += chunk
        answers.append(data)
        s.close()
    assert all(a.startswith(b"HTTP/1.1 400") and b'"body"' in a for a in answers), answers[:2]


def test_previews_never_hold_the_api(tmp_path: Path) -> None:
    """A preview flood while the voice model is busy: a bounded number wait, the rest are refused 429
    at once, and the job routes answer meanwhile (the previews hold no API thread)."""
    release = threading.Event()

    def speak(voice: str, text: str | None) -> bytes:
        release.wait(30)
        return b"RIFF"

    store = JobStore(tmp_path / "jobs.db", tmp_path / "out", min_free_bytes=0)
    pool = PreviewPool(speak, PreviewLimits(workers=1, max_waiting=3, per_client_per_minute=100))
    with TestClient(create_app(store, ServiceInfo(), tts_preview=pool)) as client:
        with concurrent.futures.ThreadPoolExecutor(12) as ex:
            futures = [ex.submit(client.post, "/api/tts/preview", json={"voice": "af_heart", "text": "Hello"})
                       for _ in range(12)]  # fmt: skip
            while sum(f.done() for f in futures) < 8:  # 1 speaking + 3 waiting; 8 refused at once
                threading.Event().wait(0.05)
            refused = [f.result() for f in futures if f.done()]
            assert len(refused) == 8 and {r.status_code for r in refused} == {429}
            assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
            assert client.get("/api/jobs").status_code == 200  # answered while 4 previews are pending
            release.set()
            spoken = [f.result() for f in futures if f.result() not in refused]
        assert [r.status_code for r in spoken] == [200] * 4
        # The per-client rate: the same address past its budget is refused too.
        strict = PreviewPool(lambda v, t: b"RIFF", PreviewLimits(per_client_per_minute=2))
        with TestClient(create_app(store, ServiceInfo(), tts_preview=strict)) as c2:
            codes = [c2.post("/api/tts/preview", json={"voice": "af_heart"}).status_code for _ in range(4)]
        assert codes == [200, 200, 429, 429]
    store.close()
