"""The SPMD control plane on spawned gloo ranks: message + tensor broadcast, pre-flight agreement,
heartbeats, dead ranks, cancellation, shutdown by message and by SIGTERM, consistency check.

``RecordingWorker`` is a test double for the DiT sampling loop: it does real data collectives
(an all-reduce per step) and records what ran where. The real worker is the pipeline's.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from inference.parallel.context import ParallelContext
from inference.parallel.engine import Engine, JobContext, Message, Op, TensorSpec
from tests.dist_harness import post, start_spmd


def make_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(2, 3, 4, generator=g),
        "context": torch.randn(5, 8, generator=g).to(torch.bfloat16),
        "audio": torch.randn(3, 7, generator=g).to(torch.float16),
        "ids": torch.randint(0, 1000, (6,), generator=g),
        "mask": torch.rand(4, 4, generator=g) > 0.5,
        "scalar": torch.tensor(float(seed)),
    }


class RecordingWorker:
    """Job dicts: id, seed, steps, and optional refuse_rank, cancel_at, diverge_at, sleep_s,
    post_at (rank 0 posts "ready" at that step), follow_up (a job dict), last (shut down after)."""

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx
        self.engine: Engine | None = None
        self.ran: list[str] = []
        self.stopped_at: dict[str, int] = {}
        self.roundtrip: dict[str, bool] = {}
        self.finished: dict[str, list[float]] = {}
        self.rejected: dict[str, str] = {}

    # every rank
    def preflight(self, msg: Message) -> str | None:
        if msg.settings.get("refuse_rank") == self.ctx.rank:
            return f"not enough free memory on rank {self.ctx.rank}"
        return None

    def run(self, msg: Message, tensors: dict[str, torch.Tensor], job: JobContext) -> dict[str, torch.Tensor]:
        s, rank = msg.settings, self.ctx.rank
        self.ran.append(msg.job_id)
        expected = make_tensors(s["seed"])
        self.roundtrip[msg.job_id] = set(expected) == set(tensors) and all(
            torch.equal(tensors[n], t) and tensors[n].dtype == t.dtype for n, t in expected.items()
        )
        latents = tensors["latents"].clone()
        for step in range(s["steps"]):
            if s.get("cancel_at") == step and rank == 0:
                assert self.engine is not None
                self.engine.cancel(msg.job_id)
            if s.get("post_at") == step and rank == 0:
                post("ready")
            if s.get("diverge_at") == step and rank == 1:
                latents = latents + 1e-3
            if job.step_boundary(latents):
                break
            total = latents.clone()
            if self.ctx.distributed:
                dist.all_reduce(total, group=self.ctx.data)
            latents = total / self.ctx.world_size * 0.5 + 1.0
            time.sleep(s.get("sleep_s", 0.0))
        self.stopped_at[msg.job_id] = job.step
        return {"latents": latents}

    # rank 0
    def prepare(self, job: dict[str, Any]) -> tuple[Message, dict[str, torch.Tensor]]:
        if job.get("invalid"):
            raise ValueError("steps: must be positive")
        tensors = make_tensors(job["seed"])
        if job.get("wrong_spec"):
            tensors["latents"] = tensors["latents"].double()
            specs = tuple(TensorSpec.of(n, t) for n, t in make_tensors(job["seed"]).items())
        else:
            specs = tuple(TensorSpec.of(n, t) for n, t in tensors.items())
        settings = {k: v for k, v in job.items() if k not in ("id", "follow_up", "last")}
        return Message(Op.DENOISE, job["id"], settings, specs), tensors

    def finish(self, job: dict[str, Any], result: dict[str, torch.Tensor] | None) -> Any:
        assert result is not None
        self.finished[job["id"]] = result["latents"].flatten()[:3].tolist()
        if job.get("last"):
            assert self.engine is not None
            self.engine.request_shutdown()
        return job.get("follow_up")

    def reject(self, job: dict[str, Any], reason: str) -> None:
        self.rejected[job["id"]] = reason


def _serve(
    ctx: ParallelContext, jobs: list[dict], heartbeat_s: float, check: bool, delay_s: float = 0.0
) -> dict:
    """Every rank: serve; rank 0's queue gets ``jobs`` (after ``delay_s`` of idling)."""
    worker = RecordingWorker(ctx)
    q: queue.Queue = queue.Queue()
    engine = Engine(worker, ctx, q, heartbeat_s=heartbeat_s, check_consistency=check)
    worker.engine = engine
    if ctx.is_rank0:
        feed = lambda: [q.put(j) for j in jobs]  # noqa: E731
        threading.Timer(delay_s, feed).start() if delay_s else feed()
    t0 = time.monotonic()
    engine.serve()
    return {
        "ran": worker.ran,
        "stopped_at": worker.stopped_at,
        "roundtrip": worker.roundtrip,
        "finished": worker.finished,
        "rejected": worker.rejected,
        "elapsed": time.monotonic() - t0,
        "pid": os.getpid(),
    }


def _check_clean(outcomes: list) -> list[dict]:
    for o in outcomes:
        assert not o.hung and o.exitcode == 0 and o.error is None, (o.rank, o.exitcode, o.error)
    return [o.value for o in outcomes]


MAIN_JOBS: list[dict] = [
    {"id": "a", "seed": 1, "steps": 3},
    {"id": "bad", "seed": 2, "steps": 1, "invalid": True},  # rejected while preparing
    {"id": "spec", "seed": 2, "steps": 1, "wrong_spec": True},  # message/tensor mismatch
    {"id": "b", "seed": 3, "steps": 2, "refuse_rank": 1},  # pre-flight refusal on rank 1 only
    {"id": "c", "seed": 4, "steps": 2, "follow_up": {"id": "c2", "seed": 5, "steps": 1}},
    {"id": "d", "seed": 6, "steps": 10, "cancel_at": 3},  # cancelled by rank 0 during step 3
    {"id": "e", "seed": 7, "steps": 2, "last": True},  # finish() requests shutdown
]


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_engine_jobs_refusal_cancel_and_shutdown() -> None:
    t0 = time.monotonic()
    values = _check_clean(start_spmd(_serve, 3, MAIN_JOBS, 0.5, True).join(60))
    r0 = values[0]
    assert set(r0["finished"]) == {"a", "c", "c2", "e"}
    assert r0["rejected"]["bad"] == "ValueError: steps: must be positive"
    assert "do not match" in r0["rejected"]["spec"] or "spec says" in r0["rejected"]["spec"]
    assert r0["rejected"]["b"] == "rank 1: not enough free memory on rank 1"
    assert r0["rejected"]["d"].startswith("cancelled at step 4")
    for v in values:
        # Every rank ran the same jobs in the same order; nothing refused or invalid was started.
        assert v["ran"] == ["a", "c", "c2", "d", "e"]
        assert all(v["roundtrip"].values())
        assert v["stopped_at"]["d"] == 4  # the same step boundary on every rank
        assert v["stopped_at"]["a"] == 3
    assert time.monotonic() - t0 < 60


def test_engine_single_process_same_loop() -> None:
    ctx = ParallelContext.single("cpu")
    jobs = [dict(j) for j in MAIN_JOBS if "refuse_rank" not in j]
    out = _serve_inprocess(ctx, jobs)
    assert set(out["finished"]) == {"a", "c", "c2", "e"}
    assert set(out["rejected"]) == {"bad", "spec", "d"}
    assert out["stopped_at"]["d"] == 4


def _serve_inprocess(ctx: ParallelContext, jobs: list[dict]) -> dict:
    worker = RecordingWorker(ctx)
    q: queue.Queue = queue.Queue()
    for j in jobs:
        q.put(j)
    engine = Engine(worker, ctx, q, heartbeat_s=0.2)
    worker.engine = engine
    engine.serve(install_signal_handlers=False)
    return {"finished": worker.finished, "rejected": worker.rejected, "stopped_at": worker.stopped_at}


IDLE_JOB = [{"id": "late", "seed": 9, "steps": 2, "last": True}]


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_idle_longer_than_data_timeout_survives() -> None:
    # Data timeout 2 s, control timeout 2.5 s, 4 s idle: heartbeats every 0.5 s keep the control
    # wait short, and the data group is only used once the job arrives.
    run = start_spmd(_serve, 2, IDLE_JOB, 0.5, False, 4.0, data_timeout_s=2.0, control_timeout_s=2.5)
    values = _check_clean(run.join(40))
    for v in values:
        assert v["ran"] == ["late"] and v["elapsed"] >= 4.0
    assert list(values[0]["finished"]) == ["late"]


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_idle_without_heartbeat_times_out() -> None:
    # Negative control for the test above: same timeouts, but no heartbeat within the idle time.
    run = start_spmd(_serve, 2, IDLE_JOB, 30.0, False, 4.0, data_timeout_s=2.0, control_timeout_s=2.5)
    outcomes = run.join(40)
    assert all(not o.hung and o.exitcode != 0 for o in outcomes), [(o.exitcode, o.error) for o in outcomes]
    assert "EngineFatalError" in outcomes[1].error and "control broadcast failed" in outcomes[1].error


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_killed_worker_ends_rank0_at_next_heartbeat() -> None:
    job = [{"id": "warm", "seed": 1, "steps": 3, "post_at": 2}]
    run = start_spmd(_serve, 2, job, 1.0, False)
    run.wait_for("ready", rank=0, timeout_s=30)
    time.sleep(0.5)  # let the job finish; both ranks are idle on the control group now
    os.kill(run.procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    outcomes = run.join(20)
    noticed_after = time.monotonic() - killed_at
    r0 = outcomes[0]
    assert not r0.hung and r0.exitcode not in (0, None), (r0.exitcode, r0.error)
    assert "EngineFatalError" in r0.error
    assert "control broadcast failed" in r0.error or "heartbeat failed" in r0.error
    assert noticed_after < 1.0 + 5.0  # one heartbeat plus process exit


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_sigterm_on_a_worker_while_idle_shuts_every_rank_down() -> None:
    job = [{"id": "warm", "seed": 1, "steps": 2, "post_at": 1}]
    run = start_spmd(_serve, 2, job, 0.5, False)
    run.wait_for("ready", rank=0, timeout_s=30)
    time.sleep(0.5)  # idle on the control group
    os.kill(run.procs[1].pid, signal.SIGTERM)
    values = _check_clean(run.join(30))
    assert all(v["ran"] == ["warm"] for v in values)


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_sigterm_on_rank0_cancels_running_job_and_shuts_down_cleanly() -> None:
    job = [{"id": "long", "seed": 1, "steps": 200, "sleep_s": 0.05, "post_at": 2}]
    run = start_spmd(_serve, 2, job, 0.5, False)
    run.wait_for("ready", rank=0, timeout_s=30)
    os.kill(run.procs[0].pid, signal.SIGTERM)
    values = _check_clean(run.join(30))
    assert values[0]["rejected"]["long"].endswith("(shutdown)")
    steps = {v["stopped_at"]["long"] for v in values}
    assert len(steps) == 1 and 3 <= steps.pop() < 200  # same step everywhere, long before the end


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_latent_divergence_is_fatal_on_every_rank() -> None:
    job = [{"id": "div", "seed": 1, "steps": 4, "diverge_at": 1}]
    outcomes = start_spmd(_serve, 2, job, 0.5, True).join(30)
    for o in outcomes:
        assert not o.hung and o.exitcode not in (0, None), (o.rank, o.exitcode)
        assert "RankDivergenceError" in o.error and "latents differ across ranks" in o.error


TORCHRUN_SCRIPT = """
import os, queue, sys
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from inference.parallel.engine import Engine, Message, Op, TensorSpec
from inference.parallel.context import ParallelContext

ATTEMPT = int(os.environ["TORCHELASTIC_RESTART_COUNT"])


class Worker:
    def preflight(self, msg):
        return None

    def run(self, msg, tensors, job):
        x = tensors["x"].clone()
        for _ in range(3):
            if job.step_boundary(x):
                break
            if ATTEMPT == 0 and job.parallel.rank == 1:
                raise RuntimeError("injected failure on the first attempt")
            torch.distributed.all_reduce(x, group=job.parallel.data)
        return {"x": x}

    def prepare(self, job):
        t = {"x": torch.ones(3)}
        return Message(Op.DENOISE, job, {}, (TensorSpec.of("x", t["x"]),)), t

    def finish(self, job, result):
        with open(sys.argv[1], "a") as f:
            f.write(f"attempt {ATTEMPT}: {result['x'].tolist()}\\n")
        ENGINE.request_shutdown()

    def reject(self, job, reason):
        pass


@record
def main():
    global ENGINE
    ctx = ParallelContext.from_env(device="cpu", data_timeout=20, control_timeout=40)
    jobs = queue.Queue()
    jobs.put("job")
    ENGINE = Engine(Worker(), ctx, jobs, heartbeat_s=1.0)
    ENGINE.serve()
    ctx.destroy()


main()
"""


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_crash_in_collective_region_restarts_all_ranks_under_torchrun(tmp_path) -> None:
    # Crash-only end to end: rank 1 raises inside the job, every rank exits non-zero, torchrun
    # (--max-restarts=1) restarts both, and the second attempt serves the job and shuts down cleanly.
    script, results = tmp_path / "serve.py", tmp_path / "results.txt"
    script.write_text(TORCHRUN_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--max-restarts=1",
        "--standalone",  # the agent picks a free port itself
        str(script),
        str(results),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EngineFatalError: rank 1: job 'job' failed: RuntimeError: injected failure" in proc.stderr
    assert results.read_text() == "attempt 1: [8.0, 8.0, 8.0]\n"
