"""The SPMD serving loop: every rank runs ``Engine.serve`` on its main thread.

Rank 0 pulls jobs from a queue, turns each into a small ``Message`` plus named tensors
(``Worker.prepare``) and broadcasts them; every rank then runs the same ``Worker.run`` (the
sequence-parallel denoising loop) and rank 0 hands the result back (``Worker.finish``).

Control plane (design B.1):

- Messages go over the gloo *control* group (long timeout). When no job arrives within
  ``heartbeat_s`` rank 0 broadcasts ``NOOP``, so idle ranks never approach a timeout and a dead
  rank surfaces as an error on rank 0's next broadcast.
- Before the first data collective of a job every rank runs ``Worker.preflight`` and the ranks
  agree with ``all_gather_object`` on the control group; if any rank refuses, every rank skips
  the job and rank 0 reports the first reason. Nothing has touched the data group yet, so
  nothing can deadlock.
- Tensors follow on the *data* group (NCCL on GPU), received into buffers allocated from the
  message's ``TensorSpec`` list.
- Inside the collective region (tensor broadcast + ``run``) any exception is fatal: it is logged
  and re-raised as ``EngineFatalError`` so the process exits non-zero and torchrun restarts every
  rank (crash-only; a half-issued collective cannot be resynchronised). The entry point should be
  decorated with ``torch.distributed.elastic.multiprocessing.errors.record``.
- A collective step inside ``prepare``: with ``--t5_fsdp`` the text encoder is sharded over every
  rank, so rank 0 encodes a prompt with ``run_step(Message(ENCODE_TEXT, ...))``: the waiting ranks take
  the message, every rank runs ``Worker.step`` (the sharded forward) and goes back to waiting. A
  failure there is fatal like one inside a job.
- SIGINT/SIGTERM on any rank set a flag, which the ranks share after every heartbeat (a tiny
  all-reduce on the control group) and at every step boundary; rank 0 then broadcasts
  ``SHUTDOWN`` and ``serve`` returns on every rank (the caller then calls
  ``ParallelContext.destroy`` and exits 0). A running job stops at its next step boundary first.
- ``JobContext.step_boundary`` all-reduces a cancel flag once per sampling step (and, in debug
  mode, a checksum of the latents), so a cancelled job stops at the same step on every rank.
- Hung peers: a ``Watchdog`` (``inference.parallel.watchdog``) bounds every wait for other ranks:
  rank 0's message broadcasts, each heartbeat and the pre-flight agreement must finish within
  ``reply_s``; inside a job every model pass and step boundary must come within ``stall_s`` of the
  last (more when passes are known to be long). Past a deadline the rank exits with ``EXIT_HUNG``, so
  a stopped rank costs a group restart within ``stall_s`` instead of the data group's timeout.
- Replica groups (``inference.parallel.groups``): the engine runs on its group's context, so "rank 0"
  is the group's leader and broadcasts name their source by group rank (``group_src``); R groups run R
  engines side by side, each with its own job source.
- Liveness: ``JobContext.signal_passes(model)`` reports the start and end of every model pass to the
  engine's ``Liveness`` (rank 0's health monitor), so a long sampling step (three passes) never
  looks like a hung engine, and the monitor learns how long one pass takes.
"""

from __future__ import annotations

import enum
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from inference.parallel.context import ParallelContext
from inference.parallel.watchdog import DEFAULT_REPLY_S, DEFAULT_STALL_S, Watchdog

logger = logging.getLogger(__name__)

# A job source on rank 0: a queue, or a callable ``source(timeout_s) -> job | None``.
JobSource = queue.Queue | Callable[[float], Any]


class Op(enum.Enum):
    DENOISE = "denoise"  # run one clip's sampling loop on every rank
    ENCODE_TEXT = "encode_text"  # every rank joins the sharded T5 (--t5_fsdp); rank 0 keeps the result
    NOOP = "noop"  # idle heartbeat; doubles as a liveness probe
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class TensorSpec:
    """What a receiving rank allocates before the broadcast of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> TensorSpec:
        return cls(name, tuple(t.shape), t.dtype)

    def matches(self, t: torch.Tensor) -> bool:
        return tuple(t.shape) == self.shape and t.dtype == self.dtype

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)


@dataclass(frozen=True)
class Message:
    """One broadcast from rank 0; small and picklable. Tensors travel separately on the data group."""

    op: Op
    job_id: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    tensor_specs: tuple[TensorSpec, ...] = ()


class EngineFatalError(RuntimeError):
    """A failure inside the collective region (or of the control plane): this process must exit."""


class RankDivergenceError(RuntimeError):
    """Latents differ across ranks (debug consistency check)."""


class Worker(Protocol):
    """The work the engine runs. ``preflight`` and ``run`` execute on every rank; ``prepare``,
    ``finish`` and ``reject`` on rank 0 only, outside any collective."""

    def preflight(self, msg: Message) -> str | None:
        """Can this rank run ``msg``? None for yes, else a reason (e.g. not enough free memory)."""
        ...

    def run(
        self, msg: Message, tensors: dict[str, torch.Tensor], job: JobContext
    ) -> dict[str, torch.Tensor] | None:
        """The collective work, on every rank with the same ``msg`` and ``tensors``.

        Call ``job.step_boundary(latents)`` once per sampling step and stop when it returns True.
        The return value is used on rank 0 only.
        """
        ...

    def prepare(self, job: Any) -> tuple[Message, dict[str, torch.Tensor]]:
        """Rank 0: turn a job into a DENOISE message and its tensors. Raising rejects the job
        (nothing has been broadcast yet)."""
        ...

    def finish(self, job: Any, result: dict[str, torch.Tensor] | None) -> Any | None:
        """Rank 0: hand the result back. May return a follow-up job (e.g. the next clip of a long
        video) that is served before the queue; None when the job is done."""
        ...

    def reject(self, job: Any, reason: str) -> None:
        """Rank 0: the job was refused (pre-flight), failed to prepare/finish, or was cancelled."""
        ...

    def step(self, msg: Message) -> Any:
        """Every rank: a collective step rank 0 starts from inside ``prepare`` (``Engine.run_step``), e.g.
        ENCODE_TEXT through a T5 sharded over the ranks. The return value is used on rank 0 only."""
        ...


class Liveness(Protocol):
    """Who hears that the engine is making progress inside a job (rank 0's health monitor)."""

    def pass_started(self) -> None: ...

    def pass_finished(self, seconds: float) -> None: ...


class JobContext:
    """Per-job handle passed to ``Worker.run`` on every rank."""

    def __init__(
        self,
        parallel: ParallelContext,
        msg: Message,
        cancel_requested: Callable[[], bool],
        stop: threading.Event,
        check_consistency: bool = False,
        liveness: Liveness | None = None,
        beat: Callable[[float | None], None] | None = None,
    ) -> None:
        self.parallel = parallel
        self.msg = msg
        self.step = 0
        self.cancelled = False
        self._cancel_requested = cancel_requested
        self._stop = stop
        self._check = check_consistency
        self._liveness = liveness
        self._beat = beat

    @contextmanager
    def signal_passes(self, model: torch.nn.Module) -> Iterator[None]:
        """While open, every forward of ``model`` (one model pass) is reported to the engine's
        ``Liveness``: its start, and its end with the seconds it took; both also feed the engine's
        hung-peer watchdog. A no-op without either."""
        liveness, beat = self._liveness, self._beat
        if liveness is None and beat is None:
            yield
            return
        started: list[float] = []

        def before(_module: torch.nn.Module, _args: Any) -> None:
            started.append(time.monotonic())
            if beat is not None:
                beat(None)
            if liveness is not None:
                liveness.pass_started()

        def after(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
            seconds = time.monotonic() - started.pop()
            if beat is not None:
                beat(seconds)
            if liveness is not None:
                liveness.pass_finished(seconds)

        handles = (model.register_forward_pre_hook(before), model.register_forward_hook(after))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @property
    def job_id(self) -> str:
        return self.msg.job_id

    def step_boundary(self, latents: torch.Tensor | None = None) -> bool:
        """Once per sampling step on every rank: True when the job must stop (same answer everywhere).

        One all-reduce (MAX) on the data group carries [cancel, shutdown] and, with
        ``check_consistency``, two checksums of ``latents`` as (c, -c) so MAX and MIN come back
        together. Cancel is set by ``Engine.cancel`` (rank 0); shutdown by a signal on *any* rank,
        and it is propagated so every rank's engine then shuts down. Checksums that differ raise
        ``RankDivergenceError``.
        """
        self.step += 1
        ctx = self.parallel
        if self._beat is not None:
            self._beat(None)
        stop = self._stop.is_set()
        local = torch.tensor([float(stop or self._cancel_requested()), float(stop)], dtype=torch.float64)
        check = self._check and latents is not None
        if not ctx.distributed:
            self.cancelled = bool(local[0] > 0)
            return self.cancelled
        sums = _checksums(latents) if check else torch.zeros(2, dtype=torch.float64)
        flags = torch.cat((local, sums, -sums)).to(ctx.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=ctx.data)
        flags = flags.cpu()
        if check and not torch.equal(flags[2:4], -flags[4:6]):
            raise RankDivergenceError(
                f"job {self.job_id!r} step {self.step}: latents differ across ranks "
                f"(checksum max {flags[2:4].tolist()} vs min {(-flags[4:6]).tolist()})"
            )
        if flags[1] > 0 and not stop:
            logger.warning("rank %d: another rank is shutting down; stopping too", ctx.rank)
            self._stop.set()
        self.cancelled = bool(flags[0] > 0)
        return self.cancelled


def _checksums(x: torch.Tensor) -> torch.Tensor:
    """Two order-sensitive float64 checksums of ``x`` (plain and position-weighted sums)."""
    flat = x.detach().reshape(-1).double().nan_to_num(nan=0.0, posinf=1e300, neginf=-1e300)
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
    return torch.stack((flat.sum(), (flat * weights).sum())).cpu()


class Engine:
    """The serving loop of one rank. Construct on every rank; call ``serve`` on the main thread.

    ``jobs`` (rank 0 only) is a ``queue.Queue`` or a callable ``source(timeout_s) -> job | None``;
    ``submit``, ``cancel`` and ``request_shutdown`` are thread-safe, for the UI/API threads.
    """

    def __init__(
        self,
        worker: Worker,
        ctx: ParallelContext,
        jobs: JobSource | None = None,
        *,
        heartbeat_s: float = 60.0,
        check_consistency: bool = False,
        poll_s: float = 0.25,
        liveness: Liveness | None = None,
        reply_s: float = DEFAULT_REPLY_S,
        stall_s: float = DEFAULT_STALL_S,
    ) -> None:
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be positive, got {heartbeat_s}")
        if reply_s <= 0 or stall_s <= 0:
            raise ValueError(f"reply_s and stall_s must be positive, got {reply_s} and {stall_s}")
        if heartbeat_s >= ctx.control_timeout.total_seconds():
            logger.warning(
                "heartbeat %.1fs is not below the control-group timeout %s: idle ranks may time out",
                heartbeat_s,
                ctx.control_timeout,
            )
        self.worker = worker
        self.ctx = ctx
        self.jobs: JobSource = jobs if jobs is not None else queue.Queue()
        self.heartbeat_s = heartbeat_s
        self.check_consistency = check_consistency
        self.poll_s = poll_s
        self.liveness = liveness
        self.reply_s = reply_s
        self.stall_s = stall_s
        # Hung-peer deadlines; one process has no peers to wait for.
        self.watchdog = Watchdog(ctx.rank) if ctx.distributed else None
        self._longest_pass_s = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._running_job_id: str | None = None
        self.jobs_run = 0

    # ---- thread-safe controls (rank 0) -------------------------------------------------------

    def submit(self, job: Any) -> None:
        if not isinstance(self.jobs, queue.Queue):
            raise TypeError("submit() needs the engine to own a queue.Queue job source")
        self.jobs.put(job)

    def cancel(self, job_id: str) -> None:
        """Stop ``job_id`` at its next step boundary on every rank (or drop it before it starts)."""
        with self._lock:
            self._cancelled.add(job_id)

    def request_shutdown(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ---- the loop -----------------------------------------------------------------------------

    def serve(self, install_signal_handlers: bool = True) -> None:
        """Serve until SHUTDOWN. Returns normally on every rank after a clean shutdown; raises
        ``EngineFatalError`` when a collective or the job's work failed (exit non-zero)."""
        ctx = self.ctx
        logger.info(
            "rank %d: serving (world %d, heartbeat %.1fs)", ctx.rank, ctx.world_size, self.heartbeat_s
        )
        follow_up: Any | None = None
        with self._signal_handlers(install_signal_handlers):
            while True:
                job, msg, tensors = None, None, {}
                if ctx.is_rank0:
                    job, msg, tensors = self._next_message(follow_up)
                    follow_up = None
                msg = self._broadcast_message(msg)
                if msg.op is Op.NOOP:
                    self._agree_on_stop()
                    continue
                if msg.op is Op.SHUTDOWN:
                    logger.info("rank %d: shutdown after %d job(s)", ctx.rank, self.jobs_run)
                    return
                if msg.op is Op.ENCODE_TEXT:  # rank 0 sends these from inside prepare (run_step)
                    self._step(msg)
                    continue
                if msg.op is not Op.DENOISE:
                    raise EngineFatalError(f"rank {ctx.rank}: unknown op {msg.op!r}")
                refusal = self._agree(msg)
                if refusal is not None:
                    logger.warning("rank %d: job %r skipped by every rank: %s", ctx.rank, msg.job_id, refusal)
                    if ctx.is_rank0:
                        self._safe_reject(job, refusal)
                    continue
                result, job_ctx = self._collective_region(msg, tensors)
                self.jobs_run += 1
                if ctx.is_rank0:
                    follow_up = self._finish(job, msg, result, job_ctx)

    def _next_message(self, follow_up: Any | None) -> tuple[Any, Message, dict[str, torch.Tensor]]:
        """Rank 0: the next DENOISE (prepared), a NOOP after ``heartbeat_s`` idle, or SHUTDOWN."""
        deadline = time.monotonic() + self.heartbeat_s
        while True:
            if self._stop.is_set():
                if follow_up is not None:  # the next clip of a job: it ends as interrupted, not silently
                    self._safe_reject(follow_up, "stopped between two clips by the shutdown")
                return None, Message(Op.SHUTDOWN), {}
            if follow_up is not None:
                job, follow_up = follow_up, None
            else:
                job = self._poll(min(self.poll_s, max(0.0, deadline - time.monotonic())))
                if job is None:
                    if time.monotonic() >= deadline:
                        return None, Message(Op.NOOP), {}
                    continue
            prepared = self._prepare(job)
            if prepared is not None:
                return (job, *prepared)

    def _poll(self, timeout_s: float) -> Any | None:
        if isinstance(self.jobs, queue.Queue):
            try:
                return self.jobs.get(timeout=timeout_s) if timeout_s > 0 else self.jobs.get_nowait()
            except queue.Empty:
                return None
        return self.jobs(timeout_s)

    def _prepare(self, job: Any) -> tuple[Message, dict[str, torch.Tensor]] | None:
        """Rank 0, before anything is broadcast: failures here reject the job and are not fatal."""
        try:
            msg, tensors = self.worker.prepare(job)
            _check_prepared(msg, tensors)
        except EngineFatalError:
            raise  # a collective step inside prepare failed: peers may be stuck in it
        except Exception as exc:
            logger.warning("job rejected while preparing: %s", exc, exc_info=not isinstance(exc, ValueError))
            self._safe_reject(job, f"{type(exc).__name__}: {exc}")
            return None
        with self._lock:
            if msg.job_id in self._cancelled:
                self._cancelled.discard(msg.job_id)
                self._safe_reject(job, "cancelled before it started")
                return None
            self._running_job_id = msg.job_id
        return msg, tensors

    def run_step(self, msg: Message) -> Any:
        """Rank 0, from inside ``Worker.prepare``: broadcast ``msg`` (an ENCODE_TEXT) and run
        ``Worker.step(msg)`` on every rank; returns rank 0's result. The other ranks are waiting for the
        next message, take this one, run the step and wait again. Any failure is fatal (crash-only), as
        in a job's collective region: check inputs before calling."""
        if not self.ctx.is_rank0:
            raise RuntimeError("run_step is called by rank 0; the other ranks take the step in serve()")
        if msg.op is not Op.ENCODE_TEXT:
            raise ValueError(f"run_step sends ENCODE_TEXT messages, got {msg.op}")
        return self._step(self._broadcast_message(msg))

    def _step(self, msg: Message) -> Any:
        try:
            with self._guard(f"{msg.op.value} step", self._stall_limit()), torch.no_grad():
                return self.worker.step(msg)
        except BaseException as exc:
            logger.critical("rank %d: fatal error in the %s step (crash-only exit)", self.ctx.rank,
                            msg.op.value, exc_info=True)  # fmt: skip
            why = f"{msg.op.value} failed: {type(exc).__name__}: {exc}"
            raise EngineFatalError(f"rank {self.ctx.rank}: {why}") from exc

    def _broadcast_message(self, msg: Message | None) -> Message:
        if not self.ctx.distributed:
            assert msg is not None
            return msg
        box = [msg]
        try:
            # Rank 0's send completes when every peer has taken the message; a peer's wait for the
            # next message is not bounded (rank 0 may prepare a job for minutes).
            with self._guard(f"control broadcast of {msg.op.value}" if msg is not None else None):
                dist.broadcast_object_list(box, group_src=0, group=self.ctx.control)
        except Exception as exc:
            logger.critical(
                "rank %d: control broadcast failed; a rank is gone or hung", self.ctx.rank, exc_info=True
            )
            raise EngineFatalError(f"rank {self.ctx.rank}: control broadcast failed: {exc}") from exc
        if not isinstance(box[0], Message):
            raise EngineFatalError(f"rank {self.ctx.rank}: expected a Message, got {type(box[0]).__name__}")
        return box[0]

    def _agree(self, msg: Message) -> str | None:
        """Every rank's pre-flight verdict, gathered on the control group; the first refusal or None."""
        try:
            verdict = self.worker.preflight(msg)
        except Exception as exc:
            logger.warning("rank %d: preflight raised", self.ctx.rank, exc_info=True)
            verdict = f"preflight raised {type(exc).__name__}: {exc}"
        if not self.ctx.distributed:
            return None if verdict is None else f"rank 0: {verdict}"
        verdicts: list[Any] = [None] * self.ctx.world_size
        try:
            with self._guard(f"pre-flight agreement on job {msg.job_id!r}"):
                dist.all_gather_object(verdicts, verdict, group=self.ctx.control)
        except Exception as exc:
            logger.critical("rank %d: pre-flight agreement failed", self.ctx.rank, exc_info=True)
            raise EngineFatalError(f"rank {self.ctx.rank}: pre-flight agreement failed: {exc}") from exc
        for rank, reason in enumerate(verdicts):
            if reason is not None:
                return f"rank {rank}: {reason}"
        return None

    def _collective_region(
        self, msg: Message, tensors: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor] | None, JobContext]:
        ctx = self.ctx
        try:
            with self._guard(f"job {msg.job_id!r}", self._stall_limit()):
                received = self._broadcast_tensors(msg, tensors)
                job_ctx = JobContext(
                    ctx, msg, self._cancel_flag(msg.job_id), self._stop, self.check_consistency, self.liveness,
                    beat=self._beat if self.watchdog is not None else None,
                )  # fmt: skip
                with torch.no_grad():
                    result = self.worker.run(msg, received, job_ctx)
        except BaseException as exc:
            # Peers may be blocked in a collective this rank will never join: crash, do not resync.
            logger.critical(
                "rank %d: fatal error in job %r (crash-only exit)", ctx.rank, msg.job_id, exc_info=True
            )
            raise EngineFatalError(
                f"rank {ctx.rank}: job {msg.job_id!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        return result, job_ctx

    def _broadcast_tensors(self, msg: Message, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ctx = self.ctx
        out: dict[str, torch.Tensor] = {}
        for spec in msg.tensor_specs:
            if ctx.is_rank0:
                t = tensors[spec.name].to(ctx.device).contiguous()
            else:
                t = spec.empty(ctx.device)
            if ctx.distributed:
                dist.broadcast(t, group_src=0, group=ctx.data)
            out[spec.name] = t
        return out

    @contextmanager
    def _guard(self, what: str | None, limit_s: float | None = None) -> Iterator[None]:
        """Bound a wait for the other ranks (``reply_s`` unless given); unguarded when ``what`` is None."""
        if self.watchdog is None or what is None:
            yield
            return
        with self.watchdog.guard(what, self.reply_s if limit_s is None else limit_s):
            yield

    def _stall_limit(self) -> float:
        """Longest silence allowed inside a job: ``stall_s``, or three of the longest model pass seen
        when passes are that slow; twice ``stall_s`` before the first pass (warm-up)."""
        if self._longest_pass_s <= 0:
            return 2 * self.stall_s
        return max(self.stall_s, 3 * self._longest_pass_s)

    def _beat(self, pass_seconds: float | None) -> None:
        """Progress inside a job (a pass began or ended, a step boundary): push the deadline."""
        if pass_seconds is not None:
            self._longest_pass_s = max(self._longest_pass_s, pass_seconds)
        if self.watchdog is not None:
            self.watchdog.beat(self._stall_limit())

    def _cancel_flag(self, job_id: str) -> Callable[[], bool]:
        def cancel_requested() -> bool:
            with self._lock:
                return job_id in self._cancelled

        return cancel_requested

    def _agree_on_stop(self) -> None:
        """After each NOOP: one tiny all-reduce on the control group, so a signal that reached any
        rank (not only rank 0) shuts the whole group down within one heartbeat."""
        if not self.ctx.distributed:
            return
        flag = torch.tensor([float(self._stop.is_set())])
        try:
            with self._guard("heartbeat all-reduce"):
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.control)
        except Exception as exc:
            logger.critical("rank %d: heartbeat all-reduce failed", self.ctx.rank, exc_info=True)
            raise EngineFatalError(f"rank {self.ctx.rank}: heartbeat failed: {exc}") from exc
        if flag.item() > 0 and not self._stop.is_set():
            logger.warning("rank %d: another rank is shutting down; stopping too", self.ctx.rank)
            self._stop.set()

    def _finish(
        self, job: Any, msg: Message, result: dict[str, torch.Tensor] | None, job_ctx: JobContext
    ) -> Any:
        with self._lock:
            self._cancelled.discard(msg.job_id)
            self._running_job_id = None
        if job_ctx.cancelled:
            why = "shutdown" if self._stop.is_set() else "cancel request"
            self._safe_reject(job, f"cancelled at step {job_ctx.step} ({why})")
            return None
        try:
            return self.worker.finish(job, result)
        except Exception as exc:
            # Peers are already back on the control group; this failure is the job's, not the engine's.
            logger.error("job %r failed after denoising", msg.job_id, exc_info=True)
            self._safe_reject(job, f"{type(exc).__name__}: {exc}")
            return None

    def _safe_reject(self, job: Any, reason: str) -> None:
        try:
            self.worker.reject(job, reason)
        except Exception:
            logger.error("reject() raised for a job refused with %r", reason, exc_info=True)

    @contextmanager
    def _signal_handlers(self, install: bool) -> Iterator[None]:
        if not install or threading.current_thread() is not threading.main_thread():
            if install:
                logger.warning("serve() is not on the main thread; SIGINT/SIGTERM handlers not installed")
            yield
            return

        def on_signal(signum: int, _frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._stop.is_set():
                logger.warning("rank %d: %s again; shutdown already under way", self.ctx.rank, name)
            else:
                logger.warning(
                    "rank %d: %s received; shutting down after the current step", self.ctx.rank, name
                )
            self._stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _check_prepared(msg: Message, tensors: Mapping[str, torch.Tensor]) -> None:
    """The driver's message must describe exactly the tensors it sends."""
    if msg.op is not Op.DENOISE:
        raise ValueError(f"prepare() must return a DENOISE message, got {msg.op}")
    names = [s.name for s in msg.tensor_specs]
    if len(set(names)) != len(names) or set(names) != set(tensors):
        raise ValueError(f"tensor_specs {sorted(names)} do not match the tensors {sorted(tensors)}")
    for spec in msg.tensor_specs:
        if not spec.matches(tensors[spec.name]):
            t = tensors[spec.name]
            raise ValueError(
                f"tensor {spec.name!r} is {tuple(t.shape)} {t.dtype}, spec says {spec.shape} {spec.dtype}"
            )


def serve(
    worker: Worker,
    ctx: ParallelContext,
    jobs: JobSource | None = None,
    *,
    heartbeat_s: float = 60.0,
    check_consistency: bool = False,
) -> Engine:
    """Build an ``Engine`` and serve until SHUTDOWN; returns the engine (for ``jobs_run``)."""
    engine = Engine(worker, ctx, jobs, heartbeat_s=heartbeat_s, check_consistency=check_consistency)
    engine.serve()
    return engine
