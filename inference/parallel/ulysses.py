"""Ulysses sequence parallelism: the multi-rank implementation of the model's ``sp`` seam.

The protocol and the one-process identity (``NoParallel``) live with the model in
``inference.model.sp``; this class must give the same result as ``NoParallel`` up to float rounding.

Shapes: ``B`` batch, ``S`` true token count, ``S_pad`` padded to a multiple of ``P``,
``S_loc = S_pad / P``, ``H`` heads, ``D`` head dim, ``C`` model dim.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from inference.model.attention import attend
from inference.model.sp import HeadFn, RopeFn
from inference.parallel.layout import check_heads

logger = logging.getLogger(__name__)


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

    def _check_qkv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int, head_split: int
    ) -> None:
        """q, k, v: [B, S_loc, H, D] alike, H divisible by ``head_split``, S_loc = ``local_len(seq_len)``."""
        if not q.shape == k.shape == v.shape:
            raise ValueError(f"attention: q, k, v must share a shape, got {q.shape}, {k.shape}, {v.shape}")
        check_heads(q.shape[2], head_split, field="attention heads")
        if self.local_len(seq_len) != q.shape[1]:
            raise ValueError(
                f"attention: local length {q.shape[1]} does not match seq_len={seq_len} at P={self.size}"
            )

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_len: int,
        rope: RopeFn,
        head_fn: HeadFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_qkv(q, k, v, seq_len, head_split=self.size)
        b, s_loc, h, d = q.shape
        p = self.size
        s_pad = s_loc * p
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
