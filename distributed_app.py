"""Entry point of the dialogue video service, for ``python`` (one process) and ``torchrun`` (P ranks).

    python distributed_app.py --preset tiny                       # CPU demo, tiny random weights
    torchrun --nproc-per-node=8 distributed_app.py --ulysses_size 8 --dit_fsdp full

Every rank loads the DiT and runs the engine loop on its main thread; rank 0 also loads the encoders
and TTS, serves the Gradio UI and the REST API (``--server_port``, default 8419) from a background
thread, and feeds jobs from the durable store to the engine. Flags mirror upstream MultiTalk's;
a flag this service cannot honour is refused at start-up with the reason.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch
import uvicorn
from torch.distributed.elastic.multiprocessing.errors import record

from common.flags import flag_bool
from inference.parallel.context import ParallelContext
from inference.parallel.fsdp import check_t5_fsdp
from inference.parallel.host import configure_cpu_threads
from inference.parallel.layout import ParallelConfigError, check_parallel_sizes
from inference.parallel.selftest import run_selftest, selftest_config
from inference.render.intake import Limits, default_preset
from inference.render.settings import GenerationSettings, SettingsError
from inference.render.speed import add_speed_flags, speed_options, teacache_defaults
from inference.render.worker import Runtime, RuntimeOptions, StartupError, setup_logging
from service.api import ServiceInfo, create_app
from service.groups import GroupBoard, GroupPublisher
from service.jobs import JobStore, JobStoreError
from service.previews import PreviewPool
from service.replicas import (
    add_replica_flags,
    check_replica_flags,
    group_source,
    groups_info,
    log_placement,
    new_monitor,
    serve_group_leader,
    service_status,
    start_producer,
)
from service.runner import (
    STORE_ERRORS,
    StoreSink,
    learn_from_history,
    preview_wav,
    weights_report,
)
from service.submit import submit_form

logger = logging.getLogger("distributed_app")

SIZES = {"multitalk-480": 480, "multitalk-720": 720}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Two-person dialogue video service (MultiTalk).")
    p.add_argument("--preset", choices=("multitalk-14b", "tiny"), default="multitalk-14b",
                   help="model preset; tiny = random tiny weights made on first use (CPU demo)")  # fmt: skip
    p.add_argument(
        "--weights", type=Path, default=None, help="weights root (default weights/ or weights/tiny)"
    )
    p.add_argument(
        "--ckpt_dir", type=Path, default=None, help="upstream's name: the Wan folder (its parent is the root)"
    )
    p.add_argument("--ulysses_size", type=int, default=None, help="Ulysses degree (default: all ranks)")
    p.add_argument("--ring_size", type=int, default=1, help="ring attention degree: key/value blocks circulate "
                   "over this many Ulysses groups (ranks = ulysses x ring; default 1)")  # fmt: skip
    p.add_argument("--cfg_parallel", action="store_true", help="run the 2-3 guidance branches of each step on "
                   "separate rank groups (ranks = groups x ulysses x ring)")  # fmt: skip
    p.add_argument("--dit_fsdp", nargs="?", const="full", default="off", choices=("off", "full", "keep"),
                   help="FSDP2 for the DiT: off (replicated), full (reshard after forward), keep")  # fmt: skip
    p.add_argument("--t5_fsdp", action="store_true", help="shard T5 with FSDP2 over every rank (text encoding "
                   "becomes a step every rank joins)")  # fmt: skip
    p.add_argument("--t5_cpu", action="store_true", help="keep T5 on the CPU")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when torch "
                   "finds a GPU; the 14B preset refuses a CPU fallback unless --device cpu)")  # fmt: skip
    p.add_argument("--quant", choices=("int8", "fp8"), default=None, help="quantised DiT linears "
                   "(optimum-quanto); with --quant_dir upstream's quant_models files, else quantised at load")  # fmt: skip
    p.add_argument("--quant_dir", type=Path, default=None, help="upstream's folder holding quant_models/ "
                   "(dit_model_{int8,fp8}.safetensors + map), or the quantised .safetensors file")  # fmt: skip
    p.add_argument("--vae_tiling", choices=("auto", "on", "off"), default="auto", help="VAE encode/decode "
                   "in spatial tiles: auto = when whole frames would not fit the GPU's free memory")  # fmt: skip
    p.add_argument("--offload_model", type=flag_bool, default=None, help="T5, CLIP and the VAE in CPU memory, on the "
                   "GPU only for their stage (default: true on one GPU, false on several, as upstream)")  # fmt: skip
    p.add_argument("--num_persistent_param_in_dit", type=int, default=None, help="keep at most N DiT parameters "
                   "on the GPU and stream the other blocks from CPU memory per forward (0 = least memory)")  # fmt: skip
    p.add_argument("--frame_num", type=int, default=None, help="frames per clip (4n+1, default 81)")
    p.add_argument("--motion_frame", type=int, default=None, help="overlap frames between clips (default 25)")
    p.add_argument("--mode", choices=("streaming", "clip"), default=None, help="long video or one clip")
    p.add_argument("--sample_steps", type=int, default=None, help="default denoising steps for jobs")
    p.add_argument("--sample_shift", type=float, default=None, help="default timestep shift")
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="default resolution family")
    p.add_argument("--server_port", type=int, default=8419)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--auth", default=None, help="user:pass: a login for every route, UI and API (HTTP basic "
                   "auth); with --api_token both are accepted")  # fmt: skip
    p.add_argument("--share_jobs", action="store_true", help="every credential sees every job (default: a job is "
                   "visible to the credential that submitted it)")  # fmt: skip
    p.add_argument("--api_token", default=os.environ.get("DIALOGUE_API_TOKEN"),
                   help="bearer token for /api (default $DIALOGUE_API_TOKEN)")  # fmt: skip
    p.add_argument("--outputs_dir", type=Path, default=Path("outputs"))
    p.add_argument("--max_queue", type=int, default=50)
    p.add_argument("--retention_days", type=float, default=7.0)
    p.add_argument("--max_upload_mb", type=float, default=25.0)
    p.add_argument("--heartbeat_s", type=float, default=30.0)
    p.add_argument("--debug_checksum", action="store_true", help="check latents are identical on all ranks")
    p.add_argument("--selftest", action="store_true", help="tiny DiT at P ranks vs one process, then exit")
    p.add_argument("--selftest_dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the self-test model (bf16: tolerance from bf16's epsilon)")  # fmt: skip
    p.add_argument("--no_ui", action="store_true", help="REST API only")
    add_speed_flags(p)  # --lora_dir/--lora_scale/--lora_mode, --use_teacache, --batched_guidance, --compile
    add_replica_flags(p)  # --replicas, --prepare_on and the producer's --producer_* flags
    return p


def check_flags(args: argparse.Namespace) -> None:
    """Refuse what cannot be honoured, with the reason and the supported options."""
    check_t5_fsdp(args.t5_fsdp, args.t5_cpu)
    check_replica_flags(args)
    if args.auth is not None:
        name, _, password = args.auth.partition(":")
        if not name or not password:
            raise StartupError("--auth", "expected user:password (a user name, a colon, a password)")


def job_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Start-up flags that become the default settings of every job: applied over the job's preset at
    submission; a setting the job gives itself wins."""
    values: dict[str, Any] = {}
    flags = {"frame_num": "frame_num", "motion_frames": "motion_frame", "mode": "mode", "steps": "sample_steps",
             "shift": "sample_shift"}  # fmt: skip
    for key, flag in flags.items():
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    if args.size is not None:
        values["resolution"] = SIZES[args.size]
    values.update(teacache_defaults(args))
    if values:
        try:
            GenerationSettings.from_dict(values)  # validate now: a bad flag must stop the start-up
        except SettingsError as exc:
            # Name the flag the user typed (--sample_steps), not the setting behind it (steps).
            flags["teacache_thresh"] = "teacache_thresh"
            if exc.field not in flags or getattr(args, flags[exc.field]) is None:
                raise
            raise StartupError(f"--{flags[exc.field]}", exc.message) from None
    return values


def open_store(args: argparse.Namespace) -> JobStore:
    """Rank 0, before any model loads: the job store, its crashed jobs re-queued. A store that cannot
    be used (full disk, corrupt or missing database beside job folders) raises JobStoreError with one
    line that says so."""
    try:
        args.outputs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobStoreError(f"cannot create the outputs folder {args.outputs_dir}: {exc}") from None
    store = JobStore(args.outputs_dir / "jobs.db", args.outputs_dir, max_queue=args.max_queue,
                     retention_days=args.retention_days)  # fmt: skip
    recovered = store.recover_interrupted()
    if recovered:
        logger.warning("recovered %d job(s) interrupted by the last stop", len(recovered))
    return store


def runtime_options(args: argparse.Namespace, defaults: dict[str, Any]) -> RuntimeOptions:
    """What every rank (or Ray gang member) loads and runs with, from the flags."""
    weights = args.weights or (args.ckpt_dir.parent if args.ckpt_dir else None)
    return RuntimeOptions(preset=args.preset, weights=weights,
                          ulysses_size=args.ulysses_size, ring_size=args.ring_size,
                          cfg_parallel=args.cfg_parallel, speed=speed_options(args),
                          dit_fsdp=args.dit_fsdp, t5_cpu=args.t5_cpu,
                          device=args.device, quant=args.quant, quant_dir=args.quant_dir,
                          vae_tiling=args.vae_tiling, t5_fsdp=args.t5_fsdp,
                          offload_model=args.offload_model,
                          num_persistent_param_in_dit=args.num_persistent_param_in_dit,
                          plan_resolution=defaults.get("resolution", 480),
                          plan_frames=defaults.get("frame_num", 81),
                          replicas=args.replicas, prepare_on=args.prepare_on)  # fmt: skip


def serve_rank0(args: argparse.Namespace, runtime, defaults: dict[str, Any], store: JobStore) -> None:
    ctx = runtime.ctx
    try:
        store.cleanup()
    except STORE_ERRORS as exc:  # a full disk: the source pauses the queue until writes work again
        logger.warning("retention clean-up failed at start-up: %s", exc)
    monitor = new_monitor(runtime)
    board = GroupBoard(store.db_path)
    board.reset(runtime.groups)  # every group's row starts without a heartbeat: healthy once all serve
    publisher = GroupPublisher(board, runtime.group, monitor.status).start()  # group 0's row (pid, state)
    producer, prepare_on = start_producer(args, runtime, store)
    log_placement(runtime, prepare_on)
    learn_from_history(store, monitor)  # estimates in the UI come from this service's own past jobs
    # installed voices: the tiny demo has 4, the real folder 54
    limits = web_limits(args, runtime.paths.voices(), defaults, runtime.speed.lora)
    renderer = producer.renderer if producer is not None else runtime.renderer  # whose Kokoro speaks previews

    def tts_preview(voice: str, text: str | None) -> bytes:
        return preview_wav(renderer.tts, voice, text)

    previews = PreviewPool(tts_preview)  # its own threads and queue bound, shared by REST and UI

    info = ServiceInfo(
        world_size=runtime.world.world_size,
        ulysses_size=ctx.parallel_layout.ulysses,
        ring_size=ctx.parallel_layout.ring,
        dit_fsdp=args.dit_fsdp != "off",
        t5_fsdp=args.t5_fsdp,
        model=args.preset,
        resolution=defaults.get("resolution", 480),
        versions=_versions(),
        weights=weights_report(runtime.paths.root, args.preset),
        engine_status=service_status(board, store, runtime, monitor),
        heartbeat_timeout_s=max(120.0, 4 * args.heartbeat_s),
        extra={
            **groups_info(runtime, args),
            "producer": None if producer is None else producer.placement(),
            "dit_fsdp_mode": args.dit_fsdp,
            "job_defaults": defaults,
            "device": str(ctx.device),
            **runtime.speed.info(),
        },
        lora=runtime.speed.lora,
        default_preset=default_preset(runtime.speed.lora),
    )
    info_dict = page_facts(args, info)
    ui_info = info.engine_status

    def page_info() -> dict[str, Any]:  # the page's header shows each replica group's state
        return {**info_dict, **monitor.speed(), "groups": list(ui_info().groups) if ui_info else []}

    server, web = start_web(args, store, info, limits, previews, page_info)
    sink = StoreSink(store, monitor)
    source = group_source(args, runtime, store, monitor)
    engine = runtime.make_engine(
        sink, source, heartbeat_s=args.heartbeat_s, check_consistency=args.debug_checksum, liveness=monitor
    )
    try:
        engine.serve()
    except BaseException as exc:
        monitor.stopped(f"engine stopped: {exc}")
        raise
    finally:
        board.request_stop()  # the other groups' leaders stop too: no group serves without the web
        publisher.stop()
        if producer is not None:
            producer.stop()
        if runtime.finisher is not None:
            runtime.finisher.drain(timeout_s=60.0)  # the last video muxed before the web goes
        server.should_exit = True
        web.join(timeout=5)
    monitor.stopped("shut down")


def web_limits(
    args: argparse.Namespace, voices: Iterable[str], defaults: dict[str, Any], lora: Any
) -> Limits:
    """What a submission may carry (upload size, installed voices) and the defaults it gets."""
    return Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), installed_voices=frozenset(voices),
                  job_defaults=defaults, lora=lora)  # fmt: skip


def page_facts(args: argparse.Namespace, info: ServiceInfo) -> dict[str, Any]:
    """The page header's fixed facts (model, layout, engine, default preset)."""
    return {"model": args.preset, "world_size": info.world_size, "ulysses_size": info.ulysses_size,
            "engine": "tiny random weights (demo)" if args.preset == "tiny" else "MultiTalk 14B",
            "default_preset": info.default_preset}  # fmt: skip


def start_web(
    args: argparse.Namespace,
    store: JobStore,
    info: ServiceInfo,
    limits: Limits,
    previews: Any,
    ui_info: Callable[[], dict[str, Any]],
) -> tuple[uvicorn.Server, threading.Thread]:
    """The REST API and (unless ``--no_ui``) the page on a daemon thread, started; raises when the port is
    taken. Shared by world rank 0 and the Ray head (``service.cluster``)."""
    users = dict([args.auth.split(":", 1)]) if args.auth else None
    app = create_app(store, info, auth_token=args.api_token, limits=limits, tts_preview=previews, users=users,
                     share_jobs=args.share_jobs)  # fmt: skip
    if not args.no_ui:
        # Imported only with the UI: gradio takes seconds to import and --no_ui services never need it.
        from service.ui import build_ui, mount_ui

        def submit(form: dict[str, Any], files: dict[str, bytes], owner: str | None = None) -> str:
            return submit_form(store, form, files, limits=limits, owner=owner).id  # owner: a credential

        blocks = build_ui(
            store,
            submit=submit,
            tts_preview=previews,
            info=ui_info,
            limits=limits,
            share_jobs=args.share_jobs,  # the page shows each credential its own jobs, as REST does
        )
        mount_ui(app, blocks, store)  # behind the app's gate (--auth, --api_token), like every route
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.server_port, log_level="warning",
                                           access_log=False))  # fmt: skip
    web = threading.Thread(target=server.run, name="web", daemon=True)
    web.start()
    for _ in range(600):
        if server.started or not web.is_alive():
            break
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError(f"the web server could not start on {args.host}:{args.server_port} (port in use?)")
    logger.info("serving the UI and API at http://%s:%d (world size %d)", args.host, args.server_port,
                info.world_size)  # fmt: skip
    return server, web


def _flag_message(exc: ValueError) -> str:
    """Parallel-layout errors name the option as the user typed it (``--ulysses_size``)."""
    if isinstance(exc, ParallelConfigError):
        return f"--{exc.field}: {exc.message}"
    return str(exc)


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "diffusers", "gradio", "kokoro"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@record
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    configure_cpu_threads()  # torchrun leaves OMP_NUM_THREADS=1: rank 0's CPU work would get one thread
    torch.set_grad_enabled(False)
    if args.selftest:
        return _selftest(torch.bfloat16 if args.selftest_dtype == "bf16" else torch.float32, args)
    try:
        check_flags(args)
        defaults = job_defaults(args)
        store = open_store(args) if rank == 0 else None
        runtime = Runtime.start(runtime_options(args, defaults))
    except ValueError as exc:  # a start-up error the user can fix: say it, no traceback
        if rank == 0:
            print(f"error: {_flag_message(exc)}", file=sys.stderr)
        return 2
    except JobStoreError as exc:  # full disk, corrupt or lost job database: one line, no traceback
        print(f"error: job store: {exc}", file=sys.stderr)
        return 2
    try:
        if runtime.world.rank == 0:
            assert store is not None
            serve_rank0(args, runtime, defaults, store)
        elif runtime.ctx.is_rank0:  # the leader of another replica group
            serve_group_leader(args, runtime)
        else:
            runtime.make_engine(None, None, heartbeat_s=args.heartbeat_s,
                                check_consistency=args.debug_checksum).serve()  # fmt: skip
    finally:
        runtime.close()
    logger.info("rank %d: clean exit", runtime.world.rank)
    return 0


def _selftest(dtype: torch.dtype, args: argparse.Namespace) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    try:
        layout = check_parallel_sizes(world, args.ulysses_size, args.ring_size, selftest_config().num_heads,
                                      args.cfg_parallel)  # fmt: skip
    except ParallelConfigError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {_flag_message(exc)}", file=sys.stderr)
        return 2
    ctx = ParallelContext.from_env(data_timeout=120, control_timeout=300, layout=layout)
    try:
        ok, _, line = run_selftest(ctx, dtype)
    finally:
        if ctx.distributed:
            ctx.destroy()
    if ctx.is_rank0:
        print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
