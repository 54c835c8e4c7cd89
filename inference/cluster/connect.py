"""Joining a Ray cluster, or starting a local Ray instance when there is none.

``connect(RayOptions)``: with ``address`` (``RAY_ADDRESS``, e.g. ``auto`` on a node where ``ray start`` ran,
or ``ray://`` / ``host:6379``) this process joins that cluster as its driver; without one it starts a local
instance of ``num_cpus`` CPUs (and the GPUs torch sees), no dashboard, logs under a temporary folder, bound
to the loopback interface. Either way the call is bounded by ``start_timeout_s`` (on the main thread):
past it the start-up fails with a clear message instead of hanging.

Workers import this project by module name, so every job runs with ``PYTHONPATH`` set to the project root
(the same path on every node, beside the same weights).

``ray`` is imported here at module top; a local instance must be bound to loopback before that import
(``inference.cluster.loopback.prefer_loopback``), which the entry point calls first.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from common.errors import InputError

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_OWNED_TEMP: list[Path] = []


class ClusterError(InputError):
    """The Ray cluster cannot be reached or started; says what to check."""


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a local instance
    num_cpus: int = 2  # of a local instance
    num_gpus: int | None = None  # of a local instance; None: what torch sees
    temp_dir: Path | None = None  # Ray's session files and logs; None: a new folder under the system temp
    object_store_bytes: int | None = None  # of a local instance; None: Ray's default share of memory
    start_timeout_s: float = 120.0


@dataclass(frozen=True)
class ClusterInfo:
    address: str
    local: bool
    seconds: float  # how long joining or starting took
    nodes: int
    resources: dict[str, float]

    def describe(self) -> str:
        cpus, gpus = self.resources.get("CPU", 0), self.resources.get("GPU", 0)
        kind = "local Ray instance" if self.local else f"Ray cluster at {self.address}"
        return (
            f"{kind}: {self.nodes} node(s), {cpus:g} CPU(s), {gpus:g} GPU(s), joined in {self.seconds:.1f}s"
        )


def connect(options: RayOptions) -> ClusterInfo:
    """Join ``options.address`` or start a local instance (see the module docstring)."""
    if ray.is_initialized():
        raise ClusterError("ray", "this process is already connected to a Ray cluster")
    runtime_env = {"env_vars": {"PYTHONPATH": _pythonpath()}}
    kwargs: dict[str, Any] = {
        "runtime_env": runtime_env,
        "include_dashboard": False,
        "log_to_driver": True,
        "configure_logging": False,
    }
    local = not options.address
    if local:
        temp = options.temp_dir or Path(
            tempfile.mkdtemp(prefix="ray-")
        )  # short: Ray's socket paths are limited
        if options.temp_dir is None:
            _OWNED_TEMP.append(temp)  # removed again by disconnect()
        temp.mkdir(parents=True, exist_ok=True)
        # Ray starts its workers at nice 15; the actors are this service's ranks and run at the priority a
        # torchrun rank would (the same switch for `ray start`: RAY_worker_niceness=0).
        kwargs.update(num_cpus=options.num_cpus, _temp_dir=str(temp), _node_ip_address="127.0.0.1",
                      _system_config={"worker_niceness": 0})  # fmt: skip
        if options.num_gpus is not None:
            kwargs["num_gpus"] = options.num_gpus
        if options.object_store_bytes is not None:
            kwargs["object_store_memory"] = options.object_store_bytes
    else:
        kwargs["address"] = options.address
    where = "a local Ray instance" if local else f"the Ray cluster at {options.address}"
    t0 = time.monotonic()
    try:
        with _deadline(options.start_timeout_s):
            ray.init(**kwargs)
    except _StartTimeout:
        disconnect()
        raise ClusterError("ray", f"{where} did not answer within {options.start_timeout_s:.0f}s"
                           + ("" if local else " (is `ray start` running there, and RAY_ADDRESS right?)")) from None  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        raise ClusterError("ray", f"cannot start {where}: {type(exc).__name__}: {exc}") from None
    seconds = time.monotonic() - t0
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    info = ClusterInfo(options.address or "local", local, seconds, len(nodes), dict(ray.cluster_resources()))
    logger.info("%s", info.describe())
    return info


class _StartTimeout(Exception):
    pass


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise ``_StartTimeout`` in the main thread after ``seconds`` (SIGALRM). Ray must start on a thread
    that lives on: the processes a local instance starts die with the thread that started them
    (``PR_SET_PDEATHSIG``), so ``ray.init`` cannot run on a helper thread. Off the main thread Ray's own
    timeouts bound it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise _StartTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def disconnect() -> None:
    """Leave the cluster (a local instance stops) and remove the temporary folder connect() made."""
    if ray.is_initialized():
        ray.shutdown()
    while _OWNED_TEMP:
        folder = _OWNED_TEMP.pop()
        for _ in range(4):  # Ray's daemons may still write a log line while they exit
            shutil.rmtree(folder, ignore_errors=True)
            time.sleep(0.5)
            if not folder.exists():
                break


def _pythonpath() -> str:
    parts = [str(PROJECT_ROOT)]
    extra = os.environ.get("PYTHONPATH")
    if extra:
        parts += [p for p in extra.split(os.pathsep) if p and p != str(PROJECT_ROOT)]
    return os.pathsep.join(parts)
