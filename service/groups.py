"""Replica groups as the web process sees them: a board in the job database that every group leader writes.

Under ``--replicas R`` the group leaders are separate processes; only world rank 0 serves the web. Each
leader's ``GroupPublisher`` thread copies its ``EngineMonitor`` (heartbeat, current job, stage, the
heartbeat limit of a running model pass) into one row of the ``replica_groups`` table about once a
second; the web process reads every row for ``/api/queue``, ``/api/health`` and ``/api/metrics``
(``board_status``). A group whose leader stops writing (a dead or stuck process) shows a stale
heartbeat, so ``/api/health`` turns unhealthy exactly as for one engine.

The board also carries the service's stop request: when world rank 0's engine ends (SIGTERM, the web
stopping), ``request_stop`` tells every other leader to shut its group down, so no group serves on
without the web. ``reset`` (world rank 0 at start-up) clears the rows of the previous run.

Nothing here touches ``torch.distributed``: these are API and publisher threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.parallel.groups import ReplicaGroup
from service.db import immediate_transaction
from service.jobs import JobState, JobStore
from service.schemas import EngineStatus, WorkerStatus

logger = logging.getLogger(__name__)

PUBLISH_EVERY_S = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replica_groups (
    group_index INTEGER PRIMARY KEY,
    ranks TEXT NOT NULL,
    devices TEXT NOT NULL,
    node TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    alive INTEGER NOT NULL DEFAULT 1,
    last_beat REAL,
    heartbeat_limit_s REAL,
    job_id TEXT,
    stage TEXT,
    message TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS replica_control (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class GroupRow:
    """One group's last published state."""

    group: ReplicaGroup
    pid: int | None
    alive: bool
    last_beat: float | None
    heartbeat_limit_s: float | None
    job_id: str | None
    stage: str | None
    message: str
    updated_at: float


class GroupBoard:
    """The ``replica_groups`` table in the job database (its own connections, one per thread)."""

    def __init__(self, db_path: str | os.PathLike[str], *, busy_timeout_ms: int = 10_000) -> None:
        self.db_path = Path(db_path)
        self._busy_ms = busy_timeout_ms
        self._local = threading.local()
        with self._write() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=self._busy_ms / 1000, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_ms)}")
            conn.execute("PRAGMA journal_mode=WAL")
            self._local.conn = conn
        return conn

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._conn())

    def reset(self, groups: Sequence[ReplicaGroup]) -> None:
        """World rank 0 at start-up: one fresh row per group (no heartbeat yet) and no stop request."""
        now = time.time()
        with self._write() as conn:
            conn.execute("DELETE FROM replica_groups")
            conn.execute("DELETE FROM replica_control")
            for g in groups:
                conn.execute(
                    "INSERT INTO replica_groups (group_index, ranks, devices, node, alive, message, updated_at) "
                    "VALUES (?, ?, ?, ?, 1, 'starting', ?)",
                    (g.index, json.dumps(list(g.ranks)), json.dumps(list(g.devices)), g.node, now),
                )

    def publish(self, group: ReplicaGroup, status: EngineStatus) -> None:
        """Write ``group``'s engine state (from its leader's ``EngineMonitor.status()``)."""
        busy = [w for w in status.workers if w.busy]
        job_id, stage = (busy[0].task_id, busy[0].stage) if busy else (None, None)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO replica_groups (group_index, ranks, devices, node, pid, alive, last_beat, "
                "heartbeat_limit_s, job_id, stage, message, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(group_index) DO UPDATE SET ranks = excluded.ranks, devices = excluded.devices, "
                "node = excluded.node, pid = excluded.pid, alive = excluded.alive, last_beat = excluded.last_beat, "
                "heartbeat_limit_s = excluded.heartbeat_limit_s, job_id = excluded.job_id, stage = excluded.stage, "
                "message = excluded.message, updated_at = excluded.updated_at",
                (group.index, json.dumps(list(group.ranks)), json.dumps(list(group.devices)), group.node,
                 os.getpid(), int(status.alive), status.last_heartbeat, status.heartbeat_limit_s, job_id, stage,
                 status.message, time.time()),
            )  # fmt: skip

    def read(self, count: int | None = None) -> list[GroupRow]:
        """Every group's row, in group order (``count``: groups of this run; others are ignored)."""
        rows = self._conn().execute("SELECT * FROM replica_groups ORDER BY group_index").fetchall()
        out = []
        for r in rows:
            if count is not None and r["group_index"] >= count:
                continue
            ranks, devices = tuple(json.loads(r["ranks"])), tuple(json.loads(r["devices"]))
            group = ReplicaGroup(int(r["group_index"]), max(count or 0, int(r["group_index"]) + 1), ranks,
                                 devices, r["node"])  # fmt: skip
            out.append(GroupRow(group, r["pid"], bool(r["alive"]), r["last_beat"], r["heartbeat_limit_s"],
                                r["job_id"], r["stage"], r["message"], r["updated_at"]))  # fmt: skip
        return out

    def request_stop(self) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO replica_control (key, value) VALUES ('stop', ?)", (str(time.time()),)
            )

    def stop_requested(self) -> bool:
        row = self._conn().execute("SELECT value FROM replica_control WHERE key = 'stop'").fetchone()
        return row is not None


class GroupPublisher:
    """A leader's thread: ``board.publish(group, status())`` every ``every_s``, and ``on_stop()`` once
    when the board carries a stop request. Store errors are logged and retried at the next tick."""

    def __init__(self, board: GroupBoard, group: ReplicaGroup, status: Callable[[], EngineStatus], *,
                 on_stop: Callable[[], None] | None = None, every_s: float = PUBLISH_EVERY_S) -> None:  # fmt: skip
        self.board, self.group, self.status, self.on_stop, self.every_s = (
            board,
            group,
            status,
            on_stop,
            every_s,
        )
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"group{group.index}-publisher", daemon=True)

    def start(self) -> GroupPublisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Publish the final state once more and end the thread."""
        self._done.set()
        self._thread.join(timeout=5)
        self._tick()

    def _tick(self) -> None:
        try:
            self.board.publish(self.group, self.status())
            if self.on_stop is not None and self.board.stop_requested():
                self.on_stop()
        except (sqlite3.Error, OSError) as exc:
            logger.warning("group %d: could not publish its state (%s)", self.group.index, exc)

    def _loop(self) -> None:
        while not self._done.wait(self.every_s):
            self._tick()


def board_status(
    board: GroupBoard, store: JobStore, count: int, *, local: tuple[int, EngineStatus] | None = None
) -> EngineStatus:
    """The whole service's engine state from every group's row: alive when every group is, the oldest
    heartbeat (so one stuck group makes ``/api/health`` unhealthy), one worker per world rank and one
    entry per group with its current job's progress. ``local``: (group, live status) of the group in
    this process, fresher than its row."""
    rows = board.read(count)
    now = time.time()
    groups: list[dict[str, Any]] = []
    workers: list[WorkerStatus] = []
    beats: list[tuple[float | None, float | None]] = []
    alive, messages = True, []
    for row in rows:
        beat, limit, job_id, stage, ok, message = (row.last_beat, row.heartbeat_limit_s, row.job_id, row.stage,
                                                   row.alive, row.message)  # fmt: skip
        if local is not None and local[0] == row.group.index:
            s = local[1]
            busy = [w for w in s.workers if w.busy]
            beat, limit, ok, message = s.last_heartbeat, s.heartbeat_limit_s, s.alive, s.message
            job_id, stage = (busy[0].task_id, busy[0].stage) if busy else (None, None)
        alive = alive and ok
        if message and not ok:
            messages.append(f"group {row.group.index}: {message}")
        beats.append((beat, limit))
        progress = None
        if job_id is not None:
            try:
                progress = round(store.get(job_id).progress, 2)
            except KeyError:
                progress = None
        finishing = [
            j.id
            for j in store.active()
            if j.state == JobState.ENCODING and j.replica_group == row.group.index
        ]
        state = "starting" if beat is None else ("stopped" if not ok else ("busy" if job_id else "idle"))
        groups.append({"group": row.group.index, "ranks": list(row.group.ranks), "devices": list(row.group.devices),
                       "node": row.group.node, "pid": row.pid, "state": state, "task_id": job_id, "stage": stage,
                       "progress": progress, "finishing": finishing,
                       "heartbeat_age_s": None if beat is None else round(max(0.0, now - beat), 3)})  # fmt: skip
        for rank, device in zip(row.group.ranks, row.group.devices, strict=True):
            workers.append(WorkerStatus(rank, job_id is not None, job_id, stage, device, row.group.index))
    known = [b for b in beats if b[0] is not None]
    if len(known) < len(beats) or not beats:
        last, limit = None, None  # a group has not beaten yet: not healthy until every group serves
    else:
        last, limit = min(known, key=lambda b: b[0])  # the stalest group decides
    return EngineStatus(alive, last, tuple(workers), "; ".join(messages), limit, tuple(groups))
