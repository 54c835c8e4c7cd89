"""How long a job's speech is, and the length cap it must fit: a video is never cut short of its speech.

A job's video is as long as its speech, at most ``GenerationSettings.max_frames`` frames at 25 fps in
streaming mode (default ``MAX_FRAMES_LIMIT`` = 9000 = 6 min, which covers what the script limits allow:
5,000 characters are about 5.5 minutes of English speech). Speech longer than the cap in force is refused
twice, with the figures, and never cut:

- at submission (``inference.render.intake.build_job``), from the script's estimated length
  (``estimate_speech_seconds``) or the recordings' exact lengths (``recordings_seconds``);
- after TTS (``inference.render.pipeline.Renderer.prepare``), from the synthesised speech itself, when
  the estimate was low: the job fails before any clip is rendered.

Clip mode (``mode = "clip"``) renders one clip by request (upstream's ``--mode clip``); its video is
one clip long whatever the speech, and the render record says so (``render.json`` ``length``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from common.errors import InputError
from inference.render.settings import FPS, MAX_FRAMES_LIMIT

logger = logging.getLogger(__name__)

# Kokoro at speed 1.0 speaks about 15 Latin characters or 4.5 CJK characters per second; each turn adds
# about 0.3 s (its lead-in and the gap to the next turn).
LATIN_CHARS_PER_S = 15.0
CJK_CHARS_PER_S = 4.5
TURN_OVERHEAD_S = 0.3


class SpeechTooLongError(InputError):
    """The speech is longer than the job's length cap; ``field`` is the input to change."""


def _is_cjk(ch: str) -> bool:
    return "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def estimate_speech_seconds(dialogue: Any) -> float:
    """Rough spoken length of a parsed ``dialogue.Dialogue`` (Kokoro at speed 1.0), pauses included."""
    total = 0.0
    for turn in dialogue.turns:
        cjk = sum(1 for ch in turn.speech_text if _is_cjk(ch))
        other = len(turn.speech_text) - cjk
        total += cjk / CJK_CHARS_PER_S + other / LATIN_CHARS_PER_S + TURN_OVERHEAD_S + turn.pause_after
    return total


def recordings_seconds(seconds: Mapping[str, float], mode: str | None) -> float:
    """Speech length of uploaded recordings (``{"person1": s, "person2": s}``): one after the other
    (``add``) or at once (``para``)."""
    values = [float(s) for s in seconds.values()]
    if not values:
        return 0.0
    return max(values) if mode == "para" else sum(values)


def speech_end(timeline: Any) -> float:
    """Seconds from the start to the end of the last spoken turn of a ``tts.timeline.Timeline`` (its
    trailing silence, padding up to one clip, is not speech)."""
    ends = [float(t.end) for t in timeline.turns]
    return max(ends) if ends else float(timeline.duration)


def seconds_text(seconds: float) -> str:
    """``167.4`` -> ``"167 s (2 min 47 s)"``; ``40`` -> ``"40 s"``; one decimal under 10 s."""
    seconds = max(0.0, float(seconds))
    text = f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds >= 60:
        minutes, secs = divmod(round(seconds), 60)
        text += f" ({minutes} min {secs:02d} s)"
    return text


def frames_needed(seconds: float) -> int:
    """The ``max_frames`` that holds ``seconds`` of speech, rounded up to a whole second."""
    return max(1, math.ceil(seconds - 1e-9)) * FPS


def check_speech_length(seconds: float, settings: Mapping[str, Any], *, field: str, source: str) -> None:
    """Refuse speech longer than the streaming cap of ``settings`` (a ``GenerationSettings.to_dict()``).

    seconds: the speech length (estimated from the script, or measured). source: how it was found, for
    the message ("estimated from the script", "the recordings", "synthesised"). field: the speech input
    (``script``, ``audio1``), named when raising the cap cannot help. Raises ``SpeechTooLongError`` with
    the seconds of speech, the cap, and how to raise it; clip mode is not checked (one clip by request).
    """
    if settings.get("mode") == "clip":
        return
    cap = int(settings["max_frames"])
    cap_s = cap / FPS
    if seconds <= cap_s + 1e-6:
        return
    speech = f"{seconds_text(seconds)} of speech ({source})"
    need = frames_needed(seconds)
    longest = f"{MAX_FRAMES_LIMIT} frames = {seconds_text(MAX_FRAMES_LIMIT / FPS)}"
    if need > MAX_FRAMES_LIMIT:
        raise SpeechTooLongError(
            field,
            f"{speech} is longer than the longest video, {longest} at {FPS} fps; shorten it or split it "
            "into several jobs (the video is never cut short of its speech)",
        )
    raise SpeechTooLongError(
        "settings.max_frames",
        f"{speech} is longer than this job's length cap, max_frames = {cap} frames = {seconds_text(cap_s)} "
        f"at {FPS} fps; raise the setting max_frames to at least {need} (the page's Maximum length: at least "
        f"{seconds_text(need / FPS)}; the most is {longest}) or shorten the speech (the video is never cut "
        "short of its speech)",
    )


def subtitles_within(timeline: Any, seconds: float) -> dict[str, str]:
    """``{"srt", "vtt"}`` subtitles of ``timeline`` that end with a video of ``seconds``: every cue when
    the speech fits (always, outside clip mode), else the cues that start within it, the last one
    ending with the video (clip mode's one clip)."""
    if speech_end(timeline) <= seconds + 1e-6:
        return {"srt": timeline.to_srt(), "vtt": timeline.to_vtt()}
    kept = [dataclasses.replace(t, end=min(t.end, seconds)) for t in timeline.turns if t.start < seconds]
    cut = dataclasses.replace(timeline, turns=kept)
    return {"srt": cut.to_srt(), "vtt": cut.to_vtt()}


def length_record(timeline: Any, dialogue: Any, frames: int, settings: Any) -> dict[str, Any]:
    """What ``render.json`` says about length and turns: ``length`` {speech_s, video_s, cap_frames,
    cut: true only in clip mode when the speech ran past its one clip} and, for a script, ``turns``: per
    turn its speaker, times, line and ``directions`` (stage directions, not spoken), for the prompt
    or a later pass to use."""
    speech = speech_end(timeline)
    video = frames / FPS
    record: dict[str, Any] = {
        "length": {
            "speech_s": round(speech, 3),
            "video_s": round(video, 3),
            "cap_frames": int(settings.output_frame_cap),
            "cut": speech > video + 1.0 / FPS,
        }
    }
    if dialogue is not None:
        record["turns"] = [
            {"index": t.index, "speaker": t.speaker, "line": turn.line, "start": round(t.start, 3),
             "end": round(t.end, 3), "directions": list(turn.directions)}
            for t, turn in zip(timeline.turns, dialogue.turns, strict=True)
        ]  # fmt: skip
    return record
