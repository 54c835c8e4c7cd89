"""Start-up checks of a parallel layout: which sizes the model's heads allow, and what the engine runs.

Errors name the flag (``field``) and list what is allowed.
"""

from __future__ import annotations

from common.errors import InputError


class ParallelConfigError(InputError):
    """A parallel layout the engine cannot run; ``field`` names the offending option."""


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
