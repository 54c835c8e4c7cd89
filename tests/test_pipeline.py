"""inference.render.pipeline: render sizes, latent masks, frame counts, and ``denoise_clip`` with the real
tiny DiT (determinism, CFG branches, one person, motion latents, the step boundary). Job descriptions are
tested in test_spec.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.render.pipeline import (
    denoise_clip,
    expected_frames,
    latent_masks_at,
    render_size,
)
from inference.render.sampler import Cancelled
from inference.render.settings import GenerationSettings

SETTINGS = GenerationSettings(steps=2)


# ----------------------------------------------------------------------------- sizes, masks, frames


@pytest.mark.parametrize(
    ("bucket", "divisor", "expected"),
    [
        ((448, 896), 8, (64, 112)),
        ((896, 448), 8, (112, 64)),
        ((640, 640), 8, (80, 80)),
        ((448, 896), 1, (448, 896)),
        ((128, 896), 8, (32, 112)),  # never below 32
    ],
)
def test_render_size(bucket, divisor, expected) -> None:
    size = render_size(bucket, divisor)
    assert size == expected
    assert all(side % 16 == 0 and side >= 32 for side in size) or divisor == 1


def assert_partition(m: torch.Tensor) -> None:
    assert m.shape[0] == 3 and m.dtype == torch.float32
    assert torch.equal(m.sum(0), torch.ones_like(m[0])), "not a partition"
    for c in range(3):
        assert m[c].sum() > 0, f"class {c} is empty"


def test_latent_masks_of_a_real_scene_at_tiny_size(portrait_pngs) -> None:
    from inference.scene.compose import compose_scene

    scene = compose_scene(*portrait_pngs, size=480)
    hw = render_size(scene.bucket, 8)
    m = latent_masks_at(scene.masks, (hw[0] // 8, hw[1] // 8))
    assert m.shape == (3, hw[0] // 8, hw[1] // 8)
    assert_partition(m)
    # person 1 is on the left, person 2 on the right
    cols = torch.arange(m.shape[2], dtype=torch.float32)
    assert (m[0].sum(0) * cols).sum() / m[0].sum() < (m[1].sum(0) * cols).sum() / m[1].sum()
    # at full latent size the area vote agrees with the scene's nearest-downsampled masks (off the edges)
    full = latent_masks_at(scene.masks, scene.latent_size)
    agree = (full.argmax(0) == torch.from_numpy(scene.latent_masks).argmax(0)).float().mean()
    assert agree > 0.9


def test_latent_masks_keep_every_class_without_emptying_another() -> None:
    # Person 2 and the background are two 3x3 specks in the same corner cell of a 16x16 mask:
    # both lose the vote at 2x2, both need a cell back, and the second must not take the first's.
    m = np.zeros((3, 16, 16), np.uint8)
    m[0] = 1
    m[:, 0:3, 0:3] = 0
    m[1, 0:3, 0:3] = 1
    m[:, 0:3, 3:6] = 0
    m[2, 0:3, 3:6] = 1
    out = latent_masks_at(m, (2, 2))
    assert_partition(out)
    assert out[1, 0, 0] == 1  # person 2 keeps its best cell


@pytest.mark.parametrize("size", [(4, 4), (4, 8), (8, 14), (3, 5)])
def test_latent_masks_random_partitions(size) -> None:
    rng = np.random.default_rng(sum(size))
    for _ in range(20):
        labels = rng.choice(3, size=(40, 56), p=[0.9, 0.07, 0.03])
        m = np.stack([(labels == c) for c in range(3)]).astype(np.uint8)
        assert_partition(latent_masks_at(m, size))


def test_expected_frames() -> None:
    assert expected_frames(3.44, GenerationSettings()) == 86
    assert expected_frames(6.875, GenerationSettings()) == 171
    assert expected_frames(0.039, GenerationSettings()) == 0
    assert expected_frames(100.0, GenerationSettings(max_frames=1000)) == 1000  # max_frames cap
    assert expected_frames(400.0, GenerationSettings()) == 9000  # the default cap: 6 minutes
    assert expected_frames(10.0, GenerationSettings(mode="clip")) == 81  # one clip


# ------------------------------------------------------------------------------------- denoise_clip


@pytest.fixture(scope="module")
def tiny_dit():
    from inference.checkpoint.weights import tiny_dit_config
    from inference.model.dit import build_model

    torch.manual_seed(0)
    return build_model(tiny_dit_config(), "cpu").init_weights(0).eval()


def clip_tensors(model, t_lat: int = 3, h: int = 4, w: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors the engine broadcasts for one clip, random but well-shaped for ``model``."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    frames = 4 * (t_lat - 1) + 1
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2 - 1] = 1
    masks[1, :, w // 2 + 1 :] = 1
    masks[2] = 1 - masks[0] - masks[1]
    return {
        "context": torch.randn(1, 7, cfg.text_dim, generator=g),
        "context_null": torch.randn(1, 5, cfg.text_dim, generator=g),
        "clip_fea": torch.randn(1, 257, cfg.clip_dim, generator=g),
        "y": torch.randn(1, 20, t_lat, h, w, generator=g),
        "audio": torch.randn(1, 2, frames, 5, cfg.audio_layers, cfg.audio_dim, generator=g),
        "ref_target_masks": masks,
    }


@torch.no_grad()
def test_denoise_clip_deterministic_per_seed(tiny_dit) -> None:
    tensors = clip_tensors(tiny_dit)
    a = denoise_clip(tiny_dit, tensors, GenerationSettings(steps=2, seed=1), clip_index=0)
    b = denoise_clip(tiny_dit, tensors, GenerationSettings(steps=2, seed=1), clip_index=0)
    assert a.shape == (16, 3, 4, 6) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    c = denoise_clip(tiny_dit, tensors, GenerationSettings(steps=2, seed=2), clip_index=0)
    d = denoise_clip(tiny_dit, tensors, GenerationSettings(steps=2, seed=1), clip_index=1)
    assert (a - c).abs().mean() > 0.1 and (a - d).abs().mean() > 0.1  # seed and clip index both matter


class BranchSpy(torch.nn.Module):
    """Wraps the real DiT and records which conditioning each call got (text, persons, masks)."""

    def __init__(self, model, tensors) -> None:
        super().__init__()
        self.model = model
        self.tensors = tensors
        self.calls: list[tuple[str, int, bool]] = []

    def forward(self, x, t, context, clip_fea, y, audio, masks, sp=None, **kwargs):
        text = "prompt" if context is self.tensors["context"] else "negative"
        assert text == "prompt" or context is self.tensors["context_null"]
        persons = int(audio.shape[1])
        if persons == 1 and self.tensors["audio"].shape[1] == 2:
            assert not audio.any(), "in a two-person job the single-person branch is the silent one"
        self.calls.append((text, persons, masks is not None))
        return self.model(x, t, context, clip_fea, y, audio, masks, sp=sp, **kwargs)


@torch.no_grad()
@pytest.mark.parametrize(
    ("text_guidance", "expected"),
    [
        # cond, drop_text (negative prompt + audio), uncond (negative prompt + silence)
        (5.0, [("prompt", 2, True), ("negative", 2, True), ("negative", 1, False)]),
        # cond, drop_audio (prompt + silence)
        (1.0, [("prompt", 2, True), ("prompt", 1, False)]),
    ],
)
def test_denoise_clip_branch_sets(tiny_dit, text_guidance: float, expected) -> None:
    tensors = clip_tensors(tiny_dit)
    spy = BranchSpy(tiny_dit, tensors)
    settings = GenerationSettings(steps=2, text_guidance=text_guidance)
    out = denoise_clip(spy, tensors, settings, clip_index=0)
    assert spy.calls == expected * 2  # two steps
    assert torch.equal(out, denoise_clip(tiny_dit, tensors, settings, clip_index=0))


@torch.no_grad()
def test_denoise_clip_one_person_takes_the_single_person_path(tiny_dit) -> None:
    """One person: every branch has one audio person and no masks (no L-RoPE routing), so the masks do
    not matter; the person's audio still conditions the clip."""
    tensors = clip_tensors(tiny_dit)
    one = {**tensors, "audio": tensors["audio"][:, :1].contiguous()}
    settings = GenerationSettings(steps=2, text_guidance=5.0)
    spy = BranchSpy(tiny_dit, one)
    out = denoise_clip(spy, one, settings, clip_index=0)
    assert spy.calls == [("prompt", 1, False), ("negative", 1, False), ("negative", 1, False)] * 2
    other_masks = {**one, "ref_target_masks": torch.roll(one["ref_target_masks"], 1, dims=0)}
    assert torch.equal(out, denoise_clip(tiny_dit, other_masks, settings, clip_index=0))
    louder = {**one, "audio": one["audio"] * 3}
    assert (out - denoise_clip(tiny_dit, louder, settings, clip_index=0)).abs().mean() > 1e-6
    two = denoise_clip(tiny_dit, tensors, settings, clip_index=0)
    assert not torch.allclose(out, two)  # negative control: the two-person path is another computation


def test_latent_masks_of_a_one_person_scene_stay_full_frame() -> None:
    m = np.zeros((3, 40, 56), np.uint8)
    m[0] = 1  # person 1 everywhere: no person 2, no background
    out = latent_masks_at(m, (5, 7))
    assert torch.equal(out[0], torch.ones(5, 7)) and out[1:].sum() == 0
    m[:, :, :3] = 0
    m[2, :, :3] = 1  # a thin background strip, lost in the vote, gets its best cell back
    assert latent_masks_at(m, (5, 7))[2].sum() == 1


@torch.no_grad()
def test_denoise_clip_guidance_changes_the_result(tiny_dit) -> None:
    tensors = clip_tensors(tiny_dit)
    three = denoise_clip(tiny_dit, tensors, GenerationSettings(steps=2, text_guidance=5.0), clip_index=0)
    two = denoise_clip(tiny_dit, tensors, GenerationSettings(steps=2, text_guidance=1.0), clip_index=0)
    # The tiny random DiT barely reads its text, so the gap is small, but far above float noise.
    assert (three - two).abs().mean() > 1e-5


@torch.no_grad()
def test_denoise_clip_honours_the_motion_latent(tiny_dit) -> None:
    tensors = clip_tensors(tiny_dit, t_lat=3)
    motion = torch.randn(16, 1, 4, 6, generator=torch.Generator().manual_seed(5))
    without = denoise_clip(tiny_dit, tensors, SETTINGS, clip_index=1)
    out = denoise_clip(tiny_dit, {**tensors, "motion_latent": motion}, SETTINGS, clip_index=1)
    assert torch.equal(out[:, :1], motion)  # re-noised to t = 0 at the end: exactly the motion latent
    assert not torch.allclose(out[:, 1:], without[:, 1:])  # and it conditions the new frames
    bad = torch.randn(16, 3, 4, 6)  # as many motion frames as the clip has: nothing left to generate
    with pytest.raises(ValueError, match="motion_latent"):
        denoise_clip(tiny_dit, {**tensors, "motion_latent": bad}, SETTINGS, clip_index=1)


@torch.no_grad()
def test_denoise_clip_cancel_and_progress(tiny_dit) -> None:
    tensors = clip_tensors(tiny_dit)
    polls: list[int] = []

    def stop_on_second_poll(latent: torch.Tensor) -> bool:
        polls.append(1)
        return len(polls) == 2

    seen: list[tuple[int, int]] = []
    with pytest.raises(Cancelled) as info:
        denoise_clip(
            tiny_dit,
            tensors,
            GenerationSettings(steps=3),
            clip_index=0,
            step_boundary=stop_on_second_poll,
            progress=lambda step, total: seen.append((step, total)),
        )
    assert (info.value.step, info.value.total) == (1, 3)
    assert seen == [(1, 3)]  # one step ran, then the loop stopped at the boundary
    seen.clear()
    denoise_clip(tiny_dit, tensors, SETTINGS, clip_index=0, progress=lambda s, n: seen.append((s, n)))
    assert seen == [(1, 2), (2, 2)]
