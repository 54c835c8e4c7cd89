"""Wan VAE: diffusers AutoencoderKLWan from Wan2.1_VAE.pth, latent normalisation and the I2V conditioning ``y``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from inference.encoders.common import (
    VAE_CHECKPOINT,
    VAE_LATENT_MEAN,
    VAE_LATENT_STD,
    VAE_STRIDE,
    VAE_Z_DIM,
    EncoderError,
    StateDict,
    _block_count,
    _build_loaded,
    _checkpoint_file,
    _ModelHolder,
    _rename,
    _require,
    load_wan_state_dict,
)

logger = logging.getLogger(__name__)

_RESIDUAL_RENAME = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_ATTENTION_PARAMS = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
_RESAMPLE_PARAMS = ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")


def _vae_encoder_kinds(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Kind of each ``encoder.downsamples.i``: 'res', 'down2d', 'down3d' or 'attn'."""
    kinds = []
    for i in range(_block_count(sd, "encoder.downsamples.")):
        rest = {k.split(".", 3)[3] for k in sd if k.startswith(f"encoder.downsamples.{i}.")}
        if "to_qkv.weight" in rest:
            kinds.append("attn")
        elif "time_conv.weight" in rest:
            kinds.append("down3d")
        elif "resample.1.weight" in rest:
            kinds.append("down2d")
        else:
            kinds.append("res")
    return kinds


def vae_config_from_wan(sd: Mapping[str, torch.Tensor], field: str = "vae_checkpoint") -> dict[str, Any]:
    """``AutoencoderKLWan`` keyword arguments read from a Wan2.1 VAE state dict: base width, per-level
    widths, residual blocks per level and which levels downsample in time."""
    base_dim = int(_require(sd, "encoder.conv1.weight", field).shape[0])
    z_dim = int(_require(sd, "conv2.weight", field).shape[0])
    if z_dim != VAE_Z_DIM:
        raise EncoderError(field, f"z_dim {z_dim}: only the 16-channel Wan2.1 VAE is supported")
    kinds = _vae_encoder_kinds(sd)
    if "attn" in kinds:
        raise EncoderError(field, "attention inside the down blocks (attn_scales) is not supported")
    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    for i, kind in enumerate(kinds):
        if kind == "res":
            levels[-1].append(i)
        else:
            temporal.append(kind == "down3d")
            levels.append([])
    num_res_blocks = len(levels[0])
    if num_res_blocks == 0 or any(len(level) != num_res_blocks for level in levels):
        raise EncoderError(field, f"uneven residual blocks per level: {[len(lv) for lv in levels]}")
    if len(levels) != 4 or sum(temporal) != 2:
        raise EncoderError(
            field, f"{len(levels)} levels / {sum(temporal)} temporal downsamples: Wan2.1 has 4 and 2"
        )
    widths = [int(sd[f"encoder.downsamples.{lv[-1]}.residual.6.weight"].shape[0]) for lv in levels]
    if any(w % base_dim for w in widths):
        raise EncoderError(field, f"level widths {widths} are not multiples of the base width {base_dim}")
    return {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": [w // base_dim for w in widths],
        "num_res_blocks": num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": temporal,
        "latents_mean": list(VAE_LATENT_MEAN),
        "latents_std": list(VAE_LATENT_STD),
    }


def _vae_key_table(config: Mapping[str, Any]) -> dict[str, str]:
    """Wan2.1 VAE key -> diffusers ``AutoencoderKLWan`` key, for the architecture in ``config``.

    Wan keeps the encoder's and decoder's blocks in flat ``Sequential``s; diffusers keeps the encoder flat
    (``down_blocks.i`` == ``downsamples.i``) but groups the decoder into ``up_blocks[level]`` with
    ``num_res_blocks + 1`` resnets and one upsampler (all but the last level)."""
    nrb = int(config["num_res_blocks"])
    levels = len(config["dim_mult"])
    dims = [config["base_dim"] * m for m in [1, *config["dim_mult"]]]
    table: dict[str, str] = {
        "conv1.weight": "quant_conv.weight",
        "conv1.bias": "quant_conv.bias",
        "conv2.weight": "post_quant_conv.weight",
        "conv2.bias": "post_quant_conv.bias",
    }

    def residual(src: str, dst: str, shortcut: bool) -> None:
        for a, b in _RESIDUAL_RENAME.items():
            if shortcut or not a.startswith("shortcut"):
                table[src + a] = dst + b

    for part in ("encoder", "decoder"):
        for p in ("weight", "bias"):
            table[f"{part}.conv1.{p}"] = f"{part}.conv_in.{p}"
            table[f"{part}.head.2.{p}"] = f"{part}.conv_out.{p}"
        table[f"{part}.head.0.gamma"] = f"{part}.norm_out.gamma"
        residual(f"{part}.middle.0.", f"{part}.mid_block.resnets.0.", False)
        for p in _ATTENTION_PARAMS:
            table[f"{part}.middle.1.{p}"] = f"{part}.mid_block.attentions.0.{p}"
        residual(f"{part}.middle.2.", f"{part}.mid_block.resnets.1.", False)

    # Encoder: per level, nrb residual blocks (the first may change width) then a downsample.
    idx = 0
    for level in range(levels):
        for r in range(nrb):
            name = f"encoder.downsamples.{idx}."
            residual(name, f"encoder.down_blocks.{idx}.", r == 0 and dims[level] != dims[level + 1])
            idx += 1
        if level != levels - 1:
            temporal = config["temperal_downsample"][level]
            for p in _RESAMPLE_PARAMS if temporal else _RESAMPLE_PARAMS[:2]:
                table[f"encoder.downsamples.{idx}.{p}"] = f"encoder.down_blocks.{idx}.{p}"
            idx += 1

    # Decoder: widths run backwards; after each (2x channel-halving) upsample the next level's first
    # resnet takes half the width, exactly as Wan's Decoder3d (and diffusers) build it.
    ddims = [config["base_dim"] * m for m in [config["dim_mult"][-1], *config["dim_mult"][::-1]]]
    temporal_up = list(config["temperal_downsample"])[::-1]
    idx = 0
    for level in range(levels):
        in_dim = ddims[level] // 2 if level > 0 else ddims[level]
        for r in range(nrb + 1):
            name = f"decoder.upsamples.{idx}."
            residual(name, f"decoder.up_blocks.{level}.resnets.{r}.", r == 0 and in_dim != ddims[level + 1])
            idx += 1
        if level != levels - 1:
            params = _RESAMPLE_PARAMS if temporal_up[level] else _RESAMPLE_PARAMS[:2]
            for p in params:
                table[f"decoder.upsamples.{idx}.{p}"] = f"decoder.up_blocks.{level}.upsamplers.0.{p}"
            idx += 1
    return table


def vae_wan_to_diffusers(
    sd: Mapping[str, torch.Tensor], field: str = "vae_checkpoint"
) -> tuple[StateDict, dict[str, Any]]:
    """Wan2.1 VAE state dict -> (diffusers ``AutoencoderKLWan`` state dict, its constructor kwargs)."""
    config = vae_config_from_wan(sd, field)
    table = _vae_key_table(config)
    extra = [k for k in sd if k not in table]
    if extra:
        raise EncoderError(field, f"unknown keys in the VAE checkpoint, e.g. {extra[:3]}")
    return _rename(sd, table, field), config


def vae_diffusers_to_wan(d_sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """Inverse of ``vae_wan_to_diffusers`` for a model built with ``config``."""
    inverse = {dst: src for src, dst in _vae_key_table(config).items()}
    missing = [k for k in d_sd if k not in inverse]
    if missing:
        raise KeyError(f"diffusers keys without a Wan name: {missing[:3]}")
    return {inverse[k]: v for k, v in d_sd.items()}


def conditioning_mask(num_frames: int, num_cond_frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """The 4-channel mask of the I2V conditioning, built as upstream ``MultiTalkPipeline.generate``:
    a per-frame mask (1 on the first ``num_cond_frames`` pixel frames), frame 0 repeated 4 times so the
    count becomes a multiple of 4, then folded as ``[T_lat, 4]`` and transposed -> ``[4, T_lat, h, w]``.
    With 1 conditioning frame only latent frame 0 is 1; with 25 motion frames latent frames 0..6 are."""
    _check_num_frames(num_frames)
    if not 1 <= num_cond_frames <= num_frames:
        raise EncoderError("motion_frames", f"{num_cond_frames} frames: need 1..{num_frames}")
    per_frame = torch.zeros(num_frames, lat_h, lat_w)
    per_frame[:num_cond_frames] = 1.0
    per_frame = torch.cat([per_frame[:1].repeat(4, 1, 1), per_frame[1:]], dim=0)
    return per_frame.view(-1, 4, lat_h, lat_w).transpose(0, 1).contiguous()


def _check_num_frames(num_frames: int) -> None:
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % VAE_STRIDE[0]:
        raise EncoderError("num_frames", f"{num_frames!r}: must be 4n + 1 (1, 5, ..., 81)")


class WanVae(_ModelHolder):
    """Wan2.1 VAE (diffusers ``AutoencoderKLWan``) with Wan's latent normalisation.

    Encode takes the posterior mean (as Wan), decode clamps to [-1, 1]; both work on one video without a
    batch axis and return float32, like ``wan.modules.vae.WanVAE``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        device = self.device
        self._mean = torch.tensor(VAE_LATENT_MEAN, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        std = torch.tensor(VAE_LATENT_STD, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        self._inv_std = 1.0 / std  # upstream multiplies by 1/std on encode and divides by it on decode

    @classmethod
    def from_wan(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> WanVae:
        """Load from a Wan folder or from ``Wan2.1_VAE.pth``. Upstream runs the VAE in float32."""
        from diffusers import AutoencoderKLWan

        ckpt = _checkpoint_file(path, VAE_CHECKPOINT)
        sd = load_wan_state_dict(ckpt, "vae_checkpoint")
        d_sd, config = vae_wan_to_diffusers(sd)
        model = _build_loaded(lambda: AutoencoderKLWan(**config), d_sd, "vae_checkpoint", device, dtype)
        logger.info("VAE loaded from %s: base width %d, %s on %s", ckpt, config["base_dim"], dtype, device)
        return cls(model)

    def to(self, device: str | torch.device) -> WanVae:
        self.model.to(device)
        self._mean = self._mean.to(device)
        self._inv_std = self._inv_std.to(device)
        return self

    @staticmethod
    def latent_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[16, T_lat, h, w] for a video of ``num_frames`` (4n + 1) frames of ``height`` x ``width``."""
        _check_num_frames(num_frames)
        return (VAE_Z_DIM, (num_frames - 1) // 4 + 1, height // 8, width // 8)

    def _check_video(self, video: torch.Tensor, field: str) -> None:
        if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[0] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise EncoderError(field, f"expected a tensor [3, T, H, W] in [-1, 1], got {shape}")
        if not video.is_floating_point():
            raise EncoderError(field, f"expected floating point values in [-1, 1], got {video.dtype}")
        _, t, h, w = video.shape
        if (t - 1) % 4:
            raise EncoderError(field, f"{t} frames: the VAE needs 4n + 1 frames")
        if h % 8 or w % 8 or h == 0 or w == 0:
            raise EncoderError(field, f"size {h}x{w}: height and width must be positive multiples of 8")

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video: [3, T, H, W] in [-1, 1], T = 4n + 1 -> normalised latent [16, T_lat, H/8, W/8] (float32)."""
        self._check_video(video, "video")
        x = video.to(self.device, self.dtype)[None]
        mu = self.model.encode(x).latent_dist.mode()[0].float()
        return (mu - self._mean) * self._inv_std

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent: normalised [16, T_lat, h, w] -> video [3, 4 (T_lat - 1) + 1, 8h, 8w] in [-1, 1] (float32)."""
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4 or latent.shape[0] != VAE_Z_DIM:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise EncoderError("latent", f"expected a tensor [16, T_lat, h, w], got {shape}")
        z = latent.to(self.device, torch.float32) / self._inv_std + self._mean
        out = self.model.decode(z[None].to(self.dtype)).sample[0]
        return out.float().clamp_(-1.0, 1.0)

    @torch.no_grad()
    def build_y(
        self, ref_image: torch.Tensor | None, num_frames: int, motion_frames: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The I2V conditioning ``y = [mask ; VAE(cond ; zeros)]``: [20, T_lat, H/8, W/8] (float32).

        ref_image: [3, H, W] in [-1, 1], the conditioning frame of the first clip.
        motion_frames: [3, M, H, W] in [-1, 1], the last M decoded frames of the previous clip (streaming).
            When given, the clip is conditioned on them alone, as upstream (``cond_image`` becomes the
            motion frames; the reference image is then not part of ``y`` and may be None).
        The VAE latents of the conditioning frames are ``y[4:, :1 + (M - 1) // 4]`` (upstream's
        ``latent_motion_frames``)."""
        _check_num_frames(num_frames)
        if motion_frames is not None:
            if not isinstance(motion_frames, torch.Tensor) or motion_frames.ndim != 4:
                raise EncoderError("motion_frames", "expected a tensor [3, M, H, W] in [-1, 1]")
            cond = motion_frames
            field = "motion_frames"
        else:
            if not isinstance(ref_image, torch.Tensor) or ref_image.ndim != 3:
                raise EncoderError("ref_image", "expected a tensor [3, H, W] in [-1, 1]")
            cond = ref_image[:, None]
            field = "ref_image"
        c, m, h, w = cond.shape
        if c != 3 or not cond.is_floating_point():
            raise EncoderError(
                field, f"expected 3 floating-point channels, got {tuple(cond.shape)} {cond.dtype}"
            )
        if not 1 <= m <= num_frames:
            raise EncoderError(field, f"{m} conditioning frames for a {num_frames}-frame clip")
        cond = cond.to(self.device, torch.float32)
        video = torch.cat([cond, cond.new_zeros(3, num_frames - m, h, w)], dim=1)
        self._check_video(video, field)
        latent = self.encode(video)
        mask = conditioning_mask(num_frames, m, h // 8, w // 8).to(latent.device)
        return torch.cat([mask, latent], dim=0)
