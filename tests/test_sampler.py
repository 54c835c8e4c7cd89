"""Sampler: schedule, guidance, Euler loop, motion frames, cancellation, clip plan, colour correction."""

from __future__ import annotations

import math

import pytest
import torch

from inference.render.sampler import (
    Cancelled,
    Guidance,
    MomentumBuffer,
    SamplerInputError,
    adaptive_projected_guidance,
    audio_window_indices,
    clip_new_frames,
    color_match,
    euler_step,
    guided_velocity,
    guided_velocity_two_pass,
    lab_to_rgb,
    mirror_index,
    motion_latent_frames,
    motion_noise_generator,
    next_motion_frames,
    noise_for_clip,
    passes_for,
    plan_clips,
    renoise,
    rgb_to_lab,
    sample_clip,
    stitch_clips,
    timestep_transform,
    timesteps,
)
from inference.render.settings import GenerationSettings

# ----------------------------------------------------------------------------------------- schedule


def _reference_schedule(steps: int, shift: float) -> list[float]:
    """Independent float64 computation of upstream's shifted linspace(1000, 1, steps) ++ [0]."""
    grid = [1000.0 - i * (999.0 / (steps - 1)) for i in range(steps)] if steps > 1 else [1000.0]
    out = []
    for t in [*grid, 0.0]:
        u = t / 1000.0
        out.append(shift * u / (1.0 + (shift - 1.0) * u) * 1000.0)
    return out


@pytest.mark.parametrize(("steps", "shift"), [(40, 7.0), (40, 11.0), (16, 7.0), (8, 2.0), (1, 7.0)])
def test_schedule_matches_independent_computation(steps, shift):
    ts = timesteps(steps, shift)
    assert ts.dtype == torch.float32 and ts.shape == (steps + 1,)
    assert ts[0].item() == 1000.0 and ts[-1].item() == 0.0
    assert bool((ts[1:] < ts[:-1]).all())
    ref = torch.tensor(_reference_schedule(steps, shift), dtype=torch.float64)
    torch.testing.assert_close(ts.double(), ref, rtol=0, atol=2e-3)


def test_schedule_hand_values():
    ts = timesteps(40, 7.0)
    # t_1: linspace gives 1000 - 999/39 = 974.3846; u' = 7u / (1 + 6u)
    u = (1000 - 999 / 39) / 1000
    assert ts[1].item() == pytest.approx(7 * u / (1 + 6 * u) * 1000, abs=1e-3)
    # last non-zero entry: t = 1 -> 7 * 0.001 / 1.006 * 1000 = 6.9583
    assert ts[-2].item() == pytest.approx(7000 * 0.001 / 1.006, abs=1e-4)
    assert timesteps(40, 11.0)[-2].item() == pytest.approx(11000 * 0.001 / 1.01, abs=1e-4)
    # shift 1 is the identity
    torch.testing.assert_close(timestep_transform(torch.tensor([250.0]), 1.0), torch.tensor([250.0]))
    with pytest.raises(SamplerInputError):
        timesteps(0, 7.0)


# ----------------------------------------------------------------------------------------- guidance


def test_passes_for():
    assert passes_for(5.0) == ("cond", "drop_text", "uncond")
    assert passes_for(1.0) == ("cond", "drop_audio")
    assert passes_for(1.0 + 1e-12) == ("cond", "drop_audio")


def test_three_pass_guidance_by_hand():
    cond, drop_text, uncond = torch.tensor([3.0, 1.0]), torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0])
    # uncond + 5 (cond - drop_text) + 4 (drop_text - uncond)
    out = guided_velocity(cond, drop_text, uncond, 5.0, 4.0)
    assert out.tolist() == [1 + 5 * 1 + 4 * 1, 0 + 5 * 0 + 4 * 1]
    # scales 1, 1 reduce to cond
    torch.testing.assert_close(guided_velocity(cond, drop_text, uncond, 1.0, 1.0), cond)
    g = Guidance(5.0, 4.0)
    assert g.combine({"cond": cond, "drop_text": drop_text, "uncond": uncond}).tolist() == out.tolist()
    with pytest.raises(SamplerInputError):
        g.combine({"cond": cond, "drop_audio": uncond})


def test_two_pass_guidance_by_hand():
    cond, drop_audio = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    out = guided_velocity_two_pass(cond, drop_audio, 4.0)
    assert out.tolist() == [1 + 4 * 2, 1 + 4 * -2]
    assert Guidance(1.0, 4.0).combine({"cond": cond, "drop_audio": drop_audio}).tolist() == out.tolist()


def test_apg_projection_clip_and_momentum():
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 3, 4, 4, generator=g)
    diff = 100 * torch.randn(2, 3, 4, 4, generator=g)
    out = adaptive_projected_guidance(diff, cond, None, norm_threshold=5.0)
    assert abs(float((out.double() * cond.double()).sum())) < 1e-4  # orthogonal to cond
    assert float(out.norm()) <= 5.0 + 1e-4  # clipped before projecting
    buf = MomentumBuffer(-0.75)
    d1, d2 = torch.ones(3), 2 * torch.ones(3)
    buf.update(d1)
    torch.testing.assert_close(buf.update(d2), d2 - 0.75 * d1)
    # identical branches: APG term is zero, no NaN from the zero-norm difference
    ga = Guidance(5.0, 4.0, apg=True)
    torch.testing.assert_close(ga.combine({"cond": cond, "drop_text": cond, "uncond": cond}), cond)


# ----------------------------------------------------------------------------------------- solver

SHAPE = (4, 5, 3, 3)  # [C, T_lat, h, w], tiny


def _x0_model(x0: torch.Tensor, noise: torch.Tensor, calls: list | None = None):
    """Exact flow-matching velocity for a single data point: v = eps - x0 on every branch."""

    def model_fn(latent, t, branch):
        if calls is not None:
            calls.append((branch, t.clone(), latent.clone()))
        return noise - x0

    return model_fn


@pytest.mark.parametrize(("steps", "text"), [(1, 5.0), (6, 5.0), (6, 1.0)])
def test_euler_recovers_x0_on_exact_velocity(steps, text):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    settings = GenerationSettings(steps=steps, text_guidance=text)
    calls: list = []
    out = sample_clip(_x0_model(x0, noise, calls), noise, timesteps(steps, 7.0), settings)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert len(calls) == steps * settings.passes_per_step
    assert [c[0] for c in calls[: settings.passes_per_step]] == list(passes_for(text))
    ts = timesteps(steps, 7.0)
    for k, (_, t, _) in enumerate(calls):
        assert t.shape == (1,) and t.item() == ts[k // settings.passes_per_step].item()


def test_euler_step_sign_and_size():
    latent, v = torch.full((2,), 1.0), torch.tensor([2.0, -4.0])
    out = euler_step(latent, v, torch.tensor(1000.0), torch.tensor(750.0))
    assert out.tolist() == [1.0 - 2.0 * 0.25, 1.0 + 4.0 * 0.25]


def test_motion_frames_are_renoised_each_step_and_clean_at_the_end():
    steps, seed, clip_index = 5, 123, 2
    settings = GenerationSettings(steps=steps, seed=seed)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    motion = torch.randn(SHAPE[0], 2, *SHAPE[2:], generator=g)
    calls: list = []
    ts = timesteps(steps, 7.0)
    out = sample_clip(
        _x0_model(x0, noise, calls), noise, ts, settings, motion_latent=motion, clip_index=clip_index
    )
    gen = motion_noise_generator(seed, clip_index)
    cond_latents = [c[2] for c in calls if c[0] == "cond"]
    for i, latent in enumerate(cond_latents):
        fresh = torch.randn(motion.shape, generator=gen)
        expected = (1 - ts[i] / 1000) * motion + ts[i] / 1000 * fresh
        torch.testing.assert_close(latent[:, :2], expected, atol=1e-6, rtol=0)
        if i == 0:  # frames after the motion latents start from the clip noise
            torch.testing.assert_close(latent[:, 2:], noise[:, 2:])
    assert torch.equal(out[:, :2], motion)  # t = 0 -> exactly the motion latents
    torch.testing.assert_close(out[:, 2:], x0[:, 2:], atol=1e-5, rtol=0)
    # the re-noising stream depends on the clip index
    other = sample_clip(
        _x0_model(x0, noise, calls := []), noise, ts, settings, motion_latent=motion, clip_index=3
    )
    assert not torch.allclose(calls[0][2][:, :2], cond_latents[0][:, :2])
    assert torch.equal(other[:, :2], motion)
    with pytest.raises(SamplerInputError) as info:
        sample_clip(_x0_model(x0, noise), noise, ts, settings, motion_latent=motion[:, :, :2])
    assert info.value.field == "motion_latent"


def test_cancellation_at_step_boundary():
    settings = GenerationSettings(steps=6)
    noise = torch.zeros(SHAPE)
    calls: list = []
    polls = {"n": 0}

    def step_boundary(latent):
        assert latent.shape == SHAPE  # the boundary sees the current latent
        polls["n"] += 1
        return polls["n"] == 3  # asked before steps 1, 2, 3 -> stop before step 3

    progress: list = []
    with pytest.raises(Cancelled) as info:
        sample_clip(
            _x0_model(noise, noise, calls),
            noise,
            timesteps(6, 7.0),
            settings,
            step_boundary=step_boundary,
            progress=lambda d, t: progress.append((d, t)),
        )
    assert (info.value.step, info.value.total) == (2, 6)
    assert len(calls) == 2 * 3 and progress == [(1, 6), (2, 6)]
    with pytest.raises(Cancelled):
        sample_clip(
            _x0_model(noise, noise, calls := []),
            noise,
            timesteps(6, 7.0),
            settings,
            step_boundary=lambda x: True,
        )
    assert calls == []


def test_noise_for_clip_is_seeded_per_clip():
    a = noise_for_clip(42, 0, (2, 3, 4))
    assert a.dtype == torch.float32 and a.shape == (2, 3, 4)
    assert torch.equal(a, noise_for_clip(42, 0, [2, 3, 4]))
    assert not torch.equal(a, noise_for_clip(42, 1, (2, 3, 4)))
    assert not torch.equal(a, noise_for_clip(43, 0, (2, 3, 4)))
    with pytest.raises(SamplerInputError) as info:
        noise_for_clip(-1, 0, (2,))
    assert info.value.field == "seed"
    assert torch.equal(renoise(a, torch.zeros_like(a), torch.tensor([0.0])), a)


# ----------------------------------------------------------------------------------------- clips


def _upstream_reference(T: int, frame_num: int, motion: int, max_frames: int):
    """Upstream `generate()` loop on index arrays: windows, clamped window rows after mirror padding,
    generated length and upstream's final (trimmed) length."""
    emb = list(range(T))
    offsets = range(-2, 3)
    start, end, cur_motion = 0, frame_num, 1
    first, arrive, gen_len, miss = True, False, 0, 0
    windows, rows = [], []
    while True:
        windows.append((start, end))
        rows.append([[emb[min(max(f + o, 0), len(emb) - 1)] for o in offsets] for f in range(start, end)])
        gen_len += frame_num if first else frame_num - cur_motion
        if arrive:
            break
        first, cur_motion = False, motion
        start += frame_num - cur_motion
        end = start + frame_num
        if end >= min(max_frames, T):
            arrive = True
            if end >= T:
                miss = end - T + 3
                emb = emb + emb[-miss:][::-1]
        if max_frames <= frame_num:
            break
    out = min(gen_len, max_frames)
    if max_frames > frame_num and miss > 0:
        out -= miss
    return windows, rows, gen_len, out


@pytest.mark.parametrize(
    ("seconds", "mode", "n_clips"),
    [
        (3.3, "streaming", 2),
        (6.0, "streaming", 3),
        (10.0, "streaming", 5),
        (40.0, "streaming", 18),
        (60.0, "streaming", 18),
        (10.0, "clip", 1),
    ],
)
def test_plan_matches_upstream_loop(seconds, mode, n_clips):
    T = int(seconds * 25)
    settings = GenerationSettings(mode=mode, max_frames=1000)  # upstream hard-codes 1000 in streaming mode
    plan = plan_clips(T, settings)
    cap = 81 if mode == "clip" else 1000
    windows, rows, gen_len, upstream_out = _upstream_reference(T, 81, 25, cap)
    assert len(plan.clips) == len(windows) == n_clips
    assert [(c.audio_start, c.audio_end) for c in plan.clips] == windows
    for clip, ref_rows in zip(plan.clips, rows, strict=True):
        assert plan.audio_indices(clip).tolist() == ref_rows
    assert [c.new_frames for c in plan.clips] == [81] + [56] * (n_clips - 1)
    assert [c.cond_frames for c in plan.clips] == [1] + [25] * (n_clips - 1)
    assert [c.is_last for c in plan.clips] == [False] * (n_clips - 1) + [True]
    assert plan.generated_frames == gen_len
    # ours: exactly the audio length (or cap); upstream drops 3 more (and the mirror tail after capping)
    assert plan.output_frames == min(T, cap) >= upstream_out
    assert sum(c.kept_frames for c in plan.clips) == plan.output_frames


def test_plan_short_audio_and_other_geometry():
    plan = plan_clips(50, GenerationSettings())
    assert len(plan.clips) == 1 and plan.output_frames == 50 and plan.clips[0].kept_frames == 50
    idx = plan.audio_indices(plan.clips[0])
    assert idx.shape == (81, 5) and int(idx.max()) == 49 and int(idx.min()) == 0
    s = GenerationSettings(frame_num=41, motion_frames=9, max_frames=200)
    plan = plan_clips(500, s)
    assert plan.output_frames == 200 and [c.audio_start for c in plan.clips] == [0, 32, 64, 96, 128, 160]
    windows, _, _, _ = _upstream_reference(500, 41, 9, 200)
    assert [(c.audio_start, c.audio_end) for c in plan.clips] == windows
    with pytest.raises(SamplerInputError):
        plan_clips(0, s)


def test_mirror_padding_indices():
    assert [mirror_index(i, 10) for i in (-2, -1, 0, 9, 10, 11, 19, 20, 21)] == [0, 0, 0, 9, 9, 8, 0, 0, 1]
    idx = audio_window_indices(7, 12, 10)
    assert idx.tolist() == [
        [5, 6, 7, 8, 9],
        [6, 7, 8, 9, 9],
        [7, 8, 9, 9, 8],
        [8, 9, 9, 8, 7],
        [9, 9, 8, 7, 6],
    ]
    assert audio_window_indices(0, 2, 10).tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3]]


def test_stitch_keeps_each_output_frame_once_in_order():
    settings = GenerationSettings()
    plan = plan_clips(250, settings)
    # each decoded frame carries its global frame index (clip window position)
    clips = [
        torch.arange(c.audio_start, c.audio_end, dtype=torch.float32).view(1, -1, 1, 1).expand(3, -1, 2, 2)
        for c in plan.clips
    ]
    video = stitch_clips(clips, plan)
    assert video.shape == (3, 250, 2, 2)
    assert video[0, :, 0, 0].tolist() == list(range(250))
    assert clip_new_frames(clips[1], plan.clips[1])[0, 0, 0, 0].item() == 81
    assert next_motion_frames(clips[0], 25)[0, :, 0, 0].tolist() == list(range(56, 81))
    assert motion_latent_frames(25) == 7 and motion_latent_frames(9) == 3 and motion_latent_frames(1) == 1
    with pytest.raises(SamplerInputError):
        stitch_clips(clips[:-1], plan)


# ----------------------------------------------------------------------------------------- colour


def test_lab_conversion_known_values_and_round_trip():
    lab = rgb_to_lab(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]).T).T  # channels first
    torch.testing.assert_close(
        lab[0], torch.tensor([53.2408, 80.0925, 67.2032], dtype=torch.float64), atol=2e-3, rtol=0
    )
    assert lab[1, 0].item() == pytest.approx(100.0, abs=1e-3) and lab[1, 1:].abs().max().item() < 0.02
    assert lab[2].abs().max().item() < 1e-9
    rgb = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-6, rtol=0)


def _lab_stats(frame01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """frame01: [3, H, W] in [0, 1] -> Lab channel mean [3] and population std [3]."""
    lab = rgb_to_lab(frame01).reshape(3, -1)
    return lab.mean(1), lab.std(1, correction=0)


def test_color_match_strength_0_identity_and_1_matches_reference():
    g = torch.Generator().manual_seed(4)
    reference = torch.rand(3, 16, 16, generator=g) * 1.2 - 0.6
    # a colour-drifted clip: scaled, tinted differently per frame, kept inside the gamut
    tint = torch.tensor([0.15, -0.05, -0.1]).view(3, 1, 1, 1) * torch.linspace(0.5, 1.0, 4).view(1, 4, 1, 1)
    frames = (0.7 * reference[:, None] + tint + 0.05 * torch.randn(3, 4, 16, 16, generator=g)).clamp(
        -0.95, 0.95
    )
    assert color_match(frames, reference, 0.0) is frames
    out = color_match(frames, reference, 1.0, chunk=3)
    assert out.shape == frames.shape and out.dtype == frames.dtype
    ref_mean, ref_std = _lab_stats((reference.double() + 1) / 2)
    for t in range(4):
        mean, std = _lab_stats((out[:, t].double() + 1) / 2)
        src_mean, _ = _lab_stats((frames[:, t].double() + 1) / 2)
        assert (mean - ref_mean).abs().max().item() < 0.5 < (src_mean - ref_mean).abs().max().item()
        assert (std - ref_std).abs().max().item() < 0.5
    half = color_match(frames, reference, 0.5)
    torch.testing.assert_close(half, 0.5 * frames + 0.5 * out, atol=1e-5, rtol=0)


def test_color_match_flat_frame_takes_reference_mean_and_validates():
    reference = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    flat = torch.zeros(3, 2, 8, 8)
    out = color_match(flat, reference, 1.0)
    ref_mean, _ = _lab_stats((reference.double() + 1) / 2)
    expected = lab_to_rgb(ref_mean) * 2 - 1
    torch.testing.assert_close(out[:, 0, 0, 0].double(), expected, atol=1e-5, rtol=0)
    assert math.isclose(float(out.std(dim=(2, 3)).max()), 0.0, abs_tol=1e-6)
    with pytest.raises(SamplerInputError) as info:
        color_match(flat, reference, 1.5)
    assert info.value.field == "strength"
    with pytest.raises(SamplerInputError):
        color_match(flat[0], reference, 1.0)


# ----------------------------------------------------------------------------------------- batched branches


def test_evaluate_branches_one_batched_call_equals_per_branch_calls():
    from inference.render.sampler import PassStats, evaluate_branches

    latent = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    scale = {"cond": 1.0, "drop_text": 2.0, "uncond": 3.0}

    def model_fn(x, t, branch):
        return x * scale[branch] + t

    def batch_fn(x, t, branches):
        return torch.stack([model_fn(x, t, b) for b in branches])

    t = torch.tensor([0.5])
    names = ("cond", "drop_text", "uncond")
    seq_stats, bat_stats = PassStats(), PassStats()
    seq = evaluate_branches(model_fn, latent, t, names, stats=seq_stats)
    bat = evaluate_branches(model_fn, latent, t, names, batch_fn=batch_fn, stats=bat_stats)
    assert all(torch.equal(seq[b], bat[b]) for b in names)
    assert (seq_stats.passes, seq_stats.model_calls) == (3, 3) and (
        bat_stats.passes,
        bat_stats.model_calls,
    ) == (3, 1)
    with pytest.raises(SamplerInputError) as err:
        evaluate_branches(model_fn, latent, t, names, batch_fn=lambda x, t, b: x[None])
    assert err.value.field == "batch_fn"


def test_sample_clip_counts_passes_per_step():
    from inference.render.sampler import PassStats

    settings = GenerationSettings(steps=4, text_guidance=1.0, seed=0)
    stats = PassStats()
    sample_clip(
        lambda x, t, b: torch.zeros_like(x),
        torch.zeros(16, 2, 2, 2),
        timesteps(4, 2.0),
        settings,
        stats=stats,
    )
    assert stats.to_dict() == {"passes": 8, "computed": 8, "skipped": 0, "model_calls": 8}
