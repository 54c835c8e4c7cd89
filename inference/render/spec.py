"""``JobSpec``: the one contract between the service (or the CLI) and the renderer.

A job is described once, when it is accepted (``inference.render.intake.build_job``): which pictures, who
speaks what, the prompt. The store keeps ``JobSpec.to_json()`` in SQLite and the renderer reads it back
with ``JobSpec.from_json``, which refuses anything it does not know and names the key; nothing downstream
fills in defaults. The script is parsed once, at acceptance, and the parsed dialogue travels in the spec.

Upstream MultiTalk's job JSON and ours are read by one parser, :func:`parse_job_json`, for REST (files
as base64 data URLs) and the CLI (files as paths): the same keys, the same rules, the same messages.

JSON form (``version`` 2)::

    kind "dialogue", version 2, source "form" | "json" | "cli"
    people     1 | 2
    layout     "portraits": images {left, right}, composed side by side or on a backdrop
               "scene":     images {scene}, one image showing both people (optional boxes)
               "single":    images {image}, one person, full frame
    images     role -> file name in the job's inputs folder
    scene      {layout: side_by_side | backdrop | scene | single, backdrop, aspect (portraits only, else
               null), boxes ([[y0, x0, y1, x1] x 2] in original pixels, scene only; null = halves),
               scene_boxes (the boxes at the bucket, in scene pixels), bucket [H, W]}
    audio_source "tts":   script (as sent), dialogue (``dialogue.Dialogue.to_dict()``), voices (one
                          per person), turns (count), speakers (names)
                 "files": audio {person1: name[, person2: name]}, audio_mode add | para,
                          audio_seconds {person1: s[, person2: s]}
               (the other source's keys are null)
    prompt, preset, settings_overrides

Version 1 (two-person jobs stored before one-person jobs existed) is read as ``people`` 2 with the
script parsed on reading.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import InputError
from dialogue import Dialogue, ScriptError, ScriptLimits, Speaker, Turn, parse_script
from inference.render.settings import DEFAULT_PROMPT

logger = logging.getLogger(__name__)

SPEC_KIND = "dialogue"
SPEC_VERSION = 2
SOURCES = ("form", "json", "cli")
LAYOUTS = ("portraits", "scene", "single")
AUDIO_SOURCES = ("tts", "files")
AUDIO_MODES = ("add", "para")
IMAGE_ROLES = {"portraits": ("left", "right"), "scene": ("scene",), "single": ("image",)}
SCENE_LAYOUTS = {"portraits": ("side_by_side", "backdrop"), "scene": ("scene",), "single": ("single",)}
PERSONS = ("person1", "person2")
# The scene description of a job that gives none (REST, UI and CLI alike), by number of people.
DEFAULT_PROMPTS = {
    1: "A person is talking to the camera with natural facial expressions, lip movements and small "
    "gestures; realistic, well lit, steady camera.",
    2: DEFAULT_PROMPT,
}
_FILE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}(\.[a-z0-9]{1,8})?$")  # as the store names inputs

Box = tuple[int, int, int, int]  # [y0, x0, y1, x1]


class JobInputError(InputError):
    """A job that cannot be made as described; ``field`` names the input (form field, JSON key)."""


def default_prompt(people: int) -> str:
    return DEFAULT_PROMPTS[people]


def parse_dialogue(field_name: str, text: str, max_chars: int) -> Dialogue:
    """The script parsed with the service's length limit; errors name the line. The only place a
    script is parsed: the result is stored in the spec."""
    try:
        return parse_script(text, ScriptLimits(max_chars=max_chars))
    except ScriptError as exc:
        where = f"line {exc.line}: " if exc.line is not None else ""
        raise JobInputError(field_name, where + exc.message) from None
    except InputError as exc:  # e.g. dialogue.LanguageError
        raise JobInputError(field_name, exc.message) from None


def speaking(dialogue: Dialogue) -> frozenset[int]:
    """The speaker indices (0, 1) that have at least one turn."""
    return frozenset(t.speaker for t in dialogue.turns)


# ---------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class SceneSpec:
    """Where the people are. ``layout``: side_by_side | backdrop (two portraits), scene (one image with
    both), single (one person, full frame). ``bucket``: (H, W); ``scene_boxes``: one box per person at
    the bucket; ``boxes``: the two boxes as given, in original pixels (scene only; None = halves)."""

    layout: str
    bucket: tuple[int, int]
    scene_boxes: tuple[Box, ...]
    backdrop: str | None = None
    aspect: str | None = None
    boxes: tuple[Box, Box] | None = None


@dataclass(frozen=True)
class JobSpec:
    """What to make (see the module docstring for every field); settings are stored beside it."""

    people: int
    layout: str
    images: Mapping[str, str]
    scene: SceneSpec
    audio_source: str
    prompt: str
    preset: str
    settings_overrides: Mapping[str, Any]
    source: str
    script: str | None = None
    dialogue: Dialogue | None = None
    voices: tuple[str, ...] | None = None
    audio: Mapping[str, str] | None = None
    audio_mode: str | None = None
    audio_seconds: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        def bad(key: str, message: str) -> JobInputError:
            return JobInputError(f"spec.{key}", message)

        if self.people not in (1, 2):
            raise bad("people", f"expected 1 or 2, got {self.people!r}")
        if self.layout not in LAYOUTS:
            raise bad("layout", f"{self.layout!r}; allowed: {', '.join(LAYOUTS)}")
        if (self.layout == "single") != (self.people == 1):
            raise bad("layout", f"{self.layout!r} does not fit {self.people} person(s)")
        if set(self.images) != set(IMAGE_ROLES[self.layout]):
            raise bad(
                "images", f"{self.layout} needs {list(IMAGE_ROLES[self.layout])}, got {list(self.images)}"
            )
        for name in self.images.values():
            _check_file_name("images", name)
        if self.scene.layout not in SCENE_LAYOUTS[self.layout]:
            raise bad("scene.layout", f"{self.scene.layout!r} does not fit layout {self.layout!r}")
        if len(self.scene.scene_boxes) != self.people:
            raise bad(
                "scene.scene_boxes", f"expected {self.people} box(es), got {len(self.scene.scene_boxes)}"
            )
        if self.source not in SOURCES:
            raise bad("source", f"{self.source!r}; allowed: {', '.join(SOURCES)}")
        persons = PERSONS[: self.people]
        if self.audio_source == "tts":
            if self.script is None or self.dialogue is None or self.voices is None:
                raise bad("script", "a tts job needs script, dialogue and voices")
            if len(self.voices) != self.people:
                raise bad("voices", f"expected {self.people} voice(s), got {len(self.voices)}")
            expected = frozenset(range(self.people))
            if speaking(self.dialogue) != expected:
                raise bad("dialogue", f"the speakers with turns {sorted(speaking(self.dialogue))} do not fit "
                          f"{self.people} person(s)")  # fmt: skip
            if self.audio is not None or self.audio_mode is not None or self.audio_seconds is not None:
                raise bad("audio", "a tts job has no audio files")
        elif self.audio_source == "files":
            if self.audio is None or set(self.audio) != set(persons):
                raise bad("audio", f"expected files for {list(persons)}, got {self.audio!r}")
            for name in self.audio.values():
                _check_file_name("audio", name)
            if self.audio_mode not in AUDIO_MODES:
                raise bad("audio_mode", f"{self.audio_mode!r}; allowed: {', '.join(AUDIO_MODES)}")
            if self.script is not None or self.dialogue is not None or self.voices is not None:
                raise bad("script", "a job with audio files has no script or voices")
        else:
            raise bad("audio_source", f"{self.audio_source!r}; allowed: {', '.join(AUDIO_SOURCES)}")

    @property
    def speaker_names(self) -> tuple[str, ...]:
        """Display names, one per person (the script's, or generic for recordings)."""
        if self.dialogue is not None:
            return tuple(s.name for s in self.dialogue.speakers[: self.people])
        return tuple(f"Speaker {i + 1}" for i in range(self.people))

    def input_paths(self, inputs_dir: Path) -> dict[str, Path]:
        """Image roles (``left``, ``right``, ``scene``, ``image``) and audio persons (``person1``,
        ``person2``) -> files inside ``inputs_dir``; JobInputError("inputs") when one is missing."""
        names = {**self.images, **(self.audio or {})}
        root = Path(inputs_dir).resolve()
        out = {}
        for role, name in names.items():
            path = (root / name).resolve()
            if path.parent != root or not path.is_file():
                raise JobInputError("inputs", f"input file {name!r} is missing from the job folder")
            out[role] = path
        return out

    # ---- JSON ----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        sc = self.scene
        tts = self.audio_source == "tts"
        return {
            "kind": SPEC_KIND,
            "version": SPEC_VERSION,
            "source": self.source,
            "people": self.people,
            "layout": self.layout,
            "images": dict(self.images),
            "scene": {
                "layout": sc.layout,
                "backdrop": sc.backdrop,
                "aspect": sc.aspect,
                "boxes": None if sc.boxes is None else [list(b) for b in sc.boxes],
                "scene_boxes": [list(b) for b in sc.scene_boxes],
                "bucket": list(sc.bucket),
            },
            "audio_source": self.audio_source,
            "script": self.script,
            "dialogue": self.dialogue.to_dict() if tts and self.dialogue is not None else None,
            "voices": list(self.voices) if self.voices is not None else None,
            "turns": len(self.dialogue.turns) if self.dialogue is not None else None,
            "speakers": list(self.speaker_names) if tts else None,
            "audio": dict(self.audio) if self.audio is not None else None,
            "audio_mode": self.audio_mode,
            "audio_seconds": dict(self.audio_seconds) if self.audio_seconds is not None else None,
            "prompt": self.prompt,
            "preset": self.preset,
            "settings_overrides": dict(self.settings_overrides),
        }

    @classmethod
    def from_json(cls, data: Any) -> JobSpec:
        """Read a stored spec back; JobInputError("spec.<key>") for anything missing, unknown or wrong."""
        r = _Reader(data, "spec")
        if r.req("kind", str) != SPEC_KIND:
            raise JobInputError("spec.kind", f"{data['kind']!r} is not a {SPEC_KIND} job")
        version = r.req("version", int)
        if version == 1:
            return _from_v1(r)
        if version != SPEC_VERSION:
            raise JobInputError("spec.version", f"{version} is not a known version (1, {SPEC_VERSION})")
        r.only(_V2_KEYS)
        people = r.req("people", int)
        tts = r.req("audio_source", str) == "tts"
        dialogue = _dialogue_from_json(r.sub("dialogue")) if tts else r.null("dialogue")
        spec = cls(
            people=people,
            layout=r.req("layout", str),
            images=r.str_map("images"),
            scene=_scene_from_json(r.sub("scene")),
            audio_source=r.req("audio_source", str),
            prompt=r.req("prompt", str),
            preset=r.req("preset", str),
            settings_overrides=r.req("settings_overrides", dict),
            source=r.req("source", str),
            script=r.req("script", str) if tts else r.null("script"),
            dialogue=dialogue,
            voices=tuple(r.str_list("voices")) if tts else r.null("voices"),
            audio=r.null("audio") if tts else r.str_map("audio"),
            audio_mode=r.null("audio_mode") if tts else r.req("audio_mode", str),
            audio_seconds=r.null("audio_seconds") if tts else r.num_map("audio_seconds"),
        )
        if tts:
            if r.req("turns", int) != len(dialogue.turns):
                raise JobInputError("spec.turns", f"{data['turns']} does not match the dialogue's turns")
            if r.str_list("speakers") != list(spec.speaker_names):
                raise JobInputError("spec.speakers", "does not match the dialogue's speakers")
        else:
            r.null("turns")
            r.null("speakers")
        return spec


_V2_KEYS = (
    "kind", "version", "source", "people", "layout", "images", "scene", "audio_source", "script", "dialogue",
    "voices", "turns", "speakers", "audio", "audio_mode", "audio_seconds", "prompt", "preset",
    "settings_overrides",
)  # fmt: skip
_V1_KEYS = tuple(k for k in _V2_KEYS if k not in ("people", "dialogue"))


def _check_file_name(key: str, name: str) -> None:
    if not isinstance(name, str) or not _FILE_NAME_RE.fullmatch(name):
        raise JobInputError(f"spec.{key}", f"{name!r} is not a plain input file name")


class _Reader:
    """Strict reads from one JSON object; every error names ``<where>.<key>``."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise JobInputError(where, f"expected a JSON object, got {type(data).__name__}")
        self.data, self.where = data, where

    def _missing(self, key: str) -> JobInputError:
        return JobInputError(f"{self.where}.{key}", "required")

    def only(self, keys: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in keys:
                raise JobInputError(f"{self.where}.{key}", "unknown key")
        for key in keys:
            if key not in self.data:
                raise self._missing(key)

    def req(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.data:
            raise self._missing(key)
        value = self.data[key]
        if isinstance(value, bool) and kind in (int, float, (int, float)) or not isinstance(value, kind):
            raise JobInputError(
                f"{self.where}.{key}", f"expected {_kind_name(kind)}, got {type(value).__name__}"
            )
        return value

    def opt(self, key: str, kind: type | tuple[type, ...]) -> Any:
        return None if self.data.get(key) is None else self.req(key, kind)

    def null(self, key: str) -> None:
        if key not in self.data:
            raise self._missing(key)
        if self.data[key] is not None:
            raise JobInputError(f"{self.where}.{key}", "must be null for this kind of job")

    def sub(self, key: str) -> _Reader:
        return _Reader(self.req(key, dict), f"{self.where}.{key}")

    def str_map(self, key: str) -> dict[str, str]:
        value = self.req(key, dict)
        if not all(isinstance(v, str) for v in value.values()):
            raise JobInputError(f"{self.where}.{key}", "expected an object of strings")
        return dict(value)

    def num_map(self, key: str) -> dict[str, float]:
        value = self.req(key, dict)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()):
            raise JobInputError(f"{self.where}.{key}", "expected an object of numbers")
        return dict(value)

    def str_list(self, key: str) -> list[str]:
        value = self.req(key, list)
        if not all(isinstance(v, str) for v in value):
            raise JobInputError(f"{self.where}.{key}", "expected a list of strings")
        return list(value)

    def box_list(self, key: str) -> tuple[Box, ...]:
        value = self.req(key, list)
        boxes = []
        for box in value:
            if not (isinstance(box, list) and len(box) == 4 and all(_is_int(v) for v in box)):
                raise JobInputError(f"{self.where}.{key}", f"expected boxes of 4 integers, got {box!r}")
            boxes.append(tuple(box))
        return tuple(boxes)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", dict: "an object", list: "a list", float: "a number"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _scene_from_json(r: _Reader) -> SceneSpec:
    r.only(("layout", "backdrop", "aspect", "boxes", "scene_boxes", "bucket"))
    bucket = r.req("bucket", list)
    if len(bucket) != 2 or not all(_is_int(v) and v > 0 for v in bucket):
        raise JobInputError("spec.scene.bucket", f"expected [H, W], got {bucket!r}")
    boxes = None if r.data["boxes"] is None else r.box_list("boxes")
    if boxes is not None and len(boxes) != 2:
        raise JobInputError("spec.scene.boxes", f"expected two boxes, got {len(boxes)}")
    return SceneSpec(
        layout=r.req("layout", str),
        bucket=(bucket[0], bucket[1]),
        scene_boxes=r.box_list("scene_boxes"),
        backdrop=r.opt("backdrop", str),
        aspect=r.opt("aspect", str),
        boxes=boxes,  # type: ignore[arg-type]
    )


def _dialogue_from_json(r: _Reader) -> Dialogue:
    """``Dialogue.to_dict()`` back into a Dialogue (every field of Turn and Speaker, lists as tuples)."""

    def build(cls: type, data: Any, where: str) -> Any:
        sub = _Reader(data, where)
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in sub.data:
            if key not in known:
                raise JobInputError(f"{where}.{key}", "unknown key")
        values = {}
        for name, f in known.items():
            if name not in sub.data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise JobInputError(f"{where}.{name}", "required")
                continue
            value = sub.data[name]
            values[name] = tuple(value) if isinstance(value, list) else value
        try:
            return cls(**values)
        except TypeError as exc:
            raise JobInputError(where, str(exc)) from None

    speakers = r.req("speakers", list)
    turns = r.req("turns", list)
    if len(speakers) != 2:
        raise JobInputError("spec.dialogue.speakers", f"expected two speakers, got {len(speakers)}")
    return Dialogue(
        speakers=tuple(build(Speaker, s, f"spec.dialogue.speakers[{i}]") for i, s in enumerate(speakers)),
        turns=tuple(build(Turn, t, f"spec.dialogue.turns[{i}]") for i, t in enumerate(turns)),
        format=r.req("format", str),
        labels=r.req("labels", str),
    )


def _from_v1(r: _Reader) -> JobSpec:
    """A version-1 spec (two people; the parsed script was not stored) as a version-2 JobSpec."""
    for key in r.data:
        if key not in _V1_KEYS:
            raise JobInputError(f"spec.{key}", "unknown key")
    tts = r.req("audio_source", str) == "tts"
    scene = r.sub("scene")
    layout = r.req("layout", str)
    composed = layout == "portraits"
    scene_spec = SceneSpec(
        layout=scene.req("layout", str),
        bucket=tuple(scene.req("bucket", list)),  # type: ignore[arg-type]
        scene_boxes=scene.box_list("scene_boxes"),
        backdrop=scene.opt("backdrop", str) if composed else None,
        aspect=scene.opt("aspect", str) if composed else None,
        boxes=None if composed or scene.data.get("boxes") is None else scene.box_list("boxes"),  # type: ignore[arg-type]
    )
    script = r.req("script", str) if tts else None
    return JobSpec(
        people=2,
        layout=layout,
        images=r.str_map("images"),
        scene=scene_spec,
        audio_source="tts" if tts else "files",
        prompt=r.req("prompt", str),
        preset=r.req("preset", str),
        settings_overrides=r.req("settings_overrides", dict),
        source=r.req("source", str),
        script=script,
        dialogue=parse_dialogue("spec.script", script, max(len(script), 1)) if script is not None else None,
        voices=tuple(r.str_list("voices")) if tts else None,
        audio=None if tts else r.str_map("audio"),
        audio_mode=None if tts else r.req("audio_mode", str),
        audio_seconds=None if tts else r.num_map("audio_seconds"),
    )


# ---------------------------------------------------------------------------------------------- input


@dataclass(frozen=True)
class JobInput:
    """A job as sent, after transport decoding (form, JSON with data URLs, JSON with paths) and before
    any content check: file bytes and texts under their form names. ``names`` maps a form name to the
    name the client used (``scene_image`` -> ``cond_image``, ``voice2`` -> ``voices[1]`` ...) so that
    errors name what the client sent; ``speech`` and ``picture`` name where a missing script or image
    is reported."""

    left_image: bytes | None = None
    right_image: bytes | None = None
    scene_image: bytes | None = None
    image: bytes | None = None
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
    names: Mapping[str, str] = field(default_factory=dict)

    def name(self, form_name: str) -> str:
        """The name the client used for ``form_name``."""
        return self.names.get(form_name) or _FORM_NAMES.get(form_name, form_name)


_FORM_NAMES = {"speech": "script", "picture": "left_image"}

# Keys of a job JSON: upstream MultiTalk's, then ours (our CLI format, also accepted by REST).
UPSTREAM_KEYS = ("prompt", "cond_image", "cond_audio", "audio_type", "bbox", "tts_audio")
OWN_KEYS = ("left_image", "right_image", "scene_image", "image", "boxes", "script", "voices", "audio",
            "audio_mode", "layout", "backdrop", "aspect", "preset", "settings")  # fmt: skip
JSON_KEYS = (*UPSTREAM_KEYS, *OWN_KEYS)
# Two names for one input: upstream's and ours. A job may use either, not both.
_SAME_INPUT = (("cond_image", "scene_image"), ("bbox", "boxes"), ("tts_audio", "script"),
               ("cond_audio", "audio"), ("audio_type", "audio_mode"))  # fmt: skip

ReadFile = Callable[[str, Any], bytes]
"""``read_file(key, value) -> bytes``: the file a JSON value names (a data URL for REST, a path for the
CLI); raises JobInputError naming ``key``."""


def parse_job_json(body: Any, read_file: ReadFile, *, source: str, body_field: str = "body") -> JobInput:
    """A job JSON (upstream MultiTalk's keys or ours) -> JobInput; files are read through ``read_file``.

    Upstream: ``prompt``, ``cond_image``, ``cond_audio`` {person1[, person2]}, ``audio_type`` add|para,
    ``bbox`` {person1, person2}, ``tts_audio`` {text, human1_voice[, human2_voice]} (voices as ids or as
    upstream's paths ``.../voices/af_heart.pt``; only the id is kept). Ours: ``left_image``,
    ``right_image``, ``scene_image``, ``image`` (one person), ``boxes``, ``script``, ``voices`` [id, id],
    ``audio`` [file, file], ``audio_mode``, ``layout``, ``backdrop``, ``aspect``, ``preset``, ``settings``.
    A ``cond_audio`` with only person1 (or a script for one speaker with one voice) is a one-person job;
    ``"None"`` for a person (upstream's silent person) is refused with the reason.
    """
    if not isinstance(body, dict):
        raise JobInputError(body_field, f"expected a JSON object, got {type(body).__name__}")
    for key in body:
        if key == "cond_video":
            raise JobInputError(
                key, "video input (InfiniteTalk's cond_video) is not supported; send cond_image"
            )
        if key not in JSON_KEYS:
            raise JobInputError(str(key), f"unknown key; allowed keys: {', '.join(JSON_KEYS)}")
    for theirs, ours in _SAME_INPUT:
        if body.get(theirs) is not None and body.get(ours) is not None:
            raise JobInputError(ours, f"the same input as {theirs}: give one of them")

    def text(key: str) -> str | None:
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise JobInputError(key, f"expected a string, got {type(value).__name__}")
        return value

    def read(key: str, value: Any) -> bytes | None:
        return None if value is None else read_file(key, value)

    upstream = any(body.get(k) is not None for k in UPSTREAM_KEYS[1:])
    names: dict[str, str] = {}
    if body.get("cond_image") is not None or (upstream and body.get("scene_image") is None):
        names.update(scene_image="cond_image", picture="cond_image")
    if body.get("bbox") is not None or (upstream and body.get("boxes") is None):
        names["boxes"] = "bbox"
    if body.get("audio_type") is not None or (upstream and body.get("audio_mode") is None):
        names["audio_mode"] = "audio_type"

    script = voice1 = voice2 = None
    tts = body.get("tts_audio")
    if tts is not None:
        if not isinstance(tts, dict):
            raise JobInputError(
                "tts_audio",
                f"expected an object {{text, human1_voice, human2_voice}}, got {type(tts).__name__}",
            )
        extra = [k for k in tts if k not in ("text", "human1_voice", "human2_voice")]
        if extra:
            raise JobInputError(
                f"tts_audio.{extra[0]}", "unknown key; expected text, human1_voice, human2_voice"
            )
        if not isinstance(tts.get("text"), str):
            raise JobInputError("tts_audio.text", "required: the text to speak, e.g. '(s1) Hi! (s2) Hello.'")
        script = tts["text"]
        voice1 = _voice_id("tts_audio.human1_voice", tts.get("human1_voice"))
        voice2 = _voice_id("tts_audio.human2_voice", tts.get("human2_voice"))
        names.update(
            script="tts_audio.text", voice1="tts_audio.human1_voice", voice2="tts_audio.human2_voice"
        )
    if script is None:
        script = text("script")
    voices = body.get("voices")
    if voices is not None:
        if not isinstance(voices, list) or not 1 <= len(voices) <= 2:
            raise JobInputError("voices", "expected a list of one or two voice ids (person 1 first)")
        voice1 = _voice_id("voices[0]", voices[0])
        voice2 = _voice_id("voices[1]", voices[1]) if len(voices) > 1 else None
        names.update(voice1="voices[0]", voice2="voices[1]")
    if upstream and body.get("script") is None:
        names["speech"] = "tts_audio"

    audio1 = audio2 = None
    cond_audio = body.get("cond_audio")
    if cond_audio is not None:
        if not isinstance(cond_audio, dict):
            raise JobInputError(
                "cond_audio", f"expected an object {{person1, person2}}, got {type(cond_audio).__name__}"
            )
        extra = [k for k in cond_audio if k not in PERSONS]
        if extra:
            raise JobInputError(f"cond_audio.{extra[0]}", "unknown key; expected person1 and person2")
        if cond_audio and tts is not None:
            raise JobInputError("cond_audio", "give either tts_audio or cond_audio files, not both "
                                "(cond_audio may be {} with tts_audio, as upstream)")  # fmt: skip
        for key in PERSONS:
            if cond_audio.get(key) == "None":
                raise JobInputError(
                    f"cond_audio.{key}",
                    "'None' asks for a silent person, which this service does not render: leave person2 "
                    "out for a one-person video, or send a recording for each person",
                )
        if cond_audio and cond_audio.get("person1") is None:
            raise JobInputError("cond_audio.person1", "required: the recording of person 1 (left)")
        audio1 = read("cond_audio.person1", cond_audio.get("person1"))
        audio2 = read("cond_audio.person2", cond_audio.get("person2"))
        names.update(audio1="cond_audio.person1", audio2="cond_audio.person2")
    audio = body.get("audio")
    if audio is not None:
        if not isinstance(audio, list) or not 1 <= len(audio) <= 2:
            raise JobInputError("audio", "expected a list of one or two audio files (person 1 first)")
        audio1 = read("audio[0]", audio[0])
        audio2 = read("audio[1]", audio[1]) if len(audio) > 1 else None
        names.update(audio1="audio[0]", audio2="audio[1]")

    return JobInput(
        left_image=read("left_image", body.get("left_image")),
        right_image=read("right_image", body.get("right_image")),
        scene_image=read(
            names.get("scene_image", "scene_image"), body.get("cond_image", body.get("scene_image"))
        ),  # fmt: skip
        image=read("image", body.get("image")),
        boxes=body.get("bbox", body.get("boxes")),
        script=script,
        voice1=voice1,
        voice2=voice2,
        prompt=text("prompt"),
        preset=text("preset"),
        settings=body.get("settings"),
        audio1=audio1,
        audio2=audio2,
        audio_mode=text("audio_type") if body.get("audio_type") is not None else text("audio_mode"),
        layout=text("layout"),
        backdrop=text("backdrop"),
        aspect=text("aspect"),
        source=source,
        names=names,
    )


def _voice_id(key: str, value: Any) -> str | None:
    """A voice id; upstream names voices by path (``weights/Kokoro-82M/voices/af_heart.pt``): only the
    file stem is kept, nothing is ever opened from the client's path. Checked against the catalog later."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise JobInputError(key, f"expected a voice id string, got {type(value).__name__}")
    stem = value.replace("\\", "/").rsplit("/", 1)[-1]
    return stem[:-3] if stem.endswith(".pt") else stem
