"""MultiTalk sampling: timestep schedule, 3-/2-pass CFG (+ optional APG), Euler loop, long-video clips,
colour correction.

Everything here is plain single-process torch: the DiT is reached through a callable
`model_fn(latent, t, branch) -> velocity`, and nothing imports torch.distributed. All randomness comes
from CPU generators seeded from (seed, clip index), so every rank of a sequence-parallel group produces
the same latents without communicating.

Facts mirrored from upstream MeiGen-AI/MultiTalk (`wan/multitalk.py::MultiTalkPipeline.generate`,
`wan/utils/multitalk_utils.py`):
  * schedule: `linspace(1000, 1, steps)` (float32) plus a final 0, every entry passed through
    `timestep_transform` (t' = shift*t / (1 + (shift-1)*t) on t/1000, times 1000);
  * flow matching x_t = (1 - t) x0 + t eps; Euler `latent += (-v) * (t_i - t_{i+1}) / 1000`;
  * CFG `uncond + s_t (cond - drop_text) + s_a (drop_text - uncond)`, or with s_t == 1
    `drop_audio + s_a (cond - drop_audio)`;
  * streaming: clip windows advance by frame_num - motion_frames audio frames; motion latents are
    re-noised with FRESH noise to t_0 before the loop and to t_{i+1} after every step;
  * audio running out: the embedding is extended by mirroring its tail (`torch.flip`);
  * colour correction: per-frame Lab mean/std transfer toward the reference, blended by strength.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from common.errors import InputError
from inference.render.settings import GenerationSettings, count_clips, is_two_pass

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
AUDIO_WINDOW = 5
"""Audio frames per video frame fed to the model: offsets -2..+2 around the frame."""

BRANCH_COND = "cond"  # prompt + audio
BRANCH_DROP_TEXT = "drop_text"  # negative prompt + audio
BRANCH_UNCOND = "uncond"  # negative prompt + zero audio (one person)
BRANCH_DROP_AUDIO = "drop_audio"  # prompt + zero audio (one person)

NOISE_STREAM = 0
MOTION_NOISE_STREAM = 1

ModelFn = Callable[[Tensor, Tensor, str], Tensor]
"""model_fn(latent [C, T_lat, h, w] fp32, t [1] fp32 on latent.device, branch) -> velocity, same shape.
It must not modify `latent` in place."""

BatchFn = Callable[[Tensor, Tensor, tuple[str, ...]], Tensor]
"""batch_fn(latent [C, T_lat, h, w], t [1], branches) -> velocities [len(branches), C, T_lat, h, w]: all
guidance branches of one step in one forward (batch = branches). Must equal model_fn per branch."""


@dataclass
class PassStats:
    """Model work of one clip (or a sum over clips).

    passes: branch evaluations (steps x branches); model_calls: forwards issued (a batched forward
    evaluates all branches of a step at once); skipped: passes whose block stack TeaCache skipped
    (their embeddings and head still ran); computed = passes - skipped.
    """

    passes: int = 0
    model_calls: int = 0
    skipped: int = 0

    @property
    def computed(self) -> int:
        return self.passes - self.skipped

    def to_dict(self) -> dict[str, int]:
        return {
            "passes": self.passes,
            "computed": self.computed,
            "skipped": self.skipped,
            "model_calls": self.model_calls,
        }


class Cancelled(Exception):
    """Raised by `sample_clip` at a step boundary when `step_boundary(latent)` returned True."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"sampling cancelled before step {step + 1} of {total}")
        self.step = step
        self.total = total


class SamplerInputError(InputError):
    """Bad input to a sampler function; `.field` names the offending argument."""


# ---------------------------------------------------------------------------------------- schedule


def timestep_transform(t: Tensor, shift: float, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """Shift a timestep in [0, num_timesteps]: t' = shift*u / (1 + (shift-1)*u) * num_timesteps, u = t/N."""
    u = t / num_timesteps
    return shift * u / (1 + (shift - 1) * u) * num_timesteps


def timesteps(steps: int, shift: float) -> Tensor:
    """Sampling timesteps -> [steps + 1] float32, from 1000 down to exactly 0.

    As upstream: `np.linspace(1000, 1, steps, dtype=float32)`, append 0, then transform every entry in
    float32 (the shift maps 1000 -> 1000 and 0 -> 0, so only the interior moves toward 1000).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SamplerInputError("steps", f"expected a positive integer, got {steps!r}")
    if not (isinstance(shift, int | float) and math.isfinite(shift) and shift > 0):
        raise SamplerInputError("shift", f"expected a positive number, got {shift!r}")
    grid = np.linspace(NUM_TRAIN_TIMESTEPS, 1, steps, dtype=np.float32)
    ts = torch.from_numpy(np.append(grid, np.float32(0.0)).astype(np.float32))
    return timestep_transform(ts, float(shift))


# ---------------------------------------------------------------------------------------- guidance


def passes_for(text_scale: float) -> tuple[str, ...]:
    """Model branches evaluated per step: 3 with text guidance, 2 (no text branch) when it is 1."""
    if is_two_pass(text_scale):
        return (BRANCH_COND, BRANCH_DROP_AUDIO)
    return (BRANCH_COND, BRANCH_DROP_TEXT, BRANCH_UNCOND)


def guided_velocity(
    cond: Tensor, drop_text: Tensor, uncond: Tensor, text_scale: float, audio_scale: float
) -> Tensor:
    """3-pass CFG: uncond + s_t (cond - drop_text) + s_a (drop_text - uncond) (upstream's operand order)."""
    return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)


def guided_velocity_two_pass(cond: Tensor, drop_audio: Tensor, audio_scale: float) -> Tensor:
    """2-pass CFG used when text guidance is 1: drop_audio + s_a (cond - drop_audio)."""
    return drop_audio + audio_scale * (cond - drop_audio)


class MomentumBuffer:
    """APG running average: avg <- diff + momentum * avg (momentum is negative upstream: -0.75)."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.running_average: Tensor | float = 0.0

    def update(self, value: Tensor) -> Tensor:
        self.running_average = value + self.momentum * self.running_average
        return self.running_average


def adaptive_projected_guidance(
    diff: Tensor,
    pred_cond: Tensor,
    buffer: MomentumBuffer | None,
    norm_threshold: float,
    eta: float = 0.0,
) -> Tensor:
    """APG (arXiv 2410.02416) on one guidance difference. diff, pred_cond: [C, T, H, W].

    Momentum-average the difference, clip its L2 norm (over C,T,H,W) to norm_threshold (0 = no clip),
    and keep the component orthogonal to pred_cond plus eta times the parallel one.
    """
    if buffer is not None:
        diff = buffer.update(diff)
    dims = tuple(range(-min(4, diff.ndim), 0))
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
    v0, v1 = diff.double(), pred_cond.double()
    v1 = torch.nn.functional.normalize(v1.flatten(-len(dims)), dim=-1).view_as(v1)
    parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    orthogonal = v0 - parallel
    return (orthogonal + eta * parallel).to(diff.dtype)


class Guidance:
    """Combines the branch predictions of one step into the guided velocity.

    Holds APG momentum state, so make one per clip (upstream resets its buffers every clip).
    """

    def __init__(
        self,
        text_scale: float,
        audio_scale: float,
        *,
        apg: bool = False,
        apg_momentum: float = -0.75,
        apg_norm_threshold: float = 55.0,
    ) -> None:
        self.text_scale = text_scale
        self.audio_scale = audio_scale
        self.passes = passes_for(text_scale)
        self.apg = apg
        self.apg_norm_threshold = apg_norm_threshold
        self._text_buffer = MomentumBuffer(apg_momentum)
        self._audio_buffer = MomentumBuffer(apg_momentum)

    @classmethod
    def from_settings(cls, settings: GenerationSettings) -> Guidance:
        return cls(
            settings.text_guidance,
            settings.audio_guidance,
            apg=settings.apg,
            apg_momentum=settings.apg_momentum,
            apg_norm_threshold=settings.apg_norm_threshold,
        )

    def _apg(self, diff: Tensor, cond: Tensor, buffer: MomentumBuffer) -> Tensor:
        return adaptive_projected_guidance(diff, cond, buffer, self.apg_norm_threshold)

    def combine(self, preds: Mapping[str, Tensor]) -> Tensor:
        """preds: branch name -> velocity [C, T, H, W] for every name in `self.passes`."""
        missing = [b for b in self.passes if b not in preds]
        if missing:
            raise SamplerInputError(
                "preds", f"missing branch predictions {missing}; need {list(self.passes)}"
            )
        cond = preds[BRANCH_COND]
        if self.passes == (BRANCH_COND, BRANCH_DROP_AUDIO):
            drop_audio = preds[BRANCH_DROP_AUDIO]
            if not self.apg:
                return guided_velocity_two_pass(cond, drop_audio, self.audio_scale)
            return cond + (self.audio_scale - 1) * self._apg(cond - drop_audio, cond, self._audio_buffer)
        drop_text, uncond = preds[BRANCH_DROP_TEXT], preds[BRANCH_UNCOND]
        if not self.apg:
            return guided_velocity(cond, drop_text, uncond, self.text_scale, self.audio_scale)
        text_term = self._apg(cond - drop_text, cond, self._text_buffer)
        audio_term = self._apg(drop_text - uncond, cond, self._audio_buffer)
        return cond + (self.text_scale - 1) * text_term + (self.audio_scale - 1) * audio_term


def evaluate_branches(
    model_fn: ModelFn,
    latent: Tensor,
    t: Tensor,
    branches: tuple[str, ...],
    *,
    batch_fn: BatchFn | None = None,
    stats: PassStats | None = None,
) -> dict[str, Tensor]:
    """The branch predictions of one step: branch name -> velocity [C, T, H, W] fp32, for `Guidance.combine`.

    One model_fn call per branch, or one batch_fn call for all of them (rows in `branches` order).
    """
    if batch_fn is not None:
        out = batch_fn(latent, t, branches)
        if out.shape != (len(branches), *latent.shape):
            raise SamplerInputError(
                "batch_fn",
                f"returned shape {tuple(out.shape)}, expected {(len(branches), *latent.shape)}",
            )
        preds = {b: out[j].to(torch.float32) for j, b in enumerate(branches)}
        calls = 1
    else:
        preds = {}
        for branch in branches:
            out = model_fn(latent, t, branch)
            if out.shape != latent.shape:
                raise SamplerInputError(
                    "model_fn",
                    f"branch {branch!r} returned shape {tuple(out.shape)}, expected {tuple(latent.shape)}",
                )
            preds[branch] = out.to(torch.float32)
        calls = len(branches)
    if stats is not None:
        stats.passes += len(branches)
        stats.model_calls += calls
    return preds


# ---------------------------------------------------------------------------------------- solver


def euler_step(latent: Tensor, velocity: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One flow-matching Euler step from t to t_next (both in [0, 1000]): latent + (-v) * (t - t_next)/1000.

    With x_t = (1 - t) x0 + t eps the velocity is v = eps - x0, so the step moves toward x0.
    """
    dt = (t - t_next) / NUM_TRAIN_TIMESTEPS
    return latent + (-velocity) * dt


def renoise(clean: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Forward process at timestep t in [0, 1000]: (1 - t/1000) * clean + t/1000 * noise."""
    s = t.float() / NUM_TRAIN_TIMESTEPS
    return (1 - s) * clean + s * noise


def derive_seed(seed: int, clip_index: int, stream: int) -> int:
    """64-bit seed for one (clip, stream) pair, via numpy's SeedSequence (stable across versions).

    Upstream seeds torch once and draws every clip's noise in sequence from the CUDA generator, which
    ties the noise to the device and to everything drawn before. We derive an independent CPU stream
    per clip (stream 0: initial latent noise; 1: motion-frame re-noising), so a clip's noise depends
    only on (seed, clip index) and is identical on every rank and device.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SamplerInputError("seed", f"expected a resolved non-negative integer seed, got {seed!r}")
    if clip_index < 0 or stream < 0:
        raise SamplerInputError("clip_index", "clip index and stream must be non-negative")
    words = np.random.SeedSequence(entropy=seed, spawn_key=(clip_index, stream)).generate_state(2, np.uint32)
    return (int(words[0]) << 32) | int(words[1])


def _generator(seed: int, clip_index: int, stream: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, clip_index, stream))
    return gen


def noise_for_clip(
    seed: int, clip_index: int, shape: Sequence[int], *, device: torch.device | str | None = None
) -> Tensor:
    """Initial latent noise of one clip -> float32 `shape` (e.g. [16, 21, h, w]) from a seeded CPU generator."""
    noise = torch.randn(
        tuple(shape), generator=_generator(seed, clip_index, NOISE_STREAM), dtype=torch.float32
    )
    return noise.to(device) if device is not None else noise


def motion_noise_generator(seed: int, clip_index: int) -> torch.Generator:
    """CPU generator for the per-step motion re-noising of one clip (one draw before the loop, one per step)."""
    return _generator(seed, clip_index, MOTION_NOISE_STREAM)


def sample_clip(
    model_fn: ModelFn,
    noise: Tensor,
    timesteps: Tensor,
    settings: GenerationSettings,
    *,
    motion_latent: Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
    clip_index: int = 0,
    step_boundary: Callable[[Tensor], bool] | None = None,
    batch_fn: BatchFn | None = None,
    stats: PassStats | None = None,
) -> Tensor:
    """Denoise one clip. noise: [C=16, T_lat, h, w]; timesteps: [steps + 1] from `timesteps()`.

    motion_latent: [C, T_m, h, w] clean latents of the previous clip's motion frames (None for the first
    clip). Their latent frames are replaced by `renoise(motion, fresh_noise, t)` before the first step
    (t_0) and after every step (t_{i+1}), so at the end (t = 0) they equal the motion latents exactly.
    The fresh noise comes from `motion_noise_generator(settings.seed, clip_index)`, so settings.seed
    must be resolved (non-negative) when motion_latent is given.

    step_boundary(latent) is called before every step with the current latent; True raises `Cancelled`
    (the engine all-reduces the cancel flag there and, in debug mode, checks the latents agree on every
    rank). In a multi-rank group the answer must be the same on every rank (the engine decides it).
    progress(done, total) is called after every step. batch_fn, when given, evaluates the branches of
    each step in one batched forward instead of one model_fn call per branch; stats, when given, counts
    the passes and forwards. Returns the clean latent [C, T_lat, h, w] fp32.
    """
    if noise.ndim != 4:
        raise SamplerInputError("noise", f"expected [C, T_lat, h, w], got shape {tuple(noise.shape)}")
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise SamplerInputError(
            "timesteps", f"expected [steps + 1] with steps >= 1, got {tuple(timesteps.shape)}"
        )
    latent = noise.to(torch.float32).clone()
    device = latent.device
    ts = timesteps.to(device=device, dtype=torch.float32)
    total = ts.numel() - 1
    guidance = Guidance.from_settings(settings)

    motion: Tensor | None = None
    motion_gen: torch.Generator | None = None
    t_m = 0
    if motion_latent is not None:
        c, t_lat, h, w = latent.shape
        if motion_latent.ndim != 4 or (motion_latent.shape[0], *motion_latent.shape[2:]) != (c, h, w):
            raise SamplerInputError(
                "motion_latent", f"expected [{c}, T_m, {h}, {w}], got shape {tuple(motion_latent.shape)}"
            )
        t_m = motion_latent.shape[1]
        if not 1 <= t_m < t_lat:
            raise SamplerInputError("motion_latent", f"{t_m} motion latent frames; need 1..{t_lat - 1}")
        motion = motion_latent.to(device=device, dtype=torch.float32)
        motion_gen = motion_noise_generator(settings.seed, clip_index)

    def inject(t: Tensor) -> None:
        assert motion is not None and motion_gen is not None
        fresh = torch.randn(motion.shape, generator=motion_gen, dtype=torch.float32).to(device)
        latent[:, :t_m] = renoise(motion, fresh, t)

    if motion is not None:
        inject(ts[0])

    for i in range(total):
        if step_boundary is not None and step_boundary(latent):
            logger.info("clip %d cancelled before step %d/%d", clip_index, i + 1, total)
            raise Cancelled(i, total)
        preds = evaluate_branches(
            model_fn, latent, ts[i : i + 1], guidance.passes, batch_fn=batch_fn, stats=stats
        )
        velocity = guidance.combine(preds)
        latent = euler_step(latent, velocity, ts[i], ts[i + 1])
        if motion is not None:
            inject(ts[i + 1])
        if progress is not None:
            progress(i + 1, total)
    return latent


# ---------------------------------------------------------------------------------------- long video


def motion_latent_frames(motion_frames: int) -> int:
    """Latent frames covering the first `motion_frames` video frames: 1 + (m - 1) // 4 (25 -> 7)."""
    return 1 + (motion_frames - 1) // 4


def mirror_index(i: int, num_frames: int) -> int:
    """Index into an embedding of `num_frames` frames for a possibly out-of-range frame `i`.

    i < 0 clamps to 0 (upstream clamps the window). Past the end the embedding is mirrored as upstream's
    `cat([emb, flip(emb[-miss:])])`: frame T maps to T-1, T+1 to T-2, ...; for very short audio the
    reflection repeats (period 2T) instead of clamping.
    """
    if i < 0:
        return 0
    if i < num_frames:
        return i
    j = (i - num_frames) % (2 * num_frames)
    return num_frames - 1 - j if j < num_frames else j - num_frames


def audio_window_indices(start: int, end: int, num_audio_frames: int, window: int = AUDIO_WINDOW) -> Tensor:
    """Embedding rows for video frames [start, end) -> LongTensor [end - start, window].

    Row f holds frames f - window//2 .. f + window//2 mapped through `mirror_index`, so
    `emb[indices]` gives the model's audio input [end - start, window, 12, 768] for one person.
    """
    if num_audio_frames < 1:
        raise SamplerInputError("num_audio_frames", f"need at least 1 audio frame, got {num_audio_frames}")
    if not 0 <= start < end:
        raise SamplerInputError("start", f"invalid frame range [{start}, {end})")
    half = window // 2
    rows = [
        [mirror_index(f + o, num_audio_frames) for o in range(-half, window - half)]
        for f in range(start, end)
    ]
    return torch.tensor(rows, dtype=torch.long)


@dataclass(frozen=True)
class ClipSpec:
    """One clip of a long video. Video frame f of the output is driven by audio frame f.

    audio_start/audio_end: the clip's frame (and audio) window [start, start + frame_num).
    cond_frames: conditioning frames at its start: 1 (the reference image) for the first clip, motion
    frames for the rest. new_frames: frames it appends before trimming (frame_num, then
    frame_num - motion_frames). kept_frames: of those, how many survive the trim to the audio length.
    """

    index: int
    audio_start: int
    audio_end: int
    cond_frames: int
    new_frames: int
    kept_frames: int
    is_last: bool

    @property
    def skip_frames(self) -> int:
        """Leading decoded frames that repeat the previous clip's motion frames (0 for the first clip)."""
        return (self.audio_end - self.audio_start) - self.new_frames

    @property
    def is_first(self) -> bool:
        return self.index == 0


@dataclass(frozen=True)
class ClipPlan:
    num_audio_frames: int
    frame_num: int
    motion_frames: int
    output_frames: int
    clips: tuple[ClipSpec, ...]

    def audio_indices(self, clip: ClipSpec) -> Tensor:
        """LongTensor [frame_num, 5] of embedding rows for this clip (mirror padded past the end)."""
        return audio_window_indices(clip.audio_start, clip.audio_end, self.num_audio_frames)

    @property
    def generated_frames(self) -> int:
        """Frames produced before trimming (the last clip's window end)."""
        return self.clips[-1].audio_end

    @property
    def output_seconds(self) -> float:
        return self.output_frames / 25.0


def plan_clips(num_audio_frames: int, settings: GenerationSettings) -> ClipPlan:
    """Clip schedule for `num_audio_frames` audio-embedding frames (25 fps).

    Streaming: clip k covers [k*s, k*s + frame_num) with s = frame_num - motion_frames; clips are added
    until a window reaches min(audio, max_frames), as upstream. Clip mode: one clip. The output is
    min(audio, cap) frames (cap = max_frames, or frame_num in clip mode).

    Deviations from upstream, on purpose: upstream asserts audio > frame_num, while audio shorter than a
    clip is accepted here (generated with mirrored audio, then trimmed). Upstream trims the mirrored
    `miss = end - T + 3` frames after capping, which leaves T - 3 frames (and fewer when the cap
    applies too); here the output is exactly the audio length (or the cap).
    """
    if isinstance(num_audio_frames, bool) or not isinstance(num_audio_frames, int) or num_audio_frames < 1:
        raise SamplerInputError("num_audio_frames", f"need at least 1 audio frame, got {num_audio_frames!r}")
    frame_num, motion = settings.frame_num, settings.motion_frames
    output = min(num_audio_frames, settings.output_frame_cap)
    n = count_clips(num_audio_frames, settings)
    stride = frame_num - motion
    clips = []
    for k in range(n):
        start = k * stride
        skip = 0 if k == 0 else motion
        first_new = start + skip
        kept = max(0, min(start + frame_num, output) - first_new)
        clips.append(
            ClipSpec(
                index=k,
                audio_start=start,
                audio_end=start + frame_num,
                cond_frames=1 if k == 0 else motion,
                new_frames=frame_num - skip,
                kept_frames=kept,
                is_last=k == n - 1,
            )
        )
    plan = ClipPlan(num_audio_frames, frame_num, motion, output, tuple(clips))
    if sum(c.kept_frames for c in clips) != output or any(c.kept_frames < 1 for c in clips):
        raise AssertionError(f"inconsistent clip plan {plan}")  # a bug here, never a user error
    return plan


def clip_new_frames(frames: Tensor, clip: ClipSpec) -> Tensor:
    """The frames a decoded clip contributes to the output: frames [3, frame_num, H, W] -> [3, kept, H, W]."""
    expected = clip.audio_end - clip.audio_start
    if frames.ndim != 4 or frames.shape[1] != expected:
        raise SamplerInputError(
            "frames", f"clip {clip.index}: expected [3, {expected}, H, W], got {tuple(frames.shape)}"
        )
    return frames[:, clip.skip_frames : clip.skip_frames + clip.kept_frames]


def stitch_clips(clip_frames: Sequence[Tensor], plan: ClipPlan) -> Tensor:
    """Concatenate decoded clips [3, frame_num, H, W] each -> [3, plan.output_frames, H, W].

    The first clip keeps all its frames, later ones drop their leading motion frames, and the total is
    trimmed to the audio length (or cap).
    """
    if len(clip_frames) != len(plan.clips):
        raise SamplerInputError(
            "clip_frames", f"got {len(clip_frames)} clips, the plan has {len(plan.clips)}"
        )
    return torch.cat([clip_new_frames(f, c) for f, c in zip(clip_frames, plan.clips, strict=True)], dim=1)


def next_motion_frames(frames: Tensor, motion_frames: int) -> Tensor:
    """Conditioning frames for the next clip: the last `motion_frames` of the (colour-corrected) decoded
    clip, frames [3, frame_num, H, W] -> [3, motion_frames, H, W]. Upstream also takes the next clip's
    CLIP image feature from the last of these frames."""
    return frames[:, -motion_frames:]


# ---------------------------------------------------------------------------------------- colour


# sRGB (D65) <-> CIE XYZ, the matrix skimage uses (upstream calls skimage.color.rgb2lab / lab2rgb).
_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)  # 2-degree observer


def _mix(matrix: Tensor, x: Tensor) -> Tensor:
    """Apply a 3x3 colour matrix along dim 0: x [3, ...] -> [3, ...]."""
    return (matrix.to(device=x.device, dtype=x.dtype) @ x.reshape(3, -1)).view(x.shape)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] -> CIE Lab (D65, 2 deg), channels first: rgb [3, ...] -> [3, ...] float64 (L 0..100)."""
    rgb = rgb.to(torch.float64)
    lin = torch.where(rgb > 0.04045, ((rgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    white = _WHITE_D65.to(rgb.device).view(3, *([1] * (rgb.ndim - 1)))
    xyz = _mix(_XYZ_FROM_RGB, lin) / white
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    return torch.stack([116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])])


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIE Lab (D65, 2 deg) -> sRGB clipped to [0, 1], channels first: lab [3, ...] -> [3, ...] float64.

    As skimage: negative z is clamped to 0 before the inverse companding.
    """
    lab = lab.to(torch.float64)
    fy = (lab[0] + 16.0) / 116.0
    f = torch.stack([lab[1] / 500.0 + fy, fy, (fy - lab[2] / 200.0).clamp_min(0.0)])
    white = _WHITE_D65.to(lab.device).view(3, *([1] * (lab.ndim - 1)))
    xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787) * white
    lin = _mix(_RGB_FROM_XYZ, xyz)
    srgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055, 12.92 * lin)
    return srgb.clamp_(0.0, 1.0)


def _lab_stats(lab: Tensor) -> tuple[Tensor, Tensor]:
    """Per-frame channel mean and population std: lab [3, N, H, W] -> ([3, N, 1, 1], [3, N, 1, 1])."""
    return lab.mean(dim=(-2, -1), keepdim=True), lab.std(dim=(-2, -1), correction=0, keepdim=True)


def color_match(frames: Tensor, reference: Tensor, strength: float, *, chunk: int = 8) -> Tensor:
    """Pull every frame's colours toward the reference image (upstream `match_and_blend_colors`).

    frames: [3, T, H, W] in [-1, 1]; reference: [3, H', W'] in [-1, 1]. For each frame, in Lab, each
    channel is shifted and scaled to the reference's mean and std; the result (back in sRGB, clipped to
    [0, 1]) is blended with the clipped source by `strength`. Strength 0 returns `frames` unchanged.
    Returns [3, T, H, W] in frames' dtype/device. Work is float64 in chunks of `chunk` frames to bound memory.
    """
    if not (isinstance(strength, int | float) and 0.0 <= strength <= 1.0):
        raise SamplerInputError("strength", f"colour correction strength must be in 0..1, got {strength!r}")
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise SamplerInputError("frames", f"expected [3, T, H, W], got {tuple(frames.shape)}")
    if reference.ndim != 3 or reference.shape[0] != 3:
        raise SamplerInputError("reference", f"expected [3, H, W], got {tuple(reference.shape)}")
    if strength == 0.0:
        return frames

    ref01 = ((reference.to(device=frames.device, dtype=torch.float64) + 1.0) / 2.0).clamp(0.0, 1.0)
    ref_mean, ref_std = _lab_stats(rgb_to_lab(ref01[:, None]))  # [3, 1, 1, 1] each
    out = torch.empty_like(frames)
    for t0 in range(0, frames.shape[1], chunk):
        src = ((frames[:, t0 : t0 + chunk].to(torch.float64) + 1.0) / 2.0).clamp(0.0, 1.0)  # [3, n, H, W]
        lab = rgb_to_lab(src)
        mean, std = _lab_stats(lab)
        # Upstream sets a channel with zero spread to the reference mean; a tiny tolerance keeps
        # float round-off in the mean of a flat channel from being amplified by ref_std / std.
        scale = torch.where(std <= 1e-8, torch.zeros_like(std), ref_std / std.clamp_min(1e-8))
        corrected = lab_to_rgb((lab - mean) * scale + ref_mean)
        blended = (1.0 - strength) * src + strength * corrected
        out[:, t0 : t0 + chunk] = (blended * 2.0 - 1.0).to(frames.dtype)
    return out
