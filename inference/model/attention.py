"""Attention kernels used by the DiT: plain attention and frame-local (block-diagonal) attention.

Everything here works on ``[B, S, H, D]`` tensors. ``attend`` is the kernel choice point, used by the
self-attention (through the ``sp`` seam), the text/image cross-attention and the frame-local audio
attention: flash-attn 3 (``flash_attn_interface``, Hopper) or flash-attn 2 (``flash_attn``) for
fp16/bf16 CUDA tensors when installed, else ``torch.nn.functional.scaled_dot_product_attention`` (which
picks its own flash / memory-efficient kernels on CUDA and the math kernel on CPU).
``set_attention_kernel`` pins a choice (``auto`` | ``flash3`` | ``flash2`` | ``sdpa``). Every call is a
dense fixed-length attention: the Ulysses trim leaves equal lengths, and the text context is padded to
``text_len`` and attended with its padding as upstream does, so varlen packing would change the result
rather than save work. A flash kernel that fails at run time (an unsupported GPU or head size) is
dropped for SDPA once, with a warning.

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


KERNELS = ("auto", "flash3", "flash2", "sdpa")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_preference = "auto"
_failed: set[str] = set()  # flash kernels that raised at run time (dropped for SDPA)


class AttentionKernelError(ValueError):
    """A kernel was requested that cannot run here."""


@functools.cache
def flash_kernels() -> dict[str, Callable[..., torch.Tensor]]:
    """Installed flash-attn kernels by name: ``flash3`` (flash_attn_interface), ``flash2`` (flash_attn).

    Both take [B, S, H, D] q, k, v. Imported on first use only: they are optional GPU extras.
    """
    found: dict[str, Callable[..., torch.Tensor]] = {}
    try:
        from flash_attn_interface import flash_attn_func as fa3
    except ImportError:
        pass
    else:
        found["flash3"] = fa3
    try:
        from flash_attn import flash_attn_func as fa2
    except ImportError:
        pass
    else:
        found["flash2"] = fa2
    logger.info("flash-attn kernels installed: %s", ", ".join(found) or "none (torch SDPA)")
    return found


def choose_kernel(
    device_type: str, dtype: torch.dtype, available: set[str] | frozenset[str], preference: str = "auto"
) -> str:
    """The kernel for tensors on ``device_type`` of ``dtype``: a flash kernel for fp16/bf16 CUDA
    tensors (the pinned one, else flash3 before flash2) when available, otherwise ``sdpa``."""
    if device_type != "cuda" or dtype not in _FLASH_DTYPES or preference == "sdpa":
        return "sdpa"
    order = ("flash3", "flash2") if preference == "auto" else (preference,)
    for name in order:
        if name in available:
            return name
    return "sdpa"


def set_attention_kernel(name: str) -> None:
    """Pin the kernel for fp16/bf16 CUDA attention; a flash kernel that is not installed is refused."""
    global _preference
    if name not in KERNELS:
        raise AttentionKernelError(f"unknown attention kernel {name!r}; choose one of {list(KERNELS)}")
    if name.startswith("flash") and name not in flash_kernels():
        raise AttentionKernelError(
            f"{name} is not installed (found: {sorted(flash_kernels()) or 'none'}); use auto or sdpa"
        )
    _preference = name


def attention_kernel_for(q: torch.Tensor) -> str:
    """The kernel ``attend`` uses for tensors like ``q``."""
    available = set(flash_kernels()) - _failed if q.is_cuda else set()
    return choose_kernel(q.device.type, q.dtype, available, _preference)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention on [B, S, h, D] tensors (scale 1/sqrt(D), no mask) with the chosen kernel -> [B, S, h, D]."""
    name = attention_kernel_for(q)
    if name != "sdpa":
        try:
            out = flash_kernels()[name](q, k, v)
        except RuntimeError as exc:  # e.g. a GPU or head size the build does not support
            logger.warning("%s failed (%s); using torch SDPA from now on", name, exc)
            _failed.add(name)
        else:
            return out[0] if isinstance(out, tuple) else out  # some flash-attn 3 builds also return the LSE
    return attention(q, k, v)


# Score elements per chunk of the explicit-softmax path (256 MiB of fp32 scores).
_LSE_CHUNK_ELEMENTS = 1 << 26
_lse_failed: set[str] = set()  # flash kernels that could not return the LSE (dropped for the math path)


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (scale 1/sqrt(D)) written out in fp32, also returning the log-sum-exp.

    The scores of a chunk of queries are formed in full, so chunks are sized to keep that block at
    ``_LSE_CHUNK_ELEMENTS``. This is the reference path (CPU, fp32 on CUDA, no flash-attn).

    Args:
        q: [B, Sq, h, D]; k, v: [B, Sk, h, D] with Sk >= 1.

    Returns:
        out: [B, Sq, h, D] in q's dtype; lse: [B, h, Sq] float32, log sum_j exp(q . k_j / sqrt(D)).
    """
    b, sq, h, d = q.shape
    sk = k.shape[1]
    qf = q.float().transpose(1, 2) * d**-0.5  # [B, h, Sq, D]
    kt = k.float().permute(0, 2, 3, 1)  # [B, h, D, Sk]
    vf = v.float().transpose(1, 2)  # [B, h, Sk, D]
    rows = max(1, _LSE_CHUNK_ELEMENTS // max(1, b * h * sk))
    outs, lses = [], []
    for i in range(0, sq, rows):
        scores = qf[:, :, i : i + rows] @ kt  # [B, h, n, Sk]
        peak = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - peak)
        total = weights.sum(-1, keepdim=True)
        outs.append((weights @ vf) / total)
        lses.append((peak + total.log()).squeeze(-1))
    if not outs:  # no queries
        return q.new_empty(b, 0, h, v.shape[-1]), q.new_empty(b, h, 0, dtype=torch.float32)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return out, torch.cat(lses, dim=-1)


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend`` that also returns the log-sum-exp of each query's scores (to merge partial results).

    A flash kernel (chosen as for ``attend``: fp16/bf16 CUDA tensors) returns the LSE itself; otherwise
    ``attention_with_lse`` computes it with an explicit softmax. q: [B, Sq, h, D]; k, v: [B, Sk, h, D].

    Returns:
        out: [B, Sq, h, D] in q's dtype; lse: [B, h, Sq] float32.
    """
    name = attention_kernel_for(q)
    if name != "sdpa" and name not in _lse_failed:
        try:
            res = flash_kernels()[name](q, k, v, return_attn_probs=True)
        except (RuntimeError, TypeError) as exc:  # an unsupported GPU or head size, or no LSE option
            logger.warning("%s gave no log-sum-exp (%s); ring attention uses the fp32 math path", name, exc)
            _lse_failed.add(name)
        else:
            expected = (q.shape[0], q.shape[2], q.shape[1])
            if isinstance(res, tuple) and len(res) >= 2 and tuple(res[1].shape) == expected:
                return res[0], res[1].float()
            logger.warning(
                "%s returned no [B, h, Sq] log-sum-exp; ring attention uses the fp32 math path", name
            )
            _lse_failed.add(name)
    return attention_with_lse(q, k, v)


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
        pieces.append(attend(q[:, :m], k[:, kv], v[:, kv]))
        i, frame = m, 1
    full = (n - i) // q_per_frame
    if full:
        # Whole frames: one batched call with the frames folded into the batch.
        qf = q[:, i : i + full * q_per_frame].reshape(b * full, q_per_frame, h, d)
        kv = slice(frame * kv_per_frame, (frame + full) * kv_per_frame)
        kf = k[:, kv].reshape(b * full, kv_per_frame, h, k.shape[-1])
        vf = v[:, kv].reshape(b * full, kv_per_frame, h, v.shape[-1])
        pieces.append(attend(qf, kf, vf).reshape(b, full * q_per_frame, h, v.shape[-1]))
        i, frame = i + full * q_per_frame, frame + full
    if i < n:
        # Partial last frame.
        kv = slice(frame * kv_per_frame, (frame + 1) * kv_per_frame)
        pieces.append(attend(q[:, i:], k[:, kv], v[:, kv]))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
