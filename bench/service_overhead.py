"""What the service adds around a render: the same tiny job through REST and through the in-process pipeline.

REST: ``distributed_app.py --preset tiny`` as a subprocess; per job, the wall time from POST
/api/generate to the first poll of /api/status that says ``done`` (multipart upload, validation,
store, engine hand-off, per-step progress writes to SQLite, polling), beside the engine's own
``total_time`` for the job. In-process: ``Runtime.render`` (the same clip driver and engine, one process,
no web server, no store) with the model and ``Renderer`` loaded by ``Runtime.start`` (what the service does
at start-up), on exactly the job the service rendered (its stored JobSpec and inputs, the settings from
its ``render.json``).

The first job of each side is cold (Kokoro loads on first use, caches fill); later jobs are warm.
Prints wall times and the overhead ratio REST / in-process per job; no assertions. Timings on a
shared 2-core CPU are noisy: compare within one run.

    python bench/service_overhead.py [--jobs 2] [--weights DIR] [--poll 0.1] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCRIPT = "(s1) Hello there. (s2) Hi, how are you?"


def _portrait(
    path: Path, body: tuple[int, int, int], bg: tuple[int, int, int], w: int = 300, h: int = 400
) -> None:
    """A synthetic head-and-shoulders portrait PNG."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[:h, :w]
    a = np.empty((h, w, 3), np.uint8)
    a[:] = bg
    a[(np.abs(xx - w / 2) < 0.3 * h) & (yy > 0.5 * h)] = body
    a[(yy - 0.3 * h) ** 2 + (xx - w / 2) ** 2 < (0.15 * h) ** 2] = (240, 200, 170)
    Image.fromarray(a).save(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               OMP_NUM_THREADS=str(threads))  # fmt: skip
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DIALOGUE_API_TOKEN"):
        env.pop(key, None)
    return env


def run_rest(args: argparse.Namespace, weights: Path, work: Path, portraits: tuple[Path, Path]) -> dict:
    """Start the service, submit ``args.jobs`` jobs one after another, stop it. Returns timings and the
    first job's id (its spec and inputs stay in ``work/outputs``)."""
    import requests

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(ROOT / "distributed_app.py"), "--preset", "tiny", "--weights", str(weights),
           "--outputs_dir", str(work / "outputs"), "--server_port", str(port), "--no_ui"]  # fmt: skip
    log = (work / "service.log").open("wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(args.threads), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    out: dict = {"jobs": []}
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the service did not start; see {work / 'service.log'}")
            try:
                if requests.get(base + "/api/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        out["startup_s"] = time.perf_counter() - t0
        images = [p.read_bytes() for p in portraits]
        for _ in range(args.jobs):
            files = {
                "left_image": ("l.png", images[0], "image/png"),
                "right_image": ("r.png", images[1], "image/png"),
            }
            t0 = time.perf_counter()
            r = requests.post(base + "/api/generate", data={"script": SCRIPT, "preset": "fast"}, files=files,
                              timeout=60)  # fmt: skip
            r.raise_for_status()
            task_id = r.json()["task_id"]
            t_submit = time.perf_counter() - t0
            while True:
                body = requests.get(f"{base}/api/status/{task_id}", timeout=30).json()
                if body["status"] == "done":
                    break
                if body["status"] in ("failed", "cancelled") or time.monotonic() > deadline + 600:
                    raise SystemExit(f"job {task_id}: {body['status']} {body['error']}")
                time.sleep(args.poll)
            wall = time.perf_counter() - t0
            out["jobs"].append({"id": task_id, "wall_s": wall, "submit_s": t_submit,
                                "engine_total_s": body["timing"]["total_time"], "timing": body["timing"]})  # fmt: skip
        out["first_id"] = out["jobs"][0]["id"]
        out["spec"] = requests.get(f"{base}/api/status/{out['first_id']}", timeout=30).json()["spec"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    return out


class _Timings:
    """A ``JobSink`` that keeps the stage timings of one in-process job."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def progress(self, job_id: str, percent: float, stage: str) -> None:
        pass

    def timing(self, job_id: str, name: str, seconds: float) -> None:
        self.times[name] = seconds

    def state(self, job_id: str, state: str) -> None:
        pass

    def cancel_requested(self, job_id: str) -> bool:
        return False

    def done(self, job_id: str, outputs: list[str]) -> None:
        pass

    def failed(self, job_id: str, reason: str, *, cancelled: bool = False, interrupted: bool = False) -> None:
        raise SystemExit(f"in-process job failed: {reason}")


def run_in_process(args: argparse.Namespace, weights: Path, work: Path, rest: dict) -> dict:
    """The service's first job again, through ``Runtime.render`` in this process."""
    # Imported here, after main() set OMP_NUM_THREADS for the wanted thread count: torch reads it when it
    # loads, and the project's render modules load torch.
    import torch

    from inference.render.settings import GenerationSettings
    from inference.render.spec import JobSpec
    from inference.render.worker import RenderJob, Runtime, RuntimeOptions

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    job_dir = work / "outputs" / rest["first_id"]
    settings = json.loads((job_dir / "render.json").read_text())["settings"]  # what the engine used
    spec, settings = JobSpec.from_json(rest["spec"]), GenerationSettings.from_dict(settings)
    t0 = time.perf_counter()
    runtime = Runtime.start(RuntimeOptions(preset="tiny", weights=weights))
    out: dict = {"startup_s": time.perf_counter() - t0, "jobs": []}
    try:
        for i in range(args.jobs):
            sink = _Timings()
            t0 = time.perf_counter()
            runtime.render(
                RenderJob(f"inproc{i}", spec, settings, job_dir / "inputs", work / f"inproc{i}"), sink
            )
            out["jobs"].append({"wall_s": time.perf_counter() - t0, "timing": sink.times})
    finally:
        runtime.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="jobs per side, one after another (first is cold)")
    p.add_argument(
        "--weights", type=Path, default=None, help="tiny weights root (default: made in a temp dir)"
    )
    p.add_argument("--poll", type=float, default=0.1, help="seconds between status polls")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads on each side")
    args = p.parse_args()
    os.environ.update(_env(args.threads))
    # After the environment above: torch (which this loads) reads OMP_NUM_THREADS when it is imported.
    from inference.checkpoint.weights import make_tiny

    work = Path(tempfile.mkdtemp(prefix="service_overhead_"))
    try:
        weights = args.weights or work / "weights"
        make_tiny(weights)  # not timed; a no-op when the root is complete
        portraits = (work / "left.png", work / "right.png")
        _portrait(portraits[0], (30, 60, 120), (200, 200, 150))
        _portrait(portraits[1], (120, 40, 40), (150, 190, 210))

        rest = run_rest(args, weights, work, portraits)
        local = run_in_process(args, weights, work, rest)

        load = os.getloadavg()
        print(f"service overhead, tiny preset, script {SCRIPT!r}, preset fast, {args.threads} thread(s), "
              f"{os.cpu_count()} cpus, load {load[0]:.2f}, poll {args.poll}s")  # fmt: skip
        print(f"start-up to ready: REST service {rest['startup_s']:.2f}s (healthy /api/health), "
              f"in-process Runtime.start {local['startup_s']:.2f}s")  # fmt: skip
        print(f"{'job':>4} {'REST wall':>10} {'engine':>8} {'submit':>8} {'in-proc':>8} {'ratio':>6}  note")
        for i, (r, loc) in enumerate(zip(rest["jobs"], local["jobs"], strict=True)):
            ratio = r["wall_s"] / loc["wall_s"]
            note = "cold (Kokoro loads on first use)" if i == 0 else "warm"
            print(f"{i + 1:>4} {r['wall_s']:>9.2f}s {r['engine_total_s']:>7.2f}s {r['submit_s']:>7.2f}s "
                  f"{loc['wall_s']:>7.2f}s {ratio:>6.3f}  {note}")  # fmt: skip
        for i, (r, loc) in enumerate(zip(rest["jobs"], local["jobs"], strict=True)):
            keys = sorted(set(r["timing"]) | set(loc["timing"]))
            parts = ", ".join(f"{k} {r['timing'].get(k, float('nan')):.2f}/{loc['timing'].get(k, float('nan')):.2f}"
                              for k in keys)  # fmt: skip
            print(f"job {i + 1} stage seconds (REST engine / in-process): {parts}")
        total_rest = sum(r["wall_s"] for r in rest["jobs"])
        total_local = sum(loc["wall_s"] for loc in local["jobs"])
        print(f"overhead ratio over {args.jobs} job(s): {total_rest / total_local:.3f} "
              f"(REST {total_rest:.2f}s / in-process {total_local:.2f}s)")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
