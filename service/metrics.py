"""Prometheus text exposition of the service's state: jobs by state, queue, engine liveness, and the
per-stage timings of recently finished jobs. Served at ``GET /api/metrics`` (behind the API token when
one is set; Prometheus sends it with ``authorization: {credentials: ...}``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from service.jobs import JobState, JobStore

RECENT_JOBS = 50  # timings are summarised over this many most recent finished jobs


def _line(name: str, value: float, labels: dict[str, Any] | None = None) -> str:
    label = ""
    if labels:
        inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                         for k, v in labels.items())  # fmt: skip
        label = "{" + inner + "}"
    number = "NaN" if not math.isfinite(value) else repr(float(value))
    return f"{name}{label} {number}"


def render_metrics(store: JobStore, engine_status: Callable[[], Any] | None, world_size: int) -> str:
    """The whole exposition as text (``text/plain; version=0.0.4``)."""
    out: list[str] = []

    def metric(
        name: str, kind: str, help_text: str, samples: list[tuple[float, dict[str, Any] | None]]
    ) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(_line(name, v, labels) for v, labels in samples)

    metric("dialogue_jobs", "gauge", "Jobs in the store by state.",
           [(store.count(state=s), {"state": s.value}) for s in JobState])  # fmt: skip
    metric("dialogue_queue_size", "gauge", "Jobs waiting to run.", [(len(store.queue()), None)])
    metric("dialogue_queue_capacity", "gauge", "Queue size at which submissions get 429.",
           [(store.max_queue, None)])  # fmt: skip
    metric("dialogue_world_size", "gauge", "Ranks rendering each job.", [(world_size, None)])
    status = engine_status() if engine_status is not None else None
    alive = 1.0 if status is not None and status.alive else 0.0
    metric("dialogue_engine_up", "gauge", "1 when the engine loop is alive.", [(alive, None)])
    if status is not None and status.last_heartbeat is not None:
        age = max(0.0, time.time() - status.last_heartbeat)
        metric("dialogue_engine_heartbeat_age_seconds", "gauge", "Seconds since the engine loop last reported.",
               [(age, None)])  # fmt: skip
        busy = sum(1 for w in status.workers if w.busy)
        metric("dialogue_busy_ranks", "gauge", "Ranks working on a job.", [(busy, None)])

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for job in store.list(limit=RECENT_JOBS, state=JobState.DONE):
        for stage, seconds in job.timings.items():
            sums[stage] = sums.get(stage, 0.0) + float(seconds)
            counts[stage] = counts.get(stage, 0) + 1
    out.append(f"# HELP dialogue_stage_seconds Stage timings of the last {RECENT_JOBS} finished jobs.")
    out.append("# TYPE dialogue_stage_seconds summary")
    for stage in sorted(sums):
        out.append(_line("dialogue_stage_seconds_sum", sums[stage], {"stage": stage}))
        out.append(_line("dialogue_stage_seconds_count", counts[stage], {"stage": stage}))
    return "\n".join(out) + "\n"
