"""Batched guidance: the 2-3 branches of a step as one forward (batch = branches) against one forward per
branch, on the tiny DiT in fp32. Rows differ in text context and in person count (the silent branches
have one person, the others two), so the model's per-row audio grouping is exercised."""

from __future__ import annotations

import pytest
import torch

from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT
from inference.render.pipeline import denoise_clip
from inference.render.sampler import (
    BRANCH_COND,
    BRANCH_DROP_AUDIO,
    BRANCH_DROP_TEXT,
    BRANCH_UNCOND,
    PassStats,
)
from inference.render.settings import GenerationSettings

TOL = 1e-6


@pytest.fixture(scope="module")
def model() -> MultiTalkDiT:
    return MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=3).eval().requires_grad_(False)


def clip_tensors(seed: int = 0, t_lat: int = 3, h: int = 4, w: int = 6) -> dict[str, torch.Tensor]:
    """One clip's broadcast tensors (B = 1) for the tiny DiT: prompt and negative of different lengths."""
    cfg = DiTConfig.tiny()
    g = torch.Generator().manual_seed(seed)
    frames = 1 + cfg.vae_scale * (t_lat - 1)
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2 - 1] = 1
    masks[1, :, w // 2 + 1 :] = 1
    masks[2] = 1 - masks[0] - masks[1]
    return {
        "context": torch.randn(1, 5, cfg.text_dim, generator=g),
        "context_null": torch.randn(1, 9, cfg.text_dim, generator=g),
        "clip_fea": torch.randn(1, 3, cfg.clip_dim, generator=g),
        "y": torch.randn(1, 20, t_lat, h, w, generator=g),
        "audio": torch.randn(1, 2, frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g),
        "ref_target_masks": masks,
    }


def test_model_batch_with_mixed_person_counts_equals_rows(model):
    """A batch of cond (2 persons), drop_text (2 persons, other text) and uncond (1 silent person)."""
    tensors = clip_tensors()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 16, 3, 4, 6, generator=g)
    t = torch.tensor([731.0])
    audio, silent = tensors["audio"], torch.zeros_like(tensors["audio"][:, :1])
    ctx, null = tensors["context"], tensors["context_null"]
    common = {"clip_fea": tensors["clip_fea"], "y": tensors["y"]}
    with torch.no_grad():
        rows = [
            model(x, t, ctx, audio=audio, ref_target_masks=tensors["ref_target_masks"], **common),
            model(x, t, null, audio=audio, ref_target_masks=tensors["ref_target_masks"], **common),
            model(x, t, null, audio=silent, **common),
        ]
        padded_ctx = torch.nn.functional.pad(ctx, (0, 0, 0, null.shape[1] - ctx.shape[1]))
        batch = model(
            x.expand(3, -1, -1, -1, -1),
            t.expand(3),
            torch.cat([padded_ctx, null, null]),
            tensors["clip_fea"].expand(3, -1, -1),
            tensors["y"].expand(3, -1, -1, -1, -1),
            torch.cat([audio, audio, torch.cat([silent, torch.zeros_like(silent)], dim=1)]),
            tensors["ref_target_masks"],
            persons=(2, 2, 1),
        )
        # Negative control: the silent row read as two (zero) persons uses L-RoPE and differs.
        wrong = model(
            x,
            t,
            null,
            tensors["clip_fea"],
            tensors["y"],
            torch.zeros_like(audio),
            tensors["ref_target_masks"],
        )
    for j in range(3):
        assert (batch[j] - rows[j][0]).abs().max().item() <= TOL, j
    assert (wrong[0] - rows[2][0]).abs().max().item() > 1e-4


def test_model_refuses_bad_person_counts(model):
    tensors = clip_tensors()
    x = torch.zeros(2, 16, 3, 4, 6)
    args = (
        x,
        torch.tensor([1.0, 1.0]),
        tensors["context"].expand(2, -1, -1),
        tensors["clip_fea"].expand(2, -1, -1),
        tensors["y"].expand(2, -1, -1, -1, -1),
        tensors["audio"].expand(2, -1, -1, -1, -1, -1),
        tensors["ref_target_masks"],
    )
    from inference.model.layers import ModelInputError

    with pytest.raises(ModelInputError) as err:
        model(*args, persons=(2, 3))
    assert err.value.field == "persons"
    with pytest.raises(ModelInputError):
        model(*args, persons=(2,))


@pytest.mark.parametrize(("text", "branches"), [(5.0, 3), (1.0, 2)])
def test_denoise_clip_batched_equals_sequential(model, text, branches):
    settings = GenerationSettings(steps=3, text_guidance=text, audio_guidance=3.0, seed=11)
    tensors = clip_tensors(seed=2)
    seq_stats, bat_stats = PassStats(), PassStats()
    with torch.no_grad():
        seq = denoise_clip(model, tensors, settings, clip_index=0, batched=False, stats=seq_stats)
        bat = denoise_clip(model, tensors, settings, clip_index=0, batched=True, stats=bat_stats)
    diff = (seq - bat).abs().max().item()
    assert diff <= TOL, diff
    assert seq_stats.passes == bat_stats.passes == 3 * branches
    assert seq_stats.model_calls == 3 * branches and bat_stats.model_calls == 3
    assert seq_stats.computed == 3 * branches and seq_stats.skipped == 0


def test_batched_branch_rows_follow_the_branch_names(model):
    """The batched model function returns rows in the order of the branch names it is given."""
    from inference.render.pipeline import branch_model_fns

    settings = GenerationSettings(steps=2, seed=1)
    tensors = clip_tensors(seed=4)
    model_fn, batch_fn = branch_model_fns(model, tensors, settings)
    latent = torch.randn(16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    order = (BRANCH_UNCOND, BRANCH_COND, BRANCH_DROP_AUDIO, BRANCH_DROP_TEXT)
    with torch.no_grad():
        out = batch_fn(latent, t, order)
        for j, branch in enumerate(order):
            assert (out[j] - model_fn(latent, t, branch)).abs().max().item() <= TOL, branch
