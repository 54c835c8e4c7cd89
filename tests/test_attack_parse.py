"""Hostile numbers and JSON: bounded parsing refuses with the field, never RecursionError/OverflowError."""

from __future__ import annotations

import pytest

from common.bounded import MAX_JSON_DEPTH, BoundsError, bounded_float, bounded_int, check_depth, loads
from common.errors import InputError


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[" * 100_000, "nested deeper"),
        ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "nested deeper"),
        ('{"a": ' * 40 + "1" + "}" * 40, "nested deeper"),
        ("[" + "9" * 400 + "]", "400 digits"),
        ("-" + "9" * 5000, "5000 digits"),  # past Python's own int-string limit
        ("1e400", "out of range"),
        ("[1." + "0" * 400 + "1]", "out of range"),
        ("NaN", "not a number"),
        ("[-Infinity]", "not a number"),
        ("{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_loads_refuses_with_the_field(text, words) -> None:
    with pytest.raises(BoundsError, match=words) as info:
        loads(text, "settings")
    assert info.value.field == "settings" and isinstance(info.value, InputError)


def test_loads_accepts_ordinary_json() -> None:
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads(nested, "boxes") is not None  # exactly the limit is fine
    assert loads('{"steps": 40, "text_guidance": 5.5, "seed": 123456789012345678}', "settings") == {
        "steps": 40, "text_guidance": 5.5, "seed": 123456789012345678,
    }  # fmt: skip


def test_check_depth_is_iterative() -> None:
    deep: list = []
    for _ in range(50_000):  # far past the interpreter's recursion limit
        deep = [deep]
    with pytest.raises(BoundsError, match="nested deeper") as info:
        check_depth(deep, "bbox")
    assert info.value.field == "bbox"
    check_depth([[1, 2], {"a": [3]}], "bbox")  # negative control


def test_bounded_numbers() -> None:
    assert bounded_float("2.5", "shift", 0, 100) == 2.5 and bounded_float(3, "shift", 0, 100) == 3.0
    assert bounded_int("42", "offset", 0, 10**9) == 42
    for value in (10**400, "1" * 400, "nan", "inf", 1e308, -1, True, "3 4", None):
        with pytest.raises(BoundsError) as info:
            bounded_float(value, "shift", 0, 100)
        assert info.value.field == "shift"
    for value in ("9223372036854775808", "1" * 400, "-1", "1.5", "0x10", 10**30):
        with pytest.raises(BoundsError) as info:
            bounded_int(value, "offset", 0, 2**62)
        assert info.value.field == "offset"
        assert len(str(info.value)) < 200
