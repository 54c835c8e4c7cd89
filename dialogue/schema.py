"""The parsed dialogue: speakers, turns, limits and the user-facing error."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# How a script marks its speakers (``Dialogue.labels``) ...
LABEL_STYLES = ("tags", "roles", "letters", "names", "free")
# ... and what ``Dialogue.format`` reports: the label style of a plain script, or its layout.
FORMATS = (*LABEL_STYLES, "chat", "list", "screenplay")


@dataclass(frozen=True)
class Speaker:
    """One of the two people. Index 0 is role 1, the left person; index 1 is role 2, the right person."""

    index: int
    name: str  # display name for captions: "Speaker 1", "角色1", "A", "Alice", "小明" ...


@dataclass(frozen=True)
class Turn:
    """One stretch of speech by one speaker."""

    speaker: int  # 0 or 1
    text: str  # original text, whitespace collapsed (for subtitles)
    speech_text: str  # normalised for TTS (numbers, money, dates, maths as words)
    language: str  # "en" or "zh"
    pause_after: float  # seconds of explicit silence after this turn (0.0 if none)
    line: int  # 1-based line of the script where the turn starts
    directions: tuple[str, ...] = ()  # stage directions, not spoken: ("smiling",), ("waves", "laughs")


@dataclass(frozen=True)
class Dialogue:
    """A parsed script. A monologue is allowed: the other speaker then simply has no turns."""

    speakers: tuple[Speaker, Speaker]
    turns: tuple[Turn, ...]
    format: str  # one of FORMATS: the layout ("chat", "list", "screenplay") or, for a plain script, labels
    labels: str = ""  # one of LABEL_STYLES: how speakers were marked ("" when built by hand: same as format)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``json.dumps(d.to_dict(), ensure_ascii=False)``)."""
        return {
            "format": self.format,
            "labels": self.labels or self.format,
            "speakers": [{"index": s.index, "name": s.name} for s in self.speakers],
            "turns": [
                {
                    "speaker": t.speaker,
                    "text": t.text,
                    "speech_text": t.speech_text,
                    "language": t.language,
                    "pause_after": t.pause_after,
                    "line": t.line,
                    "directions": list(t.directions),
                }
                for t in self.turns
            ],
        }


@dataclass(frozen=True)
class ScriptLimits:
    """Bounds on what one script may ask for (the service's defaults; all must be positive)."""

    max_chars: int = 5000  # whole script, comments included
    max_line_chars: int = 500  # the text of one turn on one line (a line may hold several turns)
    max_turns: int = 200
    max_pause_s: float = 10.0  # total explicit pause after one turn

    def __post_init__(self) -> None:
        for name in ("max_chars", "max_line_chars", "max_turns", "max_pause_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"ScriptLimits.{name} must be a positive number, got {value!r}")


class ScriptError(ValueError):
    """A script the service cannot use. ``str()`` is ``"line N: message"`` when the line is known."""

    field = "script"

    def __init__(self, message: str, line: int | None = None) -> None:
        self.message = message
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)
