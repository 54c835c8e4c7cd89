"""Hung-peer detection: a deadline on every exchange that waits for other ranks.

A rank that is stopped (SIGSTOP, a wedged driver, a swapped-out host) does not close its sockets, so
its peers wait inside a collective until the process group's own timeout (minutes) runs out. The
``Watchdog`` bounds that wait. The engine arms it around each exchange with the other ranks and
re-arms it at every sign of progress inside a job (each model pass and each step boundary); when a
deadline passes, the watchdog logs what hung and ends the process with ``EXIT_HUNG``. A half-issued
collective cannot be resynchronised, so this is the same crash-only exit as any other failure inside
the collective region: torchrun stops the other ranks and restarts the group, and the job store
re-queues the interrupted job.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

EXIT_HUNG = 75  # EX_TEMPFAIL: the group should be restarted, the job retried
DEFAULT_REPLY_S = 60.0  # a peer that waits on the control group answers a heartbeat within this
DEFAULT_STALL_S = 120.0  # a job makes progress (a model pass, a step) at least this often


def exit_hung(message: str) -> None:
    """Log ``message`` as critical, flush the log handlers and end the process with ``EXIT_HUNG``."""
    logger.critical(message)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # a broken handler must not keep a hung process alive
            pass
    os._exit(EXIT_HUNG)


class Watchdog:
    """One deadline at a time, checked by a daemon thread.

    ``guard(what, limit_s)`` arms it for the duration of a block; ``beat()`` pushes the deadline
    ``limit_s`` further (progress inside a guarded block). When the deadline passes,
    ``on_expire(message)`` runs once on the watchdog thread (default: ``exit_hung``).
    """

    def __init__(
        self,
        rank: int,
        on_expire: Callable[[str], None] = exit_hung,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rank = rank
        self._on_expire = on_expire
        self._clock = clock
        self._cond = threading.Condition()
        self._what: str | None = None
        self._limit = 0.0
        self._armed_at = 0.0
        self._deadline = math.inf
        self._thread: threading.Thread | None = None

    @contextmanager
    def guard(self, what: str, limit_s: float) -> Iterator[None]:
        self.arm(what, limit_s)
        try:
            yield
        finally:
            self.disarm()

    def arm(self, what: str, limit_s: float) -> None:
        with self._cond:
            now = self._clock()
            self._what, self._limit, self._armed_at = what, float(limit_s), now
            self._deadline = now + self._limit
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name=f"watchdog-rank{self.rank}", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def beat(self, limit_s: float | None = None) -> None:
        """Progress: the deadline moves to now + ``limit_s`` (default: the armed limit)."""
        with self._cond:
            if self._what is None:
                return
            if limit_s is not None:
                self._limit = float(limit_s)
            self._deadline = self._clock() + self._limit
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._what, self._deadline = None, math.inf
            self._cond.notify()

    def _watch(self) -> None:
        while True:
            with self._cond:
                while self._what is None or self._clock() < self._deadline:
                    timeout = None if self._what is None else max(0.0, self._deadline - self._clock())
                    self._cond.wait(timeout)
                what, limit, since = self._what, self._limit, self._clock() - self._armed_at
                self._what, self._deadline = None, math.inf
            self._on_expire(
                f"rank {self.rank}: {what} made no progress for {limit:.3g} s ({since:.1f} s since it began); "
                f"a peer rank is hung or gone. Exiting with code {EXIT_HUNG} so that the group restarts "
                "and the job is retried."
            )
