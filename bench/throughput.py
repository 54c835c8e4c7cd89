"""Jobs per hour of a queue of short tiny jobs on CPU: replica groups and the producer stage.

Each configuration starts ``distributed_app.py --preset tiny`` (under torchrun for two processes), waits
until it is healthy, submits the same queue of short jobs at once through the Python client, and times
from the first submission to the last job done (start-up excluded):

- ``1 group x 2 ranks``: ``torchrun --nproc-per-node=2`` (Ulysses 2 over both processes, one job at a time)
- ``2 groups x 1 rank``: ``torchrun --nproc-per-node=2 --replicas 2`` (two jobs at a time)
- ``prepare on group``: one process, its leader prepares each job between denoising
- ``prepare on producer``: one process plus ``--prepare_on producer --producer_device cpu`` (the next job
  is prepared while the current one denoises)

It prints jobs per hour of wall time and, because the machine may be shared, jobs per CPU-hour (the user +
system time of every process of the service during the queue, read from ``/proc``), then the two
ratios: 2 groups / 1 group and producer / no producer (goals on 2 cores: >= 1.6 and >= 1.3). The CPU-time
figure says how much work a job costs; only the wall-clock ratio shows overlap, so read both, and the
load average printed with them. Linux only (``/proc``). No assertions.

``--ray``: the same queue on ``python -m service.cluster`` (a local Ray instance of 2 CPUs, 2 groups of 1
actor) beside ``2 groups x 1 rank`` under torchrun, with each one's start-up (until every group serves)
and idle overhead (CPU of the whole process tree over ``--idle_s`` seconds with nothing queued).

    python bench/throughput.py [--jobs 10] [--weights DIR] [--frame_num 33] [--steps 4] [--only NAME ...] [--ray]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.client import DialogueClient  # noqa: E402  (after the path insert)

SCRIPTS = (
    "(s1) Hello there. (s2) Hi!",
    "(s1) Good morning. (s2) Morning to you.",
    "(s1) Ready? (s2) Yes, go.",
)
CONFIGS = {
    "1 group x 2 ranks": (2, ()),
    "2 groups x 1 rank": (2, ("--replicas", "2")),
    "prepare on group": (1, ()),
    "prepare on producer": (1, ("--prepare_on", "producer", "--producer_device", "cpu")),
}
RAY = "2 Ray groups x 1 actor"  # --ray: python -m service.cluster, beside "2 groups x 1 rank"
RAY_FLAGS = ("--replicas", "2", "--group_size", "1", "--ray_cpus", "2")


def _portrait(body: tuple[int, int, int], bg: tuple[int, int, int], w: int = 300, h: int = 400) -> str:
    yy, xx = np.mgrid[:h, :w]
    a = np.empty((h, w, 3), np.uint8)
    a[:] = bg
    a[(np.abs(xx - w / 2) < 0.3 * h) & (yy > 0.5 * h)] = body
    a[(yy - 0.3 * h) ** 2 + (xx - w / 2) ** 2 < (0.15 * h) ** 2] = (240, 200, 170)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> list[int]:
    """``pid`` and its living descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(text[text.rfind(")") + 2 :].split()[1])
    found, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                found.add(child)
                frontier.append(child)
    return sorted(found)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system seconds of these processes (their own threads, not reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


@dataclass
class Result:
    name: str
    jobs: int
    wall_s: float
    cpu_s: float
    load: float
    start_s: float = 0.0  # launch until every group serves
    idle_pct: float = 0.0  # CPU of the process tree while idle, in % of one core (--ray)

    @property
    def per_hour(self) -> float:
        return 3600.0 * self.jobs / self.wall_s

    @property
    def per_cpu_hour(self) -> float:
        return 3600.0 * self.jobs / self.cpu_s if self.cpu_s > 0 else float("nan")


def run_config(name: str, ranks: int, flags: tuple[str, ...], args: argparse.Namespace, work: Path) -> Result:
    port = _free_port()
    out = work / name.replace(" ", "_")
    app = ["distributed_app.py", "--preset", "tiny", "--no_ui", "--server_port", str(port), "--outputs_dir",
           str(out), *(["--weights", str(args.weights)] if args.weights else []), *flags]  # fmt: skip
    if name == RAY:
        cmd = [sys.executable, "-m", "service.cluster", *app[1:]]
    elif ranks > 1:
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            f"--nproc-per-node={ranks}",
            *app,
        ]
    else:
        cmd = [sys.executable, *app]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        env.pop("OMP_NUM_THREADS")  # one process: the threads torch picks (the producer thread gets its own)
    log = (work / f"{out.name}.log").open("wb")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    client = DialogueClient(f"http://127.0.0.1:{port}", timeout_s=60)
    launched = time.monotonic()
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: the service exited ({proc.returncode}); see {log.name}")
            try:
                groups = client.queue().get("groups") or []
                if client.health().get("success") and all(g["state"] in ("idle", "busy") for g in groups):
                    break  # every group serves, not only the first
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: not healthy after 600 s; see {log.name}")
            time.sleep(0.5)
        start_s = time.monotonic() - launched
        idle_pct = 0.0
        if args.ray:  # idle overhead: heartbeats, the Ray head's polls, Ray's daemons
            time.sleep(3.0)
            pids = _tree(proc.pid)
            c0, w0 = _cpu_seconds(pids), time.monotonic()
            time.sleep(args.idle_s)
            idle_pct = 100.0 * (_cpu_seconds(pids) - c0) / (time.monotonic() - w0)
        left, right = _portrait((30, 60, 120), (200, 200, 150)), _portrait((120, 40, 40), (150, 190, 210))
        settings = {"mode": "clip", "frame_num": args.frame_num, "steps": args.steps}
        pids = _tree(proc.pid)
        cpu0, t0, load0 = _cpu_seconds(pids), time.monotonic(), os.getloadavg()[0]
        ids = [client.submit({"left_image": left, "right_image": right, "script": SCRIPTS[i % len(SCRIPTS)],
                              "preset": "fast", "settings": {**settings, "seed": i}})
               for i in range(args.jobs)]  # fmt: skip
        for job_id in ids:
            client.wait(job_id, timeout_s=1800, poll_s=0.2)
        wall = time.monotonic() - t0
        cpu = _cpu_seconds(pids) - cpu0
        load = (load0 + os.getloadavg()[0]) / 2
        return Result(name, args.jobs, wall, cpu, load, start_s, idle_pct)
    finally:
        try:
            if name == RAY:  # the head stops its groups and Ray itself; its group holds Ray's daemons too
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            for pid in _tree(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=10)
    p.add_argument("--weights", type=Path, default=None, help="tiny weights root (default weights/tiny)")
    p.add_argument("--frame_num", type=int, default=33, help="frames of each job's one clip (4n+1)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--only", nargs="*", choices=(*CONFIGS, RAY), default=None)
    p.add_argument("--ray", action="store_true", help=f"run '{RAY}' beside '2 groups x 1 rank' (torchrun) with "
                   "start-up and idle overhead")  # fmt: skip
    p.add_argument("--idle_s", type=float, default=20.0, help="idle window of --ray")
    args = p.parse_args()
    configs = {**CONFIGS, RAY: (2, RAY_FLAGS)}
    selected = args.only or (["2 groups x 1 rank", RAY] if args.ray else list(CONFIGS))
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        for name, (ranks, flags) in configs.items():
            if name not in selected:
                continue
            r = run_config(name, ranks, flags, args, Path(tmp))
            results[name] = r
            print(f"{name:22s} {r.jobs} jobs in {r.wall_s:7.1f} s wall, {r.cpu_s:7.1f} s CPU: "
                  f"{r.per_hour:7.1f} jobs/h, {r.per_cpu_hour:7.1f} jobs/CPU-h (load {r.load:.1f})", flush=True)  # fmt: skip
    print(
        f"cores: {os.cpu_count()}; jobs: clip mode, {args.frame_num} frames, {args.steps} steps, tiny preset"
    )
    for top, base, goal in (("2 groups x 1 rank", "1 group x 2 ranks", 1.6),
                            ("prepare on producer", "prepare on group", 1.3)):  # fmt: skip
        if top in results and base in results:
            a, b = results[top], results[base]
            print(f"ratio {top} / {base}: wall {a.per_hour / b.per_hour:.2f} (goal >= {goal}), "
                  f"CPU-time {a.per_cpu_hour / b.per_cpu_hour:.2f}")  # fmt: skip
    if RAY in results and "2 groups x 1 rank" in results:
        a, b = results[RAY], results["2 groups x 1 rank"]
        for r in (b, a):
            print(f"{r.name:22s} start-up {r.start_s:6.1f} s, idle CPU {r.idle_pct:5.1f} % of a core, "
                  f"{r.per_hour:7.1f} jobs/h")  # fmt: skip
        print(f"ratio Ray / torchrun (2 groups x 1): start-up {a.start_s / b.start_s:.2f}, idle CPU "
              f"{a.idle_pct / max(b.idle_pct, 0.1):.2f}, jobs/h {a.per_hour / b.per_hour:.2f}")  # fmt: skip
    print(
        json.dumps(
            {k: {"wall_s": round(v.wall_s, 2), "cpu_s": round(v.cpu_s, 2)} for k, v in results.items()}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
