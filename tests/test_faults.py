"""Fault drills: a stopped rank is detected within a bounded time (idle and mid-job) and its peer
exits so the group restarts; the watchdog itself fires once per missed deadline and never early; a
damaged spilled clip is found by its checksum and rendered again, never muxed; a full disk never kills
the engine nor wedges a job; start-up store problems say so in one line; clean shutdowns do not use up
a job's attempts (SIGTERM twice mid-render, then done)."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from inference.parallel.context import ParallelContext
from inference.parallel.engine import Engine, JobContext, Message, Op, TensorSpec
from inference.parallel.watchdog import EXIT_HUNG, Watchdog
from inference.render.pipeline import FRAMES_FILE, FRAMES_SPILL_DIR
from service.jobs import JobState, JobStore, JobStoreError
from service.runner import EngineMonitor, StoreJobSource, StoreSink
from tests import test_resume
from tests.dist_harness import post, start_spmd
from tests.test_resume import _interrupt, _job, _StopInClip

# The tiny runtime and an accepted job, shared with the resume tests.
runtime = test_resume.runtime
accepted = test_resume.accepted


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
@pytest.mark.timeout(150)
def test_slow_steps_within_the_stall_limit_finish() -> None:
    # Negative control for the drills below: 12 steps of 0.4 s (5 s in all) under a 1.5 s stall limit.
    job = [{"id": "slow", "steps": 12, "sleep_s": 0.4, "last": True}]
    outcomes = start_spmd(_serve, 2, job, 1.5, 2.0).join(90)
    for o in outcomes:
        assert o.exitcode == 0 and o.error is None, (o.rank, o.exitcode, o.error)
    assert outcomes[0].value == ["slow"]


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize("when", ["mid-job", "idle"])
def test_stopped_rank_is_detected_and_its_peer_exits(when: str) -> None:
    if when == "mid-job":
        job = [{"id": "long", "steps": 400, "sleep_s": 0.05, "post_at": 3}]
    else:
        job = [{"id": "warm", "steps": 3, "post_at": 1}]
    # The data group's own timeout is 30 s: only the watchdog can end this within the bound.
    run = start_spmd(_serve, 2, job, 1.5, 2.0)
    run.wait_for("ready", rank=0, timeout_s=90)  # spawning two torch processes on a busy machine
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
    # (plus slack for a loaded machine; the data group's own timeout would take 30 s here, 300 s in service)
    assert noticed_after < (3.0 if when == "mid-job" else 2.5) + 12.0


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


# ---------------------------------------------------------------------------------------------- spilled clips
# The tiny weights through the real clip driver (fixtures from tests/test_resume.py); a damaged clip file
# is never muxed: it is found by its checksum and rendered again from its seed.


class _DamageBeforeMux(_StopInClip):
    """Completes the job, but truncates its last clip on disk when the muxing starts (once)."""

    def __init__(self, spill: Path) -> None:
        super().__init__(steps=1, clip=10_000)
        self.spill, self.done_outputs, self.damaged = spill, None, False

    def progress(self, job_id: str, percent: float, stage: str) -> None:
        if stage == "encoding the video" and not self.damaged:
            path = sorted(self.spill.glob("clip_*.npy"))[-1]
            path.write_bytes(path.read_bytes()[:-4096])
            self.name = path.name
            self.damaged = True

    def done(self, job_id: str, outputs: list[str]) -> None:
        self.done_outputs = outputs


@pytest.mark.slow
def test_damaged_spill_is_rendered_again_at_resume_and_at_the_mux(runtime, accepted, tmp_path, caplog):
    whole = tmp_path / "whole"
    runtime.render(_job(accepted, whole))
    reference = np.load(whole / FRAMES_FILE)

    # Resume: clip 0 overwritten with 0xFF after its header (a white clip if it were trusted).
    job = tmp_path / "job"
    _interrupt(runtime, _job(accepted, job))
    clip0 = job / FRAMES_SPILL_DIR / "clip_0000.npy"
    data = bytearray(clip0.read_bytes())
    data[128:] = b"\xff" * (len(data) - 128)
    clip0.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        prep = runtime.renderer.prepare(accepted[0], _job(accepted, job).settings, accepted[1], job)
    assert prep.start_clip == 0 and "clip_0000.npy" in caplog.text and "checksum" in caplog.text
    runtime.render(_job(accepted, job))
    assert np.array_equal(np.load(job / FRAMES_FILE), reference)  # rendered again from its seed

    # Mux: the last clip truncated just before the mux; it is not muxed but rendered again.
    caplog.clear()
    again = tmp_path / "again"
    sink = _DamageBeforeMux(again / FRAMES_SPILL_DIR)
    with caplog.at_level(logging.WARNING):
        runtime.render(_job(accepted, again), sink)
    assert sink.damaged and sink.name in caplog.text and sink.done_outputs
    repaired = np.load(again / FRAMES_FILE)
    assert repaired.shape == reference.shape
    first = sum(c.kept_frames for c in prep.plan.clips[:-1])  # frames of the clips before the last
    # The clips before it are kept as they were; the last one restarts from 8-bit motion frames.
    assert np.abs(repaired.astype(int) - reference.astype(int)).mean() < 2.0
    assert np.array_equal(repaired[:first], reference[:first])


def test_spill_checksums_find_the_first_damaged_clip(tmp_path) -> None:
    # Negative control at unit level: untouched clips pass, each kind of damage is named.
    from inference.render.pipeline import SPILL_STATE, _first_damaged, _HashingWriter, _record_checksum

    spill = tmp_path / FRAMES_SPILL_DIR
    spill.mkdir()
    (spill / SPILL_STATE).write_text('{"settings": {}}')
    files = []
    for i in range(3):
        path = spill / f"clip_{i:04d}.npy"
        digest = hashlib.sha256()
        with path.open("wb") as f:
            np.save(_HashingWriter(f, digest), np.full((2, 4, 4, 3), i, np.uint8))
        _record_checksum(tmp_path, path.name, digest.hexdigest())
        files.append(path)
    assert _first_damaged(tmp_path, files) is None
    files[2].unlink()
    assert _first_damaged(tmp_path, files) == (2, "is missing")
    data = bytearray(files[1].read_bytes())
    data[-1] ^= 1
    files[1].write_bytes(bytes(data))
    index, why = _first_damaged(tmp_path, files)
    assert index == 1 and "checksum" in why


# ---------------------------------------------------------------------------------------------- the store


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs (skipped where this machine does not allow mounting one)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()[:120]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_disk_full_never_kills_the_engine_and_the_end_of_a_job_lands(small_disk: Path) -> None:
    store = JobStore(small_disk / "jobs.db", small_disk / "out", min_free_bytes=0)
    first = store.submit({"kind": "test"}, {}, {})
    second = store.submit({"kind": "test"}, {}, {})
    store.claim_next(worker="t")
    store.set_state(first.id, JobState.RENDERING)
    monitor = EngineMonitor(1, "cpu")
    sink, source = StoreSink(store, monitor), StoreJobSource(store, monitor, poll_s=0.01)
    filler = _fill(small_disk)
    for _ in range(50):  # what the engine thread does inside the collective region: never raises
        sink.progress(first.id, 50.0, "clip 1 of 1, step 3 of 8")
        assert sink.cancel_requested(first.id) is False
    sink.failed(first.id, "OSError: [Errno 28] No space left on device")  # never raises
    claimed = source(0.05)  # a store that refuses writes pauses the queue instead of raising
    assert claimed is None or claimed.job_id == second.id
    filler.unlink()
    deadline = time.monotonic() + 10
    while sink.unsettled and time.monotonic() < deadline:
        time.sleep(0.05)
    job = store.get(first.id)
    assert job.state == JobState.FAILED and "No space left" in job.error  # landed once space came back
    if claimed is None:
        source(0.5)  # the queue runs again: the next job is claimed (and, being a stub, refused)
        assert store.get(second.id).state != JobState.QUEUED
    store.close()


def test_startup_store_problems_say_so_in_one_line(small_disk: Path, tmp_path: Path) -> None:
    # Missing database beside job folders: refused, not silently empty (the clean-up would delete them).
    out = tmp_path / "out"
    store = JobStore(out / "jobs.db", out, min_free_bytes=0)
    store.submit({"kind": "test"}, {}, {})
    store.close()
    (out / "jobs.db").unlink()
    for extra in ("-wal", "-shm"):
        (out / f"jobs.db{extra}").unlink(missing_ok=True)
    with pytest.raises(JobStoreError, match=r"missing but .* holds 1 job folder") as info:
        JobStore(out / "jobs.db", out)
    assert "\n" not in str(info.value)
    # Corrupt database.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "jobs.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JobStoreError, match="not a readable job database"):
        JobStore(bad / "jobs.db", bad)
    # Full disk before the first start.
    _fill(small_disk)
    with pytest.raises(JobStoreError, match="disk is full|cannot open") as info:
        JobStore(small_disk / "jobs.db", small_disk / "out")
    assert "\n" not in str(info.value)


def test_clean_shutdowns_do_not_use_up_attempts_but_crashes_do(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db", tmp_path / "out", min_free_bytes=0, max_attempts=2)
    sink = StoreSink(store, EngineMonitor(1, "cpu"))
    job = store.submit({"kind": "test"}, {}, {})
    for _ in range(3):  # SIGTERM three times mid-render: re-queued each time, never failed
        store.claim_next(worker="t")
        store.set_state(job.id, JobState.RENDERING)
        sink.failed(job.id, "cancelled at step 3 (shutdown)", interrupted=True)
        assert store.get(job.id).state == JobState.QUEUED and store.get(job.id).attempts == 0
    store.claim_next(worker="t")
    store.set_state(job.id, JobState.RENDERING)
    store.set_state(job.id, JobState.ENCODING)
    sink.done(job.id, [])
    assert store.get(job.id).state == JobState.DONE and store.get(job.id).attempts == 1
    # Negative control: crashes (the row left active) use up the attempts.
    crash = store.submit({"kind": "test"}, {}, {})
    for _ in range(2):
        store.claim_next(worker="t")
        store.recover_interrupted()
    assert store.get(crash.id).state == JobState.FAILED and "interrupted twice" in store.get(crash.id).error
    store.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_twice_mid_render_then_done_with_one_attempt(tiny_weights, portrait_pngs, tmp_path) -> None:
    from tests.test_service_e2e import running_service, submit, wait_status

    outputs, log = tmp_path / "outputs", tmp_path / "service.log"
    task_id = None
    for round_ in range(2):
        with running_service(tiny_weights, outputs, log) as svc:
            if task_id is None:
                task_id = submit(svc, portrait_pngs, settings='{"steps": 20}')
            body = wait_status(svc, task_id, {"rendering", "encoding", "done"}, poll_s=0.05)
            assert body["status"] == "rendering", f"round {round_}: left rendering too soon: {body}"
            svc.proc.send_signal(signal.SIGTERM)
            assert svc.proc.wait(timeout=120) == 0, svc.log_tail()  # a clean exit
    with running_service(tiny_weights, outputs, log) as svc:
        body = wait_status(svc, task_id, {"done"})
        assert body["attempts"] == 1, body  # the two shutdowns were not counted
