"""Spawn gloo ranks on 127.0.0.1 for tests, without torchrun.

``run_spmd(fn, world_size, *args)`` starts ``world_size`` spawned processes, each of which builds a
``ParallelContext`` from a torchrun-like environment (free port, gloo on CPU, short timeouts),
calls ``fn(ctx, *args)`` and sends its return value (or traceback) back through a queue. The
parent enforces a hard deadline and kills survivors, so a distributed bug fails instead of hanging.
``fn`` must be a module-level function (it is pickled into the children).

Inside a rank, ``post(tag, value)`` sends a message to the parent (``SpmdRun.wait_for``), e.g. to
say "ready, you may signal me now".
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

_CHANNEL: tuple[Any, int] | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(tag: str, value: Any = None) -> None:
    """From inside a rank: send ``(tag, value)`` to the parent."""
    if _CHANNEL is None:
        raise RuntimeError("post() only works inside a rank started by dist_harness")
    q, rank = _CHANNEL
    q.put(("post", rank, (tag, pickle.dumps(value))))


@dataclass
class RankOutcome:
    rank: int
    exitcode: int | None  # None: still running at the deadline (killed)
    value: Any = None
    error: str | None = None  # traceback text if fn raised

    @property
    def hung(self) -> bool:
        return self.exitcode is None


def _child(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    q: Any,
    data_timeout_s: float,
    control_timeout_s: float,
) -> None:
    global _CHANNEL
    _CHANNEL = (q, rank)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)
    from inference.parallel.context import ParallelContext

    code = 0
    try:
        ctx = ParallelContext.from_env(
            device="cpu", data_timeout=data_timeout_s, control_timeout=control_timeout_s
        )
        value = fn(ctx, *args)
        # Plain pickle copies tensor data; the queue's own pickler would share it through file
        # descriptors that die with this process.
        q.put(("result", rank, pickle.dumps(value)))
        ctx.destroy(join_timeout_s=5.0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        q.put(("error", rank, f"SystemExit({exc.code})"))
    except BaseException:
        code = 1
        q.put(("error", rank, traceback.format_exc()))
    # Flush the queue's feeder thread, then leave without running interpreter teardown (a process
    # group whose peer is gone can block it).
    q.close()
    q.join_thread()
    os._exit(code)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class SpmdRun:
    """Handle on a set of running ranks."""

    def __init__(
        self,
        fn: Callable[..., Any],
        world_size: int,
        args: tuple[Any, ...],
        data_timeout_s: float,
        control_timeout_s: float,
    ) -> None:
        spawn = mp.get_context("spawn")
        self.world_size = world_size
        self.queue = spawn.Queue()
        self.started = time.monotonic()
        self._values: dict[int, Any] = {}
        self._errors: dict[int, str] = {}
        self._posts: list[tuple[int, str, Any]] = []
        self._killed: set[int] = set()
        port = free_port()
        # One intra-op thread per rank: CI has 2 cores shared by everyone.
        with _env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"):
            self.procs = [
                spawn.Process(
                    target=_child,
                    args=(r, world_size, port, fn, args, self.queue, data_timeout_s, control_timeout_s),
                    name=f"rank{r}",
                    daemon=True,
                )
                for r in range(world_size)
            ]
            for p in self.procs:
                p.start()

    def _drain(self, timeout_s: float) -> bool:
        try:
            kind, rank, payload = self.queue.get(timeout=timeout_s)
        except queue.Empty:
            return False
        if kind == "result":
            self._values[rank] = pickle.loads(payload)
        elif kind == "error":
            self._errors[rank] = payload
        else:
            tag, value = payload
            self._posts.append((rank, tag, pickle.loads(value)))
        return True

    def wait_for(self, tag: str, rank: int = 0, timeout_s: float = 30.0) -> Any:
        """Wait until ``rank`` posts ``tag``; return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            for i, (r, t, v) in enumerate(self._posts):
                if r == rank and t == tag:
                    del self._posts[i]
                    return v
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"rank {rank} did not post {tag!r} within {timeout_s}s; errors: {self._errors}"
                )
            self._drain(0.1)

    def join(self, timeout_s: float) -> list[RankOutcome]:
        """Wait for every rank until the deadline, kill survivors, return one outcome per rank."""
        deadline = time.monotonic() + timeout_s
        while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            self._drain(0.1)
        self.kill()
        while self._drain(0.2):
            pass
        return [
            RankOutcome(
                r, None if r in self._killed else p.exitcode, self._values.get(r), self._errors.get(r)
            )
            for r, p in enumerate(self.procs)
        ]

    def kill(self) -> None:
        for r, p in enumerate(self.procs):
            if p.is_alive():
                p.kill()
                self._killed.add(r)
        for p in self.procs:
            p.join(5)


def start_spmd(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    data_timeout_s: float = 30.0,
    control_timeout_s: float = 60.0,
) -> SpmdRun:
    """Start ``world_size`` ranks running ``fn(ctx, *args)``; see ``SpmdRun``."""
    return SpmdRun(fn, world_size, args, data_timeout_s, control_timeout_s)


def run_spmd(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 90.0,
    data_timeout_s: float = 30.0,
    control_timeout_s: float = 60.0,
) -> list[Any]:
    """Run ``fn(ctx, *args)`` on every rank; return the values by rank. Fails if any rank failed or hung."""
    outcomes = start_spmd(
        fn, world_size, *args, data_timeout_s=data_timeout_s, control_timeout_s=control_timeout_s
    ).join(timeout_s)
    bad = [o for o in outcomes if o.exitcode != 0 or o.error is not None]
    if bad:
        lines = []
        for o in bad:
            state = "hung (killed at the deadline)" if o.hung else f"exit code {o.exitcode}"
            lines.append(f"rank {o.rank}: {state}\n{o.error or ''}")
        raise AssertionError("distributed run failed:\n" + "\n".join(lines))
    return [o.value for o in outcomes]
