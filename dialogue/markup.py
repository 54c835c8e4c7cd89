"""The marks a script is written with: speaker tags, role/name labels and pause markers.

Only recognition lives here (regular expressions and small value objects); deciding what a line means
in the context of the whole script is ``dialogue.script``'s job.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from dialogue.schema import ScriptError

logger = logging.getLogger(__name__)

# (s1) （s2） [s1] ［s2］ 【s1】, any case, optionally followed by a colon. Round and square brackets
# each accept their full-width twins because Chinese input methods switch width mid-line.
TAG_RE = re.compile(
    r"(?:[(（]\s*[sS]\s*(?P<n1>\d+)\s*[)）]|[\[［【]\s*[sS]\s*(?P<n2>\d+)\s*[\]］】])[ \t]*[:：]?"
)
# "角色1:", "Speaker 2：", "说话人 1:" (also **bold** as LLMs write it). The number decides the role.
ROLE_RE = re.compile(
    r"(?:\*\*)?(?P<word>角色|说话人|讲话人|发言人|人物|(?i:speaker|spk|role|person))\s*"
    r"(?P<num>\d+|[一二三四五六七八九十])(?:\*\*)?\s*[:：](?:\*\*)?\s*"
)
# "Alice:", "Dr. Smith:", "小明：", "A:". The first character is a letter; an ASCII colon must not start
# a URL ("http://") or sit inside a time ("At 10:30"). Whether such a line is a label is decided per
# script (see script._detect_format).
NAME_RE = re.compile(
    r"(?:\*\*)?(?P<name>[^\W\d_](?:[\w.'’·・ -]{0,30}[\w.])?)(?:\*\*)?\s*(?:：|:(?!//|\d))(?:\*\*)?\s*"
)
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
PAUSE_FORMS = '[pause 1.5s], [pause 800ms], [停顿 1秒] or <break time="1s"/>'

_ROLE_NUMERALS = {"一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10}


@dataclass(frozen=True)
class Label:
    """A speaker mark at the start of a line (or, for tags, anywhere in it)."""

    kind: str  # "tag" | "role" | "name"
    written: str  # as it appears, for messages and display: "(s1)", "角色1", "Speaker 2", "Alice"
    number: int | None  # tags and roles: the number written; names: None
    end: int  # index in the line just after the mark (and its colon and spaces)


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
    return Label("role", f"{word}{sep}{num}", number, match.end())


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
    return Label("name", name, None, match.end())


def parse_pause(match: re.Match[str], line: int, max_pause_s: float) -> float:
    """Seconds of a pause marker matched by PAUSE_RE; raises ScriptError naming the accepted forms."""
    written = match.group(0).strip()
    if len(written) > 40:
        written = written[:37] + "..."
    if match.group("word") is not None:
        body = match.group("body").strip().lstrip(":：=").strip()
        duration = _DURATION_RE.fullmatch(body) if match.group("close") else None
    else:
        time = _SSML_TIME_RE.match(match.group("ssml"))
        duration = _DURATION_RE.fullmatch(time.group("value")) if time else None
    if duration is None:
        raise ScriptError(
            f"malformed pause {written!r}: write it as {PAUSE_FORMS} (at most {max_pause_s:g} s)", line
        )
    value = float(duration.group("value"))
    unit = (duration.group("unit") or "s").lower()
    seconds = value / 1000.0 if unit in ("ms", "millisecond", "milliseconds", "毫秒") else value
    if seconds > max_pause_s:
        raise ScriptError(f"pause {written!r} is {seconds:g} s long; the limit is {max_pause_s:g} s", line)
    return seconds
