"""Sequence-parallel seam between the DiT math and the parallel plumbing.

The model never imports ``torch.distributed``. It receives an ``sp`` object with the
interface below and calls it at four places: ``shard`` after patch embedding,
``attention`` for self-attention, ``token_range`` for frame-local audio attention and
``gather`` before the head. ``NoParallel`` is the identity used on one process; the
Ulysses implementation (``SequenceParallel``) lives beside it and must give the same
result as ``NoParallel`` up to float rounding.

The same module holds the process plumbing the engine builds on: ``ParallelContext`` (rank,
device, a long-timeout gloo *control* group for messages, a short-timeout *data* group for tensors,
a device mesh for FSDP2) and the start-up checks of the requested layout.

Shapes: ``B`` batch, ``S`` true token count, ``S_pad`` padded to a multiple of ``P``,
``S_loc = S_pad / P``, ``H`` heads, ``D`` head dim, ``C`` model dim.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# Aliased: ``attention`` here would read as the sp method of the same name.
from inference.attention import attention as sdpa

logger = logging.getLogger(__name__)

# rope(x: [B, S, h, D]) -> [B, S, h, D]; applies 3-D RoPE by *global* token index.
RopeFn = Callable[[torch.Tensor], torch.Tensor]
# head_fn(q, k, head_start) -> [n, S] partial sum over the given heads.
# q, k: [B, S, h, D] full sequence, after RoPE, h heads starting at global head ``head_start``.
HeadFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class SequenceParallelism(Protocol):
    """What the model may call. Implementations: ``NoParallel`` and ``SequenceParallel``."""

    size: int
    rank: int

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, C] -> [B, S_loc, C]; pads S to a multiple of ``size`` with zeros."""
        ...

    def gather(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        """x: [B, S_loc, C] -> [B, seq_len, C]; all-gathers and drops the padding."""
        ...

    def token_range(self, seq_len: int) -> tuple[int, int]:
        """Global [start, end) of this rank's real (unpadded) tokens; end - start <= S_loc."""
        ...

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_len: int,
        rope: RopeFn,
        head_fn: HeadFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full-sequence self-attention over sharded tokens.

        Args:
            q, k, v: [B, S_loc, H, D]; q and k already RMS-normalised over all heads.
            seq_len: S, the true sequence length (padding is never attended to).
            rope: applied to q and k over the full sequence, after any all-to-all.
            head_fn: optional per-head statistic (the speaker routing map); its
                partial sums over this rank's heads are summed over all heads and
                scattered back to this rank's tokens.

        Returns:
            out: [B, S_loc, H, D]; stat: [n, S_loc] (sum over all H heads) or None.
        """
        ...

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor: ...


class NoParallel:
    """Identity sequence parallelism for one process."""

    size = 1
    rank = 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        return x[:, :seq_len]

    def token_range(self, seq_len: int) -> tuple[int, int]:
        return 0, seq_len

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_len: int,
        rope: RopeFn,
        head_fn: HeadFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k = rope(q[:, :seq_len]), rope(k[:, :seq_len])
        stat = head_fn(q, k, 0) if head_fn is not None else None
        return attend(q, k, v[:, :seq_len]), stat

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor:
        return x


DEFAULT_CONTROL_TIMEOUT = timedelta(minutes=30)
DEFAULT_DATA_TIMEOUT = timedelta(minutes=5)


class ParallelConfigError(ValueError):
    """A parallel layout the engine cannot run; ``field`` names the offending option."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def allowed_sizes(num_heads: int) -> list[int]:
    """Sequence-parallel sizes Ulysses supports for ``num_heads`` heads (its divisors)."""
    return [p for p in range(1, num_heads + 1) if num_heads % p == 0]


def check_heads(num_heads: int, size: int, field: str = "ulysses_size") -> None:
    """Ulysses scatters whole heads, so ``size`` must divide ``num_heads``."""
    if size < 1:
        raise ParallelConfigError(field, f"must be at least 1, got {size}")
    if num_heads % size != 0:
        raise ParallelConfigError(
            field,
            f"{size} does not divide the model's {num_heads} attention heads; "
            f"allowed sizes: {allowed_sizes(num_heads)}",
        )


def check_parallel_sizes(world_size: int, ulysses_size: int, ring_size: int, num_heads: int) -> None:
    """Start-up check of the requested layout; raises ``ParallelConfigError`` naming what is supported.

    Supported: Ulysses only (``ring_size == 1``), over every rank (``ulysses_size == world_size``),
    with ``num_heads % ulysses_size == 0``.
    """
    if ring_size != 1:
        raise ParallelConfigError(
            "ring_size",
            f"ring attention is not implemented (got {ring_size}); use ring_size 1 and "
            f"ulysses_size == world size ({world_size})",
        )
    if ulysses_size != world_size:
        raise ParallelConfigError(
            "ulysses_size",
            f"must equal the number of processes ({world_size}), got {ulysses_size}; "
            "several replica groups are not supported",
        )
    check_heads(num_heads, ulysses_size)


@functools.cache
def _flash_attn_func() -> Callable[..., torch.Tensor] | None:
    # flash-attn is an optional GPU extra; import it on first CUDA use only.
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        logger.info("flash-attn not installed; using torch SDPA on CUDA")
        return None
    return flash_attn_func


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention on [B, S, h, D] tensors: flash-attn for fp16/bf16 CUDA tensors if installed, else SDPA.

    After the Ulysses trim every sequence in the batch has the same length, so the fixed-length
    kernel is enough (no varlen packing).
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        flash = _flash_attn_func()
        if flash is not None:
            return flash(q, k, v)
    return sdpa(q, k, v)


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class SequenceParallel:
    """Ulysses sequence parallelism over ``size`` ranks of ``group`` (DeepSpeed-Ulysses / FastVideo style).

    Tokens are padded to ``S_pad`` (a multiple of ``size``) and sharded once; attention trades the
    sequence shard for a head shard with one all-to-all (q, k and v together) and trades back with a
    second one. The padding is trimmed between the two, so pad keys never enter attention and the
    result equals ``NoParallel`` up to float rounding (exactly, on CPU in fp32).

    ``comm_bytes`` counts what this rank sends per collective kind (pairwise all-to-all, ring
    all-gather / reduce-scatter / all-reduce); ``bench/sp_scaling.py`` prints it.
    """

    def __init__(self, group: ProcessGroup | None, size: int, rank: int) -> None:
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"SequenceParallel: need 0 <= rank < size, got rank={rank} size={size}")
        if dist.is_initialized() and dist.get_world_size(group) != size:
            raise ValueError(
                f"SequenceParallel: size={size} but the process group has {dist.get_world_size(group)} ranks"
            )
        self.group = group
        self.size = size
        self.rank = rank
        # Test-only switch for the negative control: leave padded tokens in attention.
        self._trim_padding = True
        self.comm_bytes: dict[str, int] = dict.fromkeys(
            ("all_to_all", "all_gather", "reduce_scatter", "all_reduce"), 0
        )

    def __repr__(self) -> str:
        return f"SequenceParallel(size={self.size}, rank={self.rank})"

    # ---- token layout ---------------------------------------------------------------------

    def padded_len(self, seq_len: int) -> int:
        """S_pad: ``seq_len`` rounded up to a multiple of ``size``."""
        return _ceil_to(seq_len, self.size)

    def local_len(self, seq_len: int) -> int:
        """S_loc = S_pad / size."""
        return self.padded_len(seq_len) // self.size

    def token_range(self, seq_len: int) -> tuple[int, int]:
        s_loc = self.local_len(seq_len)
        start = min(self.rank * s_loc, seq_len)
        return start, min(start + s_loc, seq_len)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        s_loc = self.local_len(s)
        x = _pad_dim(x, 1, s_loc * self.size)
        # contiguous() copies the chunk so the full-sequence tensor can be freed.
        return x.narrow(1, self.rank * s_loc, s_loc).contiguous()

    def gather(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        b, s_loc = x.shape[:2]
        if s_loc != self.local_len(seq_len):
            raise ValueError(
                f"gather: local length {s_loc} does not match seq_len={seq_len} at P={self.size}"
            )
        out = x.new_empty((self.size * b, *x.shape[1:]))
        self._all_gather(out, x.contiguous())
        out = out.view(self.size, b, *x.shape[1:]).transpose(0, 1)  # [B, P, S_loc, ...]
        return out.reshape(b, self.size * s_loc, *x.shape[2:])[:, :seq_len]

    # ---- attention ------------------------------------------------------------------------

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_len: int,
        rope: RopeFn,
        head_fn: HeadFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not q.shape == k.shape == v.shape:
            raise ValueError(f"attention: q, k, v must share a shape, got {q.shape}, {k.shape}, {v.shape}")
        b, s_loc, h, d = q.shape
        p = self.size
        check_heads(h, p, field="attention heads")
        s_pad = s_loc * p
        if self.padded_len(seq_len) != s_pad:
            raise ValueError(f"attention: local length {s_loc} does not match seq_len={seq_len} at P={p}")
        hl = h // p

        # [B, S_loc, 3, H, D] -> [P, B, S_loc, 3, H/P, D]: split heads rank-major so that the chunk sent
        # to rank r holds r's q, k and v heads together (a plain cat of q, k, v would mix them).
        qkv = torch.stack((q, k, v), dim=2).view(b, s_loc, 3, p, hl, d).permute(3, 0, 1, 2, 4, 5)
        qkv = self._all_to_all(qkv.contiguous())  # [P(src), B, S_loc, 3, H/P, D]: src's tokens, my heads
        qkv = qkv.permute(1, 0, 2, 3, 4, 5).reshape(b, s_pad, 3, hl, d)
        qf, kf, vf = qkv[:, :seq_len].unbind(dim=2)  # [B, S, H/P, D] each, padding trimmed
        qf, kf = rope(qf), rope(kf)

        stat = None
        if head_fn is not None:
            stat = self._reduce_scatter_stat(head_fn(qf, kf, self.rank * hl), seq_len)

        if self._trim_padding:
            out = attend(qf, kf, vf)
            out = _pad_dim(out, 1, s_pad)
        else:
            # Negative control only: pad tokens stay as keys (rotated nowhere, attended everywhere).
            pad = slice(seq_len, s_pad)
            qp = torch.cat((qf, qkv[:, pad, 0]), dim=1)
            kp = torch.cat((kf, qkv[:, pad, 1]), dim=1)
            out = attend(qp, kp, qkv[:, :, 2])

        # [B, S_pad, H/P, D] -> [P(dst), B, S_loc, H/P, D]; back comes [P(src), ...] = my tokens, src's heads.
        out = self._all_to_all(out.view(b, p, s_loc, hl, d).transpose(0, 1).contiguous())
        return out.permute(1, 2, 0, 3, 4).reshape(b, s_loc, h, d), stat

    def _reduce_scatter_stat(self, partial: torch.Tensor, seq_len: int) -> torch.Tensor:
        """partial: [..., S] over this rank's heads -> [..., S_loc] summed over all ranks' heads."""
        if partial.shape[-1] != seq_len:
            raise ValueError(f"head_fn must return [..., {seq_len}], got {tuple(partial.shape)}")
        lead = partial.shape[:-1]
        s_pad = self.padded_len(seq_len)
        # Sum in fp32 whatever the compute dtype; the map is tiny ([n, S]).
        flat = _pad_dim(partial.reshape(-1, seq_len).float(), 1, s_pad).T.contiguous()  # [S_pad, n]
        out = flat.new_empty((s_pad // self.size, flat.shape[1]))
        self._reduce_scatter(out, flat)
        return out.T.reshape(*lead, -1).to(partial.dtype)

    # ---- reductions -----------------------------------------------------------------------

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(x, dist.ReduceOp.MAX)

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(x, dist.ReduceOp.MIN)

    # ---- collectives ----------------------------------------------------------------------

    def _count(self, kind: str, nbytes: float) -> None:
        self.comm_bytes[kind] += int(nbytes)

    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """x: [P, ...] with chunk i going to rank i -> [P, ...] with chunk i from rank i."""
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        self._count("all_to_all", x.numel() * x.element_size() * (self.size - 1) / self.size)
        return out

    def _all_gather(self, out: torch.Tensor, x: torch.Tensor) -> None:
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(out, x, group=self.group)
        self._count("all_gather", x.numel() * x.element_size() * (self.size - 1))

    def _reduce_scatter(self, out: torch.Tensor, x: torch.Tensor) -> None:
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        fn(out, x, op=dist.ReduceOp.SUM, group=self.group)
        self._count("reduce_scatter", x.numel() * x.element_size() * (self.size - 1) / self.size)

    def _all_reduce(self, x: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, op=op, group=self.group)
        self._count("all_reduce", 2 * y.numel() * y.element_size() * (self.size - 1) / self.size)
        return y


def _pad_dim(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` up to ``length``."""
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    if extra < 0:
        raise ValueError(f"cannot pad dim {dim} of size {x.shape[dim]} down to {length}")
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat((x, x.new_zeros(shape)), dim=dim)


# ---- process context ------------------------------------------------------------------------


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
