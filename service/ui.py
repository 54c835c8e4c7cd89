"""Gradio UI of the dialogue video service: one page to set up, submit, follow and re-run jobs.

``build_ui(store, submit=..., tts_preview=..., info=...)`` returns a ``gr.Blocks``. The entry point mounts
it on the REST app (``service.api.create_app``) with :func:`mount_ui`, which passes the page CSS, the
outputs folder as an allowed path and optional basic auth to ``gr.mount_gradio_app``.

Every handler works on the job store and on pure-Python validators only (``dialogue.parse_script``,
``inference.scene``, ``inference.settings``, ``service.validation``); none touches torch.distributed.
The handlers live on :class:`UiHandlers` so tests can call them without a browser.

The current job id lives in the browser (``gr.BrowserState`` in localStorage, plus ``?job=<id>`` in the
address bar): reloading the page, reopening the browser or restarting the service reattaches to it.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from service.jobs import (
    DiskFullError,
    InvalidTransitionError,
    Job,
    JobNotFoundError,
    JobState,
    JobStore,
    OutputNotFoundError,
    QueueFullError,
    validate_job_id,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EXAMPLES",
    "FORM_FIELDS",
    "UI_CSS",
    "UiHandlers",
    "build_ui",
    "mount_ui",
    "submit_form",
]

SubmitFn = Callable[[dict[str, Any], dict[str, bytes]], str]
"""``submit(form, files) -> job id``: form fields as the REST multipart form (``script``, ``voice1``,
``voice2``, ``prompt``, ``preset``, ``settings`` (dict or JSON text), ``layout``, ``backdrop``, ``aspect``,
``boxes``, ``audio_mode``), files by form name (``left_image``, ``right_image``, ``scene_image``, ``audio1``,
``audio2``) -> bytes. Raises ValueError with ``.field`` for bad input."""
TtsPreviewFn = Callable[[str, str | None], Any]
"""``tts_preview(voice_id, text_or_None) -> (sample_rate, float32 [N])`` or WAV bytes (as the REST API's)."""
InfoFn = Callable[[], Mapping[str, Any]]

TITLE = "Dialogue video"
FPS = 25
POLL_INTERVAL_S = 1.0
HISTORY_LIMIT = 50
BROWSER_STORAGE_KEY = "dialogue_video_current_job"
PREFS_STORAGE_KEY = "dialogue_video_prefs"
SECRET_FILE = ".ui_browser_secret"
# Rough speaking rates for the length estimate (Kokoro at speed 1.0).
_LATIN_CHARS_PER_S = 15.0
_CJK_CHARS_PER_S = 4.5

LAYOUT_CHOICES = [("Side by side", "side_by_side"), ("Shared backdrop", "backdrop")]
BACKDROP_CHOICES = [("Blurred mix of both photos", "blur"), ("Plain colour", "plain")]
ASPECT_CHOICES = [
    ("16:9 wide", "16:9"),
    ("4:3", "4:3"),
    ("1:1 square", "1:1"),
    ("3:4", "3:4"),
    ("9:16 tall", "9:16"),
]
RESOLUTION_CHOICES = [("480p", 480), ("720p", 720)]
LENGTH_UNITS = ["seconds", "frames"]
PRESET_LABELS = {"fast": "Fast", "balanced": "Balanced", "quality": "Quality"}
# Where the speech comes from: the tab of section 2 that is open when Generate is pressed.
SPEECH_SCRIPT, SPEECH_AUDIO = "script", "audio"
AUDIO_MODE_CHOICES = [
    ("add: person 1 speaks first, then person 2 (one after the other)", "add"),
    ("para: both tracks play at once, as recorded (overlapping speech)", "para"),
]
AUDIO_FORMATS_TEXT = "WAV, FLAC, MP3 or M4A"
_AUDIO_CACHE_SIZE = 32

# Order of the values the Generate button sends (tests pass a dict with these keys).
FORM_FIELDS = (
    "source",
    "left_image",
    "right_image",
    "scene_image",
    "boxes",
    "layout",
    "backdrop",
    "aspect",
    "resolution",
    "script",
    "voice1",
    "voice2",
    "prompt",
    "preset",
    "steps",
    "text_guidance",
    "audio_guidance",
    "seed",
    "max_length",
    "length_unit",
    "color_correction",
    "negative_prompt",
    "apg",
    "speech",
    "audio1",
    "audio2",
    "audio_mode",
)
ADVANCED_FIELDS = (
    "steps",
    "text_guidance",
    "audio_guidance",
    "seed",
    "resolution",
    "max_length",
    "color_correction",
    "negative_prompt",
    "apg",
)

EXAMPLES: dict[str, str] = {
    "Tags (s1)/(s2)": "(s1) Did you finish the slides for tomorrow?\n(s2) Almost. I still need the chart.\n"
    "(s1) Great, send them over when you're done.",
    "角色1 / 角色2": "角色1：你好，今天的会议几点开始？\n角色2：下午三点，在二楼的会议室。\n角色1：好的，我会准时到。",
    "A: / B:": "A: Have you tried the new café on Main Street?\nB: Yes! Their espresso is excellent.\n"
    "A: Then let's go there on Friday.",
    "Names": "Alice: I think we should start with the budget.\nBob: Agreed. It's the hardest part.\n"
    "Alice: Then let's get it done first.",
    "One line per turn": "Good morning! How did you sleep?\nNot great, the neighbours were loud.\n"
    "Oh no. Coffee?\nYes, please.",
    "With pauses": "(s1) So, what did the doctor say?\n[pause 1.5s]\n(s2) She said... [pause 0.8s] "
    "everything is fine.\n(s1) That's wonderful news!",
}

FORMAT_HELP = """\
**Script formats** (detected automatically; one turn per line; Chinese, English or mixed):

| format | example | who is who |
|---|---|---|
| tags | `(s1) Hello! (s2) Hi.` (also `[s1]`, `（s1）`) | s1 = person 1 (left), s2 = person 2 (right) |
| roles | `角色1：你好` / `Speaker 2: Hi` | the number |
| letters | `A: Hello` / `B: Hi` | A left, B right |
| names | `Alice: Hello` / `Bob: Hi` | first name to speak is on the left |
| free | one line per turn, no labels | alternating left, right, left ... |

Pauses: `[pause 1.5s]`, `[pause 800ms]`, `[停顿 1秒]` or `<break time="1s"/>`, on their own line or inside a
turn. A line without a label continues the previous turn; lines starting with `#` are comments.
"""

UI_CSS = """
.dv-progress { width: 100%; height: 14px; background: var(--neutral-200, #e5e7eb); border-radius: 7px;
  overflow: hidden; margin: 6px 0; }
.dv-progress > div { height: 100%; background: var(--color-accent, #f97316); transition: width 0.4s; }
.dv-status { font-size: 0.95em; line-height: 1.5; }
.dv-state { font-weight: 600; padding: 1px 8px; border-radius: 8px; background: var(--neutral-100, #f3f4f6); }
.dv-state-done { background: #dcfce7; } .dv-state-failed { background: #fee2e2; }
.dv-state-cancelled { background: #e5e7eb; }
.dv-error { color: #b91c1c; }
.dv-turns td, .dv-turns th { padding: 2px 8px; vertical-align: top; }
"""


# ---------------------------------------------------------------------------------------------- submit


def submit_form(
    store: JobStore, form: Mapping[str, Any], files: Mapping[str, bytes], *, limits: Any = None
) -> str:
    """The REST API's validation + store path for one form submission: returns the new job id.

    ``form``/``files`` as :data:`SubmitFn` (structured values such as a settings dict are sent as the
    JSON text the REST form would carry). Raises ``service.validation.RequestError`` (a ValueError with
    ``.field``) for bad input, and the store's QueueFullError / DiskFullError.
    """
    from service.validation import Limits, request_from_form, validate_generate

    limits = Limits() if limits is None else limits
    text = {
        key: json.dumps(value) if isinstance(value, dict | list) else value
        for key, value in form.items()
        if value is not None
    }
    submission = validate_generate(request_from_form(text, files, limits), limits)
    job = store.submit(submission.spec, submission.settings, submission.files)
    return job.id


def voice_choices(installed: frozenset[str] | None = None) -> list[tuple[str, str]]:
    """Dropdown choices ``(label, id)`` grouped by language: ``"af_heart — American English, female, ..."``;
    only the installed voices when the service says which (the tiny demo has four)."""
    from tts.voices import voices_by_language

    out: list[tuple[str, str]] = []
    for voices in voices_by_language().values():
        for v in voices:
            if installed is None or v.id in installed:
                out.append((f"{v.id} — {v.language_name}, {v.gender}, {v.description}", v.id))
    return out


def preset_summary() -> str:
    """``"Fast: 16 steps, guidance text 1 / audio 4, 480p · ..."`` for the preset picker."""
    from inference.render.settings import PRESETS

    parts = []
    for name, p in PRESETS.items():
        s = p.settings
        parts.append(
            f"{PRESET_LABELS.get(name, name)}: {s.steps} steps, guidance text {s.text_guidance:g} / audio "
            f"{s.audio_guidance:g}, {s.resolution}p"
        )
    return " · ".join(parts)


def _field_label(field: str | None) -> str:
    labels = {
        "left_image": "Portrait of person 1 (left)",
        "right_image": "Portrait of person 2 (right)",
        "scene_image": "Scene image",
        "boxes": "Boxes",
        "layout": "Layout",
        "backdrop": "Backdrop",
        "aspect": "Aspect ratio",
        "size": "Resolution",
        "script": "Script",
        "voice1": "Voice of person 1",
        "voice2": "Voice of person 2",
        "prompt": "Scene description",
        "preset": "Preset",
        "settings": "Settings",
        "names": "Speaker names",
        "audio1": "Recording of person 1 (left)",
        "audio2": "Recording of person 2 (right)",
        "audio_mode": "Audio mode",
    }
    if not field:
        return "Input"
    if field.startswith("settings."):
        return f"Setting {field.split('.', 1)[1]}"
    return labels.get(field, field)


def _error_md(exc: BaseException, default_field: str | None = None) -> str:
    field = getattr(exc, "field", None) or default_field
    message = getattr(exc, "message", None) or str(exc)
    if field and isinstance(message, str) and message.startswith(f"{field}:"):
        message = message[len(field) + 1 :].strip()
    return f"⚠️ **{_field_label(field)}**: {message}"


def _speech_seconds(dialogue: Any) -> float:
    """Rough spoken length of a parsed dialogue (Kokoro at speed 1.0), pauses included."""
    total = 0.0
    for turn in dialogue.turns:
        cjk = sum(1 for ch in turn.speech_text if "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff")
        other = len(turn.speech_text) - cjk
        total += cjk / _CJK_CHARS_PER_S + other / _LATIN_CHARS_PER_S + 0.3 + turn.pause_after
    return total


def _fmt_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _fmt_time(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _browser_secret(store: JobStore) -> str:
    """A per-installation secret for gr.BrowserState, kept beside the outputs so that a restarted
    service can still read the job id the browser stored (gradio's default is random per process)."""
    path = store.outputs_dir / SECRET_FILE
    try:
        value = path.read_text().strip()
        if len(value) >= 16:
            return value
    except OSError:
        pass
    value = secrets.token_hex(16)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
    except FileExistsError:  # another process won the race: use its secret
        return path.read_text().strip() or value
    except OSError as exc:
        logger.warning(
            "could not keep the UI browser secret in %s (%s); a restart forgets browser jobs", path, exc
        )
    return value


def _srt_to_vtt(srt: str) -> str:
    """SRT text -> WebVTT text (timestamps use '.' and a WEBVTT header; cue numbers may stay)."""
    lines = ["WEBVTT", ""]
    for line in srt.replace("\r\n", "\n").split("\n"):
        if "-->" in line:
            line = line.replace(",", ".")
        lines.append(line)
    return "\n".join(lines).rstrip("\n") + "\n"


@dataclass(frozen=True)
class PollResult:
    """What one status poll shows (handler-level view, before Gradio updates)."""

    html: str
    terminal: bool
    video: str | None
    subtitles: str | None
    downloads: list[str]
    cancellable: bool


# ---------------------------------------------------------------------------------------------- handlers


class UiHandlers:
    """The UI's event handlers as plain methods (store + validators only; callable from tests)."""

    def __init__(
        self,
        store: JobStore,
        *,
        submit: SubmitFn,
        tts_preview: TtsPreviewFn | None,
        info: InfoFn,
        limits: Any = None,
    ) -> None:
        from service.validation import Limits

        self.store = store
        self._submit = submit
        self._tts_preview = tts_preview
        self._info = info
        # The REST limits (service.validation.Limits): the audio preview applies the same size/length rules.
        self.limits = Limits() if limits is None else limits
        # (path, size, mtime) -> seconds: the estimate asks again on every settings change.
        self._audio_seconds: dict[tuple[str, int, int], float] = {}

    # -- service info

    def info(self) -> dict[str, Any]:
        try:
            return dict(self._info())
        except Exception as exc:  # the page must still render when the info callable fails
            logger.warning("service info unavailable: %r", exc)
            return {"error": str(exc)}

    def header(self) -> str:
        """One line about the service: model, devices, engine state, queue."""
        info = self.info()
        parts: list[str] = []
        if "error" in info:
            parts.append(f"service info unavailable ({html.escape(str(info['error']))})")
        if info.get("model"):
            parts.append(f"model **{info['model']}**")
        world = info.get("world_size")
        if world:
            sp = info.get("ulysses_size")
            parts.append(
                f"{world} process{'es' if int(world) > 1 else ''}"
                + (f" (Ulysses {sp})" if sp and sp > 1 else "")
            )
        engine = info.get("engine")
        if isinstance(engine, Mapping):
            alive = engine.get("alive")
            parts.append(
                "engine " + ("running" if alive else f"not running {engine.get('message') or ''}".strip())
            )
        elif engine is None and "engine" in info:
            parts.append("no engine attached (jobs wait in the queue)")
        try:
            queued = self.store.count(state="queued")
            parts.append(f"{queued} job{'s' if queued != 1 else ''} waiting")
        except Exception as exc:
            parts.append(f"job store unreadable: {exc}")
        return " · ".join(parts)

    # -- script

    def parse_preview(self, script: str | None) -> tuple[str, list[str]]:
        """Script text -> (HTML table of turns or the error with its line, [name of person 1, name of 2])."""
        from dialogue import ScriptError, parse_script

        default = ["Speaker 1", "Speaker 2"]
        if script is None or not script.strip():
            return "<p>Write the dialogue above, or load an example.</p>", default
        try:
            dialogue = parse_script(script)
        except ScriptError as exc:
            where = f"line {exc.line}: " if exc.line is not None else ""
            return f'<p class="dv-error">⚠️ {html.escape(where + exc.message)}</p>', default
        except ValueError as exc:
            return f'<p class="dv-error">⚠️ {html.escape(str(exc))}</p>', default
        names = [s.name for s in dialogue.speakers]
        rows = []
        for i, turn in enumerate(dialogue.turns, start=1):
            side = "left" if turn.speaker == 0 else "right"
            pause = f" <em>[pause {turn.pause_after:g} s]</em>" if turn.pause_after else ""
            rows.append(
                f"<tr><td>{i}</td><td>{turn.line}</td><td><b>{html.escape(names[turn.speaker])}</b> ({side})</td>"
                f"<td>{html.escape(turn.text)}{pause}</td></tr>"
            )
        seconds = _speech_seconds(dialogue)
        head = (
            f"<p>{len(dialogue.turns)} turn{'s' if len(dialogue.turns) != 1 else ''} · format <code>{dialogue.format}"
            f"</code> · about {_fmt_duration(seconds)} of speech</p>"
        )
        table = (
            '<table class="dv-turns"><thead><tr><th>#</th><th>line</th><th>speaker</th><th>text</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
        return head + table, names

    # -- uploaded audio

    def audio_seconds(self, path: str, field: str) -> float:
        """Length of one uploaded recording, decoded as a job will decode it (``tts.user_audio.load_audio``
        after the submission's format sniffing): raises ValueError with ``.field`` for a file that is too
        large, empty, not audio, corrupt, silent or too long."""
        import tempfile

        from service.validation import RequestError, audio_extension
        from tts.user_audio import SAMPLE_RATE, load_audio

        src = Path(path)
        stat = src.stat()
        if stat.st_size == 0:
            raise RequestError(field, "the file is empty")
        if stat.st_size > self.limits.max_upload_bytes:
            raise RequestError(
                field, f"the file is larger than the limit of {self.limits.max_upload_bytes / 2**20:g} MiB"
            )
        key = (str(src.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in self._audio_seconds:
            return self._audio_seconds[key]
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
            logger.warning("%s: audio preview failed: %r", field, exc)
            raise RequestError(
                field, "the file could not be decoded as audio (corrupt or truncated)"
            ) from None
        seconds = samples.size / SAMPLE_RATE
        if len(self._audio_seconds) >= _AUDIO_CACHE_SIZE:
            self._audio_seconds.pop(next(iter(self._audio_seconds)))
        self._audio_seconds[key] = seconds
        return seconds

    def audio_preview(self, audio1: str | None, audio2: str | None, mode: str | None) -> tuple[str, str, str]:
        """(message under recording 1, message under recording 2, one summary line) for the audio tab.
        Errors name the field and never carry a traceback."""
        seconds: list[float | None] = []
        messages: list[str] = []
        for field, path in (("audio1", audio1), ("audio2", audio2)):
            if not path:
                seconds.append(None)
                messages.append("")
                continue
            try:
                s = self.audio_seconds(path, field)
            except (ValueError, OSError) as exc:
                seconds.append(None)
                messages.append(_error_md(exc, field))
                continue
            seconds.append(s)
            messages.append(f"✓ {_fmt_duration(s)}")
        return messages[0], messages[1], self._audio_summary(seconds[0], seconds[1], mode, audio1, audio2)

    def _audio_summary(
        self, s1: float | None, s2: float | None, mode: str | None, audio1: str | None, audio2: str | None
    ) -> str:
        if not audio1 and not audio2:
            return f"Upload one recording per person ({AUDIO_FORMATS_TEXT})."
        if not audio1 or not audio2:
            missing = "person 1 (left)" if not audio1 else "person 2 (right)"
            return f"Upload the recording of {missing} too: each person needs their own track."
        if s1 is None or s2 is None:
            return "Fix the recording marked above to see the length."
        total = self._speech_from_audio(s1, s2, mode)
        if mode == "para":
            text = f"Both at once: person 1 {_fmt_duration(s1)}, person 2 {_fmt_duration(s2)}"
        else:
            text = f"Person 1 speaks {_fmt_duration(s1)}, then person 2 {_fmt_duration(s2)}"
        text += f" → about {_fmt_duration(total)} of video."
        if total > self.limits.max_audio_seconds:
            text += f" ⚠️ More than the limit of {_fmt_duration(self.limits.max_audio_seconds)} in total."
        return text

    @staticmethod
    def _speech_from_audio(s1: float, s2: float, mode: str | None) -> float:
        return max(s1, s2) if mode == "para" else s1 + s2

    # -- scene

    def overlay(
        self,
        source: str,
        left: str | None,
        right: str | None,
        scene: str | None,
        boxes: str | None,
        layout: str,
        backdrop: str,
        aspect: str,
        resolution: int,
        names: Sequence[str] | None,
    ) -> tuple[Any, str]:
        """Compose the reference scene as the engine will and return (overlay image or None, message)."""
        from inference.scene.compose import DEFAULT_NAMES, compose_scene, scene_from_image

        names_t = (
            tuple(names)
            if names and len(names) == 2 and all(str(n).strip() for n in names)
            else DEFAULT_NAMES
        )
        size = int(resolution or 480)
        try:
            if source == "scene":
                if not scene:
                    return (
                        None,
                        "Upload one image with both people; boxes are optional (left and right halves).",
                    )
                result = scene_from_image(
                    scene, boxes if boxes and boxes.strip() else None, size=size, names=names_t
                )
            else:
                if not left and not right:
                    return None, "Upload the two portraits to see who is where."
                if not left or not right:
                    missing = "person 1 (left)" if not left else "person 2 (right)"
                    return None, f"Upload the portrait of {missing} too."
                result = compose_scene(
                    left,
                    right,
                    layout=layout,
                    size=size,
                    backdrop=backdrop or "blur",
                    aspect=aspect or None,
                    names=names_t,
                )
        except ValueError as exc:
            return None, _error_md(exc, "scene_image" if source == "scene" else "left_image")
        except Exception as exc:  # never show a traceback; the log has it
            logger.exception("scene preview failed")
            return None, f"⚠️ the scene preview failed: {exc}"
        h, w = result.bucket
        b1, b2 = result.boxes
        msg = (
            f"Scene {w}×{h} ({size}p bucket). Orange = {html.escape(names_t[0])} (speaks with voice 1), "
            f"blue = {html.escape(names_t[1])} (voice 2). Boxes [y0, x0, y1, x1]: {list(b1)}, {list(b2)}."
        )
        return result.overlay, msg

    # -- presets and estimate

    def preset_values(self, preset: str, length_unit: str = "seconds") -> tuple[Any, ...]:
        """Advanced-settings values of a preset, in ADVANCED_FIELDS order."""
        from inference.render.settings import PRESETS

        s = PRESETS[preset].settings
        max_length = s.max_frames if length_unit == "frames" else round(s.max_frames / FPS, 2)
        return (
            s.steps,
            s.text_guidance,
            s.audio_guidance,
            s.seed,
            s.resolution,
            max_length,
            s.color_correction,
            s.negative_prompt,
            s.apg,
        )

    def convert_length(self, value: float | None, old_unit: str, new_unit: str) -> float | None:
        if value is None or old_unit == new_unit:
            return value
        return round(float(value) * FPS) if new_unit == "frames" else round(float(value) / FPS, 2)

    def settings_overrides(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Advanced values -> overrides relative to the chosen preset (only what differs).

        Raises ValueError with ``.field`` for a length shorter than one clip or a bad number.
        """
        from inference.render.settings import PRESETS, SettingsError

        preset = PRESETS[values["preset"]]
        base = preset.settings.to_dict()
        length, unit = values.get("max_length"), values.get("length_unit") or "seconds"
        candidate: dict[str, Any] = {}
        for key in (
            "steps",
            "text_guidance",
            "audio_guidance",
            "seed",
            "resolution",
            "color_correction",
            "apg",
        ):
            if values.get(key) is not None:
                candidate[key] = values[key]
        for key in ("steps", "seed", "resolution"):
            if key in candidate and isinstance(candidate[key], float) and candidate[key].is_integer():
                candidate[key] = int(candidate[key])
        neg = values.get("negative_prompt")
        if neg is not None:
            candidate["negative_prompt"] = neg
        if length is not None:
            try:
                length = float(length)
            except (TypeError, ValueError):
                raise SettingsError("max_frames", f"maximum length {length!r} is not a number") from None
            if not math.isfinite(length) or length <= 0:
                raise SettingsError("max_frames", f"maximum length must be positive, got {length:g} {unit}")
            frames = round(length) if unit == "frames" else math.ceil(length * FPS - 1e-9)
            frame_num = base["frame_num"]
            if frames < frame_num:
                raise SettingsError(
                    "max_frames",
                    f"maximum length {length:g} {unit} is shorter than one clip; the least is "
                    f"{frame_num} frames = {frame_num / FPS:g} s",
                )
            candidate["max_frames"] = frames
        return {k: v for k, v in candidate.items() if base.get(k) != v}

    def estimate(self, values: Mapping[str, Any]) -> str:
        """Markdown: preset description, speech length and model passes, and a time when the service
        knows its time per model pass (``info()["step_time_s"]``)."""
        from dialogue import parse_script
        from inference.render.settings import PRESETS, count_clips, estimate_seconds

        preset = PRESETS.get(values.get("preset") or "")
        if preset is None:
            return ""
        lines = [f"**{PRESET_LABELS.get(preset.name, preset.name)}**: {preset.description}"]
        try:
            overrides = self.settings_overrides(values)
            settings = preset.apply(overrides)
        except ValueError as exc:
            return "\n\n".join([*lines, _error_md(exc, "settings")])
        seconds = None
        if values.get("speech") == SPEECH_AUDIO:
            missing = "upload both recordings to estimate the length"
            try:
                if values.get("audio1") and values.get("audio2"):
                    s1 = self.audio_seconds(values["audio1"], "audio1")
                    s2 = self.audio_seconds(values["audio2"], "audio2")
                    seconds = self._speech_from_audio(s1, s2, values.get("audio_mode"))
            except (ValueError, OSError):  # the audio tab shows what is wrong with the file
                seconds = None
        else:
            missing = "write a script to estimate the length"
            script = values.get("script")
            if script and script.strip():
                try:
                    seconds = _speech_seconds(parse_script(script))
                except ValueError:
                    seconds = None
        passes = settings.passes_per_step
        if seconds is None:
            lines.append(
                f"{settings.steps} steps × {passes} model passes per step per clip "
                f"({settings.resolution}p); {missing}."
            )
            return "\n\n".join(lines)
        clips = count_clips(max(1, int(seconds * FPS)), settings)
        video_s = min(seconds, settings.output_frame_cap / FPS)
        text = (
            f"≈ {_fmt_duration(video_s)} of video → {clips} clip{'s' if clips != 1 else ''} × {settings.steps} steps "
            f"× {passes} passes = {clips * settings.steps * passes} transformer passes at {settings.resolution}p"
        )
        step_time = self._step_time(settings.resolution)
        if step_time is not None:
            overhead = float(self.info().get("clip_overhead_s") or 0.0)
            eta = estimate_seconds(settings, seconds, step_time, clip_overhead_s=overhead)
            text += f"; estimated time on this service ≈ **{_fmt_duration(eta)}**"
        lines.append(text + ".")
        return "\n\n".join(lines)

    def _step_time(self, resolution: int) -> float | None:
        value = self.info().get("step_time_s")
        if isinstance(value, Mapping):
            value = value.get(resolution, value.get(str(resolution)))
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        ):
            return float(value)
        return None

    # -- voices

    def preview_voice(self, voice: str | None) -> tuple[tuple[int, np.ndarray] | None, str]:
        """Speak a sample line with ``voice``: ((sample rate, float32 [N]) or None, message)."""
        from tts.voices import get_voice

        if not voice:
            return None, "Choose a voice first."
        try:
            v = get_voice(voice)
        except ValueError as exc:
            return None, _error_md(exc, "voice")
        if self._tts_preview is None:
            return None, (
                "Voice preview needs the Kokoro TTS engine, which is not loaded in this service "
                "(put the Kokoro-82M weights in weights/Kokoro-82M/ and restart). Jobs still use the chosen voice."
            )
        try:
            result = self._tts_preview(v.id, None)
        except ValueError as exc:
            return None, _error_md(exc, "voice")
        except Exception as exc:
            logger.exception("voice preview of %s failed", v.id)
            return None, f"⚠️ the voice preview failed: {exc}"
        try:
            sr, audio = _as_audio(result)
        except ValueError as exc:
            logger.error("tts_preview returned an unusable result: %s", exc)
            return None, f"⚠️ the voice preview returned no usable audio ({exc})"
        return (
            sr,
            audio,
        ), f"{v.id}: {v.language_name}, {v.gender}, {v.description} ({len(audio) / sr:.1f} s)"

    def remembered_voices(self, prefs: Any) -> tuple[str | None, str | None]:
        """Voices stored in the browser (``{"voice1": id, "voice2": id}``); ids that are unknown, or not
        installed on this service (so not in the dropdowns, and refused at submission), become None."""
        from tts.voices import VOICES

        if not isinstance(prefs, Mapping):
            return None, None
        installed = self.limits.installed_voices

        def usable(v: Any) -> str | None:
            return v if v in VOICES and (installed is None or v in installed) else None

        return usable(prefs.get("voice1")), usable(prefs.get("voice2"))

    # -- submit

    def generate(self, values: Mapping[str, Any]) -> tuple[str | None, str]:
        """Validate and submit one job from the form values (keys: FORM_FIELDS).

        Returns (new job id or None, Markdown message).
        """
        try:
            form, files = self._form_from_values(values)
            job_id = self._submit(form, files)
        except (QueueFullError, DiskFullError) as exc:
            return None, f"⚠️ {exc}"
        except OSError as exc:
            return None, f"⚠️ could not read an uploaded file: {exc}"
        except ValueError as exc:
            return None, _error_md(exc)
        job = self.store.get(job_id)
        where = f"position {job.queue_position} in the queue" if job.queue_position else job.state.value
        return job_id, f"Submitted job `{job_id}` ({where})."

    def _form_from_values(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
        from service.validation import RequestError

        form: dict[str, Any] = {
            "prompt": (values.get("prompt") or "").strip() or None,
            "preset": values.get("preset"),
            "settings": self.settings_overrides(values),
        }
        files: dict[str, bytes] = {}
        # The open tab decides: the validation refuses a script and recordings together, so send one.
        if values.get("speech") == SPEECH_AUDIO:
            for key, who in (("audio1", "person 1 (left)"), ("audio2", "person 2 (right)")):
                if not values.get(key):
                    raise RequestError(key, f"required: upload the recording of {who} ({AUDIO_FORMATS_TEXT})")
                files[key] = Path(values[key]).read_bytes()
            form["audio_mode"] = values.get("audio_mode") or "add"
        else:
            form.update(
                script=values.get("script") or "", voice1=values.get("voice1"), voice2=values.get("voice2")
            )
        if values.get("source") == "scene":
            if not values.get("scene_image"):
                raise RequestError("scene_image", "required: upload one image with both people")
            files["scene_image"] = Path(values["scene_image"]).read_bytes()
            boxes = values.get("boxes")
            if boxes and boxes.strip():
                form["boxes"] = boxes
        else:
            for key, who in (("left_image", "person 1 (left)"), ("right_image", "person 2 (right)")):
                if not values.get(key):
                    raise RequestError(key, f"required: upload the portrait of {who}")
                files[key] = Path(values[key]).read_bytes()
            form["layout"] = values.get("layout") or "side_by_side"
            if form["layout"] == "backdrop":
                form["backdrop"] = values.get("backdrop") or "blur"
            if values.get("aspect"):
                form["aspect"] = values["aspect"]
        return form, files

    # -- job status

    def current_job(self, stored: Any, query_job: str | None) -> str:
        """The job to reattach to on page load: ``?job=`` in the URL first, then the browser's stored id."""
        for candidate in (query_job, stored):
            if isinstance(candidate, str) and candidate:
                try:
                    if self.store.exists(validate_job_id(candidate)):
                        return candidate
                except ValueError:
                    continue
        return ""

    def poll(self, job_id: str | None) -> PollResult:
        """Status of one job for the status panel (HTML), its result files when done."""
        if not job_id:
            return PollResult(
                "<p>No job yet: fill in the form and press Generate.</p>", True, None, None, [], False
            )
        try:
            job = self.store.get(validate_job_id(job_id))
        except (ValueError, JobNotFoundError) as exc:
            return PollResult(
                f'<p class="dv-error">⚠️ {html.escape(str(exc))}</p>', True, None, None, [], False
            )
        video = subtitles = None
        downloads: list[str] = []
        note = ""
        if job.state == JobState.DONE:
            video, subtitles, downloads, note = self._results(job)
        status = _status_html(job, self.store, note)
        cancellable = job.state == JobState.QUEUED or (job.is_active and not job.cancel_requested)
        return PollResult(status, job.is_terminal, video, subtitles, downloads, cancellable)

    def _results(self, job: Job) -> tuple[str | None, str | None, list[str], str]:
        if job.purged_at is not None:
            return None, None, [], "The outputs of this job were removed by the retention clean-up."
        paths: dict[str, Path] = {}
        missing: list[str] = []
        for name in job.outputs:
            try:
                paths[name] = self.store.output_path(job.id, name)
            except OutputNotFoundError as exc:
                missing.append(str(exc))
        video = next((str(p) for n, p in paths.items() if n.endswith(".mp4")), None)
        vtt = next((p for n, p in paths.items() if n.endswith(".vtt")), None)
        srt = next((p for n, p in paths.items() if n.endswith(".srt")), None)
        subtitles = str(vtt) if vtt else None
        if subtitles is None and srt is not None:
            subtitles = self._vtt_from_srt(job.id, srt)
        order = {".mp4": 0, ".srt": 1, ".vtt": 2}
        downloads = sorted((str(p) for p in paths.values()), key=lambda s: (order.get(Path(s).suffix, 3), s))
        note = "; ".join(missing)
        if video is None and not note:
            note = "This job finished without a video file."
        return video, subtitles, downloads, note

    def _vtt_from_srt(self, job_id: str, srt: Path) -> str | None:
        """Browsers only show WebVTT; write one beside the UI's temp files (the job folder is the engine's)."""
        import tempfile

        try:
            out = Path(tempfile.gettempdir()) / "dialogue_video_ui" / f"{job_id}.vtt"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(_srt_to_vtt(srt.read_text(encoding="utf-8")), encoding="utf-8")
            return str(out)
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("could not convert %s to WebVTT: %s", srt, exc)
            return None

    def cancel(self, job_id: str | None) -> str:
        if not job_id:
            return "No job to cancel."
        try:
            job = self.store.request_cancel(validate_job_id(job_id))
        except InvalidTransitionError:
            return "This job has already finished; nothing to cancel."
        except (ValueError, JobNotFoundError) as exc:
            return f"⚠️ {exc}"
        if job.state == JobState.CANCELLED:
            return f"Job `{job.id}` cancelled."
        return f"Cancel requested: the engine stops job `{job.id}` at its next step."

    # -- history

    def history(self, limit: int = HISTORY_LIMIT) -> tuple[list[list[Any]], list[str]]:
        """Rows for the history table (newest first) and the job id of each row."""
        rows: list[list[Any]] = []
        ids: list[str] = []
        for job in self.store.list(limit):
            spec, settings = job.spec, job.settings
            script = spec.get("script")
            voices = " + ".join(spec.get("voices") or [])
            if script:
                first = " / ".join(line.strip() for line in script.splitlines() if line.strip())
                what = first[:70] + ("…" if len(first) > 70 else "")
            elif spec.get("audio_source") == "files":
                what, voices = _audio_job_summary(spec), "own recordings"
            else:
                what = ""
            took = _took_seconds(job)
            status = job.state.value
            if job.state == JobState.QUEUED and job.queue_position:
                status += f" (#{job.queue_position})"
            elif job.is_active:
                status += f" {job.progress:.0f}%"
            rows.append(
                [
                    job.id[:8],
                    _fmt_time(job.created_at),
                    status,
                    spec.get("preset", ""),
                    settings.get("steps", ""),
                    f"{settings.get('resolution', '')}p",
                    settings.get("seed", ""),
                    voices,
                    what,
                    "" if took is None else round(took, 1),
                ]
            )
            ids.append(job.id)
        return rows, ids

    def select_row(self, ids: Sequence[str], row: int | None) -> str:
        if row is None or not 0 <= row < len(ids):
            return ""
        return ids[row]

    def rerun(self, job_id: str | None) -> tuple[str | None, str]:
        """Submit a new job with the same inputs (files from ``outputs/<id>/inputs/``) and settings."""
        if not job_id:
            return None, "Select a job in the history first."
        try:
            job = self.store.get(validate_job_id(job_id.strip()))
            form, files = self._rerun_inputs(job)
            new_id = self._submit(form, files)
        except (QueueFullError, DiskFullError, JobNotFoundError) as exc:
            return None, f"⚠️ {exc}"
        except OSError as exc:
            return None, f"⚠️ the inputs of job {job_id} are no longer on disk ({exc})"
        except ValueError as exc:
            return None, _error_md(exc)
        return new_id, f"Re-submitted job `{job_id[:8]}` as `{new_id}`."

    def _rerun_inputs(self, job: Job) -> tuple[dict[str, Any], dict[str, bytes]]:
        spec = job.spec
        if spec.get("kind") != "dialogue":
            raise ValueError(
                f"job {job.id} is a {spec.get('kind')!r} job; only dialogue jobs can be re-run here"
            )

        def read(name: str) -> bytes:
            return self.store.input_path(job.id, name).read_bytes()

        form: dict[str, Any] = {
            "prompt": spec.get("prompt"),
            "preset": spec.get("preset"),
            "settings": dict(spec.get("settings_overrides") or {}),
        }
        files: dict[str, bytes] = {}
        if spec.get("audio_source") == "files":
            audio = spec.get("audio") or {}
            files["audio1"], files["audio2"] = read(audio["person1"]), read(audio["person2"])
            form["audio_mode"] = spec.get("audio_mode")
        else:
            voices = spec.get("voices") or [None, None]
            form.update(script=spec.get("script"), voice1=voices[0], voice2=voices[1])
        images, scene = spec.get("images") or {}, spec.get("scene") or {}
        if spec.get("layout") == "scene":
            files["scene_image"] = read(images["scene"])
            if scene.get("boxes") is not None:
                form["boxes"] = json.dumps(scene["boxes"])
        else:
            files["left_image"], files["right_image"] = read(images["left"]), read(images["right"])
            for key in ("layout", "backdrop", "aspect"):
                if scene.get(key) is not None:
                    form[key] = scene[key]
        return form, files


def _audio_job_summary(spec: Mapping[str, Any]) -> str:
    """History text of an uploaded-audio job: ``"audio files, add: 3.2 s + 4.1 s"``."""
    mode = spec.get("audio_mode") or "add"
    seconds = spec.get("audio_seconds") or {}
    lengths = [seconds.get(k) for k in ("person1", "person2")]
    if all(isinstance(v, int | float) for v in lengths):
        joiner = " + " if mode == "add" else " ‖ "
        return f"audio files, {mode}: " + joiner.join(_fmt_duration(v) for v in lengths)
    return f"audio files, {mode}"


def _as_audio(result: Any) -> tuple[int, np.ndarray]:
    """(sample rate, mono float32 [N]) from a tts_preview result: such a tuple, or WAV bytes."""
    if isinstance(result, bytes | bytearray):
        import soundfile

        audio, sr = soundfile.read(io.BytesIO(bytes(result)), dtype="float32", always_2d=False)
    elif isinstance(result, tuple) and len(result) == 2:
        sr, audio = result
    else:
        raise ValueError(f"expected (sample_rate, samples) or WAV bytes, got {type(result).__name__}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"expected mono samples [N], got shape {list(audio.shape)}")
    if isinstance(sr, bool) or not isinstance(sr, int | np.integer) or sr <= 0:
        raise ValueError(f"sample rate must be a positive integer, got {sr!r}")
    return int(sr), audio


def _took_seconds(job: Job) -> float | None:
    """How long a job took: the engine's total_time, else finished - started; None while unknown."""
    took = job.timings.get("total_time")
    if took is None and job.started_at and job.finished_at:
        took = job.finished_at - job.started_at
    return took


def _status_html(job: Job, store: JobStore, note: str) -> str:
    state = job.state.value
    progress = 100.0 if job.state == JobState.DONE else job.progress
    lines = [
        f'<div class="dv-status"><b>Job</b> <code>{job.id}</code> '
        f'<span class="dv-state dv-state-{state}">{state}</span> '
        f"<b>{progress:.0f}%</b>",
        f'<div class="dv-progress" role="progressbar" aria-valuenow="{progress:.0f}" aria-valuemin="0" '
        f'aria-valuemax="100"><div style="width: {progress:.1f}%"></div></div>',
    ]
    now = time.time()
    if job.state == JobState.QUEUED:
        waiting = store.count(state="queued")
        running = len(store.active())
        lines.append(
            f"Waiting in the queue: position <b>{job.queue_position}</b> of {waiting}"
            + (f", {running} job{'s' if running != 1 else ''} running" if running else "")
            + f" · submitted {_fmt_duration(now - job.created_at)} ago"
        )
        if job.stage and job.stage != "waiting in queue":
            lines.append(f"<br><em>{html.escape(job.stage)}</em>")
    elif job.is_active:
        elapsed = now - (job.started_at or job.created_at)
        lines.append(f"{html.escape(job.stage or state)} · running for {_fmt_duration(elapsed)}")
        if job.cancel_requested:
            lines.append(" · <b>cancelling…</b>")
    elif job.state == JobState.DONE:
        total = _took_seconds(job)
        parts = [
            f"{k.removesuffix('_time').replace('_', ' ')} {_fmt_duration(v)}" for k, v in job.timings.items()
        ]
        lines.append("Done" + (f" in {_fmt_duration(total)}" if total is not None else "") + ".")
        if parts:
            lines.append(f"<br><small>{html.escape(' · '.join(parts))}</small>")
    elif job.state == JobState.FAILED:
        lines.append(
            f'<span class="dv-error">Failed: {html.escape(job.error or "no reason recorded")}</span>'
        )
    elif job.state == JobState.CANCELLED:
        lines.append("Cancelled.")
    if note:
        lines.append(f'<br><span class="dv-error">{html.escape(note)}</span>')
    lines.append("</div>")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- blocks


def build_ui(
    store: JobStore,
    *,
    submit: SubmitFn,
    tts_preview: TtsPreviewFn | None,
    info: InfoFn,
    limits: Any = None,
) -> gr.Blocks:
    """The whole page as a ``gr.Blocks`` (not launched). Mount it with :func:`mount_ui` (CSS, allowed
    paths, auth) or ``blocks.launch(css=UI_CSS, allowed_paths=[str(store.outputs_dir)], ...)``.

    ``submit(form, files) -> job id`` is the REST API's validation + store path (:func:`submit_form`);
    ``tts_preview(voice, text|None)`` speaks a sample (None: the preview says no TTS engine is attached);
    ``info()`` describes the service (keys read: model, world_size, ulysses_size, engine, default_preset,
    step_time_s (seconds per model pass per clip, a number or {480: s, 720: s}), clip_overhead_s);
    ``limits`` (``service.validation.Limits``, default the REST defaults) sizes the audio preview's checks:
    pass the ones ``submit`` uses.
    """
    from inference.render.settings import PRESETS
    from service.validation import DEFAULT_PROMPT
    from tts.voices import DEFAULT_VOICES

    h = UiHandlers(store, submit=submit, tts_preview=tts_preview, info=info, limits=limits)
    default_preset = str(h.info().get("default_preset") or "balanced")
    if default_preset not in PRESETS:
        default_preset = "balanced"
    adv = dict(zip(ADVANCED_FIELDS, h.preset_values(default_preset), strict=True))
    voices = voice_choices(h.limits.installed_voices)

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(
            f"# {TITLE}\nTwo people, one script (or their own recordings): portraits + dialogue → a talking "
            "video with subtitles."
        )
        header = gr.Markdown(elem_id="service-info")

        # ---- 1. people
        source = gr.State("portraits")
        names = gr.State(["Speaker 1", "Speaker 2"])
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                gr.Markdown("## 1 · Who is in the picture")
                with gr.Tabs():
                    with gr.Tab("Two portraits", id="portraits") as tab_portraits:
                        with gr.Row():
                            left = gr.Image(
                                label="Person 1 (left)",
                                type="filepath",
                                image_mode=None,
                                sources=["upload", "clipboard"],
                                height=260,
                                elem_id="left-portrait",
                            )
                            right = gr.Image(
                                label="Person 2 (right)",
                                type="filepath",
                                image_mode=None,
                                sources=["upload", "clipboard"],
                                height=260,
                                elem_id="right-portrait",
                            )
                        with gr.Row():
                            layout = gr.Radio(
                                LAYOUT_CHOICES, value="side_by_side", label="Layout", elem_id="layout"
                            )
                            backdrop = gr.Dropdown(
                                BACKDROP_CHOICES, value="blur", label="Backdrop", visible=False
                            )
                            aspect = gr.Dropdown(ASPECT_CHOICES, value="16:9", label="Aspect ratio")
                    with gr.Tab("One scene + boxes", id="scene") as tab_scene:
                        scene = gr.Image(
                            label="Scene with both people",
                            type="filepath",
                            image_mode=None,
                            sources=["upload", "clipboard"],
                            height=260,
                            elem_id="scene-image",
                        )
                        boxes = gr.Textbox(
                            label="Boxes (optional)",
                            placeholder='[[y0, x0, y1, x1], [y0, x0, y1, x1]]  or  {"person1": [...], "person2": [...]}',
                            info="Pixels of the uploaded image, rows first (upstream MultiTalk's bbox). Empty: left and "
                            "right halves. Press Enter or leave the box to update the preview.",
                            elem_id="boxes",
                        )
                resolution = gr.Radio(
                    RESOLUTION_CHOICES, value=adv["resolution"], label="Resolution", elem_id="resolution"
                )
            with gr.Column(scale=2):
                overlay_img = gr.Image(
                    label="Who is where (preview)", interactive=False, height=300, elem_id="overlay-preview"
                )
                overlay_msg = gr.Markdown(
                    "Upload the two portraits to see who is where.", elem_id="overlay-message"
                )

        # ---- 2. script, or the speakers' own recordings
        gr.Markdown("## 2 · Dialogue script")
        speech = gr.State(SPEECH_SCRIPT)
        with gr.Tabs():
            with (
                gr.Tab("Script (text to speech)", id=SPEECH_SCRIPT) as tab_script,
                gr.Row(equal_height=False),
            ):
                with gr.Column(scale=3):
                    script = gr.Textbox(
                        label="Script",
                        lines=8,
                        max_lines=30,
                        placeholder="(s1) Hello! How are you?\n(s2) Fine, thanks. And you?",
                        elem_id="script-box",
                    )
                    with gr.Row():
                        example_buttons = [gr.Button(name, size="sm") for name in EXAMPLES]
                    with gr.Accordion("Script formats and pauses", open=False):
                        gr.Markdown(FORMAT_HELP)
                with gr.Column(scale=2):
                    parse_html = gr.HTML(
                        h.parse_preview("")[0], label="Parsed turns", elem_id="parse-preview"
                    )
            with gr.Tab("Upload audio", id=SPEECH_AUDIO, elem_id="audio-tab") as tab_audio:
                gr.Markdown(
                    f"One recording per person ({AUDIO_FORMATS_TEXT}, up to "
                    f"{_fmt_duration(h.limits.max_audio_seconds)}). They are used as they are: the voices in "
                    "section 3 apply to a script only and are ignored while this tab is open."
                )
                with gr.Row(equal_height=False):
                    with gr.Column():
                        audio1 = gr.Audio(
                            label="Recording of person 1 (left)",
                            type="filepath",
                            sources=["upload"],
                            elem_id="audio1",
                        )
                        audio1_msg = gr.Markdown(elem_id="audio1-message")
                    with gr.Column():
                        audio2 = gr.Audio(
                            label="Recording of person 2 (right)",
                            type="filepath",
                            sources=["upload"],
                            elem_id="audio2",
                        )
                        audio2_msg = gr.Markdown(elem_id="audio2-message")
                audio_mode = gr.Radio(
                    AUDIO_MODE_CHOICES, value="add", label="How the recordings play", elem_id="audio-mode"
                )
                audio_summary = gr.Markdown(h.audio_preview(None, None, "add")[2], elem_id="audio-preview")

        # ---- 3. voices and prompt
        gr.Markdown("## 3 · Voices and scene")
        with gr.Row():
            with gr.Column():
                voice1 = gr.Dropdown(
                    voices,
                    value=DEFAULT_VOICES[0],
                    label="Voice of person 1 (left)",
                    info="For a script; ignored with uploaded audio.",
                    elem_id="voice1",
                )
                preview1 = gr.Button("▶ Preview voice 1", size="sm")
            with gr.Column():
                voice2 = gr.Dropdown(
                    voices,
                    value=DEFAULT_VOICES[1],
                    label="Voice of person 2 (right)",
                    info="For a script; ignored with uploaded audio.",
                    elem_id="voice2",
                )
                preview2 = gr.Button("▶ Preview voice 2", size="sm")
            with gr.Column():
                preview_audio = gr.Audio(
                    label="Voice preview", type="numpy", interactive=False, autoplay=True
                )
                preview_msg = gr.Markdown()
        prompt = gr.Textbox(
            label="Scene description (prompt)",
            lines=2,
            placeholder=DEFAULT_PROMPT,
            info="Empty: the default above.",
            elem_id="prompt",
        )

        # ---- 4. quality
        gr.Markdown("## 4 · Quality")
        preset = gr.Radio(
            [(PRESET_LABELS.get(n, n), n) for n in PRESETS],
            value=default_preset,
            label="Preset",
            info=preset_summary(),
            elem_id="preset",
        )
        estimate_md = gr.Markdown(elem_id="estimate")
        with gr.Accordion("Advanced settings (filled from the preset)", open=False):
            with gr.Row():
                steps = gr.Slider(1, 100, value=adv["steps"], step=1, label="Steps")
                text_guidance = gr.Slider(
                    1.0,
                    20.0,
                    value=adv["text_guidance"],
                    step=0.5,
                    label="Text guidance",
                    info="1 = skip the text branch (2 passes per step instead of 3)",
                )
                audio_guidance = gr.Slider(
                    1.0, 20.0, value=adv["audio_guidance"], step=0.5, label="Audio guidance"
                )
            with gr.Row():
                seed = gr.Number(value=adv["seed"], precision=0, label="Seed", info="-1 = random")
                max_length = gr.Number(value=adv["max_length"], label="Maximum length", minimum=0)
                length_unit = gr.Radio(LENGTH_UNITS, value="seconds", label="Length unit")
                color_correction = gr.Slider(
                    0.0,
                    1.0,
                    value=adv["color_correction"],
                    step=0.05,
                    label="Colour correction",
                    info="match each clip's colours to the picture",
                )
                apg = gr.Checkbox(value=adv["apg"], label="APG (adaptive projected guidance)")
            negative_prompt = gr.Textbox(value=adv["negative_prompt"], lines=2, label="Negative prompt")

        # ---- 5. generate and follow
        gr.Markdown("## 5 · Generate")
        browser_secret = _browser_secret(store)
        job_state = gr.BrowserState("", storage_key=BROWSER_STORAGE_KEY, secret=browser_secret)
        # The voices last chosen for each role, remembered per browser.
        prefs_state = gr.BrowserState({}, storage_key=PREFS_STORAGE_KEY, secret=browser_secret)
        shown = gr.State("")  # id of the job whose result is on screen (the video is set once, not per poll)
        timer = gr.Timer(POLL_INTERVAL_S, active=False)
        with gr.Row():
            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=2)
            cancel_btn = gr.Button(
                "Cancel job", variant="stop", interactive=False, elem_id="cancel-btn", scale=1
            )
        submit_msg = gr.Markdown(elem_id="submit-message")
        job_box = gr.Textbox(label="Current job", interactive=False, elem_id="job-id")
        status_html = gr.HTML(h.poll("").html, elem_id="job-status")
        with gr.Row():
            video = gr.Video(label="Result", interactive=False, elem_id="result-video", scale=3, height=420)
            downloads = gr.File(
                label="Downloads (mp4, srt, vtt)",
                file_count="multiple",
                interactive=False,
                elem_id="downloads",
                scale=1,
            )

        # ---- history
        with gr.Accordion("History", open=True):
            history_ids = gr.State([])
            history = gr.Dataframe(
                headers=[
                    "job",
                    "created",
                    "status",
                    "preset",
                    "steps",
                    "res",
                    "seed",
                    "voices",
                    "script",
                    "time (s)",
                ],
                interactive=False,
                wrap=True,
                elem_id="history",
            )
            with gr.Row():
                selected = gr.Textbox(
                    label="Selected job (click a row, or paste an id)", elem_id="selected-job", scale=3
                )
                open_btn = gr.Button("Show", scale=1)
                rerun_btn = gr.Button("Re-run with the same inputs", scale=1, elem_id="rerun-btn")
                refresh_btn = gr.Button("Refresh", scale=1)

        # ---- wiring
        scene_inputs = [source, left, right, scene, boxes, layout, backdrop, aspect, resolution, names]
        form_components = {
            "source": source,
            "left_image": left,
            "right_image": right,
            "scene_image": scene,
            "boxes": boxes,
            "layout": layout,
            "backdrop": backdrop,
            "aspect": aspect,
            "resolution": resolution,
            "script": script,
            "voice1": voice1,
            "voice2": voice2,
            "prompt": prompt,
            "preset": preset,
            "steps": steps,
            "text_guidance": text_guidance,
            "audio_guidance": audio_guidance,
            "seed": seed,
            "max_length": max_length,
            "length_unit": length_unit,
            "color_correction": color_correction,
            "negative_prompt": negative_prompt,
            "apg": apg,
            "speech": speech,
            "audio1": audio1,
            "audio2": audio2,
            "audio_mode": audio_mode,
        }
        form_inputs = [form_components[k] for k in FORM_FIELDS]
        quiet: dict[str, Any] = {"show_progress": "hidden", "queue": False}

        def values_of(*vals: Any) -> dict[str, Any]:
            return dict(zip(FORM_FIELDS, vals, strict=True))

        def update_overlay(*vals: Any) -> tuple[Any, str]:
            return h.overlay(*vals)

        for comp in (left, right, scene, layout, backdrop, aspect, resolution, names, source):
            comp.change(
                update_overlay,
                scene_inputs,
                [overlay_img, overlay_msg],
                trigger_mode="always_last",
                show_progress="minimal",
            )
        boxes.submit(update_overlay, scene_inputs, [overlay_img, overlay_msg])
        boxes.blur(update_overlay, scene_inputs, [overlay_img, overlay_msg])
        layout.change(lambda v: gr.Dropdown(visible=v == "backdrop"), layout, backdrop, **quiet)
        # Events that set a gr.State with a .change listener stay queued: gradio reports State changes
        # (which fire those listeners) only from queued events, not from queue=False ones.
        tab_portraits.select(lambda: "portraits", None, source, show_progress="hidden")
        tab_scene.select(lambda: "scene", None, source, show_progress="hidden")

        # Queued, as the tab events above: it sets `names`, whose change updates the labels and preview.
        script.change(
            h.parse_preview, script, [parse_html, names], trigger_mode="always_last", show_progress="hidden"
        )
        # Queued, as above: `speech` is a State whose change refreshes the estimate.
        tab_script.select(lambda: SPEECH_SCRIPT, None, speech, show_progress="hidden")
        tab_audio.select(lambda: SPEECH_AUDIO, None, speech, show_progress="hidden")
        for name, button in zip(EXAMPLES, example_buttons, strict=True):
            button.click(lambda text=EXAMPLES[name]: text, None, script, **quiet)

        def name_labels(ns: list[str]) -> tuple[Any, Any]:
            return (
                gr.Dropdown(label=f"Voice of person 1 (left): {ns[0]}"),
                gr.Dropdown(label=f"Voice of person 2 (right): {ns[1]}"),
            )

        names.change(name_labels, names, [voice1, voice2], **quiet)
        preview1.click(h.preview_voice, voice1, [preview_audio, preview_msg])
        preview2.click(h.preview_voice, voice2, [preview_audio, preview_msg])

        advanced_outputs = [form_components[k] for k in ADVANCED_FIELDS]
        preset.input(h.preset_values, [preset, length_unit], advanced_outputs, **quiet)
        unit_state = gr.State("seconds")
        length_unit.change(
            lambda v, old, new: (h.convert_length(v, old, new), new),
            [max_length, unit_state, length_unit],
            [max_length, unit_state],
            **quiet,
        )
        # The estimate needs no images: leave them out so typing does not re-process uploads.
        estimate_keys = [k for k in FORM_FIELDS if k not in ("left_image", "right_image", "scene_image")]
        estimate_inputs = [form_components[k] for k in estimate_keys]

        def on_estimate(*vals: Any) -> str:
            return h.estimate(dict(zip(estimate_keys, vals, strict=True)))

        for comp in (
            preset,
            steps,
            text_guidance,
            audio_guidance,
            resolution,
            max_length,
            script,
            length_unit,
            speech,
        ):
            comp.change(on_estimate, estimate_inputs, estimate_md, trigger_mode="always_last", **quiet)
        # The estimate after the preview, so that it finds each recording's length already measured.
        audio_inputs = [audio1, audio2, audio_mode]
        for comp in audio_inputs:
            comp.change(
                h.audio_preview,
                audio_inputs,
                [audio1_msg, audio2_msg, audio_summary],
                trigger_mode="always_last",
                show_progress="minimal",
            ).then(on_estimate, estimate_inputs, estimate_md, **quiet)

        def on_generate(*vals: Any) -> tuple[Any, str]:
            job_id, msg = h.generate(values_of(*vals))
            return (job_id if job_id else gr.skip()), msg

        generate_btn.click(on_generate, form_inputs, [job_box, submit_msg], concurrency_limit=4)

        def show(job_id: str, shown_id: str) -> tuple[Any, ...]:
            r = h.poll(job_id)
            if r.video and shown_id != job_id:
                video_update: Any = gr.Video(value=r.video, subtitles=r.subtitles)
                files_update: Any = r.downloads
                shown_id = job_id
            elif not r.video and shown_id != "":
                video_update, files_update, shown_id = None, None, ""
            else:
                video_update = files_update = gr.skip()
            history_update: Any = gr.skip()
            ids_update: Any = gr.skip()
            if r.terminal:
                history_update, ids_update = h.history()
            return (
                r.html,
                video_update,
                files_update,
                shown_id,
                gr.Timer(active=not r.terminal),
                gr.Button(interactive=r.cancellable),
                history_update,
                ids_update,
            )

        show_outputs = [status_html, video, downloads, shown, timer, cancel_btn, history, history_ids]
        job_box.change(show, [job_box, shown], show_outputs, show_progress="hidden")
        job_box.change(lambda j: j, job_box, job_state, **quiet)
        job_box.change(
            None,
            job_box,
            None,
            js="(id) => { const u = new URL(window.location.href); if (id) { u.searchParams.set('job', id); } "
            "else { u.searchParams.delete('job'); } window.history.replaceState(null, '', u); return []; }",
        )
        timer.tick(show, [job_box, shown], show_outputs, show_progress="hidden", concurrency_limit=None)
        cancel_btn.click(lambda j: h.cancel(j), job_box, submit_msg).then(
            show, [job_box, shown], show_outputs, show_progress="hidden"
        )

        def on_select(ids: list[str], evt: gr.SelectData) -> str:
            row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
            return h.select_row(ids, row)

        history.select(on_select, history_ids, selected, **quiet)
        open_btn.click(lambda j: (j or "").strip() or gr.skip(), selected, job_box, **quiet)

        def on_rerun(j: str) -> tuple[Any, str]:
            new_id, msg = h.rerun(j)
            return (new_id if new_id else gr.skip()), msg

        rerun_btn.click(on_rerun, selected, [job_box, submit_msg])
        refresh_btn.click(lambda: h.history(), None, [history, history_ids], **quiet)

        def save_prefs(v1: str, v2: str) -> dict[str, str]:
            return {"voice1": v1, "voice2": v2}

        voice1.input(save_prefs, [voice1, voice2], prefs_state, **quiet)
        voice2.input(save_prefs, [voice1, voice2], prefs_state, **quiet)

        def on_load(stored: Any, prefs: Any, request: gr.Request) -> tuple[Any, ...]:
            query = request.query_params.get("job") if request is not None else None
            rows, ids = h.history()
            current = h.current_job(stored, query)
            first_estimate = h.estimate({"preset": default_preset, **adv, "length_unit": "seconds"})
            v1, v2 = h.remembered_voices(prefs)
            return h.header(), current, rows, ids, first_estimate, v1 or gr.skip(), v2 or gr.skip()

        demo.load(
            on_load,
            [job_state, prefs_state],
            [header, job_box, history, history_ids, estimate_md, voice1, voice2],
        )

    demo.dialogue_handlers = h  # type: ignore[attr-defined]  # for tests and the entry point's diagnostics
    return demo


def mount_ui(
    app: Any,
    blocks: gr.Blocks,
    store: JobStore,
    *,
    path: str = "/",
    auth: tuple[str, str] | list[tuple[str, str]] | None = None,
    root_path: str | None = None,
) -> Any:
    """Mount the UI on the REST app (``service.api.create_app``) with the page CSS, the outputs folder as
    the only extra allowed path, optional basic auth (gradio's login page) and no SSR. Returns the app."""
    return gr.mount_gradio_app(
        app,
        blocks,
        path=path,
        auth=auth,
        root_path=root_path,
        allowed_paths=[str(store.outputs_dir)],
        css=UI_CSS,
        footer_links=["api"],
        run_history=False,
        ssr_mode=False,
        show_error=True,
    )
