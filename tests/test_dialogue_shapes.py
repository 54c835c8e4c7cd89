"""Scripts as people write them: screenplays, chat logs, messenger exports, lists, directions.

Each ``tests/scripts/NAME.txt`` is parsed and compared with ``NAME.json``: the format, the two speakers,
every turn (speaker, line, subtitle text, speech text, directions, pause), and words that must never be
spoken (names, timestamps, list markers, directions).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dialogue import (
    FORMATS,
    LABEL_STYLES,
    SHORT_PAUSE_S,
    Dialogue,
    ScriptLimits,
    Speaker,
    Turn,
    parse_script,
)
from tests.dialogue_support import error_of, parse_random_scripts

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"
SHAPES = sorted(p.stem for p in SCRIPTS.glob("*.txt"))
_TIME_RE = re.compile(r"\d{1,2}:\d{2}")


def turns_of(d: Dialogue) -> list[dict[str, object]]:
    return [
        {
            "speaker": t.speaker,
            "line": t.line,
            "text": t.text,
            "speech_text": t.speech_text,
            "directions": list(t.directions),
            "pause_after": t.pause_after,
        }
        for t in d.turns
    ]


def test_the_corpus_has_every_shape() -> None:
    assert {
        "screenplay",
        "screenplay_titlecase",
        "chat_brackets",
        "chat_leading_time",
        "chat_name_time",
        "chat_headers",
        "whatsapp_ios",
        "whatsapp_android",
        "bullets",
        "numbered",
        "name_parenthetical",
        "inline_directions",
        "upstream_one_line",
    } <= set(SHAPES)
    for shape in SHAPES:
        assert (SCRIPTS / f"{shape}.json").is_file(), shape


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_parses_to_the_expected_turns(shape: str) -> None:
    expected = json.loads((SCRIPTS / f"{shape}.json").read_text(encoding="utf-8"))
    d = parse_script((SCRIPTS / f"{shape}.txt").read_text(encoding="utf-8"))
    assert d.format == expected["format"]
    assert d.labels == expected["labels"]
    assert [s.name for s in d.speakers] == expected["speakers"]
    assert {t.speaker for t in d.turns} == {0, 1}  # two people speak
    got = turns_of(d)
    if "turn_count" in expected:
        assert len(got) == expected["turn_count"]
        assert got[: len(expected["turns"])] == expected["turns"]
    else:
        assert got == expected["turns"]
    names = [s.name for s in d.speakers]
    for turn in d.turns:
        for word in expected["not_spoken"]:
            assert word.casefold() not in turn.speech_text.casefold(), (word, turn)
        for direction in turn.directions:
            assert direction not in turn.speech_text, (direction, turn)
        for name in names:  # labels go: neither said nor shown in the subtitles
            assert name not in turn.speech_text and name not in turn.text, (name, turn)
        assert not _TIME_RE.search(turn.speech_text) and not _TIME_RE.search(turn.text), turn


def test_upstream_one_line_script_alternates_and_keeps_every_word() -> None:
    text = (SCRIPTS / "upstream_one_line.txt").read_text(encoding="utf-8")
    assert len(text.strip()) > 3000 and text.count("\n") == 1
    d = parse_script(text)
    pieces = [p.strip() for p in re.split(r"\(s[12]\)", text) if p.strip()]
    assert [t.text for t in d.turns] == pieces
    assert [t.speaker for t in d.turns] == [i % 2 for i in range(len(pieces))]
    assert all(t.line == 1 for t in d.turns)


def test_cli_prints_the_format_and_the_directions() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(
        [sys.executable, "-m", "dialogue", str(SCRIPTS / "screenplay.txt")],
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == "screenplay" and data["labels"] == "names"
    assert data["turns"][1]["directions"] == ["Bob puts a folded map on the table.", "smiling"]
    assert [t["speech_text"] for t in data["turns"]][-1] == "Fine."


# ---------------------------------------------------------------- ambiguity is an error with its line


@pytest.mark.parametrize(
    ("script", "line"),
    [
        ("ALICE\nHi.\n\nBOB\nHello.\n\nCAROL\nMe too.", 7),
        ("[10:01] Alice: hi\n[10:02] Bob: hey\n[10:03] Carol: me too", 3),
        ("10:01 Alice: hi\n10:02 Bob: hey\n10:03 Carol: me too", 3),
        ("29/11/2026, 10:01 - Alice: hi\n29/11/2026, 10:02 - Bob: hey\n29/11/2026, 10:03 - Carol: yo", 3),
        (
            "[29/11/2026, 10:01:02] Alice: hi\n[29/11/2026, 10:01:03] Bob: hey\n[29/11/2026, 10:01:04] Carol: yo",
            3,
        ),
        ("- Alice: hi\n- Bob: hey\n- Carol: me too", 3),
        ("1. Alice: hi\n2. Bob: hey\n3. Carol: me too", 3),
        ("Alice (whispering): hi\nBob: hey\nCarol (shouting): me too", 3),
        ("Alice (10:01): hi\nBob (10:02): hey\nCarol (10:03): me too", 3),
        ("Alice, [29.11.2026 10:01]\nhi\nBob, [29.11.2026 10:02]\nhey\nCarol, [29.11.2026 10:03]\nyo", 5),
    ],
)
def test_a_third_speaker_is_an_error_naming_the_line(script: str, line: int) -> None:
    err = error_of(script)
    assert err.line == line and "third speaker" in err.message
    assert "Carol" in err.message or "CAROL" in err.message


def test_a_list_item_without_a_speaker_in_a_labelled_list_is_an_error() -> None:
    err = error_of("- Alice: hi\n- hey\n- Bob: hello")
    assert err.line == 2 and "no speaker" in err.message


def test_a_turn_with_only_directions_is_an_error() -> None:
    err = error_of("[10:01] Alice: hi\n[10:02] Bob: <Media omitted>\n[10:03] Alice: ok")
    assert err.line == 2 and "only directions" in err.message and "Media omitted" in err.message
    err = error_of("BOB\n(nods)\n\nALICE\nHi.")
    assert err.line == 1 and "only directions" in err.message and "'nods'" in err.message


# ---------------------------------------------------------------- what is not a layout (negative controls)


@pytest.mark.parametrize(
    ("script", "turns"),
    [
        ("Hi\nHow are you?\nFine\nThanks.", ["Hi", "How are you?", "Fine", "Thanks."]),
        ("Breaking News\nThe market fell today.", ["Breaking News", "The market fell today."]),
        ("10:30 is fine.\n11:00 works too.", ["10:30 is fine.", "11:00 works too."]),
        ("- one thing\nand another", ["- one thing", "and another"]),
    ],
)
def test_prose_stays_free(script: str, turns: list[str]) -> None:
    d = parse_script(script)
    assert d.format == "free" and [t.text for t in d.turns] == turns


def test_screenplay_and_list_need_their_shape_from_the_first_line() -> None:
    # A heading before a list or a screenplay must be a '#' comment; otherwise the script is prose.
    assert parse_script("Hello there.\nALICE\nHi.").format == "free"
    assert parse_script("Our plan\n- Alice: hi\n- Bob: hey").format == "free"
    assert parse_script("# Our plan\n- Alice: hi\n- Bob: hey").format == "list"


def test_whatsapp_notice_is_skipped_and_continuation_lines_join_the_message() -> None:
    d = parse_script((SCRIPTS / "whatsapp_android.txt").read_text(encoding="utf-8"))
    assert d.turns[0].line == 2  # line 1 is the app's notice
    d = parse_script((SCRIPTS / "whatsapp_ios.txt").read_text(encoding="utf-8"))
    assert d.turns[1].text == "Almost. Two more stops."


def test_chat_senders_the_name_label_does_not_take() -> None:
    d = parse_script("[10:01] <alice> hi\n[10:02] <bob> hello")
    assert d.format == "chat" and [s.name for s in d.speakers] == ["alice", "bob"]
    d = parse_script("[10:01] +49 151 2345678: hi\n[10:02] mom ❤️: hello")
    assert [s.name for s in d.speakers] == ["+49 151 2345678", "mom ❤️"]
    assert [t.text for t in d.turns] == ["hi", "hello"]


@pytest.mark.parametrize(
    "script",
    [
        "Alice — Today at 10:01 AM\nhi there\nBob — Today at 10:02 AM\nhello\nand welcome",  # Discord
        "Alice  10:01 AM\nhi there\nBob  10:02 AM\nhello\nand welcome",  # Slack
        "Alice, [29.11.2026 10:01]\nhi there\n\nBob, [29.11.2026 10:02]\nhello\nand welcome",  # Telegram
    ],
)
def test_chat_copies_with_a_header_line_per_message(script: str) -> None:
    d = parse_script(script)
    assert d.format == "chat" and [s.name for s in d.speakers] == ["Alice", "Bob"]
    assert [(t.speaker, t.text) for t in d.turns] == [(0, "hi there"), (1, "hello and welcome")]


@pytest.mark.parametrize(
    "script",
    ["We meet at - 10:30\nsure\nOr at - 11:00\nfine", "See you, 10:30\nOk\nSee you, 11:00\nok"],
)
def test_sentences_ending_in_a_time_are_not_chat_headers(script: str) -> None:
    d = parse_script(script)
    assert d.format == "free" and len(d.turns) == 4


def test_screenplay_names_that_are_roles_letters_or_numbered() -> None:
    d = parse_script("SPEAKER 2\nHi.\n\nSPEAKER 1\nHello.")
    assert (d.format, d.labels) == ("screenplay", "roles")
    assert [(t.speaker, t.text) for t in d.turns] == [(1, "Hi."), (0, "Hello.")]
    d = parse_script("B\nHi.\n\nA\nHello.")
    assert (d.labels, [t.speaker for t in d.turns]) == ("letters", [1, 0])
    d = parse_script("GUARD 1\nHalt!\n\nGUARD 2 (O.S.)\nWho goes there?")
    assert [s.name for s in d.speakers] == ["GUARD 1", "GUARD 2"] and d.turns[1].directions == ("O.S.",)


def test_bullets_without_names_alternate_and_say_so() -> None:
    d = parse_script("• hi\n• hello\n  and welcome\n• how are you")
    assert (d.format, d.labels) == ("list", "free")
    assert [(t.speaker, t.text) for t in d.turns] == [(0, "hi"), (1, "hello and welcome"), (0, "how are you")]


# ---------------------------------------------------------------- directions and pauses


def test_brackets_that_hold_maths_or_numbers_are_read() -> None:
    d = parse_script("(s1) So $f(x)$ is f(x) = (x + 1) since (2024), see [1] and (a).")
    turn = d.turns[0]
    assert turn.directions == ()
    assert "f x" in turn.speech_text and "x plus one" in turn.speech_text
    assert "two thousand twenty-four" in turn.speech_text


def test_directions_are_collected_in_order_from_label_and_text() -> None:
    d = parse_script("Alice (whispering): *leans in* can you [pause] hear me? (softly)\nBob: Yes.")
    assert [(t.text, t.speech_text, t.directions, t.pause_after) for t in d.turns] == [
        ("*leans in* can you", "can you", ("whispering", "leans in"), SHORT_PAUSE_S),
        ("hear me? (softly)", "hear me?", ("softly",), 0.0),
        ("Yes.", "Yes.", (), 0.0),
    ]


def test_a_direction_line_before_the_first_speaker_goes_to_the_first_turn() -> None:
    d = parse_script("*Alice enters*\nAlice: hi\nBob: hey")
    assert d.format == "names" and d.turns[0].directions == ("Alice enters",)
    d = parse_script("(smiling)\nHello there.\nHi!")
    assert d.format == "free" and [(t.speaker, t.directions) for t in d.turns] == [(0, ("smiling",)), (1, ())]


def test_round_bracket_pause_forms() -> None:
    d = parse_script("(s1) One (pause) two (pause 1.5s) three (pause for effect) four.")
    assert [(t.text, t.pause_after) for t in d.turns] == [
        ("One", SHORT_PAUSE_S),
        ("two", 1.5),
        ("three (pause for effect) four.", 0.0),
    ]
    assert d.turns[2].directions == ("pause for effect",)
    err = error_of("(s1) Hi (pause 20s) there")
    assert err.line == 1 and "10 s" in err.message


def test_only_a_lone_ellipsis_is_a_pause() -> None:
    d = parse_script("(s1) Well... I think … so.\n(s2) 好……吧")
    assert [(t.text, t.pause_after) for t in d.turns] == [
        ("Well... I think", 0.5),
        ("so.", 0.0),
        ("好……吧", 0.0),
    ]


# ---------------------------------------------------------------- length limits


def test_the_length_limit_is_per_turn_not_per_line() -> None:
    long_turn = "word " * 110  # 550 characters
    err = error_of(f"(s1) hi (s2) {long_turn}")
    assert err.line == 1 and "500" in err.message and "per turn" in err.message
    many = " ".join(f"(s{1 + i % 2}) " + "x" * 400 for i in range(12))  # 4,859 characters, one line
    assert len(parse_script(many).turns) == 12
    err = error_of(many + " (s1) more", ScriptLimits(max_chars=4000))
    assert err.line is None and "4000" in str(err)


def test_a_long_turn_over_several_lines_is_still_accepted() -> None:
    d = parse_script("Alice: " + "a " * 200 + "\n" + "b " * 200 + "\nBob: ok")
    assert len(d.turns[0].text) > 500


# ---------------------------------------------------------------- API compatibility


def test_turn_and_dialogue_keep_their_old_constructors() -> None:
    turn = Turn(0, "Hi.", "Hi.", "en", 0.0, 1)
    assert turn.directions == ()
    d = Dialogue((Speaker(0, "A"), Speaker(1, "B")), (turn,), "free")
    assert d.to_dict()["labels"] == "free" and d.to_dict()["turns"][0]["directions"] == []


def test_random_shaped_scripts_raise_only_script_errors() -> None:
    """Pieces of every shape, shuffled: a ScriptError or a usable Dialogue, never a traceback."""
    pieces = ["ALICE\n", "Bob\n", "\n\n", "[10:01] ", "10:01 ", "29/11/2026, 10:01 - ", "[29/11/2026, 10:01:02] ",
              "Alice: ", "Bob (smiling): ", "Carol: ", "- ", "* ", "• ", "1. ", "2) ", "(s1) ", "(s2) ", "*waves*",
              "(pause)", "[pause]", "(beat)", " … ", " ... ", "[laughs]", "（笑）", "<Media omitted>", "(V.O.)",
              "hello", "你好", "$f(x)$", "(x + 1)", "f(x)", "Alice, [29.11.2026 10:01]\n", "<alice> ", "(10:01)",
              "\u200e", "(pause 2s)", "(pause for effect)", "INT. HOUSE - DAY\n", "# note\n", ":", "(", ")", "*"]  # fmt: skip
    parsed = parse_random_scripts(pieces, seed=4321, max_pieces=20)
    for d in parsed:
        assert d.format in FORMATS and d.labels in LABEL_STYLES
        for turn in d.turns:
            assert turn.speaker in (0, 1) and turn.text and turn.speech_text
            assert all(isinstance(x, str) and x for x in turn.directions)
    assert len(parsed) > 20
