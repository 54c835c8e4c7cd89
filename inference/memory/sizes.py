"""Parameter counts and shapes of every model the service puts on a GPU, for the memory plan.

The DiT is counted from its own module tree built on the meta device (no memory, a fraction of a second);
T5 and CLIP from the closed-form size of the library models the loaders build (umT5 encoder,
``CLIPVisionModel`` with the penultimate block last); the VAE and wav2vec2 from their library classes built
on the meta device. ``ModelSizes.preset`` gives the released 14B set or the tiny set the tests and the demo
use; ``ModelSizes.custom`` any other (the benchmark's small configurations).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from inference.model.config import DiTConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DitSizes:
    """The DiT split the way FSDP2 and block streaming split it: ``num_blocks`` equal blocks and the root
    (embeddings, adapters, head). ``*_linear`` / ``*_rows``: weights of the linears ``--quant`` quantises
    and their output rows (one scale each)."""

    config: DiTConfig
    params: int
    block_params: int
    root_params: int
    block_linear: int
    block_rows: int
    root_linear: int
    root_rows: int
    root_linears: int  # quantised linears in the root (two scalar scales each)
    block_linears: int

    @classmethod
    def of(cls, config: DiTConfig) -> DitSizes:
        from inference.model.dit import build_model

        model = build_model(config, "meta")
        quantised = _quantisable(model)
        block = model.blocks[0]
        counts = {"block": [0, 0, 0, 0], "root": [0, 0, 0, 0]}  # params, linear weights, rows, linears
        for name, module in model.named_modules():
            part = "block" if name.startswith("blocks.0.") or name == "blocks.0" else None
            if part is None and not name.startswith("blocks."):
                part = "root"
            if part is None:
                continue
            c = counts[part]
            for pname, p in module.named_parameters(recurse=False):
                c[0] += p.numel()
                if name in quantised and pname == "weight":
                    c[1] += p.numel()
                    c[2] += p.shape[0]
            c[3] += int(name in quantised)
        block_params = sum(p.numel() for p in block.parameters())
        if block_params != counts["block"][0]:
            raise RuntimeError("block parameter count mismatch")
        return cls(
            config=config,
            params=sum(p.numel() for p in model.parameters()),
            block_params=block_params,
            root_params=counts["root"][0],
            block_linear=counts["block"][1],
            block_rows=counts["block"][2],
            root_linear=counts["root"][1],
            root_rows=counts["root"][2],
            root_linears=counts["root"][3],
            block_linears=counts["block"][3],
        )

    @property
    def num_blocks(self) -> int:
        return self.config.num_layers

    def block_bytes(self, weight_bytes: int, quant: str | None = None) -> int:
        """Bytes of one block's weights: ``weight_bytes`` per element, or 1 per quantised linear weight plus a
        ``weight_bytes`` scale per output row (optimum-quanto's layout) with ``quant``."""
        return _part_bytes(self.block_params, self.block_linear, self.block_rows, self.block_linears,
                           weight_bytes, quant)  # fmt: skip

    def root_bytes(self, weight_bytes: int, quant: str | None = None) -> int:
        return _part_bytes(self.root_params, self.root_linear, self.root_rows, self.root_linears,
                           weight_bytes, quant)  # fmt: skip

    def total_bytes(self, weight_bytes: int, quant: str | None = None) -> int:
        return self.root_bytes(weight_bytes, quant) + self.num_blocks * self.block_bytes(weight_bytes, quant)


def _part_bytes(
    params: int, linear: int, rows: int, linears: int, weight_bytes: int, quant: str | None
) -> int:
    if quant is None:
        return params * weight_bytes
    return (params - linear) * weight_bytes + linear + rows * weight_bytes + 2 * linears * weight_bytes


def _quantisable(model: nn.Module) -> set[str]:
    """Names of the linears ``--quant`` quantises: every ``nn.Linear`` but the fp32 islands (the time
    embedding, time projection and output head, which the DiT computes in fp32)."""
    fp32 = {"time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"}
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in fp32}


@dataclass(frozen=True)
class T5Sizes:
    """umT5 encoder: token embedding (FSDP2's root unit) + ``num_layers`` equal blocks."""

    vocab: int
    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    d_kv: int
    num_buckets: int = 32

    @property
    def embed_params(self) -> int:
        return self.vocab * self.d_model

    @property
    def block_params(self) -> int:
        inner = self.num_heads * self.d_kv
        return (
            2 * self.d_model
            + 4 * self.d_model * inner
            + self.num_buckets * self.num_heads
            + 3 * self.d_model * self.d_ff
        )

    @property
    def root_params(self) -> int:
        return self.embed_params + self.d_model  # the token embedding and the final norm

    @property
    def params(self) -> int:
        return self.root_params + self.num_layers * self.block_params


@dataclass(frozen=True)
class ClipSizes:
    """CLIP vision tower as loaded (the penultimate block last): ``layers`` blocks of ``width``."""

    width: int
    mlp: int
    layers: int
    heads: int
    image_size: int = 224
    patch: int = 14

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1

    @property
    def params(self) -> int:
        w, m = self.width, self.mlp
        embed = w + 3 * self.patch**2 * w + self.tokens * w
        block = 4 * w + 4 * (w * w + w) + (w * m + m) + (m * w + w)
        return embed + 2 * w + self.layers * block + 2 * w


@dataclass(frozen=True)
class VaeSizes:
    """The Wan2.1 VAE (``AutoencoderKLWan`` keyword arguments) and its parameter count."""

    config: dict[str, Any] = field(hash=False)
    params: int = 0

    @classmethod
    def of(cls, config: dict[str, Any]) -> VaeSizes:
        from diffusers import AutoencoderKLWan  # heavy; counted once per plan

        with torch.device("meta"):
            model = AutoencoderKLWan(**config)
        return cls(dict(config), sum(p.numel() for p in model.parameters()))


@dataclass(frozen=True)
class AudioSizes:
    """wav2vec2: parameter count and width (it runs on one 16 kHz track at a time)."""

    params: int
    hidden: int
    layers: int

    @classmethod
    def of(cls, config: Any) -> AudioSizes:
        from transformers import Wav2Vec2Model  # heavy; counted once per plan

        with torch.device("meta"):
            model = Wav2Vec2Model(config)
        return cls(sum(p.numel() for p in model.parameters()), int(config.hidden_size),
                   int(config.num_hidden_layers))  # fmt: skip


@dataclass(frozen=True)
class ModelSizes:
    """Everything the plan needs to know about the models, independent of the layout."""

    name: str
    dit: DitSizes
    t5: T5Sizes
    clip: ClipSizes
    vae: VaeSizes
    audio: AudioSizes

    @classmethod
    def preset(cls, name: str) -> ModelSizes:
        """``"multitalk-14b"`` (Wan2.1-I2V-14B + MultiTalk, umT5-XXL, CLIP ViT-H/14, Wan2.1 VAE,
        chinese-wav2vec2-base) or ``"tiny"`` (what ``make-tiny`` writes)."""
        if name == "multitalk-14b":
            from transformers import Wav2Vec2Config

            from inference.encoders.vae import wan21_vae_config

            return cls.custom(
                name,
                DiTConfig.multitalk_14b(),
                T5Sizes(vocab=256384, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64),
                ClipSizes(width=1280, mlp=5120, layers=31, heads=16),
                wan21_vae_config(),
                Wav2Vec2Config(),  # chinese-wav2vec2-base: hidden 768, 12 layers
            )
        if name == "tiny":
            from inference.checkpoint.weights import tiny_dit_config
            from inference.encoders import tiny

            return cls.custom(
                name,
                tiny_dit_config(),
                T5Sizes(
                    vocab=tiny.TINY_T5_VOCAB,
                    d_model=tiny.TINY_T5_DIM,
                    d_ff=tiny.TINY_T5_FF,
                    num_layers=tiny.TINY_T5_LAYERS,
                    num_heads=tiny.TINY_T5_HEADS,
                    d_kv=tiny.TINY_T5_DIM // tiny.TINY_T5_HEADS,
                ),  # fmt: skip
                ClipSizes(
                    width=tiny.TINY_CLIP_DIM,
                    mlp=tiny.TINY_CLIP_MLP,
                    layers=tiny.TINY_CLIP_STORED_BLOCKS - 1,
                    heads=16,
                ),  # fmt: skip
                tiny.tiny_vae_config(),
                tiny.tiny_wav2vec2_config(),
            )
        from inference.model.config import ConfigError

        raise ConfigError("preset", f"unknown preset {name!r}; choose multitalk-14b or tiny")

    @classmethod
    def custom(
        cls,
        name: str,
        dit: DiTConfig,
        t5: T5Sizes,
        clip: ClipSizes,
        vae_config: dict[str, Any],
        audio_config: Any,
    ) -> ModelSizes:
        return cls(name, DitSizes.of(dit), t5, clip, VaeSizes.of(vae_config), AudioSizes.of(audio_config))
