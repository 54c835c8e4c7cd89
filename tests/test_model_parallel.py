"""The tiny MultiTalk DiT under Ulysses sequence parallelism (2 gloo ranks) equals the one-process run.

Grid: 3 latent frames x 3 x 3 tokens = 27 tokens, so at P=2 each rank holds 14 rows: rank 0 ends and
rank 1 starts mid-frame (frame-local audio attention on partial frames) and rank 1 holds one padding
row (padding must stay out of attention, the routing min/max and the audio path). Both the two-person
pass (routing map reduce-scatter + L-RoPE with global min/max) and the one-person pass are checked.
"""

from __future__ import annotations

import pytest
import torch

from inference.config import DiTConfig
from inference.model import MultiTalkDiT
from tests.dist_harness import run_spmd

T_LAT, H_LAT, W_LAT = 3, 6, 6


def _inputs(persons: int) -> dict[str, torch.Tensor]:
    cfg = DiTConfig.tiny()
    g = torch.Generator().manual_seed(11 + persons)
    masks = torch.zeros(3, H_LAT, W_LAT)
    masks[0, :, :2], masks[1, 1:, 4:] = 1, 1
    masks[2] = 1 - masks[0] - masks[1]
    return dict(
        x=torch.randn(1, 16, T_LAT, H_LAT, W_LAT, generator=g),
        t=torch.tensor([431.0]),
        context=torch.randn(1, 6, cfg.text_dim, generator=g),
        clip_fea=torch.randn(1, 3, cfg.clip_dim, generator=g),
        y=torch.randn(1, 20, T_LAT, H_LAT, W_LAT, generator=g),
        audio=torch.randn(1, persons, 1 + 4 * (T_LAT - 1), 5, cfg.audio_layers, cfg.audio_dim, generator=g),
        ref_target_masks=masks,
    )


def _model() -> MultiTalkDiT:
    return MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=3).eval().requires_grad_(False)


def _rank_forward(ctx, state: dict[str, torch.Tensor]) -> list:
    model = _model()
    model.load_state_dict(state)
    sp = ctx.sequence_parallel()
    with torch.no_grad():
        # numpy: tensors would travel as shared-memory handles that die with the rank process.
        return [model(**_inputs(persons), sp=sp).numpy() for persons in (2, 1)]


@pytest.mark.distributed
def test_tiny_dit_p2_matches_single_process():
    model = _model()
    with torch.no_grad():
        ref = [model(**_inputs(persons)) for persons in (2, 1)]
    results = run_spmd(_rank_forward, 2, model.state_dict(), timeout_s=120)
    for rank, outs in enumerate(results):
        for persons, out, want in zip((2, 1), outs, ref, strict=True):
            torch.testing.assert_close(
                torch.from_numpy(out), want, atol=2e-5, rtol=2e-5, msg=f"rank {rank}, {persons} person(s)"
            )
    # Every rank holds the same gathered output.
    assert all((r[0] == results[0][0]).all() for r in results)
