"""Voice previews off the API's threads: a bounded queue, a small pool of its own, a rate per client.

A preview runs Kokoro in the web process (a second or more of CPU/GPU). Run on the API's thread pool
behind a lock, sixty concurrent previews held every worker thread waiting on that lock and starved
``/api/jobs`` and ``/api/health``. Here a preview is a task for ``PreviewPool``'s own ``workers``
threads; at most ``max_waiting`` more may wait, and each client may start ``per_client_per_minute``
previews a minute. The REST route awaits the task's future (no API thread is held while it runs or
waits); anything over a bound is refused at once with ``RateLimitedError`` (429 with Retry-After).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from service.security import RateLimitedError, RateLimiter

logger = logging.getLogger(__name__)

Speak = Callable[[str, str | None], bytes]
"""``speak(voice_id, text_or_None) -> WAV bytes``; raises InputError on bad input."""


@dataclass(frozen=True)
class PreviewLimits:
    """``workers``: previews spoken at once; ``max_waiting``: queued behind them; ``per_client_per_minute``:
    previews one client (address) may start per minute (burst: the same number)."""

    workers: int = 1
    max_waiting: int = 4
    per_client_per_minute: int = 12

    def __post_init__(self) -> None:
        if self.workers < 1 or self.max_waiting < 0 or self.per_client_per_minute < 1:
            raise ValueError(f"preview limits must be positive: {self}")


class PreviewPool:
    """``speak`` behind a bounded queue and its own ``limits.workers`` threads."""

    def __init__(self, speak: Speak, limits: PreviewLimits = PreviewLimits()) -> None:
        self.limits = limits
        self._speak = speak
        self._executor = concurrent.futures.ThreadPoolExecutor(limits.workers, thread_name_prefix="preview")
        self._slots = threading.BoundedSemaphore(limits.workers + limits.max_waiting)
        self._rate = RateLimiter(limits.per_client_per_minute, 60.0)

    def submit(
        self, voice: str, text: str | None, client: str | None = None
    ) -> concurrent.futures.Future[bytes]:
        """Queue one preview; ``client`` (an address) is rate limited, None is not (the UI's own queue
        already bounds it). Raises ``RateLimitedError`` when the client is over its rate or the queue
        is full."""
        if client is not None:
            self._rate.take(client, "voice previews")
        if not self._slots.acquire(blocking=False):
            raise RateLimitedError(
                f"voice previews are busy ({self.limits.workers} speaking, {self.limits.max_waiting} waiting); "
                "try again in a few seconds",
                retry_after_s=5,
            )
        try:
            future = self._executor.submit(self._speak, voice, text)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _f: self._slots.release())
        return future

    async def speak_async(self, voice: str, text: str | None, client: str | None) -> bytes:
        """Await one preview without holding a thread of the caller's pool."""
        return await asyncio.wrap_future(self.submit(voice, text, client))

    def __call__(self, voice: str, text: str | None) -> bytes:
        """Blocking form (``speak``'s signature), for the UI: same pool, same queue bound."""
        return self.submit(voice, text).result()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
