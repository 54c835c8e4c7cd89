"""What the script-parser tests share: the ScriptError a script raises, and scripts shuffled from pieces."""

from __future__ import annotations

import random

import pytest

from dialogue import Dialogue, ScriptError, ScriptLimits, parse_script


def error_of(script: str, limits: ScriptLimits | None = None) -> ScriptError:
    with pytest.raises(ScriptError) as info:
        parse_script(script, limits or ScriptLimits())
    return info.value


def parse_random_scripts(pieces: list[str], seed: int, max_pieces: int, count: int = 400) -> list[Dialogue]:
    """Parse ``count`` scripts of 0..``max_pieces`` random ``pieces``; each either raises a ScriptError with a
    message (and a 1-based line or none) or parses. Returns the dialogues that parsed."""
    rng = random.Random(seed)
    parsed = []
    for _ in range(count):
        script = "".join(rng.choice(pieces) for _ in range(rng.randint(0, max_pieces)))
        try:
            parsed.append(parse_script(script))
        except ScriptError as err:
            assert err.message and (err.line is None or err.line >= 1)
    return parsed
