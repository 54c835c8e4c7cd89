"""Turn one generate request (multipart form or upstream-style JSON) into a job for the store.

Everything a user sends is checked here, before a job exists: sizes, types, image and audio
decodability, box geometry, the dialogue script, voices and generation settings. Every problem is a
``RequestError`` naming the field and the rule, so the API can answer 4xx and never 500.

The result is a ``Submission``: ``spec`` (what to make), ``settings`` (the resolved
``GenerationSettings.to_dict()``, so ``GenerationSettings.from_dict(job.settings)`` rebuilds them) and
``files`` (plain fixed names such as ``left_image.png`` -> bytes).

Job spec (``kind == "dialogue"``, ``version == 1``)::

    layout:        "portraits" (images.left / images.right) | "scene" (images.scene)
    images:        {"left": "left_image.png", "right": "right_image.jpg"} | {"scene": "scene_image.png"}
    scene:         portraits: {layout: side_by_side|backdrop, backdrop, aspect, scene_boxes, bucket}
                   scene:     {layout: "scene", boxes: [[y0, x0, y1, x1], [..]] in original pixels or None,
                               scene_boxes, bucket}   (upstream bbox order: rows first)
    audio_source:  "tts":   script, voices [voice1, voice2], turns (count), speakers (names)
                   "files": audio {person1: "audio1.wav", person2: ...}, audio_mode add|para, audio_seconds
    prompt, preset, settings_overrides, source ("form" | "json")

The engine rebuilds the scene with ``inference.scene.compose_scene(left, right, layout=..., backdrop=...,
aspect=..., size=settings["resolution"])`` or ``scene_from_image(scene, boxes, size=...)``: the same
calls this module makes to validate, so a job that was accepted composes the same way.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import InputError
from inference.render.settings import DEFAULT_PROMPT  # the UI and API share it with the CLI

logger = logging.getLogger(__name__)

SPEC_VERSION = 1
AUDIO_MODES = ("add", "para")
DEFAULT_PRESET = "balanced"
_IMAGE_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}
_SF_AUDIO_EXT = {"WAV": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3"}
_DATA_URL_RE = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,"
)
_VOICE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Limits:
    """Request limits of the REST API (all configurable by the entry point).

    max_upload_bytes: largest single uploaded file (image or audio), after base64 decoding.
    max_request_bytes: largest whole request body (multipart or JSON, base64 included).
    max_script_chars / max_prompt_chars: text lengths.
    max_audio_seconds: longest uploaded audio track.
    Image size rules (formats, megapixels, short side) belong to ``inference.scene``.
    max_preview_chars: longest text for POST /api/tts/preview.
    max_list_limit: largest ``limit`` of GET /api/jobs.
    job_defaults: the service's start-up settings (``--sample_steps`` ...), applied over the preset and
        under the job's own settings.
    installed_voices: voice ids whose files this service has (None: every catalog voice); a voice that
        is in Kokoro's catalog but not installed is refused at submission, not when the job runs.
    """

    max_upload_bytes: int = 25 * 2**20
    max_request_bytes: int = 110 * 2**20
    max_script_chars: int = 5000
    max_prompt_chars: int = 2000
    max_audio_seconds: float = 600.0
    max_preview_chars: int = 500
    max_list_limit: int = 200
    installed_voices: frozenset[str] | None = None
    job_defaults: Mapping[str, Any] | None = None


class RequestError(InputError):
    """A bad request: ``field`` names the input, ``status`` is the HTTP status to answer."""

    status = 400


class PayloadTooLargeError(RequestError):
    """An upload over its size limit (HTTP 413)."""

    status = 413


@dataclass(frozen=True)
class GenerateRequest:
    """A generate request after transport decoding (form or JSON), before content validation."""

    left_image: bytes | None = None
    right_image: bytes | None = None
    scene_image: bytes | None = None
    boxes: Any = None
    script: str | None = None
    voice1: str | None = None
    voice2: str | None = None
    prompt: str | None = None
    preset: str | None = None
    settings: Any = None
    audio1: bytes | None = None
    audio2: bytes | None = None
    audio_mode: str | None = None
    layout: str | None = None
    backdrop: str | None = None
    aspect: str | None = None
    source: str = "form"


@dataclass(frozen=True)
class Submission:
    spec: dict[str, Any]
    settings: dict[str, Any]
    files: dict[str, bytes]


# ---------------------------------------------------------------------------------------------- form

FORM_FILE_FIELDS = ("left_image", "right_image", "scene_image", "audio1", "audio2")
FORM_TEXT_FIELDS = (
    "boxes",
    "script",
    "voice1",
    "voice2",
    "prompt",
    "preset",
    "settings",
    "audio_mode",
    "layout",
    "backdrop",
    "aspect",
)


def parse_json_field(field: str, text: str | None, expected: type | tuple[type, ...], what: str) -> Any:
    """Decode a JSON-valued form field (``boxes``, ``settings``); None/blank stays None."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(
            field, f"not valid JSON ({exc.msg} at position {exc.pos}); expected {what}"
        ) from None
    if not isinstance(value, expected):
        raise RequestError(field, f"expected {what}, got JSON {type(value).__name__}")
    return value


def request_from_form(
    text: Mapping[str, Any], files: Mapping[str, bytes], limits: Limits, *, source: str = "form"
) -> GenerateRequest:
    """Form fields (``FORM_TEXT_FIELDS`` -> str) and uploads (``FORM_FILE_FIELDS`` -> bytes) to a
    GenerateRequest; shared by the REST form and the Gradio UI. Blank text counts as not given."""
    allowed = ", ".join((*FORM_FILE_FIELDS, *FORM_TEXT_FIELDS))
    for key in text:
        if key in FORM_FILE_FIELDS:
            raise RequestError(key, "expected a file upload, got a text value")
        if key not in FORM_TEXT_FIELDS:
            raise RequestError(key, f"unknown form field; allowed: {allowed}")
    for key, data in files.items():
        if key in FORM_TEXT_FIELDS:
            raise RequestError(key, "expected a text value, got a file upload")
        if key not in FORM_FILE_FIELDS:
            raise RequestError(key, f"unknown form field; allowed: {allowed}")
        if not isinstance(data, bytes | bytearray):
            raise RequestError(key, f"expected file bytes, got {type(data).__name__}")
        if len(data) > limits.max_upload_bytes:
            raise PayloadTooLargeError(
                key, f"file is larger than the limit of {limits.max_upload_bytes} bytes"
            )
        if not data:
            raise RequestError(key, "the uploaded file is empty")

    def value(key: str) -> str | None:
        v = text.get(key)
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        if not isinstance(v, str):
            raise RequestError(key, f"expected text, got {type(v).__name__}")
        return v

    def upload(key: str) -> bytes | None:
        data = files.get(key)
        return None if data is None else bytes(data)

    return GenerateRequest(
        left_image=upload("left_image"),
        right_image=upload("right_image"),
        scene_image=upload("scene_image"),
        boxes=value("boxes"),
        script=value("script"),
        voice1=value("voice1"),
        voice2=value("voice2"),
        prompt=value("prompt"),
        preset=value("preset"),
        settings=parse_json_field("settings", value("settings"), dict, 'an object such as {"steps": 20}'),
        audio1=upload("audio1"),
        audio2=upload("audio2"),
        audio_mode=value("audio_mode"),
        layout=value("layout"),
        backdrop=value("backdrop"),
        aspect=value("aspect"),
        source=source,
    )


# ---------------------------------------------------------------------------------------------- JSON

JSON_KEYS = (
    "prompt",
    "cond_image",
    "cond_audio",
    "audio_type",
    "bbox",
    "tts_audio",
    "left_image",
    "right_image",
    "preset",
    "settings",
    "layout",
    "backdrop",
    "aspect",
)


def decode_data_url(field: str, value: Any, limits: Limits) -> bytes:
    """``data:<mime>;base64,<payload>`` -> bytes. Server paths and URLs are refused: the service never
    reads files named by a client and never fetches from the network."""
    if not isinstance(value, str):
        raise RequestError(field, f"expected a base64 data URL string, got {type(value).__name__}")
    m = _DATA_URL_RE.match(value)
    if m is None:
        if re.match(r"^[a-z][a-z0-9+.-]*://", value, re.IGNORECASE):
            raise RequestError(
                field,
                "URLs are not fetched (the service works offline); send the file as a "
                "base64 data URL: data:<mime>;base64,<bytes>",
            )
        raise RequestError(
            field,
            "server file paths are not accepted; send the file content as a base64 data "
            "URL: data:<mime>;base64,<bytes>",
        )
    if not m.group("b64"):
        raise RequestError(field, "data URL must be base64-encoded (data:<mime>;base64,...)")
    payload = value[m.end() :]
    # 4 base64 characters carry 3 bytes: refuse before decoding anything too large.
    if len(payload) // 4 * 3 > limits.max_upload_bytes + 3:
        raise PayloadTooLargeError(field, f"file is larger than the limit of {limits.max_upload_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "data URL payload is not valid base64") from None
    if not data:
        raise RequestError(field, "the file is empty")
    if len(data) > limits.max_upload_bytes:
        raise PayloadTooLargeError(field, f"file is larger than the limit of {limits.max_upload_bytes} bytes")
    return data


def _voice_from_upstream(field: str, value: Any) -> str | None:
    """Upstream names voices by path (``weights/Kokoro-82M/voices/af_heart.pt``): keep only the file stem,
    as an id; nothing is ever opened from the client's path."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(field, f"expected a voice id string, got {type(value).__name__}")
    stem = value.replace("\\", "/").rsplit("/", 1)[-1]
    if stem.endswith(".pt"):
        stem = stem[:-3]
    return stem


def from_upstream_json(body: Any, limits: Limits) -> GenerateRequest:
    """Map upstream MultiTalk's input JSON (plus ``left_image``/``right_image``/``preset``/``settings``)
    to a GenerateRequest. Images and audio must be base64 data URLs."""
    if not isinstance(body, dict):
        raise RequestError("body", f"expected a JSON object, got {type(body).__name__}")
    unknown = [k for k in body if k not in JSON_KEYS]
    if "cond_video" in unknown:
        raise RequestError(
            "cond_video", "video input (InfiniteTalk's cond_video) is not supported; send cond_image"
        )
    if unknown:
        raise RequestError(str(unknown[0]), f"unknown key; allowed keys: {', '.join(JSON_KEYS)}")

    def text(key: str) -> str | None:
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise RequestError(key, f"expected a string, got {type(value).__name__}")
        return value

    images = {
        k: decode_data_url(k, body[k], limits)
        for k in ("cond_image", "left_image", "right_image")
        if body.get(k) is not None
    }

    # bbox ({"person1": [...], "person2": [...]}) is checked by inference.scene with the image.
    boxes = body.get("bbox")

    script = voice1 = voice2 = None
    tts = body.get("tts_audio")
    if tts is not None:
        if not isinstance(tts, dict):
            raise RequestError(
                "tts_audio",
                f"expected an object {{text, human1_voice, human2_voice}}, got {type(tts).__name__}",
            )
        extra = [k for k in tts if k not in ("text", "human1_voice", "human2_voice")]
        if extra:
            raise RequestError(
                f"tts_audio.{extra[0]}", "unknown key; allowed: text, human1_voice, human2_voice"
            )
        if tts.get("text") in (None, ""):
            raise RequestError("tts_audio.text", "required: the dialogue script, e.g. '(s1) Hi! (s2) Hello.'")
        if not isinstance(tts["text"], str):
            raise RequestError("tts_audio.text", f"expected a string, got {type(tts['text']).__name__}")
        script = tts["text"]
        # Missing voices take the service defaults (tts.voices.DEFAULT_VOICES), like the form.
        voice1 = _voice_from_upstream("tts_audio.human1_voice", tts.get("human1_voice"))
        voice2 = _voice_from_upstream("tts_audio.human2_voice", tts.get("human2_voice"))

    audio1 = audio2 = None
    cond_audio = body.get("cond_audio")
    if cond_audio is not None:
        if not isinstance(cond_audio, dict):
            raise RequestError(
                "cond_audio", f"expected an object {{person1, person2}}, got {type(cond_audio).__name__}"
            )
        extra = [k for k in cond_audio if k not in ("person1", "person2")]
        if extra:
            raise RequestError(f"cond_audio.{extra[0]}", "unknown key; expected person1 and person2")
        if cond_audio and tts is not None:
            raise RequestError(
                "cond_audio",
                "give either tts_audio or cond_audio files, not both "
                "(cond_audio may be {} with tts_audio, as upstream)",
            )
        if cond_audio:
            for key in ("person1", "person2"):
                value = cond_audio.get(key)
                if value is None:
                    raise RequestError(
                        f"cond_audio.{key}", "required: this service makes two-person dialogues"
                    )
                if value == "None":
                    raise RequestError(
                        f"cond_audio.{key}",
                        "a silent person ('None') is not supported; send "
                        "two audio tracks, or a script with tts_audio",
                    )
            audio1 = decode_data_url("cond_audio.person1", cond_audio["person1"], limits)
            audio2 = decode_data_url("cond_audio.person2", cond_audio["person2"], limits)

    return GenerateRequest(
        left_image=images.get("left_image"),
        right_image=images.get("right_image"),
        scene_image=images.get("cond_image"),
        boxes=boxes,
        script=script,
        voice1=voice1,
        voice2=voice2,
        prompt=text("prompt"),
        preset=text("preset"),
        settings=body.get("settings"),
        audio1=audio1,
        audio2=audio2,
        audio_mode=text("audio_type"),
        layout=text("layout"),
        backdrop=text("backdrop"),
        aspect=text("aspect"),
        source="json",
    )


# ---------------------------------------------------------------------------------------------- content


def image_extension(data: bytes) -> str:
    """File extension for stored image bytes (the scene module has already accepted the format)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _IMAGE_EXT.get(im.format or "", "img")
    except Exception:  # only used for naming; decodability was checked by the scene module
        return "img"


def _decode_image(field: str, data: bytes) -> Any:
    """Decode one uploaded image with the scene module's rules. Any failure while decoding user bytes is
    the file's fault (a crafted or truncated file can raise more than ValueError inside a decoder)."""
    from inference.scene.compose import load_image

    try:
        return load_image(data, field)
    except ValueError as exc:
        raise RequestError(getattr(exc, "field", None) or field, message_of(exc)) from None
    except Exception as exc:
        logger.warning("%s: image decoder failed: %r", field, exc)
        raise RequestError(field, "the image could not be decoded (corrupt or truncated file)") from None


def build_scene(req: GenerateRequest, resolution: int) -> dict[str, Any]:
    """Compose/check the reference scene exactly as the engine will (``inference.scene``), so bad
    portraits, boxes or layouts are refused now. Returns the spec's scene part."""
    from inference.scene.compose import compose_scene, scene_from_image

    json_src = req.source == "json"
    json_names = {"scene_image": "cond_image", "boxes": "bbox"} if json_src else {}
    if req.scene_image is not None:
        for name in ("layout", "backdrop", "aspect"):
            if getattr(req, name) is not None:
                raise RequestError(name, "applies to two portraits only; a scene image keeps its own framing")
    elif req.boxes is not None:
        raise RequestError("bbox" if json_src else "boxes", "boxes apply to a scene image only; portraits are "
                           "placed automatically")  # fmt: skip
    try:
        if req.scene_image is not None:
            image = _decode_image("cond_image" if json_src else "scene_image", req.scene_image)
            scene = scene_from_image(image, req.boxes, size=resolution)
            boxes = None if req.boxes is None else _original_boxes(req.boxes)
            return {"layout": "scene", "boxes": boxes, "scene_boxes": [list(b) for b in scene.boxes],
                    "bucket": list(scene.bucket)}  # fmt: skip
        left = _decode_image("left_image", req.left_image)
        right = _decode_image("right_image", req.right_image)
        kwargs: dict[str, Any] = {"layout": req.layout or "side_by_side", "backdrop": req.backdrop or "blur"}
        if req.aspect is not None:
            kwargs["aspect"] = req.aspect
        scene = compose_scene(left, right, size=resolution, **kwargs)
        return {"layout": kwargs["layout"], "backdrop": kwargs["backdrop"], "aspect": req.aspect,
                "scene_boxes": [list(b) for b in scene.boxes], "bucket": list(scene.bucket)}  # fmt: skip
    except RequestError:
        raise
    except ValueError as exc:
        field = getattr(exc, "field", None) or (
            "scene_image" if req.scene_image is not None else "left_image"
        )
        raise RequestError(json_names.get(field, field), message_of(exc)) from None


def _original_boxes(boxes: Any) -> list[list[int]]:
    from inference.scene.compose import parse_boxes

    return [[int(v) for v in box] for box in parse_boxes(boxes)]


def audio_extension(field: str, data: bytes) -> str:
    """The file extension under which ``tts.user_audio`` decodes these bytes: wav/flac/ogg/mp3 when
    libsndfile reads them, else m4a (its loader hands m4a to FFmpeg, which sniffs the real container)."""
    import soundfile

    try:
        fmt = soundfile.info(io.BytesIO(data)).format
    except Exception:  # libsndfile refuses the container; FFmpeg may still read it
        fmt = None
    if fmt in _SF_AUDIO_EXT:
        return _SF_AUDIO_EXT[fmt]
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if container.streams.audio:
                return "m4a"
    except Exception:  # FFmpeg cannot open it either: not audio
        pass
    raise RequestError(field, "not a readable audio file; send WAV, FLAC, OGG, MP3 or M4A")


def check_audio(
    audio: tuple[bytes, bytes], mode: str, limits: Limits, names: tuple[str, str], mode_field: str
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Decode both recordings with the engine's own loader (``tts.user_audio.timeline_from_files``:
    decode, resample, loudness, silence and length rules), so a job that is accepted can be voiced.
    Returns the files to store and the spec's audio part."""
    from tts.user_audio import timeline_from_files

    files = {f"audio{i}.{audio_extension(name, data)}": data for i, (name, data) in
             enumerate(zip(names, audio, strict=True), start=1)}  # fmt: skip
    fields = {"audio1": names[0], "audio2": names[1], "audio_mode": mode_field}
    with tempfile.TemporaryDirectory(prefix="audio-check-") as tmp:
        paths = []
        for file_name, data in files.items():
            path = Path(tmp) / file_name
            path.write_bytes(data)
            paths.append(path)
        try:
            timeline = timeline_from_files(paths[0], paths[1], mode, max_seconds=limits.max_audio_seconds)
        except ValueError as exc:
            field = getattr(exc, "field", None) or names[0]
            raise RequestError(fields.get(field, field), message_of(exc)) from None
    seconds = {f"person{t.speaker + 1}": round(t.end - t.start, 3) for t in timeline.turns}
    spec = {"audio": {f"person{i}": n for i, n in enumerate(files, start=1)}, "audio_mode": mode,
            "audio_seconds": seconds}  # fmt: skip
    return files, spec


def message_of(exc: BaseException) -> str:
    """The exception text without a leading ``field:`` prefix (the API names the field separately)."""
    text = str(exc)
    field = getattr(exc, "field", None)
    if field and text.startswith(f"{field}:"):
        text = text[len(field) + 1 :].strip()
    return text


def _check_text(field: str, value: Any, max_chars: int, *, required: bool) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RequestError(field, "required")
        return None
    if not isinstance(value, str):
        raise RequestError(field, f"expected text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise RequestError(field, f"{len(value)} characters is too long; the limit is {max_chars}")
    if "\x00" in value:
        raise RequestError(field, "contains a NUL character")
    return value


def resolve_settings(
    preset: Any, overrides: Any, defaults: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(preset name, overrides, resolved settings dict) or RequestError naming the setting.

    Layers: the preset, then the service's start-up ``defaults`` (``--sample_steps`` ...), then the
    job's own ``overrides``. The stored settings are therefore exactly what the job renders with."""
    from inference.render.settings import PRESETS

    name = DEFAULT_PRESET if preset is None or preset == "" else preset
    if not isinstance(name, str) or name not in PRESETS:
        raise RequestError("preset", f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise RequestError("settings", f"expected a JSON object of settings, got {type(overrides).__name__}")
    try:
        resolved = PRESETS[name].apply({**(defaults or {}), **overrides})
    except ValueError as exc:
        field = getattr(exc, "field", None) or "settings"
        raise RequestError(field if field == "settings" else f"settings.{field}", message_of(exc)) from None
    # A random seed (negative) is drawn here, once: the stored job then always renders the same video,
    # also when a restart re-runs it and it resumes after its last finished clip.
    return name, dict(overrides), resolved.with_resolved_seed().to_dict()


def check_voice(
    field: str, voice_id: Any, default: str | None = None, installed: frozenset[str] | None = None
) -> str:
    """A known (and, when ``installed`` is given, installed) voice id, ``default`` when none was given;
    RequestError otherwise."""
    from tts.voices import get_voice

    if voice_id is None or voice_id == "":
        if default is None:
            raise RequestError(field, "required: a voice id (GET /api/voices lists them)")
        voice_id = default
    if not isinstance(voice_id, str) or not _VOICE_ID_RE.fullmatch(voice_id):
        raise RequestError(field, f"{str(voice_id)[:80]!r} is not a voice id (GET /api/voices lists them)")
    try:
        get_voice(voice_id)
    except ValueError as exc:
        raise RequestError(field, message_of(exc)) from None
    if installed is not None and voice_id not in installed:
        have = ", ".join(sorted(installed)) or "none"
        raise RequestError(field, f"voice {voice_id!r} is not installed on this service; installed: {have}")
    return voice_id


def check_script(text: str, limits: Limits) -> dict[str, Any]:
    """Parse the dialogue script with the service's length limit; returns the spec's script summary
    (turn count, speaker names). Errors name the line."""
    from dialogue import ScriptLimits, parse_script

    try:
        dialogue = parse_script(text, ScriptLimits(max_chars=limits.max_script_chars))
    except ValueError as exc:
        line = getattr(exc, "line", None)
        msg = getattr(exc, "message", None) or message_of(exc)
        if line is not None:
            msg = f"line {line}: {msg}"
        raise RequestError("script", msg) from None
    return {"turns": len(dialogue.turns), "speakers": [s.name for s in dialogue.speakers]}


def validate_generate(req: GenerateRequest, limits: Limits) -> Submission:
    """Check every part of a generate request; returns the job to submit or raises RequestError.

    Cheap checks run first (settings, texts, voices, script), then image composition and audio decoding.
    """
    json_src = req.source == "json"
    spec: dict[str, Any] = {"kind": "dialogue", "version": SPEC_VERSION, "source": req.source}
    files: dict[str, bytes] = {}

    preset, overrides, settings = resolve_settings(req.preset, req.settings, limits.job_defaults)
    prompt = _check_text("prompt", req.prompt, limits.max_prompt_chars, required=False)

    # -- speech: a script with two voices, or two audio tracks
    has_audio = req.audio1 is not None or req.audio2 is not None
    script = _check_text("script", req.script, limits.max_script_chars, required=False)
    audio_names = ("cond_audio.person1", "cond_audio.person2") if json_src else ("audio1", "audio2")
    mode_field = "audio_type" if json_src else "audio_mode"
    if has_audio and script is not None:
        raise RequestError("script", "give either a script (spoken by TTS) or two audio files, not both")
    if has_audio:
        for name, data in zip(audio_names, (req.audio1, req.audio2), strict=True):
            if data is None:
                raise RequestError(name, "required: one audio track per person (two in total)")
        mode = req.audio_mode if req.audio_mode not in (None, "") else "add"
        if mode not in AUDIO_MODES:
            raise RequestError(
                mode_field,
                f"unknown value {str(mode)[:40]!r}; allowed: 'add' (person 1 speaks, then person 2) or 'para' "
                "(both tracks play at once, as given)",
            )
        if req.voice1 is not None or req.voice2 is not None:
            raise RequestError("voice1" if req.voice1 is not None else "voice2",
                               "voices apply to a script only; uploaded audio is used as it is")  # fmt: skip
    else:
        if script is None:
            raise RequestError(
                "tts_audio" if json_src else "script",
                "required: a dialogue script (with voices for both speakers) or two audio files",
            )
        # Upstream ignores audio_type in TTS mode (its TTS tracks are sequential), so its JSON files may
        # carry one; a form field that cannot apply is refused instead.
        if req.audio_mode not in (None, "") and not json_src:
            raise RequestError("audio_mode", "applies to uploaded audio files only")
        from tts.voices import DEFAULT_VOICES

        installed = limits.installed_voices
        v1 = check_voice(
            "tts_audio.human1_voice" if json_src else "voice1", req.voice1, DEFAULT_VOICES[0], installed
        )
        v2 = check_voice(
            "tts_audio.human2_voice" if json_src else "voice2", req.voice2, DEFAULT_VOICES[1], installed
        )
        summary = check_script(script, limits)
        spec.update(
            audio_source="tts", script=script, voices=[v1, v2], audio=None, audio_mode=None, **summary
        )

    # -- pictures: two portraits, or one scene (+ optional boxes)
    portraits = req.left_image is not None or req.right_image is not None
    scene_field = "cond_image" if json_src else "scene_image"
    if portraits and req.scene_image is not None:
        raise RequestError(scene_field, "give either two portraits (left_image, right_image) or one scene image, "
                           "not both")  # fmt: skip
    if portraits:
        for field in ("left_image", "right_image"):
            if getattr(req, field) is None:
                raise RequestError(
                    field, f"required with the other portrait (two portraits, or one {scene_field})"
                )
    elif req.scene_image is None:
        raise RequestError(
            scene_field if json_src else "left_image",
            f"required: two portraits (left_image and right_image) or one scene image ({scene_field})",
        )
    scene = build_scene(req, settings["resolution"])
    if portraits:
        images = {}
        for field, side in (("left_image", "left"), ("right_image", "right")):
            data = getattr(req, field)
            name = f"{field}.{image_extension(data)}"
            files[name] = data
            images[side] = name
    else:
        name = f"scene_image.{image_extension(req.scene_image)}"
        files[name] = req.scene_image
        images = {"scene": name}
    spec.update(layout="portraits" if portraits else "scene", images=images, scene=scene)

    if has_audio:
        audio_files, audio_spec = check_audio((req.audio1, req.audio2), mode, limits, audio_names, mode_field)
        files.update(audio_files)
        spec.update(audio_source="files", script=None, voices=None, **audio_spec)

    spec.update(
        prompt=prompt if prompt is not None else DEFAULT_PROMPT, preset=preset, settings_overrides=overrides
    )
    return Submission(spec=spec, settings=settings, files=files)
