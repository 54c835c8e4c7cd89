"""What the job store holds: a job's states and their transitions, the ``Job`` row, job and file
names, and the store's errors. ``service.jobs`` (the store itself) re-exports every name.

Job life cycle::

    queued ──claim_next──► preparing ──► rendering ──► encoding ──► done
       │                       │              │             │
       └──► cancelled          └──────────────┴─────────────┴──► failed | cancelled
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from common.errors import InputError

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
# Input names are chosen by the API (e.g. "left_image.png"); the regex keeps them plain file names.
INPUT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}(\.[a-z0-9]{1,8})?$")
# Output names are chosen by the engine; no separators, no leading dot, so never "..".
OUTPUT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
TIMING_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
STAGE_MAX_CHARS = 200
ERROR_MAX_CHARS = 4000
INPUTS_DIRNAME = "inputs"
# An output folder without a database row is left alone for this long: another process may be
# between writing the inputs of a submission and inserting its row.
ORPHAN_GRACE_S = 3600.0


class JobState(StrEnum):
    QUEUED = "queued"
    PREPARING = "preparing"
    RENDERING = "rendering"
    ENCODING = "encoding"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATES = frozenset({JobState.PREPARING, JobState.RENDERING, JobState.ENCODING})
TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

# Transitions allowed through set_state(). queued -> preparing happens only through claim_next()
# (atomic), and active -> queued only through recover_interrupted().
_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.CANCELLED, JobState.FAILED}),
    JobState.PREPARING: frozenset({JobState.RENDERING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RENDERING: frozenset({JobState.ENCODING, JobState.FAILED, JobState.CANCELLED}),
    JobState.ENCODING: frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class JobStoreError(Exception):
    """Base class of the store's errors."""


class InvalidJobIdError(JobStoreError, InputError):
    """An id from outside is not a 32-character lowercase hex uuid (``field`` names where it came from)."""


class JobNotFoundError(JobStoreError, KeyError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(job_id)

    def __str__(self) -> str:
        return f"no job with id {self.job_id}"


class InvalidTransitionError(JobStoreError, ValueError):
    """A state change the state machine does not allow (e.g. done -> rendering)."""

    def __init__(self, job_id: str, current: str, target: str, detail: str = "") -> None:
        self.job_id, self.current, self.target = job_id, current, target
        allowed = ", ".join(sorted(_TRANSITIONS[JobState(current)])) or "none (final state)"
        msg = f"job {job_id}: cannot go from {current} to {target}; allowed from {current}: {allowed}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class QueueFullError(JobStoreError):
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        super().__init__(f"the queue is full ({max_queue} jobs waiting); try again later")


class DiskFullError(JobStoreError):
    def __init__(self, free_bytes: int, needed_bytes: int, min_free_bytes: int) -> None:
        self.free_bytes, self.needed_bytes, self.min_free_bytes = free_bytes, needed_bytes, min_free_bytes
        super().__init__(
            f"not enough free disk space for a new job: {free_bytes / 2**20:.0f} MiB free, the inputs need "
            f"{needed_bytes / 2**20:.1f} MiB and {min_free_bytes / 2**20:.0f} MiB must stay free"
        )


class OutputNotFoundError(JobStoreError, KeyError):
    def __init__(self, job_id: str, name: str, known: list[str], reason: str = "") -> None:
        self.job_id, self.name, self.known = job_id, name, known
        self.reason = reason

    def __str__(self) -> str:
        if self.reason:
            return self.reason
        listed = ", ".join(self.known) if self.known else "none yet"
        return f"job {self.job_id} has no output file {self.name!r}; its outputs: {listed}"


@dataclass(frozen=True)
class Job:
    """One row of the store, decoded. Timestamps are Unix seconds (float) or None."""

    id: str
    state: JobState
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    spec: dict[str, Any]
    settings: dict[str, Any]
    inputs: tuple[str, ...]
    progress: float
    stage: str
    timings: dict[str, float]
    error: str | None
    outputs: tuple[str, ...]
    attempts: int
    cancel_requested: bool
    worker: str | None
    purged_at: float | None
    # 1-based place in the queue (1 = runs next); None unless queued.
    queue_position: int | None = None
    # The credential that submitted it ("token", "user:<name>"); None: submitted without one.
    owner: str | None = None
    # The replica group that ran it (``--replicas``), that group's world ranks and their devices; the
    # producer's hand-off state (None | preparing | ready | taken) with ``--prepare_on producer``.
    replica_group: int | None = None
    ranks: tuple[int, ...] = ()
    devices: tuple[str, ...] = ()
    handoff: str | None = None

    def visible_to(self, principal: str | None) -> bool:
        """May ``principal`` see this job? Its owner may; a job without owner, or a request without
        credential (an open service), sees and is seen by everyone."""
        return principal is None or self.owner is None or self.owner == principal

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES


def validate_job_id(value: object, field: str = "id") -> str:
    """Return ``value`` if it is a well-formed job id, else raise InvalidJobIdError."""
    if not isinstance(value, str) or not JOB_ID_RE.fullmatch(value):
        shown = repr(value) if len(str(value)) <= 80 else repr(str(value)[:80]) + "..."
        raise InvalidJobIdError(field, f"{shown} is not a job id (32 lowercase hex characters)")
    return value
