"""Numbers as words, in English and in Chinese (used by the speech normaliser).

Everything here takes the digits as written (a string), so that leading zeros and long digit strings
can be read digit by digit instead of as a huge cardinal.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_EN_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_EN_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_EN_SCALES = ("", "thousand", "million", "billion", "trillion", "quadrillion")
_EN_ORDINAL_WORDS = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}
_EN_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

# Past these lengths a digit string is an identifier (an account or phone number), not a quantity.
_EN_MAX_CARDINAL_DIGITS = 15
_ZH_MAX_CARDINAL_DIGITS = 16

_ZH_DIGITS = "零一二三四五六七八九"
_ZH_SMALL_UNITS = ("", "十", "百", "千")
_ZH_BIG_UNITS = ("", "万", "亿", "万亿")


# ---------------------------------------------------------------- English


def _en_below_thousand(n: int) -> str:
    if n < 20:
        return _EN_ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _EN_TENS[tens] + (f"-{_EN_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    head = f"{_EN_ONES[hundreds]} hundred"
    return f"{head} {_en_below_thousand(rest)}" if rest else head


def en_cardinal(n: int) -> str:
    """American cardinal without "and" or commas (commas would make the TTS pause): 1234 -> one thousand
    two hundred thirty-four."""
    if n < 0:
        return f"minus {en_cardinal(-n)}"
    if n < 1000:
        return _en_below_thousand(n)
    if n >= 1000 ** len(_EN_SCALES):
        return en_digits(str(n))
    parts: list[str] = []
    scale = 0
    while n:
        n, group = divmod(n, 1000)
        if group:
            word = _en_below_thousand(group)
            parts.append(f"{word} {_EN_SCALES[scale]}" if scale else word)
        scale += 1
    return " ".join(reversed(parts))


def en_digits(digits: str) -> str:
    """Digit by digit: "007" -> zero zero seven."""
    return " ".join(_EN_ONES[int(d)] for d in digits if d.isdigit())


def en_integer(digits: str) -> str:
    """An integer as written: a cardinal, or digit by digit for leading zeros and very long strings."""
    if (len(digits) > 1 and digits.startswith("0")) or len(digits) > _EN_MAX_CARDINAL_DIGITS:
        return en_digits(digits)
    return en_cardinal(int(digits))


def en_decimal(number: str) -> str:
    """ "3.14" -> three point one four; "2" -> two; "1.2.3" (a version) -> one point two point three."""
    head, *tails = number.split(".")
    if len(tails) > 1:
        return " point ".join(en_integer(part) if part else "" for part in [head, *tails]).strip()
    words = en_integer(head) if head else "zero"
    if tails and tails[0]:
        words += " point " + en_digits(tails[0])
    return words


def en_ordinal(n: int) -> str:
    """1 -> first, 22 -> twenty-second, 100 -> one hundredth."""
    words = en_cardinal(n)
    head, sep, last = words.rpartition(" ")
    prefix, dash, unit = last.rpartition("-")
    if unit in _EN_ORDINAL_WORDS:
        unit = _EN_ORDINAL_WORDS[unit]
    elif unit.endswith("y"):
        unit = unit[:-1] + "ieth"
    else:
        unit += "th"
    return f"{head}{sep}{prefix}{dash}{unit}"


def en_year(n: int) -> str:
    """Years the way people say them: 1905 -> nineteen oh five, 2024 -> twenty twenty-four,
    2005 -> two thousand five, 1900 -> nineteen hundred. Outside 1000..2999 a plain cardinal."""
    if not 1000 <= n <= 2999 or 2000 <= n <= 2009 or n % 1000 < 10:
        return en_cardinal(n)
    century, rest = divmod(n, 100)
    if rest == 0:
        return f"{en_cardinal(century)} hundred"
    if rest < 10:
        return f"{en_cardinal(century)} oh {en_cardinal(rest)}"
    return f"{en_cardinal(century)} {en_cardinal(rest)}"


def en_plural(words: str) -> str:
    """Plural of a number phrase: "nineteen ninety" -> nineteen nineties, "six" -> sixes."""
    if words.endswith("y"):
        return words[:-1] + "ies"
    if words.endswith(("x", "s")):
        return words + "es"
    return words + "s"


def en_fraction(numerator: int, denominator: int) -> str:
    """3/4 -> three quarters, 1/2 -> one half, 2/3 -> two thirds; otherwise "a over b"."""
    if 0 < numerator < denominator <= 10:
        if denominator == 2:
            unit = "half"
        elif denominator == 4:
            unit = "quarter"
        else:
            unit = en_ordinal(denominator)
        if numerator != 1:
            unit = "halves" if unit == "half" else unit + "s"
        return f"{en_cardinal(numerator)} {unit}"
    return f"{en_cardinal(numerator)} over {en_cardinal(denominator)}"


def en_month(month: int) -> str:
    return _EN_MONTHS[month - 1]


# ---------------------------------------------------------------- Chinese


def _zh_section(n: int) -> str:
    """0 < n < 10000 -> 一千零五, 两千三百, 一百一十."""
    out: list[str] = []
    zero_pending = False
    for pos in (3, 2, 1, 0):
        digit = n // 10**pos % 10
        if digit == 0:
            zero_pending = bool(out)
            continue
        if zero_pending:
            out.append("零")
            zero_pending = False
        # "两千" is what people say; "二千" sounds like reading digits.
        out.append(("两" if pos == 3 and digit == 2 else _ZH_DIGITS[digit]) + _ZH_SMALL_UNITS[pos])
    return "".join(out)


def zh_cardinal(n: int) -> str:
    """Chinese cardinal: 10 -> 十, 1005 -> 一千零五, 12000 -> 一万两千, 100010000 -> 一亿零一万."""
    if n < 0:
        return "负" + zh_cardinal(-n)
    if n == 0:
        return "零"
    if n >= 10**_ZH_MAX_CARDINAL_DIGITS:
        return zh_digits(str(n))
    sections: list[int] = []
    while n:
        n, section = divmod(n, 10000)
        sections.append(section)
    out: list[str] = []
    zero_pending = False
    for index in range(len(sections) - 1, -1, -1):
        section = sections[index]
        if section == 0:
            zero_pending = bool(out)
            continue
        if out and (zero_pending or section < 1000):
            out.append("零")
        zero_pending = False
        unit = _ZH_BIG_UNITS[index]
        out.append(("两" if section == 2 and unit else _zh_section(section)) + unit)
    words = "".join(out)
    # 10..19 at the head are read 十, 十一 ..., not 一十, 一十一 (also 十万, 十亿).
    if words.startswith("一十"):
        words = words[1:]
    return words


def zh_digits(digits: str) -> str:
    """Digit by digit: 2024 -> 二零二四 (years, phone numbers)."""
    return "".join(_ZH_DIGITS[int(d)] for d in digits if d.isdigit())


def zh_integer(digits: str) -> str:
    """An integer as written: a cardinal, or digit by digit for leading zeros and very long strings."""
    if (len(digits) > 1 and digits.startswith("0")) or len(digits) > _ZH_MAX_CARDINAL_DIGITS:
        return zh_digits(digits)
    return zh_cardinal(int(digits))


def zh_decimal(number: str) -> str:
    """ "3.5" -> 三点五, "0.25" -> 零点二五, "1.2.3" -> 一点二点三."""
    head, *tails = number.split(".")
    if len(tails) > 1:
        return "点".join(zh_integer(part) for part in [head, *tails] if part)
    words = zh_integer(head) if head else "零"
    if tails and tails[0]:
        words += "点" + zh_digits(tails[0])
    return words


def zh_fraction(numerator: str, denominator: str) -> str:
    """3/4 -> 四分之三."""
    return f"{zh_decimal(denominator)}分之{zh_decimal(numerator)}"
