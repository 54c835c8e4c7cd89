"""Uploads are checked where they enter: each image and recording gets our own sentence naming the
field and what is allowed (never the framework's error), and the sentence goes away with the file.

:func:`checked_image` is the stock image upload whose server side never raises: Gradio's own image
preprocessing opens every upload with Pillow and turns a non-image (a WAV renamed ``.png``) into an
internal error with component indexes and temp paths; here the raw path is handed on to
:func:`image_message`, which answers with the scene module's rules (the ones the submission applies).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from inference.scene.compose import load_image
from service.ui.form import AUDIO_FORMATS_TEXT, IMAGE_FORMATS_TEXT
from service.ui.formatting import error_md
from service.validation import Limits, RequestError, audio_extension
from tts.user_audio import SAMPLE_RATE, load_audio

logger = logging.getLogger(__name__)

_AUDIO_CACHE_SIZE = 32
IMAGE_RULES = f"Upload a {IMAGE_FORMATS_TEXT} photo with a short side of at least 256 px"


def checked_image(**kwargs: Any) -> gr.Image:
    """``gr.Image(**kwargs)`` whose server-side preprocessing hands a file it cannot open to the page's own
    check (:func:`image_message`) instead of failing the event with the framework's error.

    The override sits on the instance: a ``gr.Image`` subclass would make Gradio write a ``.pyi`` stub
    beside this module at import time."""
    image = gr.Image(**kwargs)
    stock = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return stock(payload)
        except Exception as exc:  # Pillow refused the bytes: our check names the field and the rule
            path = getattr(payload, "path", None)
            logger.info("image upload %s is not an image (%s); the page explains", path, type(exc).__name__)
            return str(path) if path else None

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def sniff_kind(head: bytes) -> str | None:
    """What a file that is no picture really is, from its first bytes (None: unknown, or a picture)."""
    for magic, kind in _NOT_IMAGES:
        if head.startswith(magic):
            return kind
    if head[4:8] == b"ftyp":
        return "an MP4/M4A/MOV file"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "WAV audio"
    return None


_NOT_IMAGES: tuple[tuple[bytes, str], ...] = (
    (b"ID3", "MP3 audio"),
    (b"\xff\xfb", "MP3 audio"),
    (b"\xff\xf3", "MP3 audio"),
    (b"fLaC", "FLAC audio"),
    (b"OggS", "Ogg audio"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
    (b"\x1aE\xdf\xa3", "a WebM/MKV video"),
)


def image_message(path: str | None, field: str) -> str:
    """Empty for a usable image (or none), else the Markdown sentence naming ``field`` and what is allowed:
    a file that is something else (a WAV renamed .png) is named for what it is."""
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            kind = sniff_kind(fh.read(16))
    except OSError as exc:
        return error_md(RequestError(field, f"the upload could not be read ({exc.strerror or exc})"))
    if kind is not None:
        return error_md(
            RequestError(field, f"'{Path(path).name}' is not a picture but {kind}. {IMAGE_RULES}.")
        )
    try:
        load_image(path, field)
    except ValueError as exc:
        return error_md(exc, field)
    except Exception as exc:  # a decoder can fail in more ways than ValueError on crafted bytes
        logger.warning("%s: image check failed: %r", field, exc)
        return error_md(RequestError(field, "the image could not be decoded (corrupt or truncated file)"))
    return ""


class AudioLengths:
    """Length of uploaded recordings, decoded as a job decodes them; cached by (path, size, mtime)
    because the estimate asks again on every settings change."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._cache: dict[tuple[str, int, int], float] = {}

    def seconds(self, path: str, field: str) -> float:
        """Seconds of speech in one upload (``tts.user_audio.load_audio`` after the submission's format
        sniffing); raises InputError naming ``field`` for a file that is too large, empty, not audio,
        corrupt, silent or too long."""
        src = Path(path)
        stat = src.stat()
        if stat.st_size == 0:
            raise RequestError(field, "the file is empty")
        if stat.st_size > self.limits.max_upload_bytes:
            raise RequestError(
                field, f"the file is larger than the limit of {self.limits.max_upload_bytes / 2**20:g} MiB"
            )
        key = (str(src.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in self._cache:
            return self._cache[key]
        data = src.read_bytes()
        ext = audio_extension(field, data)
        max_s = self.limits.max_audio_seconds
        try:
            if src.suffix.lower() == f".{ext}":
                samples = load_audio(src, field, max_seconds=max_s)
            else:  # the loader picks its decoder by extension: name the copy as the submission will
                with tempfile.TemporaryDirectory(prefix="ui-audio-") as tmp:
                    copy = Path(tmp) / f"{field}.{ext}"
                    copy.write_bytes(data)
                    samples = load_audio(copy, field, max_seconds=max_s)
        except ValueError:
            raise
        except Exception as exc:  # a decoder can fail in more ways than ValueError on crafted bytes
            logger.warning("%s: audio check failed: %r", field, exc)
            raise RequestError(
                field, "the file could not be decoded as audio (corrupt or truncated)"
            ) from None
        seconds = samples.size / SAMPLE_RATE
        if len(self._cache) >= _AUDIO_CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = seconds
        return seconds


# The page's upload boxes by element id: the form field each one fills and what it takes.
UPLOAD_BOXES = {
    "left-portrait": ("left_image", "image"),
    "right-portrait": ("right_image", "image"),
    "scene-image": ("scene_image", "image"),
    "single-image": ("single_image", "image"),
    "audio1": ("audio1", "audio"),
    "audio2": ("audio2", "audio"),
}


def refused_upload(data: Any) -> tuple[str | None, str]:
    """The browser held back a file of the wrong type (``{"id", "name", "type"}`` from the page's upload
    guard): (the field it was meant for, our sentence naming the field and what is allowed)."""
    try:
        field, kind = UPLOAD_BOXES[str(data["id"])]
    except (KeyError, TypeError):
        return None, ""
    name = str(data.get("name") or "the file")[:120]
    mime = str(data.get("type") or "")[:80]
    what = f"a file of type {mime}" if mime else "a file of unknown type"
    if kind == "image":
        message = f"'{name}' is not a picture but {what}. {IMAGE_RULES}."
    else:
        message = f"'{name}' is not a recording but {what}. Upload {AUDIO_FORMATS_TEXT} audio."
    return field, error_md(RequestError(field, message))
