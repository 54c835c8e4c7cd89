"""Live previews beside the form: the parsed script, who is where in the scene, the recordings' lengths,
the time estimate and the voice preview. A mixin of :class:`service.ui.handlers.UiHandlers` (it reads
``self.limits``, ``self.audio``, ``self.job_defaults``, ``self.info()`` and ``self._tts_preview``)."""

from __future__ import annotations

import html
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import soundfile

from dialogue import ScriptError, parse_script
from inference.render.length import check_speech_length, estimate_speech_seconds
from inference.render.settings import FPS, PRESETS, LoraState, count_clips, estimate_seconds
from inference.scene.compose import DEFAULT_NAMES, compose_scene, scene_from_image
from inference.scene.single import single_scene
from service.errors import answer_for
from service.ui.form import (
    AUDIO_FORMATS_TEXT,
    PRESET_LABELS,
    SOURCE_SCENE,
    SOURCE_SINGLE,
    SPEECH_AUDIO,
    settings_overrides,
)
from service.ui.formatting import error_html, error_md, fmt_duration, plural
from service.ui.uploads import AudioLengths, image_message
from service.validation import Limits, RequestError
from tts.voices import VOICES, get_voice

logger = logging.getLogger(__name__)

TtsPreviewFn = Callable[[str, str | None], Any]
"""``tts_preview(voice_id, text_or_None) -> (sample_rate, float32 [N])`` or WAV bytes (as the REST API's)."""
PREVIEW_LINE_CHARS = 200  # a line of the user's script spoken by the voice preview is cut here


class PreviewHandlers:
    """Preview handlers; the class that mixes them in provides ``info()`` (the service description)."""

    limits: Limits
    audio: AudioLengths
    job_defaults: Mapping[str, Any] | None
    lora: LoraState
    _tts_preview: TtsPreviewFn | None

    # -- script

    def parse_preview(self, script: str | None) -> tuple[str, list[str]]:
        """Script text -> (HTML table of turns or the error with its line, [name of person 1, name of 2])."""
        default = ["Speaker 1", "Speaker 2"]
        if script is None or not script.strip():
            return "<p>Write the dialogue, or start from an example.</p>", default
        try:
            dialogue = parse_script(script)
        except ScriptError as exc:
            where = f"line {exc.line}: " if exc.line is not None else ""
            return f'<p class="dv-error">⚠️ {html.escape(where + exc.message)}</p>', default
        except ValueError as exc:
            return error_html(exc, "script"), default
        names = [s.name for s in dialogue.speakers]
        rows = []
        for i, turn in enumerate(dialogue.turns, start=1):
            side = "left" if turn.speaker == 0 else "right"
            pause = f" <em>[pause {turn.pause_after:g} s]</em>" if turn.pause_after else ""
            directions = "; ".join(html.escape(d) for d in turn.directions)
            rows.append(
                f"<tr><td>{i}</td><td>{turn.line}</td><td><b>{html.escape(names[turn.speaker])}</b> ({side})</td>"
                f"<td>{html.escape(turn.speech_text)}{pause}</td><td><em>{directions}</em></td></tr>"
            )
        head = (
            f"<p>{plural(len(dialogue.turns), 'turn')} · format <code>{dialogue.format}</code> · about "
            f"{fmt_duration(estimate_speech_seconds(dialogue))} of speech</p>"
        )
        table = (
            '<table class="dv-turns"><thead><tr><th>#</th><th>line</th><th>speaker</th><th>spoken</th>'
            "<th>directions (not spoken)</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
        return head + table, names

    # -- uploads

    def image_check(self, path: str | None, field: str) -> tuple[Any, str]:
        """(the upload, or None when it is not a usable image; the sentence under it, "" when fine)."""
        message = image_message(path, field)
        return (None if message else path), message

    def audio_preview(
        self, audio1: str | None, audio2: str | None, mode: str | None, source: str | None = None
    ) -> tuple[str, str, str]:
        """(message under recording 1, message under recording 2, one summary line) for the audio tab; a
        one-person video (``source`` single) takes recording 1 only. Errors name the field, no traceback."""
        one = source == SOURCE_SINGLE
        seconds: list[float | None] = []
        messages: list[str] = []
        for field, path in (("audio1", audio1), ("audio2", None if one else audio2)):
            if not path:
                seconds.append(None)
                messages.append("")
                continue
            try:
                s = self.audio.seconds(path, field)
            except OSError as exc:
                seconds.append(None)
                messages.append(
                    error_md(RequestError(field, f"the upload could not be read ({exc.strerror or exc})"))
                )
                continue
            except ValueError as exc:
                seconds.append(None)
                messages.append(error_md(exc, field))
                continue
            seconds.append(s)
            messages.append(f"✓ {fmt_duration(s)}")
        if one:
            if seconds[0] is None:
                summary = (
                    "Upload the recording of the person." if not audio1 else "Fix the recording marked above."
                )
            else:
                summary = f"One person speaks {fmt_duration(seconds[0])} → about {fmt_duration(seconds[0])} of video."
            return messages[0], "", summary
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
        total = _speech_from_audio(s1, s2, mode)
        if mode == "para":
            text = f"Both at once: person 1 {fmt_duration(s1)}, person 2 {fmt_duration(s2)}"
        else:
            text = f"Person 1 speaks {fmt_duration(s1)}, then person 2 {fmt_duration(s2)}"
        text += f" → about {fmt_duration(total)} of video."
        if total > self.limits.max_audio_seconds:
            text += f" ⚠️ More than the limit of {fmt_duration(self.limits.max_audio_seconds)} in total."
        return text

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
        single: str | None = None,
    ) -> tuple[Any, str]:
        """Compose the reference scene as the engine will and return (overlay image or None, message)."""
        names_t = (
            tuple(names)
            if names and len(names) == 2 and all(str(n).strip() for n in names)
            else DEFAULT_NAMES
        )
        size = int(resolution or 480)
        try:
            if source == SOURCE_SINGLE:
                if not single:
                    return None, "Upload one picture of the person: they fill the whole frame."
                problem = image_message(single, "single_image")
                if problem:
                    return None, problem
                one = single_scene(single, size=size, name=names_t[0], field="single_image")
                h, w = one.bucket
                return one.overlay, (
                    f"Scene {w}×{h} ({size}p bucket). One person, {html.escape(names_t[0])}, fills the frame and "
                    "speaks with voice 1."
                )
            if source == SOURCE_SCENE:
                if not scene:
                    return (
                        None,
                        "Upload one image with both people; boxes are optional (left and right halves).",
                    )
                problem = image_message(scene, "scene_image")
                if problem:
                    return None, problem
                result = scene_from_image(
                    scene, boxes if boxes and boxes.strip() else None, size=size, names=names_t
                )
            else:
                if not left and not right:
                    return None, "Upload the two portraits to see who is where."
                if not left or not right:
                    missing = "person 1 (left)" if not left else "person 2 (right)"
                    return None, f"Upload the portrait of {missing} too."
                problem = image_message(left, "left_image") or image_message(right, "right_image")
                if problem:
                    return None, problem
                result = compose_scene(
                    left, right, layout=layout, size=size, backdrop=backdrop or "blur", aspect=aspect or None,
                    names=names_t,
                )  # fmt: skip
        except ValueError as exc:
            default = {SOURCE_SCENE: "scene_image", SOURCE_SINGLE: "single_image"}.get(source, "left_image")
            return None, error_md(exc, default)
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

    # -- estimate

    def estimate(self, values: Mapping[str, Any]) -> str:
        """Markdown: preset description, speech length and model passes, and a time when the service
        knows its time per model pass (``info()["step_time_s"]``)."""
        preset = PRESETS.get(values.get("preset") or "")
        if preset is None:
            return ""
        # What this service runs for the preset (its LoRA mode): the description and settings /api/info shows.
        lines = [f"**{PRESET_LABELS.get(preset.name, preset.name)}**: {preset.describe(self.lora)}"]
        try:
            overrides = settings_overrides(values, self.job_defaults, self.lora)
            settings = preset.apply({**(self.job_defaults or {}), **overrides}, self.lora)
        except ValueError as exc:
            return "\n\n".join([*lines, error_md(exc, "settings")])
        seconds = None
        if values.get("speech") == SPEECH_AUDIO:
            missing = "upload both recordings to estimate the length"
            try:
                if values.get("source") == SOURCE_SINGLE and values.get("audio1"):
                    seconds = self.audio.seconds(values["audio1"], "audio1")
                elif values.get("audio1") and values.get("audio2"):
                    s1 = self.audio.seconds(values["audio1"], "audio1")
                    s2 = self.audio.seconds(values["audio2"], "audio2")
                    seconds = _speech_from_audio(s1, s2, values.get("audio_mode"))
            except (ValueError, OSError):  # the audio tab shows what is wrong with the file
                seconds = None
        else:
            missing = "write a script to estimate the length"
            script = values.get("script")
            if script and script.strip():
                try:
                    seconds = estimate_speech_seconds(parse_script(script))
                except ValueError:
                    seconds = None
        passes = settings.passes_per_step
        if seconds is None:
            lines.append(
                f"{plural(settings.steps, 'step')} × {passes} model passes per step per clip "
                f"({settings.resolution}p); {missing}."
            )
            return "\n\n".join(lines)
        try:
            check_speech_length(seconds, settings.to_dict(), field="script", source="estimated")
        except ValueError as exc:  # the submission refuses it with the same sentence
            lines.append(error_md(exc, "settings"))
            return "\n\n".join(lines)
        clips = count_clips(max(1, int(seconds * FPS)), settings)
        video_s = min(seconds, settings.output_frame_cap / FPS)
        text = (
            f"≈ {fmt_duration(video_s)} of video → {plural(clips, 'clip')} × {plural(settings.steps, 'step')} "
            f"× {passes} passes = {clips * settings.steps * passes} transformer passes at {settings.resolution}p"
        )
        step_time = self._step_time(settings.resolution)
        if step_time is not None:
            overhead = float(self.info().get("clip_overhead_s") or 0.0)
            eta = estimate_seconds(settings, seconds, step_time, clip_overhead_s=overhead)
            text += f"; estimated time on this service ≈ **{fmt_duration(eta)}**"
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

    def preview_voice(
        self, voice: str | None, script: str | None = None, speaker: int = 0, use_script: bool = False
    ) -> tuple[tuple[int, np.ndarray] | None, str]:
        """Speak with ``voice``: the first line of ``speaker`` (0 or 1) in the user's script when
        ``use_script`` and there is one, else the voice's sample. ((sample rate, float32 [N]) or None, message)."""
        if not voice:
            return None, "Choose a voice first."
        try:
            v = get_voice(voice)
        except ValueError as exc:
            return None, error_md(exc, "voice")
        line = self._script_line(script, speaker) if use_script else None
        if use_script and line is None:
            note = f" (no line of person {speaker + 1} in the script yet: the voice's sample instead)"
        else:
            note = ""
        if self._tts_preview is None:
            return None, (
                "Voice preview needs the Kokoro TTS engine, which is not loaded in this service "
                "(put the Kokoro-82M weights in weights/Kokoro-82M/ and restart). Jobs still use the chosen voice."
            )
        try:
            result = self._tts_preview(v.id, line)
        except Exception as exc:
            if answer_for(exc) is not None:  # bad text, too many previews (the REST API's answers)
                return None, error_md(exc, "voice")
            logger.exception("voice preview of %s failed", v.id)
            return None, f"⚠️ the voice preview failed: {exc}"
        try:
            sr, audio = as_audio(result)
        except ValueError as exc:
            logger.error("tts_preview returned an unusable result: %s", exc)
            return None, f"⚠️ the voice preview returned no usable audio ({exc})"
        said = f' saying "{line}"' if line else ""
        return (sr, audio), (
            f"{v.id}: {v.language_name}, {v.gender}, {v.description} ({len(audio) / sr:.1f} s){said}{note}"
        )

    @staticmethod
    def _script_line(script: str | None, speaker: int) -> str | None:
        if not script or not script.strip():
            return None
        try:
            dialogue = parse_script(script)
        except ValueError:
            return None
        for turn in dialogue.turns:
            if turn.speaker == speaker and turn.speech_text.strip():
                return turn.speech_text.strip()[:PREVIEW_LINE_CHARS]
        return None

    def remembered_voices(self, prefs: Any) -> tuple[str | None, str | None]:
        """Voices stored in the browser (``{"voice1": id, "voice2": id}``); ids that are unknown, or not
        installed on this service (so not in the dropdowns, and refused at submission), become None."""
        if not isinstance(prefs, Mapping):
            return None, None
        installed = self.limits.installed_voices

        def usable(v: Any) -> str | None:
            return v if v in VOICES and (installed is None or v in installed) else None

        return usable(prefs.get("voice1")), usable(prefs.get("voice2"))


def _speech_from_audio(s1: float, s2: float, mode: str | None) -> float:
    return max(s1, s2) if mode == "para" else s1 + s2


def as_audio(result: Any) -> tuple[int, np.ndarray]:
    """(sample rate, mono float32 [N]) from a tts_preview result: such a tuple, or WAV bytes."""
    if isinstance(result, bytes | bytearray):
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
