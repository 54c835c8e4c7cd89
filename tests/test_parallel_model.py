"""The tiny MultiTalk DiT at P=2 and P=4 (Ulysses, with and without FSDP2) against P=1, fp32.

Grids (patch 1x2x2, so latent H x W of 4 x 6 gives 2 x 3 = 6 tokens per latent frame):

- A: 3 x 4 x 6 -> S = 18. P=2: 9 tokens per rank, rank 1 starts mid-frame. P=4: 5 per rank, every
  chunk boundary is mid-frame and the last rank holds 2 pad tokens.
- B: 3 x 4 x 4 -> S = 12, 4 tokens per frame. P=4: 3 per rank, mid-frame, no padding.

Each spawn also runs the FSDP2 variants (loaded sharded from an official-layout safetensors folder)
and a negative control: with padding left in attention the padded P=4 run must differ.
"""

from __future__ import annotations

import logging

import pytest
import torch

from inference.checkpoint.loader import save_checkpoint
from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT
from inference.model.sp import NoParallel
from inference.parallel.context import ParallelContext
from inference.parallel.fsdp import load_dit, param_bytes
from inference.parallel.ulysses import SequenceParallel
from tests.dist_harness import run_spmd

logger = logging.getLogger(__name__)

GRIDS: dict[str, tuple[int, int, int]] = {"A": (3, 4, 6), "B": (3, 4, 4)}
TOL = 1e-5


def dit_inputs(grid: str, persons: int, seed: int = 5) -> dict[str, torch.Tensor]:
    cfg = DiTConfig.tiny()
    t_lat, h_lat, w_lat = GRIDS[grid]
    g = torch.Generator().manual_seed(seed + persons)
    masks = torch.zeros(3, h_lat, w_lat)
    masks[0, :, : w_lat // 2 - 1] = 1
    masks[1, :, w_lat // 2 + 1 :] = 1
    masks[2] = 1 - masks[0] - masks[1]
    frames = 1 + cfg.vae_scale * (t_lat - 1)
    return dict(
        x=torch.randn(1, 16, t_lat, h_lat, w_lat, generator=g),
        t=torch.tensor([613.0]),
        context=torch.randn(1, 7, cfg.text_dim, generator=g),
        clip_fea=torch.randn(1, 3, cfg.clip_dim, generator=g),
        y=torch.randn(1, 20, t_lat, h_lat, w_lat, generator=g),
        audio=torch.randn(1, persons, frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g),
        ref_target_masks=masks,
    )


def tiny_dit(seed: int = 7) -> MultiTalkDiT:
    return MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=seed).eval().requires_grad_(False)


CASES = [("A", 2), ("A", 1), ("B", 2)]


def _rank_parity(ctx: ParallelContext, state: dict[str, torch.Tensor], folder: str) -> dict:
    sp = ctx.sequence_parallel()
    assert isinstance(sp, SequenceParallel)
    out: dict = {}
    model = tiny_dit(seed=0)
    model.load_state_dict(state)
    with torch.no_grad():
        for grid, persons in CASES:
            out[("sp", grid, persons)] = model(**dit_inputs(grid, persons), sp=sp)
        sp._trim_padding = False  # negative control
        out["untrimmed"] = model(**dit_inputs("A", 2), sp=sp)
        sp._trim_padding = True
        for mode in ("full", "keep"):
            sharded = load_dit(folder, ctx, mode, config=DiTConfig.tiny(), dtype=torch.float32)
            out[(mode, "bytes")] = param_bytes(sharded)
            for grid, persons in CASES:
                out[(mode, grid, persons)] = sharded(**dit_inputs(grid, persons), sp=sp)
            # A second pass: "full" re-gathers resharded weights, "keep" reuses the gathered ones.
            out[(mode, "again")] = sharded(**dit_inputs("A", 2), sp=sp)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, torch.Tensor], str]:
    model = tiny_dit()
    folder = tmp_path_factory.mktemp("tiny_dit_ckpt")
    save_checkpoint(model, folder, num_shards=2)
    with torch.no_grad():
        ref = {(g, p): model(**dit_inputs(g, p), sp=NoParallel()) for g, p in CASES}
    return ref, model.state_dict(), str(folder)


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world_size", [2, 4])
def test_tiny_dit_sp_and_fsdp_match_single_process(world_size: int, reference) -> None:
    ref, state, folder = reference
    results = run_spmd(_rank_parity, world_size, state, folder, timeout_s=120)
    diffs: dict[str, float] = {}
    for rank, res in enumerate(results):
        for variant in ("sp", "full", "keep"):
            for grid, persons in CASES:
                d = (res[(variant, grid, persons)] - ref[(grid, persons)]).abs().max().item()
                diffs[f"{variant}/{grid}/{persons}p"] = max(diffs.get(f"{variant}/{grid}/{persons}p", 0.0), d)
                assert d <= TOL, (rank, variant, grid, persons, d)
            if variant != "sp":
                assert torch.equal(res[(variant, "again")], res[(variant, "A", 2)]), (rank, variant)
                local, total = res[(variant, "bytes")]
                # Loaded sharded: this rank holds about 1/P of the weights (rows rounded up per tensor).
                assert local < total * (1.0 / world_size + 0.15), (rank, variant, local, total)
        # Every rank ends with the same gathered output.
        assert torch.equal(res[("sp", "A", 2)], results[0][("sp", "A", 2)])
        untrimmed = (res["untrimmed"] - ref[("A", 2)]).abs().max().item()
        diffs["untrimmed/A/2p"] = untrimmed
        if 18 % world_size:
            assert untrimmed > 1e-4, (rank, untrimmed)  # the negative control must fail
        else:
            assert untrimmed <= TOL
    logger.warning("P=%d max |diff| vs P=1: %s", world_size, {k: f"{v:.2e}" for k, v in diffs.items()})
