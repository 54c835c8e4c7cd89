"""Wan VAE: diffusers AutoencoderKLWan from Wan2.1_VAE.pth, latent normalisation, the I2V conditioning ``y``,
tiled encode/decode and their memory.

Time is always processed in the Wan VAE's causal chunks (encode: frame 0, then 4 frames at a time; decode:
one latent frame at a time), a feature cache carrying the causal context between chunks. Tiling
(``VaeTiling``, ``--vae_tiling auto|on|off``) adds a spatial split: overlapping square tiles, each run
through every chunk on its own, blended with linear ramps across the overlaps (weights normalised to sum
to 1) and written straight into one output, so the peak is one tile's activations plus the output instead
of a whole frame's activations. Our own blend rather than diffusers' ``enable_tiling``: that one keeps every
decoded tile of every frame until the end (about 1.8x the output, plus copies) and its in-place sequential
blending weighs the top-left tile twice in four-tile corners.

``vae_decode_bytes`` / ``vae_encode_bytes`` give the peak bytes of the tensors one call allocates, from a dry
run of the same code on the meta device (no data, same allocations), for the memory plan and for ``auto``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
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
from inference.memory.track import LiveTensors

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


VAE_TILING_MODES: tuple[str, ...] = ("auto", "on", "off")
_SPATIAL = VAE_STRIDE[1]


def wan21_vae_config() -> dict[str, Any]:
    """``AutoencoderKLWan`` kwargs of the released Wan2.1 VAE (base width 96, 2 residual blocks per level)."""
    return {
        "base_dim": 96,
        "z_dim": VAE_Z_DIM,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "latents_mean": list(VAE_LATENT_MEAN),
        "latents_std": list(VAE_LATENT_STD),
    }


@dataclass(frozen=True)
class VaeTiling:
    """Spatial tiles in pixels: ``tile`` x ``tile`` squares starting about every ``stride`` pixels (spread
    evenly so the last one ends at the border), neighbours overlapping by at least ``tile - stride`` pixels.
    Both multiples of 8. ``stride == tile`` means no overlap (visible seams: only for comparisons)."""

    tile: int = 256
    stride: int = 192

    def __post_init__(self) -> None:
        if self.tile % _SPATIAL or self.stride % _SPATIAL or not 0 < self.stride <= self.tile:
            raise EncoderError(
                "vae_tiling",
                f"tile {self.tile} / stride {self.stride}: need multiples of 8 with 0 < stride <= tile",
            )


def tile_spans(length: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the tiles covering ``0..length``: ``tile`` long, the fewest whose starts are at
    most ``stride`` apart, spread evenly from 0 to ``length - tile``. One span when ``tile >= length``."""
    if tile >= length:
        return [(0, length)]
    n = math.ceil((length - tile) / stride) + 1
    starts = [round(i * (length - tile) / (n - 1)) for i in range(n)]
    return [(a, a + tile) for a in starts]


def _ramp(spans: list[tuple[int, int]], i: int, scale: int, device: torch.device) -> torch.Tensor:
    """Blend weight along one axis of tile ``i`` (in output units: ``scale`` per span unit): 1 inside, rising
    linearly across the overlap with the previous tile and falling across the overlap with the next, so two
    overlapping tiles' weights sum to 1 there."""
    start, stop = spans[i]
    n = (stop - start) * scale
    pos = torch.arange(n, dtype=torch.float32, device=device)
    w = torch.ones(n, device=device)
    if i > 0:
        overlap = (spans[i - 1][1] - start) * scale
        w = torch.minimum(w, (pos + 1) / (overlap + 1))
    if i + 1 < len(spans):
        overlap = (stop - spans[i + 1][0]) * scale
        w = torch.minimum(w, (n - pos) / (overlap + 1))
    return w


def _config_items(config: Mapping[str, Any]) -> tuple:
    keys = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")
    return tuple((k, tuple(config[k]) if isinstance(config[k], list | tuple) else config[k]) for k in keys)


@functools.lru_cache(maxsize=4)
def _meta_vae(items: tuple, dtype: torch.dtype) -> WanVae:
    from diffusers import AutoencoderKLWan  # heavy; only for the dry run

    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in items}
    with torch.device("meta"):
        model = AutoencoderKLWan(**kwargs, attn_scales=[], latents_mean=list(VAE_LATENT_MEAN),
                                 latents_std=list(VAE_LATENT_STD))  # fmt: skip
    # AutoencoderKLWan is built in float32; diffusers warns about any .to(dtype), so cast only when needed.
    return WanVae((model if dtype == torch.float32 else model.to(dtype)).eval())


@functools.lru_cache(maxsize=256)
def _dry_run(op: str, frames: int, height: int, width: int, tiling: VaeTiling | None, items: tuple,
             dtype: torch.dtype) -> int:  # fmt: skip
    """Peak bytes allocated by one ``op`` ("decode" | "encode") of this size, run on the meta device."""
    vae = _meta_vae(items, dtype)
    _check_num_frames(frames)
    with torch.no_grad():
        if op == "decode":
            given = torch.empty(VAE_Z_DIM, (frames - 1) // 4 + 1, height // 8, width // 8, device="meta")
            with LiveTensors(devices=("meta",)) as peak:
                vae.decode(given, tiling=tiling)
        else:
            given = torch.empty(3, frames, height, width, device="meta")
            with LiveTensors(devices=("meta",)) as peak:
                vae.encode(given, tiling=tiling)
    return peak.peak


def _frame_sized_bytes(op: str, frames: int, height: int, width: int) -> int:
    """Bytes of the float32 tensors a tiled call keeps for the whole frame while it runs a tile: decode the
    un-normalised latent, the output video and the weight sum; encode the output latent and its weight sum."""
    t_lat, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    if op == "decode":
        return 4 * (VAE_Z_DIM * t_lat * h * w + 3 * frames * height * width + height * width)
    return 4 * (VAE_Z_DIM * t_lat * h * w + h * w)


def _planned_bytes(op: str, frames: int, height: int, width: int, tiling: VaeTiling | None,
                   config: Mapping[str, Any] | None, dtype: torch.dtype) -> int:  # fmt: skip
    items = _config_items(config or wan21_vae_config())
    if tiling is None or (tiling.tile >= height and tiling.tile >= width):
        return _dry_run(op, frames, height, width, tiling, items, dtype)
    # Every tile after the first allocates the same as the second one of a frame two tiles wide (all
    # tiles are whole), next to the frame-sized tensors: run that small frame, swap the frame-sized part.
    sh, sw = min(tiling.tile, height), min(tiling.tile, width)
    small = (sh, min(2 * sw, width)) if width > tiling.tile else (min(2 * sh, height), sw)
    peak = _dry_run(op, frames, *small, tiling, items, dtype)
    return peak + _frame_sized_bytes(op, frames, height, width) - _frame_sized_bytes(op, frames, *small)


def vae_decode_bytes(
    num_frames: int,
    height: int,
    width: int,
    tiling: VaeTiling | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Peak bytes of the tensors one ``WanVae.decode`` of a ``num_frames`` x ``height`` x ``width`` clip
    allocates (the float32 output included; the weights and the given latent not), untiled or with
    ``tiling``. ``config``: ``AutoencoderKLWan`` kwargs, default the Wan2.1 VAE; ``dtype``: its weights'
    dtype (upstream and ``Renderer``: float32). Exact for the allocations of this code: a dry run on the
    meta device (about a second for 81 frames, cached; tiled, of a frame two tiles wide plus the
    frame-sized buffers). A GPU adds its allocator's rounding and kernel workspaces."""
    return _planned_bytes("decode", num_frames, height, width, tiling, config, dtype)


def vae_encode_bytes(
    num_frames: int,
    height: int,
    width: int,
    tiling: VaeTiling | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> int:
    """As ``vae_decode_bytes`` for ``WanVae.encode`` of a [3, num_frames, height, width] video (the latent
    output included, the given video not). ``build_y`` encodes a whole clip (conditioning + zeros)."""
    return _planned_bytes("encode", num_frames, height, width, tiling, config, dtype)


def _free_device_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can use on a CUDA device (free, plus what the caching allocator holds unused);
    None elsewhere: host memory is not planned, so ``auto`` does not tile on a CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class WanVae(_ModelHolder):
    """Wan2.1 VAE (diffusers ``AutoencoderKLWan``) with Wan's latent normalisation.

    Encode takes the posterior mean (as Wan), decode clamps to [-1, 1]; both work on one video without a
    batch axis and return float32, like ``wan.modules.vae.WanVAE``.

    ``tiling_mode``: "off" (whole frames), "on" (always ``tiling``'s tiles) or "auto" (tiles when the
    untiled call would need more than the CUDA device has free, per ``vae_decode_bytes``; on a CPU never)."""

    def __init__(
        self, model: torch.nn.Module, tiling_mode: str = "off", tiling: VaeTiling | None = None
    ) -> None:
        self.model = model
        device = self.device
        self._mean = torch.tensor(VAE_LATENT_MEAN, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        std = torch.tensor(VAE_LATENT_STD, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        self._inv_std = 1.0 / std  # upstream multiplies by 1/std on encode and divides by it on decode
        self.tiling_mode = "off"
        self.tiling = VaeTiling()
        self.set_tiling(tiling_mode, tiling)

    @classmethod
    def from_wan(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tiling_mode: str = "off",
        tiling: VaeTiling | None = None,
    ) -> WanVae:
        """Load from a Wan folder or from ``Wan2.1_VAE.pth``. Upstream runs the VAE in float32."""
        from diffusers import AutoencoderKLWan

        ckpt = _checkpoint_file(path, VAE_CHECKPOINT)
        sd = load_wan_state_dict(ckpt, "vae_checkpoint")
        d_sd, config = vae_wan_to_diffusers(sd)
        model = _build_loaded(lambda: AutoencoderKLWan(**config), d_sd, "vae_checkpoint", device, dtype)
        logger.info("VAE loaded from %s: base width %d, %s on %s", ckpt, config["base_dim"], dtype, device)
        return cls(model, tiling_mode, tiling)

    def set_tiling(self, mode: str, tiling: VaeTiling | None = None) -> None:
        """Choose "auto" | "on" | "off" (and optionally the tile size) for later calls."""
        if mode not in VAE_TILING_MODES:
            raise EncoderError("vae_tiling", f"unknown mode {mode!r}; choose one of {list(VAE_TILING_MODES)}")
        self.tiling_mode = mode
        if tiling is not None:
            self.tiling = tiling

    def _tiles(self, op: str, frames: int, height: int, width: int) -> VaeTiling | None:
        """The tiling a call of ``op`` on a clip of this size uses under the current mode."""
        if self.tiling_mode != "auto":
            return self.tiling if self.tiling_mode == "on" else None
        free = _free_device_bytes(self.device)
        if free is None:
            return None
        bytes_of = vae_decode_bytes if op == "decode" else vae_encode_bytes
        need = bytes_of(
            frames, height, width, None, config=dict(_config_items(self.model.config)), dtype=self.dtype
        )
        if need <= free:
            return None
        logger.info("VAE %s of %dx%dx%d: untiled needs %.1f GiB, %.1f GiB free: tiling (%d px tiles)",
                    op, frames, height, width, need / 2**30, free / 2**30, self.tiling.tile)  # fmt: skip
        return self.tiling

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

    _AUTO = object()  # the ``tiling`` argument's default: follow ``tiling_mode``

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tiling: VaeTiling | None | object = _AUTO) -> torch.Tensor:
        """video: [3, T, H, W] in [-1, 1], T = 4n + 1 -> normalised latent [16, T_lat, H/8, W/8] (float32).

        tiling: a ``VaeTiling`` or None (whole frames) for this call; by default ``tiling_mode`` decides."""
        self._check_video(video, "video")
        _, t, h, w = video.shape
        if tiling is WanVae._AUTO:
            tiling = self._tiles("encode", t, h, w)
        if tiling is None:
            mu = self.model.encode(video.to(self.device, self.dtype)[None]).latent_dist.mode()[0].float()
        else:
            mu = self._encode_tiled(video, tiling)  # type: ignore[arg-type]
        return (mu - self._mean) * self._inv_std

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, tiling: VaeTiling | None | object = _AUTO) -> torch.Tensor:
        """latent: normalised [16, T_lat, h, w] -> video [3, 4 (T_lat - 1) + 1, 8h, 8w] in [-1, 1] (float32).

        tiling: as in ``encode``."""
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4 or latent.shape[0] != VAE_Z_DIM:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise EncoderError("latent", f"expected a tensor [16, T_lat, h, w], got {shape}")
        _, t_lat, h, w = latent.shape
        if tiling is WanVae._AUTO:
            tiling = self._tiles("decode", 4 * (t_lat - 1) + 1, h * _SPATIAL, w * _SPATIAL)
        z = latent.to(self.device, torch.float32) / self._inv_std + self._mean
        if tiling is not None:
            return self._decode_tiled(z, tiling)  # type: ignore[arg-type]
        out = self.model.decode(z[None].to(self.dtype)).sample[0]
        return out.float().clamp_(-1.0, 1.0)

    def _decode_tiled(self, z: torch.Tensor, tiling: VaeTiling) -> torch.Tensor:
        """z: un-normalised latent [16, T_lat, h, w] -> [3, T, 8h, 8w] in [-1, 1], tile by tile (each through
        all causal chunks), blended into one output."""
        _, _, h, w = z.shape
        rows = tile_spans(h, tiling.tile // _SPATIAL, tiling.stride // _SPATIAL)
        cols = tile_spans(w, tiling.tile // _SPATIAL, tiling.stride // _SPATIAL)
        out: torch.Tensor | None = None
        weight_sum = torch.zeros(h * _SPATIAL, w * _SPATIAL, device=z.device)
        for i, (r0, r1) in enumerate(rows):
            wy = _ramp(rows, i, _SPATIAL, z.device)
            for j, (c0, c1) in enumerate(cols):
                part = self.model.decode(z[None, :, :, r0:r1, c0:c1].to(self.dtype)).sample[
                    0
                ]  # [3, T, th, tw]
                if out is None:
                    out = torch.zeros(3, part.shape[1], h * _SPATIAL, w * _SPATIAL, device=z.device)
                weight = wy[:, None] * _ramp(cols, j, _SPATIAL, z.device)[None, :]
                region = (
                    slice(None),
                    slice(None),
                    slice(r0 * _SPATIAL, r1 * _SPATIAL),
                    slice(c0 * _SPATIAL, c1 * _SPATIAL),
                )
                out[region].addcmul_(part.float(), weight)
                weight_sum[region[2:]] += weight
                del part
        assert out is not None
        return out.div_(weight_sum).clamp_(-1.0, 1.0)

    def _encode_tiled(self, video: torch.Tensor, tiling: VaeTiling) -> torch.Tensor:
        """video [3, T, H, W] -> posterior mean [16, T_lat, H/8, W/8] (float32), tile by tile, blended in latent
        space (tiles start on the 8-pixel latent grid)."""
        _, _, height, width = video.shape
        h, w = height // _SPATIAL, width // _SPATIAL
        rows = tile_spans(h, tiling.tile // _SPATIAL, tiling.stride // _SPATIAL)
        cols = tile_spans(w, tiling.tile // _SPATIAL, tiling.stride // _SPATIAL)
        out: torch.Tensor | None = None
        weight_sum = torch.zeros(h, w, device=self.device)
        for i, (r0, r1) in enumerate(rows):
            wy = _ramp(rows, i, 1, self.device)
            for j, (c0, c1) in enumerate(cols):
                x = video[None, :, :, r0 * _SPATIAL : r1 * _SPATIAL, c0 * _SPATIAL : c1 * _SPATIAL]
                mu = self.model.encode(x.to(self.device, self.dtype)).latent_dist.mode()[
                    0
                ]  # [16, T_lat, th, tw]
                if out is None:
                    out = torch.zeros(mu.shape[0], mu.shape[1], h, w, device=self.device)
                weight = wy[:, None] * _ramp(cols, j, 1, self.device)[None, :]
                out[:, :, r0:r1, c0:c1].addcmul_(mu.float(), weight)
                weight_sum[r0:r1, c0:c1] += weight
                del mu
        assert out is not None
        return out.div_(weight_sum)

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
