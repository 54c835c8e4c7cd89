"""CLIP image encoder: transformers CLIPVisionModel from Wan's open-clip ViT-H/14 (penultimate block)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from inference.encoders.common import (
    CLIP_CHECKPOINT,
    CLIP_EPS,
    CLIP_MEAN,
    CLIP_NUM_HEADS,
    CLIP_STD,
    EncoderError,
    StateDict,
    _autocast,
    _block_count,
    _build_loaded,
    _checkpoint_file,
    _ModelHolder,
    _rename,
    _require,
    load_wan_state_dict,
)

logger = logging.getLogger(__name__)


def _clip_layer_table(i: int) -> dict[str, str]:
    """Wan CLIP visual block ``i`` -> CLIPVisionModel layer ``i`` (fused qkv handled apart)."""
    src, dst = f"visual.transformer.{i}.", f"encoder.layers.{i}."
    table = {}
    for p in ("weight", "bias"):
        table[src + f"norm1.{p}"] = dst + f"layer_norm1.{p}"
        table[src + f"attn.proj.{p}"] = dst + f"self_attn.out_proj.{p}"
        table[src + f"norm2.{p}"] = dst + f"layer_norm2.{p}"
        table[src + f"mlp.0.{p}"] = dst + f"mlp.fc1.{p}"
        table[src + f"mlp.2.{p}"] = dst + f"mlp.fc2.{p}"
    return table


_CLIP_TOP_TABLE = {
    "visual.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "visual.pre_norm.weight": "pre_layrnorm.weight",
    "visual.pre_norm.bias": "pre_layrnorm.bias",
    "visual.post_norm.weight": "post_layernorm.weight",
    "visual.post_norm.bias": "post_layernorm.bias",
}


def clip_config_from_wan(
    sd: Mapping[str, torch.Tensor], num_heads: int = CLIP_NUM_HEADS, field: str = "clip_checkpoint"
) -> Any:
    """CLIPVisionConfig for the visual tower of a Wan CLIP state dict, with one layer fewer than stored:
    Wan reads the penultimate block (``use_31_block=True``), so the last block is never run."""
    from transformers import CLIPVisionConfig

    patch = _require(sd, "visual.patch_embedding.weight", field)
    if "visual.patch_embedding.bias" in sd:
        raise EncoderError(field, "patch embedding with bias (a CLIP without pre-norm) is not supported")
    _require(sd, "visual.pre_norm.weight", field)
    dim, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    num_pos = int(_require(sd, "visual.pos_embedding", field).shape[1])
    grid = math.isqrt(num_pos - 1)
    if grid * grid != num_pos - 1:
        raise EncoderError(field, f"{num_pos} position embeddings is not 1 + a square grid")
    stored = _block_count(sd, "visual.transformer.")
    if stored < 2:
        raise EncoderError(field, f"{stored} visual blocks: need at least 2 (the last one is dropped)")
    if dim % num_heads:
        raise EncoderError(field, f"width {dim} is not divisible by {num_heads} heads")
    return CLIPVisionConfig(
        hidden_size=dim,
        intermediate_size=int(_require(sd, "visual.transformer.0.mlp.0.weight", field).shape[0]),
        num_hidden_layers=stored - 1,
        num_attention_heads=num_heads,
        num_channels=3,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",  # Wan's ViT-H uses exact nn.GELU
        layer_norm_eps=CLIP_EPS,
        attention_dropout=0.0,
    )


def clip_wan_to_hf(sd: Mapping[str, torch.Tensor], field: str = "clip_checkpoint") -> StateDict:
    """Visual part of a Wan CLIP state dict -> ``CLIPVisionModel`` state dict for all blocks but the last.

    Skipped on purpose: the text tower (``textual.*``), ``log_scale``, the projection ``visual.head`` and
    the last visual block (never run with ``use_31_block``)."""
    used = _block_count(sd, "visual.transformer.") - 1
    table = dict(_CLIP_TOP_TABLE)
    for i in range(used):
        table.update(_clip_layer_table(i))
    out = _rename(sd, table, field)
    cls = _require(sd, "visual.cls_embedding", field)  # [1, 1, D]
    pos = _require(sd, "visual.pos_embedding", field)  # [1, N, D]
    out["embeddings.class_embedding"] = cls.reshape(cls.shape[-1])
    out["embeddings.position_embedding.weight"] = pos.reshape(pos.shape[-2], pos.shape[-1])
    for i in range(used):
        # Wan splits the fused projection as view(b, s, 3, heads, head_dim): rows are [q; k; v].
        src, dst = f"visual.transformer.{i}.attn.to_qkv.", f"encoder.layers.{i}.self_attn."
        for p in ("weight", "bias"):
            q, k, v = _require(sd, src + p, field).chunk(3, dim=0)
            out[dst + f"q_proj.{p}"], out[dst + f"k_proj.{p}"], out[dst + f"v_proj.{p}"] = q, k, v
    return out


def clip_hf_to_wan(hf_sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Inverse of ``clip_wan_to_hf`` for every layer present in ``hf_sd`` (a full tower: the Wan file
    stores all blocks, the loader then drops the last)."""
    num_layers = _block_count(hf_sd, "encoder.layers.")
    table = dict(_CLIP_TOP_TABLE)
    for i in range(num_layers):
        table.update(_clip_layer_table(i))
    inverse = {dst: src for src, dst in table.items()}
    out = {inverse[k]: v for k, v in hf_sd.items() if k in inverse}
    cls = hf_sd["embeddings.class_embedding"]
    pos = hf_sd["embeddings.position_embedding.weight"]
    out["visual.cls_embedding"] = cls.reshape(1, 1, -1)
    out["visual.pos_embedding"] = pos.reshape(1, *pos.shape)
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.self_attn.", f"visual.transformer.{i}.attn.to_qkv."
        for p in ("weight", "bias"):
            out[dst + p] = torch.cat([hf_sd[src + f"{n}_proj.{p}"] for n in ("q", "k", "v")], dim=0)
    return out


class ClipImageEncoder(_ModelHolder):
    """CLIP ViT-H/14 image features as Wan's ``CLIPModel.visual(..., use_31_block=True)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.image_size = int(model.config.image_size)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // int(self.model.config.patch_size)) ** 2 + 1

    @classmethod
    def from_wan(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float16,
        num_heads: int = CLIP_NUM_HEADS,
    ) -> ClipImageEncoder:
        """Load from a Wan folder or from ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``.
        Upstream runs CLIP in fp16 (``clip_dtype``)."""
        from transformers import CLIPVisionModel

        ckpt = _checkpoint_file(path, CLIP_CHECKPOINT)
        sd = load_wan_state_dict(ckpt, "clip_checkpoint")
        config = clip_config_from_wan(sd, num_heads)
        model = _build_loaded(
            lambda: CLIPVisionModel(config), clip_wan_to_hf(sd), "clip_checkpoint", device, dtype
        )
        logger.info(
            "CLIP visual loaded from %s: %d of %d blocks, width %d, %s on %s",
            ckpt,
            config.num_hidden_layers,
            config.num_hidden_layers + 1,
            config.hidden_size,
            dtype,
            device,
        )
        return cls(model)

    def to(self, device: str | torch.device) -> ClipImageEncoder:
        self.model.to(device)
        return self

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """image: [3, H, W] in [-1, 1] -> pixel values [1, 3, S, S] (float32, CLIP-normalised), as
        upstream: bicubic resize (no antialias, no clamp) to S x S, map to [0, 1], CLIP mean/std."""
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise EncoderError("image", f"expected a tensor [3, H, W] in [-1, 1], got {shape}")
        if not image.is_floating_point():
            raise EncoderError("image", f"expected a floating-point tensor in [-1, 1], got {image.dtype}")
        x = image.to(self.device, torch.float32)[None]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = x.mul(0.5).add(0.5)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image: [3, H, W] in [-1, 1] -> [1, 257, dim] hidden states after the penultimate block (no
        post-norm), in the model dtype."""
        pixels = self.preprocess(image).to(self.dtype)
        with _autocast(self.device, self.dtype):
            out = self.model(pixel_values=pixels).last_hidden_state
        return out.to(self.dtype)


# ----------------------------------------------------------------------------------------------------
# VAE (Wan2.1 causal 3-D VAE)
# ----------------------------------------------------------------------------------------------------
