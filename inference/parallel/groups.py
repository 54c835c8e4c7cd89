"""Replica groups: the ranks of one world split into R groups of G ranks, each group serving its own jobs.

A *replica group* is what one job runs on. It has its own ``ParallelContext`` whose ``rank``,
``world_size``, control and data process groups, Ulysses/ring/guidance sub-groups and FSDP mesh are the
group's own (rank 0 of that context is the group's *leader*), so the engine loop, the sampler and the
model run inside a group exactly as they run over a whole world. A ``ReplicaGroup`` says which group it
is, which ranks of the world it holds and on which devices.

Two ways to form a group, one code path after that:

- torchrun: ``join_replica_group(world, plan, layout)`` splits the P ranks of the world into
  ``plan.replicas`` groups of consecutive ranks (``--replicas R``; group g holds ranks g*G .. g*G + G - 1).
  Every world rank creates every group's process groups in the same order, as ``new_group`` requires.
- a gang formed elsewhere (G Ray actors that initialised ``torch.distributed`` among themselves): their
  world *is* the group: ``ParallelContext.from_env(layout=...)`` (or ``single``) and
  ``ReplicaGroup(index, count, ranks, devices, node)``.

Then ``Runtime.start(options, joined=(ctx, group))`` loads the model for the group and
``Runtime.make_engine(sink, source)`` gives the group's engine loop: its job source (a callable
``source(timeout_s) -> RenderJob | None``) and sink are inputs, only the leader has them.

A group of one rank needs no process group at all: its context is a single-process context (no
collectives, no watchdog), as ``python distributed_app.py`` runs today.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from inference.parallel.context import ParallelContext
from inference.parallel.layout import ParallelConfigError, ParallelLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaPlan:
    """``replicas`` groups of ``world_size // replicas`` consecutive ranks."""

    world_size: int
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ParallelConfigError("WORLD_SIZE", f"must be at least 1, got {self.world_size}")
        if self.replicas < 1:
            raise ParallelConfigError("replicas", f"must be at least 1, got {self.replicas}")
        if self.replicas > self.world_size:
            raise ParallelConfigError(
                "replicas",
                f"{self.replicas} groups need at least {self.replicas} processes, the job has {self.world_size} "
                "(torchrun --nproc-per-node)",
            )
        if self.world_size % self.replicas:
            divisors = [r for r in range(1, self.world_size + 1) if self.world_size % r == 0]
            raise ParallelConfigError(
                "replicas",
                f"{self.replicas} does not divide the {self.world_size} processes into equal groups; "
                f"allowed: {divisors}",
            )

    @property
    def group_size(self) -> int:
        return self.world_size // self.replicas

    def ranks(self, index: int) -> tuple[int, ...]:
        """World ranks of group ``index`` (its leader first)."""
        if not 0 <= index < self.replicas:
            raise ValueError(f"group {index} outside {self.replicas} groups")
        g = self.group_size
        return tuple(range(index * g, (index + 1) * g))

    def group_of(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        return rank // self.group_size

    def all_ranks(self) -> tuple[tuple[int, ...], ...]:
        return tuple(self.ranks(i) for i in range(self.replicas))


@dataclass(frozen=True)
class ReplicaGroup:
    """One replica group as the service reports it: ``index`` of ``count`` groups, its world ``ranks``
    (leader first), one device per rank, and the host it runs on."""

    index: int = 0
    count: int = 1
    ranks: tuple[int, ...] = (0,)
    devices: tuple[str, ...] = ("cpu",)
    node: str = ""

    def __post_init__(self) -> None:
        if not self.ranks or len(self.ranks) != len(self.devices):
            raise ValueError(f"a group needs one device per rank, got ranks {self.ranks} and {self.devices}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"group {self.index} outside {self.count} groups")

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def leader_rank(self) -> int:
        return self.ranks[0]

    def label(self) -> str:
        """``group 1 (ranks 2,3 on cuda:2,cuda:3)``."""
        devices = sorted(set(self.devices), key=self.devices.index)
        ranks = ",".join(map(str, self.ranks))
        where = f" on {self.node}" if self.node else ""
        return (
            f"group {self.index} (rank{'s' if self.size > 1 else ''} {ranks} on {','.join(devices)}{where})"
        )

    def to_json(self) -> dict[str, Any]:
        return {"group": self.index, "groups": self.count, "ranks": list(self.ranks),
                "devices": list(self.devices), "node": self.node}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplicaGroup:
        return cls(int(data["group"]), int(data["groups"]), tuple(int(r) for r in data["ranks"]),
                   tuple(str(d) for d in data["devices"]), str(data.get("node", "")))  # fmt: skip


def gather_devices(world: ParallelContext) -> tuple[str, ...]:
    """Every world rank's device, in rank order (one ``all_gather_object`` on the control group)."""
    mine = str(world.device)
    if not world.distributed:
        return (mine,)
    devices: list[Any] = [None] * world.world_size
    dist.all_gather_object(devices, mine, group=world.control)
    return tuple(str(d) for d in devices)


def join_replica_group(
    world: ParallelContext, plan: ReplicaPlan, layout: ParallelLayout
) -> tuple[ParallelContext, ReplicaGroup, tuple[ReplicaGroup, ...]]:
    """Split ``world`` (a context without a layout) into ``plan``'s groups, each with ``layout``.

    Collective over the whole world: every rank calls it with the same plan and layout. Returns this
    rank's group context (group rank, size and process groups), its ``ReplicaGroup`` and every group.
    With one group the context is ``world.with_layout(layout)``, exactly as without replicas.
    """
    if plan.world_size != world.world_size:
        raise ParallelConfigError(
            "replicas", f"the plan is for {plan.world_size} processes, the job has {world.world_size}"
        )
    if layout.world_size != plan.group_size:
        raise ParallelConfigError(
            "ulysses_size",
            f"{layout.describe()} needs {layout.world_size} processes per group, a group has {plan.group_size} "
            f"({world.world_size} processes / --replicas {plan.replicas})",
        )
    devices = gather_devices(world)
    node = socket.gethostname()
    groups = tuple(
        ReplicaGroup(i, plan.replicas, ranks, tuple(devices[r] for r in ranks), node)
        for i, ranks in enumerate(plan.all_ranks())
    )
    mine = groups[plan.group_of(world.rank)]
    if plan.replicas == 1:
        return world.with_layout(layout), mine, groups
    local = world.rank - mine.leader_rank
    if plan.group_size == 1:
        # No peers: a single-process context (no collectives); the world's groups stay for the teardown.
        ctx = dataclasses.replace(world, rank=0, world_size=1, control=None, data=None, mesh=None,
                                  replica_ranks=plan.all_ranks(), group_index=mine.index)  # fmt: skip
        return ctx.with_layout(layout), mine, groups
    control = data = None
    for group in groups:  # every rank creates every group, in the same order
        ctl = dist.new_group(list(group.ranks), timeout=world.control_timeout, backend="gloo")
        dat = dist.new_group(list(group.ranks), timeout=world.data_timeout)
        if group is mine:
            control, data = ctl, dat
    assert control is not None and data is not None
    mesh = DeviceMesh.from_group(data, world.device.type, mesh_dim_names=("sp",))
    ctx = dataclasses.replace(
        world, rank=local, world_size=plan.group_size, control=control, data=data, mesh=mesh,
        replica_ranks=plan.all_ranks(), group_index=mine.index,
    )  # fmt: skip
    logger.info("world rank %d: %s, group rank %d", world.rank, mine.label(), local)
    return ctx.with_layout(layout), mine, groups


def describe_placement(groups: Sequence[ReplicaGroup], stages: dict[str, str]) -> str:
    """The start-up placement table: every group with its ranks and devices, then each named stage
    (``{"prepare": "each group's leader", ...}``)."""
    lines = [f"placement: {len(groups)} replica group(s) of {groups[0].size} rank(s)"]
    for g in groups:
        lines.append(
            f"  {g.label()}: denoise on every rank, clip conditioning + decode + mux on rank {g.leader_rank}"
        )
    for stage, where in stages.items():
        lines.append(f"  {stage}: {where}")
    return "\n".join(lines)
