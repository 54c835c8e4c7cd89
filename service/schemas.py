"""What the REST API says, as types: live engine state (``ServiceInfo``, ``EngineStatus``) and the Pydantic
models of its answers and bodies. FastAPI builds the OpenAPI schema from them; ``service.api`` returns
them directly."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from inference.render.settings import LoraState
from service.jobs import Job

# ---------------------------------------------------------------------------------------------- info


@dataclass(frozen=True)
class WorkerStatus:
    """One rank (or replica group) as the engine sees it."""

    rank: int
    busy: bool
    task_id: str | None = None
    stage: str | None = None
    device: str | None = None
    group: int | None = None  # the replica group the rank belongs to (``--replicas``)


@dataclass(frozen=True)
class EngineStatus:
    """Live engine state. ``last_heartbeat``: Unix time of the last successful heartbeat round;
    ``heartbeat_limit_s``: the age the engine vouches for right now (a model pass is running and passes
    take that long), or None for the service's own limit."""

    alive: bool
    last_heartbeat: float | None
    workers: tuple[WorkerStatus, ...] = ()
    message: str = ""
    heartbeat_limit_s: float | None = None
    # One entry per replica group: group, ranks, devices, node, state (starting | idle | busy | stopped),
    # task_id, stage, progress, finishing (jobs being decoded/muxed), heartbeat_age_s, jobs_done.
    groups: tuple[Mapping[str, Any], ...] = ()

    def heartbeat_problem(self, base_limit_s: float, now: float) -> str | None:
        """Why the heartbeat says the engine is stuck at Unix time ``now``, or None when it is fine."""
        if self.last_heartbeat is None:
            return "engine has not sent a heartbeat yet"
        age = max(0.0, now - self.last_heartbeat)
        limit = max(base_limit_s, self.heartbeat_limit_s or 0.0)
        return f"last engine heartbeat {age:.0f} s ago (limit {limit:.0f} s)" if age > limit else None


@dataclass(frozen=True)
class ServiceInfo:
    """What the entry point knows about the running service; served by /api/info and /api/health.

    ``engine_status`` is called on every request that needs live state (cheap, thread-safe, must not
    touch torch.distributed); None means no engine is attached (the API still accepts jobs).
    """

    world_size: int = 1
    ulysses_size: int = 1
    ring_size: int = 1
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    model: str = "multitalk-14b"
    default_preset: str = "balanced"
    resolution: int = 480
    versions: Mapping[str, str] = field(default_factory=dict)
    weights: Mapping[str, Any] = field(default_factory=dict)
    engine_status: Callable[[], EngineStatus] | None = None
    heartbeat_timeout_s: float = 120.0
    extra: Mapping[str, Any] = field(default_factory=dict)
    lora: LoraState = LoraState()  # the service's LoRAs: which presets it offers and what they resolve to


# ---------------------------------------------------------------------------------------------- answers


class ErrorDetail(BaseModel):
    field: str | None = Field(
        description="the input the error is about (form field, JSON key, query parameter)"
    )
    message: str = Field(description="what is wrong and what is allowed")


class ErrorResponse(BaseModel):
    success: bool = False
    error: ErrorDetail


# ---------------------------------------------------------------------------------------------- models


class GenerateResponse(BaseModel):
    success: bool = True
    task_id: str
    status_url: str
    status: str
    queue_position: int | None


class JobStatusResponse(BaseModel):
    success: bool = True
    task_id: str
    status: str = Field(description="queued | preparing | rendering | encoding | done | failed | cancelled")
    progress: float = Field(description="0-100")
    stage: str
    queue_position: int | None = Field(description="1 = runs next; null unless queued")
    timing: dict[str, float] = Field(description="seconds per stage: tts_time, video_time, total_time, ...")
    error: str | None
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    attempts: int
    cancel_requested: bool
    outputs: list[str]
    download_url: str | None
    files: dict[str, str]
    purged: bool
    spec: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None
    group: int | None = Field(None, description="the replica group that ran the job (--replicas)")
    ranks: list[int] = Field(default_factory=list, description="that group's ranks")
    devices: list[str] = Field(default_factory=list, description="the devices of those ranks")

    @classmethod
    def of(cls, job: Job, prefix: str, *, full: bool) -> JobStatusResponse:
        """The view of ``job``; ``full`` adds its spec and settings (lists stay small without them)."""
        return cls(
            task_id=job.id,
            status=job.state.value,
            progress=round(job.progress, 2),
            stage=job.stage,
            queue_position=job.queue_position,
            timing=job.timings,
            error=job.error,
            created_at=_iso(job.created_at),
            updated_at=_iso(job.updated_at),
            started_at=_iso(job.started_at),
            finished_at=_iso(job.finished_at),
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
            outputs=list(job.outputs),
            download_url=f"{prefix}/api/download/{job.id}" if video_name(job) else None,
            files={name: f"{prefix}/api/download/{job.id}?file={name}" for name in job.outputs},
            purged=job.purged_at is not None,
            spec=job.spec if full else None,
            settings=job.settings if full else None,
            group=job.replica_group,
            ranks=list(job.ranks),
            devices=list(job.devices),
        )


class JobListResponse(BaseModel):
    success: bool = True
    jobs: list[JobStatusResponse]
    total: int
    limit: int
    offset: int


class CancelResponse(BaseModel):
    success: bool = True
    task_id: str
    status: str
    cancel_requested: bool
    message: str


class QueueResponse(BaseModel):
    success: bool = True
    workers: list[dict[str, Any]]
    groups: list[dict[str, Any]] = Field(default_factory=list, description="replica groups: state, ranks, "
                                         "devices, current job and progress")  # fmt: skip
    running: list[JobStatusResponse]
    queue: list[JobStatusResponse]
    queue_size: int
    max_queue: int


class TtsPreviewRequest(BaseModel):
    voice: str = Field(min_length=1, max_length=64, description="a voice id from GET /api/voices")
    text: str | None = Field(default=None, description="sentence to speak; a sample line when omitted")


class JobJson(BaseModel):
    """POST /api/generate as JSON: upstream MultiTalk's job JSON (or our keys), every file a base64 data
    URL (``data:image/png;base64,...``); server file paths and URLs are refused. Documentation only: the
    body is read by the one job-JSON parser (``inference.render.spec.parse_job_json``)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    cond_image: str | None = Field(None, description="one image showing the person or both people")
    cond_audio: dict[str, str] | None = Field(
        None, description="{person1[, person2]}: recordings; one = one person"
    )
    audio_type: Literal["add", "para"] | None = None
    bbox: dict[str, list[int]] | None = Field(None, description="{person1, person2}: [y0, x0, y1, x1] pixels")
    tts_audio: dict[str, str] | None = Field(None, description="{text, human1_voice[, human2_voice]}")
    left_image: str | None = Field(None, description="portrait of person 1 (instead of cond_image)")
    right_image: str | None = Field(None, description="portrait of person 2")
    image: str | None = Field(None, description="one person, full frame (instead of cond_image)")
    preset: Literal["fast", "balanced", "quality"] | None = None
    settings: dict[str, Any] | None = Field(None, description='overrides, e.g. {"steps": 20, "seed": 7}')
    layout: Literal["side_by_side", "backdrop"] | None = None
    backdrop: Literal["blur", "plain"] | None = None
    aspect: str | None = Field(None, description="W:H of the composed scene, e.g. 16:9")


# ---------------------------------------------------------------------------------------------- helpers


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def video_name(job: Job) -> str | None:
    """The output GET /api/download serves without ``?file=``: the job's first mp4."""
    return next((n for n in job.outputs if n.endswith(".mp4")), None)
