"""Job store: state machine, queue, cancel, crash recovery (real SIGKILL), concurrency, retention."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from service.jobs import (
    DiskFullError,
    InvalidJobIdError,
    InvalidTransitionError,
    JobNotFoundError,
    JobState,
    JobStore,
    OutputNotFoundError,
    QueueFullError,
)

REPO = Path(__file__).resolve().parents[1]
SPEC = {"kind": "dialogue", "script": "(s1) hi\n(s2) hello"}
SETTINGS = {"steps": 4, "seed": 1}


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    s = JobStore(tmp_path / "jobs.sqlite", tmp_path / "outputs", max_queue=50, min_free_bytes=0)
    yield s
    s.close()


def _submit(store: JobStore, **files: bytes):
    return store.submit(SPEC, SETTINGS, files or {"left_image.png": b"L", "right_image.png": b"R"})


def test_submit_writes_inputs_with_fixed_names_and_reads_back(store: JobStore) -> None:
    job = _submit(store)
    assert len(job.id) == 32 and job.state == JobState.QUEUED and job.queue_position == 1
    assert job.inputs == ("left_image.png", "right_image.png")
    assert (store.outputs_dir / job.id / "inputs" / "left_image.png").read_bytes() == b"L"
    assert store.input_path(job.id, "right_image.png").read_bytes() == b"R"
    again = store.get(job.id)
    assert again.spec == SPEC and again.settings == SETTINGS and again.attempts == 0
    assert again.created_at == again.updated_at and again.started_at is None


@pytest.mark.parametrize(
    "name", ["../evil.png", "a/b.png", "/etc/passwd", ".hidden", "Left.png", "x" * 40, ""]
)
def test_submit_refuses_unsafe_input_names(store: JobStore, name: str) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        store.submit(SPEC, SETTINGS, {name: b"x"})
    assert list(store.outputs_dir.iterdir()) == []
    assert store.count() == 0


@pytest.mark.parametrize(
    "bad", ["../../etc/passwd", "abc", "A" * 32, "0" * 31, "g" * 32, "0" * 32 + "\n", None, 5]
)
def test_ids_from_outside_are_validated(store: JobStore, bad: object) -> None:
    with pytest.raises(InvalidJobIdError):
        store.get(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidJobIdError):
        store.request_cancel(bad)  # type: ignore[arg-type]


def test_unknown_id_is_not_found(store: JobStore) -> None:
    with pytest.raises(JobNotFoundError, match="no job"):
        store.get("0" * 32)


def test_list_newest_first_and_queue_positions(store: JobStore) -> None:
    ids = [_submit(store).id for _ in range(5)]
    listed = store.list(limit=3, offset=0)
    assert [j.id for j in listed] == ids[::-1][:3]
    assert [j.id for j in store.list(limit=3, offset=3)] == ids[::-1][3:]
    assert [j.queue_position for j in store.queue()] == [1, 2, 3, 4, 5]
    assert [j.id for j in store.queue()] == ids
    store.request_cancel(ids[1])
    assert store.get(ids[2]).queue_position == 2  # the cancelled job no longer counts
    assert store.count() == 5 and store.count(state="queued") == 4


def test_engine_happy_path(store: JobStore) -> None:
    first, second = _submit(store), _submit(store)
    job = store.claim_next(worker="rank0")
    assert job is not None and job.id == first.id  # oldest first
    assert job.state == JobState.PREPARING and job.attempts == 1 and job.worker == "rank0"
    assert store.get(second.id).queue_position == 1
    store.update_progress(job.id, 12.5, "synthesising speech")
    store.add_timing(job.id, "tts_time", 1.5)
    store.set_state(job.id, "rendering")
    store.add_timing(job.id, "video_time", 2.0)
    store.add_timing(job.id, "video_time", 3.0)  # accumulates over clips
    store.set_state(job.id, "encoding")
    (store.job_dir(job.id) / "video.mp4").write_bytes(b"mp4")
    (store.job_dir(job.id) / "subtitles.srt").write_text("1\n")
    store.set_outputs(job.id, ["video.mp4", "subtitles.srt"])
    done = store.set_state(job.id, "done")
    assert done.state == JobState.DONE and done.progress == 100 and done.finished_at is not None
    assert done.timings == {"tts_time": 1.5, "video_time": 5.0}
    assert done.outputs == ("video.mp4", "subtitles.srt")
    assert store.output_path(job.id, "video.mp4").read_bytes() == b"mp4"
    assert store.claim_next() is not None and store.claim_next() is None


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ([], "rendering"),  # queued -> rendering skips the claim
        (["claim"], "done"),  # preparing -> done skips rendering/encoding
        (["claim", "rendering"], "preparing"),  # backwards
        (["claim", "rendering", "encoding", "done"], "failed"),  # final states are final
        (["claim", "cancelled"], "rendering"),
    ],
)
def test_illegal_transitions_are_rejected(store: JobStore, path: list[str], bad: str) -> None:
    job = _submit(store)
    for step in path:
        if step == "claim":
            store.claim_next()
        else:
            store.set_state(job.id, step, error="x")
    before = store.get(job.id).state
    with pytest.raises(InvalidTransitionError, match=f"cannot go from {before}"):
        store.set_state(job.id, bad, error="x")
    assert store.get(job.id).state == before


def test_failed_needs_a_reason_and_stores_it(store: JobStore) -> None:
    job = _submit(store)
    store.claim_next()
    with pytest.raises(ValueError, match="error message"):
        store.set_state(job.id, "failed")
    failed = store.set_state(job.id, "failed", error="CUDA out of memory in clip 3")
    assert failed.error == "CUDA out of memory in clip 3" and failed.finished_at is not None


def test_progress_and_timing_validation(store: JobStore) -> None:
    job = _submit(store)
    with pytest.raises(InvalidTransitionError):  # not active yet
        store.update_progress(job.id, 10, "x")
    store.claim_next()
    for bad in (-1, 101, float("nan"), "50"):
        with pytest.raises(ValueError):
            store.update_progress(job.id, bad)  # type: ignore[arg-type]
    for name, secs in (("Bad Name", 1.0), ("../x", 1.0), ("tts_time", -1.0), ("tts_time", float("inf"))):
        with pytest.raises(ValueError):
            store.add_timing(job.id, name, secs)
    store.update_progress(job.id, 40, "clip 1/3")
    assert (store.get(job.id).progress, store.get(job.id).stage) == (40, "clip 1/3")


def test_outputs_only_known_names_inside_the_job_dir(store: JobStore, tmp_path: Path) -> None:
    job = _submit(store)
    jd = store.job_dir(job.id)
    (jd / "video.mp4").write_bytes(b"v")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (jd / "link.mp4").symlink_to(secret)
    for bad in (["../secret.txt"], ["inputs/left_image.png"], ["missing.mp4"], ["link.mp4"], ["inputs"]):
        with pytest.raises(ValueError):
            store.set_outputs(job.id, bad)
    store.set_outputs(job.id, ["video.mp4"])
    for name in ("link.mp4", "../secret.txt", "inputs", "jobs.sqlite", ""):
        with pytest.raises(OutputNotFoundError):
            store.output_path(job.id, name)
    # A registered file swapped for a symlink afterwards still never resolves outside the job dir.
    (jd / "video.mp4").unlink()
    (jd / "video.mp4").symlink_to(secret)
    with pytest.raises(OutputNotFoundError, match="missing"):
        store.output_path(job.id, "video.mp4")


def test_cancel_queued_is_immediate_and_running_is_cooperative(store: JobStore) -> None:
    queued, running = _submit(store), _submit(store)
    store.claim_next()  # claims `queued` (oldest)
    store.claim_next()
    store.set_state(running.id, "rendering")
    third = _submit(store)
    cancelled = store.request_cancel(third.id)
    assert cancelled.state == JobState.CANCELLED and cancelled.finished_at is not None
    assert store.claim_next() is None  # never handed to the engine

    assert not store.is_cancel_requested(running.id)
    flagged = store.request_cancel(running.id)
    assert flagged.state == JobState.RENDERING and flagged.cancel_requested
    assert store.is_cancel_requested(running.id)
    assert store.set_state(running.id, "cancelled").state == JobState.CANCELLED
    with pytest.raises(InvalidTransitionError, match="already finished"):
        store.request_cancel(running.id)
    assert store.get(queued.id).state == JobState.PREPARING


def test_queue_full(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite", tmp_path / "out", max_queue=2, min_free_bytes=0)
    a = _submit(store)
    _submit(store)
    with pytest.raises(QueueFullError, match="2 jobs waiting"):
        _submit(store)
    assert len(list(store.outputs_dir.iterdir())) == 2  # the refused job left no folder
    store.claim_next()  # a running job does not count against the queue
    assert _submit(store).queue_position == 2
    assert store.get(a.id).state == JobState.PREPARING
    store.close()


def test_disk_space_check_uses_injected_free_space(tmp_path: Path) -> None:
    free = {"bytes": 10_000}
    store = JobStore(
        tmp_path / "db.sqlite", tmp_path / "out", min_free_bytes=5_000, free_space=lambda p: free["bytes"]
    )
    store.submit(SPEC, SETTINGS, {"audio1.wav": b"x" * 4_000})  # 10000 - 4000 >= 5000
    with pytest.raises(DiskFullError, match="MiB free"):
        store.submit(SPEC, SETTINGS, {"audio1.wav": b"x" * 6_000})  # would leave 4000 < 5000
    free["bytes"] = 1_000
    with pytest.raises(DiskFullError):
        store.submit(SPEC, SETTINGS, {})
    assert store.count() == 1
    store.close()


def test_twenty_concurrent_submissions_none_lost_none_duplicated(tmp_path: Path) -> None:
    db, out = tmp_path / "db.sqlite", tmp_path / "out"
    stores = [JobStore(db, out, min_free_bytes=0), JobStore(db, out, min_free_bytes=0)]  # two "processes"
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(20)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            job = stores[i % 2].submit({"n": i}, SETTINGS, {"audio1.wav": str(i).encode()})
            with lock:
                ids.append(job.id)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    assert len(ids) == 20 and len(set(ids)) == 20
    queue = stores[0].queue()
    assert sorted(j.id for j in queue) == sorted(ids)
    assert [j.queue_position for j in queue] == list(range(1, 21))
    assert sorted(j.spec["n"] for j in queue) == list(range(20))

    # Concurrent claims hand every job out exactly once.
    claimed: list[str] = []

    def claimer(k: int) -> None:
        while (job := stores[k % 2].claim_next(worker=f"w{k}")) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(claimed) == sorted(ids)
    for s in stores:
        s.close()


_CLAIM_AND_HANG = """
import sys, time
sys.path.insert(0, {repo!r})
from service.jobs import JobStore
store = JobStore({db!r}, {out!r}, min_free_bytes=0)
job = store.claim_next(worker="doomed")
store.set_state(job.id, "rendering")
store.update_progress(job.id, 33, "clip 1/3")
print(job.id, job.attempts, flush=True)
time.sleep(60)
"""


def _claim_and_kill(db: Path, out: Path) -> tuple[str, int]:
    code = _CLAIM_AND_HANG.format(repo=str(REPO), db=str(db), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line, "the child process did not claim a job"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    return line[0], int(line[1])


def test_job_interrupted_by_sigkill_is_requeued_once_then_failed(tmp_path: Path) -> None:
    db, out = tmp_path / "db.sqlite", tmp_path / "out"
    store = JobStore(db, out, min_free_bytes=0)
    job = _submit(store)
    later = _submit(store)
    store.close()

    job_id, attempts = _claim_and_kill(db, out)
    assert (job_id, attempts) == (job.id, 1)
    store = JobStore(db, out, min_free_bytes=0)  # "restart"
    assert store.get(job.id).state == JobState.RENDERING  # the kill left it mid-flight
    recovered = store.recover_interrupted()
    assert [j.id for j in recovered] == [job.id]
    requeued = store.get(job.id)
    assert requeued.state == JobState.QUEUED and requeued.attempts == 1 and requeued.progress == 0
    assert requeued.queue_position == 1  # keeps its place ahead of later submissions
    assert "re-queued after a service restart" in requeued.stage
    assert store.get(later.id).queue_position == 2
    store.close()

    job_id, attempts = _claim_and_kill(db, out)
    assert (job_id, attempts) == (job.id, 2)
    store = JobStore(db, out, min_free_bytes=0)
    store.recover_interrupted()
    failed = store.get(job.id)
    assert failed.state == JobState.FAILED
    assert "interrupted twice by a service restart" in failed.error
    assert store.get(later.id).state == JobState.QUEUED and store.recover_interrupted() == []
    store.close()


def test_recovery_honours_a_pending_cancel(store: JobStore) -> None:
    job = _submit(store)
    store.claim_next()
    store.request_cancel(job.id)
    store.recover_interrupted()
    assert store.get(job.id).state == JobState.CANCELLED


def test_cleanup_removes_only_old_finished_outputs(tmp_path: Path) -> None:
    clock = Clock()
    store = JobStore(
        tmp_path / "db.sqlite", tmp_path / "out", retention_days=2, min_free_bytes=0, clock=clock
    )
    old_done, old_running, new_done = _submit(store), _submit(store), _submit(store)
    store.claim_next()  # old_done
    store.claim_next()  # old_running
    store.set_state(old_done.id, "rendering")
    store.set_state(old_done.id, "encoding")
    (store.job_dir(old_done.id) / "video.mp4").write_bytes(b"v")
    store.set_outputs(old_done.id, ["video.mp4"])
    store.set_state(old_done.id, "done")
    orphan = store.outputs_dir / ("f" * 32)
    orphan.mkdir()
    os.utime(orphan, (clock.t - 10 * 86400, clock.t - 10 * 86400))
    keep = store.outputs_dir / "not-a-job"
    keep.mkdir()

    clock.t += 86400  # one day later: nothing is old enough yet
    store.claim_next()
    store.set_state(new_done.id, "failed", error="x")
    assert store.cleanup() == []
    purged = store.cleanup(now=clock.t + 1.5 * 86400)  # old_done is 2.5 days old, new_done 1.5
    assert purged == [old_done.id]
    assert not store.job_dir(old_done.id).exists()
    assert store.job_dir(new_done.id).exists() and store.job_dir(old_running.id).exists()
    assert not orphan.exists() and keep.exists()
    gone = store.get(old_done.id)
    assert gone.purged_at is not None and gone.outputs == () and gone.state == JobState.DONE
    with pytest.raises(OutputNotFoundError, match="retention"):
        store.output_path(old_done.id, "video.mp4")
    assert store.cleanup(now=clock.t + 1.5 * 86400) == []  # idempotent
    store.close()


def test_schema_version_and_writability(store: JobStore) -> None:
    ok, msg = store.check_writable()
    assert ok and msg == "ok"
    mode = store._conn().execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_store_reopens_existing_database(tmp_path: Path) -> None:
    a = JobStore(tmp_path / "db.sqlite", tmp_path / "out", min_free_bytes=0)
    job = _submit(a)
    a.close()
    b = JobStore(tmp_path / "db.sqlite", tmp_path / "out", min_free_bytes=0)
    assert b.get(job.id).spec == SPEC
    b.close()


def test_busy_writer_in_another_process_is_waited_for(tmp_path: Path) -> None:
    """A write lock held by another connection delays, but does not fail, a submission."""
    import sqlite3

    store = JobStore(tmp_path / "db.sqlite", tmp_path / "out", min_free_bytes=0)
    other = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    t0 = time.monotonic()
    job = _submit(store)
    assert time.monotonic() - t0 >= 0.25 and store.get(job.id).state == JobState.QUEUED
    release.join()
    other.close()
    store.close()
