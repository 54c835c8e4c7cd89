"""The DiT's position and conditioning helpers: timestep embedding, 3-D/1-D RoPE tables, audio windows
and MultiTalk's L-RoPE speaker routing.

Pure tensor math with no parallel knowledge; ``routing_head_fn`` returns the per-head statistic the
``sp`` seam sums over heads. Facts come from Wan2.1 and MultiTalk; the code is our own.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import InputError
from inference.model.attention import attention
from inference.model.sp import HeadFn, SequenceParallelism

ROPE_THETA = 10000.0
# Upstream's min-max normalisation epsilon in ``normalize_and_scale``.
ROUTING_EPS = 1e-8


class ModelInputError(InputError):
    """A forward input has the wrong shape or an unsupported value; ``field`` names the argument."""


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Timestep sinusoid as Wan: [cos | sin] of t * 10000^(-i/half), computed in float64.

    Args:
        dim: even embedding width. position: [B] timesteps in [0, 1000].

    Returns:
        [B, dim] float32.
    """
    half = dim // 2
    position = position.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=position.device).div(half))
    sinusoid = torch.outer(position, freqs)
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1).float()


def _axis_angles(positions: int, width: int, device: torch.device | None) -> torch.Tensor:
    """RoPE angles for one axis of real width ``width``: [positions, width/2] float64."""
    inv = 1.0 / torch.pow(
        ROPE_THETA, torch.arange(0, width, 2, dtype=torch.float64, device=device).div(width)
    )
    return torch.outer(torch.arange(positions, dtype=torch.float64, device=device), inv)


def rope_3d_tables(
    head_dim: int, grid: tuple[int, int, int], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of Wan's 3-D RoPE for a (f, h, w) token grid, frame-major token order.

    The head's D/2 complex pairs split into (t, h, w) sections of
    (D - 4*(D//6))/2, D//6, D//6 pairs (22/21/21 at D = 128), each with its own frequency
    ladder theta^(-2i/width) as in Wan's ``rope_params``.

    Returns:
        cos, sin: [f*h*w, D/2] float32.
    """
    f, h, w = grid
    d = head_dim
    widths = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    at = _axis_angles(f, widths[0], device)
    ah = _axis_angles(h, widths[1], device)
    aw = _axis_angles(w, widths[2], device)
    angles = torch.cat(
        [
            at[:, None, None, :].expand(f, h, w, -1),
            ah[None, :, None, :].expand(f, h, w, -1),
            aw[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, d // 2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the given angles (complex multiply), in fp32.

    Args:
        x: [..., S, H, D]. cos, sin: [S, D/2] or [B, S, D/2] (broadcast over heads).

    Returns:
        x's shape and dtype.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


def rope_1d_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of MultiTalk's 1-D L-RoPE (base 10000, interleaved pairs) at float positions.

    Args:
        positions: [...] float positions. Returns: cos, sin: [..., D/2] float32.
    """
    inv = 1.0 / (
        ROPE_THETA ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.float()[..., None] * inv
    return torch.cos(angles), torch.sin(angles)


def _linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in fp32 whatever the weight dtype (upstream's fp32 autocast islands)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def pack_audio_windows(audio: torch.Tensor, vae_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-video-frame audio windows into the first latent frame and packed later frames.

    Frame 0 keeps its whole window. Frames 1.. form groups of ``vae_scale`` (one latent frame
    each); per group the first frame keeps window[:mid+1], the middle frames their centre
    entry, the last frame window[mid:]. With window 5 and vae_scale 4 that is 3+1+1+3 = 8
    entries: [a0 a1 a2 b2 c2 d2 d3 d4].

    Args:
        audio: [..., T_frames, W, L, C] with T_frames = 1 + vae_scale * (T_lat - 1).

    Returns:
        first: [..., 1, W, L, C]; later: [..., T_lat - 1, W + vae_scale - 1, L, C].
    """
    t_frames, window = audio.shape[-4], audio.shape[-3]
    if (t_frames - 1) % vae_scale:
        raise ModelInputError(
            "audio", f"{t_frames} video frames is not 1 + {vae_scale}*k (frames must be 4n+1)"
        )
    mid = window // 2
    first = audio[..., :1, :, :, :]
    groups = audio[..., 1:, :, :, :].unflatten(-4, (-1, vae_scale))  # [..., T_lat-1, vae_scale, W, L, C]
    head = groups[..., 0, : mid + 1, :, :]  # [..., T_lat-1, mid+1, L, C]
    middle = groups[..., 1:-1, mid, :, :]  # [..., T_lat-1, vae_scale-2, L, C]
    tail = groups[..., -1, mid:, :, :]  # [..., T_lat-1, W-mid, L, C]
    return first, torch.cat([head, middle, tail], dim=-3)


def routing_head_fn(token_masks: torch.Tensor) -> HeadFn:
    """Per-head partial speaker routing map over the reference (first latent) frame.

    For each query token and head, ``softmax(q . k_ref^T / sqrt(D))`` over the first frame's
    tokens, averaged inside each class mask (person 1, person 2, background), summed over
    the given heads. Computed as attention with the 0/1 masks as values, so the [S, N_ref]
    probability matrix is never materialised (flash / memory-efficient kernels on GPU).

    Args:
        token_masks: [n_class, N_ref] bool, N_ref = tokens of one latent frame.

    Returns:
        head_fn(q, k, head_start) -> [B * n_class, S] float32 (q, k: [B, S, h, D] after RoPE).
    """
    n_class, n_ref = token_masks.shape
    # Upstream divides by the mask size; an empty class would give NaN there, here a zero row.
    sizes = token_masks.float().sum(1).clamp(min=1.0)  # [n_class]

    def head_fn(q: torch.Tensor, k: torch.Tensor, head_start: int) -> torch.Tensor:
        b, s, h, d = q.shape
        # Values padded to D columns so the fast SDPA kernels (equal q/v head dims) apply.
        values = torch.zeros(n_ref, d, dtype=q.dtype, device=q.device)
        values[:, :n_class] = token_masks.t().to(device=q.device, dtype=q.dtype)
        # contiguous: zero-stride expanded values could push SDPA onto the (S x N_ref) math path.
        out = attention(q, k[:, :n_ref], values[None, :, None, :].expand(b, n_ref, h, d).contiguous())
        stat = out[..., :n_class].float().sum(2) / sizes.to(q.device)  # [B, S, n_class]
        return stat.transpose(1, 2).reshape(b * n_class, s)

    return head_fn


def routing_positions(
    ref_map: torch.Tensor,
    sp: SequenceParallelism,
    class_range: int,
    class_interval: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """L-RoPE query positions from the routing map (MultiTalk's two-person speaker binding).

    Person-1 scores are min-max normalised (global min/max over all ranks' tokens) into
    [0, class_interval], person-2 scores into [class_range - class_interval, class_range],
    background is class_range // 2; each token takes the value of its argmax class.

    Args:
        ref_map: [B, 3, n] routing scores of this rank's real tokens (n may be 0).
        dtype: activation dtype; positions are rounded to it as upstream computes them in it.

    Returns:
        [B, n] float32 positions.
    """
    b, n_class, n = ref_map.shape
    if n:
        local_max, local_min = ref_map.amax(-1), ref_map.amin(-1)
    else:
        # A rank holding only padding still joins the collectives.
        local_max = ref_map.new_full((b, n_class), -math.inf)
        local_min = ref_map.new_full((b, n_class), math.inf)
    gmax, gmin = sp.all_reduce_max(local_max), sp.all_reduce_min(local_min)  # [B, 3]
    lo1, hi1 = 0.0, float(class_interval)
    lo2, hi2 = float(class_range - class_interval), float(class_range)
    span = (gmax - gmin + ROUTING_EPS)[..., None]
    unit = (ref_map - gmin[..., None]) / span  # [B, 3, n] in [0, 1]
    candidates = torch.stack(
        [
            unit[:, 0] * (hi1 - lo1) + lo1,
            unit[:, 1] * (hi2 - lo2) + lo2,
            torch.full_like(unit[:, 0], float(class_range // 2)),
        ],
        dim=1,
    )
    choice = ref_map.argmax(dim=1, keepdim=True)  # [B, 1, n]
    positions = candidates.gather(1, choice).squeeze(1)
    return positions.to(dtype).float()


def audio_key_positions(
    kv_per_frame: int, frames: int, class_range: int, class_interval: int
) -> torch.Tensor:
    """Audio key positions: person 1's tokens at the centre of [0, interval] (2), person 2's at
    the centre of [range - interval, range] (22), repeated per frame. Returns [frames * N_a]."""
    p1 = class_interval / 2.0
    p2 = class_range - class_interval / 2.0
    half = kv_per_frame // 2
    per_frame = torch.tensor([p1] * half + [p2] * (kv_per_frame - half), dtype=torch.float32)
    return per_frame.repeat(frames)


# ---------------------------------------------------------------------------------------
# norms
# ---------------------------------------------------------------------------------------
