"""Guidance-parallel sampling (``--cfg_parallel``) against the sequential branch passes of one process.

2 gloo ranks = 2 guidance groups (a 3-branch step: one group evaluates cond and uncond, the other
drop_text) and 3 ranks = 3 groups (a 2-branch step leaves one group idle). Each rank denoises one clip
of the tiny DiT through ``denoise_clip`` with its ``GuidanceParallel``: one branch at a time and batched,
with and without text guidance, and with TeaCache (its state is per branch). Every rank must end with the
sequential latents (within 1e-6). Negative control: groups that evaluate the wrong share of the
branches (the gathered rows then carry the wrong names) must not match.
"""

from __future__ import annotations

import logging

import pytest
import torch

from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT
from inference.model.sp import NoParallel
from inference.parallel.cfg import GuidanceParallel
from inference.parallel.context import ParallelContext
from inference.parallel.layout import ParallelLayout
from inference.render.pipeline import denoise_clip
from inference.render.settings import GenerationSettings
from tests.dist_harness import run_spmd
from tests.test_batched_guidance import clip_tensors

logger = logging.getLogger(__name__)

TOL = 1e-6
STEPS = 3
CASES = {
    "3-branch": dict(steps=STEPS, seed=4, text_guidance=5.0, audio_guidance=4.0),
    "2-branch": dict(steps=STEPS, seed=4, text_guidance=1.0, audio_guidance=4.0),
    "3-branch-teacache": dict(steps=STEPS, seed=4, teacache=True, teacache_thresh=1.0),
}


class _WrongShare(GuidanceParallel):
    """Negative control: each group evaluates the share that belongs to the next group."""

    def share(self, branches: tuple[str, ...]) -> tuple[str, ...]:
        return branches[(self.index + 1) % self.size :: self.size]


def _model(state: dict[str, torch.Tensor]) -> MultiTalkDiT:
    model = MultiTalkDiT(DiTConfig.tiny()).eval().requires_grad_(False)
    model.load_state_dict(state)
    return model


def _rank(ctx: ParallelContext, state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> dict:
    ctx = ctx.with_layout(ParallelLayout(ulysses=1, ring=1, cfg=ctx.world_size))
    sp, guidance = ctx.sequence_parallel(), ctx.guidance_parallel()
    assert isinstance(sp, NoParallel) and guidance is not None
    model = _model(state)
    out: dict = {}
    with torch.no_grad():
        for name, values in CASES.items():
            settings = GenerationSettings.from_dict(values)
            for batched in (False, True):
                guidance.comm_bytes["all_gather"] = 0
                out[name, batched] = denoise_clip(
                    model, tensors, settings, clip_index=0, sp=sp, guidance=guidance, batched=batched
                )
                out[name, batched, "bytes"] = guidance.comm_bytes["all_gather"]
        wrong = _WrongShare(guidance.group, guidance.size, guidance.index)
        settings = GenerationSettings.from_dict(CASES["3-branch"])
        out["wrong_share"] = denoise_clip(model, tensors, settings, clip_index=0, sp=sp, guidance=wrong)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world_size", [2, 3])
def test_cfg_parallel_matches_sequential_passes(world_size: int) -> None:
    model = MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=3).eval().requires_grad_(False)
    tensors = clip_tensors(seed=2)
    with torch.no_grad():
        ref = {
            name: denoise_clip(model, tensors, GenerationSettings.from_dict(values), clip_index=0)
            for name, values in CASES.items()
        }
    results = run_spmd(_rank, world_size, model.state_dict(), tensors, timeout_s=120)
    latent_bytes = ref["3-branch"].numel() * 4
    diffs: dict[str, float] = {}
    for rank, res in enumerate(results):
        for name in CASES:
            branches = 2 if name == "2-branch" else 3
            for batched in (False, True):
                d = (res[name, batched] - ref[name]).abs().max().item()
                key = f"{name}/{'batched' if batched else 'one-by-one'}"
                diffs[key] = max(diffs.get(key, 0.0), d)
                assert d <= TOL, (rank, key, d)
                assert torch.equal(res[name, batched], results[0][name, batched]), (rank, key)
                # One all-gather per step: each rank sends its slots (ceil(branches / groups) latents) to
                # every other group.
                slots = -(-branches // world_size)
                assert res[name, batched, "bytes"] == STEPS * slots * latent_bytes * (world_size - 1), (
                    rank,
                    key,
                )
        wrong = (res["wrong_share"] - ref["3-branch"]).abs().max().item()
        diffs["wrong_share"] = wrong
        assert wrong > 1e-3, (rank, wrong)  # the negative control must fail
    logger.warning("cfg parallel on %d ranks, max |diff| vs sequential: %s", world_size, diffs)
