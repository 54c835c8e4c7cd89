"""MultiTalk resolution buckets and the cover-resize + centre-crop that maps an image onto one.

Upstream (``wan/utils/multitalk_utils.py`` and ``wan/multitalk.py::generate``) picks the bucket whose
``height / width`` key is closest to the source ratio, resizes the image so it covers the bucket
(``scale = max(th / h, tw / w)``, new size ``ceil(scale * h) x ceil(scale * w)``, bilinear) and crops the
centre (torchvision ``center_crop`` offsets: ``round((size - target) / 2)``). Person masks go through the
same geometry with nearest-neighbour sampling. This module re-implements those rules in numpy/PIL so the
scene code, the pipeline and the tests agree on every pixel.

Tables are ``ratio key (h / w, as upstream's string) -> (height, width)`` in pixels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# multitalk-480: about 640 x 640 pixels of area.
ASPECT_RATIO_627: dict[str, tuple[int, int]] = {
    "0.26": (320, 1216),
    "0.38": (384, 1024),
    "0.50": (448, 896),
    "0.67": (512, 768),
    "0.82": (576, 704),
    "1.00": (640, 640),
    "1.22": (704, 576),
    "1.50": (768, 512),
    "1.86": (832, 448),
    "2.00": (896, 448),
    "2.50": (960, 384),
    "2.83": (1088, 384),
    "3.60": (1152, 320),
    "3.80": (1216, 320),
    "4.00": (1280, 320),
}

# multitalk-720: about 960 x 960 pixels of area.
ASPECT_RATIO_960: dict[str, tuple[int, int]] = {
    "0.22": (448, 2048),
    "0.29": (512, 1792),
    "0.36": (576, 1600),
    "0.45": (640, 1408),
    "0.55": (704, 1280),
    "0.63": (768, 1216),
    "0.76": (832, 1088),
    "0.88": (896, 1024),
    "1.00": (960, 960),
    "1.14": (1024, 896),
    "1.31": (1088, 832),
    "1.50": (1152, 768),
    "1.58": (1216, 768),
    "1.82": (1280, 704),
    "1.91": (1344, 704),
    "2.20": (1408, 640),
    "2.30": (1472, 640),
    "2.67": (1536, 576),
    "2.89": (1664, 576),
    "3.62": (1856, 512),
    "3.75": (1920, 512),
}

BUCKET_TABLES: dict[int, dict[str, tuple[int, int]]] = {480: ASPECT_RATIO_627, 720: ASPECT_RATIO_960}
SUPPORTED_SIZES: tuple[int, ...] = tuple(BUCKET_TABLES)

# Default landscape bucket for a composed two-person scene: the 16:9 neighbour of each family
# (448x896 is 2:1 at 480, 704x1280 is 16:9 at 720). Two people side by side want a wide frame.
DEFAULT_SCENE_ASPECT = "16:9"


def bucket_table(size: int) -> dict[str, tuple[int, int]]:
    """The bucket table for ``size`` 480 (ASPECT_RATIO_627) or 720 (ASPECT_RATIO_960)."""
    try:
        return BUCKET_TABLES[int(size)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"size must be one of {list(SUPPORTED_SIZES)}, got {size!r}") from None


def nearest_bucket(height: int, width: int, size: int = 480) -> tuple[int, int]:
    """Bucket ``(h, w)`` whose ratio key is closest to ``height / width``, as upstream chooses it.

    Ties go to the first key in table order (upstream sorts the keys with a stable sort).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    table = bucket_table(size)
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return table[key]


MAX_ASPECT_RATIO = 16.0  # an aspect beyond 16:1 (or 1:16) is refused, not snapped to the last bucket


def parse_aspect(aspect: str) -> float:
    """``"W:H"`` (e.g. ``"16:9"``) or a bucket key ``"0.50"`` (h / w) -> ratio h / w, within
    ``1 / MAX_ASPECT_RATIO .. MAX_ASPECT_RATIO``."""
    text = aspect.strip()
    try:
        if len(text) > 40:
            raise ValueError
        if ":" in text:
            w_text, h_text = text.split(":", 1)
            w, h = float(w_text), float(h_text)
            if w <= 0 or h <= 0 or not (math.isfinite(w) and math.isfinite(h)):
                raise ValueError
            ratio = h / w
        else:
            ratio = float(text)
        if not 1 / MAX_ASPECT_RATIO <= ratio <= MAX_ASPECT_RATIO:
            raise ValueError
        return ratio
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ValueError(
            f"aspect must be 'W:H' like '16:9' or a bucket key (height/width) like '0.50', between "
            f"1:{MAX_ASPECT_RATIO:g} and {MAX_ASPECT_RATIO:g}:1; got {aspect[:40]!r}"
        ) from None


def bucket_for_aspect(aspect: str, size: int = 480) -> tuple[int, int]:
    """Bucket closest to an aspect given as ``"W:H"`` or as an exact table key."""
    table = bucket_table(size)
    if aspect.strip() in table:
        return table[aspect.strip()]
    ratio = parse_aspect(aspect)
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return table[key]


@dataclass(frozen=True)
class CoverCrop:
    """Geometry of cover-resize + centre-crop from ``src`` to ``target`` (all ``(h, w)`` in pixels).

    ``resized`` is the intermediate size; ``top``/``left`` are the crop offsets inside it.
    """

    src: tuple[int, int]
    target: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int


def cover_crop(src_hw: tuple[int, int], target_hw: tuple[int, int]) -> CoverCrop:
    """Upstream geometry: scale = max of the two ratios, ceil the new size, centre crop (round half even)."""
    src_h, src_w = int(src_hw[0]), int(src_hw[1])
    th, tw = int(target_hw[0]), int(target_hw[1])
    if min(src_h, src_w, th, tw) <= 0:
        raise ValueError(f"sizes must be positive, got src={src_hw} target={target_hw}")
    scale = max(th / src_h, tw / src_w)
    final_h = max(th, math.ceil(scale * src_h))
    final_w = max(tw, math.ceil(scale * src_w))
    # torchvision's center_crop uses int(round((size - crop) / 2)); Python's round is half-to-even.
    top = int(round((final_h - th) / 2.0))
    left = int(round((final_w - tw) / 2.0))
    return CoverCrop(src=(src_h, src_w), target=(th, tw), resized=(final_h, final_w), top=top, left=left)


def resize_and_center_crop(
    img: Image.Image, target_hw: tuple[int, int], resample: Image.Resampling = Image.Resampling.BILINEAR
) -> Image.Image:
    """Scale ``img`` to cover ``target_hw = (h, w)`` and crop the centre; returns a ``w x h`` image."""
    geo = cover_crop((img.height, img.width), target_hw)
    rh, rw = geo.resized
    resized = img if (rh, rw) == (img.height, img.width) else img.resize((rw, rh), resample=resample)
    th, tw = geo.target
    return resized.crop((geo.left, geo.top, geo.left + tw, geo.top + th))


def _nearest_index(out_size: int, in_size: int) -> np.ndarray:
    """Source index of each output index for nearest resize (PyTorch 'nearest': floor(i * in / out))."""
    idx = np.floor(np.arange(out_size, dtype=np.float64) * (in_size / out_size)).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_and_center_crop_mask(mask: np.ndarray, target_hw: tuple[int, int]) -> np.ndarray:
    """The same cover + crop for masks, nearest-neighbour. ``mask: [..., H, W] -> [..., h, w]``."""
    if mask.ndim < 2:
        raise ValueError(f"mask must have at least 2 dims [..., H, W], got shape {mask.shape}")
    src_h, src_w = mask.shape[-2:]
    geo = cover_crop((src_h, src_w), target_hw)
    rh, rw = geo.resized
    th, tw = geo.target
    rows = _nearest_index(rh, src_h)[geo.top : geo.top + th]
    cols = _nearest_index(rw, src_w)[geo.left : geo.left + tw]
    return mask[..., rows[:, None], cols[None, :]]


def transform_box(
    box: tuple[float, float, float, float], src_hw: tuple[int, int], target_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Map a half-open box ``[y0, x0, y1, x1]`` in source pixels through the cover + crop.

    Returns exactly the pixels a box mask sent through :func:`resize_and_center_crop_mask` would cover
    (target row ``r`` is inside when ``y0 <= source_row(r) < y1``), clipped to the target. The result is
    empty (``y1 == y0`` or ``x1 == x0``) when the box lies in the cropped-away part.
    """
    geo = cover_crop(src_hw, target_hw)
    (src_h, src_w), (rh, rw), (th, tw) = geo.src, geo.resized, geo.target
    rows = _nearest_index(rh, src_h)[geo.top : geo.top + th]
    cols = _nearest_index(rw, src_w)[geo.left : geo.left + tw]
    y0, x0, y1, x1 = (math.ceil(float(v)) for v in box)
    # rows/cols are non-decreasing, so the inside set is one contiguous run found by bisection.
    return (
        int(np.searchsorted(rows, y0, side="left")),
        int(np.searchsorted(cols, x0, side="left")),
        int(np.searchsorted(rows, y1, side="left")),
        int(np.searchsorted(cols, x1, side="left")),
    )
