"""Accepting a job: ``JobInput`` (bytes and texts) -> ``Submission`` (a ``JobSpec``, its settings, its files).

Used by REST, the UI and the CLI alike, before anything is stored and before any model loads: sizes of
texts, image decodability and scene composition (``inference.scene``, the same calls the renderer makes),
audio decodability and length (``tts.user_audio``, the renderer's own loader), the script (parsed once,
here), voices (known and installed) and settings. Every problem is a ``JobInputError`` naming the field
as the client sent it.

People. A job has two people when anything in it names a second person (a right portrait, a scene with
boxes, a second recording, a second voice, a line for speaker 2) and one person otherwise; every part
must then fit that count. One person: one image (``image``, or ``left_image`` / ``scene_image`` alone),
one recording or a script whose lines are all speaker 1's, one voice. Two people: two portraits or one
scene, two recordings or a script with lines for both speakers, two voices (defaults:
``tts.voices.DEFAULT_VOICES``).
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import soundfile
from PIL import Image

from common.errors import InputError
from inference.render.length import check_speech_length, estimate_speech_seconds, recordings_seconds
from inference.render.settings import PRESETS, LoraState, offered_presets
from inference.render.spec import (
    AUDIO_MODES,
    PERSONS,
    JobInput,
    JobInputError,
    JobSpec,
    SceneSpec,
    default_prompt,
    parse_dialogue,
    speaking,
)
from inference.scene.compose import (
    PORTRAIT_SHORT_SIDE,
    compose_scene,
    image_size,
    load_image,
    parse_boxes,
    scene_from_image,
)
from inference.scene.single import single_scene
from tts.user_audio import timeline_from_files
from tts.voices import DEFAULT_VOICES, get_voice

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "balanced"
_IMAGE_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}
_SF_AUDIO_EXT = {"WAV": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3"}
_VOICE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True)
class Limits:
    """What one job may ask for (configurable by the entry point).

    max_upload_bytes: largest single file (image or audio), after base64 decoding.
    max_request_bytes: largest whole request body (multipart or JSON, base64 included).
    max_script_chars / max_prompt_chars: text lengths.
    max_audio_seconds: longest uploaded audio track.
    Image size rules (formats, megapixels, short side) belong to ``inference.scene``.
    max_preview_chars: longest text for POST /api/tts/preview.
    max_list_limit: largest ``limit`` of GET /api/jobs.
    job_defaults: the service's start-up settings (``--sample_steps`` ...), applied over the preset and
        under the job's own settings.
    installed_voices: voice ids whose files this service has (None: every catalog voice); a voice that
        is in Kokoro's catalog but not installed is refused when the job is accepted, not when it runs.
    lora: the service's LoRAs (``--lora_dir``, ``--lora_mode``): which presets it offers, what they
        resolve to, and whether a job's ``lora`` setting can be honoured.
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
    lora: LoraState = LoraState()


@dataclass(frozen=True)
class Submission:
    """An accepted job: what to make, the resolved settings (``GenerationSettings.to_dict()``, seed
    drawn) and the input files under their stored names (``left_image.png`` -> bytes)."""

    spec: JobSpec
    settings: dict[str, Any]
    files: dict[str, bytes]


def build_job(req: JobInput, limits: Limits) -> Submission:
    """Check every part of ``req``; returns the job to store or raises JobInputError.

    Cheap checks run first (settings, texts, script, the people count, voices), then image composition
    and audio decoding.
    """
    n = req.name
    preset, overrides, settings = resolve_settings(req.preset, req.settings, limits.job_defaults, limits.lora)
    prompt = check_text(n("prompt"), req.prompt, limits.max_prompt_chars, required=False)

    # -- speech: a script (TTS) or recordings
    has_audio = req.audio1 is not None or req.audio2 is not None
    script = check_text(n("script"), req.script, limits.max_script_chars, required=False)
    dialogue = None
    if has_audio:
        if script is not None:
            raise JobInputError(n("script"), "give either a script (spoken by TTS) or audio files, not both")
        if req.audio1 is None:
            raise JobInputError(n("audio1"), "required: the recording of person 1 (left)")
        if req.voice1 is not None or req.voice2 is not None:
            raise JobInputError(n("voice1") if req.voice1 is not None else n("voice2"),
                                "voices apply to a script only; uploaded audio is used as it is")  # fmt: skip
        mode = req.audio_mode if req.audio_mode not in (None, "") else "add"
        if mode not in AUDIO_MODES:
            raise JobInputError(
                n("audio_mode"),
                f"unknown value {str(mode)[:40]!r}; allowed: 'add' (person 1 speaks, then person 2) or 'para' "
                "(both tracks play at once, as given)",
            )
    else:
        if script is None:
            raise JobInputError(
                n("speech"), "required: a dialogue script (with a voice per speaker) or audio files"
            )
        # Upstream ignores audio_type in TTS mode (its TTS tracks are sequential), so its JSON files may
        # carry one; a form field that cannot apply is refused instead.
        if req.audio_mode not in (None, "") and req.source == "form":
            raise JobInputError("audio_mode", "applies to uploaded audio files only")
        dialogue = parse_dialogue(n("script"), script, limits.max_script_chars)

    people = _people(req, dialogue)
    voices = _voices(req, people, limits.installed_voices) if dialogue is not None else None
    if dialogue is not None:
        _check_speakers(req, dialogue, people)
        _check_length(estimate_speech_seconds(dialogue), settings, n("script"), "estimated from the script")

    # -- pictures
    files: dict[str, bytes] = {}
    layout, images, scene = _pictures(req, people, settings["resolution"], files)

    # -- recordings (decoded last: the slowest check)
    audio = audio_mode = audio_seconds = None
    if has_audio:
        if people == 2 and req.audio2 is None:
            raise JobInputError(n("audio2"), "required: the picture has two people, so give a recording for "
                                "each (or one image for a one-person video)")  # fmt: skip
        recordings = (req.audio1, req.audio2)[:people]
        audio, audio_seconds = check_audio(req, recordings, mode, limits, files)  # type: ignore[arg-type]
        audio_mode = mode
        _check_length(recordings_seconds(audio_seconds, mode), settings, n("audio1"), "the recordings")

    spec = JobSpec(
        people=people,
        layout=layout,
        images=images,
        scene=scene,
        audio_source="files" if has_audio else "tts",
        prompt=prompt if prompt is not None else default_prompt(people),
        preset=preset,
        settings_overrides=overrides,
        source=req.source,
        script=script,
        dialogue=dialogue,
        voices=voices,
        audio=audio,
        audio_mode=audio_mode,
        audio_seconds=audio_seconds,
    )
    return Submission(spec=spec, settings=settings, files=files)


# ---------------------------------------------------------------------------------------------- people


def _people(req: JobInput, dialogue: Any) -> int:
    """2 when anything names a second person, else 1; ``image`` (the one-person picture) with any of
    those is refused, naming the second-person input."""
    second = [
        (req.right_image is not None, "right_image", "give either one image (one person) or two portraits"),
        (
            req.boxes is not None,
            "boxes",
            "boxes place two people in a scene image; one person fills the frame",
        ),
        (req.audio2 is not None, "audio2", "a one-person job takes one recording"),
        (req.voice2 is not None, "voice2", "a one-person job speaks with one voice"),
    ]
    if dialogue is not None and 1 in speaking(dialogue):
        line = next(t.line for t in dialogue.turns if t.speaker == 1)
        second.append((True, "script", f"line {line} is spoken by speaker 2; a one-person script has lines "
                       "for speaker 1 only"))  # fmt: skip
    named = [(field, why) for given, field, why in second if given]
    if req.image is not None:
        if req.left_image is not None or req.scene_image is not None:
            other = "left_image" if req.left_image is not None else "scene_image"
            raise JobInputError(req.name(other), "give either one image (image, one person) or the pictures "
                                "of two people, not both")  # fmt: skip
        if named:
            field, why = named[0]
            raise JobInputError(req.name(field), f"this is a one-person job (one image): {why}")
    return 2 if named else 1


def _check_speakers(req: JobInput, dialogue: Any, people: int) -> None:
    """A two-person job needs lines for both speakers; a one-person job only speaker 1's."""
    have = speaking(dialogue)
    if people == 2 and have != {0, 1}:
        missing = 2 if 1 not in have else 1
        raise JobInputError(
            req.name("script"),
            f"the job has two people but only speaker {3 - missing} has lines; give speaker {missing} at "
            "least one line, or use one image for a one-person video",
        )


def _check_length(seconds: float, settings: dict[str, Any], field: str, source: str) -> None:
    """Speech longer than the job's length cap is refused here, with the figures, never cut later."""
    try:
        check_speech_length(seconds, settings, field=field, source=source)
    except InputError as exc:
        raise JobInputError(exc.field, exc.message) from None


def _voices(req: JobInput, people: int, installed: frozenset[str] | None) -> tuple[str, ...]:
    v1 = check_voice(req.name("voice1"), req.voice1, DEFAULT_VOICES[0], installed)
    if people == 1:
        return (v1,)
    return v1, check_voice(req.name("voice2"), req.voice2, DEFAULT_VOICES[1], installed)


# ---------------------------------------------------------------------------------------------- pictures


def _pictures(
    req: JobInput, people: int, resolution: int, files: dict[str, bytes]
) -> tuple[str, dict[str, str], SceneSpec]:
    """Check the pictures against ``people`` and compose the scene as the renderer will; the image
    files are added to ``files``. Returns (layout, images, scene)."""
    n = req.name
    portraits = req.left_image is not None or req.right_image is not None
    if people == 1:
        given = [
            (f, getattr(req, f))
            for f in ("image", "left_image", "scene_image")
            if getattr(req, f) is not None
        ]
        if not given:
            raise JobInputError(n("picture"), "required: one image of the person (image), or two portraits "
                                "(left_image and right_image) or one scene image for two people")  # fmt: skip
        if len(given) > 1:
            raise JobInputError(n(given[1][0]), f"give one image for a one-person job, not {given[0][0]} too")
        field, data = given[0]
        for name in ("layout", "backdrop", "aspect"):
            if getattr(req, name) is not None:
                raise JobInputError(
                    name, "applies to two portraits only; a single image keeps its own framing"
                )
        scene = _scene_call(req, lambda: single_scene(decode_image(n(field), data), size=resolution,
                                                          field=n(field)))  # fmt: skip
        name = f"image.{image_extension(data)}"
        files[name] = data
        return "single", {"image": name}, SceneSpec(layout="single", bucket=scene.bucket,
                                                    scene_boxes=tuple(scene.boxes))  # fmt: skip

    if portraits and req.scene_image is not None:
        raise JobInputError(n("scene_image"), "give either two portraits (left_image, right_image) or one scene "
                            "image, not both")  # fmt: skip
    if portraits:
        for field in ("left_image", "right_image"):
            if getattr(req, field) is None:
                raise JobInputError(field, f"required with the other portrait: two people in this job (two "
                                    f"portraits, or one {n('scene_image')} showing both)")  # fmt: skip
        if req.boxes is not None:
            raise JobInputError(
                n("boxes"), "boxes apply to a scene image only; portraits are placed automatically"
            )
    elif req.scene_image is None:
        raise JobInputError(n("picture"), f"required: two portraits (left_image and right_image) or one scene "
                            f"image ({n('scene_image')}) for the two people of this job")  # fmt: skip
    if req.scene_image is not None:
        for name in ("layout", "backdrop", "aspect"):
            if getattr(req, name) is not None:
                raise JobInputError(
                    name, "applies to two portraits only; a scene image keeps its own framing"
                )
        field = n("scene_image")
        # Decoded at a working size (a 40-megapixel scene costs one decoded copy at most); the bucket,
        # the boxes and the crop follow the original's size.
        scene = _scene_call(req, lambda: scene_from_image(decode_image(field, req.scene_image, PORTRAIT_SHORT_SIDE),
                            req.boxes, size=resolution, source_size=image_size(req.scene_image, field)))  # fmt: skip
        boxes = None if req.boxes is None else _scene_call(req, lambda: _original_boxes(req.boxes))
        name = f"scene_image.{image_extension(req.scene_image)}"
        files[name] = req.scene_image
        return "scene", {"scene": name}, SceneSpec(layout="scene", bucket=scene.bucket,
                                                   scene_boxes=tuple(scene.boxes), boxes=boxes)  # fmt: skip
    kwargs: dict[str, Any] = {"layout": req.layout or "side_by_side", "backdrop": req.backdrop or "blur"}
    if req.aspect is not None:
        kwargs["aspect"] = req.aspect
    # Portraits decoded at their working size: two 40-megapixel photos never sit in memory whole.
    scene = _scene_call(req, lambda: compose_scene(decode_image("left_image", req.left_image, PORTRAIT_SHORT_SIDE),
                        decode_image("right_image", req.right_image, PORTRAIT_SHORT_SIDE), size=resolution,
                        **kwargs))  # fmt: skip
    images = {}
    for field, side in (("left_image", "left"), ("right_image", "right")):
        data = getattr(req, field)
        name = f"{field}.{image_extension(data)}"
        files[name] = data
        images[side] = name
    return "portraits", images, SceneSpec(layout=kwargs["layout"], bucket=scene.bucket,
                                          scene_boxes=tuple(scene.boxes), backdrop=kwargs["backdrop"],
                                          aspect=req.aspect)  # fmt: skip


def _scene_call(req: JobInput, call: Callable[[], Any]) -> Any:
    """Run a scene-module call; its errors name the input as the client called it (``boxes`` is
    upstream's ``bbox``)."""
    try:
        return call()
    except JobInputError:
        raise
    except InputError as exc:
        raise JobInputError(req.name(exc.field), exc.message) from None


def decode_image(field: str, data: bytes, min_short_side: int | None = None) -> Image.Image:
    """Decode one uploaded image with the scene module's rules (``min_short_side``: reduce a larger one
    to that working size while loading, as ``compose_scene`` does with portraits). Any failure while
    decoding user bytes is the file's fault (a crafted or truncated file can raise more than ValueError
    inside a decoder)."""
    try:
        return load_image(data, field, min_short_side=min_short_side)
    except InputError as exc:
        raise JobInputError(field, exc.message) from None
    except Exception as exc:
        logger.warning("%s: image decoder failed: %r", field, exc)
        raise JobInputError(field, "the image could not be decoded (corrupt or truncated file)") from None


def _original_boxes(boxes: Any) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    b1, b2 = (tuple(int(v) for v in box) for box in parse_boxes(boxes))
    return b1, b2  # type: ignore[return-value]


def image_extension(data: bytes) -> str:
    """File extension for stored image bytes (the scene module has already accepted the format)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _IMAGE_EXT.get(im.format or "", "img")
    except Exception:  # only used for naming; decodability was checked by the scene module
        return "img"


# ---------------------------------------------------------------------------------------------- audio


def audio_extension(field: str, data: bytes) -> str:
    """The file extension under which ``tts.user_audio`` decodes these bytes: wav/flac/ogg/mp3 when
    libsndfile reads them, else m4a (its loader hands m4a to FFmpeg, which sniffs the real container)."""
    try:
        fmt = soundfile.info(io.BytesIO(data)).format
    except Exception:  # libsndfile refuses the container; FFmpeg may still read it
        fmt = None
    if fmt in _SF_AUDIO_EXT:
        return _SF_AUDIO_EXT[fmt]
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if container.streams.audio:
                return "m4a"
    except Exception:  # FFmpeg cannot open it either: not audio
        pass
    raise JobInputError(field, "not a readable audio file; send WAV, FLAC, OGG, MP3 or M4A")


def check_audio(
    req: JobInput, recordings: tuple[bytes, ...], mode: str, limits: Limits, files: dict[str, bytes]
) -> tuple[dict[str, str], dict[str, float]]:
    """Decode the recordings with the renderer's own loader (``tts.user_audio.timeline_from_files``:
    decode, resample, loudness, silence and length rules), so a job that is accepted can be voiced.
    Adds the files to ``files``; returns the spec's ``audio`` and ``audio_seconds``."""
    fields = {
        "audio1": req.name("audio1"),
        "audio2": req.name("audio2"),
        "audio_mode": req.name("audio_mode"),
    }
    names = {
        person: f"audio{i}.{audio_extension(fields[f'audio{i}'], data)}"
        for i, (person, data) in enumerate(zip(PERSONS, recordings, strict=False), start=1)
    }
    with tempfile.TemporaryDirectory(prefix="audio-check-") as tmp:
        paths = []
        for name, data in zip(names.values(), recordings, strict=True):
            path = Path(tmp) / name
            path.write_bytes(data)
            paths.append(path)
        try:
            timeline = timeline_from_files(
                paths[0], paths[1] if len(paths) > 1 else None, mode, max_seconds=limits.max_audio_seconds
            )
        except InputError as exc:
            raise JobInputError(fields.get(exc.field, exc.field), exc.message) from None
    seconds = {f"person{t.speaker + 1}": round(t.end - t.start, 3) for t in timeline.turns}
    for (_, name), data in zip(names.items(), recordings, strict=True):
        files[name] = data
    return names, seconds


# ---------------------------------------------------------------------------------------------- texts


def check_text(field: str, value: Any, max_chars: int, *, required: bool) -> str | None:
    """A text field: None when blank (or ``required`` when it must be given), else checked for type and length."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise JobInputError(field, "required")
        return None
    if not isinstance(value, str):
        raise JobInputError(field, f"expected text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise JobInputError(field, f"{len(value)} characters is too long; the limit is {max_chars}")
    if "\x00" in value:
        raise JobInputError(field, "contains a NUL character")
    control = next((ch for ch in value if ord(ch) < 32 and ch not in "\t\n\r" or ord(ch) == 127), None)
    if control is not None:
        raise JobInputError(field, f"contains the control character {control!r}; plain text only")
    return value


def default_preset(lora: LoraState = LoraState()) -> str:
    """The preset of a job that names none: ``DEFAULT_PRESET`` where offered, else the first one offered
    (a service with a merged LoRA offers only its distilled preset)."""
    offered = offered_presets(lora)
    return DEFAULT_PRESET if DEFAULT_PRESET in offered else next(iter(offered))


def resolve_settings(
    preset: Any, overrides: Any, defaults: Mapping[str, Any] | None = None, lora: LoraState = LoraState()
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(preset name, overrides, resolved settings dict) or JobInputError naming the setting.

    Layers: the preset, then the service's start-up ``defaults`` (``--sample_steps`` ...), then the
    job's own ``overrides``. The stored settings are therefore exactly what the job renders with."""
    name = default_preset(lora) if preset is None or preset == "" else preset
    if not isinstance(name, str) or name not in PRESETS:
        raise JobInputError("preset", f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise JobInputError("settings", f"expected a JSON object of settings, got {type(overrides).__name__}")
    try:
        resolved = PRESETS[name].apply({**(defaults or {}), **overrides}, lora)
    except InputError as exc:
        field = exc.field if exc.field in ("settings", "preset") else f"settings.{exc.field}"
        raise JobInputError(field, exc.message) from None
    # A random seed (negative) is drawn here, once: the stored job then always renders the same video,
    # also when a restart re-runs it and it resumes after its last finished clip.
    return name, dict(overrides), resolved.with_resolved_seed().to_dict()


def check_voice(
    field: str, voice_id: Any, default: str | None = None, installed: frozenset[str] | None = None
) -> str:
    """A known (and, when ``installed`` is given, installed) voice id, ``default`` when none was given;
    JobInputError otherwise."""
    if voice_id is None or voice_id == "":
        if default is None:
            raise JobInputError(field, "required: a voice id (GET /api/voices lists them)")
        voice_id = default
    if not isinstance(voice_id, str) or not 0 < len(voice_id) <= 64 or not set(voice_id) <= _VOICE_CHARS:
        raise JobInputError(field, f"{str(voice_id)[:80]!r} is not a voice id (GET /api/voices lists them)")
    try:
        get_voice(voice_id)
    except InputError as exc:
        raise JobInputError(field, exc.message) from None
    if installed is not None and voice_id not in installed:
        have = ", ".join(sorted(installed)) or "none"
        raise JobInputError(field, f"voice {voice_id!r} is not installed on this service; installed: {have}")
    return voice_id
