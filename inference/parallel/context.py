"""Process plumbing: this rank's place in the job, its process groups, and start-up layout checks.

``ParallelContext`` holds the rank, the device, a long-timeout gloo *control* group for messages, a
short-timeout *data* group for tensors, a device mesh for FSDP2 and the ranks' ``ParallelLayout``
(guidance groups x ring x Ulysses) with one process group per sub-group of it.
"""

from __future__ import annotations

import dataclasses
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
from inference.parallel.cfg import GuidanceParallel
from inference.parallel.layout import ParallelConfigError, ParallelLayout
from inference.parallel.ring import UnifiedSequenceParallel
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
    inside a data collective. ``mesh`` is a 1-D device mesh for FSDP2 over the ranks that share a
    forward (all ranks, or this rank's guidance group). With one process (``single()``) all three are
    None and torch.distributed is never initialised.

    ``layout`` splits the ranks (``with_layout``); ``sp_group`` spans this rank's guidance group (the
    ranks of one forward), ``ulysses_group`` its all-to-all ranks, ``ring_group`` the ranks its
    key/value blocks visit and ``cfg_group`` the ranks at the same place in every guidance group.
    Each is None where the layout has no such split.
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
    layout: ParallelLayout | None = None
    sp_group: ProcessGroup | None = None
    ulysses_group: ProcessGroup | None = None
    ring_group: ProcessGroup | None = None
    cfg_group: ProcessGroup | None = None
    # Replica groups (``inference.parallel.groups``): the world ranks of every group, and this context's
    # group. A group's context has the group's rank, size and process groups; () means no split.
    replica_ranks: tuple[tuple[int, ...], ...] = ()
    group_index: int = 0

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
        layout: ParallelLayout | None = None,
    ) -> ParallelContext:
        """Join the job torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

        Without WORLD_SIZE, or with WORLD_SIZE=1, returns ``single(device)``. Timeouts are timedeltas
        or seconds. ``device`` defaults to ``cuda:LOCAL_RANK`` when CUDA is available, else cpu; pass
        "cpu" to use gloo for data on a GPU host. ``layout`` (default: Ulysses over every rank) is
        applied with ``with_layout``.
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
        ctx = cls(rank, local_rank, world_size, dev, control, data, mesh, ctrl_to, data_to)
        return ctx.with_layout(layout) if layout is not None else ctx

    def with_layout(self, layout: ParallelLayout) -> ParallelContext:
        """This context with ``layout``'s process groups. Every rank must call it with the same layout.

        The groups are created in one fixed order on every rank (as ``new_group`` requires): guidance
        groups, Ulysses groups, ring groups, then the groups across guidance groups; a split of size
        one creates nothing. With guidance groups, FSDP2 shards inside each group (``mesh``), since
        the groups run different numbers of forwards.
        """
        if layout.world_size != self.world_size:
            raise ParallelConfigError(
                "layout",
                f"{layout.describe()} needs {layout.world_size} processes, the job has {self.world_size}",
            )
        if not self.distributed:
            return dataclasses.replace(self, layout=layout)
        timeout = self.data_timeout
        sp_group = self._subgroup(layout.sp_groups(), timeout) if layout.cfg > 1 else self.data
        ulysses_group = sp_group if layout.ring == 1 else None
        ring_group = sp_group if layout.ulysses == 1 and layout.ring > 1 else None
        if layout.ring > 1 and layout.ulysses > 1:
            ulysses_group = self._subgroup(layout.ulysses_groups(), timeout)
            ring_group = self._subgroup(layout.ring_groups(), timeout)
        cfg_group = self._subgroup(layout.cfg_groups(), timeout) if layout.cfg > 1 else None
        mesh = self.mesh
        if layout.cfg > 1:
            mesh = DeviceMesh.from_group(sp_group, self.device.type, mesh_dim_names=("sp",))
        logger.info(
            "rank %d: layout %s (coordinates %s)", self.rank, layout.describe(), layout.coords(self.rank)
        )
        return dataclasses.replace(
            self,
            layout=layout,
            mesh=mesh,
            sp_group=sp_group,
            ulysses_group=ulysses_group,
            ring_group=ring_group,
            cfg_group=cfg_group,
        )

    def _subgroup(self, groups: list[list[int]], timeout: timedelta) -> ProcessGroup:
        """Create every group in ``groups`` (all ranks, same order); return the one holding this rank.

        ``groups`` holds this context's ranks; in a replica group they are mapped to world ranks, and the
        same split is created for every replica group (``new_group`` needs every world rank to call it)."""
        replicas = self.replica_ranks or (tuple(range(self.world_size)),)
        mine = None
        for index, members in enumerate(replicas):
            for ranks in groups:
                group = dist.new_group([members[r] for r in ranks], timeout=timeout)
                if index == self.group_index and self.rank in ranks:
                    mine = group
        if mine is None:
            raise RuntimeError(f"rank {self.rank} is in none of the groups {groups}")
        return mine

    @property
    def parallel_layout(self) -> ParallelLayout:
        """The layout in use: the one given to ``with_layout``, else Ulysses over every rank."""
        return self.layout if self.layout is not None else ParallelLayout(ulysses=self.world_size)

    def sequence_parallel(self) -> SequenceParallelism:
        """The ``sp`` object for the model: ``NoParallel`` for one process, else Ulysses (ring size 1)
        or Ulysses x ring over this rank's guidance group."""
        layout = self.parallel_layout
        if not self.distributed or layout.sp_size == 1:
            return NoParallel()
        group = self.sp_group if self.sp_group is not None else self.data
        _, ring_rank, ulysses_rank = layout.coords(self.rank)
        sp_rank = ring_rank * layout.ulysses + ulysses_rank
        if layout.ring == 1:
            return SequenceParallel(group, layout.sp_size, sp_rank)
        return UnifiedSequenceParallel(
            group, self.ulysses_group, self.ring_group, layout.ulysses, layout.ring, sp_rank
        )

    def guidance_parallel(self) -> GuidanceParallel | None:
        """The guidance-branch split for the sampler (``--cfg_parallel``), or None without one."""
        layout = self.parallel_layout
        if not self.distributed or layout.cfg == 1:
            return None
        return GuidanceParallel(self.cfg_group, layout.cfg, layout.coords(self.rank)[0])

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
