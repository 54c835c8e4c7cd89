"""Per-frame audio windows fed to the MultiTalk DiT.

Upstream (``wan/multitalk.py::generate``) gives every video frame ``f`` of a clip the
wav2vec2 embeddings of frames ``f-2 .. f+2``, clamping indices at both ends of the track.
The result for one clip and ``n`` persons is ``[n, F, 5, 12, 768]``; the model adds the
batch axis in front.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


def window_audio(emb: torch.Tensor, start: int, num_frames: int, window: int = 5) -> torch.Tensor:
    """Windowed audio features for video frames ``[start, start + num_frames)`` of one person.

    Args:
        emb: [T, L, C] wav2vec2 hidden states at 25 fps (L layers of width C).
        start: first video frame of the clip (may be >= 0 and anywhere in the track).
        num_frames: frames in the clip (81 upstream).
        window: odd window length (5: offsets -2..+2).

    Returns:
        [num_frames, window, L, C]; indices outside [0, T-1] are clamped to the edge frames.
    """
    if emb.ndim != 3 or emb.shape[0] < 1:
        raise ValueError(f"audio embedding must be [T>=1, layers, dim], got {tuple(emb.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    if num_frames < 1 or start < 0:
        raise ValueError(f"need start >= 0 and num_frames >= 1, got start={start} num_frames={num_frames}")
    half = window // 2
    offsets = torch.arange(window) - half  # [W]
    frames = torch.arange(start, start + num_frames)  # [F]
    index = (frames[:, None] + offsets[None, :]).clamp_(0, emb.shape[0] - 1)  # [F, W]
    return emb[index.to(emb.device)]


def window_persons(
    embs: Sequence[torch.Tensor], start: int, num_frames: int, window: int = 5
) -> torch.Tensor:
    """Stack the windows of several persons: list of [T_i, L, C] -> [n, num_frames, window, L, C]."""
    if not embs:
        raise ValueError("at least one person's audio embedding is needed")
    return torch.stack([window_audio(e, start, num_frames, window) for e in embs])
