"""What running on Ray costs next to torchrun, on this machine (CPU, tiny preset, 2 groups of 1 rank).

    python bench/ray_overhead.py [--idle_s 20] [--jobs 2]

For each launcher it starts the service, measures the seconds until ``/api/health`` answers 200
and both groups serve (start-up: for Ray the local instance, the actors and their models), the CPU the whole process tree burns
while idle for ``--idle_s`` (heartbeats, the head's polls, Ray's own daemons), and the seconds from
submitting ``--jobs`` short jobs at once to all of them done (the object-store transfers of inputs, clips
and videos ride on this); then stops it. Prints the figures side by side and the Ray / torchrun ratios.

    torchrun --standalone --nproc-per-node=2 distributed_app.py --preset tiny --replicas 2
    python -m service.cluster --preset tiny --replicas 2 --group_size 1 --ray_cpus 2
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Figures:
    start_s: float
    idle_cpu_pct: float  # of one core, summed over the process tree
    jobs_s: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(text[text.rfind(")") + 2 :].split()[1])
    out, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        out += children
        frontier += children
    return out


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICK


def _portrait(body: tuple[int, int, int], bg: tuple[int, int, int]) -> bytes:
    h, w = 400, 300
    yy, xx = np.mgrid[:h, :w]
    a = np.empty((h, w, 3), np.uint8)
    a[:] = bg
    a[(np.abs(xx - w / 2) < 0.3 * h) & (yy > 0.5 * h)] = body
    a[(yy - 0.3 * h) ** 2 + (xx - w / 2) ** 2 < (0.15 * h) ** 2] = (240, 200, 170)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def measure(cmd: list[str], port: int, work: Path, idle_s: float, jobs: int) -> Figures:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("RAY_ADDRESS", None)
    base = f"http://127.0.0.1:{port}"
    with (work / "log").open("ab") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None or time.monotonic() - t0 > 600:
                raise SystemExit(f"{cmd[0]} did not come up; see {work / 'log'}")
            try:
                healthy = requests.get(base + "/api/health", timeout=5).status_code == 200
                groups = requests.get(base + "/api/queue", timeout=5).json()["groups"]
                if healthy and len(groups) == 2 and all(g["state"] in ("idle", "busy") for g in groups):
                    break  # every group serving, not only the first
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        start_s = time.monotonic() - t0
        time.sleep(3.0)  # let the start-up settle before the idle window
        pids = _tree(proc.pid)
        c0, w0 = _cpu_seconds(pids), time.monotonic()
        time.sleep(idle_s)
        idle = 100.0 * (_cpu_seconds(pids) - c0) / (time.monotonic() - w0)
        files = {"left_image": ("l.png", _portrait((30, 60, 120), (200, 200, 150)), "image/png"),
                 "right_image": ("r.png", _portrait((120, 40, 40), (150, 190, 210)), "image/png")}  # fmt: skip
        data = {"script": "(s1) Hello there. (s2) Hi, how are you?", "preset": "fast"}
        t1 = time.monotonic()
        ids = [requests.post(base + "/api/generate", data=data, files=files, timeout=60).json()["task_id"]
               for _ in range(jobs)]  # fmt: skip
        while True:
            states = [requests.get(f"{base}/api/status/{i}", timeout=10).json()["status"] for i in ids]
            if any(s in ("failed", "cancelled") for s in states):
                raise SystemExit(f"a job ended {states}; see {work / 'log'}")
            if all(s == "done" for s in states):
                break
            time.sleep(0.25)
        return Figures(start_s, idle, time.monotonic() - t1)
    finally:
        proc.send_signal(signal.SIGTERM)  # a clean stop (the Ray head removes its temporary folder)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for pid in reversed(_tree(proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--idle_s", type=float, default=20.0)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    weights = work / "weights"
    common = ["--preset", "tiny", "--weights", str(weights), "--no_ui", "--replicas", "2"]
    rows = {}
    for name, launcher in (
        ("torchrun", [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "distributed_app.py"]),
        ("ray", [sys.executable, "-m", "service.cluster", "--group_size", "1", "--ray_cpus", "2"]),
    ):
        folder = work / name
        folder.mkdir()
        port = _free_port()
        cmd = [*launcher, *common, "--outputs_dir", str(folder / "outputs"), "--server_port", str(port)]
        rows[name] = measure(cmd, port, folder, args.idle_s, args.jobs)
        print(f"{name:9s} start-up {rows[name].start_s:6.1f} s   idle CPU {rows[name].idle_cpu_pct:5.1f} % of a core   "
              f"{args.jobs} jobs {rows[name].jobs_s:6.1f} s", flush=True)  # fmt: skip
    t, r = rows["torchrun"], rows["ray"]
    print(f"ray / torchrun: start-up x{r.start_s / t.start_s:.2f}, idle CPU x{r.idle_cpu_pct / max(t.idle_cpu_pct, 0.1):.2f}, "
          f"{args.jobs} jobs x{r.jobs_s / t.jobs_s:.2f}")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)  # weights and videos; the figures are printed
    return 0


if __name__ == "__main__":
    sys.exit(main())
