"""One member of a gang: a Ray actor that is one rank of a replica group (``inference.cluster.gang``).

Every member joins its gang's process groups and loads the model exactly as a torchrun rank of a replica
group does (``Runtime.start(joined=...)``), then runs the same engine loop and ``DialogueWorker`` in one
long call (``serve``). The gang's rank 0 is the group's leader: instead of the job store (which lives on
the head, maybe on another node) it has a ``Relay``:

- the head's ``submit`` hands it a job: its stored spec and settings, and its input files and the clips an
  earlier attempt finished, as a bundle from the object store; they are unpacked into a scratch folder on
  this node and the engine's job source returns the job;
- what the worker reports (progress, timings, states, the end) is queued as events; the finished files
  travel back in the ``done`` event, and every clip the job finishes (its ``.frames/`` spill) goes back
  as soon as it is written, so another group can resume after it if this one dies;
- the head's ``poll`` (a long poll: it returns at the next event or after about half a second) takes
  the events and doubles as the heartbeat: a member that stops answering it is taken for hung.

The actor is threaded (``MAX_CONCURRENCY``): ``serve`` holds one thread for the engine's whole life, the
head's calls run beside it; only ``serve``'s thread issues collectives.
"""

from __future__ import annotations

import fcntl
import logging
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from inference.checkpoint.weights import WeightPaths, make_tiny
from inference.cluster.gang import join_gang, member_location
from inference.cluster.transfer import Bundle, FolderMirror, pack, unpack
from inference.model.config import DiTConfig
from inference.parallel.groups import ReplicaGroup
from inference.parallel.layout import check_parallel_sizes
from inference.render.pipeline import FRAMES_SPILL_DIR
from inference.render.settings import GenerationSettings
from inference.render.spec import JobSpec
from inference.render.worker import RenderJob, Runtime, RuntimeOptions, setup_logging
from service.jobs import INPUTS_DIRNAME
from service.runner import EngineMonitor, preview_wav, weights_report

logger = logging.getLogger(__name__)

MAX_CONCURRENCY = 8  # serve() + the head's poll/submit/cancel/stop and voice previews


@dataclass(frozen=True)
class MemberSpec:
    """What every member of a gang is started with."""

    size: int  # members in the gang (G)
    options: RuntimeOptions
    heartbeat_s: float = 30.0
    check_consistency: bool = False  # --debug_checksum: the group's ranks compare latents every step
    scratch: Path | None = None  # the leader's job folders on its node; None: a new temporary folder


class Relay:
    """The leader's job source and ``JobSink``: jobs from the head, events back to it (module docstring)."""

    def __init__(self, scratch: Path, monitor: EngineMonitor) -> None:
        self.scratch = scratch
        self.monitor = monitor
        self._jobs: queue.Queue[RenderJob] = queue.Queue()
        self._lock = threading.Condition()  # notified when an event is queued (a long poll returns)
        self._events: list[tuple[Any, ...]] = []
        self._progress: dict[str, tuple[float, str]] = {}
        self._cancel: set[str] = set()
        self._mirrors: dict[str, FolderMirror] = {}
        self._frames: dict[str, Bundle] = {}

    # ---- from the head

    def submit(self, payload: dict[str, Any]) -> None:
        job_id = str(payload["job_id"])
        out_dir = self.scratch / job_id
        shutil.rmtree(out_dir, ignore_errors=True)
        unpack(payload["inputs"], out_dir / INPUTS_DIRNAME)
        unpack(payload["frames"], out_dir / FRAMES_SPILL_DIR)
        mirror = FolderMirror(out_dir / FRAMES_SPILL_DIR)
        mirror.changed()  # what came with the job is at the head already
        spec = JobSpec.from_json(payload["spec"])
        settings = GenerationSettings.from_dict(payload["settings"])
        job = RenderJob(job_id, spec, settings, out_dir / INPUTS_DIRNAME, out_dir)
        with self._lock:
            self._mirrors[job_id] = mirror
        self.monitor.beat(job_id, "preparing")
        self._jobs.put(job)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancel.add(job_id)

    def poll(self, wait_s: float = 0.0) -> dict[str, Any]:
        """Everything since the last poll: new spilled clips per job, the latest progress, the events in
        order, and the engine's state (ages, not clock times: the head's clock may differ). Waits up to
        ``wait_s`` for an event first (a long poll: the head hears of a job's end at once)."""
        with self._lock:
            if not self._events and wait_s > 0:
                self._lock.wait(wait_s)
            for job_id, mirror in self._mirrors.items():
                changed = mirror.changed()
                if changed:
                    self._frames.setdefault(job_id, {}).update(changed)
            frames, self._frames = self._frames, {}
            progress, self._progress = self._progress, {}
            events, self._events = self._events, []
        status = self.monitor.status()
        now = time.time()
        busy = [w for w in status.workers if w.busy]
        return {
            "frames": frames,
            "progress": progress,
            "events": events,
            "alive": status.alive,
            "message": status.message,
            "beat_age_s": None if status.last_heartbeat is None else max(0.0, now - status.last_heartbeat),
            "limit_s": status.heartbeat_limit_s,
            "job": busy[0].task_id if busy else None,
            "stage": busy[0].stage if busy else None,
        }

    # ---- the engine's job source

    def source(self, timeout_s: float) -> RenderJob | None:
        self.monitor.beat()
        try:
            return self._jobs.get(timeout=timeout_s) if timeout_s > 0 else self._jobs.get_nowait()
        except queue.Empty:
            return None

    # ---- JobSink

    def progress(self, job_id: str, percent: float, stage: str) -> None:
        self.monitor.beat(job_id, stage)
        with self._lock:
            self._progress[job_id] = (percent, stage)

    def timing(self, job_id: str, name: str, seconds: float) -> None:
        self._event("timing", job_id, name, seconds)

    def state(self, job_id: str, state: str) -> None:
        self._event("state", job_id, state)

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancel

    def done(self, job_id: str, outputs: list[str]) -> None:
        self.monitor.idle(job_id)
        out_dir = self.scratch / job_id
        skip = (f"{INPUTS_DIRNAME}/", f"{FRAMES_SPILL_DIR}/")
        files = pack(out_dir, keep=lambda rel: not rel.startswith(skip))
        self._end(job_id, ("done", job_id, list(outputs), files))

    def failed(self, job_id: str, reason: str, *, cancelled: bool = False, interrupted: bool = False) -> None:
        self.monitor.idle(job_id)
        self._end(job_id, ("failed", job_id, reason, cancelled, interrupted))

    def _event(self, *event: Any) -> None:
        with self._lock:
            self._events.append(event)
            self._lock.notify_all()

    def _end(self, job_id: str, event: tuple[Any, ...]) -> None:
        """The job's last event; its last spilled clips go first, then its scratch folder is removed."""
        with self._lock:
            mirror = self._mirrors.pop(job_id, None)
            if mirror is not None:
                changed = mirror.changed()
                if changed:
                    self._frames.setdefault(job_id, {}).update(changed)
            self._events.append(event)
            self._cancel.discard(job_id)
            self._lock.notify_all()
        shutil.rmtree(self.scratch / job_id, ignore_errors=True)


class GangMember:
    """The actor body (wrapped with ``ray.remote`` by the head). ``rank`` 0 leads the gang."""

    def __init__(self, rank: int, spec: MemberSpec) -> None:
        self.rank = rank
        self.spec = spec
        self.runtime: Runtime | None = None
        self.relay: Relay | None = None
        self.engine: Any = None
        self._scratch: Path | None = None
        setup_logging(rank)

    def locate(self) -> dict[str, Any]:
        return member_location(self.rank)

    def start(self, master: tuple[str, int], group: ReplicaGroup) -> dict[str, Any]:
        """Join the gang's process groups and load the model; the leader answers with what the head's web
        needs (voices, LoRA state, weights report)."""
        options = self.spec.options
        layout = check_parallel_sizes(self.spec.size, options.ulysses_size, options.ring_size,
                                      DiTConfig.preset(options.preset).num_heads, options.cfg_parallel)  # fmt: skip
        ctx = join_gang(self.rank, self.spec.size, master, layout, group.devices, data_timeout_s=options.data_timeout_s,
                        control_timeout_s=options.control_timeout_s)  # fmt: skip
        if options.preset == "tiny" and options.make_tiny and self.rank == 0:
            _make_tiny_locked(options.weights_root)
        runtime = Runtime.start(
            replace(options, make_tiny=False, device=str(ctx.device)), joined=(ctx, group)
        )
        self.runtime = runtime
        logger.info("%s: rank %d ready on %s", group.label(), self.rank, ctx.device)
        if self.rank != 0:
            return {}
        self._scratch = self.spec.scratch or Path(tempfile.mkdtemp(prefix=f"group{group.index}-"))
        self._scratch.mkdir(parents=True, exist_ok=True)
        monitor = EngineMonitor(ctx.world_size, str(ctx.device), first_pass_limit_s=options.control_timeout_s)
        self.relay = Relay(self._scratch, monitor)
        return {"voices": runtime.paths.voices(), "lora": runtime.speed.lora, "speed": runtime.speed.info(),
                "weights": weights_report(runtime.paths.root, options.preset), "device": str(ctx.device),
                "layout": {"ulysses": ctx.parallel_layout.ulysses, "ring": ctx.parallel_layout.ring}}  # fmt: skip

    def serve(self) -> int:
        """The engine loop, until the head's ``stop`` (returns the jobs run). A failure inside it raises,
        which the head sees as this gang going down."""
        runtime = self.runtime
        assert runtime is not None, "start() first"
        relay = self.relay
        self.engine = runtime.make_engine(
            relay, relay.source if relay is not None else None, heartbeat_s=self.spec.heartbeat_s,
            check_consistency=self.spec.check_consistency, liveness=relay.monitor if relay is not None else None,
        )  # fmt: skip
        try:
            self.engine.serve(install_signal_handlers=False)
        except BaseException as exc:
            if relay is not None:
                relay.monitor.stopped(f"engine stopped: {exc}")
            raise
        if runtime.finisher is not None:
            runtime.finisher.drain(timeout_s=60.0)
        runtime.close()
        if self._scratch is not None and self.spec.scratch is None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        return int(self.engine.jobs_run)

    # ---- the head's calls on the leader

    def submit(self, payload: dict[str, Any]) -> None:
        self._leader().submit(payload)

    def poll(self, wait_s: float = 0.0) -> dict[str, Any]:
        return self._leader().poll(wait_s)

    def cancel(self, job_id: str) -> None:
        self._leader().cancel(job_id)
        if self.engine is not None:
            self.engine.cancel(job_id)

    def stop(self) -> None:
        """Shut the gang down after the current step (a running job ends as interrupted)."""
        if self.engine is not None:
            self.engine.request_shutdown()

    def tts_preview(self, voice: str, text: str | None) -> bytes:
        renderer = self.runtime.renderer if self.runtime is not None else None
        if renderer is None:
            raise RuntimeError("voice previews are made by a group's leader")
        return preview_wav(renderer.tts, voice, text)

    def _leader(self) -> Relay:
        if self.relay is None:
            raise RuntimeError(f"rank {self.rank} is not a started gang's leader")
        return self.relay


def _make_tiny_locked(root: Path) -> None:
    """The tiny weights on this node, written once even when several gangs start here at the same time."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".make_tiny.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            make_tiny(WeightPaths.under(root).root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
