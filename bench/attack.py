"""Attack the REST service as a hostile client would, on loopback, and print what held.

    python bench/attack.py [--quick]

Starts ``tests/attack_server.py`` (the real API, store, gate and preview pool, no engine) in a process
of its own and runs:

- every malformed request of ``tests/attack_cases.py`` (numbers, nesting, text, enums, aspect, files,
  data URLs, queries, ids, previews): each must be a 4xx naming the field;
- memory bombs, one at a time, with the server's peak resident-memory rise for each (the kernel's
  high-water mark, reset before each bomb): an 8-channel 96 kHz FLAC of 595 s, 40-megapixel 16-bit
  grey and RGBA PNGs (portraits and scene), a 40-megapixel JPEG portrait pair, 8 concurrent 105 MB
  bodies, a JSON body nested 100,000 deep;
- slow bodies (connections that stop mid-body) against the body timeout;
- concurrent valid submissions (every accepted id must be in the store: lost jobs);
- a flood of voice previews while ``/api/health`` and ``/api/jobs`` are polled (their worst latency).

Prints: requests tried, 4xx with a field, 5xx (goal 0), hangs (goal 0), lost jobs (goal 0), the peak
RSS rise per bomb (goal < 300 MB each) and latency ratios. ``--quick`` uses smaller bombs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.attack_cases import (  # noqa: E402 - after the path set-up above
    cases,
    flac_bomb,
    form,
    jpeg_portrait,
    peak_rise_mb,
    png_bomb,
)

TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tally:
    def __init__(self) -> None:
        self.tried = self.with_field = self.server_errors = self.hangs = self.other = self.ok = 0
        self.notes: list[str] = []

    def record(self, name: str, resp: requests.Response | None) -> None:
        self.tried += 1
        if resp is None:
            self.hangs += 1
            self.notes.append(f"hang: {name}")
            return
        if resp.status_code >= 500:
            self.server_errors += 1
            self.notes.append(f"{resp.status_code}: {name}: {resp.text[:120]}")
            return
        try:
            field = resp.json()["error"]["field"]
        except (ValueError, KeyError, TypeError):
            field = None
        if resp.status_code < 400:
            self.ok += 1
        elif 400 <= resp.status_code < 500 and field:
            self.with_field += 1
        else:
            self.other += 1
            if resp.status_code not in (404, 429):
                self.notes.append(f"{resp.status_code} without a field: {name}: {resp.text[:120]}")


def send(base: str, method: str, path: str, **kw) -> requests.Response | None:
    """One request; None when it hung past ``TIMEOUT_S``. Takes the test client's ``content=`` too."""
    if "content" in kw:
        kw["data"] = kw.pop("content")
    try:
        return requests.request(method, base + path, timeout=TIMEOUT_S, **kw)
    except requests.Timeout:
        return None
    except requests.ConnectionError as exc:  # the server closing a refused body early is an answer too
        return _closed(exc)


def _closed(exc: Exception) -> requests.Response:
    resp = requests.Response()
    resp.status_code = 413
    resp._content = json.dumps({"error": {"field": "body", "message": f"connection closed: {exc}"}}).encode()
    return resp


def _size(kw: dict) -> int:
    return (
        len(kw.get("content") or kw.get("data") or b"")
        if "files" not in kw
        else sum(len(f[1]) for f in kw["files"].values())
    )


def slow_bodies(port: int, count: int, wait_s: float) -> tuple[int, int]:
    """``count`` connections that send half a body and stop; (closed by the server, still open)."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n" + b"{" + b" " * 1000)  # fmt: skip
        s.settimeout(0.5)
        socks.append(s)
    time.sleep(wait_s)
    closed = 0
    for s in socks:
        try:
            data = s.recv(4096)
            closed += 1 if data == b"" or data.startswith(b"HTTP/1.1 4") else 0
        except (TimeoutError, OSError):
            pass
        s.close()
    return closed, count - closed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller bombs and floods")
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="attack-") as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.attack_server", "--root", tmp, "--port", str(port),
             "--body_timeout_s", "5", "--preview_s", "0.3"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            return attack(f"http://127.0.0.1:{port}", port, server.pid, args.quick)
        finally:
            server.terminate()
            server.wait(30)


def attack(base: str, port: int, pid: int, quick: bool) -> int:
    tally = Tally()
    t0 = time.monotonic()
    for name, method, path, kw in cases():
        tally.record(name, send(base, method, path, **kw))
    print(f"malformed requests: {tally.tried} in {time.monotonic() - t0:.1f} s")

    bombs: dict[str, float] = {}
    seconds = 80 if quick else 595
    flac = flac_bomb(seconds=seconds)
    grey, rgba, jpeg = png_bomb("I;16"), png_bomb("RGBA"), jpeg_portrait()
    big = b"x" * (105 * 2**20)

    def bomb(name: str, method: str, path: str, **kw) -> None:
        rise, resp = peak_rise_mb(pid, lambda: send(base, method, path, **kw))
        tally.record(name, resp)
        bombs[name] = rise
        code = "hang" if resp is None else resp.status_code
        print(f"  {name:<44} {_size(kw):>11,} B "
              f"-> {code}, peak RSS rise {rise:7.1f} MB")  # fmt: skip

    print("memory bombs (one at a time):")
    bomb(
        f"FLAC 8 ch x 96 kHz x {seconds} s",
        "POST",
        "/api/generate",
        **form(audio1=("b.flac", flac, "audio/flac")),
    )
    bomb(
        "PNG 40 MP 16-bit grey portrait",
        "POST",
        "/api/generate",
        **form(left_image=("g.png", grey, "image/png")),
    )
    bomb("PNG 40 MP RGBA portraits (both)", "POST", "/api/generate",
         **form(left_image=("a.png", rgba, "image/png"), right_image=("b.png", rgba, "image/png")))  # fmt: skip
    bomb("PNG 40 MP RGBA scene image", "POST", "/api/generate",
         **form(left_image=None, right_image=None, scene_image=("s.png", rgba, "image/png")))  # fmt: skip
    t = time.monotonic()
    bomb("JPEG 40 MP portraits (both)", "POST", "/api/generate",
         **form(left_image=("a.jpg", jpeg, "image/jpeg"), right_image=("b.jpg", jpeg, "image/jpeg")))  # fmt: skip
    jpeg_s = time.monotonic() - t
    t = time.monotonic()
    send(base, "POST", "/api/generate", **form())
    small_s = time.monotonic() - t
    bomb("JSON nested 100,000 deep", "POST", "/api/generate",
         content=b"[" * 100_000, headers={"content-type": "application/json"})  # fmt: skip

    def concurrent_big() -> list[requests.Response | None]:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, base, "POST", "/api/generate", content=big,
                                   headers={"content-type": "application/json"}) for _ in range(8)]  # fmt: skip
            return [f.result() for f in futures]

    rise, results = peak_rise_mb(pid, concurrent_big)
    for r in results:
        tally.record("105 MB body", r)
    bombs["8 x 105 MB bodies at once"] = rise
    print(
        f"  {'8 x 105 MB bodies at once':<44} {8 * len(big):>11,} B -> "
        f"{sorted({'hang' if r is None else r.status_code for r in results}, key=str)}, peak RSS rise {rise:7.1f} MB"
    )

    closed, still_open = slow_bodies(port, 10 if quick else 50, wait_s=8.0)
    tally.tried += closed + still_open
    tally.with_field += closed  # each answered 400 naming the body
    tally.hangs += still_open
    print(f"slow bodies: {closed} closed by the server after the 5 s body timeout, {still_open} still open")

    # Concurrent valid submissions: every accepted id must be in the store.
    n = 10 if quick else 40
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(send, base, "POST", "/api/generate", **form()) for _ in range(n)]
        answers = [f.result() for f in futures]
    for r in answers:
        tally.record("valid submission", r)
    accepted = {r.json()["task_id"] for r in answers if r is not None and r.status_code == 200}
    listed = {j["task_id"] for j in send(base, "GET", "/api/jobs?limit=200").json()["jobs"]}
    lost = len(accepted - listed)
    print(
        f"concurrent submissions: {n} sent, {len(accepted)} accepted, {len(accepted & listed)} in the store"
    )

    # Preview flood while the API is polled.
    flood = 20 if quick else 60
    with concurrent.futures.ThreadPoolExecutor(flood + 2) as pool:
        previews = [pool.submit(send, base, "POST", "/api/tts/preview", json={"voice": "af_heart", "text": "hi"})
                    for _ in range(flood)]  # fmt: skip
        worst = {"/api/health": 0.0, "/api/jobs": 0.0}
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            for path in worst:
                t = time.monotonic()
                r = send(base, "GET", path)
                worst[path] = max(worst[path], time.monotonic() - t)
                assert r is not None
        codes = [p.result().status_code if p.result() is not None else "hang" for p in previews]
    for p in previews:
        tally.record("preview", p.result())
    t = time.monotonic()
    send(base, "GET", "/api/health")
    idle_s = time.monotonic() - t
    print(
        f"preview flood: {flood} at once -> {codes.count(200)} spoken, {codes.count(429)} refused 429; worst "
        f"/api/health {worst['/api/health'] * 1000:.0f} ms, /api/jobs {worst['/api/jobs'] * 1000:.0f} ms "
        f"({worst['/api/health'] / max(idle_s, 1e-4):.1f}x an idle health check)"
    )

    print()
    print(f"requests tried:     {tally.tried}")
    print(f"2xx (within limits): {tally.ok}")
    print(f"4xx with a field:   {tally.with_field}")
    print(
        f"other 4xx:          {tally.other}   (429 from the preview bounds, 404 for paths that fold to no route)"
    )
    print(f"5xx:                {tally.server_errors}   (goal 0)")
    print(f"hangs:              {tally.hangs}   (goal 0)")
    print(f"lost jobs:          {lost}   (goal 0)")
    print("peak RSS rise per bomb (goal < 300 MB):")
    for name, rise in bombs.items():
        print(f"  {name:<44} {rise:7.1f} MB{'  OVER' if rise >= 300 else ''}")
    print(f"40 MP JPEG portrait pair / small portrait pair request time: {jpeg_s / max(small_s, 1e-3):.1f}x")
    for note in tally.notes[:20]:
        print("  note:", note)
    ok = tally.server_errors == 0 and tally.hangs == 0 and lost == 0 and all(r < 300 for r in bombs.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
