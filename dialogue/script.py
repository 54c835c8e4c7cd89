"""Dialogue script text -> ``Dialogue``.

How speakers are marked (``Dialogue.labels``; detected from the script itself, Chinese, English or mixed):

- ``tags``:    ``(s1) 你好！ (s2) 是的。`` one turn per tag, several tags per line allowed; also ``（s1）``,
  ``[s1]``, ``【s1】``, any case. The MultiTalk demo's format.
- ``roles``:   ``角色1: ...`` / ``Speaker 2： ...`` / ``说话人1：...``. The number decides the role.
- ``letters``: ``A: ...`` / ``B: ...``. A is role 1, B is role 2.
- ``names``:   ``Alice: ...`` / ``小明：...`` / ``Alice (whispering): ...``. The first name to speak is
  role 1 (left), the second role 2; names are kept for captions. A third distinct name is an error.
- ``free``:    one line per turn, speakers alternating 1, 2, 1, 2 ...

Around the labels, a script may be laid out as a chat log, a list or a screenplay (``dialogue.layout``);
``Dialogue.format`` is then ``chat``, ``list`` or ``screenplay``, otherwise the label format. A names
label with a timestamp (``Alice (10:01): hi``) also makes a ``chat``.

In the labelled formats a line without a label continues the previous turn. A names or letters script
must start with a label and have at least two labelled lines (or be a single line): otherwise a prose line
that happens to contain a colon ("Note: ...") would turn a free script into a one-speaker one.

Directions are not spoken: ``(smiling)``, ``*waves*``, ``[laughs]``, ``（笑）``, ``<Media omitted>`` and the
parentheticals of a label are kept on the turn as ``directions`` and taken out of ``speech_text``;
``text`` (the subtitle) keeps them where they were written. Maths spans (``$...$``) and brackets that
hold numbers or maths (``(x + 1)``, ``f(x)``, ``[1]``) are read as text. A line that is only directions
belongs to the turn it follows; in a free script, or before the first speaker, to the turn after it.

Pauses ``[pause 1.5s]``, ``[pause 800ms]``, ``[停顿 1秒]``, ``<break time="1s"/>``, ``(pause 2s)`` (own
line or inline) add silence after the turn before them; ``[pause]``, ``(pause)``, ``(beat)`` and a lone
``…`` or ``...`` add ``SHORT_PAUSE_S`` (0.5 s). A pause in the middle of a turn splits it in two turns of
the same speaker, so that the silence lands where it was written. Blank lines are ignored (except in
a screenplay); a line whose first non-blank character is ``#`` is a comment.

``ScriptLimits.max_line_chars`` bounds the text of one turn on one line, so a one-line
``(s1) ... (s2) ...`` script of any total length within ``max_chars`` is accepted.

A script with a single speaker is accepted (a monologue): the other person stays silent in the video.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field

from dialogue.layout import Line, Source, arrange
from dialogue.markup import (
    PAUSE_LIKE_RE,
    TAG_RE,
    TEXT_MARK_RE,
    Label,
    direction_of,
    mark_kind,
    name_at,
    parse_pause,
    role_at,
    role_name,
    speaks,
    tag_at,
)
from dialogue.normalize import detect_language, normalize_for_speech
from dialogue.schema import Dialogue, ScriptError, ScriptLimits, Speaker, Turn

logger = logging.getLogger(__name__)

_WS_RE = re.compile(r"\s+")
_CJK_CHAR_RE = re.compile("[\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]")
# Invisible direction marks that messenger exports put around names and times.
_BIDI_RE = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_EXAMPLE = "(s1) Hello! / (s2) Hi there."


def parse_script(text: str, limits: ScriptLimits = ScriptLimits()) -> Dialogue:
    """Parse a dialogue script (any of the formats, see the module docstring).

    Raises ScriptError (a ValueError with ``.field == "script"`` and ``.line``) for anything unusable.
    """
    if not isinstance(text, str):
        raise ScriptError(f"the script must be text, got {type(text).__name__}")
    text = text.removeprefix("\ufeff")
    if len(text) > limits.max_chars:
        raise ScriptError(
            f"the script is {len(text)} characters long; the limit is {limits.max_chars} characters"
        )
    sources = _content_lines(_BIDI_RE.sub("", text))
    if not sources:
        raise ScriptError(f"the script is empty: write at least one turn, e.g. {_EXAMPLE!r}")
    layout, lines = arrange(sources)
    labels = _preset_labels(lines) if layout in ("chat", "screenplay") else detect_labels(lines, layout)
    logger.debug("script layout %s, labels %s, %d content lines", layout, labels, len(lines))
    builder = _Builder(layout, labels, limits)
    for line in lines:
        builder.feed(line)
    return builder.finish()


def _content_lines(text: str) -> list[Source]:
    """Every line that is neither blank nor a comment: stripped, numbered from 1, with whether a blank
    line came before it (a comment between two lines is not a blank line)."""
    out: list[Source] = []
    blank = False
    # Split on \n only (not str.splitlines) so that line numbers match what an editor shows.
    for number, raw in enumerate(text.split("\n"), start=1):
        stripped = raw.strip()
        if not stripped:
            blank = True
        elif not stripped.startswith("#"):
            out.append(Source(number, stripped, blank))
            blank = False
    return out


def detect_labels(lines: list[Line], layout: str = "plain") -> str:
    """How a plain script or a list marks its speakers: tags, roles, letters, names or free."""
    candidates = [line for line in lines if line.item] if layout == "list" else lines
    speech = [line.text for line in candidates if speaks(line.text) and not PAUSE_LIKE_RE.match(line.text)]
    if not speech:
        return "free"  # pauses and directions only: the builder reports that nothing is said
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


def _preset_labels(lines: list[Line]) -> str:
    """Chat senders and screenplay names: roles when all are roles, letters when all are A or B."""
    given = [line.label for line in lines if line.label is not None]
    if given and all(label.kind == "role" for label in given):
        return "roles"
    if given and all(label.written in ("A", "B") for label in given):
        return "letters"
    return "names"


@dataclass
class _Draft:
    """A turn being assembled."""

    speaker: int
    line: int
    parts: list[str] = field(default_factory=list)  # as written, directions included (subtitles)
    spoken: list[str] = field(default_factory=list)  # the same without directions
    directions: list[str] = field(default_factory=list)
    pause_after: float = 0.0
    closed: bool = False  # a pause came after its text: more text starts a new turn
    text: str = ""  # set when the draft is closed
    speech_text: str = ""
    language: str = ""


class _Builder:
    """Feeds lines in order, keeps the turn being assembled, resolves speakers, checks limits."""

    def __init__(self, layout: str, labels: str, limits: ScriptLimits) -> None:
        self.layout = layout
        self.labels = labels
        self.limits = limits
        self.names: list[str | None] = [None, None]
        self.name_lines: list[int] = [0, 0]
        self.keys: list[str] = []  # names format: casefolded names in order of first appearance
        self.first_role: Label | None = None
        self.drafts: list[_Draft] = []  # finished drafts, kept until finish() so pauses can still be added
        self.current: _Draft | None = None
        self.pending: list[str] = []  # directions waiting for the next turn
        self.free_next = 0
        self.stamped = False  # a label carried a chat timestamp

    # -- lines
    def feed(self, line: Line) -> None:
        number, text = line.number, line.text
        if line.kind == "notice":
            logger.info("line %d: a chat notice without a sender, skipped: %.60s", number, text)
            return
        if line.kind == "action":
            self._check_length(number, text)
            self.pending.append(_WS_RE.sub(" ", text))
            return
        if line.label is not None:
            self._begin(line.label, number)
            self._feed_text(number, text)
            return
        if not speaks(text) and (self.labels == "free" or (self.current is None and not self.drafts)):
            self._feed_text(number, text, defer=True)  # "(smiling)" before the turn it is about
            return
        if self.layout in ("chat", "screenplay"):
            self._check_continuation(number, text)
            self._feed_text(number, text)
        elif self.labels == "tags":
            self._feed_tags(number, text)
        elif self.labels == "free":
            if self.layout == "plain" or line.item:
                self._start(self.free_next, number)
                self.free_next = 1 - self.free_next
            self._feed_text(number, text)
        else:
            self._feed_labelled(line)

    def _feed_labelled(self, line: Line) -> None:
        number, text = line.number, line.text
        label = role_at(text) if self.labels == "roles" else name_at(text)
        if label is not None and self.labels == "letters" and len(label.written) != 1:
            label = None  # "Note: ..." in an A/B script is text, not a speaker
        if label is None and line.item and not PAUSE_LIKE_RE.match(text):
            raise ScriptError(
                "this list item has no speaker: start it with the speaker's label like the other items "
                f"({self._hint()})",
                number,
            )
        if label is None:
            self._check_continuation(number, text)
            self._feed_text(number, text)
            return
        self._begin(label, number)
        self._feed_text(number, text[label.end :])

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

    def _feed_text(self, number: int, text: str, defer: bool = False) -> None:
        """Text with inline pauses and directions: text goes to the current turn, a pause closes it.
        ``defer``: the directions wait for the next turn and their words stay out of the subtitles."""
        self._check_length(number, text)
        written: list[str] = []
        spoken: list[str] = []
        directions: list[str] = []
        pos = 0
        for match in TEXT_MARK_RE.finditer(text):
            kind = mark_kind(match)
            if kind == "text":
                continue  # read as written, with the text around it
            before = text[pos : match.start()]
            written.append(before)
            spoken.append(before)
            if kind == "pause":
                self._add_text(number, "".join(written), "".join(spoken), directions)
                written, spoken, directions = [], [], []
                self._add_pause(number, parse_pause(match, number, self.limits.max_pause_s))
            elif defer:
                self.pending.append(direction_of(match))
            else:
                written.append(match.group(0))
                spoken.append(" ")
                directions.append(direction_of(match))
            pos = match.end()
        written.append(text[pos:])
        spoken.append(text[pos:])
        self._add_text(number, "".join(written), "".join(spoken), directions)

    def _check_length(self, number: int, text: str) -> None:
        length = len(text.strip())
        if length > self.limits.max_line_chars:
            raise ScriptError(
                f"this turn has {length} characters on one line; the limit is {self.limits.max_line_chars} "
                "per turn on a line (split a long turn over several lines)",
                number,
            )

    def _check_continuation(self, number: int, line: str) -> None:
        if self.current is None and not self.drafts:
            if PAUSE_LIKE_RE.match(line):
                return  # reported by _add_pause with a clearer message
            raise self._text_before_speaker(number)
        role = role_at(line)
        if self.labels == "tags" and role is not None:
            raise ScriptError(
                f"{role.written!r} mixes speaker styles: this script marks speakers with (s1)/(s2) tags, "
                f"so write (s{role.number}) instead",
                number,
            )

    def _hint(self) -> str:
        if self.layout == "screenplay":
            return "name on its own line (ALICE)"
        return {
            "tags": "tag ((s1) or (s2))",
            "roles": "label (角色1: or 角色2:)",
            "letters": "label (A: or B:)",
            "names": "label (Name:)",
        }.get(self.labels, "label")

    def _text_before_speaker(self, number: int) -> ScriptError:
        return ScriptError(
            f"text before the first speaker {self._hint()}: start the line with one, or make it a comment "
            "with '#'",
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
        if label.kind == "role" and self.labels == "roles":
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
        if self.labels == "letters":
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
                    + (
                        "if this line continues the previous turn, reword it so it does not start with 'Name:'"
                        if self.layout not in ("chat", "screenplay")
                        else "a chat or screenplay with more people cannot be made into a two-person video"
                    ),
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
                if self.labels == "roles" and self.first_role is not None:
                    names[index] = role_name(self.first_role, index + 1)
                elif self.labels == "letters":
                    names[index] = "AB"[index]
                else:
                    names[index] = f"Speaker {index + 1}"
        return Speaker(0, names[0] or "Speaker 1"), Speaker(1, names[1] or "Speaker 2")

    # -- turns
    def _begin(self, label: Label, number: int) -> None:
        """A speaker label: close the turn before it first, so that errors are reported in line order."""
        self._close_current()
        self._start(self._speaker_of(label, number), number)
        assert self.current is not None
        self.current.directions.extend(label.directions)
        self.stamped = self.stamped or label.stamp

    def _start(self, speaker: int, number: int) -> None:
        self._close_current()
        self.current = _Draft(speaker, number, directions=self.pending)
        self.pending = []

    def _add_text(self, number: int, written: str, spoken: str, directions: list[str]) -> None:
        written = _WS_RE.sub(" ", written).strip()
        spoken = _WS_RE.sub(" ", spoken).strip()
        if not written:
            return
        if self.current is None:
            raise self._text_before_speaker(number)
        if self.current.closed and spoken:
            self._start(self.current.speaker, number)
            assert self.current is not None
        self.current.parts.append(written)
        if spoken:
            self.current.spoken.append(spoken)
        self.current.directions.extend(directions)

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
        spoken = _join_parts(draft.spoken) if draft.spoken else ""
        draft.language = detect_language(spoken or draft.text)
        draft.speech_text = normalize_for_speech(spoken, draft.language) if spoken else ""
        if not any(unicodedata.category(ch)[0] in "LN" for ch in draft.speech_text):
            if not spoken and draft.directions:
                shown = ", ".join(repr(d) for d in draft.directions[:3])
                raise ScriptError(
                    f"the turn of {who} has only directions ({shown}) and nothing to speak: write what {who} "
                    "says, or delete the turn",
                    draft.line,
                )
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
                f"the script has no speech, only pauses or directions: write at least one turn, e.g. {_EXAMPLE!r}"
            )
        self.drafts[-1].directions.extend(self.pending)  # directions after the last turn
        turns = tuple(
            Turn(
                speaker=draft.speaker,
                text=draft.text,
                speech_text=draft.speech_text,
                language=draft.language,
                pause_after=round(draft.pause_after, 3),
                line=draft.line,
                directions=tuple(draft.directions),
            )
            for draft in self.drafts
        )
        if self.layout != "plain":
            script_format = self.layout
        else:
            script_format = "chat" if self.stamped else self.labels
        return Dialogue(speakers=self._speakers(), turns=turns, format=script_format, labels=self.labels)


def _join_parts(parts: list[str]) -> str:
    """Join continuation lines: a space between words, nothing between two CJK characters."""
    out = parts[0]
    for part in parts[1:]:
        glue = "" if _CJK_CHAR_RE.match(out[-1]) and _CJK_CHAR_RE.match(part[0]) else " "
        out += glue + part
    return out
