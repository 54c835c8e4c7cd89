"""The job store's operations for replica groups and the producer (mixed into ``service.jobs.JobStore``).

Several group leaders (separate processes under torchrun) and one producer claim from the same SQLite
file. Every claim is one ``BEGIN IMMEDIATE`` transaction, so each job is handed out exactly once.

- ``claim_for_group``: a free group takes the oldest queued job (``--prepare_on group``), or the oldest
  job the producer has prepared (``prepared=True``, ``--prepare_on producer``). The job records the
  group, its world ranks and their devices.
- The producer's hand-off (``handoff`` column): ``claim_for_producer`` (queued -> preparing, handoff
  ``preparing``), ``mark_prepared`` (``ready``: the tensors wait in the job folder), then a group's
  ``claim_for_group(prepared=True)`` (``taken``). ``prepared_waiting`` counts the ready ones, so the
  producer stays at most a bounded number of jobs ahead.
- ``requeue_after_crash``: a group whose workers died while the service runs on (a Ray gang lost an actor
  or its node) hands its job back as ``recover_interrupted`` does at a restart: the attempt counts.
- ``refund_attempt``: an interruption that was not the job's doing (its group stopped cleanly because
  the service was stopping, or another group's rank died and torchrun stopped every rank) does not
  count against the job's ``max_attempts``. ``refund_waiting_handoffs`` does the same at start-up for
  jobs that were prepared and waiting for a group when the service stopped.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from service.job_model import ACTIVE_STATES, Job, JobState

logger = logging.getLogger(__name__)

# Columns added to the jobs table (ALTER TABLE on stores made before replica groups).
GROUP_COLUMNS = (("replica_group", "INTEGER"), ("ranks", "TEXT"), ("devices", "TEXT"), ("handoff", "TEXT"))
PRODUCER = "producer"


def group_fields(row: sqlite3.Row) -> dict[str, Any]:
    """The group columns of a row as ``Job`` fields."""
    keys = row.keys()

    def load(name: str) -> tuple[Any, ...]:
        raw = row[name] if name in keys else None
        return tuple(json.loads(raw)) if raw else ()

    return {
        "replica_group": row["replica_group"] if "replica_group" in keys else None,
        "ranks": tuple(int(r) for r in load("ranks")),
        "devices": tuple(str(d) for d in load("devices")),
        "handoff": row["handoff"] if "handoff" in keys else None,
    }


class GroupClaims:
    """Mixin: needs ``_write()`` (a BEGIN IMMEDIATE transaction), ``_conn()``, ``_clock`` and ``get``."""

    _write: Callable[[], AbstractContextManager[sqlite3.Connection]]
    _conn: Callable[[], sqlite3.Connection]
    _clock: Callable[[], float]
    _locked_row: Callable[[sqlite3.Connection, str], sqlite3.Row]
    get: Callable[[str], Job]
    max_attempts: int

    def _claim_queued(
        self, worker: str | None, extra: str = "", extra_args: tuple[Any, ...] = ()
    ) -> str | None:
        """Take the oldest queued job in one write transaction (queued -> preparing, attempts + 1, ``worker``
        set, plus the ``extra`` SET clauses with ``extra_args``); its id, or None when the queue is empty.
        The one claim under ``claim_next``, ``claim_for_group`` and ``claim_for_producer``."""
        now = self._clock()
        with self._write() as conn:
            row = conn.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            job_id = row["id"]
            conn.execute(
                "UPDATE jobs SET state = 'preparing', started_at = ?, updated_at = ?, attempts = attempts + 1, "
                f"progress = 0, stage = 'preparing', worker = ?{extra} WHERE id = ?",
                (now, now, worker, *extra_args, job_id),
            )
        return job_id

    def claim_for_group(
        self, group: int, ranks: Sequence[int], devices: Sequence[str], *, prepared: bool = False
    ) -> Job | None:
        """Group ``group`` takes the oldest queued job (queued -> preparing, attempts + 1) or, with
        ``prepared``, the oldest job the producer prepared (it stays preparing, the attempt is the
        producer's). None when there is none."""
        members = (group, json.dumps([int(r) for r in ranks]), json.dumps([str(d) for d in devices]))
        if not prepared:
            job_id = self._claim_queued(
                f"group {group}", ", replica_group = ?, ranks = ?, devices = ?, handoff = NULL", members
            )
        else:
            now = self._clock()
            with self._write() as conn:
                row = conn.execute(
                    "SELECT id FROM jobs WHERE state = 'preparing' AND handoff = 'ready' AND cancel_requested = 0 "
                    "ORDER BY seq LIMIT 1"
                ).fetchone()
                job_id = None if row is None else row["id"]
                if job_id is not None:
                    conn.execute(
                        "UPDATE jobs SET handoff = 'taken', worker = ?, replica_group = ?, ranks = ?, devices = ?, "
                        "updated_at = ? WHERE id = ?",
                        (f"group {group}", *members, now, job_id),
                    )
        if job_id is None:
            return None
        logger.info("job %s claimed by group %d (ranks %s)", job_id, group, list(ranks))
        return self.get(job_id)

    def claim_for_producer(self) -> Job | None:
        """The producer takes the oldest queued job to prepare (queued -> preparing, attempts + 1)."""
        job_id = self._claim_queued(
            PRODUCER, ", replica_group = NULL, ranks = NULL, devices = NULL, handoff = 'preparing'"
        )
        if job_id is None:
            return None
        logger.info("job %s claimed by the producer", job_id)
        return self.get(job_id)

    def mark_prepared(self, job_id: str) -> bool:
        """The producer's tensors for ``job_id`` are in its folder: a group may take it. False when the
        job is no longer the producer's to hand over (cancelled or failed meanwhile)."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET handoff = 'ready', stage = 'prepared; waiting for a free group', updated_at = ? "
                "WHERE id = ? AND state = 'preparing' AND handoff = 'preparing'",
                (self._clock(), job_id),
            )
        return cur.rowcount == 1

    def prepared_waiting(self) -> int:
        """Jobs prepared by the producer that no group has taken yet."""
        row = (
            self._conn()
            .execute("SELECT COUNT(*) FROM jobs WHERE state = 'preparing' AND handoff = 'ready'")
            .fetchone()
        )
        return int(row[0])

    def refund_attempt(self, job_id: str) -> None:
        """Do not count the current attempt of ``job_id``: it was interrupted through no fault of its own."""
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET attempts = MAX(attempts - 1, 0), updated_at = ? WHERE id = ?",
                (self._clock(), job_id),
            )
        logger.info("job %s: this attempt is not counted (interrupted by a stop elsewhere)", job_id)

    def refund_waiting_handoffs(self) -> list[str]:
        """At start-up, before ``recover_interrupted``: jobs that were prepared and waiting for a group when the
        service stopped never started rendering; their attempt is not counted. (One the producer was still
        preparing counts: the preparation itself may be what brought the process down.) Returns their ids."""
        with self._write() as conn:
            rows = conn.execute(
                "SELECT id FROM jobs WHERE state = 'preparing' AND handoff = 'ready'"
            ).fetchall()
            ids = [r["id"] for r in rows]
            for job_id in ids:
                conn.execute("UPDATE jobs SET attempts = MAX(attempts - 1, 0) WHERE id = ?", (job_id,))
        return ids

    def cancel_waiting_handoffs(self) -> list[str]:
        """Prepared jobs whose cancel was requested while they waited for a group: cancelled now (no group
        will take them). Returns their ids."""
        now = self._clock()
        with self._write() as conn:
            rows = conn.execute(
                "SELECT id FROM jobs WHERE state = 'preparing' AND handoff = 'ready' AND cancel_requested = 1"
            ).fetchall()
            ids = [r["id"] for r in rows]
            for job_id in ids:
                conn.execute(
                    "UPDATE jobs SET state = 'cancelled', stage = 'cancelled', handoff = NULL, finished_at = ?, "
                    "updated_at = ? WHERE id = ?",
                    (now, now, job_id),
                )
        for job_id in ids:
            logger.info("job %s cancelled while it waited for a group", job_id)
        return ids

    def requeue_after_crash(self, job_id: str, why: str) -> Job:
        """What ``recover_interrupted`` does at a restart, for one active job whose group died while the
        service runs on: cancelled when a cancel was requested, failed once it used ``max_attempts``, else
        back to the queue at its place (the attempt counts; it resumes after its last finished clip).
        Returns the job as it is now."""
        now = self._clock()
        with self._write() as conn:
            row = self._locked_row(conn, job_id)
            was = row["state"]
            if JobState(was) not in ACTIVE_STATES:
                return self.get(job_id)
            if row["cancel_requested"]:
                conn.execute("UPDATE jobs SET state = 'cancelled', stage = 'cancelled', handoff = NULL, finished_at = ?, "
                             "updated_at = ? WHERE id = ?", (now, now, job_id))  # fmt: skip
            elif row["attempts"] >= self.max_attempts:
                reason = (
                    f"{why} (attempt {row['attempts']} of {self.max_attempts}, in {was}); not retried again"
                )
                conn.execute("UPDATE jobs SET state = 'failed', stage = 'failed', error = ?, handoff = NULL, "
                             "finished_at = ?, updated_at = ? WHERE id = ?", (reason, now, now, job_id))  # fmt: skip
            else:
                conn.execute("UPDATE jobs SET state = 'queued', progress = 0, stage = ?, worker = NULL, started_at = NULL, "
                             "handoff = NULL, outputs = '[]', timings = '{}', updated_at = ? WHERE id = ?",
                             (f"re-queued: {why} (was {was})", now, job_id))  # fmt: skip
        job = self.get(job_id)
        logger.warning("job %s: %s -> %s", job_id, why, job.state.value)
        return job
