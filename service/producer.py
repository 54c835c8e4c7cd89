"""The producer thread and the group leaders' hand-off loader (``--prepare_on producer``).

See ``inference.render.producer`` for the stage itself (placement, the hand-off format). ``Producer`` runs
on world rank 0: it claims queued jobs (``JobStore.claim_for_producer``), prepares each with its own
front-half encoders on the producer's device, saves the hand-off and marks the job ready
(``mark_prepared``), staying at most ``ahead`` jobs in front of the groups. ``HandoffLoader`` is a group
leader's ``StoreJobSource(handoff=...)``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from common.errors import InputError
from inference.render.pipeline import Renderer
from inference.render.producer import load_handoff, save_handoff
from inference.render.settings import GenerationSettings
from inference.render.spec import JobSpec
from inference.render.worker import RenderJob, StartupError
from service.jobs import INPUTS_DIRNAME, JobState, JobStore

logger = logging.getLogger(__name__)


class HandoffLoader:
    """A group leader's ``StoreJobSource(handoff=...)``: attach the producer's prepared conditioning to a
    claimed job and mark it rendering; a hand-off that does not read back fails the job with the reason."""

    def __init__(self, store: JobStore, device: torch.device) -> None:
        self.store = store
        self.device = device

    def __call__(self, job: RenderJob) -> RenderJob | None:
        try:
            prep, timings = load_handoff(job.spec, job.out_dir, self.device)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.store.set_state(
                job.job_id, JobState.FAILED, error=f"the producer's hand-off is unreadable: {exc}"
            )
            logger.warning("job %s: hand-off unreadable", job.job_id, exc_info=True)
            return None
        job.prepared, job.clip_index, job.prepared_on = prep, prep.start_clip, "producer"
        job.timings.update(timings)
        self.store.set_state(job.job_id, JobState.RENDERING)
        return job


class _Stopping(Exception):
    """The service is stopping: the producer abandons the job it is preparing."""


@dataclass(frozen=True)
class ProducerConfig:
    ahead: int = 1  # prepared jobs that may wait for a group (the hand-off bound)
    poll_s: float = 0.2


class Producer:
    """World rank 0's preparing thread (see the module docstring). ``renderer`` holds the front-half
    encoders (``Renderer(..., stages={"prepare"})``) on the producer's device."""

    def __init__(
        self, store: JobStore, renderer: Renderer, config: ProducerConfig = ProducerConfig()
    ) -> None:
        if config.ahead < 1:
            raise StartupError("--producer_ahead", f"must be at least 1, got {config.ahead}")
        self.store = store
        self.renderer = renderer
        self.config = config
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="producer", daemon=True)
        self.prepared = 0
        self.current: str | None = None
        self.last_beat: float | None = None

    def start(self) -> Producer:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the current stage; a job half prepared goes back to the queue, its attempt not counted."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)

    def placement(self) -> dict[str, Any]:
        """Where the producer runs and how far ahead it may prepare (for ``/api/info``)."""
        return {"device": str(self.renderer.config.device), "ahead": self.config.ahead}

    def status(self) -> dict[str, Any]:
        return {"device": str(self.renderer.config.device), "ahead": self.config.ahead, "current": self.current,
                "prepared": self.prepared, "alive": self._thread.is_alive(),
                "heartbeat_age_s": None if self.last_beat is None else round(time.time() - self.last_beat, 3)}  # fmt: skip

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self.last_beat = time.time()
            try:
                self.store.cancel_waiting_handoffs()
                if self.store.prepared_waiting() >= self.config.ahead:
                    job = None
                else:
                    job = self.store.claim_for_producer()
            except Exception:
                logger.warning("producer: the store did not answer", exc_info=True)
                job = None
            if job is None:
                self._stop.wait(self.config.poll_s)
                continue
            self._prepare(job.id, job.spec, job.settings)

    def _prepare(self, job_id: str, spec_json: dict[str, Any], settings_json: dict[str, Any]) -> None:
        self.current = job_id
        out_dir = self.store.job_dir(job_id)
        timings: dict[str, float] = {}

        def progress(percent: float, stage: str) -> None:
            self.last_beat = time.time()
            if self._stop.is_set():
                raise _Stopping
            self.store.update_progress(job_id, percent, f"{stage} (producer)")

        def timing(name: str, seconds: float) -> None:
            timings[name] = timings.get(name, 0.0) + seconds
            self.store.add_timing(job_id, name, seconds)

        try:
            spec = JobSpec.from_json(spec_json)
            settings = GenerationSettings.from_dict(settings_json)
            prep = self.renderer.prepare(spec, settings, out_dir / INPUTS_DIRNAME, out_dir, progress=progress,
                                         timing=timing)  # fmt: skip
            save_handoff(prep, timings)
            if not self.store.mark_prepared(job_id):
                logger.info("producer: job %s ended while it was prepared", job_id)
            else:
                self.prepared += 1
                logger.info("producer: job %s prepared (%d clip(s))", job_id, prep.num_clips)
        except _Stopping:
            self.store.requeue_after_shutdown(job_id)
        except InputError as exc:
            self._end(job_id, f"cannot prepare the job: {exc}")
        except Exception as exc:
            logger.error("producer: preparing job %s failed", job_id, exc_info=True)
            self._end(job_id, f"{type(exc).__name__}: {exc}")
        finally:
            self.current = None

    def _end(self, job_id: str, reason: str) -> None:
        try:
            cancelled = self.store.is_cancel_requested(job_id)
            self.store.set_state(job_id, JobState.CANCELLED if cancelled else JobState.FAILED, error=reason)
        except Exception:
            logger.error("producer: could not record the end of job %s", job_id, exc_info=True)
