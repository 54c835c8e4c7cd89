"""A group leader's background finisher: the last clip of a job is decoded and muxed off the main thread.

When a job's last clip comes back from the denoising ranks, the leader's main thread hands the latent to
the ``Finisher`` and goes straight back to the engine loop, so the group's other ranks start the next
job's first clip while this thread decodes (VAE), colour-corrects, muxes the mp4 and writes the side files
and ``stats.json``. The thread never touches ``torch.distributed``: every collective stays on the main
thread (see ``docs/architecture.md``).

The VAE keeps its causal caches on the module object, so the finisher decodes through its own handle
on the same weights (``renderer_for_thread``: no second copy of the weights). A job that needs more
clips after all (a spilled clip damaged on disk) comes back through ``returned``, which the group's job
source serves before its queue (``wrap_source``).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from inference.render.pipeline import Renderer

logger = logging.getLogger(__name__)

# (job, clip, latent [16, T_lat, h, w]) -> a job that needs more clips, or None when it ended.
FinishFn = Callable[[Any, Any, torch.Tensor, Renderer], Any]
FailFn = Callable[[Any, str], None]


def renderer_for_thread(renderer: Renderer) -> Renderer:
    """A shallow copy of ``renderer`` whose VAE is a second handle on the same weights with its own causal
    caches (diffusers keeps them on the top-level module), so two threads can run the VAE at once."""
    twin = copy.copy(renderer)
    vae = renderer.vae
    if vae is not None:
        twin_vae = copy.copy(vae)
        twin_vae.model = copy.copy(vae.model)  # shares submodules and parameters, not the cache attributes
        twin.vae = twin_vae
    return twin


class Finisher:
    """One daemon thread that runs ``finish(job, clip, latent, renderer)`` for each submitted job, in order.

    At most ``max_pending`` jobs wait; ``submit`` blocks beyond that (back-pressure instead of memory
    growth). ``fail(job, reason)`` is called when ``finish`` raises.
    """

    def __init__(self, renderer: Renderer, finish: FinishFn, fail: FailFn, *, max_pending: int = 2) -> None:
        self.renderer = renderer_for_thread(renderer)
        self._finish = finish
        self._fail = fail
        self._jobs: queue.Queue[tuple[Any, Any, torch.Tensor] | None] = queue.Queue(maxsize=max_pending)
        self.returned: queue.Queue[Any] = queue.Queue()
        self._busy = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._loop, name="finisher", daemon=True)
        self._thread.start()

    def rebind(self, finish: FinishFn, fail: FailFn) -> None:
        """Report to another worker from now on (a runtime's later engine); waits for pending jobs first."""
        self.drain()
        self._finish, self._fail = finish, fail

    def submit(self, job: Any, clip: Any, latent: torch.Tensor) -> None:
        with self._lock:
            self._busy += 1
        self._jobs.put((job, clip, latent.detach()))

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet finished."""
        with self._lock:
            return self._busy

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted job is finished; False when ``timeout_s`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout=timeout_s)

    def close(self, timeout_s: float | None = None) -> bool:
        """Finish what was submitted, then stop the thread. True when it stopped in time."""
        finished = self.drain(timeout_s)
        self._jobs.put(None)
        self._thread.join(timeout=timeout_s)
        return finished and not self._thread.is_alive()

    def wrap_source(self, source: Callable[[float], Any] | None) -> Callable[[float], Any] | None:
        """The group's job source with the jobs that came back (more clips to render) served first."""
        if source is None:
            return None

        def poll(timeout_s: float) -> Any:
            try:
                return self.returned.get_nowait()
            except queue.Empty:
                return source(timeout_s)

        return poll

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # grad mode is per thread
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, clip, latent = item
            try:
                again = self._finish(job, clip, latent, self.renderer)
                if again is not None:
                    self.returned.put(again)
            except Exception as exc:
                logger.error("finishing job %s failed", getattr(job, "job_id", "?"), exc_info=True)
                try:
                    self._fail(job, f"{type(exc).__name__}: {exc}")
                except Exception:
                    logger.error("reporting the failure of a finished job failed", exc_info=True)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()
