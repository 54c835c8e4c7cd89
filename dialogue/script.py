"""Dialogue script text -> ``Dialogue``.

Formats (detected from the script itself, Chinese, English or mixed):

- ``tags``:    ``(s1) 你好！ (s2) 是的。`` one turn per tag, several tags per line allowed; also ``（s1）``,
  ``[s1]``, ``【s1】``, any case. The MultiTalk demo's format.
- ``roles``:   ``角色1: ...`` / ``Speaker 2： ...`` / ``说话人1：...``. The number decides the role.
- ``letters``: ``A: ...`` / ``B: ...``. A is role 1, B is role 2.
- ``names``:   ``Alice: ...`` / ``小明：...``. The first name to speak is role 1 (left), the second role 2;
  names are kept for captions. A third distinct name is an error.
- ``free``:    one line per turn, speakers alternating 1, 2, 1, 2 ...

In the labelled formats a line without a label continues the previous turn. A names or letters script
must start with a label and have at least two labelled lines (or be a single line): otherwise a prose line
that happens to contain a colon ("Note: ...") would turn a free script into a one-speaker one.

Pauses ``[pause 1.5s]``, ``[pause 800ms]``, ``[停顿 1秒]``, ``<break time="1s"/>`` (own line or inline) add
silence after the turn before them. A pause in the middle of a turn splits it in two turns of the same
speaker, so that the silence lands where it was written. Blank lines are ignored; a line whose first
non-blank character is ``#`` is a comment.

A script with a single speaker is accepted (a monologue): the other person stays silent in the video.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field

from dialogue.markup import (
    PAUSE_LIKE_RE,
    PAUSE_RE,
    TAG_RE,
    Label,
    name_at,
    parse_pause,
    role_at,
    role_name,
    tag_at,
)
from dialogue.normalize import detect_language, normalize_for_speech
from dialogue.schema import Dialogue, ScriptError, ScriptLimits, Speaker, Turn

logger = logging.getLogger(__name__)

_WS_RE = re.compile(r"\s+")
_CJK_CHAR_RE = re.compile("[\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]")
_EXAMPLE = "(s1) Hello! / (s2) Hi there."


def parse_script(text: str, limits: ScriptLimits = ScriptLimits()) -> Dialogue:
    """Parse a dialogue script (any of the five formats, see the module docstring).

    Raises ScriptError (a ValueError with ``.field == "script"`` and ``.line``) for anything unusable.
    """
    if not isinstance(text, str):
        raise ScriptError(f"the script must be text, got {type(text).__name__}")
    text = text.removeprefix("\ufeff")
    if len(text) > limits.max_chars:
        raise ScriptError(
            f"the script is {len(text)} characters long; the limit is {limits.max_chars} characters"
        )
    lines = _content_lines(text, limits)
    if not lines:
        raise ScriptError(f"the script is empty: write at least one turn, e.g. {_EXAMPLE!r}")
    script_format = _detect_format(lines)
    logger.debug("script format %s, %d content lines", script_format, len(lines))
    builder = _Builder(script_format, limits)
    for number, line in lines:
        builder.feed_line(number, line)
    return builder.finish()


def _content_lines(text: str, limits: ScriptLimits) -> list[tuple[int, str]]:
    """(1-based line number, stripped line) for every line that is neither blank nor a comment."""
    out: list[tuple[int, str]] = []
    # Split on \n only (not str.splitlines) so that line numbers match what an editor shows.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if len(line) > limits.max_line_chars:
            raise ScriptError(
                f"the line is {len(line)} characters long; the limit is {limits.max_line_chars} per line "
                "(split a long turn over several lines)",
                number,
            )
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            out.append((number, stripped))
    return out


def _detect_format(lines: list[tuple[int, str]]) -> str:
    speech = [line for _, line in lines if not PAUSE_LIKE_RE.match(line)]
    if not speech:
        return "free"  # pauses only: the builder reports that nothing is said
    if any(tag_at(line) for line in speech):
        return "tags"
    if any(role_at(line) for line in speech):
        return "roles"
    names = [name_at(line) for line in speech]
    labelled = [label for label in names if label is not None]
    if names[0] is None or (len(labelled) < 2 and len(speech) > 1):
        return "free"
    letters = [label.written for label in labelled if len(label.written) == 1]
    if names[0].written in ("A", "B") and all(letter in ("A", "B") for letter in letters):
        return "letters"
    return "names"


@dataclass
class _Draft:
    """A turn being assembled."""

    speaker: int
    line: int
    parts: list[str] = field(default_factory=list)
    pause_after: float = 0.0
    closed: bool = False  # a pause came after its text: more text starts a new turn
    text: str = ""  # set when the draft is closed
    speech_text: str = ""
    language: str = ""


class _Builder:
    """Feeds lines in order, keeps the turn being assembled, resolves speakers, checks limits."""

    def __init__(self, script_format: str, limits: ScriptLimits) -> None:
        self.format = script_format
        self.limits = limits
        self.names: list[str | None] = [None, None]
        self.name_lines: list[int] = [0, 0]
        self.keys: list[str] = []  # names format: casefolded names in order of first appearance
        self.first_role: Label | None = None
        self.drafts: list[_Draft] = []  # finished drafts, kept until finish() so pauses can still be added
        self.current: _Draft | None = None
        self.free_next = 0

    # -- lines
    def feed_line(self, number: int, line: str) -> None:
        if self.format == "tags":
            self._feed_tags(number, line)
            return
        if self.format == "free":
            if _strip_pauses(line):
                self._start(self.free_next, number)
                self.free_next = 1 - self.free_next
            self._feed_text(number, line)
            return
        label = role_at(line) if self.format == "roles" else name_at(line)
        if label is not None and self.format == "letters" and len(label.written) != 1:
            label = None  # "Note: ..." in an A/B script is text, not a speaker
        if label is None:
            self._check_continuation(number, line)
            self._feed_text(number, line)
            return
        self._begin(label, number)
        self._feed_text(number, line[label.end :])

    def _feed_tags(self, number: int, line: str) -> None:
        if tag_at(line) is None:
            self._check_continuation(number, line)
        pos = 0
        for match in TAG_RE.finditer(line):
            self._feed_text(number, line[pos : match.start()])
            label = tag_at(line, match.start())
            assert label is not None
            self._begin(label, number)
            pos = label.end
        self._feed_text(number, line[pos:])

    def _feed_text(self, number: int, text: str) -> None:
        """Text with inline pauses: text goes to the current turn, a pause closes it."""
        pos = 0
        for match in PAUSE_RE.finditer(text):
            self._add_text(number, text[pos : match.start()])
            self._add_pause(number, parse_pause(match, number, self.limits.max_pause_s))
            pos = match.end()
        self._add_text(number, text[pos:])

    def _check_continuation(self, number: int, line: str) -> None:
        if self.current is None and not self.drafts:
            if PAUSE_LIKE_RE.match(line):
                return  # reported by _add_pause with a clearer message
            raise self._text_before_speaker(number)
        role = role_at(line)
        if self.format == "tags" and role is not None:
            raise ScriptError(
                f"{role.written!r} mixes speaker styles: this script marks speakers with (s1)/(s2) tags, "
                f"so write (s{role.number}) instead",
                number,
            )

    def _text_before_speaker(self, number: int) -> ScriptError:
        hint = {
            "tags": "tag ((s1) or (s2))",
            "roles": "label (角色1: or 角色2:)",
            "letters": "label (A: or B:)",
            "names": "label (Name:)",
        }.get(self.format, "label")
        return ScriptError(
            f"text before the first speaker {hint}: start the line with one, or make it a comment with '#'",
            number,
        )

    # -- speakers
    def _speaker_of(self, label: Label, number: int) -> int:
        if label.kind == "tag":
            if label.number not in (1, 2):
                raise ScriptError(
                    f"unknown speaker tag {label.written!r}: only (s1) and (s2) are allowed "
                    "(a dialogue has two speakers)",
                    number,
                )
            return self._remember(label.number - 1, f"Speaker {label.number}", number)
        if label.kind == "role":
            if label.number not in (1, 2):
                one, two = (role_name(label, n) for n in (1, 2))
                raise ScriptError(
                    f"unknown role {label.written!r}: only {one} and {two} are allowed "
                    "(a dialogue has two speakers)",
                    number,
                )
            if self.first_role is None:
                self.first_role = label
            return self._remember(label.number - 1, label.written, number)
        if self.format == "letters":
            if label.written not in ("A", "B"):
                raise ScriptError(
                    f"a third speaker {label.written!r}: a dialogue has two speakers, A and B", number
                )
            return self._remember("AB".index(label.written), label.written, number)
        key = label.written.casefold()
        if key not in self.keys:
            if len(self.keys) == 2:
                first, second = self.names
                raise ScriptError(
                    f"a third speaker {label.written!r}: a dialogue has two speakers and this script already "
                    f"has {first!r} (line {self.name_lines[0]}) and {second!r} (line {self.name_lines[1]}); "
                    "if this line continues the previous turn, reword it so it does not start with 'Name:'",
                    number,
                )
            self.keys.append(key)
        return self._remember(self.keys.index(key), label.written, number)

    def _remember(self, index: int, name: str, number: int) -> int:
        if self.names[index] is None:
            self.names[index] = name
            self.name_lines[index] = number
        return index

    def _speakers(self) -> tuple[Speaker, Speaker]:
        names = list(self.names)
        for index in (0, 1):
            if names[index] is None:
                if self.format == "roles" and self.first_role is not None:
                    names[index] = role_name(self.first_role, index + 1)
                elif self.format == "letters":
                    names[index] = "AB"[index]
                else:
                    names[index] = f"Speaker {index + 1}"
        return Speaker(0, names[0] or "Speaker 1"), Speaker(1, names[1] or "Speaker 2")

    # -- turns
    def _begin(self, label: Label, number: int) -> None:
        """A speaker label: close the turn before it first, so that errors are reported in line order."""
        self._close_current()
        self._start(self._speaker_of(label, number), number)

    def _start(self, speaker: int, number: int) -> None:
        self._close_current()
        self.current = _Draft(speaker, number)

    def _add_text(self, number: int, text: str) -> None:
        text = _WS_RE.sub(" ", text).strip()
        if not text:
            return
        if self.current is None:
            raise self._text_before_speaker(number)
        if self.current.closed:
            self._start(self.current.speaker, number)
            assert self.current is not None
        self.current.parts.append(text)

    def _add_pause(self, number: int, seconds: float) -> None:
        if self.current is not None and self.current.parts:
            target = self.current
            target.closed = True
        elif self.drafts:
            target = self.drafts[-1]  # a pause right after a label belongs before that speaker's words
        else:
            raise ScriptError(
                "a pause before anything is said: a pause adds silence after a turn, so put it after one",
                number,
            )
        target.pause_after += seconds
        if target.pause_after > self.limits.max_pause_s + 1e-9:
            raise ScriptError(
                f"the pauses after one turn add up to {target.pause_after:g} s; the limit is "
                f"{self.limits.max_pause_s:g} s",
                number,
            )

    def _close_current(self) -> None:
        draft, self.current = self.current, None
        if draft is None:
            return
        who = self._speakers()[draft.speaker].name
        if not draft.parts:
            raise ScriptError(
                f"the turn of {who} is empty: write what {who} says after the label", draft.line
            )
        draft.text = _join_parts(draft.parts)
        draft.language = detect_language(draft.text)
        draft.speech_text = normalize_for_speech(draft.text, draft.language)
        if not any(unicodedata.category(ch)[0] in "LN" for ch in draft.speech_text):
            raise ScriptError(
                f"the turn of {who} has nothing to speak: {draft.text!r} has no words (only punctuation, "
                "symbols or emoji)",
                draft.line,
            )
        self.drafts.append(draft)
        if len(self.drafts) > self.limits.max_turns:
            raise ScriptError(
                f"too many turns: the limit is {self.limits.max_turns} turns per script", draft.line
            )

    def finish(self) -> Dialogue:
        self._close_current()
        if not self.drafts:
            raise ScriptError(
                f"the script has no speech, only pauses: write at least one turn, e.g. {_EXAMPLE!r}"
            )
        turns = tuple(
            Turn(
                speaker=draft.speaker,
                text=draft.text,
                speech_text=draft.speech_text,
                language=draft.language,
                pause_after=round(draft.pause_after, 3),
                line=draft.line,
            )
            for draft in self.drafts
        )
        return Dialogue(speakers=self._speakers(), turns=turns, format=self.format)


def _strip_pauses(line: str) -> str:
    return PAUSE_RE.sub("", line).strip()


def _join_parts(parts: list[str]) -> str:
    """Join continuation lines: a space between words, nothing between two CJK characters."""
    out = parts[0]
    for part in parts[1:]:
        glue = "" if _CJK_CHAR_RE.match(out[-1]) and _CJK_CHAR_RE.match(part[0]) else " "
        out += glue + part
    return out
