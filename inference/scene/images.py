"""Loading user images for the scene: format, size and memory rules before any pixel is decoded.

Accepted images: JPEG, PNG or WebP, short side >= 256 px, at most 40 megapixels, long side at most
4x the short side (the bucket tables end at 1:4 and 4:1). Dimensions come from the header, so an
oversized or decompression-bomb file is refused unread. EXIF orientation is applied on load.

Memory: pixels are converted to 8-bit RGB in row strips (16-bit or float greyscale never becomes a
float64 copy, transparency is flattened strip by strip), and a caller that gives a working size
(``min_short_side``) gets the image reduced by a power of two while loading (a JPEG decodes at that
scale directly), so a 40-megapixel photo costs one decoded copy at most, and a reduced one after.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import InputError
from inference.scene.buckets import cover_crop

MIN_SHORT_SIDE = 256
MAX_PIXELS = 40_000_000
MAX_ASPECT = 4.0  # long side / short side; the bucket tables end at 1:4 and 4:1
# Pillow format name -> name shown to users.
ALLOWED_FORMATS: dict[str, str] = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}
# Greyscale modes wider than 8 bits, pixels per row strip when converting to 8-bit RGB, the EXIF
# orientation tag.
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_STRIP_PIXELS = 1 << 20
_EXIF_ORIENTATION = 0x0112
# Working size of a portrait: no bucket side is longer than 2048 px (720, 0.22), so a portrait whose
# short side stays at least this long loses nothing when it is reduced before composing.
PORTRAIT_SHORT_SIDE = 2048


class SceneError(InputError):
    """Bad scene input. ``field`` names the input ("left_image", "right_image", "scene_image", "boxes",
    "layout", "size", "aspect", "backdrop", "names")."""


def _allowed_text() -> str:
    return (
        f"allowed: {', '.join(ALLOWED_FORMATS.values())} images with a short side of at least "
        f"{MIN_SHORT_SIDE} px, at most {MAX_PIXELS // 1_000_000} megapixels and an aspect ratio between "
        f"1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1"
    )


def _check_dimensions(width: int, height: int, field: str, what: str) -> None:
    if width * height > MAX_PIXELS:
        raise SceneError(
            field,
            f"{what} is {width}x{height} ({width * height / 1e6:.1f} megapixels), larger than "
            f"{MAX_PIXELS // 1_000_000} megapixels; {_allowed_text()}",
        )
    if min(width, height) < MIN_SHORT_SIDE:
        raise SceneError(
            field,
            f"{what} is {width}x{height}, its short side is under {MIN_SHORT_SIDE} px; {_allowed_text()}",
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise SceneError(
            field,
            f"{what} is {width}x{height}, its long side is more than {MAX_ASPECT:g} times its short side; "
            f"{_allowed_text()}",
        )


def _to_rgb(img: Image.Image, grey_top: float | None = None) -> Image.Image:
    """Any Pillow mode -> RGB, 8 bits per channel; transparency is composited over white (what a viewer
    would show). Greyscale wider than 8 bits is scaled from 0..``grey_top`` (default: 0..65535 for 16-bit
    data above 255, else 0..max), never through a float64 copy; Pillow's own convert would clip at 255."""
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_GREY_MODES:
        top = _grey_top(img) if grey_top is None else grey_top
        arr = np.asarray(img, dtype=np.float32)
        np.clip(arr * np.float32(255.0 / top) + np.float32(0.5), 0, 255, out=arr)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _grey_top(img: Image.Image) -> float:
    top = float(img.getextrema()[1])
    return 65535.0 if img.mode.startswith("I;16") and top > 255 else max(top, 1.0)


def reduction_factor(width: int, height: int, min_short_side: int | None) -> int:
    """Largest power of two ``k`` that keeps the short side at least ``min_short_side`` after an integer
    ``k``-fold reduction (``ceil(side / k)``); 1 when ``min_short_side`` is None or nothing can go."""
    k = 1
    if min_short_side:
        short = min(width, height)
        while short // (2 * k) >= min_short_side:
            k *= 2
    return k


def _rgb_reduced(img: Image.Image, k: int) -> Image.Image:
    """8-bit RGB at ``ceil(W / k) x ceil(H / k)`` (box average), converted and reduced in row strips, so
    the only full-size buffers are the decoded source and the (reduced) result."""
    if img.mode == "RGB" and k == 1:
        return img
    w, h = img.size
    grey_top = _grey_top(img) if img.mode in _WIDE_GREY_MODES else None
    out = Image.new("RGB", (math.ceil(w / k), math.ceil(h / k)))
    rows = max(1, _STRIP_PIXELS // max(w, 1) // k) * k  # a multiple of k: boxes never straddle strips
    for y in range(0, h, rows):
        strip = _to_rgb(img.crop((0, y, w, min(h, y + rows))), grey_top)
        out.paste(strip.reduce(k) if k > 1 else strip, (0, y // k))
    return out


def load_image(source: str | Path | bytes, field: str, *, min_short_side: int | None = None) -> Image.Image:
    """Read a JPEG/PNG/WebP image as 8-bit RGB with its EXIF orientation applied.

    Dimensions are checked from the header before the pixels are decoded, so an oversized or
    decompression-bomb file is refused cheaply. ``min_short_side``: a working size; a larger image is
    reduced by the largest power of two that keeps its short side at least this long (a JPEG decodes at
    that scale directly), so only the first full-size decode of a PNG/WebP is ever held.
    Raises :class:`SceneError` with ``field``.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise SceneError(field, f"the uploaded image is empty (0 bytes); {_allowed_text()}")
        what = "the uploaded image"
        opener: Callable[[], Any] = lambda: io.BytesIO(data)  # noqa: E731
    elif isinstance(source, (str, Path)):
        path = Path(source)
        what = f"image {path.name!r}"
        if not path.is_file():
            raise SceneError(field, f"image file not found: {str(path)!r}")
        opener = lambda: path.open("rb")  # noqa: E731
    else:
        raise SceneError(field, f"expected a file path or image bytes, got {type(source).__name__}")

    try:
        fp = opener()
    except OSError as exc:
        raise SceneError(field, f"cannot read {what}: {exc.strerror or exc}") from None
    with fp, warnings.catch_warnings():
        # Pillow only warns between 89 and 179 megapixels; treat that as the error it is here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp, formats=list(ALLOWED_FORMATS))
        except UnidentifiedImageError:
            raise SceneError(
                field, f"{what} is not a supported image ({_detect_format(opener)}); {_allowed_text()}"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise SceneError(field, f"{what} declares too many pixels; {_allowed_text()}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise SceneError(field, f"{what} is unreadable or corrupt ({exc}); {_allowed_text()}") from None
        width, height = img.size
        _check_dimensions(width, height, field, what)
        k = reduction_factor(width, height, min_short_side)
        try:
            if k > 1 and img.format == "JPEG":
                img.draft(img.mode, (math.ceil(width / k), math.ceil(height / k)))  # DCT-domain scaling
            img.load()  # the first frame of an animated PNG/WebP is the portrait
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            # What the decoder did not already reduce (a draft scale is a power of two <= 8).
            decoded = 1 if img.width == width else round(width / img.width)
            img = _rgb_reduced(img, k // decoded)
            if orientation not in (None, 1):
                img.getexif()[_EXIF_ORIENTATION] = orientation
                ImageOps.exif_transpose(img, in_place=True)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise SceneError(field, f"{what} is unreadable or corrupt ({exc}); {_allowed_text()}") from None
    return img


def _detect_format(opener: Callable[[], Any]) -> str:
    """Name the real format of a refused file, for the error message."""
    try:
        with opener() as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(fp) as other:
                return f"it is {other.format}"
    except Exception:  # any failure here only means "not an image we know"
        return "unrecognised or corrupt data"


def _as_rgb_image(
    image: Image.Image | str | Path | bytes, field: str, min_short_side: int | None = None
) -> Image.Image:
    if isinstance(image, Image.Image):
        _check_dimensions(image.width, image.height, field, "the image")
        return _rgb_reduced(image, reduction_factor(image.width, image.height, min_short_side))
    return load_image(image, field, min_short_side=min_short_side)


def image_size(source: str | Path | bytes, field: str) -> tuple[int, int]:
    """``(width, height)`` as displayed (EXIF rotation applied), from the header only."""
    target = io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray) else Path(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(target, formats=list(ALLOWED_FORMATS)) as img:
                w, h = img.size
                swapped = img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception as exc:  # load_image names the problem; here only the size is wanted
        raise SceneError(field, f"cannot read the image size ({exc})") from None
    return (h, w) if swapped else (w, h)


def _cover_crop_reduced(
    img: Image.Image, source_hw: tuple[int, int], target_hw: tuple[int, int]
) -> Image.Image:
    """``resize_and_center_crop`` of the original (``source_hw``) computed from ``img``, a reduced copy
    of it: the original's crop window, mapped into the copy's pixels, resampled straight to the bucket."""
    geo = cover_crop(source_hw, target_hw)
    (rh, rw), (th, tw) = geo.resized, geo.target
    sx, sy = img.width / rw, img.height / rh  # copy pixels per pixel of the resized original
    box = (geo.left * sx, geo.top * sy, (geo.left + tw) * sx, (geo.top + th) * sy)
    return img.resize((tw, th), resample=Image.Resampling.BILINEAR, box=box)
