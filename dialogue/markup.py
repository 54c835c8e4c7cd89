"""The marks a script is written with: speaker tags, role/name labels and pause markers.

Only recognition lives here (regular expressions and small value objects); deciding what a line means
in the context of the whole script is ``dialogue.script``'s job.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from dialogue.normalize import MATH_SPAN_RE
from dialogue.schema import ScriptError

logger = logging.getLogger(__name__)

# (s1) （s2） [s1] ［s2］ 【s1】, any case, optionally followed by a colon. Round and square brackets
# each accept their full-width twins because Chinese input methods switch width mid-line.
TAG_RE = re.compile(
    r"(?:[(（]\s*[sS]\s*(?P<n1>\d+)\s*[)）]|[\[［【]\s*[sS]\s*(?P<n2>\d+)\s*[\]］】])[ \t]*[:：]?"
)
# After a name or role, before its colon: "(whispering)", "[10:01]", "（小声）", at most two.
_LABEL_EXTRAS = r"(?P<extras>(?:\s*[(（\[［][^()（）\[\]［］\n]{1,60}[)）\]］]){0,2})"
# "角色1:", "Speaker 2：", "说话人 1:" (also **bold** as LLMs write it). The number decides the role.
ROLE_RE = re.compile(
    r"(?:\*\*)?(?P<word>角色|说话人|讲话人|发言人|人物|(?i:speaker|spk|role|person))\s*"
    rf"(?P<num>\d+|[一二三四五六七八九十])(?:\*\*)?{_LABEL_EXTRAS}\s*[:：](?:\*\*)?\s*"
)
# "Alice:", "Dr. Smith:", "小明：", "A:", "Alice (whispering):", "Alice (10:01):". The first character is a
# letter; an ASCII colon must not start a URL ("http://") or sit inside a time ("At 10:30"). Whether such
# a line is a label is decided per script (see script.detect_labels).
NAME_RE = re.compile(
    r"(?:\*\*)?(?P<name>[^\W\d_](?:[\w.'’·・ -]{0,30}[\w.])?)(?:\*\*)?"
    rf"{_LABEL_EXTRAS}\s*(?:：|:(?!//|\d))(?:\*\*)?\s*"
)
_EXTRA_RE = re.compile(r"[(（\[［](?P<body>[^()（）\[\]［］\n]{1,60})[)）\]］]")
# A chat timestamp, with or without a date: "10:01", "10:01:02", "10:01 AM", "29/11/2026, 10:01",
# "2026-11-29 10:01:02", "29.11.26, 10:01". The narrow no-break space of some exports is whitespace.
STAMP = (
    r"(?:\d{1,4}[./-]\d{1,2}[./-]\d{1,4}(?:,\s*|\s+|T))?"
    r"\d{1,2}:\d{2}(?::\d{2})?(?:\s*(?i:[ap]\.?\s?m\.?)(?![A-Za-z]))?"
)
_STAMP_ONLY_RE = re.compile(rf"\s*{STAMP}\s*")
_MAX_NAME_WORDS = 4
_MAX_CJK_NAME_CHARS = 8
_NAME_PARTICLES = {"van", "von", "de", "der", "da", "di", "du", "la", "le", "del", "bin", "al"}
_CJK_RE = re.compile("[\u3400-\u9fff\uf900-\ufaff]")

_PAUSE_WORDS = r"(?i:pause|break)(?![A-Za-z])|停顿|暂停"  # "[breaking news]" is not a pause
PAUSE_RE = re.compile(
    rf"[\[［【]\s*(?P<word>{_PAUSE_WORDS})(?P<body>[^\]］】\[［【]*)(?P<close>[\]］】])?"
    r"|<\s*break\b(?P<ssml>[^>]*)>",
)
PAUSE_LIKE_RE = re.compile(rf"\s*(?:[\[［【]\s*(?:{_PAUSE_WORDS})|<\s*break\b)")
_DURATION_RE = re.compile(
    r"(?P<value>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>ms|milliseconds?|毫秒|s|secs?|seconds?|秒钟?)?", re.IGNORECASE
)
_SSML_TIME_RE = re.compile(r"""^\s*time\s*=\s*["'“”]?(?P<value>[^"'“”/\s]*)["'“”]?\s*/?\s*$""", re.IGNORECASE)
PAUSE_FORMS = '[pause 1.5s], [pause 800ms], [停顿 1秒], <break time="1s"/> or [pause] (a short pause)'
# "(pause)", "[pause]", "(beat)" and a lone "…" or "..." are a short pause (the length of a breath).
SHORT_PAUSE_S = 0.5

# Marks inside the text of a turn, in order of precedence where two could start at the same place:
# maths (read, never a direction), timed pauses, round-bracket pauses, a lone ellipsis, then
# directions: *waves*, (smiling), [laughs], （笑）, 【笑】, <Media omitted>. A round bracket right after a
# letter or digit ("f(x)") is not a direction, and mark_kind() checks what the brackets hold.
TEXT_MARK_RE = re.compile(
    rf"(?P<math>{MATH_SPAN_RE.pattern})"
    rf"|(?P<pause>{PAUSE_RE.pattern})"
    rf"|[(（]\s*(?P<rword>{_PAUSE_WORDS}|(?i:beat)(?![A-Za-z]))(?P<rbody>[^()（）\n]*)[)）]"
    r"|(?P<ellipsis>(?<!\S)(?:…|\.\.\.)(?!\S))"
    r"|(?<![\w*])\*(?P<star>[^\W\d_][^*\n]{0,79}?)(?<!\s)\*(?![\w*])"
    r"|(?<![A-Za-z0-9_])\((?P<round>[^()（）\n]{1,80})[)）]|（(?P<wide>[^()（）\n]{1,80})[)）]"
    r"|[\[［【](?P<square>[^\]］】\[［【\n]{1,80})[\]］】]"
    r"|<(?P<angle>[A-Za-z][^<>\n]{0,79})>",
    re.DOTALL,
)
_NOT_PROSE_RE = re.compile(r"[\d=+*/^\\<>$_{}|]")
_SPACES_RE = re.compile(r"\s+")

_ROLE_NUMERALS = {"一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10}


@dataclass(frozen=True)
class Label:
    """A speaker mark at the start of a line (or, for tags, anywhere in it)."""

    kind: str  # "tag" | "role" | "name"
    written: str  # as it appears, for messages and display: "(s1)", "角色1", "Speaker 2", "Alice"
    number: int | None  # tags and roles: the number written; names: None
    end: int  # index in the line just after the mark (and its colon and spaces)
    directions: tuple[str, ...] = ()  # "Alice (whispering):" -> ("whispering",)
    stamp: bool = False  # a chat timestamp came with the label: "Alice (10:01):", "[10:01] Alice:"


def _extras(match: re.Match[str]) -> tuple[tuple[str, ...], bool]:
    """The bracketed words between a label and its colon: (directions, whether a timestamp was among them)."""
    directions: list[str] = []
    stamp = False
    for extra in _EXTRA_RE.finditer(match.group("extras") or ""):
        body = extra.group("body").strip()
        if _STAMP_ONLY_RE.fullmatch(body):
            stamp = True
        elif body:
            directions.append(body)
    return tuple(directions), stamp


def tag_at(line: str, pos: int = 0) -> Label | None:
    match = TAG_RE.match(line, pos)
    if match is None:
        return None
    number = int(match.group("n1") or match.group("n2"))
    return Label("tag", f"(s{number})", number, match.end())


def role_at(line: str) -> Label | None:
    match = ROLE_RE.match(line)
    if match is None:
        return None
    word, num = match.group("word"), match.group("num")
    number = int(num) if num.isdigit() else _ROLE_NUMERALS[num]
    sep = " " if word.isascii() else ""
    directions, stamp = _extras(match)
    return Label("role", f"{word}{sep}{num}", number, match.end(), directions, stamp)


def role_name(written_role: Label, number: int) -> str:
    """The display name of the other role in the same style: "角色1" -> "角色2", "Speaker 1" -> "Speaker 2"."""
    word = written_role.written.rstrip("0123456789一二三四五六七八九十").rstrip()
    sep = " " if word.isascii() else ""
    uses_numeral = not written_role.written[-1].isdigit()
    num = "一二三四五六七八九十"[number - 1] if uses_numeral else str(number)
    return f"{word}{sep}{num}"


def name_at(line: str) -> Label | None:
    match = NAME_RE.match(line)
    if match is None:
        return None
    name = match.group("name").strip()
    words = name.split()
    if len(words) > _MAX_NAME_WORDS:
        return None
    if len(words) > 1 and not all(word[0].isupper() or word in _NAME_PARTICLES for word in words):
        return None  # "Jane Smith:" is a name, "The answer is:" is prose

    if _CJK_RE.search(name) and len(name) > _MAX_CJK_NAME_CHARS:
        return None  # a long Chinese clause before a colon ("我认为这个问题的答案是：") is prose, not a name
    directions, stamp = _extras(match)
    return Label("name", name, None, match.end(), directions, stamp)


def parse_pause(match: re.Match[str], line: int, max_pause_s: float) -> float:
    """Seconds of a pause marker matched by PAUSE_RE (or TEXT_MARK_RE's pause forms); raises ScriptError
    naming the accepted forms."""
    if match.groupdict().get("ellipsis") is not None:
        return SHORT_PAUSE_S
    if match.groupdict().get("rword") is not None:
        seconds = round_pause(match)
        assert seconds is not None, "a round-bracket pause that is not one is a direction"
        return _within_limit(seconds, match, line, max_pause_s)
    written = _quote(match)
    if match.group("word") is not None:
        body = match.group("body").strip().lstrip(":：=").strip()
        if not body and match.group("close"):
            return SHORT_PAUSE_S  # "[pause]", "[停顿]"
        duration = _DURATION_RE.fullmatch(body) if match.group("close") else None
    else:
        time = _SSML_TIME_RE.match(match.group("ssml"))
        duration = _DURATION_RE.fullmatch(time.group("value")) if time else None
    if duration is None:
        raise ScriptError(
            f"malformed pause {written!r}: write it as {PAUSE_FORMS} (at most {max_pause_s:g} s)", line
        )
    return _within_limit(_seconds(duration), match, line, max_pause_s)


def round_pause(match: re.Match[str]) -> float | None:
    """Seconds of "(pause)", "(pause 2s)", "(beat)", "（停顿）"; None when the words after "pause" are not a
    duration ("(pause for effect)" is a direction)."""
    body = match.group("rbody").strip().lstrip(":：=").strip()
    if not body:
        return SHORT_PAUSE_S
    duration = _DURATION_RE.fullmatch(body)
    return _seconds(duration) if duration is not None else None


def _seconds(duration: re.Match[str]) -> float:
    value = float(duration.group("value"))
    unit = (duration.group("unit") or "s").lower()
    return value / 1000.0 if unit in ("ms", "millisecond", "milliseconds", "毫秒") else value


def _quote(match: re.Match[str]) -> str:
    written = match.group(0).strip()
    return written[:37] + "..." if len(written) > 40 else written


def _within_limit(seconds: float, match: re.Match[str], line: int, max_pause_s: float) -> float:
    if seconds > max_pause_s:
        raise ScriptError(
            f"pause {_quote(match)!r} is {seconds:g} s long; the limit is {max_pause_s:g} s", line
        )
    return seconds


def mark_kind(match: re.Match[str]) -> str:
    """What a TEXT_MARK_RE match is: "pause", "direction", or "text" (maths, or brackets that are not a
    direction: "(1)", "(x + 1)", "f(x)", "[1]")."""
    if match.group("math") is not None:
        return "text"
    if match.group("pause") is not None or match.group("ellipsis") is not None:
        return "pause"
    if match.group("rword") is not None:
        return "pause" if round_pause(match) is not None else "direction"
    return "direction" if direction_of(match) else "text"


def direction_of(match: re.Match[str]) -> str:
    """The words of a direction mark ("*waves*" -> "waves"); "" when the brackets hold no direction."""
    if match.group("rword") is not None:
        return (match.group("rword") + match.group("rbody")).strip()
    if TAG_RE.fullmatch(match.group(0)):
        return ""  # "[s1]" is a speaker tag
    for kind in ("star", "round", "wide", "square", "angle"):
        body = match.group(kind)
        if body is None:
            continue
        body = _SPACES_RE.sub(" ", body).strip()
        if not body or not (body[0].isalpha() or _CJK_RE.match(body[0])):
            return ""  # "[1]", "( see above)" ... stay text
        if kind in ("round", "wide") and (_NOT_PROSE_RE.search(body) or (len(body) < 2 and body.isascii())):
            return ""  # "(x + 1)", "(2024)", "(a)": maths, numbers and enumerations are read
        return body
    return ""


def speaks(text: str) -> bool:
    """Whether ``text`` has anything to say once its pauses and directions are taken out."""
    pos = 0
    for match in TEXT_MARK_RE.finditer(text):
        kind = mark_kind(match)
        if kind == "text" or text[pos : match.start()].strip():
            return True
        pos = match.end()
    return bool(text[pos:].strip())
