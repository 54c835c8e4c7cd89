"""Process start-up and the job worker shared by the CLI (``inference.generate``) and the service.

``Runtime.start`` joins torchrun's group (or stays a single process), checks the parallel sizes,
loads the DiT on every rank (optionally FSDP2-sharded) and rank 0's encoders, and reports memory.
``DialogueWorker`` is the one clip driver: it plugs the pipeline into the SPMD engine, a job (a
``JobSpec`` with its settings and input folder) becomes one DENOISE message per clip; rank 0 prepares
before the first clip and decodes between clips (``Worker.finish`` returns the next clip as a follow-up),
every rank runs ``denoise_clip`` with the Ulysses ``sp`` object. The engine's step boundary is the one
way a clip stops (a cancel, a shutdown). ``Runtime.render`` runs one job this way for the CLI, tests and
benchmarks, on one process or under torchrun.

Where results go is a ``JobSink`` (the job store in the service, a callback in the CLI).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from common.errors import InputError
from inference.checkpoint.loader import load_model, resolve_config
from inference.checkpoint.weights import WeightPaths, make_tiny
from inference.memory.startup import startup_check
from inference.model.config import DiTConfig
from inference.parallel.context import ParallelContext
from inference.parallel.engine import Engine, JobContext, Liveness, Message, Op, TensorSpec
from inference.parallel.fsdp import (
    CollectiveTextEncoder,
    check_fsdp_mode,
    check_t5_fsdp,
    load_dit,
    load_t5,
    report_memory,
)
from inference.parallel.groups import ReplicaGroup, ReplicaPlan, join_replica_group
from inference.parallel.host import HostGpus, device_free_bytes, resolve_device
from inference.parallel.layout import ParallelConfigError, check_heads, check_parallel_sizes
from inference.parallel.offload import check_streaming, stream_blocks
from inference.render.finisher import Finisher
from inference.render.pipeline import (
    RENDER_STAGES,
    Prepared,
    RenderConfig,
    Renderer,
    SpillDamagedError,
    clip_progress,
    clip_stage,
    denoise_clip,
)
from inference.render.sampler import Cancelled, ClipSpec, PassStats, passes_for
from inference.render.settings import GenerationSettings, check_lora_setting
from inference.render.spec import JobSpec
from inference.render.speed import ModelSpeed, SpeedOptions, finish_model, merged_loras, read_adapters
from inference.render.stats import (
    build_stats,
    gather_peak_bytes,
    memory_kind,
    merge_peaks,
    reset_peak,
    write_stats,
)

if TYPE_CHECKING:  # optimum-quanto is imported only with --quant
    from inference.checkpoint.quant import QuantSpec

logger = logging.getLogger(__name__)

MAX_SPILL_REPAIRS = 2  # a job whose spilled clips keep getting damaged fails instead of looping
DEFAULT_WEIGHTS = {"multitalk-14b": Path("weights"), "tiny": Path("weights/tiny")}


def setup_logging(rank: int, level: int | None = None) -> None:
    """One format for every rank; rank 0 at INFO, the others at WARNING (so their warnings show)."""
    level = level if level is not None else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(
        level=level,
        format=f"[%(asctime)s r{rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("httpx", "httpcore", "urllib3", "jieba", "phonemizer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class StartupError(InputError):
    """A flag or environment the service cannot honour; says what is supported."""


class RenderFailed(RuntimeError):
    """A job that ``Runtime.render`` ran ended without a video (``cancelled``: stopped by its sink)."""

    def __init__(self, reason: str, *, cancelled: bool = False) -> None:
        super().__init__(reason)
        self.cancelled = cancelled


@dataclass(frozen=True)
class RuntimeOptions:
    preset: str = "multitalk-14b"
    weights: Path | None = None
    ulysses_size: int | None = None
    ring_size: int = 1
    cfg_parallel: bool = False  # guidance branches of a step on separate rank groups
    dit_fsdp: str = "off"
    t5_cpu: bool = False
    device: str | None = None
    data_timeout_s: float = 300.0
    control_timeout_s: float = 1800.0
    make_tiny: bool = True
    save_frames: bool = False  # rank 0 also writes the uint8 frames before encoding (frames.npy)
    quant: str | None = None  # --quant int8|fp8: quantised DiT linears (optimum-quanto)
    quant_dir: Path | None = None  # upstream's quant_models/ folder (or file); None: quantise at load
    vae_tiling: str = "auto"  # --vae_tiling auto|on|off
    t5_fsdp: bool = False  # T5 sharded over every rank; text encoding is a collective step
    offload_model: bool | None = None  # encoders in CPU memory between stages; None: upstream's default
    num_persistent_param_in_dit: int | None = None  # DiT parameters kept on the GPU; the rest streamed
    plan_resolution: int = 480  # the clip the start-up memory plan checks (the service's default size)
    plan_frames: int = 81
    replicas: int = 1  # --replicas: the ranks split into this many groups, each rendering its own jobs
    prepare_on: str = "group"  # "group": each leader prepares its jobs; "producer": the producer does
    speed: SpeedOptions = SpeedOptions()  # LoRAs, batched guidance, --compile, attention kernel

    @property
    def weights_root(self) -> Path:
        return self.weights if self.weights is not None else DEFAULT_WEIGHTS[self.preset]


class JobSink(Protocol):
    """Where a job's progress and end go (rank 0)."""

    def progress(self, job_id: str, percent: float, stage: str) -> None: ...

    def timing(self, job_id: str, name: str, seconds: float) -> None: ...

    def state(self, job_id: str, state: str) -> None: ...

    def cancel_requested(self, job_id: str) -> bool: ...

    def done(self, job_id: str, outputs: list[str]) -> None: ...

    def failed(self, job_id: str, reason: str, *, cancelled: bool = False, interrupted: bool = False) -> None:
        """The job ended without a video: ``cancelled`` by its user, ``interrupted`` by a service
        shutdown (it should run again after the restart), or failed (``reason`` says why)."""
        ...


@dataclass
class RenderJob:
    """A job on rank 0: what to make (``spec`` + ``settings``), the folder with its input files and
    the output folder. ``prepared`` is set after the front half."""

    job_id: str
    spec: JobSpec
    settings: GenerationSettings
    inputs: Path
    out_dir: Path
    prepared: Prepared | None = None
    clip_index: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    clip_started: float = 0.0
    spill_repairs: int = 0  # times a damaged spilled clip was rendered again (MAX_SPILL_REPAIRS)
    peak_bytes: list[int] = field(default_factory=list)  # per rank of the group, max over the clips
    prepared_on: str = "group"  # or "producer" (``prepared`` came from the producer's hand-off)

    def add_time(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds


class DialogueWorker:
    """The engine's ``Worker`` for dialogue videos (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        ctx: ParallelContext,
        renderer: Renderer | None,
        sink: JobSink | None,
        speed: ModelSpeed | None = None,
        text_encoder: Any = None,
        group: ReplicaGroup | None = None,
    ) -> None:
        self.model = model
        self.group = group or ReplicaGroup(devices=(str(ctx.device),))  # whose ranks ran a job (stats.json)
        self.finisher: Any = None  # the leader's Finisher: decodes + muxes a job's last clip off this thread
        self.text_encoder = text_encoder  # this rank's shard of T5 (--t5_fsdp), for ENCODE_TEXT steps
        self.speed = speed or ModelSpeed()  # switchable LoRAs, batched-guidance mode
        self.ctx = ctx
        self.sp = ctx.sequence_parallel()
        self.guidance = ctx.guidance_parallel()  # None unless --cfg_parallel
        self.renderer = renderer
        self.sink = sink
        self.engine: Engine | None = None
        self._current: RenderJob | None = None

    # ---- every rank -----------------------------------------------------------------------------

    def preflight(self, msg: Message) -> str | None:
        # The head count versus the rank count is refused at start-up (Runtime.start); what can change
        # between jobs is free device memory.
        if self.ctx.device.type == "cuda":
            free = device_free_bytes(self.ctx.device)  # cached blocks count as free
            need = int(msg.settings.get("min_free_bytes", 0))
            if free < need:
                return f"only {free / 2**30:.1f} GiB free on {self.ctx.device}, need {need / 2**30:.1f} GiB"
        return None

    def step(self, msg: Message) -> list[torch.Tensor]:
        """ENCODE_TEXT: every rank runs its shard of T5 on the same texts (rank 0 keeps the result)."""
        if msg.op is not Op.ENCODE_TEXT or self.text_encoder is None:
            raise RuntimeError(f"rank {self.ctx.rank}: no sharded text encoder for a {msg.op.value} step")
        return self.text_encoder.encode(list(msg.settings["texts"]))

    def run(
        self, msg: Message, tensors: dict[str, torch.Tensor], job: JobContext
    ) -> dict[str, torch.Tensor] | None:
        settings = GenerationSettings.from_dict(dict(msg.settings["generation"]))
        clip_index = int(msg.settings["clip_index"])
        progress = self._progress if self.ctx.is_rank0 else None
        stats = PassStats()
        reset_peak(self.ctx.device)
        try:
            with job.signal_passes(self.model):  # liveness per model pass (rank 0's /api/health)
                latent = denoise_clip(
                    self.model,
                    tensors,
                    settings,
                    clip_index=clip_index,
                    sp=self.sp,
                    guidance=self.guidance,
                    step_boundary=job.step_boundary,  # cancel flag + optional latent checksum
                    progress=progress,
                    batched=bool(msg.settings.get("batched", False)),
                    stats=stats,
                    adapters=self.speed.adapters,
                )
        except Cancelled:
            return None
        peaks = gather_peak_bytes(self.ctx)  # every rank's peak memory in this clip, for stats.json
        return {"latent": latent, "passes": torch.tensor([stats.passes, stats.skipped, stats.model_calls]),
                "peak_bytes": peaks}  # fmt: skip

    # ---- rank 0 ---------------------------------------------------------------------------------

    def working_bytes(self, y_shape: torch.Size) -> int:
        """A lower bound of the activation memory one forward needs on each rank, for the pre-flight:
        the FFN hidden state plus q/k/v/out and their all-to-all buffers for this rank's tokens, in the
        compute dtype, doubled for allocator slack. y: [1, 20, T_lat, h, w]."""
        cfg = self.model.config
        t_lat, h, w = y_shape[2:]
        tokens = t_lat * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
        local = -(-tokens // self.sp.size)
        itemsize = 2 if self.ctx.device.type == "cuda" else 4
        return int(2 * local * (cfg.ffn_dim + 8 * cfg.dim) * itemsize)

    def _progress(self, step: int, total: int) -> None:
        job = self._current
        if job is None or job.prepared is None or self.sink is None:
            return
        clip = job.prepared.plan.clips[job.clip_index]
        pct, stage = clip_progress(job.prepared, clip, step, total)
        self.sink.progress(job.job_id, pct, stage)
        if self.engine is not None and self.sink.cancel_requested(job.job_id):
            self.engine.cancel(job.job_id)  # every rank stops at the next step boundary

    def prepare(self, job: RenderJob) -> tuple[Message, dict[str, torch.Tensor]]:
        assert self.renderer is not None, "prepare() runs on rank 0 only"
        check_lora_setting(job.settings, self.speed.lora)  # e.g. stored before a restart with other LoRAs
        if job.prepared is None:
            self._state(job, "preparing")
            job.prepared = self.renderer.prepare(
                job.spec,
                job.settings,
                job.inputs,
                job.out_dir,
                progress=lambda p, s: self.sink and self.sink.progress(job.job_id, p, s),
                timing=lambda n, s: self._timing(job, n, s),
            )
            job.clip_index = job.prepared.start_clip
            self._state(job, "rendering")
        prep = job.prepared
        clip = prep.plan.clips[job.clip_index]
        if self.sink:
            self.sink.progress(job.job_id, *clip_stage(prep, clip, "conditioning"))
        t0 = time.monotonic()
        tensors = self.renderer.clip_inputs(prep, clip)  # CLIP + VAE encode of the clip's conditioning
        job.add_time("conditioning_time", time.monotonic() - t0)
        specs = tuple(TensorSpec.of(name, t) for name, t in sorted(tensors.items()))
        branches = len(passes_for(prep.settings.text_guidance))
        need = self.working_bytes(tensors["y"].shape)
        batched = self.speed.batched(self.ctx.device, branches, need)
        settings = {
            "generation": prep.settings.to_dict(),
            "clip_index": clip.index,
            "batched": batched,  # decided here and sent: every rank runs the clip the same way
            "min_free_bytes": need * (branches if batched else 1),
        }
        self._current = job
        job.clip_started = time.monotonic()
        return Message(Op.DENOISE, job.job_id, settings, specs), tensors

    def finish(self, job: RenderJob, result: dict[str, torch.Tensor] | None) -> RenderJob | None:
        assert self.renderer is not None and job.prepared is not None
        prep = job.prepared
        clip: ClipSpec = prep.plan.clips[job.clip_index]
        job.add_time("video_time", time.monotonic() - job.clip_started)
        if result is None:
            self.reject(job, f"cancelled during clip {clip.index + 1} of {prep.num_clips}")
            return None
        if "passes" in result:
            prep.record_passes(clip.index, *(int(v) for v in result["passes"].tolist()))
        if "peak_bytes" in result:
            job.peak_bytes = merge_peaks(job.peak_bytes, result["peak_bytes"].tolist())
        if clip.is_last and self.finisher is not None:
            # The group's other ranks start the next job while the finisher decodes and muxes this one.
            self._current = None
            self.finisher.submit(job, clip, result["latent"])
            return None
        return self.complete_clip(job, clip, result["latent"], self.renderer)

    def complete_clip(
        self, job: RenderJob, clip: ClipSpec, latent: torch.Tensor, renderer: Renderer
    ) -> RenderJob | None:
        """Decode a denoised clip; after the last one mux the video, write ``stats.json`` and report the job
        done. Returns the job while clips remain (or must be rendered again). On the main thread, or on the
        finisher's (with its own VAE handle, ``renderer``)."""
        prep = job.prepared
        assert prep is not None
        if self.sink:
            self.sink.progress(job.job_id, *clip_stage(prep, clip, "decoding"))
        t0 = time.monotonic()
        renderer.accept_clip(prep, clip, latent)
        job.add_time("decode_time", time.monotonic() - t0)
        if not clip.is_last:
            job.clip_index += 1
            return job
        self._state(job, "encoding")
        if self.sink:
            self.sink.progress(job.job_id, 95.0, "encoding the video")
        t0 = time.monotonic()
        try:
            outputs = renderer.write_outputs(prep)
        except SpillDamagedError as exc:
            # A spilled clip changed or vanished on disk: render it (and the later ones) again from
            # their seeds instead of muxing it; a disk that keeps damaging them fails the job.
            job.spill_repairs += 1
            if job.spill_repairs > MAX_SPILL_REPAIRS:
                raise
            logger.warning("job %s: %s", job.job_id, exc)
            self._state(job, "rendering")
            job.clip_index = exc.clip_index
            return job
        job.add_time("mux_time", time.monotonic() - t0)
        job.timings["total_time"] = time.monotonic() - job.started
        for name in ("conditioning_time", "video_time", "decode_time", "mux_time", "total_time"):
            self._report_timing(job, name)
        outputs.append(self._write_stats(job))
        if self._current is job:
            self._current = None
        if self.sink:
            self.sink.done(job.job_id, outputs)
        return None

    def _write_stats(self, job: RenderJob) -> str:
        """``stats.json`` beside the video, from its ``render.json`` and the job's timings."""
        render = json.loads((job.out_dir / "render.json").read_text())
        stats = build_stats(job_id=job.job_id, render=render, timings=job.timings, group=self.group,
                            peak_bytes=job.peak_bytes, memory=memory_kind(self.ctx.device),
                            prepared_on=job.prepared_on)  # fmt: skip
        return write_stats(job.out_dir, stats)

    def fail_finished(self, job: RenderJob, reason: str) -> None:
        """The finisher could not end ``job`` (decode, mux): it failed (a cancel still cancels)."""
        if self.sink:
            self.sink.failed(job.job_id, reason, cancelled=self.sink.cancel_requested(job.job_id))

    def reject(self, job: RenderJob, reason: str) -> None:
        self._current = None
        if self.sink:
            interrupted = self.engine is not None and self.engine.stopping
            cancelled = self.sink.cancel_requested(job.job_id)
            self.sink.failed(job.job_id, reason, cancelled=cancelled, interrupted=interrupted)

    def _state(self, job: RenderJob, state: str) -> None:
        if self.sink:
            self.sink.state(job.job_id, state)

    def _timing(self, job: RenderJob, name: str, seconds: float) -> None:
        job.add_time(name, seconds)
        self._report_timing(job, name)

    def _report_timing(self, job: RenderJob, name: str) -> None:
        if self.sink:
            self.sink.timing(job.job_id, name, job.timings[name])


class Runtime:
    """One process of the service or CLI: context, model, and (rank 0) the encoders."""

    def __init__(self, options: RuntimeOptions, ctx: ParallelContext, model: torch.nn.Module, paths: WeightPaths,
                 renderer: Renderer | None, speed: ModelSpeed | None = None,
                 text_encoder: Any = None, *, group: ReplicaGroup | None = None, world: ParallelContext | None = None,
                 groups: tuple[ReplicaGroup, ...] = ()) -> None:  # fmt: skip
        self.options = options
        self.group = group or ReplicaGroup(devices=(str(ctx.device),))  # this process's replica group
        self.groups = groups or (self.group,)  # every group of the world (``--replicas``)
        self.world = world or ctx  # the whole world (torchrun's ranks); ``ctx`` is this group's
        self.finisher: Finisher | None = None
        self.text_encoder = text_encoder  # T5 sharded over every rank (--t5_fsdp), or None
        self.speed = speed or ModelSpeed()
        self.ctx = ctx
        self.model = model
        self.paths = paths
        self.renderer = renderer
        self.engine: Engine | None = None

    @classmethod
    def start(
        cls, options: RuntimeOptions, *, joined: tuple[ParallelContext, ReplicaGroup] | None = None
    ) -> Runtime:
        """Join torchrun's world (split into ``options.replicas`` groups), load the DiT for this rank's group
        and, on a group's leader, its encoders. ``joined``: a group formed elsewhere (its context, whose world
        is the group, and its ``ReplicaGroup``; e.g. a gang of Ray actors) instead of torchrun's."""
        mode = check_fsdp_mode(options.dit_fsdp)
        processes = joined[0].world_size if joined else int(os.environ.get("WORLD_SIZE", "1") or "1")
        plan = ReplicaPlan(processes, 1 if joined else options.replicas)
        world = plan.group_size  # the ranks that render one job
        if options.prepare_on not in ("group", "producer"):
            raise StartupError("--prepare_on", f"expected group or producer, got {options.prepare_on!r}")
        if options.prepare_on == "producer" and options.t5_fsdp:
            raise StartupError("--prepare_on", "a producer encodes prompts on its own device; --t5_fsdp shards T5 "
                               "over a group's ranks: use one or the other")  # fmt: skip
        quant, lora_files = _quant_spec(options, mode, world)
        try:
            layout = check_parallel_sizes(
                world,
                options.ulysses_size,
                options.ring_size,
                _num_heads(options.preset),
                options.cfg_parallel,
            )
        except ParallelConfigError as exc:
            if plan.replicas == 1:
                raise
            where = f"; with --replicas {plan.replicas} a group has {world} of the {processes} processes"
            raise ParallelConfigError(exc.field, exc.message + where) from None
        if mode != "off" and world == 1:
            logger.info("--dit_fsdp %s on one process: nothing to shard, the model is loaded whole", mode)
        check_streaming(options.num_persistent_param_in_dit, mode, world)
        check_t5_fsdp(options.t5_fsdp, options.t5_cpu)
        device = resolve_device(options.preset, options.device, HostGpus.probe())
        on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        # Upstream's default: encoders offloaded with one GPU, resident with several.
        offload = options.offload_model if options.offload_model is not None else (world == 1 and on_gpu)
        _check_memory(options, world, device, offload, mode, layout.sp_size)  # before any weight is loaded
        paths = WeightPaths.under(options.weights_root)
        if options.preset == "tiny" and options.make_tiny and int(os.environ.get("RANK", "0")) == 0:
            make_tiny(paths.root)  # idempotent; other ranks wait for it at the rendezvous below
        if joined is None:
            world_ctx = ParallelContext.from_env(
                device=device, data_timeout=options.data_timeout_s, control_timeout=options.control_timeout_s
            )
            if world_ctx.distributed:
                world_ctx.barrier()  # rank 0 may have been writing the tiny weights
            ctx, group, groups = join_replica_group(world_ctx, plan, layout)
        else:
            ctx, group = joined
            ctx = ctx if ctx.layout is not None else ctx.with_layout(layout)  # collective: the whole gang
            world_ctx, groups = ctx, (group,)
        paths.check(options.preset)
        t0 = time.monotonic()
        adapter_options = replace(options.speed, lora_dir=tuple(lora_files))
        adapters = read_adapters(adapter_options, resolve_config(paths.wan_dir))  # checked before loading
        streaming = options.num_persistent_param_in_dit is not None  # then loaded into CPU memory first
        if quant is not None:  # whole on every rank (Ulysses); FSDP was refused above
            model = load_model(paths.wan_dir, device=torch.device("cpu") if streaming else ctx.device,
                               loras=merged_loras(options.speed, adapters), quant=quant)  # fmt: skip
        else:
            model = load_dit(paths.wan_dir, ctx, mode=mode, loras=merged_loras(options.speed, adapters),
                             device=torch.device("cpu") if streaming else None)  # fmt: skip
        check_heads(model.config.num_heads, layout.ulysses)
        logger.info("DiT loaded in %.1fs; %s", time.monotonic() - t0, report_memory(model, ctx.device))
        speed = finish_model(model, options.speed, adapters, ctx.device)
        if options.num_persistent_param_in_dit is not None:
            stream_blocks(model, ctx.device, options.num_persistent_param_in_dit)
        text_encoder = None
        if options.t5_fsdp and ctx.distributed:  # every rank holds its shard of T5
            text_encoder = load_t5(paths.wan_dir, ctx)
        renderer = None
        if ctx.is_rank0:
            divisor = 8 if options.preset == "tiny" else 1
            config = RenderConfig(
                device=ctx.device,
                t5_cpu=options.t5_cpu,
                render_divisor=divisor,
                save_frames=options.save_frames,
                vae_tiling=options.vae_tiling,
                offload_model=offload,
            )
            stages = frozenset({"clips"}) if options.prepare_on == "producer" else RENDER_STAGES
            renderer = Renderer(paths, config, CollectiveTextEncoder() if text_encoder is not None else None,
                                stages=stages)  # fmt: skip
        return cls(options, ctx, model, paths, renderer, speed, text_encoder, group=group, world=world_ctx,
                   groups=groups)  # fmt: skip

    def make_engine(self, sink: JobSink | None, source: Callable[[float], Any] | None, *, heartbeat_s: float = 60.0,
                    check_consistency: bool = False, liveness: Liveness | None = None) -> Engine:  # fmt: skip
        worker = DialogueWorker(
            self.model, self.ctx, self.renderer, sink, self.speed, self.text_encoder, self.group
        )
        if self.renderer is not None and not self.renderer.config.offload_model:
            # Offloaded encoders move between CPU and GPU per stage: one thread at a time, so no finisher.
            if self.finisher is None:
                self.finisher = Finisher(self.renderer, worker.complete_clip, worker.fail_finished)
            else:  # a later engine of this runtime (the CLI's): the finisher reports to its worker
                self.finisher.rebind(worker.complete_clip, worker.fail_finished)
            worker.finisher = self.finisher
            source = self.finisher.wrap_source(source)
        engine = Engine(
            worker, self.ctx, source, heartbeat_s=heartbeat_s, check_consistency=check_consistency,
            liveness=liveness,
        )  # fmt: skip
        worker.engine = engine
        if self.renderer is not None and isinstance(self.renderer.t5, CollectiveTextEncoder):
            self.renderer.t5.run_step = engine.run_step  # rank 0's prompts go through this engine
        self.engine = engine
        return engine

    def render(self, job: RenderJob, sink: JobSink | None = None) -> list[str]:
        """Rank 0: render one job through the engine (all ranks join), then shut the engine down.
        Returns the output names; RenderFailed when the job ended without a video. ``sink`` also gets
        every report (progress, timings, cancel requests)."""
        sink = _CollectingSink(sink)
        pending = [job]

        def source(timeout_s: float) -> RenderJob | None:
            if pending:
                return pending.pop()
            if sink.finished:
                engine.request_shutdown()
            time.sleep(min(timeout_s, 0.05))
            return None

        engine = self.make_engine(sink, source, heartbeat_s=30.0)
        engine.serve(install_signal_handlers=True)
        if self.finisher is not None:
            self.finisher.drain()
        if sink.error is not None:
            raise sink.error
        if not sink.finished:
            raise RenderFailed(f"job {job.job_id}: the engine stopped before the job ended")
        return sink.outputs

    def follow(self) -> None:
        """Ranks > 0: serve until rank 0 sends SHUTDOWN."""
        self.make_engine(None, None).serve(install_signal_handlers=True)

    def shutdown(self) -> None:
        """Rank 0 when the CLI is done. After ``render`` nothing is left to send (its engine broadcast
        SHUTDOWN); a job refused before ``render`` leaves ranks > 0 waiting in ``follow``, so stop them."""
        if not self.ctx.distributed or not self.ctx.is_rank0 or self.engine is not None:
            return
        engine = self.make_engine(None, lambda timeout_s: None)
        engine.request_shutdown()  # the first message it sends is SHUTDOWN
        engine.serve(install_signal_handlers=False)

    def close(self) -> None:
        """Finish the jobs the finisher holds, then leave the process groups (the group's, or the world's
        when this rank's group has none)."""
        if self.finisher is not None:
            self.finisher.close()
            self.finisher = None
        if self.ctx.distributed:
            self.ctx.destroy()
        elif self.world.distributed:
            self.world.destroy(barrier=False)


class _CollectingSink:
    """``Runtime.render``'s sink: logs progress, remembers the outputs or the failure, and forwards
    everything to ``forward`` when given."""

    def __init__(self, forward: JobSink | None = None) -> None:
        self.forward = forward
        self.outputs: list[str] = []
        self.error: RenderFailed | None = None
        self.finished = False
        self._last_log = 0.0

    def progress(self, job_id: str, percent: float, stage: str) -> None:
        now = time.monotonic()
        if now - self._last_log > 2.0 or percent >= 100:
            logger.info("%5.1f%% %s", percent, stage)
            self._last_log = now
        if self.forward is not None:
            self.forward.progress(job_id, percent, stage)

    def timing(self, job_id: str, name: str, seconds: float) -> None:
        logger.info("timing %s = %.2fs", name, seconds)
        if self.forward is not None:
            self.forward.timing(job_id, name, seconds)

    def state(self, job_id: str, state: str) -> None:
        logger.info("job %s: %s", job_id, state)
        if self.forward is not None:
            self.forward.state(job_id, state)

    def cancel_requested(self, job_id: str) -> bool:
        return self.forward is not None and self.forward.cancel_requested(job_id)

    def done(self, job_id: str, outputs: list[str]) -> None:
        self.outputs = outputs
        self.finished = True
        if self.forward is not None:
            self.forward.done(job_id, outputs)

    def failed(self, job_id: str, reason: str, *, cancelled: bool = False, interrupted: bool = False) -> None:
        self.error = RenderFailed(reason, cancelled=cancelled)
        self.finished = True
        if self.forward is not None:
            self.forward.failed(job_id, reason, cancelled=cancelled, interrupted=interrupted)


def _quant_spec(options: RuntimeOptions, mode: str, world: int) -> tuple[QuantSpec | None, tuple[Path, ...]]:
    """``--quant`` / ``--quant_dir`` checked against the layout, and the ``--lora_dir`` files left to read as
    adapters: upstream passes its quantised FusionX model as ``--lora_dir``; with ``--quant`` it is the DiT."""
    if options.quant is None and options.quant_dir is None:
        return None, options.speed.lora_dir
    # optimum-quanto takes seconds to import (it loads its transformers/diffusers integrations); only --quant uses it
    from inference.checkpoint.quant import check_quant_layout, resolve_quant, split_quantized_lora

    quant_file, lora_files = split_quantized_lora(options.quant, options.speed.lora_dir)
    quant = resolve_quant(options.quant, options.quant_dir, quant_file)
    switchable = bool(lora_files) and options.speed.lora_mode == "switchable"
    check_quant_layout(quant, mode, world, switchable_loras=switchable)
    return quant, tuple(lora_files)


def _check_memory(
    options: RuntimeOptions, world: int, device: str | None, offload: bool, mode: str, sp_size: int
) -> None:
    """Refuse a layout the memory plan says cannot fit the GPUs found (nothing is checked on a CPU)."""
    startup_check(
        preset=options.preset,
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0") or "0"),
        device=device,
        resolution=options.plan_resolution,
        frames=options.plan_frames,
        dit_fsdp=mode,
        t5_fsdp=options.t5_fsdp,
        t5_cpu=options.t5_cpu,
        offload_model=offload,
        num_persistent_param_in_dit=options.num_persistent_param_in_dit,
        vae_tiling=options.vae_tiling,
        quant=options.quant,
        sp_size=sp_size,
        rows=3 if options.speed.batched_guidance == "on" else 1,  # "auto" batches only when memory allows
    )


def _num_heads(preset: str) -> int:
    return DiTConfig.preset(preset).num_heads
