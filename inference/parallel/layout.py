"""Start-up checks of a parallel layout: how the ranks of one job split, and what the model's heads allow.

A layout is ``cfg x ring x ulysses`` ranks (``ParallelLayout``):

- ``ulysses`` ranks trade a sequence shard for a head shard with all-to-alls (heads must divide);
- ``ring`` groups of Ulysses ranks pass keys and values around a ring (any size);
- ``cfg`` groups each run different guidance branches of a sampling step (``--cfg_parallel``).

Ranks are numbered with Ulysses fastest, then ring, then guidance group:
``rank = (g * ring + r) * ulysses + u``. On two 8-GPU nodes with Ulysses 8 x ring 2 the all-to-alls
stay inside a node and only the ring's point-to-point transfers cross between nodes.

Errors name the flag (``field``) and list what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import InputError

GUIDANCE_GROUPS = (2, 3)
"""``--cfg_parallel`` splits the ranks into this many groups: one per guidance branch (2 or 3 per step)."""


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


@dataclass(frozen=True)
class ParallelLayout:
    """``cfg`` guidance groups x ``ring`` x ``ulysses`` ranks; ``rank = (g * ring + r) * ulysses + u``."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring", "cfg"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelLayout.{name} must be at least 1, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def sp_size(self) -> int:
        """Ranks that share one forward (one guidance group): ring x ulysses."""
        return self.ring * self.ulysses

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(guidance group, ring rank, Ulysses rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a layout of {self.world_size} ranks")
        g, rest = divmod(rank, self.sp_size)
        r, u = divmod(rest, self.ulysses)
        return g, r, u

    def rank_of(self, g: int, r: int, u: int) -> int:
        return (g * self.ring + r) * self.ulysses + u

    def sp_groups(self) -> list[list[int]]:
        """One list per guidance group: its ring x ulysses ranks, in sequence-shard order."""
        return [[self.rank_of(g, r, u) for r in range(self.ring) for u in range(self.ulysses)]
                for g in range(self.cfg)]  # fmt: skip

    def ulysses_groups(self) -> list[list[int]]:
        """One list per (guidance group, ring rank): the ranks of one all-to-all."""
        return [[self.rank_of(g, r, u) for u in range(self.ulysses)]
                for g in range(self.cfg) for r in range(self.ring)]  # fmt: skip

    def ring_groups(self) -> list[list[int]]:
        """One list per (guidance group, Ulysses rank): the ranks one key/value block visits, in ring order."""
        return [[self.rank_of(g, r, u) for r in range(self.ring)]
                for g in range(self.cfg) for u in range(self.ulysses)]  # fmt: skip

    def cfg_groups(self) -> list[list[int]]:
        """One list per (ring rank, Ulysses rank): the ranks at that place in every guidance group."""
        return [[self.rank_of(g, r, u) for g in range(self.cfg)]
                for r in range(self.ring) for u in range(self.ulysses)]  # fmt: skip

    def describe(self) -> str:
        parts = [f"Ulysses {self.ulysses}"]
        if self.ring > 1:
            parts.append(f"ring {self.ring}")
        if self.cfg > 1:
            parts.insert(0, f"{self.cfg} guidance groups")
        return " x ".join(parts)


def resolve_layout(
    world_size: int,
    ulysses_size: int | None,
    ring_size: int,
    num_heads: int,
    cfg_parallel: bool = False,
) -> ParallelLayout:
    """The layout the flags ask for, or ``ParallelConfigError`` naming the flag that cannot work.

    Valid: ``world = cfg x ring x ulysses`` with ``num_heads % ulysses == 0``; ``cfg`` is 1 without
    ``--cfg_parallel`` and 2 or 3 with it. ``ulysses_size`` defaults to what is left of the world
    after the ring (and the guidance groups). With ``--cfg_parallel`` and no ``--ulysses_size``, the
    ranks split into 3 groups (one per branch of a step with text guidance) when that leaves a valid
    Ulysses size, else 2.
    """
    if world_size < 1:
        raise ParallelConfigError("WORLD_SIZE", f"must be at least 1, got {world_size}")
    if ring_size < 1:
        raise ParallelConfigError("ring_size", f"must be at least 1, got {ring_size}")
    if world_size % ring_size:
        raise ParallelConfigError(
            "ring_size", f"{ring_size} does not divide the number of processes ({world_size})"
        )
    if ulysses_size is not None and ulysses_size < 1:
        raise ParallelConfigError("ulysses_size", f"must be at least 1, got {ulysses_size}")

    if not cfg_parallel:
        ulysses = world_size // ring_size if ulysses_size is None else ulysses_size
        if ulysses * ring_size != world_size:
            raise ParallelConfigError(
                "ulysses_size",
                f"ulysses_size x ring_size = {ulysses} x {ring_size} must equal the number of processes "
                f"({world_size}); add --cfg_parallel to run guidance branches on separate rank groups",
            )
        check_heads(num_heads, ulysses)
        return ParallelLayout(ulysses, ring_size, 1)

    if ulysses_size is not None:
        groups, rest = divmod(world_size, ulysses_size * ring_size)
        if rest or groups not in GUIDANCE_GROUPS:
            raise ParallelConfigError(
                "cfg_parallel",
                f"{world_size} processes / (ulysses_size {ulysses_size} x ring_size {ring_size}) must "
                f"give {' or '.join(map(str, GUIDANCE_GROUPS))} guidance groups",
            )
        check_heads(num_heads, ulysses_size)
        return ParallelLayout(ulysses_size, ring_size, groups)

    per_ring = world_size // ring_size
    for groups in sorted(GUIDANCE_GROUPS, reverse=True):
        if per_ring % groups == 0 and num_heads % (per_ring // groups) == 0:
            return ParallelLayout(per_ring // groups, ring_size, groups)
    raise ParallelConfigError(
        "cfg_parallel",
        f"{world_size} processes with ring_size {ring_size} split into neither 3 nor 2 guidance groups "
        f"with a Ulysses size dividing {num_heads} heads (allowed: {allowed_sizes(num_heads)}); "
        "give --ulysses_size or use another number of processes",
    )


def check_parallel_sizes(
    world_size: int,
    ulysses_size: int | None,
    ring_size: int,
    num_heads: int,
    cfg_parallel: bool = False,
) -> ParallelLayout:
    """Start-up check of the requested layout (``resolve_layout``); returns it when it is valid."""
    return resolve_layout(world_size, ulysses_size, ring_size, num_heads, cfg_parallel)
