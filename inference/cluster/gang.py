"""A gang: G Ray actors, one per GPU (or per CPU slot), that form one replica group's torch.distributed world.

The driver (``Gang.build``) reserves a placement group of G bundles (STRICT_PACK when G > 1, so a group's
all-to-alls never leave a node), starts one actor per bundle, asks rank 0 for its address and a free
port, and hands that to every member; each member then joins the gang's process groups
(``join_gang``: a gloo control group and the data group, NCCL on GPU and gloo on CPU, through
``ParallelContext.from_env``). After that a gang is a replica group like one of torchrun's
(``inference.parallel.groups``): the same ``Runtime``, engine loop and denoising code run on it.

Liveness: every member runs its engine loop in one long actor call (``serve``); the driver keeps those
calls' references. An actor or node that dies makes its reference fail at once (``dead_member``); an actor
that hangs is caught by the driver's heartbeat call with a timeout (``Gang.call``). Either way the gang is
taken down whole (``Gang.kill``): its members are killed and its placement group freed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from inference.parallel.context import ParallelContext
from inference.parallel.groups import ReplicaGroup
from inference.parallel.layout import ParallelLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GangShape:
    """What one gang asks of the cluster: ``size`` members of ``gpus`` GPUs and ``cpus`` CPUs each."""

    size: int = 1
    gpus: int = 0  # 1 per member on GPU nodes, 0 on CPU
    cpus: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a gang needs at least one member, got {self.size}")
        if self.gpus not in (0, 1):
            raise ValueError(f"a member holds one GPU or none, got {self.gpus}")

    def bundle(self) -> dict[str, float]:
        out = {"CPU": float(self.cpus)}
        if self.gpus:
            out["GPU"] = float(self.gpus)
        return out

    @property
    def strategy(self) -> str:
        return "STRICT_PACK" if self.size > 1 else "PACK"

    def fits(self, node_resources: dict[str, float]) -> int:
        """How many gangs of this shape fit on one node with these (total) resources."""
        counts = [int(node_resources.get(k, 0.0) // v) for k, v in self.bundle().items() if v > 0]
        return min(counts) // self.size if counts else 0


def free_port() -> int:
    """A TCP port free on this node right now (the gang's rank 0 hosts the rendezvous store on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def member_location(rank: int) -> dict[str, Any]:
    """Inside an actor: where it runs (node address, host name, its GPU by the node's numbering, pid), and
    for rank 0 a free port for the rendezvous."""
    gpu_ids = ray.get_gpu_ids()
    return {
        "rank": rank,
        "ip": ray.util.get_node_ip_address(),
        "host": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "device": f"cuda:{gpu_ids[0]}" if gpu_ids else "cpu",
        "pid": os.getpid(),
        "port": free_port() if rank == 0 else None,
    }


def join_gang(
    rank: int,
    size: int,
    master: tuple[str, int],
    layout: ParallelLayout,
    devices: Sequence[str],
    *,
    data_timeout_s: float,
    control_timeout_s: float,
) -> ParallelContext:
    """Inside an actor: join the gang's torch.distributed world (its ranks are the gang's members; ``devices``:
    every member's device by its node's numbering, ``cuda:N`` or ``cpu``). One member: a single-process
    context, no process group.

    Ray shows each actor only its own GPU (``CUDA_VISIBLE_DEVICES``). A gang of several GPU members sees
    all of the gang's GPUs instead, each member using its own, so NCCL can use peer-to-peer links between
    them (the gang shares one node); this works only before CUDA is initialised in the actor, and is
    skipped (each member keeps ``cuda:0``) when it already was."""
    gpu_ids = [d.split(":", 1)[1] for d in devices if d.startswith("cuda:")]
    index = 0
    if size > 1 and len(gpu_ids) == size and not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
        index = rank
    on_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    device = torch.device("cuda", index) if on_gpu else torch.device("cpu")
    if size == 1:
        return ParallelContext.single(device).with_layout(layout)
    env = {"RANK": str(rank), "LOCAL_RANK": str(index), "WORLD_SIZE": str(size), "MASTER_ADDR": master[0],
           "MASTER_PORT": str(master[1])}  # fmt: skip
    os.environ.update(env)  # this actor process is one rank of its gang and nothing else
    return ParallelContext.from_env(
        device=device,
        data_timeout=timedelta(seconds=data_timeout_s),
        control_timeout=timedelta(seconds=control_timeout_s),
        environ=env,
        layout=layout,
    )


class GangError(RuntimeError):
    """A gang could not be built, or one of its members died or stopped answering."""


class Gang:
    """The driver's handle on one gang: its placement group, its actors (rank order) and their ``serve``
    calls. Build with ``Gang.build``; take down with ``kill``."""

    def __init__(self, group: ReplicaGroup, pg: PlacementGroup, members: Sequence[Any], locations: Sequence[dict],
                 ) -> None:  # fmt: skip
        self.group = group
        self.pg = pg
        self.members = list(members)
        self.locations = list(locations)
        self.serving: list[Any] = []  # ObjectRefs of every member's serve() call
        self.started: list[Any] = []  # what each member's start call returned
        self.built_at = time.time()

    @property
    def leader(self) -> Any:
        return self.members[0]

    @property
    def node_id(self) -> str:
        return str(self.locations[0]["node_id"])

    @classmethod
    def reserve(cls, shape: GangShape, *, timeout_s: float) -> PlacementGroup | None:
        """A placement group of ``shape``, ready within ``timeout_s``; None (and nothing held) when the
        cluster has no room for it now."""
        pg = placement_group([shape.bundle() for _ in range(shape.size)], strategy=shape.strategy)
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(pg)
            return None
        return pg

    @classmethod
    def build(
        cls,
        actor_class: Any,
        shape: GangShape,
        pg: PlacementGroup,
        *,
        index: int,
        count: int,
        make_args: Callable[[int], tuple[Any, ...]],
        start: Callable[[Any, int, tuple[str, int], ReplicaGroup], Any],
        timeout_s: float,
    ) -> Gang:
        """Start ``shape.size`` actors of ``actor_class`` (a ``ray.remote`` class) in ``pg``, one per bundle,
        constructed with ``make_args(rank)``; then ``start(actor, rank, master, group)`` on each (returns an
        ObjectRef; every member joins the gang's process groups there). The group's world ranks are
        ``index * size + rank``. Raises ``GangError`` (after killing what it started) when a member does
        not come up within ``timeout_s``."""
        members: list[Any] = []
        try:
            for rank in range(shape.size):
                strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
                options: dict[str, Any] = {"num_cpus": shape.cpus, "num_gpus": shape.gpus,
                                           "scheduling_strategy": strategy}  # fmt: skip
                members.append(actor_class.options(**options).remote(*make_args(rank)))
            locations = _get([m.locate.remote() for m in members], timeout_s, "locating the gang's members")
            leader = locations[0]
            master = (str(leader["ip"]), int(leader["port"]))
            group = ReplicaGroup(
                index=index,
                count=count,
                ranks=tuple(index * shape.size + r for r in range(shape.size)),
                devices=tuple(str(loc["device"]) for loc in locations),
                node=f"{leader['host']} ({leader['ip']})",
            )
            started = _get([start(m, rank, master, group) for rank, m in enumerate(members)], timeout_s,
                           "starting the gang")  # fmt: skip
        except BaseException:
            for m in members:
                ray.kill(m, no_restart=True)
            remove_placement_group(pg)
            raise
        gang = cls(group, pg, members, locations)
        gang.started = list(started)
        return gang

    def start_serving(self) -> None:
        self.serving = [m.serve.remote() for m in self.members]

    def dead_member(self) -> str | None:
        """Why the gang is down (a member's ``serve`` ended: it died, or its engine stopped), or None."""
        if not self.serving:
            return None
        done, _ = ray.wait(self.serving, num_returns=1, timeout=0)
        if not done:
            return None
        rank = self.serving.index(done[0])
        try:
            ray.get(done[0], timeout=0)
        except Exception as exc:  # the actor or its node died, or the engine raised
            return f"rank {rank} ({self.locations[rank]['host']}, pid {self.locations[rank]['pid']}): {_brief(exc)}"
        return f"rank {rank}'s engine stopped"

    def call(self, ref: Any, timeout_s: float, what: str) -> Any:
        """``ray.get(ref)`` bounded by ``timeout_s``; ``GangError`` when the member died or did not answer."""
        return _get([ref], timeout_s, what)[0]

    def kill(self) -> None:
        """Kill every member and free the placement group (idempotent; a member already gone is fine)."""
        for m in self.members:
            try:
                ray.kill(m, no_restart=True)
            except Exception:  # already dead or its node gone
                logger.debug("kill of a gang member failed", exc_info=True)
        try:
            remove_placement_group(self.pg)
        except Exception:
            logger.debug("removing a placement group failed", exc_info=True)
        self.serving = []


def _get(refs: list[Any], timeout_s: float, what: str) -> list[Any]:
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise GangError(f"{what}: no answer within {timeout_s:.0f}s") from None
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.RayError) as exc:
        raise GangError(f"{what}: {_brief(exc)}") from exc


def _brief(exc: BaseException) -> str:
    """One line of a Ray error (its first line; Ray's errors carry whole tracebacks)."""
    text = str(exc).strip().splitlines()
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    return f"{type(exc).__name__}: {text[0] if text else ''}"
