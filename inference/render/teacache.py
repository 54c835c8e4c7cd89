"""TeaCache for the MultiTalk DiT: skip the block stack when the timestep modulation barely moved.

Upstream's algorithm (MeiGen-AI/MultiTalk ``WanModel.teacache_init`` and ``forward``), facts only:

- the "modulated input" is the time modulation ``e0`` [B, 6, C] (with retention steps, upstream's CLI
  default) or the time embedding ``e`` [B, C] (without);
- per guidance branch, the relative L1 change ``mean|m - m_prev| / mean|m_prev|`` since that branch's
  previous call is rescaled by a fitted polynomial and accumulated; while the sum stays below
  ``teacache_thresh`` the block stack is skipped and the branch's previous residual (block output minus
  block input) is added instead; when it is reached, the blocks run and the sum restarts at 0;
- retention: with retention steps the first 5 steps always run the blocks (no tail cut-off); without,
  the first and the last step do;
- the polynomial coefficients are fitted per resolution (480p / 720p, below).

What differs, on purpose: upstream keeps one state on the model class, indexed by a call counter modulo 3
and reset every ``steps * 3`` calls. In 2-pass guidance (text scale 1, the LoRA presets) that counter
mixes the cond and drop-audio branches and mis-counts the retention steps. Here every branch has its own
state and call count, so 2- and 3-pass sampling are both right, and the state lives in the ``TeaCache``
object a sampler creates per clip (upstream's per-video state is equivalent: the retained first steps of
each clip recompute everything). Every rank of a sequence-parallel group takes the same decisions: the
distances are all-reduced (max) before they are compared. As ``e0`` depends only on the timestep, the
distances are in fact the same for all branches, so a batched forward (all branches at once) skips or
runs as a whole; if branches ever disagreed, the batch runs the blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from inference.model.sp import NoParallel, SequenceParallelism
from inference.render.sampler import PassStats
from inference.render.settings import TEACACHE_THRESH_RANGE as THRESH_RANGE
from inference.render.settings import GenerationSettings

logger = logging.getLogger(__name__)

# Upstream's fitted rescale polynomials, highest power first (numpy.poly1d order).
COEFFICIENTS: dict[tuple[bool, int], tuple[float, ...]] = {
    (True, 480): (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    (True, 720): (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
    (False, 480): (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
    (False, 720): (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
}
RETENTION_STEPS = 5  # with use_ret_steps: the first 5 steps always run the blocks

BlocksFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TeaCacheConfig:
    """thresh: accumulated rescaled distance below which the blocks are skipped; resolution: 480 or 720
    (selects the coefficients); steps: sampling steps per clip; use_ret_steps: upstream's default True."""

    thresh: float
    resolution: int
    steps: int
    use_ret_steps: bool = True

    def __post_init__(self) -> None:
        if not THRESH_RANGE[0] <= self.thresh <= THRESH_RANGE[1]:
            raise ValueError(f"teacache_thresh {self.thresh} is outside {THRESH_RANGE}")
        if (self.use_ret_steps, self.resolution) not in COEFFICIENTS:
            raise ValueError(f"no TeaCache coefficients for resolution {self.resolution}")

    @property
    def coefficients(self) -> tuple[float, ...]:
        return COEFFICIENTS[(self.use_ret_steps, self.resolution)]

    def retained(self, step: int) -> bool:
        """True for steps that always run the blocks."""
        if self.use_ret_steps:
            return step < RETENTION_STEPS
        return step < 1 or step >= self.steps - 1

    def rescale(self, distance: float) -> float:
        return float(np.polyval(self.coefficients, distance))


@dataclass
class _BranchState:
    calls: int = 0
    accumulated: float = 0.0
    previous: Tensor | None = None  # modulated input of the previous call [6, C] or [C]
    residual: Tensor | None = None  # block output - block input of the last computed call [S_loc, C]


def teacache_for(
    settings: GenerationSettings, sp: SequenceParallelism | None = None, stats: PassStats | None = None
) -> TeaCache | None:
    """A clip's TeaCache for a job's settings (None when the job does not use it)."""
    if not settings.teacache:
        return None
    config = TeaCacheConfig(settings.teacache_thresh, settings.resolution, settings.steps)
    return TeaCache(config, sp, stats)


class TeaCache:
    """One clip's cache. ``bind(branches)`` gives the model's ``cache`` argument for one forward whose
    batch rows are ``branches`` (in order). ``stats.skipped`` counts branch passes whose blocks were skipped.
    """

    def __init__(
        self, config: TeaCacheConfig, sp: SequenceParallelism | None = None, stats: PassStats | None = None
    ) -> None:
        self.config = config
        self.sp = sp or NoParallel()
        self.stats = stats if stats is not None else PassStats()
        self.states: dict[str, _BranchState] = {}
        self.decisions: list[tuple[str, int, bool]] = []  # (branch, step, computed), for tests and logs

    def bind(self, branches: Sequence[str]) -> Callable[[Tensor, Tensor, Tensor, BlocksFn], Tensor]:
        names = tuple(branches)

        def cache(x: Tensor, e: Tensor, e0: Tensor, blocks: BlocksFn) -> Tensor:
            return self.run(names, x, e, e0, blocks)

        return cache

    def _distances(self, states: list[_BranchState], modulated: Tensor) -> list[float | None]:
        """Relative L1 change per row since that branch's previous call, identical on every rank."""
        wanted = [s.previous is not None and not self.config.retained(s.calls) for s in states]
        if not any(wanted):
            return [None] * len(states)
        rel = torch.zeros(len(states), dtype=torch.float32, device=modulated.device)
        for j, s in enumerate(states):
            if wanted[j]:
                prev = s.previous
                rel[j] = (modulated[j] - prev).abs().mean() / prev.abs().mean()
        rel = self.sp.all_reduce_max(rel)
        return [float(r) if w else None for r, w in zip(rel.tolist(), wanted, strict=True)]

    def run(self, branches: tuple[str, ...], x: Tensor, e: Tensor, e0: Tensor, blocks: BlocksFn) -> Tensor:
        """x: [B, S_loc, C] block-stack input, one row per branch; e: [B, C]; e0: [B, 6, C] (fp32).
        Returns the block-stack output [B, S_loc, C] (computed, or input + cached residuals)."""
        if x.shape[0] != len(branches):
            raise ValueError(f"TeaCache: {x.shape[0]} batch rows for branches {branches}")
        modulated = (e0 if self.config.use_ret_steps else e).float()
        states = [self.states.setdefault(b, _BranchState()) for b in branches]
        distances = self._distances(states, modulated)
        skip = []
        for j, s in enumerate(states):
            d = distances[j]
            if d is None:
                s.accumulated = 0.0
                skip.append(False)
            else:
                s.accumulated += self.config.rescale(d)
                skip.append(s.accumulated < self.config.thresh)
                if not skip[-1]:
                    s.accumulated = 0.0
            s.previous = modulated[j].clone()
        cached = all(s.residual is not None and s.residual.shape == x.shape[1:] for s in states)
        all_skip = all(skip) and cached
        for j, (b, s) in enumerate(zip(branches, states, strict=True)):
            self.decisions.append((b, s.calls, not all_skip))
            s.calls += 1
            if not all_skip and skip[j]:
                s.accumulated = 0.0  # computed after all (another row of the batch needed the blocks)
        if all_skip:
            self.stats.skipped += len(branches)
            return x + torch.stack([s.residual for s in states]).to(x.dtype)  # type: ignore[misc]
        out = blocks(x)
        residual = out - x
        for j, s in enumerate(states):
            s.residual = residual[j]
        return out
