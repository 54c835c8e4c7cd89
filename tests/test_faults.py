"""Fault drills: a stopped rank is detected within a bounded time (idle and mid-job) and its peer
exits so the group restarts; the watchdog itself fires once per missed deadline and never early."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from inference.parallel.context import ParallelContext
from inference.parallel.engine import Engine, JobContext, Message, Op, TensorSpec
from inference.parallel.watchdog import EXIT_HUNG, Watchdog
from tests.dist_harness import post, start_spmd


class StepWorker:
    """Job dicts: id, steps, sleep_s (per step), post_at (rank 0 posts "ready" then), last."""

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx
        self.engine: Engine | None = None
        self.finished: list[str] = []

    def preflight(self, msg: Message) -> str | None:
        return None

    def run(self, msg: Message, tensors: dict[str, torch.Tensor], job: JobContext) -> dict[str, torch.Tensor]:
        x = tensors["x"].clone()
        for step in range(msg.settings["steps"]):
            if msg.settings.get("post_at") == step and self.ctx.rank == 0:
                post("ready")
            if job.step_boundary(x):
                break
            dist.all_reduce(x, group=self.ctx.data)
            time.sleep(msg.settings.get("sleep_s", 0.0))
        return {"x": x}

    def prepare(self, job: dict[str, Any]) -> tuple[Message, dict[str, torch.Tensor]]:
        t = {"x": torch.ones(4)}
        settings = {k: v for k, v in job.items() if k != "last"}
        return Message(Op.DENOISE, job["id"], settings, (TensorSpec.of("x", t["x"]),)), t

    def finish(self, job: dict[str, Any], result: dict[str, torch.Tensor] | None) -> None:
        self.finished.append(job["id"])
        if job.get("last") and self.engine is not None:
            self.engine.request_shutdown()

    def reject(self, job: dict[str, Any], reason: str) -> None:
        pass


def _serve(ctx: ParallelContext, jobs: list[dict], stall_s: float, reply_s: float) -> list[str]:
    worker = StepWorker(ctx)
    q: queue.Queue = queue.Queue()
    for job in jobs:
        q.put(job)
    engine = Engine(worker, ctx, q, heartbeat_s=0.5, stall_s=stall_s, reply_s=reply_s)
    worker.engine = engine
    engine.serve()
    return worker.finished


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_slow_steps_within_the_stall_limit_finish() -> None:
    # Negative control for the drills below: 12 steps of 0.4 s (5 s in all) under a 1.5 s stall limit.
    job = [{"id": "slow", "steps": 12, "sleep_s": 0.4, "last": True}]
    outcomes = start_spmd(_serve, 2, job, 1.5, 2.0).join(40)
    for o in outcomes:
        assert o.exitcode == 0 and o.error is None, (o.rank, o.exitcode, o.error)
    assert outcomes[0].value == ["slow"]


@pytest.mark.distributed
@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["mid-job", "idle"])
def test_stopped_rank_is_detected_and_its_peer_exits(when: str) -> None:
    if when == "mid-job":
        job = [{"id": "long", "steps": 400, "sleep_s": 0.05, "post_at": 3}]
    else:
        job = [{"id": "warm", "steps": 3, "post_at": 1}]
    # The data group's own timeout is 30 s: only the watchdog can end this within the bound.
    run = start_spmd(_serve, 2, job, 1.5, 2.0)
    run.wait_for("ready", rank=0, timeout_s=30)
    if when == "idle":
        time.sleep(1.0)  # the job is done; both ranks wait on the control group
    os.kill(run.procs[1].pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        while run.procs[0].is_alive() and time.monotonic() - stopped_at < 25:
            time.sleep(0.1)
        noticed_after = time.monotonic() - stopped_at
    finally:
        os.kill(run.procs[1].pid, signal.SIGCONT)
    outcomes = run.join(10)
    assert outcomes[0].exitcode == EXIT_HUNG, (outcomes[0].exitcode, outcomes[0].error)
    # mid-job: twice stall_s before a first model pass is known; idle: one heartbeat plus reply_s.
    assert noticed_after < (3.0 if when == "mid-job" else 2.5) + 4.0


def test_watchdog_fires_once_per_missed_deadline_and_beats_postpone_it() -> None:
    fired: list[str] = []
    done = threading.Event()

    def on_expire(message: str) -> None:
        fired.append(message)
        done.set()

    dog = Watchdog(3, on_expire=on_expire)
    with dog.guard("quick exchange", 0.3):
        time.sleep(0.05)
    dog.arm("job 'x'", 0.3)
    for _ in range(6):  # 0.6 s of beats every 0.1 s: no expiry
        time.sleep(0.1)
        dog.beat()
    assert not fired
    assert done.wait(2.0)
    time.sleep(0.4)
    assert len(fired) == 1 and fired[0].startswith("rank 3: job 'x' made no progress for 0.3 s")
    assert f"code {EXIT_HUNG}" in fired[0]
    dog.disarm()
