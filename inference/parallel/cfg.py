"""Guidance-parallel sampling (``--cfg_parallel``): the 2 or 3 guidance branches of a step on disjoint rank groups.

MultiTalk evaluates 3 model branches per sampling step (cond, drop_text, uncond; 2 without text
guidance) one after another. With ``G`` guidance groups of ``ulysses x ring`` ranks each, group ``g``
evaluates branches ``g, g + G, ...`` of the step with its own sequence parallelism, and one all-gather
over the ``G`` ranks at the same place in every group gives every rank every branch's prediction.
Each rank then combines them itself with the sampler's ``Guidance.combine`` (the code and operand
order of one process), so the latents stay identical on every rank and equal the sequential passes.

The sampler reaches this through its ``batch_fn`` hook: ``GuidanceParallel.wrap(evaluate)`` is a
``batch_fn`` whose ``evaluate`` computes this group's share of the branches (one forward per branch,
or one batched forward).

Shapes: latent ``[C, T_lat, h, w]``; predictions ``[n_branches, C, T_lat, h, w]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

logger = logging.getLogger(__name__)

# evaluate(latent [C, T, h, w], t [1], branches) -> [len(branches), C, T, h, w]: the sampler's batch_fn shape.
BranchesFn = Callable[[Tensor, Tensor, tuple[str, ...]], Tensor]
# model_fn(latent, t, branch) -> [C, T, h, w]: the sampler's one-branch call.
BranchFn = Callable[[Tensor, Tensor, str], Tensor]


def one_by_one(model_fn: BranchFn) -> BranchesFn:
    """``evaluate`` from a one-branch ``model_fn``: one forward per branch, stacked in branch order."""

    def evaluate(latent: Tensor, t: Tensor, branches: tuple[str, ...]) -> Tensor:
        return torch.stack([model_fn(latent, t, b) for b in branches])

    return evaluate


class GuidanceParallel:
    """This rank's guidance group (``index`` of ``size``) and the group across guidance groups.

    ``group`` holds the ranks at this rank's place in every guidance group, in group order.
    ``comm_bytes["all_gather"]`` counts what this rank sends.
    """

    def __init__(self, group: ProcessGroup | None, size: int, index: int) -> None:
        if size < 2 or not 0 <= index < size:
            raise ValueError(f"GuidanceParallel: need size >= 2 and 0 <= index < size, got {index} of {size}")
        if dist.is_initialized() and dist.get_world_size(group) != size:
            raise ValueError(
                f"GuidanceParallel: size={size} but the group has {dist.get_world_size(group)} ranks"
            )
        self.group = group
        self.size = size
        self.index = index
        self.comm_bytes = {"all_gather": 0}

    def __repr__(self) -> str:
        return f"GuidanceParallel(group {self.index} of {self.size})"

    def share(self, branches: tuple[str, ...]) -> tuple[str, ...]:
        """The branches this group evaluates: every ``size``-th, starting at its index."""
        return branches[self.index :: self.size]

    def wrap(self, evaluate: BranchesFn) -> BranchesFn:
        """A sampler ``batch_fn``: this group evaluates its share, one all-gather returns all branches.

        Groups with fewer branches than others (3 branches on 2 groups, or 2 on 3) send zeros in the
        empty slot; every rank joins the all-gather once per step.
        """

        def batch_fn(latent: Tensor, t: Tensor, branches: tuple[str, ...]) -> Tensor:
            mine = self.share(branches)
            slots = -(-len(branches) // self.size)
            local = latent.new_zeros((slots, *latent.shape))
            if mine:
                preds = evaluate(latent, t, mine)
                if preds.shape != (len(mine), *latent.shape):
                    raise ValueError(
                        f"evaluate returned {tuple(preds.shape)}, expected {(len(mine), *latent.shape)}"
                    )
                local[: len(mine)] = preds
            gathered = local.new_empty((self.size * slots, *latent.shape))
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(gathered, local, group=self.group)
            gathered = gathered.view(self.size, slots, *latent.shape)
            self.comm_bytes["all_gather"] += local.numel() * local.element_size() * (self.size - 1)
            # Branch j was evaluated by group j % G in its slot j // G.
            return torch.stack([gathered[j % self.size, j // self.size] for j in range(len(branches))])

        return batch_fn
