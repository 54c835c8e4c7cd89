"""The sequence-parallel seam, owned by the model side.

The model never talks to other processes itself. It receives an ``sp`` object with the
interface below and calls it at four places: ``shard`` after patch embedding,
``attention`` for self-attention, ``token_range`` for frame-local audio attention and
``gather`` before the head. ``NoParallel`` is the identity used on one process; the
implementations that talk to other ranks (Ulysses, ring) live in ``inference.parallel`` and
must give the same result as ``NoParallel`` up to float rounding.

Shapes: ``B`` batch, ``S`` true token count, ``S_pad`` padded to a multiple of ``P``,
``S_loc = S_pad / P``, ``H`` heads, ``D`` head dim, ``C`` model dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from inference.model.attention import attend


class RopeFn(Protocol):
    """rope(x, start=0): x [B, n, h, D] holds the tokens at global positions start .. start + n - 1;
    returns them rotated by 3-D RoPE at those positions, same shape. Ulysses passes the whole sequence
    (start 0); ring attention passes one ring chunk at its offset."""

    def __call__(self, x: torch.Tensor, start: int = 0) -> torch.Tensor: ...


# head_fn(q, k, head_start) -> [n, Sq] partial sum over the given heads, one column per query.
# q: [B, Sq, h, D] queries (the whole sequence, or one ring chunk); k: [B, S, h, D] the whole sequence;
# both after RoPE, h heads starting at global head ``head_start``.
HeadFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class SequenceParallelism(Protocol):
    """What the model may call. Implementations: ``NoParallel``, ``SequenceParallel`` (Ulysses) and
    ``UnifiedSequenceParallel`` (Ulysses x ring)."""

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
