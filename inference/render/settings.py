"""User-tunable generation settings for one MultiTalk job: validation, presets and a time estimate.

This module is deliberately free of torch so the UI and REST layers can validate input cheaply.
Defaults and ranges follow upstream MeiGen-AI/MultiTalk (`generate_multitalk.py`,
`wan/configs/wan_multitalk_14B.py`); deviations are documented per field.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass
from typing import Any

from common.errors import InputError

logger = logging.getLogger(__name__)

FPS = 25
"""Video frame rate; wav2vec2 embeddings are interpolated to the same 25 frames per second."""

VAE_TEMPORAL_STRIDE = 4

# Upstream MultiTalk default negative prompt: `wan_multitalk_14B.py` overrides Wan's shared Chinese
# `sample_neg_prompt` with this English list, and `MultiTalkPipeline` uses it when `n_prompt == ""`.
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards"
)

# Wan 2.1's shared default (`wan/configs/shared_config.py`), the Chinese original of the list above.
# Not the MultiTalk default; kept so a user can opt into it.
WAN_NEGATIVE_PROMPT_ZH = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# The scene description used when a job gives none (REST, UI and CLI alike).
DEFAULT_PROMPT = (
    "Two people are having a conversation, facing each other and the camera, with natural facial "
    "expressions, lip movements and small gestures; realistic, well lit, steady camera."
)
DEFAULT_SHIFT = {480: 7.0, 720: 11.0}
MODES = ("streaming", "clip")
RESOLUTIONS = (480, 720)

STEPS_RANGE = (1, 100)
GUIDANCE_RANGE = (1.0, 20.0)
SHIFT_RANGE = (0.1, 30.0)
SEED_RANGE = (-(2**63), 2**63 - 1)
FRAME_NUM_RANGE = (5, 201)
MAX_FRAMES_LIMIT = 9000  # 6 minutes at 25 fps: the longest video
# The default cap is the longest video, so that every script within the script limits (5,000 characters,
# about 5.5 minutes of speech) renders whole; upstream MultiTalk hard-codes 1000 (40 s) and cuts silently.
DEFAULT_MAX_FRAMES = MAX_FRAMES_LIMIT
NEGATIVE_PROMPT_MAX_CHARS = 4000
APG_MOMENTUM_RANGE = (-1.0, 1.0)
APG_NORM_THRESHOLD_RANGE = (0.0, 1000.0)
TEACACHE_THRESH_RANGE = (0.01, 1.0)  # upstream's README recommends 0.2..0.5
LORA_MODES = ("none", "merged", "switchable")


class SettingsError(InputError):
    """A generation setting is invalid. `.field` names it and `.allowed` describes the valid values."""

    allowed: str | None = None


def _invalid(field: str, message: str, allowed: str | None = None) -> SettingsError:
    """A ``SettingsError`` whose message ends with the allowed values, also kept as ``.allowed``."""
    error = SettingsError(field, message + (f" (allowed: {allowed})" if allowed else ""))
    error.allowed = allowed
    return error


def is_two_pass(text_guidance: float) -> bool:
    """True when text guidance is 1, where upstream drops the text branch (2 model passes per step)."""
    return math.isclose(text_guidance, 1.0)


def _as_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(name, f"expected an integer, got {type(value).__name__} {value!r}", f"{lo}..{hi}")
    if isinstance(value, float):
        # Sliders and JSON clients often send 40.0 for 40; anything fractional is a real mistake.
        if not value.is_integer():
            raise _invalid(name, f"expected an integer, got {value!r}", f"{lo}..{hi}")
        value = int(value)
    if not lo <= value <= hi:
        shown = value if abs(value) < 10**18 else f"a {value.bit_length()}-bit integer"
        raise _invalid(name, f"{shown} is out of range", f"{lo}..{hi}")
    return value


def _as_float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(name, f"expected a number, got {type(value).__name__} {value!r}", f"{lo}..{hi}")
    if isinstance(value, int) and not lo <= value <= hi:  # compared as ints: a huge one never meets float()
        raise _invalid(name, f"a {value.bit_length()}-bit integer is out of range", f"{lo}..{hi}")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise _invalid(name, f"{value} is out of range", f"{lo}..{hi}")
    return value


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings for one job (the prompt is job input, not a setting).

    Fields (upstream default in brackets):
      steps: Euler denoising steps per clip [40], 1..100.
      text_guidance: text CFG scale [5.0], 1..20; exactly 1 switches to 2 model passes per step.
      audio_guidance: audio CFG scale [4.0], 1..20.
      shift: flow-matching timestep shift; None means 7 at 480p and 11 at 720p.
      seed: noise seed [42]; negative means "random", resolved once on rank 0 by `with_resolved_seed`.
      resolution: 480 or 720 (resolution bucket family).
      frame_num: frames per clip [81], 4n+1 in 5..201.
      motion_frames: frames of the previous clip that condition the next one [25], 4k+1, < frame_num.
      mode: "streaming" (long video, clips overlap by motion_frames) or "clip" (one clip only).
      max_frames: cap on output frames in streaming mode [upstream 1000 = 40 s; here 9000 = 6 min],
        frame_num..9000. Speech longer than the cap is refused, never cut (``inference.render.length``).
      color_correction: Lab mean/std colour transfer toward the reference image [1.0], 0..1.
      negative_prompt: the "null text" of text CFG [upstream MultiTalk English list].
      apg / apg_momentum / apg_norm_threshold: Adaptive Projected Guidance [off, -0.75, 55].
      lora: run with the service's step-distillation LoRA(s) [off]; needs a service started with
        --lora_dir (with --lora_mode merged every job runs with them, so it must be on).
      teacache / teacache_thresh: TeaCache (skip the block stack while the timestep modulation barely
        moves) [off, 0.2], threshold 0.01..1 (upstream recommends 0.2..0.5; higher skips more).
    """

    steps: int = 40
    text_guidance: float = 5.0
    audio_guidance: float = 4.0
    shift: float | None = None
    seed: int = 42
    resolution: int = 480
    frame_num: int = 81
    motion_frames: int = 25
    mode: str = "streaming"
    max_frames: int = DEFAULT_MAX_FRAMES
    color_correction: float = 1.0
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0
    lora: bool = False
    teacache: bool = False
    teacache_thresh: float = 0.2

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("steps", _as_int("steps", self.steps, *STEPS_RANGE))
        put("text_guidance", _as_float("text_guidance", self.text_guidance, *GUIDANCE_RANGE))
        put("audio_guidance", _as_float("audio_guidance", self.audio_guidance, *GUIDANCE_RANGE))
        if self.shift is not None:
            put("shift", _as_float("shift", self.shift, *SHIFT_RANGE))
        put("seed", _as_int("seed", self.seed, *SEED_RANGE))
        if isinstance(self.resolution, bool) or self.resolution not in RESOLUTIONS:
            raise _invalid("resolution", f"unsupported value {self.resolution!r}", "480 or 720")
        put("resolution", int(self.resolution))

        frame_num = _as_int("frame_num", self.frame_num, *FRAME_NUM_RANGE)
        if (frame_num - 1) % VAE_TEMPORAL_STRIDE:
            raise _invalid("frame_num", f"{frame_num} is not of the form 4n+1", "5, 9, ..., 81, ..., 201")
        put("frame_num", frame_num)
        # Each clip must add at least 4 new frames (one latent frame), hence the upper bound.
        motion = _as_int("motion_frames", self.motion_frames, 1, frame_num - VAE_TEMPORAL_STRIDE)
        if (motion - 1) % VAE_TEMPORAL_STRIDE:
            # The motion latents are the first 1 + (m-1)//4 latent frames; 4k+1 keeps them exact.
            raise _invalid(
                "motion_frames", f"{motion} is not of the form 4k+1", f"1, 5, 9, ..., {frame_num - 4}"
            )
        put("motion_frames", motion)

        if self.mode not in MODES:
            raise _invalid("mode", f"unsupported value {self.mode!r}", "'streaming' or 'clip'")
        put("max_frames", _as_int("max_frames", self.max_frames, frame_num, MAX_FRAMES_LIMIT))
        put("color_correction", _as_float("color_correction", self.color_correction, 0.0, 1.0))

        if not isinstance(self.negative_prompt, str):
            raise SettingsError(
                "negative_prompt", f"expected text, got {type(self.negative_prompt).__name__}"
            )
        if len(self.negative_prompt) > NEGATIVE_PROMPT_MAX_CHARS:
            raise _invalid(
                "negative_prompt",
                f"{len(self.negative_prompt)} characters is too long",
                f"at most {NEGATIVE_PROMPT_MAX_CHARS}",
            )
        if not isinstance(self.apg, bool):
            raise _invalid("apg", f"expected true or false, got {self.apg!r}", "true or false")
        put("apg_momentum", _as_float("apg_momentum", self.apg_momentum, *APG_MOMENTUM_RANGE))
        put(
            "apg_norm_threshold",
            _as_float("apg_norm_threshold", self.apg_norm_threshold, *APG_NORM_THRESHOLD_RANGE),
        )
        for name in ("lora", "teacache"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, f"expected true or false, got {getattr(self, name)!r}", "true or false")
        put("teacache_thresh", _as_float("teacache_thresh", self.teacache_thresh, *TEACACHE_THRESH_RANGE))

    # ------------------------------------------------------------------ derived values

    @property
    def effective_shift(self) -> float:
        """The shift actually used: the explicit one, else 7 (480p) or 11 (720p) as upstream."""
        return self.shift if self.shift is not None else DEFAULT_SHIFT[self.resolution]

    @property
    def two_pass(self) -> bool:
        return is_two_pass(self.text_guidance)

    @property
    def passes_per_step(self) -> int:
        """Model forward passes per denoising step: 2 when text guidance is 1, else 3."""
        return 2 if self.two_pass else 3

    @property
    def latent_frames(self) -> int:
        """Latent frames per clip: [frame_num] -> (frame_num - 1) // 4 + 1 (81 -> 21)."""
        return (self.frame_num - 1) // VAE_TEMPORAL_STRIDE + 1

    @property
    def output_frame_cap(self) -> int:
        """Most output frames this job can produce: frame_num in clip mode, max_frames in streaming."""
        return self.frame_num if self.mode == "clip" else self.max_frames

    def with_resolved_seed(self, rng: random.Random | None = None) -> GenerationSettings:
        """Return settings with a concrete non-negative seed.

        Call once on rank 0 before broadcasting the job, so every rank samples the same noise
        (upstream draws `random.randint` on rank 0 and broadcasts it). Non-negative seeds pass through.
        """
        if self.seed >= 0:
            return self
        seed = (rng or random.SystemRandom()).randint(0, 2**31 - 1)
        logger.info("random seed requested; using seed %d", seed)
        return dataclasses.replace(self, seed=seed)

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (shift may be None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationSettings:
        """Build from a dict of field values; missing keys take defaults, unknown keys are rejected."""
        if not isinstance(d, dict):
            raise SettingsError("settings", f"expected an object of settings, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                raise _invalid(str(key), "unknown setting", ", ".join(known))
        return cls(**d)


def count_clips(num_audio_frames: int, settings: GenerationSettings) -> int:
    """Clips needed for `num_audio_frames` of audio (upstream streaming loop, closed form).

    One clip in clip mode or when the (capped) length fits one clip; otherwise
    1 + ceil((L - frame_num) / (frame_num - motion_frames)) with L = min(audio, max_frames).
    """
    length = min(num_audio_frames, settings.output_frame_cap)
    if settings.mode == "clip" or length <= settings.frame_num:
        return 1
    stride = settings.frame_num - settings.motion_frames
    return 1 + -(-(length - settings.frame_num) // stride)


def estimate_seconds(
    settings: GenerationSettings,
    audio_seconds: float,
    step_time_s: float,
    *,
    clip_overhead_s: float = 0.0,
) -> float:
    """Rough wall time of the denoising part of a job.

    step_time_s is the time of ONE model forward pass (one guidance branch) over one clip at this
    resolution on the target hardware, so presets with 2 passes per step come out cheaper.
    clip_overhead_s adds per-clip fixed costs (VAE encode/decode, CLIP, colour correction).
    Returns clips * (steps * passes_per_step * step_time_s + clip_overhead_s).
    """
    if not (math.isfinite(audio_seconds) and audio_seconds >= 0):
        raise _invalid("audio_seconds", f"{audio_seconds!r} is not a valid duration", ">= 0")
    if not (math.isfinite(step_time_s) and step_time_s >= 0):
        raise _invalid("step_time_s", f"{step_time_s!r} is not a valid time", ">= 0")
    frames = max(1, int(audio_seconds * FPS))
    clips = count_clips(frames, settings)
    return clips * (settings.steps * settings.passes_per_step * step_time_s + clip_overhead_s)


@dataclass(frozen=True)
class LoraState:
    """What a service knows about its LoRAs: mode (none | merged | switchable), the file names, and the
    steps its distilled preset uses (upstream's README: 4 for lightx2v, 8 for FusionX)."""

    mode: str = "none"
    names: tuple[str, ...] = ()
    steps: int = 4

    def __post_init__(self) -> None:
        if self.mode not in LORA_MODES:
            raise _invalid("lora_mode", f"unsupported value {self.mode!r}", ", ".join(LORA_MODES))
        if (self.mode == "none") != (not self.names):
            raise _invalid("lora_mode", f"mode {self.mode!r} with LoRA files {list(self.names)}")
        _as_int("lora_steps", self.steps, *STEPS_RANGE)

    @classmethod
    def of(cls, mode: str, names: tuple[str, ...] | list[str]) -> LoraState:
        """State for files ``names`` (stems): 8 distilled steps when one is a FusionX LoRA, else 4."""
        names = tuple(names)
        if not names:
            return cls()
        fusionx = any("fusionx" in n.lower() for n in names)
        return cls(mode=mode, names=names, steps=8 if fusionx else 4)

    @property
    def loaded(self) -> bool:
        return self.mode != "none"


def check_lora_setting(settings: GenerationSettings, lora: LoraState) -> None:
    """Refuse a job's ``lora`` setting that this service cannot honour (``SettingsError`` on ``lora``)."""
    if settings.lora and not lora.loaded:
        raise _invalid("lora", "this service has no LoRA loaded (start it with --lora_dir)", "false")
    if not settings.lora and lora.mode == "merged":
        raise _invalid(
            "lora",
            "this service merged its LoRA into the weights (--lora_mode merged), so every job runs with "
            "it; restart with --lora_mode switchable to also run without",
            "true",
        )


@dataclass(frozen=True)
class Preset:
    """A named starting point for settings; `apply` layers user overrides on top.

    settings: without a LoRA. lora_settings: on a service with a step-distillation LoRA (None: the
    preset never uses one). A preset without lora_settings is not offered by a service that merged
    its LoRA (it cannot switch it off).
    """

    name: str
    description: str
    settings: GenerationSettings
    lora_settings: GenerationSettings | None = None
    lora_description: str = ""

    def settings_for(self, lora: LoraState = LoraState()) -> GenerationSettings | None:
        """The preset's settings on a service with ``lora``; None when it is not offered there."""
        if not lora.loaded:
            return self.settings
        if self.lora_settings is not None:
            return dataclasses.replace(self.lora_settings, steps=lora.steps)
        return self.settings if lora.mode == "switchable" else None

    def describe(self, lora: LoraState = LoraState()) -> str:
        uses = lora.loaded and self.lora_settings is not None
        return self.lora_description if uses else self.description

    def apply(
        self, overrides: dict[str, Any] | None = None, lora: LoraState = LoraState()
    ) -> GenerationSettings:
        base = self.settings_for(lora)
        if base is None:
            raise _invalid(
                "preset",
                f"{self.name!r} runs without a LoRA, but this service merged one into its weights",
                ", ".join(offered_presets(lora)),
            )
        settings = GenerationSettings.from_dict({**base.to_dict(), **(overrides or {})})
        check_lora_setting(settings, lora)
        return settings


def offered_presets(lora: LoraState = LoraState()) -> dict[str, GenerationSettings]:
    """Preset name -> settings for the presets this service can run."""
    out = {}
    for name, preset in PRESETS.items():
        settings = preset.settings_for(lora)
        if settings is not None:
            out[name] = settings
    return out


def preset_catalog(lora: LoraState = LoraState()) -> dict[str, dict[str, Any]]:
    """What /api/info says per preset: offered here, whether it runs with the LoRA, its description and
    its settings on this service (the no-LoRA settings when it is not offered)."""
    out: dict[str, dict[str, Any]] = {}
    for name, preset in PRESETS.items():
        settings = preset.settings_for(lora)
        shown = settings if settings is not None else preset.settings
        out[name] = {
            "offered": settings is not None,
            "uses_lora": bool(shown.lora),
            "has_lora_variant": preset.lora_settings is not None,
            "description": preset.describe(lora),
            **shown.to_dict(),
        }
    return out


PRESETS: dict[str, Preset] = {
    "fast": Preset(
        "fast",
        "16 steps, audio guidance only (text guidance 1 = 2 model passes per step): about 3.75x "
        "cheaper than quality; lip sync holds, prompt adherence and detail drop.",
        GenerationSettings(steps=16, text_guidance=1.0, audio_guidance=4.0),
        lora_settings=GenerationSettings(
            steps=4, text_guidance=1.0, audio_guidance=2.0, shift=2.0, lora=True
        ),
        lora_description=(
            "Step-distilled with the service's LoRA, as upstream's README runs FusionX / lightx2v: 4 steps "
            "(8 with FusionX), text guidance 1, audio guidance 2, shift 2 = 8 (16) model passes per clip "
            "instead of 120."
        ),
    ),
    "balanced": Preset(
        "balanced",
        "30 steps with full text + audio guidance (3 passes per step): close to upstream quality "
        "for 75% of its cost.",
        GenerationSettings(steps=30, text_guidance=5.0, audio_guidance=4.0),
    ),
    "quality": Preset(
        "quality",
        "Upstream defaults: 40 steps, text guidance 5, audio guidance 4, 480p. Set resolution 720 "
        "for sharper output at roughly 3x the time per step (480p weights are trained for 480p).",
        GenerationSettings(steps=40, text_guidance=5.0, audio_guidance=4.0),
    ),
}
