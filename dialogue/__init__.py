"""Dialogue scripts: parse scripts as people write them into turns, and normalise text for TTS.

Public API (a contract other packages code against)::

    parse_script(text, limits=ScriptLimits()) -> Dialogue     # raises ScriptError (ValueError, .field, .line)
    normalize_for_speech(text, language) -> str               # "en" | "zh"
    detect_language(text) -> str                              # "zh" if any CJK ideograph, else "en"

Formats, directions, pauses and comments are described in ``dialogue.script``, chat logs, lists and
screenplays in ``dialogue.layout``; ``python -m dialogue FILE`` prints a parsed script as JSON (its
format, speakers, and each turn's text, speech text and directions).
"""

from __future__ import annotations

from dialogue.markup import SHORT_PAUSE_S
from dialogue.normalize import LanguageError, detect_language, normalize_for_speech
from dialogue.schema import FORMATS, LABEL_STYLES, Dialogue, ScriptError, ScriptLimits, Speaker, Turn
from dialogue.script import parse_script

__all__ = [
    "FORMATS",
    "LABEL_STYLES",
    "SHORT_PAUSE_S",
    "Dialogue",
    "LanguageError",
    "ScriptError",
    "ScriptLimits",
    "Speaker",
    "Turn",
    "detect_language",
    "normalize_for_speech",
    "parse_script",
]
