"""Speech for two-person dialogue videos.

- ``tts.voices``: catalog of the 54 Kokoro v1.0 voices.
- ``tts.engine.KokoroEngine``: Kokoro-82M from a local folder (never the hub); ``Synthesizer`` protocol.
- ``tts.timeline.build_timeline``: dialogue -> two equal-length 24 kHz tracks, timings, subtitles.
- ``tts.user_audio.timeline_from_files``: uploaded recordings -> the same ``Timeline``.
- ``tts.tiny.write_tiny_kokoro``: a seeded random-weight Kokoro folder for tests and the CPU demo.

``KokoroEngine`` and ``write_tiny_kokoro`` are imported lazily: importing kokoro pulls in transformers.
"""

from __future__ import annotations

from typing import Any

from tts.errors import AudioInputError, KokoroWeightsError, TTSInputError, UnknownVoiceError
from tts.timeline import Timeline, TurnTiming, build_timeline
from tts.user_audio import load_audio, timeline_from_files
from tts.voices import DEFAULT_VOICES, VOICES, Voice, get_voice, voices_by_language

__all__ = [
    "DEFAULT_VOICES",
    "VOICES",
    "AudioInputError",
    "KokoroEngine",
    "KokoroWeightsError",
    "Synthesizer",
    "TTSInputError",
    "Timeline",
    "TurnTiming",
    "UnknownVoiceError",
    "Voice",
    "build_timeline",
    "get_voice",
    "load_audio",
    "timeline_from_files",
    "voices_by_language",
    "write_tiny_kokoro",
]


def __getattr__(name: str) -> Any:
    if name in ("KokoroEngine", "Synthesizer"):
        from tts import engine

        return getattr(engine, name)
    if name == "write_tiny_kokoro":
        from tts.tiny import write_tiny_kokoro

        return write_tiny_kokoro
    raise AttributeError(f"module 'tts' has no attribute {name!r}")
