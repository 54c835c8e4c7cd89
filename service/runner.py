"""Glue between the durable job store and the SPMD engine on rank 0.

- ``StoreJobSource``: the engine's job source. Claims the oldest queued job, turns its stored spec into
  a ``RenderJob``; a job whose inputs cannot be read fails at once with the reason.
- ``StoreSink``: the worker's sink. Progress, stage timings, states, outputs and errors go to the store;
  a cancel request in the store is seen at the next step and stops every rank at the same step.
- ``EngineMonitor``: live state for ``/api/health`` and ``/api/queue`` (last heartbeat, current job),
  read by API threads without touching torch.distributed. It is also the engine's ``Liveness``: every
  model pass beats, and while one runs the health limit stretches to ``PASS_SLACK`` times the slowest
  pass measured so far.
"""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import soundfile as sf

from common.errors import InputError
from dialogue import detect_language
from inference.checkpoint.weights import WeightPaths
from inference.parallel.groups import ReplicaGroup
from inference.render.settings import GenerationSettings
from inference.render.spec import JobSpec
from inference.render.worker import RenderJob
from service.jobs import INPUTS_DIRNAME, Job, JobState, JobStore
from service.schemas import EngineStatus, WorkerStatus

logger = logging.getLogger(__name__)

CLEANUP_EVERY_S = 3600.0
PASS_SLACK = 3.0  # a running model pass is called stuck only after 3x the slowest pass measured


class EngineMonitor:
    """Thread-safe record of what the engine loop last did (rank 0), and the measured speed of this
    service (seconds per model pass and per-clip overhead, by resolution) for the UI's estimates."""

    def __init__(self, world_size: int, device: str, *, first_pass_limit_s: float = 1800.0,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        """``first_pass_limit_s``: how long a model pass may run before any pass was measured (the
        other ranks wait that long for rank 0: the control-group timeout); ``clock``: Unix time."""
        self.world_size = world_size
        self.device = device
        self.first_pass_limit_s = first_pass_limit_s
        self._clock = clock
        self._pass_since: float | None = None
        self._slowest_pass = 0.0
        self._pass_time: dict[int, float] = {}
        self._clip_overhead: dict[int, float] = {}
        self._lock = threading.Lock()
        self._beat: float | None = None
        self._job: str | None = None
        self._stage: str | None = None
        self._alive = True
        self._message = ""

    def beat(self, job_id: str | None = None, stage: str | None = None) -> None:
        with self._lock:
            self._beat = self._clock()
            if job_id is not None:
                self._job, self._stage = job_id, stage

    def idle(self, job_id: str | None = None) -> None:
        """Nothing running; with ``job_id``, only if that job is the one shown (a job the finisher ended in
        the background leaves the next one, already running, in place)."""
        with self._lock:
            self._beat = self._clock()
            if job_id is not None and self._job not in (None, job_id):
                return
            self._pass_since = None
            self._job = self._stage = None

    def pass_started(self) -> None:
        """``Liveness``: a model pass begins (the engine is alive now)."""
        with self._lock:
            self._beat = self._pass_since = self._clock()

    def pass_finished(self, seconds: float) -> None:
        """``Liveness``: a model pass ended. Its length is taken on this monitor's clock (the one the
        heartbeat age is judged on); ``seconds``, the engine's own figure, when the start was missed."""
        with self._lock:
            now = self._clock()
            took = seconds if self._pass_since is None else now - self._pass_since
            self._beat, self._pass_since = now, None
            self._slowest_pass = max(self._slowest_pass, took)

    def _heartbeat_limit(self) -> float | None:
        """While a pass runs: ``PASS_SLACK`` x the slowest pass seen (in this run or, per pass, in this
        service's finished jobs), or ``first_pass_limit_s`` before any; None between passes."""
        if self._pass_since is None:
            return None
        known = max(self._slowest_pass, *self._pass_time.values(), 0.0)
        return PASS_SLACK * known if known > 0 else self.first_pass_limit_s

    def stopped(self, message: str) -> None:
        with self._lock:
            self._alive, self._message = False, message

    def learn_speed(self, job: Any, clips: int) -> None:
        """Fold one finished job's timings into the running estimates (exponential average)."""
        settings, timing = job.settings, job.timings
        passes = 2 if float(settings.get("text_guidance", 5.0)) == 1.0 else 3
        steps, resolution = int(settings.get("steps", 0)), int(settings.get("resolution", 480))
        video = timing.get("video_time")
        if not video or clips < 1 or steps < 1:
            return
        per_pass = video / (clips * steps * passes)
        overhead = (timing.get("conditioning_time", 0.0) + timing.get("decode_time", 0.0)) / clips
        with self._lock:
            for table, value in ((self._pass_time, per_pass), (self._clip_overhead, overhead)):
                old = table.get(resolution)
                table[resolution] = value if old is None else 0.7 * old + 0.3 * value

    def speed(self) -> dict[str, Any]:
        """``{"step_time_s": {res: s}, "clip_overhead_s": s}`` as far as measured (empty before any job)."""
        with self._lock:
            if not self._pass_time:
                return {}
            overhead = max(self._clip_overhead.values()) if self._clip_overhead else 0.0
            return {"step_time_s": dict(self._pass_time), "clip_overhead_s": overhead}

    def status(self) -> EngineStatus:
        with self._lock:
            workers = tuple(
                WorkerStatus(
                    rank=r,
                    busy=self._job is not None,
                    task_id=self._job,
                    stage=self._stage,
                    device=self.device if r == 0 else None,
                )  # fmt: skip
                for r in range(self.world_size)
            )
            return EngineStatus(self._alive, self._beat, workers, self._message, self._heartbeat_limit())


STORE_ERRORS = (sqlite3.Error, OSError)  # a full disk, a locked or vanished database
RETRY_S = 2.0  # the sink's writer retries a write the store refused this often


class StoreSink:
    """Where ``DialogueWorker`` reports (see ``inference.runtime.JobSink``).

    The engine calls ``progress`` and ``cancel_requested`` inside the collective region, where an
    exception would crash every rank. So progress never touches the store on the engine's thread: the
    latest value per job goes to a writer thread, best-effort. A cancel check the store cannot answer
    answers "no". The end of a job (``done``/``failed``) and ``timing`` are written at once; when the
    store refuses (a full disk), the write is kept and retried by the writer thread until it lands, so
    a job never stays "rendering" for good and the engine never dies of it.
    """

    def __init__(self, store: JobStore, monitor: EngineMonitor) -> None:
        self.store = store
        self.monitor = monitor
        self._lock = threading.Condition()
        self._progress: dict[str, tuple[float, str]] = {}
        self._unsettled: list[tuple[str, Callable[[], None]]] = []
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    def progress(self, job_id: str, percent: float, stage: str) -> None:
        self.monitor.beat(job_id, stage)
        with self._lock:
            self._progress[job_id] = (min(max(percent, 0.0), 100.0), stage)
            self._lock.notify()

    def timing(self, job_id: str, name: str, seconds: float) -> None:
        # The worker reports each name once, with its total.
        self._settle(f"timing {name} of job {job_id}", lambda: self.store.add_timing(job_id, name, seconds))

    def state(self, job_id: str, state: str) -> None:
        def write() -> None:
            if self.store.get(job_id).state != state:
                self.store.set_state(job_id, state)

        self._settle(f"state {state} of job {job_id}", write)

    def cancel_requested(self, job_id: str) -> bool:
        try:
            return self.store.is_cancel_requested(job_id)
        except STORE_ERRORS as exc:
            logger.warning("job %s: cannot read a cancel request (%s); carrying on", job_id, exc)
            return False

    def done(self, job_id: str, outputs: list[str]) -> None:
        self.monitor.idle(job_id)

        def write() -> None:
            with self._lock:
                self._progress.pop(job_id, None)
            self.store.set_outputs(job_id, outputs)
            self.store.update_progress(job_id, 100.0, "done")
            self.store.set_state(job_id, JobState.DONE)
            learn_from(self.store, self.monitor, self.store.get(job_id))
            logger.info("job %s done: %s", job_id, ", ".join(outputs))

        self._settle(f"the end (done) of job {job_id}", write)

    def failed(self, job_id: str, reason: str, *, cancelled: bool = False, interrupted: bool = False) -> None:
        self.monitor.idle(job_id)

        def write() -> None:
            with self._lock:
                self._progress.pop(job_id, None)
            job = self.store.get(job_id)
            if job.is_terminal:
                return
            if interrupted and not cancelled:
                # A shutdown (SIGTERM, systemd restart) is not the job's fault: back to the queue, the
                # attempt not counted; it resumes after its last finished clip at the next start.
                self.store.requeue_after_shutdown(job_id)
                logger.warning("job %s interrupted by the shutdown (%s); it runs again after the restart",
                               job_id, reason)  # fmt: skip
            elif cancelled or job.cancel_requested:
                self.store.set_state(job_id, JobState.CANCELLED, error=reason)
                logger.info("job %s cancelled: %s", job_id, reason)
            else:
                self.store.set_state(job_id, JobState.FAILED, error=reason)
                logger.warning("job %s failed: %s", job_id, reason)

        self._settle(f"the end of job {job_id}", write)

    @property
    def unsettled(self) -> int:
        """Writes the store refused so far and the writer still retries."""
        with self._lock:
            return len(self._unsettled)

    def _settle(self, what: str, write: Callable[[], None]) -> None:
        """Write now; if the store refuses, keep it for the writer thread (in order) and carry on."""
        with self._lock:
            if self._unsettled:  # keep the order of a job's writes
                self._unsettled.append((what, write))
                return
        try:
            write()
        except STORE_ERRORS as exc:
            logger.error("could not record %s (%s); retrying every %.0f s", what, exc, RETRY_S)
            with self._lock:
                self._unsettled.append((what, write))
                self._lock.notify()

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._progress and not self._unsettled:
                    self._lock.wait()
                progress, self._progress = self._progress, {}
                pending = list(self._unsettled)
            for job_id, (percent, stage) in progress.items():
                try:
                    self.store.update_progress(job_id, percent, stage)
                except (*STORE_ERRORS, ValueError) as exc:  # best-effort: the next value replaces it
                    logger.debug("job %s: progress not recorded (%s)", job_id, exc)
            for what, write in pending:
                try:
                    write()
                except STORE_ERRORS:
                    break
                except Exception:  # a write that can never succeed (job gone): drop it, say so
                    logger.exception("giving up recording %s", what)
                with self._lock:
                    self._unsettled.remove((what, write))
                    logger.info("recorded %s", what)
            with self._lock:
                if self._unsettled:
                    self._lock.wait(RETRY_S)


class StoreJobSource:
    """``source(timeout_s) -> RenderJob | None`` for ``Engine``: polls the store, claims in order.
    A job renders with exactly the settings stored with it (start-up defaults were applied at submission).
    """

    def __init__(self, store: JobStore, monitor: EngineMonitor, *, poll_s: float = 0.2,
                 group: ReplicaGroup | None = None, handoff: Callable[[RenderJob], RenderJob | None] | None = None,
                 ) -> None:  # fmt: skip
        """``group``: the replica group that claims (the job records it, its ranks and devices); ``handoff``
        (``--prepare_on producer``): claim only jobs the producer prepared, and attach their prepared
        conditioning (``inference.render.producer.HandoffLoader``)."""
        self.store = store
        self.monitor = monitor
        self.poll_s = poll_s
        self.group = group
        self.handoff = handoff
        self._last_cleanup = time.monotonic()
        self._paused = False

    def __call__(self, timeout_s: float) -> RenderJob | None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.monitor.beat()
            self._maybe_cleanup()
            try:
                job = self._claim()
                render_job = None if job is None else self._to_render_job(job)
            except STORE_ERRORS as exc:
                # A store that refuses writes (full disk) pauses the queue; the engine keeps beating
                # and /api/health reports the store. Nothing is claimed until it accepts writes again.
                if not self._paused:
                    logger.error(
                        "job store refuses writes (%s): the queue is paused until it accepts them", exc
                    )
                self._paused = True
                time.sleep(min(self.poll_s * 5, max(0.0, deadline - time.monotonic())))
                return None
            if self._paused:
                logger.info("job store accepts writes again: the queue runs")
                self._paused = False
            if render_job is not None:
                return render_job
            if job is not None:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(self.poll_s, left))

    def _claim(self) -> Job | None:
        if self.group is None:
            return self.store.claim_next(worker="rank0")
        g = self.group
        return self.store.claim_for_group(g.index, g.ranks, g.devices, prepared=self.handoff is not None)

    def _to_render_job(self, job: Job) -> RenderJob | None:
        """The stored job as the renderer takes it: its JobSpec and settings read back strictly, its
        input files present. A job that fails this fails now, with the reason."""
        inputs = self.store.job_dir(job.id) / INPUTS_DIRNAME
        try:
            spec = JobSpec.from_json(job.spec)
            settings = GenerationSettings.from_dict(job.settings)
            spec.input_paths(inputs)
        except InputError as exc:
            self.store.set_state(job.id, JobState.FAILED, error=f"cannot start the job: {exc}")
            logger.warning("job %s refused: %s", job.id, exc)
            return None
        self.monitor.beat(job.id, "preparing")
        render_job = RenderJob(job.id, spec, settings, inputs, self.store.job_dir(job.id))
        return render_job if self.handoff is None else self.handoff(render_job)

    def _maybe_cleanup(self) -> None:
        if time.monotonic() - self._last_cleanup < CLEANUP_EVERY_S:
            return
        self._last_cleanup = time.monotonic()
        try:
            removed = self.store.cleanup()
            if removed:
                logger.info("retention: removed outputs of %d old job(s)", len(removed))
        except STORE_ERRORS:
            logger.warning("retention clean-up failed", exc_info=True)


def learn_from(store: JobStore, monitor: EngineMonitor, job: Any) -> None:
    """Teach ``monitor`` the speed seen in one finished job (its clip count is in render.json)."""
    try:
        meta = json.loads(store.output_path(job.id, "render.json").read_text())
        monitor.learn_speed(job, int(meta["clips"]))
    except (OSError, ValueError, KeyError, TypeError):
        logger.debug("no speed sample from job %s", job.id, exc_info=True)


def learn_from_history(store: JobStore, monitor: EngineMonitor, limit: int = 20) -> None:
    """Seed the speed estimates from the last finished jobs in the store (oldest first)."""
    for job in reversed(store.list(limit=limit, state=JobState.DONE)):
        learn_from(store, monitor, job)


def wav_bytes(audio, sample_rate: int) -> bytes:
    """float32 mono -> 16-bit WAV bytes (for the voice preview endpoint)."""
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def preview_wav(tts: Any, voice: str, text: str | None) -> bytes:
    """A voice preview as WAV bytes: ``voice``'s sample line, or ``text`` spoken (its language detected)."""
    audio = tts.preview(voice) if not text else tts.synthesize(text, voice, detect_language(text), seed=0)
    return wav_bytes(audio, tts.sample_rate)


def weights_report(root: Path, preset: str) -> dict[str, Any]:
    """What /api/info says about the weights: the root, the preset and what is missing."""
    paths = WeightPaths.under(root)
    missing = paths.missing()
    return {"root": str(root), "preset": preset, "complete": not missing, "missing": missing[:20],
            "voices": paths.voices() if paths.kokoro_dir.is_dir() else []}  # fmt: skip
