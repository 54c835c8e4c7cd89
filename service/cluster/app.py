"""The service on a Ray cluster: ``python -m service.cluster [flags]`` (``bash launch/start_service.sh ray``).

This process is the *head*: it serves the page and the REST API, keeps the job store and dispatches jobs to
replica groups, each a gang of ``--group_size`` Ray actors (one per GPU, on one node) that run the same
engine loop and denoising code as a torchrun group (``service.cluster.pool``). It loads no model itself.
With ``RAY_ADDRESS`` set it joins that cluster; without, it starts a local Ray instance
(``--ray_cpus``, ``--ray_gpus``; no dashboard) so the same command also runs on one machine.

Every flag of ``distributed_app.py`` applies (model, layout inside a group, job defaults, web); on top:
``--replicas R`` groups (0: as many as the cluster holds, following nodes that join or leave) of
``--group_size G`` members. A SIGTERM or Ctrl-C stops every group after its current step; their running
jobs go back to the queue (attempt not counted) and resume after their last finished clip at the next start.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from inference.cluster.loopback import prefer_loopback

prefer_loopback()  # before Ray's own modules load (below): a local instance binds to 127.0.0.1 only

import ray  # noqa: E402
import torch  # noqa: E402

from common.errors import InputError  # noqa: E402
from distributed_app import (  # noqa: E402
    _versions,
    build_parser,
    check_flags,
    job_defaults,
    open_store,
    page_facts,
    runtime_options,
    start_web,
    web_limits,
)
from inference.cluster.connect import ClusterError, RayOptions, connect, disconnect  # noqa: E402
from inference.cluster.gang import GangError, GangShape  # noqa: E402
from inference.render.intake import default_preset  # noqa: E402
from inference.render.worker import StartupError, setup_logging  # noqa: E402
from service.api import ServiceInfo  # noqa: E402
from service.cluster.member import MemberSpec  # noqa: E402
from service.cluster.pool import ClusterPool, PoolConfig, tts_preview_via  # noqa: E402
from service.jobs import JobStoreError  # noqa: E402
from service.previews import PreviewPool  # noqa: E402
from service.runner import learn_from_history  # noqa: E402

logger = logging.getLogger("service.cluster")


def ray_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "python -m service.cluster"
    p.description = "Two-person dialogue video service on a Ray cluster (replica groups of Ray actors)."
    g = p.add_argument_group("Ray")
    g.add_argument("--group_size", type=int, default=1, help="members (GPUs) per replica group, on one node; "
                   "Ulysses/ring/FSDP run inside a group (default 1)")  # fmt: skip
    g.add_argument(
        "--ray_cpus", type=int, default=None, help="CPUs of a local instance (default: this machine's)"
    )
    g.add_argument(
        "--ray_gpus", type=int, default=None, help="GPUs of a local instance (default: torch's count)"
    )
    g.add_argument("--cpus_per_member", type=float, default=1.0, help="CPUs each actor reserves (default 1)")
    g.add_argument("--ray_temp_dir", type=Path, default=None, help="Ray's session files and logs of a local "
                   "instance (default: a new temporary folder)")  # fmt: skip
    g.add_argument("--ray_start_timeout_s", type=float, default=120.0, help="joining or starting Ray")
    g.add_argument("--rescan_s", type=float, default=10.0, help="how often missing groups are tried again and "
                   "(with --replicas 0) nodes that joined or left are looked for")  # fmt: skip
    g.add_argument("--group_reply_s", type=float, default=60.0, help="a group's leader that does not answer the "
                   "head's poll this long is taken for hung: its group is rebuilt")  # fmt: skip
    g.add_argument("--group_start_timeout_s", type=float, default=900.0,
                   help="how long a group may take to start (actors placed, models loaded)")  # fmt: skip
    return p


def check_ray_flags(args: argparse.Namespace) -> None:
    if args.replicas < 0:
        raise StartupError(
            "--replicas", f"must be 0 (as many groups as the cluster holds) or more, got {args.replicas}"
        )
    if args.group_size < 1:
        raise StartupError("--group_size", f"must be at least 1, got {args.group_size}")
    if args.prepare_on != "group":
        raise StartupError("--prepare_on", "on Ray each group's leader prepares its own jobs (group); the producer "
                           "stage runs under torchrun only")  # fmt: skip
    if args.selftest:
        raise StartupError("--selftest", "run the self-test under torchrun (launch/selftest.sh)")
    if args.cpus_per_member <= 0:
        raise StartupError("--cpus_per_member", f"must be positive, got {args.cpus_per_member}")
    for flag in ("rescan_s", "group_reply_s", "group_start_timeout_s", "ray_start_timeout_s"):
        if getattr(args, flag) <= 0:
            raise StartupError(f"--{flag}", f"must be positive, got {getattr(args, flag)}")
    # distributed_app's checks; --replicas counts gangs here, not a split of one torchrun world
    check_flags(argparse.Namespace(**{**vars(args), "replicas": 1}))


def gang_shape(args: argparse.Namespace, resources: dict[str, float]) -> GangShape:
    """One GPU per member when the cluster has GPUs (unless ``--device cpu``); a model that needs a GPU
    on a cluster without one is refused here, before any actor starts."""
    gpus = 0 if args.device == "cpu" else int(resources.get("GPU", 0) > 0)
    if gpus == 0 and args.preset != "tiny" and args.device != "cpu":
        raise StartupError("--device", "the Ray cluster has no GPU; the 14B model needs one per member "
                           "(or --device cpu to run it on CPUs anyway)")  # fmt: skip
    return GangShape(size=args.group_size, gpus=gpus, cpus=args.cpus_per_member)


def serve_head(args: argparse.Namespace, pool: ClusterPool, store: Any, defaults: dict[str, Any],
               facts: dict[str, Any], cluster: str) -> None:  # fmt: skip
    """The web on a thread; the main thread waits for SIGTERM/SIGINT, then stops the groups and the web."""
    learn_from_history(store, pool.monitor)
    lora = facts["lora"]
    limits = web_limits(args, facts["voices"], defaults, lora)
    previews = PreviewPool(tts_preview_via(pool))
    groups = lambda: [s.gang.group.to_json() for s in pool.slots() if s.gang is not None]  # noqa: E731
    info = ServiceInfo(
        world_size=len(pool.slots()) * args.group_size,
        ulysses_size=facts["layout"]["ulysses"],
        ring_size=facts["layout"]["ring"],
        dit_fsdp=args.dit_fsdp != "off",
        t5_fsdp=args.t5_fsdp,
        model=args.preset,
        resolution=defaults.get("resolution", 480),
        versions={**_versions(), "ray": ray.__version__},
        weights=facts["weights"],
        engine_status=pool.status,
        heartbeat_timeout_s=max(120.0, 4 * args.heartbeat_s),
        extra={
            "replicas": args.replicas or "auto",
            "group_size": args.group_size,
            "prepare_on": "group",
            "groups": groups(),
            "cluster": cluster,
            "dit_fsdp_mode": args.dit_fsdp,
            "job_defaults": defaults,
            "device": facts["device"],
            **facts["speed"],
        },  # fmt: skip
        lora=lora,
        default_preset=default_preset(lora),
    )
    ui_info = page_facts(args, info)
    server, web = start_web(args, store, info, limits, previews, lambda: {**ui_info, **pool.monitor.speed()})
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda signum, _f: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            if not web.is_alive():
                logger.error("the web server stopped")
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        logger.info("stopping: every group stops after its current step")
        pool.stop()
        server.should_exit = True
        web.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    args = ray_parser().parse_args(argv)
    setup_logging(0)
    torch.set_grad_enabled(False)
    try:
        check_ray_flags(args)
        defaults = job_defaults(args)
        store = open_store(args)
        options = replace(runtime_options(args, defaults), replicas=1)  # one gang is one group
        cluster = connect(RayOptions(address=os.environ.get("RAY_ADDRESS") or None, num_cpus=args.ray_cpus or os.cpu_count() or 1,
                                     num_gpus=args.ray_gpus, temp_dir=args.ray_temp_dir,
                                     start_timeout_s=args.ray_start_timeout_s))  # fmt: skip
    except InputError as exc:  # StartupError, ClusterError, ParallelConfigError: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobStoreError as exc:
        print(f"error: job store: {exc}", file=sys.stderr)
        return 2
    pool = None
    try:
        shape = gang_shape(args, cluster.resources)
        member = MemberSpec(size=args.group_size, options=options, heartbeat_s=args.heartbeat_s,
                            check_consistency=args.debug_checksum)  # fmt: skip
        config = PoolConfig(shape=shape, member=member, replicas=args.replicas or None, rescan_s=args.rescan_s,
                            reply_s=args.group_reply_s, build_s=args.group_start_timeout_s)  # fmt: skip
        pool = ClusterPool(store, config).start()
        logger.info("%d group(s) of %d member(s) (%s each)", len(pool.slots()), shape.size, shape.bundle())
        facts = pool.wait_ready(args.group_start_timeout_s)
        serve_head(args, pool, store, defaults, facts, cluster.describe())
    except (StartupError, ClusterError, GangError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if pool is not None:
            pool.stop(timeout_s=10)
        return 2
    finally:
        disconnect()
    logger.info("head: clean exit")
    return 0
