"""Attention kernels used by the DiT: plain attention and frame-local (block-diagonal) attention.

Everything here works on ``[B, S, H, D]`` tensors. ``attend`` is the self-attention kernel choice:
flash-attn for fp16/bf16 CUDA tensors when the package is installed, else
``torch.nn.functional.scaled_dot_product_attention`` (which picks flash / memory-efficient kernels on
CUDA and the math kernel on CPU). Cross-attention and frame-local attention always use SDPA.

Frame-local attention is MultiTalk's audio cross-attention: the video tokens of latent frame
``t`` attend only to the audio tokens of frame ``t``. A token chunk ``[start, end)`` (one
rank's share under sequence parallelism) may start and end mid-frame; it splits into at most
three contiguous pieces (a partial head frame, whole frames, a partial tail frame), each one
dense SDPA call with no mask. That is exact block-diagonal attention with no wasted FLOPs
(a dense boolean mask over all frames would cost ``T_lat`` times more) and no per-token
Python loop.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D).

    Args:
        q: [B, Sq, H, D]; k: [B, Sk, H, D]; v: [B, Sk, H, Dv].

    Returns:
        [B, Sq, H, Dv] in q's dtype.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@functools.cache
def _flash_attn_func() -> Callable[..., torch.Tensor] | None:
    # flash-attn is an optional GPU extra; import it on first CUDA use only.
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        logger.info("flash-attn not installed; using torch SDPA on CUDA")
        return None
    return flash_attn_func


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention on [B, S, h, D] tensors: flash-attn for fp16/bf16 CUDA tensors if installed, else SDPA.

    After the Ulysses trim every sequence in the batch has the same length, so the fixed-length
    kernel is enough (no varlen packing).
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        flash = _flash_attn_func()
        if flash is not None:
            return flash(q, k, v)
    return attention(q, k, v)


def frame_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offset: int,
    q_per_frame: int,
    kv_per_frame: int,
) -> torch.Tensor:
    """Block-diagonal attention: each query attends only to the keys of its own frame.

    Query ``i`` sits at position ``q_offset + i`` of a frame-major token sequence with
    ``q_per_frame`` tokens per frame, i.e. in local frame ``(q_offset + i) // q_per_frame``.
    Keys/values hold ``kv_per_frame`` tokens for each local frame, frame-major.

    Args:
        q: [B, n, H, D] query tokens (a contiguous chunk of the video sequence).
        k, v: [B, n_frames * kv_per_frame, H, D]; n_frames must cover every query's frame.
        q_offset: position of the first query inside its frame, 0 <= q_offset < q_per_frame.
        q_per_frame: video tokens per latent frame.
        kv_per_frame: keys per latent frame (context_tokens * persons).

    Returns:
        [B, n, H, D].
    """
    b, n, h, d = q.shape
    if not 0 <= q_offset < q_per_frame:
        raise ValueError(f"q_offset {q_offset} must be in [0, {q_per_frame})")
    frames_needed = (q_offset + n + q_per_frame - 1) // q_per_frame
    if k.shape[1] < frames_needed * kv_per_frame or k.shape[1] % kv_per_frame:
        raise ValueError(
            f"keys hold {k.shape[1]} tokens; {frames_needed} frames x {kv_per_frame} are needed for "
            f"{n} queries at offset {q_offset} with {q_per_frame} per frame"
        )
    pieces: list[torch.Tensor] = []
    i, frame = 0, 0
    if q_offset:
        # Partial first frame.
        m = min(q_per_frame - q_offset, n)
        kv = slice(0, kv_per_frame)
        pieces.append(attention(q[:, :m], k[:, kv], v[:, kv]))
        i, frame = m, 1
    full = (n - i) // q_per_frame
    if full:
        # Whole frames: one batched call with the frames folded into the batch.
        qf = q[:, i : i + full * q_per_frame].reshape(b * full, q_per_frame, h, d)
        kv = slice(frame * kv_per_frame, (frame + full) * kv_per_frame)
        kf = k[:, kv].reshape(b * full, kv_per_frame, h, k.shape[-1])
        vf = v[:, kv].reshape(b * full, kv_per_frame, h, v.shape[-1])
        pieces.append(attention(qf, kf, vf).reshape(b, full * q_per_frame, h, v.shape[-1]))
        i, frame = i + full * q_per_frame, frame + full
    if i < n:
        # Partial last frame.
        kv = slice(frame * kv_per_frame, (frame + 1) * kv_per_frame)
        pieces.append(attention(q[:, i:], k[:, kv], v[:, kv]))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
