"""Parse untrusted JSON and numbers with bounds before any arithmetic sees them.

``json.loads`` happily builds 100,000-deep lists (``RecursionError`` further on), 4,000-digit integers
(``OverflowError`` as soon as one becomes a float or reaches SQLite) and ``NaN``. Here:

- ``loads(text, field)``: JSON whose nesting is at most ``MAX_JSON_DEPTH`` levels, integers of at most
  ``MAX_INT_DIGITS`` digits (longer ones are refused, not rounded), no ``NaN``/``Infinity``; every problem
  is an ``InputError`` naming ``field``.
- ``check_depth(value, field)``: the same depth rule for an already decoded value (one field of a body).
- ``bounded_float(value, field, lo, hi)`` / ``bounded_int(text, field, lo, hi)``: one number, range
  checked before it is converted, so no overflow can happen on the way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from common.errors import InputError

MAX_JSON_DEPTH = 16
MAX_INT_DIGITS = 18  # |n| < 10**18 < 2**63: fits SQLite and converts to float without overflow
MAX_FLOAT_CHARS = 64


class BoundsError(InputError):
    """A value outside what the service parses (too deep, too many digits, not finite)."""


def _parse_int(field: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        digits = len(text.lstrip("-"))
        if digits > MAX_INT_DIGITS:
            raise BoundsError(field, f"a number with {digits} digits; at most {MAX_INT_DIGITS} are accepted")
        return int(text)

    return parse


def _parse_float(field: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text) if len(text) <= MAX_FLOAT_CHARS else math.inf
        if not math.isfinite(value):
            raise BoundsError(
                field, f"the number {text[:24]}{'...' if len(text) > 24 else ''} is out of range"
            )
        return value

    return parse


def _parse_constant(field: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        raise BoundsError(field, f"{text} is not a number JSON allows")

    return parse


def loads(text: str | bytes, field: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode JSON ``text`` with the bounds above; raises ``BoundsError`` (an ``InputError``) for
    ``field``: invalid JSON, nesting deeper than ``max_depth``, oversized or non-finite numbers."""
    try:
        value = json.loads(
            text,
            parse_int=_parse_int(field),
            parse_float=_parse_float(field),
            parse_constant=_parse_constant(field),
        )
    except json.JSONDecodeError as exc:
        raise BoundsError(field, f"not valid JSON ({exc.msg} at position {exc.pos})") from None
    except UnicodeDecodeError:
        raise BoundsError(field, "not valid JSON (the text is not UTF-8)") from None
    except RecursionError:
        raise BoundsError(field, f"JSON nested deeper than {max_depth} levels") from None
    check_depth(value, field, max_depth=max_depth)
    return value


def check_depth(value: Any, field: str, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse ``value`` when lists/dicts nest deeper than ``max_depth`` (a scalar is depth 0), walking it
    with an explicit stack so a deep value cannot exhaust the interpreter's."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth + 1 > max_depth:
            raise BoundsError(field, f"JSON nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)


def bounded_float(value: Any, field: str, lo: float, hi: float) -> float:
    """``value`` (a number or numeric text) as a float in ``[lo, hi]``; no conversion can overflow."""
    if isinstance(value, bool):
        raise BoundsError(field, f"expected a number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_FLOAT_CHARS:
            raise BoundsError(
                field, f"expected a number between {lo:g} and {hi:g}, got {len(text)} characters"
            )
        try:
            value = float(text)
        except ValueError:
            raise BoundsError(
                field, f"expected a number between {lo:g} and {hi:g}, got {text[:24]!r}"
            ) from None
    elif isinstance(value, int):
        if not lo <= value <= hi:  # compared as integers: a huge int never becomes a float
            raise BoundsError(field, f"{_short(value)} is out of range; allowed {lo:g}..{hi:g}")
        value = float(value)
    elif not isinstance(value, float):
        raise BoundsError(field, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise BoundsError(field, f"{_short(value)} is out of range; allowed {lo:g}..{hi:g}")
    return value


def bounded_int(text: str | int, field: str, lo: int, hi: int) -> int:
    """An integer (or decimal text of at most ``MAX_INT_DIGITS`` digits) in ``[lo, hi]``."""
    if isinstance(text, bool):
        raise BoundsError(field, f"expected an integer, got {text!r}")
    if isinstance(text, str):
        stripped = text.strip()
        if len(stripped.lstrip("+-")) > MAX_INT_DIGITS or not stripped.lstrip("+-").isdigit():
            raise BoundsError(field, f"expected an integer between {lo} and {hi}, got {stripped[:24]!r}")
        text = int(stripped)
    if not isinstance(text, int) or not lo <= text <= hi:
        raise BoundsError(field, f"{_short(text)} is out of range; allowed {lo}..{hi}")
    return text


def _short(value: Any) -> str:
    """A number for a message; a huge int is described, not printed (``str`` refuses 4,300+ digits)."""
    if isinstance(value, int) and abs(value) >= 10**24:
        return f"a number of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return str(value)[:40]
