"""The Gradio UI in a real headless Chromium (playwright-core from node_modules, /usr/bin/chromium).

Set up with ``bash launch/install_browser.sh``; every test skips with the reason when node, chromium or
playwright-core is missing.

One page (build_ui launched in-process) and one test engine thread (claims jobs from the store, reports
stages, writes a real mp4, subtitles and side files) serve every check of this module:

- ``test_page_loads``: title, main controls, the live parse preview, speaker names in the voice labels, a
  script example, the footer's "Use via API" link to /docs.
- ``test_queue_panel`` (slow): jobs waiting (engine held) in order with positions, a row's Cancel.
- ``test_ui_flow`` (slow): layout at 1440x900 (Generate and the result without scrolling) and on a 390-px
  phone, a renamed WAV as portrait, every field filled, a double click (one job), the named downloads,
  "load settings" from the history row bringing every field back, the gallery. Screenshots go to
  ``tmp/artifacts/ui/`` (or ``$UI_ARTIFACTS``).
- ``test_real_service_end_to_end`` (slow): ``python distributed_app.py --preset tiny`` as a subprocess,
  the full pipeline, checked through the browser and ``/api/jobs``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image, ImageDraw

from inference.render.video_io import write_video
from service.jobs import JobState, JobStore
from service.ui import UI_CSS, build_ui, submit_form

ROOT = Path(__file__).resolve().parents[1]
BROWSER_DIR = ROOT / "tests" / "browser"
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("UI_ARTIFACTS", ROOT / "tmp" / "artifacts" / "ui"))
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def _browser_missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (run bash launch/install_browser.sh)"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (run bash launch/install_browser.sh)"
    if not (ROOT / "node_modules" / "playwright-core" / "package.json").is_file():
        return "playwright-core is not in node_modules (run bash launch/install_browser.sh)"
    return None


def _require_browser() -> None:
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_portraits(folder: Path) -> tuple[Path, Path]:
    """Two simple 384x512 'portraits' (a face-like oval on a coloured background)."""
    paths = []
    for name, background, face in (
        ("left", (190, 110, 80), (235, 200, 170)),
        ("right", (80, 110, 190), (225, 190, 160)),
    ):
        img = Image.new("RGB", (384, 512), background)
        draw = ImageDraw.Draw(img)
        draw.ellipse((112, 90, 272, 300), fill=face)
        draw.ellipse((150, 160, 170, 180), fill=(40, 30, 30))
        draw.ellipse((214, 160, 234, 180), fill=(40, 30, 30))
        draw.rectangle((160, 240, 224, 252), fill=(150, 60, 60))
        path = folder / f"{name}.png"
        img.save(path)
        paths.append(path)
    return paths[0], paths[1]


def _node(script: str, *args: str, timeout: float) -> tuple[dict, float]:
    """Run a browser script; returns (its JSON line, wall seconds). Fails the test with its output."""
    t0 = time.monotonic()
    proc = subprocess.run(
        ["node", str(BROWSER_DIR / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"},
    )
    took = time.monotonic() - t0
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"{script} printed no result\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1]), took


@contextlib.contextmanager
def _ui_in_process(store: JobStore) -> Iterator[str]:
    demo = build_ui(
        store,
        submit=lambda form, files: submit_form(store, form, files),
        tts_preview=None,
        info=lambda: {"model": "test"},
    )
    port = _free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        css=UI_CSS,
        allowed_paths=[str(store.outputs_dir)],
        ssr_mode=False,
        footer_links=[],
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _store_engine(store: JobStore, stop: threading.Event, hold: threading.Event | None = None) -> None:
    """Test double of the engine: claims jobs (not while ``hold`` is set), reports the renderer's stages and
    writes a real (grey, 1 s) mp4 with subtitles and the side files a render leaves (reference picture,
    timeline)."""
    while not stop.is_set():
        job = None if hold is not None and hold.is_set() else store.claim_next("test-engine")
        if job is None:
            time.sleep(0.1)
            continue
        out = store.job_dir(job.id)
        store.update_progress(job.id, 2, "synthesising speech")
        store.set_state(job.id, "rendering")
        store.update_progress(job.id, 50, "clip 1 of 1, step 8 of 16")
        store.update_progress(job.id, 90, "decoding clip 1 of 1")
        store.set_state(job.id, "encoding")
        srt = "1\n00:00:00,000 --> 00:00:01,000\nHello, nice to meet you.\n"
        vtt = "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nHello, nice to meet you.\n"
        frames = np.full((25, 64, 96, 3), 128, np.uint8)
        write_video(frames, None, 24000, out / "video.mp4", subtitles={"srt": srt, "vtt": vtt})
        Image.new("RGB", (96, 64), (90, 120, 160)).save(out / "reference.png")
        (out / "timeline.json").write_text('{"turns": []}')
        store.set_outputs(
            job.id, ["video.mp4", "subtitles.srt", "subtitles.vtt", "reference.png", "timeline.json"]
        )
        store.set_state(job.id, "done")


HOLD = threading.Event()  # set: the test engine leaves jobs waiting in the queue


@pytest.fixture(scope="module")
def ui_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, JobStore, Path]]:
    """One store, one test engine thread and one in-process page for every browser check of this module."""
    _require_browser()
    tmp = tmp_path_factory.mktemp("ui")
    store = JobStore(tmp / "jobs.db", tmp / "outputs", min_free_bytes=0)
    stop = threading.Event()
    engine = threading.Thread(target=_store_engine, args=(store, stop, HOLD), daemon=True)
    engine.start()
    try:
        with _ui_in_process(store) as url:
            yield url, store, tmp
    finally:
        stop.set()
        engine.join(10)
        store.close()


def test_page_loads(ui_service: tuple[str, JobStore, Path]) -> None:
    url, _, tmp = ui_service
    shot = tmp / "page.png"
    result, took = _node(
        "ui_smoke.mjs", "--url", url, "--screenshot", str(shot), "--timeout", "60", timeout=120
    )
    assert result["ok"] and result["title"] == "Dialogue video"
    assert result["api_link"].endswith("/docs")
    assert shot.is_file() and shot.stat().st_size > 10_000
    print(f"page-load browser test: {took:.1f} s wall, {json.dumps(result)}")


@pytest.mark.slow
def test_queue_panel(ui_service: tuple[str, JobStore, Path]) -> None:
    """Jobs wait (engine held): the queue lists them in order with positions, the tab counts them, a row's
    Cancel cancels that job only."""
    url, store, _ = ui_service
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    HOLD.set()
    try:
        result, took = _node("ui_queue.mjs", "--url", url, "--screenshot", str(ARTIFACTS / "queue.png"),
                             "--timeout", "60", timeout=150)  # fmt: skip
        first, second = store.get(result["first"]), store.get(result["second"])
        assert first.state == JobState.QUEUED and second.state == JobState.CANCELLED
        assert result["order"] == [[first.id, "#1"], [second.id, "#2"]]
        assert first.settings["seed"] == 101 and second.settings["seed"] == 102
        assert result["status"].startswith(f"Job {second.id[:8]} cancelled")
        store.request_cancel(first.id)  # leave nothing waiting for the other checks
    finally:
        HOLD.clear()
    print(f"queue panel: {took:.1f} s wall")


@pytest.mark.slow
def test_ui_flow(ui_service: tuple[str, JobStore, Path]) -> None:
    """Layout at 1440x900 and 390 px, a renamed WAV as portrait, every field filled, a double click, the
    video with named downloads, an example, then "load settings" from the history row, the gallery."""
    url, store, tmp = ui_service
    left, right = write_portraits(tmp)
    bad = tmp / "voice.png"  # a WAV file under an image name
    t = np.arange(16000) / 16000
    soundfile.write(bad, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV")
    text = tmp / "notes.txt"
    text.write_text("not a picture\n")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    before = store.count()
    result, took = _node(
        "ui_flow.mjs", "--url", url, "--left", str(left), "--right", str(right), "--bad", str(bad),
        "--text", str(text), "--artifacts", str(ARTIFACTS), "--timeout", "150", timeout=240,
    )  # fmt: skip
    print(f"browser flow: {took:.1f} s wall, screenshots in {ARTIFACTS}")
    # Layout: Generate and the result area without scrolling on a desktop; one column on a phone with
    # Generate on its first screen.
    assert result["desktop"] == {"generate": True, "result": True}
    assert result["phone"]["one_column"] and result["phone"]["generate_on_screen"], result["phone"]
    for name in ("desktop-1440x900.png", "phone-390.png", "phone-390-full.png", "desktop-result.png"):
        assert (ARTIFACTS / name).stat().st_size > 5_000, name
    # The renamed WAV: our sentence, naming the field and saying what it is; gone with a real portrait.
    assert result["bad_message"].startswith("⚠️ Portrait of person 1 (left)")
    assert (
        "not a picture but WAV audio" in result["bad_message"]
        and "PNG, JPEG or WebP" in result["bad_message"]
    )
    assert result["type_message"].startswith("⚠️ Portrait of person 1 (left): 'notes.txt' is not a picture")
    assert result["framework_errors"] == [] and result["cleared_message"] == ""
    assert result["required_message"].startswith("⚠️ Portrait of person 1 (left): required")
    assert result["cleared_required"] == ""
    assert "kept the ones you set" in result["preset_note"] and "seed (1234)" in result["preset_note"]
    # A double click made one job, and it is the one the page shows ("New seed" made a second one, which
    # its Delete removed again).
    assert store.count() == before + 1 and not store.exists(result["seed_job"])
    assert result["after_delete"] == f"Deleted job {result['seed_job'][:8]} and its files."
    job = store.get(result["job_id"])
    assert job.state == JobState.DONE and "Already submitted" not in result["submit_message"]
    assert job.spec["script"] == result["sent"]["script"] and job.spec["voices"] == ["af_heart", "bf_emma"]
    assert job.spec["scene"]["layout"] == "backdrop" and job.spec["scene"]["aspect"] == "4:3"
    assert job.settings["steps"] == 20 and job.settings["seed"] == 1234 and job.settings["max_frames"] == 750
    assert job.spec["prompt"] == "Two colleagues in a quiet library."
    short = job.id[:8]
    names = {Path(d).name for d in result["downloads"]}
    assert {f"dialogue-{short}.mp4", f"dialogue-{short}.srt", f"dialogue-{short}.vtt"} <= names, names
    assert f"dialogue-{short}-files.zip" in names, names
    assert Path(result["gallery_link"]).name == f"dialogue-{short}.mp4"
    # The example changed every field; "load settings" brought each one back.
    sent, example, loaded = result["sent"], result["example"], result["loaded"]
    changed = {k for k in sent if sent[k] != example[k]}
    assert {"left", "right", "layout", "aspect", "script", "voice2", "prompt", "steps", "seed"} <= changed, (
        changed
    )
    for key in sent:
        if key in ("left", "right"):  # the upload and the stored input are served under their own paths
            assert loaded[key] and f"{key}_image" in loaded[key], (key, loaded[key])
        else:
            assert loaded[key] == sent[key], (key, sent[key], loaded[key])
    assert short in result["form_message"] and "seed 1234" in result["form_message"]


def _get_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.slow
def test_real_service_end_to_end(tmp_path: Path) -> None:
    entry = ROOT / "distributed_app.py"
    if not entry.is_file():
        pytest.skip("distributed_app.py (the entry point) does not exist yet")
    _require_browser()
    left, right = write_portraits(tmp_path)
    port = _free_port()
    outputs = tmp_path / "outputs"
    log_path = tmp_path / "service.log"
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(entry), "--preset", "tiny", "--server_port", str(port), "--outputs_dir", str(outputs)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
            start_new_session=True,  # its own process group, so _stop ends every child too
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        healthy = False
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the service exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(OSError, ValueError):
                status, body = _get_json(f"{base}/api/health", timeout=2)
                if status == 200 and body.get("success"):
                    healthy = True
                    break
            time.sleep(1)
        assert healthy, f"/api/health never answered ok within 300 s:\n{log_path.read_text()[-4000:]}"
        started = time.monotonic() - t0
        shot = tmp_path / "e2e.png"
        result, took = _node(
            "ui_e2e.mjs", "--url", f"{base}/", "--left", str(left), "--right", str(right), "--screenshot", str(shot),
            "--timeout", "540", "--preset", "fast", timeout=600,
        )  # fmt: skip
        assert result["ok"] and shot.is_file()
        status, jobs = _get_json(f"{base}/api/jobs?limit=5")
        assert status == 200
        states = {j["task_id"]: j["status"] for j in jobs["jobs"]}
        assert states.get(result["job_id"]) == "done", states
        print(f"real service: ready in {started:.1f} s, browser run {took:.1f} s, {json.dumps(result)}")
    finally:
        _stop(proc)
