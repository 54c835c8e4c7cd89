"""Prometheus text exposition of the service's state: jobs by state, queue, engine liveness, every replica
group's state, the per-stage timings of recently finished jobs and a summary of their ``stats.json`` (jobs,
frames and render seconds per group, model passes computed and skipped, peak memory). Served at
``GET /api/metrics`` (behind the API token when one is set; Prometheus sends it with
``authorization: {credentials: ...}``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from inference.render.stats import read_stats
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

    if status is not None and status.groups:
        metric("dialogue_replica_groups", "gauge", "Replica groups, each rendering its own job.",
               [(float(len(status.groups)), None)])  # fmt: skip
        metric("dialogue_group_busy", "gauge", "1 while a replica group renders a job.",
               [(1.0 if g.get("state") == "busy" else 0.0, _group_labels(g)) for g in status.groups])  # fmt: skip
        metric("dialogue_group_heartbeat_age_seconds", "gauge", "Seconds since a replica group last reported.",
               [(float("nan") if g.get("heartbeat_age_s") is None else float(g["heartbeat_age_s"]),
                 _group_labels(g)) for g in status.groups])  # fmt: skip

    recent = store.list(limit=RECENT_JOBS, state=JobState.DONE)
    out.extend(_stats_summary(store, recent))
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for job in recent:
        for stage, seconds in job.timings.items():
            sums[stage] = sums.get(stage, 0.0) + float(seconds)
            counts[stage] = counts.get(stage, 0) + 1
    out.append(f"# HELP dialogue_stage_seconds Stage timings of the last {RECENT_JOBS} finished jobs.")
    out.append("# TYPE dialogue_stage_seconds summary")
    for stage in sorted(sums):
        out.append(_line("dialogue_stage_seconds_sum", sums[stage], {"stage": stage}))
        out.append(_line("dialogue_stage_seconds_count", counts[stage], {"stage": stage}))
    return "\n".join(out) + "\n"


def _group_labels(group: dict[str, Any]) -> dict[str, Any]:
    return {"group": group.get("group"), "node": group.get("node") or "",
            "devices": ",".join(map(str, group.get("devices", [])))}  # fmt: skip


def _stats_summary(store: JobStore, jobs: list[Any]) -> list[str]:
    """Totals over the ``stats.json`` of recent finished jobs: jobs, frames and seconds per replica group,
    model forwards computed and skipped, and the highest peak memory any rank reached."""
    per_group: dict[str, list[float]] = {}
    forwards = {"computed": 0.0, "skipped": 0.0}
    peak = 0.0
    for job in jobs:
        stats = read_stats(store.job_dir(job.id))
        if stats is None:
            continue
        group = str(
            stats.get("group", {}).get("group", job.replica_group if job.replica_group is not None else 0)
        )
        row = per_group.setdefault(group, [0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += float(stats.get("frames", 0))
        row[2] += float(stats.get("timings", {}).get("total_time", 0.0))
        passes = stats.get("passes", {})
        for kind in forwards:
            forwards[kind] += float(passes.get(kind, 0))
        peak = max([peak, *(float(v) for v in stats.get("memory", {}).get("peak_bytes", {}).values())])
    lines = [f"# HELP dialogue_group_jobs Finished jobs (with stats.json) among the last {RECENT_JOBS}, by group.",
             "# TYPE dialogue_group_jobs gauge"]  # fmt: skip
    lines += [_line("dialogue_group_jobs", v[0], {"group": g}) for g, v in sorted(per_group.items())]
    lines += [
        "# HELP dialogue_group_frames Video frames of those jobs, by group.",
        "# TYPE dialogue_group_frames gauge",
    ]
    lines += [_line("dialogue_group_frames", v[1], {"group": g}) for g, v in sorted(per_group.items())]
    lines += ["# HELP dialogue_group_render_seconds Their total render time (stats.json total_time), by group.",
              "# TYPE dialogue_group_render_seconds gauge"]  # fmt: skip
    lines += [
        _line("dialogue_group_render_seconds", v[2], {"group": g}) for g, v in sorted(per_group.items())
    ]
    lines += ["# HELP dialogue_model_passes Guidance-branch passes of those jobs: computed or skipped (TeaCache).",
              "# TYPE dialogue_model_passes gauge"]  # fmt: skip
    lines += [_line("dialogue_model_passes", v, {"kind": k}) for k, v in forwards.items()]
    lines += ["# HELP dialogue_peak_memory_bytes The highest peak memory of any rank in those jobs.",
              "# TYPE dialogue_peak_memory_bytes gauge", _line("dialogue_peak_memory_bytes", peak)]  # fmt: skip
    return lines
