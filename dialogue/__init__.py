"""Dialogue scripts: parse the five script formats into turns, and normalise text for TTS.

Public API (a contract other packages code against)::

    parse_script(text, limits=ScriptLimits()) -> Dialogue     # raises ScriptError (ValueError, .field, .line)
    normalize_for_speech(text, language) -> str               # "en" | "zh"
    detect_language(text) -> str                              # "zh" if any CJK ideograph, else "en"

Formats, pauses and comments are described in ``dialogue.script``; ``python -m dialogue FILE`` prints a
parsed script as JSON.
"""

from __future__ import annotations

from dialogue.normalize import LanguageError, detect_language, normalize_for_speech
from dialogue.schema import FORMATS, Dialogue, ScriptError, ScriptLimits, Speaker, Turn
from dialogue.script import parse_script

__all__ = [
    "FORMATS",
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
