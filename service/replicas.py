"""The service's side of replica groups: flags, the placement at start-up, the producer, and the loops of
group leaders that do not serve the web.

``torchrun --nproc-per-node=P distributed_app.py --replicas R`` starts R groups of P / R ranks. World rank 0
serves the web and leads group 0; every other group's leader (``serve_group_leader``) opens the same job
store, claims its own jobs (``StoreJobSource(group=...)``), reports through its own ``StoreSink`` and
publishes its state on the ``GroupBoard`` for ``/api/queue`` and ``/api/health``. Followers of every
group serve their group's engine exactly as ranks > 0 did before.

Preparation (``--prepare_on``): ``group`` (default) — each leader prepares its jobs with its own Kokoro,
wav2vec2 and T5 (dedicated TTS per group); ``producer`` — world rank 0 also runs ``service.producer``
on ``--producer_device`` and leaders load only CLIP and the VAE.

What a crash does (torchrun): a rank that dies ends its group's collectives; torchrun then stops every
rank (SIGTERM, SIGKILL 30 s later) and, with ``--max-restarts``, starts them all again. A group that was
healthy stops at its next step boundary and puts its job back in the queue without counting the
attempt (``requeue_after_shutdown``); its finished clips stay in the job folder and the job resumes
after them. The crashed group's job is re-queued at the next start by ``recover_interrupted`` and that
attempt counts. A healthy group still inside a model pass when the SIGKILL comes is counted too.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from inference.parallel.groups import ReplicaGroup, ReplicaPlan, describe_placement
from inference.render.pipeline import RenderConfig, Renderer
from inference.render.producer import apply_memory_cap, check_memory_cap, parse_producer_device
from inference.render.worker import Runtime, StartupError, setup_logging
from service.groups import GroupBoard, GroupPublisher, board_status
from service.jobs import JobStore
from service.producer import HandoffLoader, Producer, ProducerConfig
from service.runner import EngineMonitor, StoreJobSource, StoreSink
from service.schemas import EngineStatus

logger = logging.getLogger(__name__)


def add_replica_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=1, help="split the ranks into this many groups, each rendering "
                   "its own job (Ulysses/FSDP inside a group; --ulysses_size is then the group's)")  # fmt: skip
    p.add_argument("--prepare_on", choices=("group", "producer"), default="group",
                   help="who prepares a job (TTS, wav2vec2, T5): each group's leader, or one producer that "
                   "prepares the next job while the groups denoise")  # fmt: skip
    p.add_argument(
        "--producer_device", default=None, help="cpu or cuda:N for --prepare_on producer (default cpu)"
    )
    p.add_argument("--producer_memory_gib", type=float, default=None,
                   help="memory cap of the producer on a CUDA device (GiB)")  # fmt: skip
    p.add_argument("--producer_ahead", type=int, default=None,
                   help="prepared jobs that may wait for a group (default: one per group)")  # fmt: skip


def check_replica_flags(args: argparse.Namespace) -> None:
    """Refusals that need no model (the group sizes are checked against the world in ``Runtime.start``)."""
    ReplicaPlan(int(os.environ.get("WORLD_SIZE", "1") or "1"), args.replicas)  # names --replicas
    if args.prepare_on != "producer":
        for flag in ("producer_device", "producer_memory_gib", "producer_ahead"):
            if getattr(args, flag) is not None:
                raise StartupError(f"--{flag}", "only applies with --prepare_on producer")
        return
    if args.t5_fsdp:
        raise StartupError("--prepare_on", "a producer encodes prompts on its own device; --t5_fsdp shards T5 "
                           "over a group's ranks: use one or the other")  # fmt: skip
    device = parse_producer_device(args.producer_device or "cpu")
    rank0 = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank0 = torch.device("cuda", 0) if rank0.type == "cuda" and rank0.index is None else rank0
    check_memory_cap(device, args.producer_memory_gib, {str(rank0)})
    if args.producer_ahead is not None and args.producer_ahead < 1:
        raise StartupError("--producer_ahead", f"must be at least 1, got {args.producer_ahead}")


def start_producer(
    args: argparse.Namespace, runtime: Runtime, store: JobStore
) -> tuple[Producer | None, str]:
    """World rank 0 with ``--prepare_on producer``: the producer's encoders on its device (capped), started.
    Returns it (None without a producer) and the placement line of the preparation stage."""
    if args.prepare_on != "producer":
        return None, "each group's leader (its own Kokoro, wav2vec2 and T5 on the leader's device)"
    device = parse_producer_device(args.producer_device or "cpu")
    cap = apply_memory_cap(device, args.producer_memory_gib, {str(runtime.ctx.device)})
    assert runtime.renderer is not None
    leader = runtime.renderer.config
    config = RenderConfig(device=device, t5_cpu=leader.t5_cpu, render_divisor=leader.render_divisor,
                          vae_tiling=leader.vae_tiling)  # fmt: skip
    renderer = Renderer(runtime.paths, config, stages=frozenset({"prepare"}))
    ahead = args.producer_ahead or len(runtime.groups)
    producer = Producer(store, renderer, ProducerConfig(ahead=ahead)).start()
    shared = [g.label() for g in runtime.groups if str(device) in g.devices and device.type == "cuda"]
    note = f"; shares {device} with {', '.join(shared)}" if shared else ""
    return (
        producer,
        f"the producer on {device} ({cap}{note}; Kokoro, wav2vec2, T5; at most {ahead} job(s) ahead)",
    )


def log_placement(runtime: Runtime, prepare: str) -> None:
    """Print where every stage runs (world rank 0, once the groups and the producer exist)."""
    logger.info(
        "%s", describe_placement(runtime.groups, {"prepare": prepare, "web + job store": "world rank 0"})
    )


def group_source(
    args: argparse.Namespace, runtime: Runtime, store: JobStore, monitor: EngineMonitor
) -> StoreJobSource:
    """A group leader's job source: claims for its group; with a producer, only prepared jobs."""
    handoff = None
    if args.prepare_on == "producer":
        assert runtime.renderer is not None
        handoff = HandoffLoader(store, runtime.renderer.config.device)
    return StoreJobSource(store, monitor, group=runtime.group, handoff=handoff)


def service_status(
    board: GroupBoard, store: JobStore, runtime: Runtime, monitor: EngineMonitor
) -> Callable[[], EngineStatus]:
    """``ServiceInfo.engine_status`` for world rank 0: every group from the board, group 0 live."""
    count = len(runtime.groups)

    def status() -> EngineStatus:
        return board_status(board, store, count, local=(runtime.group.index, monitor.status()))

    return status


def new_monitor(runtime: Runtime) -> EngineMonitor:
    ctx = runtime.ctx
    return EngineMonitor(
        ctx.world_size, str(ctx.device), first_pass_limit_s=ctx.control_timeout.total_seconds()
    )


def serve_group_leader(args: argparse.Namespace, runtime: Runtime) -> None:
    """The leader of a group other than world rank 0's: its own store connection, sink, source and board row;
    stops when world rank 0 asks (the web stopped) or on a signal."""
    setup_logging(runtime.world.rank, logging.INFO)  # a leader reports its jobs like world rank 0
    store = JobStore(args.outputs_dir / "jobs.db", args.outputs_dir, max_queue=args.max_queue,
                     retention_days=args.retention_days)  # fmt: skip
    board = GroupBoard(store.db_path)
    monitor = new_monitor(runtime)
    engine = runtime.make_engine(StoreSink(store, monitor), group_source(args, runtime, store, monitor),
                                 heartbeat_s=args.heartbeat_s, check_consistency=args.debug_checksum,
                                 liveness=monitor)  # fmt: skip
    publisher = GroupPublisher(board, runtime.group, monitor.status, on_stop=engine.request_shutdown).start()
    try:
        engine.serve()
    except BaseException as exc:
        monitor.stopped(f"engine stopped: {exc}")
        raise
    finally:
        if runtime.finisher is not None:
            runtime.finisher.drain(timeout_s=60.0)
        monitor.stopped("shut down")
        publisher.stop()


def groups_info(runtime: Runtime, args: argparse.Namespace) -> dict[str, Any]:
    """``/api/info`` keys about the groups (their live state is ``engine.groups``)."""
    group: ReplicaGroup = runtime.group
    return {"replicas": len(runtime.groups), "group_size": group.size, "prepare_on": args.prepare_on,
            "groups": [g.to_json() for g in runtime.groups]}  # fmt: skip
