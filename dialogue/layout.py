"""How a script is laid out around its speaker labels: chat logs, lists and screenplay blocks.

A layout is recognised from the whole script and takes what is not said off each line before the
label formats of ``dialogue.script`` apply:

- ``chat``: every message starts with a timestamp: ``[10:01] Alice: hi``, ``10:01 Alice: hi``,
  ``[29/11/2026, 10:01:02] Alice: hi`` (WhatsApp on iOS), ``29/11/2026, 10:01 - Alice: hi`` (WhatsApp on
  Android), ``[10:01] <alice> hi`` (IRC). The timestamp goes; a line without one continues the message
  before it; a timestamped line without a sender ("Messages are end-to-end encrypted") is a notice of
  the app and is skipped. The first line must carry a timestamp and at least one message a sender.
  Copies that put the sender and time on a line of their own above the message are chats too:
  ``Alice, [29.11.2026 10:01]`` (Telegram), ``Alice — Today at 10:01 AM`` (Discord), ``Alice  10:01 AM``
  (Slack); the message runs until the next such line.
- ``list``: every item starts with ``-``, ``*``, ``+``, ``•``, ``–``, ``—``, ``1.``, ``1)`` or ``1、``; the marker
  goes, and a line without one continues the item. The first line and at least two lines carry one.
- ``screenplay``: a name alone on its line (``ALICE``, ``DR. SMITH (V.O.)``, ``Alice``), then what that
  person says until a blank line or the next name line. Parentheticals on the name line are
  directions ("(CONT'D)" is dropped). A paragraph after a blank line that does not start with a name
  (a scene heading, action) is not said: it becomes a direction of the next turn. Recognised when the
  script starts with a name line (scene text before it must end in a blank line) and has two of
  them, or one in capitals. Common one-word replies ("Yes", "OK", "Thanks" ...) are never names.
- ``plain``: none of these; the lines are used as written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from dialogue.markup import PAUSE_LIKE_RE, STAMP, Label, name_at, role_at

logger = logging.getLogger(__name__)

LAYOUTS = ("plain", "chat", "list", "screenplay")

# "[10:01] ", "［10:01］", "[29/11/2026, 10:01:02] ", "10:01 ", "29/11/2026, 10:01 - ".
_CHAT_STAMP_RE = re.compile(rf"(?:[\[［]\s*{STAMP}\s*[\]］]\s*(?:[-–—]\s+)?|{STAMP}(?:\s+[-–—])?\s+)")
# A sender the label formats do not take: "<alice>" (IRC), "+49 151 2345678:", "mom ❤️:", "john smith:".
_IRC_RE = re.compile(r"<(?P<name>[^<>\s][^<>]{0,30})>\s*")
_LOOSE_SENDER_RE = re.compile(
    r"(?P<name>\+?\d[\d \-()]{5,20}\d|[^\W\d_][^:：\d\n]{0,39}?)\s*(?:：|:(?!//))\s*"
)
_MAX_SENDER_WORDS = 5
# A header line above the message: "Alice, [29.11.2026 10:01]" (Telegram), "Alice — Today at 10:01 AM"
# (Discord), "Alice  10:01 AM" (Slack, two spaces). The separator or the brackets are required, so that a
# sentence ending in a time ("We meet at 10:30") is not a header.
_HEADER_RE = re.compile(
    r"(?P<name>[^\W\d_][^\n\[\]［］:：]{0,39}?)"
    r"(?:\s*,\s*|\s+[—–-]\s+|\s{2,}|\s*(?=[\[［]))"
    rf"(?:[\[［]\s*{STAMP}\s*[\]］]|(?:(?i:today|yesterday)(?:\s+at)?\s+)?{STAMP})"
)
_TIME_WORDS = frozenset(
    {"at", "by", "until", "till", "around", "from", "to", "before", "after", "since", "about", "on"}
)
_LIST_RE = re.compile(r"(?:[-*+•‣◦–—]\s+|\d{1,3}[.)]\s+|\d{1,3}、\s*)")
# "ALICE", "DR. SMITH", "GUARD 2", "Mary Jane (V.O.)", "BOB (smiling)": a name, at most two parentheticals.
_SCREEN_NAME_RE = re.compile(
    r"(?P<name>[^\W\d_](?:[\w.'’ -]{0,30}[^\W\d_])?(?: \d{1,2})?)(?P<ext>(?:\s*[(（][^()（）\n]{1,40}[)）]){0,2})"
)
_EXT_RE = re.compile(r"[(（](?P<body>[^()（）\n]{1,40})[)）]")
_CONTD_RE = re.compile(r"(?i:cont(?:['’]?d|inued|\.)|more)")
_SCENE_RE = re.compile(r"(?i:int|ext|i/e)\b")
_MAX_SCREEN_NAME_WORDS = 4
_NAME_PARTICLES = {"van", "von", "de", "der", "da", "di", "du", "la", "le", "del", "bin", "al"}
# Words a one-line reply in a free script may be ("Hi" / "How are you?"): never a screenplay name.
_REPLY_WORDS = """hi hello hey yes yeah yep no nope ok okay sure fine thanks thank well right wow oh ah um uh hmm
bye goodbye good great cool nice really why what when where who how me you nothing please sorry welcome
morning evening night cheers indeed exactly absolutely definitely maybe perhaps agreed done ready wait
stop listen look alright true false never always again and but so then now here there this that it we
they he she the an of to in on at"""
_NOT_NAMES = frozenset(_REPLY_WORDS.split())


@dataclass(frozen=True)
class Line:
    """A content line after its layout is taken off."""

    number: int  # 1-based line of the script
    text: str  # what is left to read: no timestamp, list marker or screenplay name
    item: bool = False  # a list marker, chat timestamp or screenplay name started it
    label: Label | None = None  # the speaker, when the layout already told (chat sender, screenplay name)
    kind: str = "text"  # "text" | "notice" (chat line without a sender: skipped) | "action" (screenplay)


@dataclass(frozen=True)
class Source:
    """A content line as written: stripped, with whether a blank line came right before it."""

    number: int
    text: str
    blank_before: bool


def arrange(lines: Sequence[Source]) -> tuple[str, list[Line]]:
    """The script's layout (one of LAYOUTS) and its lines with the layout taken off."""
    arrangers = (("chat", _chat), ("chat", _chat_headers), ("list", _list), ("screenplay", _screenplay))
    for layout, arranger in arrangers:
        arranged = arranger(lines)
        if arranged is not None:
            logger.debug("layout %s", layout)
            return layout, arranged
    return "plain", [Line(s.number, s.text) for s in lines]


# ---------------------------------------------------------------- chat


def chat_sender(text: str) -> Label | None:
    """The sender at the start of a chat message (after its timestamp): a role, a name or a loose one."""
    label = role_at(text) or name_at(text)
    if label is not None:
        return label
    match = _IRC_RE.match(text) or _LOOSE_SENDER_RE.match(text)
    if match is None:
        return None
    name = match.group("name").strip()
    if len(name.split()) > _MAX_SENDER_WORDS:
        return None
    return Label("name", name, None, match.end())


def _chat(lines: Sequence[Source]) -> list[Line] | None:
    stamps = [_CHAT_STAMP_RE.match(s.text) for s in lines]
    if stamps[0] is None or (len(lines) > 1 and sum(m is not None for m in stamps) < 2):
        return None
    out: list[Line] = []
    senders = 0
    for source, stamp in zip(lines, stamps, strict=True):
        if stamp is None:
            out.append(Line(source.number, source.text))
            continue
        rest = source.text[stamp.end() :]
        label = chat_sender(rest)
        if label is None:
            out.append(Line(source.number, rest, item=True, kind="notice"))
            continue
        senders += 1
        out.append(Line(source.number, rest[label.end :], item=True, label=_stamped(label)))
    return out if senders else None


def _stamped(label: Label) -> Label:
    return Label(label.kind, label.written, label.number, 0, label.directions, True)


def chat_header(text: str) -> str | None:
    """The sender of a header line ("Alice, [29.11.2026 10:01]", "Alice — Today at 10:01 AM"), else None."""
    match = _HEADER_RE.fullmatch(text)
    if match is None:
        return None
    name = match.group("name").strip()
    words = name.split()
    if len(words) > _MAX_SENDER_WORDS or words[-1].casefold() in _TIME_WORDS:
        return None  # "We meet at - 10:30" is a sentence
    if len(words) > 1 and not all(word[0].isupper() or word in _NAME_PARTICLES for word in words):
        return None  # "See you, 10:30" is a sentence; "Jane Doe, [10:30]" is a sender
    return name


def _chat_headers(lines: Sequence[Source]) -> list[Line] | None:
    """Messages under a header line with the sender and the time (Telegram, Discord, Slack copies)."""
    senders = [chat_header(s.text) for s in lines]
    found = [i for i, name in enumerate(senders) if name is not None]
    if not found or found[0] != 0 or len({senders[i].casefold() for i in found}) < 2:  # type: ignore[union-attr]
        return None  # two people write in a chat; one header line over prose is a sentence
    if any(i + 1 < len(lines) and senders[i + 1] is not None for i in found):
        return None  # a header is followed by its message, not by another header
    return [
        Line(s.number, "", item=True, label=Label("name", name, None, 0, (), True))
        if name is not None
        else Line(s.number, s.text)
        for s, name in zip(lines, senders, strict=True)
    ]


# ---------------------------------------------------------------- lists


def _list(lines: Sequence[Source]) -> list[Line] | None:
    markers = [_LIST_RE.match(s.text) for s in lines]
    if markers[0] is None or (len(lines) > 1 and sum(m is not None for m in markers) < 2):
        return None
    return [
        Line(s.number, s.text[m.end() :], item=True) if m is not None else Line(s.number, s.text)
        for s, m in zip(lines, markers, strict=True)
    ]


# ---------------------------------------------------------------- screenplay


def screen_name(text: str) -> tuple[str, tuple[str, ...], bool] | None:
    """A screenplay name line -> (name, directions on it, whether the name is in capitals), else None."""
    match = _SCREEN_NAME_RE.fullmatch(text)
    if match is None:
        return None
    name = match.group("name").strip()
    words = name.split()
    if len(words) > _MAX_SCREEN_NAME_WORDS or _SCENE_RE.match(name):
        return None
    if any(not word[0].isalpha() for word in words[:-1]) or not (
        words[-1][0].isalpha() or words[-1].isdigit()
    ):
        return None  # "INT. KITCHEN - DAY"
    capitals = name.upper() == name and name.lower() != name
    titled = all(word[0].isupper() or word in _NAME_PARTICLES for word in words)
    if not (capitals or titled) or name.lower() == name.upper():
        return None  # "well then", or no letter case at all (Chinese names: use "小明：")
    if any(word.strip(".'’-").casefold() in _NOT_NAMES for word in words):
        return None
    directions = tuple(
        body
        for ext in _EXT_RE.finditer(match.group("ext"))
        if (body := ext.group("body").strip()) and not _CONTD_RE.fullmatch(body)
    )
    return name, directions, capitals


def _screenplay(lines: Sequence[Source]) -> list[Line] | None:
    names = [screen_name(s.text) for s in lines]
    # A name line is followed, with no blank line between, by a line that is not itself a name.
    is_name = [
        names[i] is not None and i + 1 < len(lines) and not lines[i + 1].blank_before and names[i + 1] is None
        for i in range(len(lines))
    ]
    found = [i for i, yes in enumerate(is_name) if yes]
    if not found:
        return None
    first = found[0]
    spoken_before = [i for i in range(first) if not PAUSE_LIKE_RE.match(lines[i].text)]
    if spoken_before and not lines[first].blank_before:
        return None  # text runs straight into the first "name": it is prose, not a screenplay
    capitals = all(names[i][2] for i in found)  # type: ignore[index]
    if len(found) < 2 and not capitals:
        return None
    out: list[Line] = []
    in_block = False
    for i, source in enumerate(lines):
        if is_name[i]:
            name, directions, _ = names[i]  # type: ignore[misc]
            label = role_at(name + ":") or Label("name", name, None, 0)
            label = Label(label.kind, label.written, label.number, 0, directions)
            out.append(Line(source.number, "", item=True, label=label))
            in_block = True
        elif PAUSE_LIKE_RE.match(source.text) or (in_block and not source.blank_before):
            out.append(Line(source.number, source.text))
        else:
            out.append(Line(source.number, source.text, kind="action"))
            in_block = False
    return out
