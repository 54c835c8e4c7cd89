"""Text normalisation for TTS: numbers, money, dates, times and maths become words.

The subtitles keep the original text; only the TTS input goes through here. The passes run in a fixed
order, each turning one kind of written form into words, so that a later pass never sees the digits an
earlier one consumed (dates before ranges, money before plain numbers, maths before everything).

Language is per turn: ``"zh"`` when the text has any CJK ideograph (mixed text counts as Chinese,
because Kokoro's Chinese pipeline reads embedded English words too), otherwise ``"en"``.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable

from common.errors import InputError
from dialogue.mathspeech import GREEK_CHARS, SYMBOL_CHARS, greek_word, op_word, speak_math
from dialogue.numbers import (
    en_cardinal,
    en_decimal,
    en_digits,
    en_fraction,
    en_integer,
    en_month,
    en_ordinal,
    en_plural,
    en_year,
    zh_cardinal,
    zh_decimal,
    zh_digits,
    zh_fraction,
)

logger = logging.getLogger(__name__)

LANGUAGES = ("en", "zh")

_CJK_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")


class LanguageError(InputError):
    """An unsupported language code was given to the normaliser."""


def detect_language(text: str) -> str:
    """Return "zh" if the text contains a CJK ideograph (mixed Chinese/English counts as Chinese), else "en"."""
    return "zh" if _CJK_RE.search(text) else "en"


def normalize_for_speech(text: str, language: str) -> str:
    """Rewrite ``text`` so that a TTS reads it correctly in ``language`` ("en" or "zh").

    >>> normalize_for_speech("It costs $3.50, 20% off.", "en")
    'It costs three dollars and fifty cents, twenty percent off.'
    >>> normalize_for_speech("2024年增长了3.5%", "zh")
    '二零二四年增长了百分之三点五'
    """
    if language not in LANGUAGES:
        raise LanguageError("language", f"{language!r} is not supported; use one of {', '.join(LANGUAGES)}")
    for rewrite in _PASSES:
        text = rewrite(text, language)
    return text


# ---------------------------------------------------------------- helpers

# A minus sign that makes a negative number: not after a Latin letter or digit ("COVID-19", "5-3"), but
# after a CJK character it is ("温度-5°C").
_NEG = r"(?<![A-Za-z0-9.)])-"


def _number(digits: str, language: str) -> str:
    return zh_decimal(digits) if language == "zh" else en_decimal(digits)


def _spaced(words: str, language: str) -> str:
    """English words inserted into text get spaces around them (tidied later); Chinese needs none."""
    return words if language == "zh" else f" {words} "


# ---------------------------------------------------------------- passes

_FULLWIDTH = {chr(0xFF10 + i): str(i) for i in range(10)}
_FULLWIDTH.update({chr(0xFF21 + i): chr(0x41 + i) for i in range(26)})
_FULLWIDTH.update({chr(0xFF41 + i): chr(0x61 + i) for i in range(26)})
_FULLWIDTH.update({"％": "%", "＄": "$", "＋": "+", "＝": "=", "＜": "<", "＞": ">", "￥": "¥", "−": "-"})
_FULLWIDTH.update({"﹪": "%", "＾": "^", "／": "/", "＊": "*", "～": "~", "＃": "#", "＆": "&"})
_SUPERSCRIPTS = dict(zip("⁰¹²³⁴⁵⁶⁷⁸⁹⁻ⁿ", "0123456789-n", strict=True))
_SUBSCRIPTS = dict(zip("₀₁₂₃₄₅₆₇₈₉", "0123456789", strict=True))


def _prepare(text: str, language: str) -> str:
    """Full-width digits/letters/signs to ASCII (Chinese punctuation is kept), superscripts to ^{..}."""
    text = "".join(_FULLWIDTH.get(ch, ch) for ch in text)
    text = re.sub(r"(?<=\d)．(?=\d)", ".", text)  # full-width decimal point, only between digits
    # Ten or more digits with no grouping commas and not a round number: a phone or account number.
    text = re.sub(
        r"(?<![\d.,])\d{10,}(?<!000)(?![\d]|[.,]\d)",
        lambda m: _spaced(zh_digits(m.group(0)) if language == "zh" else en_digits(m.group(0)), language),
        text,
    )
    text = re.sub(
        "[⁰¹²³⁴⁵⁶⁷⁸⁹⁻ⁿ]+", lambda m: "^{" + "".join(_SUPERSCRIPTS[c] for c in m.group(0)) + "}", text
    )
    text = re.sub("[₀₁₂₃₄₅₆₇₈₉]", lambda m: _SUBSCRIPTS[m.group(0)], text)
    # "1,234,567" -> "1234567": grouping commas are never spoken.
    return re.sub(
        r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,]|\.\d*,)", lambda m: m.group(0).replace(",", ""), text
    )


# A $...$ span: the opening $ is followed by a non-space, the closing $ follows a non-space and is not
# followed by a digit (pandoc's rule), so "$5 and $10" stays money.
MATH_SPAN_RE = re.compile(
    r"\$\$(?P<display>.+?)\$\$|\\\((?P<paren>.+?)\\\)|\\\[(?P<bracket>.+?)\\\]"
    r"|\$(?P<inline>[^\s$](?:[^$]*?[^\s$])?)\$(?!\d)",
    re.DOTALL,
)
_LATEX_RE = re.compile(r"\\[A-Za-z]+")
_BARE_POWER_RE = re.compile(
    r"(?:(?<![\w^])(?:[A-Za-z]+|\d+(?:\.\d+)?)|\))\^(?:\{[^{}]*\}|\([^()]*\)|-?\d+|[A-Za-z])"
)
_BARE_ROOT_RE = re.compile(r"√\s*(?:\d+(?:\.\d+)?|[A-Za-z]|\{[^{}]*\}|\([^()]*\))")


def _math(text: str, language: str) -> str:
    """$...$, $$...$$, \\(...\\), \\[...\\] spans, bare LaTeX commands, x^2 and √2 outside spans."""

    def span(match: re.Match[str]) -> str:
        body = next(g for g in match.groups() if g is not None)
        return _spaced(speak_math(body, language), language)

    text = MATH_SPAN_RE.sub(span, text)
    text = _replace_latex_commands(text, language)
    text = _BARE_POWER_RE.sub(lambda m: _bare_power(m.group(0), language), text)
    text = _BARE_ROOT_RE.sub(lambda m: _spaced(speak_math(m.group(0), language), language), text)
    return text


def _bare_power(written: str, language: str) -> str:
    # "(a+b)^2": the bracket stays so that the words read "(a plus b) squared".
    bracket = ")" if written.startswith(")") else ""
    return bracket + _spaced(speak_math(written, language), language)


def _replace_latex_commands(text: str, language: str) -> str:
    """A LaTeX command outside $...$: read it with its arguments ({...} groups and [..] options)."""
    out: list[str] = []
    pos = 0
    for match in _LATEX_RE.finditer(text):
        if match.start() < pos:
            continue
        end = match.end()
        # Swallow the command's brace arguments (and a sqrt's [n]) so they are read with it.
        while end < len(text) and text[end] in "{[":
            close = "}" if text[end] == "{" else "]"
            depth, i = 0, end
            while i < len(text):
                if text[i] == text[end]:
                    depth += 1
                elif text[i] == close:
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            if i >= len(text):
                break
            end = i + 1
        # A following ^2 or _1 belongs to the command too (\alpha^2).
        tail = re.match(r"[\^_](?:\{[^{}]*\}|-?\d+|[A-Za-z])", text[end:])
        if tail:
            end += tail.end()
        out.append(text[pos : match.start()])
        out.append(_spaced(speak_math(text[match.start() : end], language), language))
        pos = end
    out.append(text[pos:])
    return "".join(out)


_MONTH_NAMES = {en_month(m).lower(): m for m in range(1, 13)}
_MONTH_NAMES.update({name[:3]: m for name, m in list(_MONTH_NAMES.items())})
_MONTH_NAMES["sept"] = 9
_ISO_DATE_RE = re.compile(r"(?<![\d.])(\d{4})([-/.])(\d{1,2})\2(\d{1,2})(?![\d.]\d)")
_US_DATE_RE = re.compile(r"(?<![\d./])(\d{1,2})/(\d{1,2})/(\d{4})(?![\d/])")
# Capitalised month names only: "may" in lower case is the verb.
_MONTH_DATE_RE = re.compile(
    r"\b(" + "|".join(name.capitalize() for name in sorted(_MONTH_NAMES, key=len, reverse=True)) + r")"
    r"\.?\s+(\d{1,2})(?:st|nd|rd|th)?\b(?:,?\s+(\d{4})\b)?"
)


def _say_date(year: int, month: int, day: int, language: str) -> str | None:
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    if language == "zh":
        return f"{zh_digits(str(year))}年{zh_cardinal(month)}月{zh_cardinal(day)}日"
    return f" {en_month(month)} {en_ordinal(day)}, {en_year(year)} "


def _dates(text: str, language: str) -> str:
    """2024-05-01, 2024/5/1, 5/1/2024 (month first unless the first number is over 12), May 1, 2024."""

    def iso(m: re.Match[str]) -> str:
        return _say_date(int(m.group(1)), int(m.group(3)), int(m.group(4)), language) or m.group(0)

    def us(m: re.Match[str]) -> str:
        first, second, year = int(m.group(1)), int(m.group(2)), int(m.group(3))
        month, day = (second, first) if first > 12 else (first, second)
        return _say_date(year, month, day, language) or m.group(0)

    def named(m: re.Match[str]) -> str:
        day = int(m.group(2))
        if not 1 <= day <= 31:
            return m.group(0)
        month = en_month(_MONTH_NAMES[m.group(1).lower()])
        words = f" {month} {en_ordinal(day)}"
        return words + (f", {en_year(int(m.group(3)))} " if m.group(3) else " ")

    text = _ISO_DATE_RE.sub(iso, text)
    text = _US_DATE_RE.sub(us, text)
    if language == "en":
        text = _MONTH_DATE_RE.sub(named, text)
    return text


_TIME_RE = re.compile(
    r"(?<![\d:.])(\d{1,2}):(\d{2})(?::(\d{2}))?(?![\d:])(?:\s?([AaPp])(?:\.[Mm]\.|[Mm]\b))?"
    r"|(?<![\d:.])(\d{1,2})\s?([AaPp])(?:\.[Mm]\.|[Mm]\b)"
)
_RATIO_RE = re.compile(r"(?<![\d:.])(\d+(?:\.\d+)?):(\d+(?:\.\d+)?)(?![\d:])")


def _say_time(hour: int, minute: int, second: int | None, meridiem: str | None, language: str) -> str:
    if language == "zh":
        prefix = {"a": "上午", "p": "下午"}.get(meridiem or "", "")
        words = prefix + ("两" if hour == 2 else zh_cardinal(hour)) + "点"
        if minute:
            words += ("零" if minute < 10 else "") + zh_cardinal(minute) + "分"
        if second:
            words += ("" if minute else "零分") + zh_cardinal(second) + "秒"
        return words
    words = en_cardinal(hour)
    if minute == 0:
        words += " o'clock" if hour <= 12 or meridiem else " hundred"
    elif minute < 10:
        words += f" oh {en_cardinal(minute)}"
    else:
        words += f" {en_cardinal(minute)}"
    if second:
        words += f" and {en_cardinal(second)} seconds"
    if meridiem:
        words = words.removesuffix(" o'clock") + f" {meridiem} m"
    return f" {words} "


def _times(text: str, language: str) -> str:
    """14:30 -> fourteen thirty / 十四点三十分; 9am; a colon between other numbers is a ratio (3:2)."""

    def time(m: re.Match[str]) -> str:
        if m.group(5) is not None:  # "9am"
            hour = int(m.group(5))
            if not 1 <= hour <= 12:
                return m.group(0)
            return _say_time(hour, 0, None, m.group(6).lower(), language)
        hour, minute = int(m.group(1)), int(m.group(2))
        second = int(m.group(3)) if m.group(3) else None
        if hour > 24 or minute > 59 or (second is not None and second > 59):
            return m.group(0)
        meridiem = m.group(4).lower() if m.group(4) else None
        return _say_time(hour, minute, second, meridiem, language)

    def ratio(m: re.Match[str]) -> str:
        a, b = _number(m.group(1), language), _number(m.group(2), language)
        return f"{a}比{b}" if language == "zh" else f" {a} to {b} "

    return _RATIO_RE.sub(ratio, _TIME_RE.sub(time, text))


def _ranges(text: str, language: str) -> str:
    """10-20, 10~20, 10–20 -> "10 to 20"/"10到20" (digits stay for later passes); "5 - 3" is a subtraction,
    and so is "5-3" when an "=" follows."""
    to = "到" if language == "zh" else " to "
    minus = op_word("-", language)

    def dash(m: re.Match[str]) -> str:
        spaced = m.group(1) and m.group(3)
        if m.group(2) == "-" and (spaced or re.match(r"\s*\d+(?:\.\d+)?\s*=", text[m.end() :])):
            return _spaced(minus, language)
        return to

    return re.sub(r"(?<=\d)(\s*)([-–~])(\s*)(?=[$€£¥]?\d)", dash, text)


_CURRENCIES = {  # symbol -> english (one, many, cent one, cents many) or None, chinese
    "$": (("dollar", "dollars", "cent", "cents"), "美元"),
    "€": (("euro", "euros", "cent", "cents"), "欧元"),
    "£": (("pound", "pounds", "penny", "pence"), "英镑"),
    "¥": (("yen", "yen", None, None), "元"),
}
_EN_SCALE_WORDS = {
    "k": "thousand",
    "thousand": "thousand",
    "m": "million",
    "mn": "million",
    "million": "million",
    "b": "billion",
    "bn": "billion",
    "billion": "billion",
    "trillion": "trillion",
}
_ZH_SCALE_WORDS = {"thousand": "千", "million": "百万", "billion": "十亿", "trillion": "万亿"}
_ZH_SCALE_WORDS.update(
    {short: _ZH_SCALE_WORDS[word] for short, word in _EN_SCALE_WORDS.items() if word != short}
)
_CURRENCY_RE = re.compile(
    rf"(?P<neg>{_NEG})?(?P<sym>[$€£¥])\s?(?P<num>\d+(?:\.\d+)?)"
    r"(?:\s?(?P<scale>thousand|million|billion|trillion|bn|mn|[kKmMbB](?![\w]))|(?P<zhscale>[千万亿]+))?"
    r"|(?P<num2>\d+(?:\.\d+)?)\s?(?P<sym2>[€£])"
)


def _currency(text: str, language: str) -> str:
    """$3.50 -> three dollars and fifty cents / 三点五美元; $5 million; ¥100 -> 一百元 / one hundred yen."""

    def money(m: re.Match[str]) -> str:
        symbol = m.group("sym") or m.group("sym2")
        number = m.group("num") or m.group("num2")
        negative = bool(m.group("neg"))
        english, chinese = _CURRENCIES[symbol]
        if language == "zh":
            scale = m.group("zhscale") or _ZH_SCALE_WORDS.get((m.group("scale") or "").lower(), "")
            return ("负" if negative else "") + zh_decimal(number) + scale + chinese
        one, many, cent, cents = english
        sign = "minus " if negative else ""
        if m.group("scale"):  # "$5 million" -> five million dollars
            return f" {sign}{en_decimal(number)} {_EN_SCALE_WORDS[m.group('scale').lower()]} {many} "
        whole, _, frac = number.partition(".")
        if cent is None or len(frac) > 2:
            unit = one if number == "1" else many
            return f" {sign}{en_decimal(number)} {unit} "
        cents_value = int(frac.ljust(2, "0")) if frac else 0
        parts = []
        if int(whole) or not cents_value:
            parts.append(f"{en_integer(whole)} {one if int(whole) == 1 else many}")
        if cents_value:
            parts.append(f"{en_cardinal(cents_value)} {cent if cents_value == 1 else cents}")
        return f" {sign}{' and '.join(parts)} "

    return _CURRENCY_RE.sub(money, text)


def _percent(text: str, language: str) -> str:
    """50% -> fifty percent / 百分之五十; also per mille (‰)."""

    def percent(m: re.Match[str]) -> str:
        sign = m.group(1) or ""
        number = m.group(2)
        if language == "zh":
            head = "千分之" if m.group(3) == "‰" else "百分之"
            return ("负" if sign else "") + head + zh_decimal(number)
        unit = "per mille" if m.group(3) == "‰" else "percent"
        return f" {'minus ' if sign else ''}{en_decimal(number)} {unit} "

    return re.sub(rf"({_NEG})?(\d+(?:\.\d+)?)\s?([%‰])", percent, text)


def _degrees(text: str, language: str) -> str:
    """25°C -> twenty-five degrees Celsius / 二十五摄氏度; -5°; 90°."""

    def degrees(m: re.Match[str]) -> str:
        negative, number, scale = m.group(1), m.group(2), (m.group(3) or "").upper()
        if language == "zh":
            unit = {"C": "摄氏度", "F": "华氏度"}.get(scale, "度")
            return ("零下" if negative and scale else "负" if negative else "") + zh_decimal(number) + unit
        unit = {"C": "degrees Celsius", "F": "degrees Fahrenheit"}.get(scale, "degrees")
        if number == "1":
            unit = unit.replace("degrees", "degree")
        return f" {'minus ' if negative else ''}{en_decimal(number)} {unit} "

    return re.sub(rf"({_NEG})?(\d+(?:\.\d+)?)\s?°\s?([CcFf](?![A-Za-z]))?", degrees, text)


def _operators(text: str, language: str) -> str:
    """Maths symbols in plain text: ≤ ≥ ≠ × ÷ ± ∞ → α ... always; = always; + * / < > only between
    operands (so C++, <3 or and/or are left alone); 3/4 between numbers is a fraction."""
    for written, char in (("<=", "≤"), (">=", "≥"), ("!=", "≠"), ("==", "=")):
        text = re.sub(rf"(?<=[\w)\s]){re.escape(written)}(?=[\s\w(-])", f" {char} ", text)

    def fraction(m: re.Match[str]) -> str:
        if language == "zh":
            return zh_fraction(m.group(1), m.group(2))
        if "." in m.group(0):
            return f" {en_decimal(m.group(1))} over {en_decimal(m.group(2))} "
        return f" {en_fraction(int(m.group(1)), int(m.group(2)))} "

    text = re.sub(r"(?<![A-Za-z0-9./])(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)(?![A-Za-z0-9/]|\.\d)", fraction, text)
    for symbol, name in (("+", "+"), ("*", "times"), ("<", "<"), (">", ">")):
        # Spaces on both sides or on neither: "2*3", "2 * 3", but not "very *italic*" or "I <3 you".
        between = rf"(?<=[\w)])(?:\s+{re.escape(symbol)}\s+|{re.escape(symbol)})(?=[\w(])"
        word = _spaced(op_word(name, language), language)
        text = re.sub(between, lambda _m, w=word: w, text)
    text = re.sub(r"\s*(?<![=<>!])=(?![=>])\s*", lambda _m: _spaced(op_word("=", language), language), text)
    text = re.sub(r"(?<=[\w)])\s*/\s*(?=\d)", lambda _m: _spaced(op_word("div", language), language), text)
    text = re.sub(r"(?<![\w~])~\s*(?=\d)", "约" if language == "zh" else "about ", text)
    for char, name in SYMBOL_CHARS.items():
        if char in text and char not in "…⋯":  # an ellipsis in prose is punctuation, not maths
            word = _spaced(op_word(name, language), language)
            text = re.sub(rf"\s*{re.escape(char)}\s*", lambda _m, w=word: w, text)
    return _greek(text, language)


def _greek(text: str, language: str) -> str:
    """A Greek letter standing alone (not inside a Greek word) is read by its name: 2π -> two pi."""

    def letter(m: re.Match[str]) -> str:
        return _spaced(greek_word(GREEK_CHARS[m.group(0)], language), language)

    # Only Latin and Greek letters count as neighbours: "圆周率π" is read, "αβγ" (a Greek word) is not.
    chars = "".join(GREEK_CHARS)
    return re.sub(rf"(?<![A-Za-z\u0370-\u03ff])[{chars}](?![A-Za-z\u0370-\u03ff])", letter, text)


# After these a lone 2 is read 两 ("两个人", "两点"), not 二; "2月" (February) and "第2" stay 二.
_ZH_MEASURE_WORDS = (
    "个|位|次|天|只|本|件|条|张|种|名|人|家|台|辆|岁|周|小时|分钟|年|倍|点|页|杯|句|遍|项|门|块|元"
)


def _numbers(text: str, language: str) -> str:
    """What is left: ordinals (1st), decades (1990s), years by context, negatives, decimals, integers,
    versions (1.2.3) and digit strings with leading zeros."""
    if language == "en":
        text = re.sub(
            r"(?<![\d.])(\d+)(?:st|nd|rd|th)\b",
            lambda m: f" {en_ordinal(int(m.group(1)))} ",
            text,
            flags=re.I,
        )
        text = re.sub(r"(?<![\d.])(\d{4})s\b", lambda m: f" {en_plural(en_year(int(m.group(1))))} ", text)
        text = re.sub(
            r"(?<![\w.])'?([1-9]0)s\b", lambda m: f" {en_plural(en_cardinal(int(m.group(1))))} ", text
        )
        text = re.sub(
            r"\b(in|since|by|from|until|till|before|after|during|year|circa|around|of)\s+(\d{4})(?!\d|[.,]\d)",
            lambda m: f"{m.group(1)} {en_year(int(m.group(2)))} ",
            text,
            flags=re.I,
        )
        text = re.sub(r"#\s?(?=\d)", " number ", text)
    else:
        text = re.sub(r"(?<![\d.])(\d{4})(?=\s*年)", lambda m: zh_digits(m.group(1)), text)
        text = re.sub(rf"(?<!第)(?<![\d.])2(?=\s*(?:{_ZH_MEASURE_WORDS}))", "两", text)

    # "COVID-19", "GPT-4": the hyphen joins a name to its number; it is not a minus.
    text = re.sub(r"(?<=[A-Za-z])-(?=\d)", " ", text)

    def number(m: re.Match[str]) -> str:
        sign = "负" if language == "zh" else "minus "
        words = (sign if m.group(1) else "") + _number(m.group(2), language)
        return _spaced(words, language)

    return re.sub(rf"({_NEG})?(\d+(?:\.\d+)*)", number, text)


def _symbols(text: str, language: str) -> str:
    """& and leftover symbols: emoji, markdown emphasis, stray carets are not spoken."""
    text = re.sub(r"\s*&\s*", _spaced("和" if language == "zh" else "and", language), text)
    text = re.sub(r"[*_`#^~{}]+", " ", text)
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if category in ("So", "Sk", "Co", "Cs") or ch in "\u200d\ufe0f\ufe0e\u20e3":
            kept.append(" ")
        else:
            kept.append(ch)
    return "".join(kept)


def _tidy(text: str, language: str) -> str:
    """Collapse whitespace; no space before closing punctuation, none after an opening bracket."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.!?;:)\]}，。！？；：、）」』》])", r"\1", text)
    text = re.sub(r"([(\[{（「『《])\s+", r"\1", text)
    return text


_PASSES: tuple[Callable[[str, str], str], ...] = (
    _prepare,
    _math,
    _dates,
    _times,
    _ranges,
    _currency,
    _percent,
    _degrees,
    _operators,
    _numbers,
    _symbols,
    _tidy,
)
