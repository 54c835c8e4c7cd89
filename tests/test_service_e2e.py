"""End-to-end tests of the running service: ``distributed_app.py`` as a real subprocess, driven over REST.

- one process: a tiny two-speaker job from multipart upload to a valid mp4 (h264 + aac, durations match
  ``timeline.json``), with /api/queue, /api/info and /api/jobs; bad requests answer 4xx JSON;
- restart: SIGKILL while a job renders, start again on the same outputs: the job is re-queued and done;
- torchrun with two gloo ranks: the same job, world size 2; SIGTERM to torchrun ends every rank;
- start-up refusals exit 2 with one clear line; ``launch/selftest.sh 2`` reports parity.

Every subprocess runs in its own session with a hard deadline and is killed (with all its descendants)
in a ``finally``. Ports are picked free; ``OMP_NUM_THREADS=1`` keeps two loaded cores usable.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile

from inference.render.settings import FPS
from inference.render.video_io import probe_media
from tests.subprocess_env import offline_env

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
FRAME_S = 1.0 / FPS
SCRIPT = "(s1) Hello there. (s2) Hi, how are you?"
START_TIMEOUT_S = 150.0
JOB_TIMEOUT_S = 150.0

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    return offline_env()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) for every process visible in /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
        table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> set[int]:
    """Living (non-zombie) descendants of ``pid``."""
    table = _proc_table()
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _state) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                frontier.append(child)
    return {p for p in found if table[p][1] != "Z"}


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2 :].split()[0] != "Z"


@dataclass
class Service:
    proc: subprocess.Popen
    base: str
    log: Path
    outputs: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.base + path, timeout=30, **kw)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s session group and every descendant (torchrun starts its workers in their own
    sessions, so the group alone does not reach them), then reap ``proc``."""
    pids = descendants(proc.pid) if proc.poll() is None else set()
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


@contextmanager
def running_service(
    weights: Path, outputs: Path, log: Path, *, ranks: int = 1, extra: tuple[str, ...] = ()
) -> Iterator[Service]:
    """Start ``distributed_app.py --preset tiny`` (under torchrun when ``ranks`` > 1), wait for a healthy
    /api/health, yield; always kill the whole process tree on the way out."""
    port = free_port()
    app = ["distributed_app.py", "--preset", "tiny", "--weights", str(weights), "--outputs_dir", str(outputs),
           "--server_port", str(port), "--no_ui", *extra]  # fmt: skip
    if ranks > 1:
        cmd = [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc-per-node={ranks}", *app]
    else:
        cmd = [sys.executable, *app]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    service = Service(proc, f"http://127.0.0.1:{port}", log, outputs)
    try:
        wait_healthy(service)
        yield service
    finally:
        _kill_tree(proc)


def wait_healthy(service: Service, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            pytest.fail(f"the service exited with {service.proc.returncode} before it was healthy:\n"
                        f"{service.log_tail()}")  # fmt: skip
        try:
            r = service.get("/api/health")
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:300]}"
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    pytest.fail(f"the service was not healthy after {timeout_s:.0f} s (last: {last}):\n{service.log_tail()}")


def submit(service: Service, portraits: tuple[Path, Path], script: str = SCRIPT, **fields: str) -> str:
    files = {
        "left_image": ("left.png", portraits[0].read_bytes(), "image/png"),
        "right_image": ("right.png", portraits[1].read_bytes(), "image/png"),
    }
    data = {"script": script, "preset": "fast", **fields}
    r = requests.post(service.base + "/api/generate", data=data, files=files, timeout=60)
    assert r.status_code == 200, f"{r.status_code} {r.text}\n{service.log_tail()}"
    body = r.json()
    assert body["success"] is True and body["status"] == "queued"
    return body["task_id"]


def wait_status(
    service: Service,
    task_id: str,
    states: set[str],
    *,
    timeout_s: float = JOB_TIMEOUT_S,
    poll_s: float = 0.25,
) -> dict:
    """Poll /api/status until the job is in one of ``states``; a failed job or a dead service fails the test."""
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            pytest.fail(f"the service exited with {service.proc.returncode}:\n{service.log_tail()}")
        body = service.get(f"/api/status/{task_id}").json()
        if body["status"] in states:
            return body
        if body["status"] in ("failed", "cancelled"):
            pytest.fail(f"job {task_id} {body['status']}: {body['error']}\n{service.log_tail()}")
        time.sleep(poll_s)
    pytest.fail(f"job {task_id} not {sorted(states)} after {timeout_s:.0f} s (last {body.get('status')}, "
                f"{body.get('stage')}):\n{service.log_tail()}")  # fmt: skip


def check_video(service: Service, task_id: str, tmp_path: Path) -> None:
    """The job's mp4: h264 + aac, video and audio durations within one frame of each other and of the
    duration its ``timeline.json`` gives."""
    r = service.get(f"/api/download/{task_id}")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("video/mp4")
    video = tmp_path / f"{task_id}.mp4"
    video.write_bytes(r.content)
    info = probe_media(video)
    assert info.video_codec == "h264"
    assert info.audio_codec == "aac"
    assert info.frames > 0 and info.width > 0 and info.height > 0
    assert info.audio_duration is not None
    assert abs(info.video_duration - info.audio_duration) <= FRAME_S + 1e-6, info

    r = service.get(f"/api/download/{task_id}", params={"file": "timeline.json"})
    assert r.status_code == 200, r.text
    timeline = r.json()
    assert timeline["duration"] > 0 and len(timeline["turns"]) == 2
    assert abs(info.video_duration - timeline["duration"]) <= FRAME_S + 1e-6, (info, timeline["duration"])
    assert abs(info.audio_duration - timeline["duration"]) <= FRAME_S + 1e-6, (info, timeline["duration"])


# ---------------------------------------------------------------------------------------------- one process


@pytest.fixture(scope="module")
def service(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One single-process service for the REST tests of this module."""
    work = tmp_path_factory.mktemp("service_e2e")
    with running_service(tiny_weights, work / "outputs", work / "service.log") as svc:
        yield svc


@pytest.mark.timeout(400)
def test_rest_job_renders_a_valid_video(
    service: Service, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    info = service.get("/api/info").json()
    assert info["success"] is True
    assert info["world_size"] == 1 and info["ulysses_size"] == 1 and info["model"] == "tiny"
    assert info["engine"]["alive"] is True and len(info["engine"]["workers"]) == 1

    task_id = submit(service, portrait_pngs)
    queue = service.get("/api/queue").json()
    listed = [j["task_id"] for j in queue["running"] + queue["queue"]]
    done_already = service.get(f"/api/status/{task_id}").json()["status"] == "done"
    assert task_id in listed or done_already, queue
    assert len(queue["workers"]) == 1

    body = wait_status(service, task_id, {"done"})
    assert body["progress"] == 100.0 and body["attempts"] == 1 and body["error"] is None
    assert "video.mp4" in body["outputs"] and "timeline.json" in body["outputs"]
    assert body["timing"]["total_time"] > 0
    check_video(service, task_id, tmp_path)

    jobs = service.get("/api/jobs").json()
    assert jobs["total"] >= 1
    mine = [j for j in jobs["jobs"] if j["task_id"] == task_id]
    assert len(mine) == 1 and mine[0]["status"] == "done"
    queue = service.get("/api/queue").json()
    assert task_id not in [j["task_id"] for j in queue["running"] + queue["queue"]]
    assert all(not w["busy"] for w in queue["workers"])


@pytest.mark.timeout(400)
def test_rest_renders_upstreams_single_person_job(
    service: Service, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    """upstream's single_example_1.json over REST (files as data URLs): one person, the whole frame the
    speaker's, one audio track; the mp4's streams match."""
    t = np.arange(int(1.2 * 16000)) / 16000
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000, format="WAV")

    def data_url(data: bytes, mime: str) -> str:
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"

    body = {"prompt": "A woman is singing into a microphone in a recording studio.",
            "cond_image": data_url(portrait_pngs[0].read_bytes(), "image/png"),
            "cond_audio": {"person1": data_url(buf.getvalue(), "audio/wav")},
            "preset": "fast", "settings": {"mode": "clip"}}  # fmt: skip
    r = requests.post(service.base + "/api/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    status = wait_status(service, task_id, {"done"})
    assert status["spec"]["people"] == 1 and status["spec"]["layout"] == "single"
    meta = service.get(f"/api/download/{task_id}", params={"file": "render.json"}).json()
    h, w = meta["scene"]["bucket"]
    assert meta["people"] == 1 and meta["scene"]["boxes"] == [[0, 0, h, w]]
    video = tmp_path / "single.mp4"
    video.write_bytes(service.get(f"/api/download/{task_id}").content)
    info = probe_media(video)
    assert (info.video_codec, info.audio_codec) == ("h264", "aac") and info.frames > 0
    assert abs(info.video_duration - info.audio_duration) <= FRAME_S + 1e-6, info


@pytest.mark.timeout(200)
def test_bad_requests_get_4xx_json(service: Service, portrait_pngs: tuple[Path, Path]) -> None:
    left, right = (p.read_bytes() for p in portrait_pngs)
    images = {"left_image": ("l.png", left, "image/png"), "right_image": ("r.png", right, "image/png")}

    def post(data: dict[str, str], files: dict) -> tuple[int, dict]:
        # Text fields go as multipart parts too, so the request is multipart even without images.
        parts = {**{k: (None, v) for k, v in data.items()}, **files}
        r = requests.post(service.base + "/api/generate", files=parts, timeout=60)
        assert r.headers["content-type"].startswith("application/json"), r.text
        return r.status_code, r.json()

    before = service.get("/api/jobs").json()["total"]
    cases = [
        ({"script": SCRIPT}, {}, "left_image", None),
        ({"script": SCRIPT}, {"left_image": images["left_image"]}, "right_image", None),
        ({"script": "(s1) Hello.\n(s2) Hi there.\n(s7) Who am I?"}, images, "script", "line 3"),
        ({"script": SCRIPT, "voice1": "zz_nobody"}, images, "voice1", "zz_nobody"),
        ({"script": SCRIPT, "settings": '{"steps": 0}'}, images, "settings.steps", "1..100"),
        ({"script": SCRIPT, "settings": '{"frame_num": 100000}'}, images, "settings.frame_num", "allowed"),
        ({"script": SCRIPT, "settings": "{not json"}, images, "settings", "JSON"),
    ]
    for data, files, field, words in cases:
        status, body = post(data, files)
        assert 400 <= status < 500, (data, status, body)
        assert body["success"] is False, body
        assert body["error"]["field"] == field, (data, body)
        if words is not None:
            assert words in body["error"]["message"], (data, body)
    r = service.get("/api/status/" + "0" * 32)
    assert r.status_code == 404 and r.json()["error"]["field"] == "id"
    r = service.get("/api/status/not-a-job")
    assert r.status_code == 400 and r.json()["success"] is False
    assert service.get("/api/jobs").json()["total"] == before, "a refused request must not create a job"
    assert service.get("/api/health").status_code == 200


# ---------------------------------------------------------------------------------------------- restart


@pytest.mark.timeout(400)
def test_sigkill_while_rendering_requeues_and_finishes(
    tiny_weights: Path, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    outputs, log = tmp_path / "outputs", tmp_path / "service.log"
    with running_service(tiny_weights, outputs, log) as svc:
        # More steps than the demo's 6: the rendering state lasts long enough to be caught.
        task_id = submit(svc, portrait_pngs, settings='{"steps": 20}')
        body = wait_status(svc, task_id, {"rendering", "encoding", "done"}, poll_s=0.05)
        assert body["status"] == "rendering", f"the job left rendering before it could be interrupted: {body}"
        os.killpg(svc.proc.pid, signal.SIGKILL)
        svc.proc.wait(timeout=30)
    with running_service(tiny_weights, outputs, log) as svc:
        assert "recovered 1 job(s)" in svc.log_tail(20000)
        body = wait_status(svc, task_id, {"done"})
        assert body["attempts"] == 2, body
        assert body["settings"]["steps"] == 20
        check_video(svc, task_id, tmp_path)


# ---------------------------------------------------------------------------------------------- torchrun


@pytest.mark.distributed
@pytest.mark.timeout(500)
def test_torchrun_two_ranks_render_and_sigterm_ends_every_rank(
    tiny_weights: Path, portrait_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    with running_service(tiny_weights, tmp_path / "outputs", tmp_path / "service.log", ranks=2) as svc:
        info = svc.get("/api/info").json()
        assert info["world_size"] == 2 and info["ulysses_size"] == 2
        assert len(info["engine"]["workers"]) == 2
        task_id = submit(svc, portrait_pngs)
        body = wait_status(svc, task_id, {"done"})
        assert body["attempts"] == 1
        check_video(svc, task_id, tmp_path)

        workers = descendants(svc.proc.pid)
        ranks = [p for p in workers if "distributed_app.py" in _cmdline(p)]
        assert len(ranks) == 2, {p: _cmdline(p) for p in workers}
        svc.proc.send_signal(signal.SIGTERM)
        try:
            svc.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun still running 90 s after SIGTERM:\n{svc.log_tail()}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(is_running(p) for p in workers):
            time.sleep(0.2)
        left = {p: _cmdline(p) for p in workers if is_running(p)}
        assert not left, f"processes left after SIGTERM to torchrun: {left}\n{svc.log_tail()}"
        assert "rank 0: clean exit" in svc.log_tail(20000)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- start-up


@pytest.mark.timeout(300)
def test_startup_refusals_exit_2_with_one_clear_line(tmp_path: Path) -> None:
    # The weights folder is never read: every refusal comes before any model is loaded.
    cases = {
        ("--ring_size", "2"): "--ring_size",
        ("--t5_fsdp", "--t5_cpu"): "--t5_fsdp",  # sharded over the GPUs and kept on the CPU: not both
        ("--num_persistent_param_in_dit", "-1"): "--num_persistent_param_in_dit",
        ("--sample_steps", "0"): "--sample_steps",
    }
    procs: dict[tuple[str, ...], subprocess.Popen] = {}
    try:
        for flags in cases:
            cmd = [sys.executable, "distributed_app.py", "--preset", "tiny", "--weights", str(tmp_path / "none"),
                   "--outputs_dir", str(tmp_path / "out"), "--server_port", str(free_port()), "--no_ui", *flags]  # fmt: skip
            procs[flags] = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        for flags, proc in procs.items():
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 2, (flags, proc.returncode, out, err)
            assert "Traceback" not in out + err, (flags, out + err)
            lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
            assert len(lines) == 1, (flags, err)
            assert cases[flags] in lines[0], (flags, lines[0])
            assert len(lines[0]) > len(cases[flags]) + 30, f"the reason is missing: {lines[0]}"
    finally:
        for proc in procs.values():
            _kill_tree(proc)
    assert not (tmp_path / "none").exists(), "a refused start-up must not write tiny weights"


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_selftest_script_reports_parity() -> None:
    proc = subprocess.Popen(["bash", "launch/selftest.sh", "2"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=360)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 0, (out[-3000:], err[-3000:])
    lines = [ln for ln in out.splitlines() if ln.startswith("selftest ok")]
    assert len(lines) == 1, (out[-3000:], err[-3000:])
    match = re.search(r"max_abs_diff=(\S+)", lines[0])
    assert match is not None, lines[0]
    assert float(match.group(1)) <= 1e-5, lines[0]
    assert "ranks=2" in lines[0], lines[0]


def test_proc_helpers_see_a_child_and_its_end() -> None:
    """``descendants``/``is_running``, which the SIGTERM test relies on, against a real child."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert proc.pid in descendants(os.getpid()) and is_running(proc.pid)
    finally:
        _kill_tree(proc)
    assert not is_running(proc.pid)
