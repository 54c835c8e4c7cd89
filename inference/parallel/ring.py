"""Ring attention combined with Ulysses (unified sequence parallelism): the ``sp`` seam over ulysses x ring ranks.

The token sequence is padded to a multiple of ``P = ulysses x ring`` and sharded in rank order, so the
ranks of one ring position (one Ulysses group) together hold one contiguous *ring chunk* of
``C = ulysses x S_loc`` tokens. Self-attention then runs in three stages:

1. Ulysses all-to-all inside the Ulysses group: each rank trades its S_loc tokens x H heads for its
   ring chunk's C tokens x H/ulysses heads (as ``SequenceParallel`` does over the whole sequence).
2. Ring: RoPE by global position; the queries stay, and the ring chunk's keys and values travel
   around the ``ring`` ranks that hold the same heads. While a rank attends to the block it holds, it
   already sends that block on and receives the next one (``batch_isend_irecv``; async on NCCL and
   gloo). Each block's result comes with its log-sum-exp, and the partial results are merged exactly:
   ``out = sum_b exp(lse_b - lse) out_b`` with ``lse = log sum_b exp(lse_b)``.
3. Ulysses all-to-all back to S_loc tokens x H heads.

Padding sits at the end of the sequence; the pad rows of a block are sliced off before attention, so a
pad key is never attended. The routing statistic (``head_fn``) needs each query's scores against the
reference-frame keys, which may live on other ring ranks: every block passes through every rank of the
ring, so the real keys are collected on the way (no extra transfer), ``head_fn`` runs on this rank's
queries and heads, and a reduce-scatter in the Ulysses group sums over heads and returns each rank's
tokens. The result equals ``NoParallel`` up to float rounding.

Shapes: ``B`` batch, ``S`` true token count, ``S_loc`` tokens per rank, ``C = ulysses x S_loc`` tokens
per ring chunk, ``H`` heads, ``h = H / ulysses`` heads per rank after the all-to-all, ``D`` head dim.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from inference.model.attention import attend_with_lse
from inference.model.sp import HeadFn, RopeFn
from inference.parallel.ulysses import SequenceParallel, _pad_dim

logger = logging.getLogger(__name__)


def merge_partial(
    acc: torch.Tensor | None,
    lse: torch.Tensor | None,
    out: torch.Tensor,
    out_lse: torch.Tensor,
    rescale: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's attention into the running result, exactly, by log-sum-exp.

    Args:
        acc, lse: running output [B, n, h, D] float32 and its LSE [B, h, n] float32 (None at first).
        out, out_lse: this block's output [B, n, h, D] and LSE [B, h, n].
        rescale: test-only switch; False leaves the running output unrescaled (the negative control).

    Returns:
        (acc, lse) after the block.
    """
    out, out_lse = out.float(), out_lse.float()
    if acc is None or lse is None:
        return out, out_lse
    merged = torch.logaddexp(lse, out_lse)
    w_new = torch.exp(out_lse - merged).transpose(1, 2).unsqueeze(-1)  # [B, n, h, 1]
    if not rescale:
        return acc + out * w_new, merged
    w_old = torch.exp(lse - merged).transpose(1, 2).unsqueeze(-1)
    return acc * w_old + out * w_new, merged


class UnifiedSequenceParallel(SequenceParallel):
    """Ulysses inside, ring outside over ``ulysses_size x ring_size`` ranks (xDiT's USP layout).

    ``group`` spans all ``P`` ranks of the forward (sharding, gathering, min/max); ``rank`` is this
    rank's place in it, ``ring_rank * ulysses_size + ulysses_rank``. ``ulysses_group`` holds the
    ranks of this ring position (group rank = Ulysses rank); ``ring_group`` the ranks with this
    rank's heads at every ring position (group rank = ring rank). ``comm_bytes`` adds
    ``ring_p2p``: the key/value bytes this rank sends around the ring.
    """

    def __init__(
        self,
        group: ProcessGroup | None,
        ulysses_group: ProcessGroup | None,
        ring_group: ProcessGroup | None,
        ulysses_size: int,
        ring_size: int,
        rank: int,
    ) -> None:
        super().__init__(group, ulysses_size * ring_size, rank)
        if dist.is_initialized():
            for name, grp, size in (
                ("ulysses", ulysses_group, ulysses_size),
                ("ring", ring_group, ring_size),
            ):
                if size > 1 and dist.get_world_size(grp) != size:
                    raise ValueError(f"{name} group has {dist.get_world_size(grp)} ranks, expected {size}")
        self.ulysses_group = ulysses_group
        self.ring_group = ring_group
        self.ulysses_size = ulysses_size
        self.ring_size = ring_size
        self.ring_rank, self.ulysses_rank = divmod(rank, ulysses_size)
        # Test-only switch for the negative control: merge blocks without rescaling the running output.
        self._rescale = True
        self.comm_bytes["ring_p2p"] = 0

    def __repr__(self) -> str:
        return (
            f"UnifiedSequenceParallel(ulysses={self.ulysses_size}, ring={self.ring_size}, "
            f"rank={self.rank} = ring {self.ring_rank} x ulysses {self.ulysses_rank})"
        )

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
        self._check_qkv(q, k, v, seq_len, head_split=self.ulysses_size)
        b, s_loc, h_all, d = q.shape
        chunk = s_loc * self.ulysses_size
        h = h_all // self.ulysses_size

        q, k, v = self._to_chunk(q, k, v)  # [B, C, h, D] each: my ring chunk, my heads
        start = self.ring_rank * chunk
        n_q = _real_tokens(seq_len, start, chunk)
        q = rope(q[:, :n_q], start)
        # The block that travels: rotated real keys, then the pad rows (never read), and the values.
        block = torch.stack((k, v))  # [2, B, C, h, D]
        block[0, :, :n_q] = rope(k[:, :n_q], start)

        acc = lse = None
        keys: list[torch.Tensor | None] = [None] * self.ring_size
        spare = torch.empty_like(block) if self.ring_size > 1 else block
        for step in range(self.ring_size):
            src = (self.ring_rank - step) % self.ring_size
            pending = self._pass_on(block, spare) if step + 1 < self.ring_size else []
            n_k = _real_tokens(seq_len, src * chunk, chunk)
            if n_k and n_q:
                out, out_lse = attend_with_lse(q, block[0, :, :n_k], block[1, :, :n_k])
                acc, lse = merge_partial(acc, lse, out, out_lse, rescale=self._rescale)
            if head_fn is not None:
                keys[src] = block[0, :, :n_k].clone()  # the buffer is reused two steps later
            for work in pending:
                work.wait()
            block, spare = spare, block

        out = acc.to(q.dtype) if acc is not None else q.new_zeros(b, n_q, h, d)
        out = self._from_chunk(_pad_dim(out, 1, chunk))  # [B, S_loc, H, D]

        stat = None
        if head_fn is not None:
            k_full = torch.cat([kb for kb in keys if kb is not None], dim=1)  # [B, S, h, D]
            stat = self._stat(head_fn(q, k_full, self.ulysses_rank * h), n_q, chunk)
        return out, stat

    # ---- stages ---------------------------------------------------------------------------

    def _to_chunk(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Ulysses all-to-all: [B, S_loc, H, D] each -> [B, C, H/ulysses, D] each (one exchange for all)."""
        u = self.ulysses_size
        if u == 1:
            return xs
        b, s_loc, h_all, d = xs[0].shape
        n, h = len(xs), h_all // u
        # [B, S_loc, n, H, D] -> [U, B, S_loc, n, h, D]: rank-major heads, so chunk u holds u's heads of all of xs.
        packed = torch.stack(xs, dim=2).view(b, s_loc, n, u, h, d).permute(3, 0, 1, 2, 4, 5)
        got = self._exchange(packed.contiguous())  # [U(src), B, S_loc, n, h, D]: src's tokens, my heads
        return tuple(got.permute(1, 0, 2, 3, 4, 5).reshape(b, u * s_loc, n, h, d).unbind(dim=2))

    def _from_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """Ulysses all-to-all back: [B, C, h, D] -> [B, S_loc, H, D]."""
        u = self.ulysses_size
        if u == 1:
            return x
        b, c, h, d = x.shape
        s_loc = c // u
        got = self._exchange(
            x.view(b, u, s_loc, h, d).transpose(0, 1).contiguous()
        )  # [U(src), B, S_loc, h, D]
        return got.permute(1, 2, 0, 3, 4).reshape(b, s_loc, u * h, d)

    def _stat(self, partial: torch.Tensor, n_q: int, chunk: int) -> torch.Tensor:
        """partial: [..., n_q] over my heads and my chunk's real tokens -> [..., S_loc] summed over all heads."""
        if partial.shape[-1] != n_q:
            raise ValueError(f"head_fn must return [..., {n_q}], got {tuple(partial.shape)}")
        lead = partial.shape[:-1]
        # Sum in fp32 whatever the compute dtype; the map is tiny ([n, S]).
        flat = _pad_dim(partial.reshape(math.prod(lead), n_q).float(), 1, chunk).T.contiguous()  # [C, n]
        if self.ulysses_size > 1:
            out = flat.new_empty((chunk // self.ulysses_size, flat.shape[1]))
            fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            fn(out, flat, op=dist.ReduceOp.SUM, group=self.ulysses_group)
            self._count(
                "reduce_scatter",
                flat.numel() * flat.element_size() * (self.ulysses_size - 1) / self.ulysses_size,
            )
        else:
            out = flat
        return out.T.reshape(*lead, -1).to(partial.dtype)

    # ---- communication --------------------------------------------------------------------

    def _exchange(self, x: torch.Tensor) -> torch.Tensor:
        """All-to-all in the Ulysses group: x [U, ...] with chunk i going to Ulysses rank i."""
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.ulysses_group)
        self._count("all_to_all", x.numel() * x.element_size() * (self.ulysses_size - 1) / self.ulysses_size)
        return out

    def _pass_on(self, send: torch.Tensor, recv: torch.Tensor) -> list[dist.Work]:
        """Start sending ``send`` to the next ring rank and receiving ``recv`` from the previous one."""
        r, n = self.ring_rank, self.ring_size
        ops = [
            dist.P2POp(dist.isend, send, group=self.ring_group, group_peer=(r + 1) % n),
            dist.P2POp(dist.irecv, recv, group=self.ring_group, group_peer=(r - 1) % n),
        ]
        self._count("ring_p2p", send.numel() * send.element_size())
        return dist.batch_isend_irecv(ops)


def _real_tokens(seq_len: int, start: int, length: int) -> int:
    """Real (unpadded) tokens of the span [start, start + length) of a sequence of ``seq_len`` tokens."""
    return max(0, min(length, seq_len - start))
