"""Two portraits (or one composed image + boxes) -> one MultiTalk reference scene with person masks.

MultiTalk binds speaker audio to people through three masks of the reference frame: person 1,
person 2 and background (``research/multitalk.md`` §5.3). Upstream builds them from ``bbox``
(``[y_min, x_min, y_max, x_max]`` in original pixels) or, without one, from the left and right halves
with a 5 % margin, then sends image and masks through the same bucket cover-resize + centre-crop.
This module does the same, and can also compose the scene from two separate portraits:

- ``side_by_side``: each portrait cover-fills its half of the bucket; both are scaled to one common
  height so people of similarly framed portraits come out at a similar size; the crop keeps the top,
  where heads are.
- ``backdrop``: both portraits become feathered panels of equal height, standing on the bottom edge, in
  front of a shared background (a blurred, stretched mix of both portraits, or a plain colour).

Person 1 is always on the left and person 2 on the right. Unlike upstream (whose masks may overlap),
our masks are a partition: every pixel belongs to exactly one class, and a pixel inside both boxes goes
to the box whose centre is nearer (ties to person 1).

Accepted images: JPEG, PNG or WebP, short side >= 256 px, at most 40 megapixels, long side at most
4x the short side (the bucket tables end at 1:4 and 4:1). EXIF orientation is applied on load, and
boxes refer to the image as displayed (after that rotation).

Box overlap rule (``scene_from_image``): two boxes are refused when their IoU is above 0.5, or when
their intersection covers more than 80 % of the smaller box, because then the model cannot tell the
speakers apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from common.bounded import bounded_float
from common.bounded import loads as bounded_json
from common.errors import InputError
from common.files import atomic_write
from inference.scene.buckets import (
    DEFAULT_SCENE_ASPECT,
    SUPPORTED_SIZES,
    bucket_for_aspect,
    nearest_bucket,
    resize_and_center_crop,
    transform_box,
)
from inference.scene.images import (  # re-exported: the scene's image rules are part of its interface
    ALLOWED_FORMATS as ALLOWED_FORMATS,
)
from inference.scene.images import (
    MAX_ASPECT as MAX_ASPECT,
)
from inference.scene.images import (
    MAX_PIXELS as MAX_PIXELS,
)
from inference.scene.images import (
    MIN_SHORT_SIDE as MIN_SHORT_SIDE,
)
from inference.scene.images import (
    PORTRAIT_SHORT_SIDE,
    SceneError,
    _as_rgb_image,
    _cover_crop_reduced,
)
from inference.scene.images import (
    image_size as image_size,
)
from inference.scene.images import (
    load_image as load_image,
)
from inference.scene.images import (
    reduction_factor as reduction_factor,
)

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # [y0, x0, y1, x1], half-open, pixels

MAX_BOX_COORD = 1_000_000  # |box coordinate| in pixels; far beyond any accepted image side
LAYOUTS = ("side_by_side", "backdrop")
BACKDROPS = ("blur", "plain")
LATENT_STRIDE = 8  # Wan VAE spatial stride
DEFAULT_MARGIN = 0.05  # upstream face_scale for the default half-image boxes
MAX_IOU = 0.5
MAX_CONTAINMENT = 0.8
DEFAULT_NAMES = ("Speaker 1", "Speaker 2")

# Side-by-side: fraction of the vertical excess cut from the top (0 keeps the very top). A little
# headroom goes so faces get larger, most of the cut falls on the body below.
_VERTICAL_ANCHOR = 0.1
# Backdrop: panel height as a fraction of the frame, gap between a panel and its half's edges (of W),
# feather width as a fraction of the panel's shorter side.
_PANEL_HEIGHT = 0.92
_PANEL_GAP = 0.02
_FEATHER = 0.06


_TINTS = ((255, 140, 0), (0, 150, 255))
_TINT_ALPHA = 0.38


# ----------------------------------------------------------------------------------------------------
# Scene
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Scene:
    """A reference image at a MultiTalk bucket plus where each person is.

    ``image``: RGB, ``W x H`` = bucket. ``bucket``: ``(H, W)``. ``boxes``: person 1, person 2 as
    ``[y0, x0, y1, x1]`` in scene pixels (half-open). ``masks``: uint8 ``[3, H, W]`` (person 1, person 2,
    background), a partition. ``latent_masks``: float32 ``[3, H/8, W/8]``, nearest-downsampled, also a
    partition. ``overlay``: RGB preview with tinted regions, boxes and labels. ``size``: 480 or 720.
    ``layout``: "side_by_side" / "backdrop" (composed), "halves" / "given" (``scene_from_image``
    with default or given boxes), "single" (one person, ``inference.scene.single``). ``names``: one per box.
    """

    image: Image.Image
    bucket: tuple[int, int]
    boxes: tuple[Box, ...]  # two, or one for a one-person scene
    masks: np.ndarray
    latent_masks: np.ndarray
    overlay: Image.Image
    size: int
    layout: str
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        h, w = self.bucket
        if (self.image.height, self.image.width) != (h, w):
            raise ValueError(f"image is {self.image.width}x{self.image.height}, bucket is {w}x{h}")
        if self.masks.shape != (3, h, w) or self.masks.dtype != np.uint8:
            raise ValueError(f"masks must be uint8 [3, {h}, {w}], got {self.masks.dtype} {self.masks.shape}")
        lat = (3, h // LATENT_STRIDE, w // LATENT_STRIDE)
        if self.latent_masks.shape != lat or self.latent_masks.dtype != np.float32:
            raise ValueError(f"latent_masks must be float32 {list(lat)}, got {self.latent_masks.shape}")

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.bucket[0] // LATENT_STRIDE, self.bucket[1] // LATENT_STRIDE

    def to_json(self) -> dict[str, Any]:
        """JSON-ready description (bucket, boxes, size, ...); boxes follow upstream's bbox order."""
        return {
            "size": self.size,
            "bucket": [int(v) for v in self.bucket],
            "latent_size": [int(v) for v in self.latent_size],
            "boxes": [[int(v) for v in box] for box in self.boxes],
            "box_format": "[y_min, x_min, y_max, x_max] in scene pixels, half-open",
            "layout": self.layout,
            "names": list(self.names),
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``reference.png``, ``overlay.png``, ``masks.npz`` and ``scene.json`` (last), each atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "reference.png", lambda f: self.image.save(f, format="PNG"))
        atomic_write(out / "overlay.png", lambda f: self.overlay.save(f, format="PNG"))
        atomic_write(
            out / "masks.npz",
            lambda f: np.savez_compressed(f, masks=self.masks, latent_masks=self.latent_masks),
        )
        text = json.dumps(self.to_json(), indent=2).encode()
        atomic_write(out / "scene.json", lambda f: f.write(text))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> Scene:
        """Read back a folder written by :meth:`save`."""
        out = Path(out_dir)
        meta = json.loads((out / "scene.json").read_text())
        with Image.open(out / "reference.png") as im:
            image = im.convert("RGB")
        with Image.open(out / "overlay.png") as im:
            overlay = im.convert("RGB")
        with np.load(out / "masks.npz") as npz:
            masks, latent_masks = npz["masks"], npz["latent_masks"]
        boxes = tuple(tuple(int(v) for v in box) for box in meta["boxes"])  # one box: a one-person scene
        return cls(
            image=image,
            bucket=(int(meta["bucket"][0]), int(meta["bucket"][1])),
            boxes=boxes,  # type: ignore[arg-type]
            masks=masks,
            latent_masks=latent_masks,
            overlay=overlay,
            size=int(meta["size"]),
            layout=str(meta["layout"]),
            names=tuple(str(n) for n in meta["names"]),  # type: ignore[arg-type]
        )


# ----------------------------------------------------------------------------------------------------
# Masks and overlay
# ----------------------------------------------------------------------------------------------------


def partition_masks(boxes: tuple[Box, Box], hw: tuple[int, int]) -> np.ndarray:
    """uint8 ``[3, H, W]`` person 1 / person 2 / background; overlap goes to the nearer box centre."""
    h, w = hw
    rows = np.arange(h, dtype=np.float64)[:, None] + 0.5
    cols = np.arange(w, dtype=np.float64)[None, :] + 0.5
    inside = []
    dist = []
    for y0, x0, y1, x1 in boxes:
        inside.append((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))
        dist.append((rows - (y0 + y1) / 2) ** 2 + (cols - (x0 + x1) / 2) ** 2)
    p1 = inside[0] & ~(inside[1] & (dist[1] < dist[0]))
    p2 = inside[1] & ~p1
    bg = ~(p1 | p2)
    return np.stack([p1, p2, bg]).astype(np.uint8)


def latent_masks_from(masks: np.ndarray) -> np.ndarray:
    """Nearest downsample by the VAE stride (PyTorch 'nearest' picks row ``8 i``): ``[3, H, W] -> [3, H/8, W/8]``."""
    return np.ascontiguousarray(masks[:, ::LATENT_STRIDE, ::LATENT_STRIDE]).astype(np.float32)


def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", px)
    except OSError:
        return ImageFont.load_default(size=px)


def render_overlay(
    image: Image.Image, masks: np.ndarray, boxes: tuple[Box, Box], names: tuple[str, str]
) -> Image.Image:
    """Preview: person regions tinted, boxes outlined, labels ``"1 · name"`` and ``"2 · name"``."""
    arr = np.asarray(image, dtype=np.float32).copy()
    for k, tint in enumerate(_TINTS):
        sel = masks[k].astype(bool)
        arr[sel] = arr[sel] * (1 - _TINT_ALPHA) + np.asarray(tint, dtype=np.float32) * _TINT_ALPHA
    arr[masks[2].astype(bool)] *= 0.8  # dim the background so the people stand out
    out = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(out)
    h, w = image.height, image.width
    line = max(2, round(min(h, w) / 160))
    font = _font(max(12, round(h / 22)))
    for k, ((y0, x0, y1, x1), tint) in enumerate(zip(boxes, _TINTS[: len(boxes)], strict=True)):
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=tint, width=line)
        label = f"{k + 1} \u00b7 {names[k]}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        pad = line + 2
        tx = min(max(x0 + line, 0), max(0, w - (right - left) - 2 * pad))
        ty = min(max(y0 + line, 0), max(0, h - (bottom - top) - 2 * pad))
        draw.rectangle((tx, ty, tx + (right - left) + 2 * pad, ty + (bottom - top) + 2 * pad), fill=tint)
        draw.text((tx + pad - left, ty + pad - top), label, fill=(255, 255, 255), font=font)
    return out


def _check_name(name: object) -> str:
    """``name`` stripped; a SceneError naming "names" unless that is 1 to 64 characters."""
    clean = str(name).strip()
    if not clean or len(clean) > 64:
        raise SceneError("names", f"speaker names must be 1 to 64 characters, got {name!r}")
    return clean


def _check_names(names: Sequence[str]) -> tuple[str, str]:
    if isinstance(names, str) or len(names) != 2:
        raise SceneError("names", f"expected two speaker names, got {names!r}")
    return _check_name(names[0]), _check_name(names[1])


def _build_scene(
    image: Image.Image, boxes: tuple[Box, Box], *, size: int, layout: str, names: tuple[str, str]
) -> Scene:
    h, w = image.height, image.width
    masks = partition_masks(boxes, (h, w))
    latent = latent_masks_from(masks)
    for k, what in enumerate(("the box of person 1", "the box of person 2")):
        if not latent[k].any():
            raise SceneError(
                "boxes",
                f"{what} is too small after fitting the image to the {w}x{h} bucket: it must cover at least "
                f"one {LATENT_STRIDE}x{LATENT_STRIDE} latent cell ({boxes[k]} in scene pixels)",
            )
    if not latent[2].any():
        raise SceneError(
            "boxes", "the two boxes cover the whole image; leave some background around the people"
        )
    overlay = render_overlay(image, masks, boxes, names)
    return Scene(
        image=image,
        bucket=(h, w),
        boxes=boxes,
        masks=masks,
        latent_masks=latent,
        overlay=overlay,
        size=size,
        layout=layout,
        names=names,
    )


def _margin_boxes(h: int, w: int) -> tuple[Box, Box]:
    """Upstream's default: rows and columns of each half with a 5 % margin (int() truncation as upstream)."""
    half = w // 2
    y0, y1 = int(h * DEFAULT_MARGIN), int(h * (1 - DEFAULT_MARGIN))
    lx0, lx1 = int(half * DEFAULT_MARGIN), int(half * (1 - DEFAULT_MARGIN))
    rx0, rx1 = int(half * DEFAULT_MARGIN + half), int(half * (1 - DEFAULT_MARGIN) + half)
    return (y0, lx0, y1, lx1), (y0, rx0, y1, rx1)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or size not in SUPPORTED_SIZES:
        raise SceneError("size", f"size must be one of {list(SUPPORTED_SIZES)}, got {size!r}")
    return int(size)


# ----------------------------------------------------------------------------------------------------
# Composition from two portraits
# ----------------------------------------------------------------------------------------------------


def _fill_half(img: Image.Image, height: int, half_w: int, bucket_h: int) -> Image.Image:
    """Scale to ``height`` (>= bucket_h, wide enough to cover ``half_w``), centre horizontally, keep the top.

    Only the visible source window is resampled (``resize(box=...)``), so a large common height never
    materialises a huge intermediate image.
    """
    s = height / img.height
    win_w, win_h = half_w / s, bucket_h / s
    left = (img.width - win_w) / 2
    top = _VERTICAL_ANCHOR * (height - bucket_h) / s
    return img.resize(
        (half_w, bucket_h),
        resample=Image.Resampling.LANCZOS,
        box=(left, top, left + win_w, top + win_h),
        reducing_gap=3.0,
    )


def _side_by_side(
    portraits: tuple[Image.Image, Image.Image], hw: tuple[int, int]
) -> tuple[Image.Image, tuple[Box, Box]]:
    h, w = hw
    half = w // 2
    # One common height for both, the smallest that lets each cover its half: equal scale of people.
    common = max(h, *(math.ceil(p.height * half / p.width) for p in portraits))
    canvas = Image.new("RGB", (w, h))
    for k, p in enumerate(portraits):
        canvas.paste(_fill_half(p, common, half, h), (k * half, 0))
    return canvas, _margin_boxes(h, w)


def _backdrop_background(
    portraits: tuple[Image.Image, Image.Image], hw: tuple[int, int], mode: str
) -> Image.Image:
    h, w = hw
    half = w // 2
    if mode == "plain":
        # A muted version of the portraits' mean colour keeps the light consistent with the people.
        mean = np.mean(
            [np.asarray(p.resize((32, 32)), dtype=np.float64).mean(axis=(0, 1)) for p in portraits], axis=0
        )
        colour = tuple(int(round(0.45 * c + 0.55 * 96)) for c in mean)
        return Image.new("RGB", (w, h), colour)
    # Each portrait's outer quarters (usually background, not the person) stretched over its half,
    # cross-faded across the middle, then heavily blurred: colours and light of both photos, no faces.
    halves = []
    for p in portraits:
        q = max(1, p.width // 4)
        edges = Image.new("RGB", (2 * q, p.height))
        edges.paste(p.crop((0, 0, q, p.height)), (0, 0))
        edges.paste(p.crop((p.width - q, 0, p.width, p.height)), (q, 0))
        halves.append(np.asarray(edges.resize((half, h), Image.Resampling.BILINEAR), dtype=np.float32))
    band = max(2, w // 8)
    ramp = np.clip((np.arange(w, dtype=np.float32) - (half - band / 2)) / band, 0.0, 1.0)[None, :, None]
    left_ext = np.concatenate([halves[0], np.repeat(halves[0][:, -1:], w - half, axis=1)], axis=1)
    right_ext = np.concatenate([np.repeat(halves[1][:, :1], half, axis=1), halves[1]], axis=1)
    mix = left_ext * (1 - ramp) + right_ext * ramp
    blurred = Image.fromarray(np.clip(mix * 0.85, 0, 255).astype(np.uint8), mode="RGB")
    return blurred.filter(ImageFilter.GaussianBlur(radius=max(h, w) / 30))


def _feather_alpha(width: int, height: int, feather: int) -> Image.Image:
    """Alpha ``[height, width]``: smooth ramps on left, right and top edges; the bottom stays opaque."""
    f = max(1, feather)
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32) + 0.5
    ax = np.clip(np.minimum(xs, width - xs) / f, 0, 1)
    ay = np.clip(ys / f, 0, 1)
    a = ay[:, None] * ax[None, :]
    a = a * a * (3 - 2 * a)  # smoothstep
    return Image.fromarray(np.round(a * 255).astype(np.uint8), mode="L")


def _backdrop(
    portraits: tuple[Image.Image, Image.Image], hw: tuple[int, int], mode: str
) -> tuple[Image.Image, tuple[Box, Box]]:
    h, w = hw
    half = w // 2
    canvas = _backdrop_background(portraits, hw, mode)
    panel_h = round(h * _PANEL_HEIGHT)
    gap = max(2, round(w * _PANEL_GAP))
    max_w = half - 2 * gap
    boxes = []
    for k, p in enumerate(portraits):
        # Same panel height for both people; a portrait too wide for its half is centre-cropped.
        src = p
        if p.width * panel_h > max_w * p.height:
            keep = max(1, round(max_w * p.height / panel_h))
            x = (p.width - keep) // 2
            src = p.crop((x, 0, x + keep, p.height))
        panel_w = min(max_w, max(1, round(src.width * panel_h / src.height)))
        panel = src.resize((panel_w, panel_h), resample=Image.Resampling.LANCZOS, reducing_gap=3.0)
        x0 = k * half + (half - panel_w) // 2
        y0 = h - panel_h
        feather = round(min(panel_w, panel_h) * _FEATHER)
        canvas.paste(panel, (x0, y0), _feather_alpha(panel_w, panel_h, feather))
        boxes.append((y0, x0, h, x0 + panel_w))
    return canvas, (boxes[0], boxes[1])


def compose_scene(
    left: Image.Image | str | Path | bytes,
    right: Image.Image | str | Path | bytes,
    *,
    layout: str = "side_by_side",
    size: int = 480,
    backdrop: str = "blur",
    aspect: str | None = None,
    names: Sequence[str] = DEFAULT_NAMES,
) -> Scene:
    """Two portraits of any size -> one scene at a MultiTalk bucket; speaker 1 left, speaker 2 right.

    ``aspect``: ``"W:H"`` (closest bucket) or a bucket key such as ``"0.50"``; default ``"16:9"``
    (448x896 at 480, 704x1280 at 720). ``backdrop`` only applies to ``layout="backdrop"``.
    """
    size = _check_size(size)
    if layout not in LAYOUTS:
        raise SceneError("layout", f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if backdrop not in BACKDROPS:
        raise SceneError("backdrop", f"backdrop must be one of {list(BACKDROPS)}, got {backdrop!r}")
    names_t = _check_names(names)
    try:
        bucket = bucket_for_aspect(aspect if aspect is not None else DEFAULT_SCENE_ASPECT, size)
    except ValueError as exc:
        raise SceneError("aspect", str(exc)) from None
    # Portraits are reduced to a working size first (lossless at every bucket): a 40-megapixel photo is
    # composed from a quarter of its pixels. Paths, bytes and decoded images take the same geometry.
    portraits = (
        _as_rgb_image(left, "left_image", PORTRAIT_SHORT_SIDE),
        _as_rgb_image(right, "right_image", PORTRAIT_SHORT_SIDE),
    )
    if layout == "side_by_side":
        image, boxes = _side_by_side(portraits, bucket)
    else:
        image, boxes = _backdrop(portraits, bucket, backdrop)
    sizes = [p.size for p in portraits]
    logger.info("composed %s scene %dx%d from portraits %s", layout, bucket[1], bucket[0], sizes)
    return _build_scene(image, boxes, size=size, layout=layout, names=names_t)


# ----------------------------------------------------------------------------------------------------
# One composed image + boxes
# ----------------------------------------------------------------------------------------------------


def parse_boxes(boxes: Any) -> tuple[tuple[float, float, float, float], tuple[float, float, float, float]]:
    """Two boxes ``[y_min, x_min, y_max, x_max]`` from a list/tuple of two, a dict with keys
    ``person1``/``person2`` (upstream's ``bbox``), or JSON text of either."""
    allowed = (
        "give two boxes [y_min, x_min, y_max, x_max] in original image pixels, as [[...], [...]] or "
        '{"person1": [...], "person2": [...]}'
    )
    if isinstance(boxes, (str, bytes)):
        try:
            boxes = bounded_json(boxes, "boxes")
        except InputError as exc:
            raise SceneError("boxes", f"{exc.message}; {allowed}") from None
    if isinstance(boxes, Mapping):
        if set(boxes) != {"person1", "person2"}:
            raise SceneError(
                "boxes", f"keys must be exactly person1 and person2, got {sorted(boxes)}; {allowed}"
            )
        boxes = [boxes["person1"], boxes["person2"]]
    if not isinstance(boxes, Sequence) or isinstance(boxes, str) or len(boxes) != 2:
        raise SceneError("boxes", f"expected exactly two boxes; {allowed}")
    out = []
    for k, box in enumerate(boxes):
        if not isinstance(box, Sequence) or isinstance(box, str) or len(box) != 4:
            raise SceneError("boxes", f"box of person {k + 1} must be 4 numbers, got {box!r}; {allowed}")
        if any(isinstance(v, bool) or not isinstance(v, int | float | str) for v in box):
            raise SceneError("boxes", f"box of person {k + 1} must be 4 numbers, got {str(box)[:120]}")
        try:
            # Bounded before float(): a 400-digit integer would overflow, a 1e400 is not finite.
            vals = tuple(bounded_float(v, "boxes", -MAX_BOX_COORD, MAX_BOX_COORD) for v in box)
        except InputError:
            raise SceneError(
                "boxes",
                f"box of person {k + 1} must be 4 numbers, finite and within +-{MAX_BOX_COORD}; got {str(box)[:120]}",
            ) from None
        out.append(vals)
    return out[0], out[1]  # type: ignore[return-value]


def _area(b: Sequence[float]) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def box_overlap(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(IoU, intersection / smaller area)`` of two ``[y0, x0, y1, x1]`` boxes."""
    inter = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = _area(a) + _area(b) - inter
    smaller = min(_area(a), _area(b))
    return (inter / union if union > 0 else 0.0), (inter / smaller if smaller > 0 else 0.0)


def _validate_boxes(boxes: tuple[Sequence[float], Sequence[float]], h: int, w: int) -> tuple[Box, Box]:
    ints = []
    for k, box in enumerate(boxes):
        y0, x0, y1, x1 = (int(v) for v in box)  # upstream truncates with int()
        who = f"box of person {k + 1} {list(box)}"
        if min(y0, x0) < 0 or y1 > h or x1 > w:
            raise SceneError(
                "boxes",
                f"{who} lies outside the {w}x{h} image; boxes are [y_min, x_min, y_max, x_max] in original "
                f"pixels with 0 <= y_min < y_max <= {h} and 0 <= x_min < x_max <= {w}",
            )
        if y1 <= y0 or x1 <= x0:
            raise SceneError(
                "boxes",
                f"{who} is empty or inverted; need y_min < y_max and x_min < x_max "
                "(order [y_min, x_min, y_max, x_max])",
            )
        ints.append((y0, x0, y1, x1))
    iou, contain = box_overlap(ints[0], ints[1])
    if iou > MAX_IOU or contain > MAX_CONTAINMENT:
        raise SceneError(
            "boxes",
            f"the two boxes overlap too much to tell the speakers apart (IoU {iou:.2f}, {contain:.0%} of the "
            f"smaller box is shared); allowed: IoU <= {MAX_IOU} and at most {MAX_CONTAINMENT:.0%} of the "
            "smaller box inside the other",
        )
    return ints[0], ints[1]


def scene_from_image(
    image: Image.Image | str | Path | bytes,
    boxes: Any = None,
    *,
    size: int = 480,
    names: Sequence[str] = DEFAULT_NAMES,
    source_size: tuple[int, int] | None = None,
) -> Scene:
    """One composed image -> scene at the nearest bucket; ``boxes`` in upstream's bbox convention
    ``[y_min, x_min, y_max, x_max]`` in original pixels (after EXIF rotation), or ``None`` for the left
    and right halves with a 5 % margin. Boxes go through the same cover-resize + centre-crop as the image.

    ``source_size``: ``(width, height)`` of the original when ``image`` is a reduced copy of it
    (``load_image(..., min_short_side=...)``): the bucket, the boxes and the crop follow the original's
    geometry exactly; only the pixels come from the smaller copy.
    """
    size = _check_size(size)
    names_t = _check_names(names)
    src = _as_rgb_image(image, "scene_image")
    w, h = source_size if source_size is not None else (src.width, src.height)
    orig_boxes = _margin_boxes(h, w) if boxes is None else _validate_boxes(parse_boxes(boxes), h, w)
    bucket = nearest_bucket(h, w, size)
    if (w, h) == src.size:
        scene_img = resize_and_center_crop(src, bucket)
    else:
        scene_img = _cover_crop_reduced(src, (h, w), bucket)
    scene_boxes = []
    for k, box in enumerate(orig_boxes):
        tb = transform_box(box, (h, w), bucket)
        if tb[2] <= tb[0] or tb[3] <= tb[1]:
            raise SceneError(
                "boxes",
                f"box of person {k + 1} {list(box)} falls in the part of the image cropped away to fit the "
                f"{bucket[1]}x{bucket[0]} bucket; move it towards the centre",
            )
        scene_boxes.append(tb)
    return _build_scene(
        scene_img,
        (scene_boxes[0], scene_boxes[1]),
        size=size,
        layout="halves" if boxes is None else "given",
        names=names_t,
    )


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def _read_boxes_arg(value: str) -> Any:
    path = Path(value)
    if len(value) < 4096 and path.suffix == ".json" and path.is_file():
        return path.read_text()
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inference.scene",
        description="Compose a two-person MultiTalk reference scene and write reference.png, overlay.png, "
        "masks.npz and scene.json.",
    )
    src = parser.add_argument_group("input (either --left and --right, or --scene)")
    src.add_argument("--left", help="portrait of speaker 1 (placed on the left)")
    src.add_argument("--right", help="portrait of speaker 2 (placed on the right)")
    src.add_argument("--scene", help="one image that already shows both people")
    parser.add_argument(
        "--boxes",
        help="with --scene: JSON [[y0,x0,y1,x1],[y0,x0,y1,x1]] or {person1,person2}, or a .json file",
    )
    parser.add_argument("--layout", choices=LAYOUTS, default="side_by_side")
    parser.add_argument("--backdrop", choices=BACKDROPS, default="blur")
    parser.add_argument("--aspect", default=None, help="'W:H' or a bucket key such as 0.50 (default 16:9)")
    parser.add_argument("--size", type=int, choices=SUPPORTED_SIZES, default=480)
    parser.add_argument("--names", nargs=2, default=list(DEFAULT_NAMES), metavar=("NAME1", "NAME2"))
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)

    if args.scene is not None and (args.left or args.right):
        parser.error("give either --left/--right or --scene, not both")
    if args.scene is None and not (args.left and args.right):
        parser.error("give both --left and --right, or --scene")
    if args.boxes is not None and args.scene is None:
        parser.error("--boxes only applies with --scene")
    try:
        if args.scene is not None:
            boxes = None if args.boxes is None else _read_boxes_arg(args.boxes)
            scene = scene_from_image(args.scene, boxes, size=args.size, names=args.names)
        else:
            scene = compose_scene(
                args.left,
                args.right,
                layout=args.layout,
                size=args.size,
                backdrop=args.backdrop,
                aspect=args.aspect,
                names=args.names,
            )
        out = scene.save(args.out)
    except SceneError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"error: cannot write to {args.out!r}: {exc}\n")
        return 2
    sys.stdout.write(json.dumps({"out": str(out), **scene.to_json()}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
