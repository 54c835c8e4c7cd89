"""Process plumbing: this rank's place in the job, its process groups, and start-up layout checks.

``ParallelContext`` holds the rank, the device, a long-timeout gloo *control* group for messages, a
short-timeout *data* group for tensors and a device mesh for FSDP2.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from inference.model.sp import NoParallel, SequenceParallelism
from inference.parallel.layout import ParallelConfigError
from inference.parallel.ulysses import SequenceParallel

logger = logging.getLogger(__name__)


DEFAULT_CONTROL_TIMEOUT = timedelta(minutes=30)
DEFAULT_DATA_TIMEOUT = timedelta(minutes=5)


def _as_timedelta(t: timedelta | float) -> timedelta:
    return t if isinstance(t, timedelta) else timedelta(seconds=float(t))


def _env_int(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name)
    if raw is None:
        raise ParallelConfigError(name, "missing from the environment; launch with torchrun")
    try:
        return int(raw)
    except ValueError:
        raise ParallelConfigError(name, f"must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the job: rank, device and the two process groups.

    ``data`` (the default group: NCCL on CUDA, gloo on CPU) carries tensors with a short timeout;
    ``control`` (gloo) carries pickled messages with a long one, so idle ranks wait there and never
    inside a data collective. ``mesh`` is a 1-D device mesh over ``data`` for FSDP2. With one process
    (``single()``) all three are None and torch.distributed is never initialised.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    control: ProcessGroup | None = None
    data: ProcessGroup | None = None
    mesh: DeviceMesh | None = None
    control_timeout: timedelta = DEFAULT_CONTROL_TIMEOUT
    data_timeout: timedelta = DEFAULT_DATA_TIMEOUT

    @property
    def distributed(self) -> bool:
        return self.control is not None

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device | str | None = None) -> ParallelContext:
        """One process, no torch.distributed; ``device`` defaults to cuda:0 when available, else cpu."""
        dev = torch.device(device) if device is not None else _default_device(0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return cls(device=dev)

    @classmethod
    def from_env(
        cls,
        *,
        device: torch.device | str | None = None,
        data_timeout: timedelta | float = DEFAULT_DATA_TIMEOUT,
        control_timeout: timedelta | float = DEFAULT_CONTROL_TIMEOUT,
        environ: Mapping[str, str] | None = None,
    ) -> ParallelContext:
        """Join the job torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

        Without WORLD_SIZE, or with WORLD_SIZE=1, returns ``single(device)``. Timeouts are timedeltas
        or seconds. ``device`` defaults to ``cuda:LOCAL_RANK`` when CUDA is available, else cpu; pass
        "cpu" to use gloo for data on a GPU host.
        """
        env = os.environ if environ is None else environ
        if int(env.get("WORLD_SIZE", "1") or "1") == 1:
            return cls.single(device)
        rank, world_size = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        local_rank = int(env.get("LOCAL_RANK", rank))
        if not 0 <= rank < world_size:
            raise ParallelConfigError("RANK", f"must be in [0, {world_size}), got {rank}")
        addr = env.get("MASTER_ADDR")
        if not addr:
            raise ParallelConfigError("MASTER_ADDR", "missing from the environment; launch with torchrun")
        port = _env_int(env, "MASTER_PORT")
        dev = torch.device(device) if device is not None else _default_device(local_rank)
        data_to, ctrl_to = _as_timedelta(data_timeout), _as_timedelta(control_timeout)

        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # Our own store with the long timeout: rendezvous must not inherit the short data timeout,
        # since ranks start seconds apart (imports, weight loading). Under torchrun the agent hosts
        # the store and every worker is a client (as torch's env:// handler does).
        agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            addr,
            port,
            world_size,
            is_master=rank == 0 and not agent_store,
            timeout=ctrl_to,
            multi_tenant=True,
        )
        # The agent's store outlives a restart (--max-restarts): keep each attempt's keys apart, or
        # the new ranks would read the previous attempt's gloo addresses.
        store = dist.PrefixStore(
            f"parallel_context/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store
        )
        store.set(f"arrived/{rank}", "1")
        store.wait([f"arrived/{r}" for r in range(world_size)], ctrl_to)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=data_to,
            device_id=dev if dev.type == "cuda" else None,
        )
        control = dist.new_group(backend="gloo", timeout=ctrl_to)
        data = dist.group.WORLD
        # A 1-D mesh over all ranks reuses the default (data) group rather than creating one.
        mesh = init_device_mesh(dev.type, (world_size,), mesh_dim_names=("sp",))
        logger.info(
            "rank %d/%d on %s: data=%s (timeout %s), control=gloo (timeout %s)",
            rank,
            world_size,
            dev,
            backend,
            data_to,
            ctrl_to,
        )
        return cls(rank, local_rank, world_size, dev, control, data, mesh, ctrl_to, data_to)

    def sequence_parallel(self) -> SequenceParallelism:
        """The ``sp`` object for the model: ``NoParallel`` for one process, else Ulysses on ``data``."""
        if not self.distributed:
            return NoParallel()
        return SequenceParallel(self.data, self.world_size, self.rank)

    def barrier(self, timeout: timedelta | float = timedelta(minutes=10)) -> None:
        """Barrier on the control group that names the ranks that did not arrive (gloo only)."""
        if self.distributed:
            dist.monitored_barrier(group=self.control, timeout=_as_timedelta(timeout), wait_all_ranks=True)

    def destroy(self, join_timeout_s: float = 5.0, barrier: bool = True) -> bool:
        """Leave the job: optional control barrier, then destroy every group.

        Runs in a daemon thread joined for ``join_timeout_s`` because both steps can hang when a peer
        is already gone. Returns True if teardown finished in time.
        """
        if not self.distributed or not dist.is_initialized():
            return True

        def teardown() -> None:
            try:
                if barrier:
                    dist.barrier(group=self.control)
                dist.destroy_process_group()
            except Exception:  # a peer that is gone makes teardown fail; nothing left to protect
                logger.warning("rank %d: process-group teardown failed", self.rank, exc_info=True)

        thread = threading.Thread(target=teardown, name="pg-teardown", daemon=True)
        thread.start()
        thread.join(join_timeout_s)
        if thread.is_alive():
            logger.warning(
                "rank %d: process-group teardown still running after %.1fs", self.rank, join_timeout_s
            )
            return False
        return True


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")
