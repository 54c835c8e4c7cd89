"""Durable job store: SQLite (WAL) rows + one folder per job under ``outputs/<id>/``.

The store is the only shared state between the web front end (submits, reads, cancels) and the
engine (claims, reports progress, writes outputs). Both may live in different threads or different
processes; every write is one short ``BEGIN IMMEDIATE`` transaction, so SQLite's file lock makes them
atomic across processes and ``busy_timeout`` turns contention into waiting instead of errors.

Job life cycle::

    queued ──claim_next──► preparing ──► rendering ──► encoding ──► done
       │                       │              │             │
       └──► cancelled          └──────────────┴─────────────┴──► failed | cancelled

An engine drives a job like this::

    job = store.claim_next(worker="rank0")           # queued -> preparing, attempts += 1
    store.update_progress(job.id, 5, "synthesising speech")
    store.add_timing(job.id, "tts_time", 3.2)
    store.set_state(job.id, "rendering")
    ...  if store.is_cancel_requested(job.id): store.set_state(job.id, "cancelled"); return
    store.set_state(job.id, "encoding")
    # write files into store.job_dir(job.id), then
    store.set_outputs(job.id, ["video.mp4", "subtitles.srt"])
    store.set_state(job.id, "done")                  # or set_state(id, "failed", error="...")

A job found in preparing/rendering/encoding at start-up was interrupted by a crash:
``recover_interrupted()`` puts it back in the queue once, and fails it the second time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.files import atomic_write_bytes
from inference.render.spec import JobSpec
from service.db import immediate_transaction
from service.group_claims import GROUP_COLUMNS, GroupClaims, group_fields
from service.job_model import (
    _TRANSITIONS,
    ACTIVE_STATES,
    ERROR_MAX_CHARS,
    INPUT_NAME_RE,
    INPUTS_DIRNAME,
    JOB_ID_RE,
    ORPHAN_GRACE_S,
    OUTPUT_NAME_RE,
    STAGE_MAX_CHARS,
    TERMINAL_STATES,
    TIMING_NAME_RE,
    DiskFullError,
    InvalidJobIdError,
    InvalidTransitionError,
    Job,
    JobNotFoundError,
    JobState,
    JobStoreError,
    OutputNotFoundError,
    QueueFullError,
    validate_job_id,
)

logger = logging.getLogger(__name__)


__all__ = [
    "ACTIVE_STATES",
    "DiskFullError",
    "ERROR_MAX_CHARS",
    "INPUTS_DIRNAME",
    "INPUT_NAME_RE",
    "InvalidJobIdError",
    "InvalidTransitionError",
    "JOB_ID_RE",
    "Job",
    "JobNotFoundError",
    "JobState",
    "JobStore",
    "JobStoreError",
    "ORPHAN_GRACE_S",
    "OUTPUT_NAME_RE",
    "OutputNotFoundError",
    "QueueFullError",
    "STAGE_MAX_CHARS",
    "TERMINAL_STATES",
    "TIMING_NAME_RE",
    "validate_job_id",
]


def _disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=False)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    spec TEXT NOT NULL,
    settings TEXT NOT NULL,
    inputs TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    timings TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    outputs TEXT NOT NULL DEFAULT '[]',
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    purged_at REAL,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs(state, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_SCHEMA_VERSION = 1


class JobStore(GroupClaims):
    """SQLite-backed job store; safe to share between threads and to open from several processes.

    Args:
        db_path: the SQLite file (created with its parent folder when missing).
        outputs_dir: root of the per-job folders ``<outputs_dir>/<id>/`` (inputs under ``inputs/``).
        max_queue: most jobs that may wait in ``queued`` at once; ``submit`` raises QueueFullError beyond.
        retention_days: finished jobs' folders older than this are removed by ``cleanup``.
        min_free_bytes: ``submit`` raises DiskFullError when the outputs disk would drop below this.
        max_attempts: how many times a job may be started; a job interrupted by a restart after its
            last attempt is failed instead of re-queued.
        clock: time source (Unix seconds); injectable for tests.
        free_space: ``path -> free bytes`` of the disk holding ``path``; injectable for tests.
        busy_timeout_ms: how long a write waits for another writer's lock before failing.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        outputs_dir: str | os.PathLike[str],
        *,
        max_queue: int = 50,
        retention_days: float = 7.0,
        min_free_bytes: int = 2 * 2**30,
        max_attempts: int = 2,
        clock: Callable[[], float] = time.time,
        free_space: Callable[[Path], int] = _disk_free_bytes,
        busy_timeout_ms: int = 10_000,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if not retention_days > 0:
            raise ValueError(f"retention_days must be > 0, got {retention_days}")
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.db_path = Path(db_path).resolve()
        self.outputs_dir = Path(outputs_dir).resolve()
        self.max_queue = max_queue
        self.retention_days = retention_days
        self.min_free_bytes = min_free_bytes
        self.max_attempts = max_attempts
        self._clock = clock
        self._free_space = free_space
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._all_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_lost_store()
        try:
            self._init_schema()
        except sqlite3.Error as exc:  # corrupt file, full disk, read-only folder: one line, no traceback
            self.close()
            raise JobStoreError(_store_problem(self.db_path, exc)) from None

    def _refuse_lost_store(self) -> None:
        """A missing store beside job folders is not an empty service: starting would forget those jobs
        and the retention clean-up would delete their folders as orphans."""
        if self.db_path.exists():
            return
        folders = [p for p in self.outputs_dir.iterdir() if JOB_ID_RE.fullmatch(p.name) and p.is_dir()]
        if folders:
            raise JobStoreError(
                f"{self.db_path} is missing but {self.outputs_dir} holds {len(folders)} job folder(s): restore "
                "the job database from a backup, or move those folders away to start with an empty store"
            )

    # ------------------------------------------------------------------ connection handling

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # One connection per thread: sqlite3 connections must not be used by two threads at
            # once, and a per-thread connection needs no Python-side lock.
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock is taken
            # before the first read of a read-modify-write (no lost updates, no upgrade deadlock).
            conn = sqlite3.connect(
                self.db_path,
                timeout=self._busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._conns_lock:
                self._all_conns.append(conn)
        return conn

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._conn())

    def close(self) -> None:
        """Close every connection this store opened (from any thread)."""
        with self._conns_lock:
            conns, self._all_conns = self._all_conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    def _init_schema(self) -> None:
        with self._write() as conn:
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
            if "owner" not in columns:  # stores made before job ownership
                conn.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
            if "idempotency_key" not in columns:  # stores made before retry-safe submissions
                conn.execute("ALTER TABLE jobs ADD COLUMN idempotency_key TEXT")
            conn.execute("CREATE INDEX IF NOT EXISTS jobs_idempotency ON jobs(idempotency_key)")
            for name, kind in GROUP_COLUMNS:  # stores made before replica groups
                if name not in columns:
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            elif version != _SCHEMA_VERSION:
                raise JobStoreError(
                    f"{self.db_path}: job database schema version {version}, this code reads version "
                    f"{_SCHEMA_VERSION}; move the old file away or upgrade the service"
                )

    # ------------------------------------------------------------------ paths

    def job_dir(self, job_id: str) -> Path:
        """``<outputs_dir>/<id>``: where the engine writes a job's output files."""
        return self.outputs_dir / validate_job_id(job_id)

    def input_path(self, job_id: str, name: str) -> Path:
        """Path of one stored input file of a job (name as listed in ``Job.inputs``)."""
        job = self.get(job_id)
        if name not in job.inputs:
            raise KeyError(f"job {job_id} has no input {name!r}; its inputs: {', '.join(job.inputs)}")
        return self.job_dir(job_id) / INPUTS_DIRNAME / name

    def output_path(self, job_id: str, name: str) -> Path:
        """Resolve an output file of a job; only names the engine registered via ``set_outputs``.

        Raises OutputNotFoundError for unknown names, purged jobs or files gone from disk; the
        result is checked to lie inside the job folder (no symlink escapes).
        """
        job = self.get(job_id)
        if job.purged_at is not None:
            raise OutputNotFoundError(
                job_id, name, [], reason=f"the outputs of job {job_id} were removed by the retention clean-up"
            )
        if not isinstance(name, str) or name not in job.outputs or not OUTPUT_NAME_RE.fullmatch(name):
            raise OutputNotFoundError(job_id, str(name), list(job.outputs))
        base = self.job_dir(job_id).resolve()
        path = (base / name).resolve()
        if path.parent != base or not path.is_file():
            raise OutputNotFoundError(
                job_id,
                name,
                list(job.outputs),
                reason=f"output file {name!r} of job {job_id} is missing on disk",
            )
        return path

    # ------------------------------------------------------------------ submit / read

    def submit(
        self,
        spec: JobSpec | Mapping[str, Any],
        settings: Mapping[str, Any],
        files: Mapping[str, bytes],
        *,
        owner: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Store a new queued job with its input files; a retried submission (same ``idempotency_key``
        from the same ``owner``) returns the job the first one stored instead of a second job.

        Args:
            spec: what to make: a ``JobSpec`` (stored as ``spec.to_json()``) or any JSON object.
            settings: generation settings (JSON-serialisable).
            files: input file name -> bytes; names must match ``INPUT_NAME_RE`` (e.g. ``left_image.png``)
                and are written to ``outputs/<id>/inputs/<name>``.
            owner: the credential submitting it (``Job.visible_to``); None: visible to everyone.

        Raises:
            ValueError: a file name that is not a plain allowed name, or spec/settings not JSON.
            DiskFullError: the outputs disk would have less than ``min_free_bytes`` free.
            QueueFullError: ``max_queue`` jobs are already waiting.
        """
        for name, data in files.items():
            if not isinstance(name, str) or not INPUT_NAME_RE.fullmatch(name):
                raise ValueError(f"input file name {name!r} is not allowed (pattern {INPUT_NAME_RE.pattern})")
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ValueError(f"input file {name!r} must be bytes, got {type(data).__name__}")
        spec_json = _dumps(spec.to_json() if isinstance(spec, JobSpec) else dict(spec))
        settings_json = _dumps(dict(settings))
        # A retry first: it gets the stored job even when the disk or the queue has filled up since.
        # The authoritative check is repeated inside the insert transaction.
        if idempotency_key is not None and (earlier := self._by_key(self._conn(), owner, idempotency_key)):
            return self.get(earlier)
        needed = sum(len(d) for d in files.values())
        free = int(self._free_space(self.outputs_dir))
        if free - needed < self.min_free_bytes:
            raise DiskFullError(free, needed, self.min_free_bytes)
        if self.count(state=JobState.QUEUED) >= self.max_queue:
            raise QueueFullError(self.max_queue)

        job_id = uuid.uuid4().hex
        job_dir = self.outputs_dir / job_id
        inputs_dir = job_dir / INPUTS_DIRNAME
        inserted = False
        try:
            inputs_dir.mkdir(parents=True, exist_ok=False)
            for name, data in files.items():
                atomic_write_bytes(inputs_dir / name, bytes(data))
            now = self._clock()
            with self._write() as conn:
                # Checked again under the write lock: two retries racing each other store one job.
                earlier = self._by_key(conn, owner, idempotency_key) if idempotency_key is not None else None
                (queued,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
                if earlier is None and queued >= self.max_queue:
                    raise QueueFullError(self.max_queue)
                if earlier is None:
                    conn.execute(
                        "INSERT INTO jobs (id, state, created_at, updated_at, spec, settings, inputs, stage, "
                        "owner, idempotency_key) VALUES (?, 'queued', ?, ?, ?, ?, ?, 'waiting in queue', ?, ?)",
                        (
                            job_id,
                            now,
                            now,
                            spec_json,
                            settings_json,
                            _dumps(sorted(files)),
                            owner,
                            idempotency_key,
                        ),
                    )
            inserted = earlier is None
        finally:
            if not inserted:
                shutil.rmtree(job_dir, ignore_errors=True)
        if earlier is not None:
            return self.get(earlier)
        logger.info("job %s submitted (%d input files, %d bytes)", job_id, len(files), needed)
        return self.get(job_id)

    @staticmethod
    def _by_key(conn: sqlite3.Connection, owner: str | None, key: str) -> str | None:
        row = conn.execute(
            "SELECT id FROM jobs WHERE idempotency_key = ? AND IFNULL(owner, '') = IFNULL(?, '')",
            (key, owner),
        ).fetchone()
        return row["id"] if row else None

    def get(self, job_id: str) -> Job:
        validate_job_id(job_id)
        conn = self._conn()
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        position = None
        if row["state"] == JobState.QUEUED:
            (ahead,) = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?", (row["seq"],)
            ).fetchone()
            position = ahead + 1
        return _row_to_job(row, position)

    def exists(self, job_id: str) -> bool:
        validate_job_id(job_id)
        return self._conn().execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None

    def list(
        self, limit: int = 50, offset: int = 0, *, state: str | None = None, visible_to: str | None = None
    ) -> list[Job]:
        """Jobs newest first. ``state`` filters to one state; ``visible_to`` to the jobs that credential
        may see (``Job.visible_to``)."""
        if not 0 <= limit <= _MAX_SQL_INT or not 0 <= offset <= _MAX_SQL_INT:
            raise ValueError(
                f"limit and offset must be in 0..{_MAX_SQL_INT}, got limit={limit} offset={offset}"
            )
        where, params = _job_filter(state, visible_to)
        rows = self._conn().execute(
            f"SELECT * FROM jobs{where} ORDER BY seq DESC LIMIT ? OFFSET ?", (*params, limit, offset)
        )
        rows = rows.fetchall()
        positions = self._queue_positions() if any(r["state"] == JobState.QUEUED for r in rows) else {}
        return [_row_to_job(r, positions.get(r["id"])) for r in rows]

    def count(self, *, state: str | None = None, visible_to: str | None = None) -> int:
        where, params = _job_filter(state, visible_to)
        return self._conn().execute(f"SELECT COUNT(*) FROM jobs{where}", params).fetchone()[0]

    def _queue_positions(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq").fetchall()
        return {r["id"]: i + 1 for i, r in enumerate(rows)}

    def queue(self) -> list[Job]:
        """Queued jobs in the order they will run (oldest first), with queue_position 1..n."""
        rows = self._conn().execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY seq").fetchall()
        return [_row_to_job(r, i + 1) for i, r in enumerate(rows)]

    def active(self) -> list[Job]:
        """Jobs being worked on (preparing/rendering/encoding), oldest first."""
        rows = (
            self._conn()
            .execute("SELECT * FROM jobs WHERE state IN ('preparing', 'rendering', 'encoding') ORDER BY seq")
            .fetchall()
        )
        return [_row_to_job(r, None) for r in rows]

    # ------------------------------------------------------------------ engine side

    def claim_next(self, worker: str | None = None) -> Job | None:
        """Atomically take the oldest queued job (queued -> preparing, attempts += 1); None if empty.

        Safe when several threads or processes claim at once: each job is handed out exactly once.
        """
        job_id = self._claim_queued(worker)
        if job_id is None:
            return None
        logger.info("job %s claimed by %s", job_id, worker or "engine")
        return self.get(job_id)

    def update_progress(self, job_id: str, progress: float, stage: str | None = None) -> None:
        """Set progress (0-100) and optionally the stage text of an active job."""
        validate_job_id(job_id)
        if not isinstance(progress, int | float) or not math.isfinite(progress) or not 0 <= progress <= 100:
            raise ValueError(f"progress must be a number in [0, 100], got {progress!r}")
        with self._write() as conn:
            row = self._locked_row(conn, job_id)
            if JobState(row["state"]) not in ACTIVE_STATES:
                raise InvalidTransitionError(
                    job_id, row["state"], row["state"], "progress only for active jobs"
                )
            new_stage = row["stage"] if stage is None else str(stage)[:STAGE_MAX_CHARS]
            conn.execute(
                "UPDATE jobs SET progress = ?, stage = ?, updated_at = ? WHERE id = ?",
                (float(progress), new_stage, self._clock(), job_id),
            )

    def set_state(self, job_id: str, state: str, error: str | None = None) -> Job:
        """Move a job along the state machine; illegal transitions raise InvalidTransitionError.

        ``error`` is stored with ``failed`` (required there) and ignored otherwise. Entering a final
        state sets ``finished_at``; ``done`` sets progress to 100.
        """
        validate_job_id(job_id)
        target = JobState(state)
        if target == JobState.FAILED and not error:
            raise ValueError("set_state(..., 'failed') needs an error message saying why")
        now = self._clock()
        with self._write() as conn:
            row = self._locked_row(conn, job_id)
            current = JobState(row["state"])
            if target not in _TRANSITIONS[current]:
                raise InvalidTransitionError(job_id, current, target)
            sets = ["state = ?", "updated_at = ?"]
            args: list[Any] = [target, now]
            if target in TERMINAL_STATES:
                sets.append("finished_at = ?")
                args.append(now)
            if target == JobState.DONE:
                sets += ["progress = 100", "stage = 'done'"]
            elif target == JobState.FAILED:
                sets += ["error = ?", "stage = 'failed'"]
                args.append(str(error)[:ERROR_MAX_CHARS])
            elif target == JobState.CANCELLED:
                sets.append("stage = 'cancelled'")
            else:
                sets.append("stage = ?")
                args.append(target.value)
            conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))
        logger.info("job %s: %s -> %s%s", job_id, current, target, f" ({error})" if error else "")
        return self.get(job_id)

    def add_timing(self, job_id: str, name: str, seconds: float) -> None:
        """Add ``seconds`` to the named per-stage timing (accumulates, so per-clip times can be summed).

        Conventional names: tts_time, audio_encode_time, text_encode_time, image_encode_time,
        video_time, decode_time, mux_time, total_time.
        """
        validate_job_id(job_id)
        if not isinstance(name, str) or not TIMING_NAME_RE.fullmatch(name):
            raise ValueError(f"timing name {name!r} must match {TIMING_NAME_RE.pattern}")
        if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"timing {name}: seconds must be a finite number >= 0, got {seconds!r}")
        with self._write() as conn:
            row = self._locked_row(conn, job_id)
            timings = json.loads(row["timings"])
            timings[name] = round(float(timings.get(name, 0.0)) + float(seconds), 6)
            conn.execute(
                "UPDATE jobs SET timings = ?, updated_at = ? WHERE id = ?",
                (_dumps(timings), self._clock(), job_id),
            )

    def set_outputs(self, job_id: str, files: list[str] | tuple[str, ...]) -> None:
        """Register the output files the engine wrote into ``job_dir(id)`` (plain names, must exist)."""
        validate_job_id(job_id)
        base = self.job_dir(job_id).resolve()
        names: list[str] = []
        for name in files:
            if not isinstance(name, str) or not OUTPUT_NAME_RE.fullmatch(name):
                raise ValueError(
                    f"output name {name!r} must be a plain file name matching {OUTPUT_NAME_RE.pattern}"
                )
            path = base / name
            if path.is_symlink() or not path.is_file():
                raise ValueError(f"output {name!r} of job {job_id} is not a regular file in {base}")
            if name not in names:
                names.append(name)
        with self._write() as conn:
            self._locked_row(conn, job_id)
            conn.execute(
                "UPDATE jobs SET outputs = ?, updated_at = ? WHERE id = ?",
                (_dumps(names), self._clock(), job_id),
            )

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued job is cancelled at once; an active one gets ``cancel_requested``.

        The engine polls ``is_cancel_requested`` between steps and then calls
        ``set_state(id, "cancelled")``. Raises InvalidTransitionError for finished jobs.
        """
        validate_job_id(job_id)
        now = self._clock()
        with self._write() as conn:
            row = self._locked_row(conn, job_id)
            current = JobState(row["state"])
            if current == JobState.QUEUED:
                conn.execute(
                    "UPDATE jobs SET state = 'cancelled', stage = 'cancelled', cancel_requested = 1, "
                    "finished_at = ?, updated_at = ? WHERE id = ?",
                    (now, now, job_id),
                )
            elif current in ACTIVE_STATES:
                conn.execute(
                    "UPDATE jobs SET cancel_requested = 1, stage = ?, updated_at = ? WHERE id = ?",
                    ((row["stage"] + " (cancelling)")[:STAGE_MAX_CHARS], now, job_id),
                )
            else:
                raise InvalidTransitionError(
                    job_id, current, JobState.CANCELLED, "the job has already finished"
                )
        logger.info("job %s: cancel requested (was %s)", job_id, current)
        return self.get(job_id)

    def is_cancel_requested(self, job_id: str) -> bool:
        validate_job_id(job_id)
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        return bool(row[0])

    def _locked_row(self, conn: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        return row

    # ------------------------------------------------------------------ maintenance

    def recover_interrupted(self) -> list[Job]:
        """Re-queue or fail jobs a crash left in preparing/rendering/encoding. Call once at start-up,
        before any engine claims work (it treats every active job as orphaned).

        A job with attempts left goes back to the queue at its original place (it runs next); one
        that used all ``max_attempts`` is failed with a reason; one whose cancel was requested is
        cancelled. Returns the changed jobs.
        """
        try:
            return self._recover_interrupted()
        except sqlite3.Error as exc:
            raise JobStoreError(_store_problem(self.db_path, exc)) from None

    def requeue_after_shutdown(self, job_id: str) -> None:
        """A clean shutdown stopped this active job: back to the queue at its place, and the attempt it
        was on is not counted (only crashes use up ``max_attempts``). It resumes after its last clip."""
        now = self._clock()
        with self._write() as conn:
            row = self._locked_row(conn, job_id)
            if JobState(row["state"]) not in ACTIVE_STATES:
                return
            conn.execute(
                "UPDATE jobs SET state = 'queued', progress = 0, stage = ?, worker = NULL, started_at = NULL, "
                "attempts = MAX(attempts - 1, 0), updated_at = ? WHERE id = ?",
                (f"re-queued: the service shut down during {row['state']}", now, job_id),
            )
        logger.info("job %s re-queued by the shutdown (attempt not counted)", job_id)

    def _recover_interrupted(self) -> list[Job]:
        now = self._clock()
        changed: list[str] = []
        with self._write() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state IN ('preparing', 'rendering', 'encoding') ORDER BY seq"
            ).fetchall()
            for row in rows:
                job_id, was = row["id"], row["state"]
                if row["cancel_requested"]:
                    conn.execute(
                        "UPDATE jobs SET state = 'cancelled', stage = 'cancelled', finished_at = ?, updated_at = ? "
                        "WHERE id = ?",
                        (now, now, job_id),
                    )
                    logger.warning(
                        "job %s: interrupted in %s with a pending cancel -> cancelled", job_id, was
                    )
                elif row["attempts"] >= self.max_attempts:
                    times = {1: "once", 2: "twice"}.get(row["attempts"], f"{row['attempts']} times")
                    reason = f"interrupted {times} by a service restart (last in {was}); not retried again"
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', stage = 'failed', error = ?, finished_at = ?, "
                        "updated_at = ? WHERE id = ?",
                        (reason, now, now, job_id),
                    )
                    logger.warning("job %s: %s", job_id, reason)
                else:
                    conn.execute(
                        "UPDATE jobs SET state = 'queued', progress = 0, stage = ?, worker = NULL, "
                        "started_at = NULL, outputs = '[]', timings = '{}', updated_at = ? WHERE id = ?",
                        (f"re-queued after a service restart (was {was})", now, job_id),
                    )
                    logger.warning(
                        "job %s: interrupted in %s -> re-queued (attempt %d done)",
                        job_id,
                        was,
                        row["attempts"],
                    )
                changed.append(job_id)
        return [self.get(j) for j in changed]

    def delete(self, job_id: str) -> None:
        """Remove a finished job: its row and its folder (inputs and outputs). Raises
        InvalidTransitionError for a job that is queued or running (cancel it first)."""
        validate_job_id(job_id)
        with self._write() as conn:
            row = self._locked_row(conn, job_id)
            current = JobState(row["state"])
            if current not in TERMINAL_STATES:
                raise InvalidTransitionError(job_id, current, "deleted", "cancel it first")
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.outputs_dir / job_id, ignore_errors=True)
        logger.info("job %s deleted (was %s)", job_id, current)

    def cleanup(self, now: float | None = None) -> list[str]:
        """Remove the folders of finished jobs older than ``retention_days`` (rows stay, marked purged)
        and orphan folders with no row. Returns the ids whose outputs were removed."""
        now = self._clock() if now is None else now
        cutoff = now - self.retention_days * 86400.0
        rows = (
            self._conn()
            .execute(
                "SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND purged_at IS NULL "
                "AND finished_at IS NOT NULL AND finished_at < ? ORDER BY seq",
                (cutoff,),
            )
            .fetchall()
        )
        purged: list[str] = []
        for row in rows:
            job_id = row["id"]
            shutil.rmtree(self.outputs_dir / job_id, ignore_errors=True)
            with self._write() as conn:
                conn.execute(
                    "UPDATE jobs SET purged_at = ?, outputs = '[]', updated_at = ? WHERE id = ? AND purged_at IS NULL",
                    (now, now, job_id),
                )
            purged.append(job_id)
        # Folders named like a job id with no row: left by a submission that died half-way.
        for path in self.outputs_dir.iterdir():
            if not (path.is_dir() and JOB_ID_RE.fullmatch(path.name)) or self.exists(path.name):
                continue
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > ORPHAN_GRACE_S:
                    shutil.rmtree(path, ignore_errors=True)
                    logger.info("removed orphan job folder %s", path)
        if purged:
            logger.info("retention clean-up removed the outputs of %d jobs", len(purged))
        return purged

    def check_writable(self) -> tuple[bool, str]:
        """Health probe: one write transaction on the database and one file write in outputs_dir."""
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('health_probe', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(self._clock()),),
                )
            with tempfile.NamedTemporaryFile(dir=self.outputs_dir, prefix=".probe-", delete=True) as fh:
                fh.write(b"ok")
                fh.flush()
        except (sqlite3.Error, OSError) as exc:
            return False, f"job store not writable: {exc}"
        return True, "ok"


_MAX_SQL_INT = 2**63 - 1


def _store_problem(db_path: Path, exc: sqlite3.Error) -> str:
    """One line for a store that cannot be opened or written at start-up."""
    text = str(exc)
    if "full" in text:
        return f"{db_path}: the disk is full ({text}); free some space and start again"
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return f"{db_path} is not a readable job database ({text}); restore it from a backup or move it away"
    return f"{db_path}: cannot open the job database ({text})"


def _job_filter(state: str | None, visible_to: str | None) -> tuple[str, tuple[Any, ...]]:
    """`` WHERE ...`` and its parameters for a state and a credential (either may be None)."""
    clauses, params = [], []
    if state is not None:
        clauses.append("state = ?")
        params.append(JobState(state).value)
    if visible_to is not None:
        clauses.append("(owner IS NULL OR owner = ?)")
        params.append(visible_to)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


def _row_to_job(row: sqlite3.Row, queue_position: int | None) -> Job:
    return Job(
        id=row["id"],
        state=JobState(row["state"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        spec=json.loads(row["spec"]),
        settings=json.loads(row["settings"]),
        inputs=tuple(json.loads(row["inputs"])),
        progress=float(row["progress"]),
        stage=row["stage"],
        timings={k: float(v) for k, v in json.loads(row["timings"]).items()},
        error=row["error"],
        outputs=tuple(json.loads(row["outputs"])),
        attempts=int(row["attempts"]),
        cancel_requested=bool(row["cancel_requested"]),
        worker=row["worker"],
        purged_at=row["purged_at"],
        queue_position=queue_position,
        owner=row["owner"],
        **group_fields(row),
    )
