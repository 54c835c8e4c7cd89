"""Model configuration for the MultiTalk DiT (Wan2.1-I2V-14B + audio cross-attention).

Field names mirror the official Wan ``config.json`` (``dim``, ``ffn_dim``, ``num_heads`` ...)
and upstream MultiTalk's ``WanModel`` audio keyword arguments (``audio_window``,
``intermediate_dim``, ``output_dim``, ``context_tokens``, ``vae_scale``, ...), so a
config read from a weights folder needs no renaming. Fields that upstream hard-codes
(CLIP width 1280, wav2vec2 12 layers x 768, L-RoPE class range 24 / interval 4) are
explicit here so the tiny preset can shrink them.

Sampling settings (steps, shift, guidance) live elsewhere; this file describes the
network only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import InputError

logger = logging.getLogger(__name__)


class ConfigError(InputError):
    """A model configuration value is invalid or unsupported; ``field`` names it."""


@dataclass(frozen=True)
class DiTConfig:
    """Shape and constants of the MultiTalk DiT. Defaults are the 14B MultiTalk values.

    Wan ``config.json`` fields:
        model_type: only ``"i2v"`` (MultiTalk is built on the I2V model).
        patch_size: (t, h, w) patch of the Conv3d patch embedding.
        text_len: T5 tokens after padding (the context is zero-padded to this length).
        in_dim: input channels: 16 noisy latent + 4 mask + 16 conditioning latent.
        dim, ffn_dim, freq_dim: model width, FFN width, timestep sinusoid width.
        text_dim: T5 width. out_dim: latent channels predicted.
        num_heads, num_layers: attention heads (head_dim = dim / num_heads), blocks.
        window_size: only (-1, -1) (global attention) is supported.
        qk_norm: RMSNorm over the full dim on q and k. cross_attn_norm: affine LayerNorm before
            text/image cross-attention. eps: norm epsilon.

    MultiTalk audio fields (upstream ``WanModel`` keyword names):
        audio_window: wav2vec2 frames per video frame (offsets -2..+2).
        intermediate_dim, output_dim, context_tokens: adapter hidden width, audio token width,
            audio tokens per latent frame per person.
        vae_scale: VAE temporal stride (video frames per latent frame after the first).
        norm_input_visual: affine LayerNorm ``norm_x`` before the audio cross-attention.
        norm_output_audio: LayerNorm at the end of the adapter.

    Upstream hard-coded values made explicit:
        clip_dim: CLIP vision width (1280 for open-clip ViT-H/14).
        audio_layers, audio_dim: wav2vec2 hidden states stacked per frame (12 x 768).
        class_range, class_interval: L-RoPE ranges: person 1 [0, 4], person 2 [20, 24],
            background 12, audio keys at 2 and 22.
    """

    model_type: str = "i2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 36
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # MultiTalk audio
    audio_window: int = 5
    intermediate_dim: int = 512
    output_dim: int = 768
    context_tokens: int = 32
    vae_scale: int = 4
    norm_input_visual: bool = True
    norm_output_audio: bool = True
    # upstream constants
    clip_dim: int = 1280
    audio_layers: int = 12
    audio_dim: int = 768
    class_range: int = 24
    class_interval: int = 4

    def __post_init__(self) -> None:
        # Normalise JSON lists to tuples so equality and hashing behave.
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "window_size", tuple(int(w) for w in self.window_size))
        if self.model_type != "i2v":
            raise ConfigError("model_type", f"MultiTalk needs the 'i2v' model, got {self.model_type!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError("patch_size", f"expected three positive ints, got {self.patch_size}")
        if self.window_size != (-1, -1):
            raise ConfigError(
                "window_size", f"only global attention (-1, -1) is supported, got {self.window_size}"
            )
        for name in (
            "text_len",
            "in_dim",
            "dim",
            "ffn_dim",
            "freq_dim",
            "text_dim",
            "out_dim",
            "num_heads",
            "num_layers",
            "intermediate_dim",
            "output_dim",
            "context_tokens",
            "vae_scale",
            "clip_dim",
            "audio_layers",
            "audio_dim",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(name, f"must be a positive integer, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ConfigError("num_heads", f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError("num_heads", f"head_dim {self.head_dim} must be even and >= 6 for 3-D RoPE")
        if self.freq_dim % 2:
            raise ConfigError("freq_dim", f"must be even, got {self.freq_dim}")
        if self.audio_window < 1 or self.audio_window % 2 == 0:
            raise ConfigError("audio_window", f"must be a positive odd number, got {self.audio_window}")
        if self.vae_scale < 2:
            raise ConfigError("vae_scale", f"the 3/1/1/3 packing needs vae_scale >= 2, got {self.vae_scale}")
        if not 0 < self.class_interval <= self.class_range // 2:
            raise ConfigError(
                "class_interval",
                f"must be in (0, class_range/2], got {self.class_interval} / {self.class_range}",
            )

    # ---- derived sizes -------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Real widths of the (t, h, w) RoPE sections of one head: 44/42/42 at head_dim 128."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    @property
    def audio_window_vf(self) -> int:
        """Packed audio entries per later latent frame: 3 + 1 + 1 + 3 = 8 upstream."""
        return self.audio_window + self.vae_scale - 1

    @property
    def audio_input_dim(self) -> int:
        """Adapter input for the first latent frame: 5*12*768 = 46080 upstream."""
        return self.audio_window * self.audio_layers * self.audio_dim

    @property
    def audio_input_dim_vf(self) -> int:
        """Adapter input for each later latent frame: 8*12*768 = 73728 upstream."""
        return self.audio_window_vf * self.audio_layers * self.audio_dim

    # ---- presets and IO ------------------------------------------------------------

    @classmethod
    def multitalk_14b(cls) -> DiTConfig:
        """Wan2.1-I2V-14B + MultiTalk: dim 5120, ffn 13824, 40 heads of 128, 40 layers (~18.9 B params)."""
        return cls(dim=5120, ffn_dim=13824, freq_dim=256, num_heads=40, num_layers=40)

    @classmethod
    def tiny(cls) -> DiTConfig:
        """A MultiTalk-shaped model small enough for CPU tests and the demo preset.

        dim 64, ffn 128, freq 32, 4 heads of head_dim 16 (RoPE sections 8/4/4), 2 layers;
        text_len 16 x text_dim 32; clip_dim 32; wav2vec2 2 layers x 32 wide (adapter inputs
        5*2*32 = 320 and 8*2*32 = 512); adapter hidden 32, 4 audio tokens x 16 wide per
        person per latent frame. in_dim 36 / out_dim 16 and patch (1, 2, 2) are unchanged so
        the tiny model takes the same latent layout as the real one.
        """
        return cls(
            text_len=16,
            dim=64,
            ffn_dim=128,
            freq_dim=32,
            text_dim=32,
            num_heads=4,
            num_layers=2,
            intermediate_dim=32,
            output_dim=16,
            context_tokens=4,
            clip_dim=32,
            audio_layers=2,
            audio_dim=32,
        )

    @classmethod
    def preset(cls, name: str) -> DiTConfig:
        """``"multitalk-14b"`` or ``"tiny"``."""
        presets = {"multitalk-14b": cls.multitalk_14b, "tiny": cls.tiny}
        if name not in presets:
            raise ConfigError("preset", f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DiTConfig:
        """Build from a dict such as an official ``config.json``; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in names)
        if unknown:
            logger.debug("ignoring config keys not used by DiTConfig: %s", unknown)
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> DiTConfig:
        """Read an official Wan/MultiTalk ``config.json``. Missing keys take the 14B defaults."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("config", f"{path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ConfigError("config", f"{path} is not valid JSON: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError("config", f"{path} must hold a JSON object, got {type(values).__name__}")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the official layout (tuples as lists) plus the audio fields."""
        out: dict[str, Any] = {"_class_name": "WanModel"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
