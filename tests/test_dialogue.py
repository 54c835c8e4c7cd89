"""Script parsing: the five formats, names, continuation lines, pauses, comments, errors, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dialogue import Dialogue, ScriptError, ScriptLimits, Speaker, Turn, parse_script
from tests.dialogue_support import error_of, parse_random_scripts

REPO = Path(__file__).resolve().parents[1]


def texts(dialogue: Dialogue) -> list[tuple[int, str]]:
    return [(t.speaker, t.text) for t in dialogue.turns]


# ---------------------------------------------------------------- formats


def test_tags_one_per_line_chinese() -> None:
    d = parse_script("(s1) 你好，今天天气真不错！\n(s2) 是的，很适合出去走走。")
    assert d.format == "tags"
    assert d.speakers == (Speaker(0, "Speaker 1"), Speaker(1, "Speaker 2"))
    assert d.turns[0] == Turn(0, "你好，今天天气真不错！", "你好，今天天气真不错！", "zh", 0.0, 1)
    assert d.turns[1].speaker == 1 and d.turns[1].line == 2 and d.turns[1].language == "zh"


def test_tags_inline_on_one_line_and_variants() -> None:
    d = parse_script("(s1)你好(s2) 是的 （S1）再见 [s2] bye 【s1】: 好")
    assert texts(d) == [(0, "你好"), (1, "是的"), (0, "再见"), (1, "bye"), (0, "好")]
    assert {t.line for t in d.turns} == {1}


def test_tags_continuation_lines_join_cjk_without_space() -> None:
    d = parse_script("(s1) 你好，\n今天天气不错。\n(s2) Yes,\n   indeed   it   is.")
    assert texts(d) == [(0, "你好，今天天气不错。"), (1, "Yes, indeed it is.")]
    assert [t.line for t in d.turns] == [1, 3]


def test_tag_alone_on_its_line_takes_the_next_line_and_keeps_its_line_number() -> None:
    d = parse_script("(s1)\nHello there.\n(s2) Hi.")
    assert texts(d) == [(0, "Hello there."), (1, "Hi.")]
    assert d.turns[0].line == 1


def test_roles_ascii_and_fullwidth_colon_and_number_decides_role() -> None:
    d = parse_script("角色2：我先说。\n角色1: OK, go ahead.\n角色2：好的")
    assert d.format == "roles"
    assert texts(d) == [(1, "我先说。"), (0, "OK, go ahead."), (1, "好的")]
    assert [s.name for s in d.speakers] == ["角色1", "角色2"]


def test_roles_english_words_and_missing_role_named_in_same_style() -> None:
    d = parse_script("Speaker 1: Hi.\nSpeaker 1: Still me.")
    assert d.format == "roles"
    assert [s.name for s in d.speakers] == ["Speaker 1", "Speaker 2"]
    d = parse_script("说话人一：你好")
    assert [s.name for s in d.speakers] == ["说话人一", "说话人二"]


def test_letters() -> None:
    d = parse_script("B: I start.\nA: Then me.\nB: Done.")
    assert d.format == "letters"
    assert texts(d) == [(1, "I start."), (0, "Then me."), (1, "Done.")]
    assert [s.name for s in d.speakers] == ["A", "B"]


def test_letters_continuation_line_with_a_colon_stays_text() -> None:
    d = parse_script("A: Remember this.\nNote: it matters.\nB: OK.")
    assert texts(d) == [(0, "Remember this. Note: it matters."), (1, "OK.")]


def test_names_first_two_distinct_names_become_roles() -> None:
    d = parse_script("Bob: Hi Alice.\nAlice: Hi Bob!\nBOB: How are you?\n  I mean it.")
    assert d.format == "names"
    assert [s.name for s in d.speakers] == ["Bob", "Alice"]
    assert texts(d) == [(0, "Hi Alice."), (1, "Hi Bob!"), (0, "How are you? I mean it.")]


def test_names_chinese_and_markdown_bold() -> None:
    d = parse_script("小明：你好！\n小红：你好呀。")
    assert [s.name for s in d.speakers] == ["小明", "小红"]
    assert texts(d) == [(0, "你好！"), (1, "你好呀。")]
    d = parse_script("**Dr. Smith:** Hello.\n**Jane Doe**: Hi.")
    assert [s.name for s in d.speakers] == ["Dr. Smith", "Jane Doe"]


def test_question_answer_letters_are_names_in_order_of_appearance() -> None:
    d = parse_script("Q: Why?\nA: Because.")
    assert d.format == "names"
    assert [s.name for s in d.speakers] == ["Q", "A"]


def test_free_alternates_speakers_and_skips_blank_lines_and_comments() -> None:
    d = parse_script("# title\nHello there.\n\n  # another comment\nHi!\nHow are you?\n")
    assert d.format == "free"
    assert texts(d) == [(0, "Hello there."), (1, "Hi!"), (0, "How are you?")]
    assert [t.line for t in d.turns] == [2, 5, 6]


def test_prose_with_a_colon_is_not_mistaken_for_names() -> None:
    # One colon line is not enough for a names script, and "The answer is:" is not a name.
    d = parse_script("Note: this is the first line\nand this is the second")
    assert d.format == "free" and len(d.turns) == 2
    d = parse_script("The answer is: yes\nThe question was: why")
    assert d.format == "free"
    d = parse_script("At 10:30 we meet.\nAt 11:00 we leave.")
    assert d.format == "free"


def test_mixed_language_turns() -> None:
    d = parse_script("(s1) 我用 Python 写了 3 个程序。\n(s2) That's 3 programs!")
    assert [t.language for t in d.turns] == ["zh", "en"]
    assert d.turns[0].speech_text == "我用 Python 写了 三 个程序。"
    assert d.turns[1].speech_text == "That's three programs!"
    assert d.turns[0].text == "我用 Python 写了 3 个程序。"  # subtitles keep the original


def test_monologue_is_allowed() -> None:
    d = parse_script("(s2) 只有我一个人说话。")
    assert texts(d) == [(1, "只有我一个人说话。")]
    assert len(d.speakers) == 2


# ---------------------------------------------------------------- pauses


@pytest.mark.parametrize(
    ("marker", "seconds"),
    [
        ("[pause 1.5s]", 1.5),
        ("[pause 800ms]", 0.8),
        ("[Pause 2]", 2.0),
        ("[pause: 0.5 sec]", 0.5),
        ("[停顿 1秒]", 1.0),
        ("【停顿500毫秒】", 0.5),
        ("[break 3 seconds]", 3.0),
        ('<break time="1.2s"/>', 1.2),
        ("[pause]", 0.5),  # no length: a short pause (SHORT_PAUSE_S)
        ("(pause)", 0.5),
        ("(pause 2s)", 2.0),
        ("(beat)", 0.5),
        ("…", 0.5),
        ("...", 0.5),
    ],
)
def test_pause_forms_on_their_own_line(marker: str, seconds: float) -> None:
    d = parse_script(f"(s1) Hello.\n{marker}\n(s2) Hi.")
    assert [t.pause_after for t in d.turns] == [seconds, 0.0]


def test_inline_pause_between_turns_and_consecutive_pauses_add_up() -> None:
    d = parse_script("(s1) 你好 [pause 1s] (s2) 是的 [停顿 0.5秒]\n[pause 0.25s]\n(s1) 走吧")
    assert [(t.text, t.pause_after) for t in d.turns] == [("你好", 1.0), ("是的", 0.75), ("走吧", 0.0)]


def test_pause_inside_a_turn_splits_it_with_the_same_speaker() -> None:
    d = parse_script("A: Wait for it [pause 2s] there it is.\nB: Wow.")
    assert [(t.speaker, t.text, t.pause_after) for t in d.turns] == [
        (0, "Wait for it", 2.0),
        (0, "there it is.", 0.0),
        (1, "Wow.", 0.0),
    ]


def test_pause_right_after_a_label_goes_after_the_previous_turn() -> None:
    d = parse_script("(s1) Hi.\n(s2) [pause 1s] Hello.")
    assert [(t.text, t.pause_after) for t in d.turns] == [("Hi.", 1.0), ("Hello.", 0.0)]


def test_pause_in_free_format_does_not_change_alternation() -> None:
    d = parse_script("One.\n[pause 1s]\nTwo.\nThree.")
    assert [(t.speaker, t.pause_after) for t in d.turns] == [(0, 1.0), (1, 0.0), (0, 0.0)]


def test_trailing_pause_after_the_last_turn() -> None:
    d = parse_script("(s1) Bye.\n[pause 2s]")
    assert d.turns[-1].pause_after == 2.0


def test_bracketed_words_that_only_start_like_a_pause_are_text() -> None:
    d = parse_script("(s1) [breaking news] Hello.")
    assert d.turns[0].text == "[breaking news] Hello." and d.turns[0].pause_after == 0.0


def test_names_monologue_second_speaker_gets_a_default_name() -> None:
    d = parse_script("Alice: Just me today.")
    assert d.format == "names"
    assert [s.name for s in d.speakers] == ["Alice", "Speaker 2"]


# ---------------------------------------------------------------- errors


def test_empty_script() -> None:
    for script in ("", "   \n\n", "# just a comment\n"):
        err = error_of(script)
        assert err.line is None and "empty" in str(err)
        assert err.field == "script"


def test_only_pauses() -> None:
    err = error_of("[pause 1s]")
    assert err.line == 1 and "before anything is said" in err.message


def test_unknown_tag_names_the_allowed_tags() -> None:
    err = error_of("(s1) Hi.\n\n(s3) Who am I?")
    assert err.line == 3
    assert str(err).startswith("line 3: ")
    assert "(s3)" in err.message and "(s1) and (s2)" in err.message


def test_unknown_role() -> None:
    err = error_of("角色1：你好\n角色3：我是谁")
    assert err.line == 2 and "角色3" in err.message and "角色1 and 角色2" in err.message


def test_third_name_names_the_two_known() -> None:
    err = error_of("Alice: Hi.\nBob: Hey.\nCarol: Me too!")
    assert err.line == 3
    assert "'Carol'" in err.message and "'Alice'" in err.message and "'Bob'" in err.message


def test_third_letter() -> None:
    err = error_of("A: one\nB: two\nC: three")
    assert err.line == 3 and "'C'" in err.message


@pytest.mark.parametrize("content", ["!!!", "😀😀", "……", "  ?! "])
def test_turn_with_nothing_speakable(content: str) -> None:
    err = error_of(f"(s1) Hello.\n(s2) {content}")
    assert err.line == 2 and "nothing to speak" in err.message


def test_empty_turn() -> None:
    err = error_of("(s1)\n(s2) Hi.")
    assert err.line == 1 and "empty" in err.message


def test_line_too_long_names_the_limit() -> None:
    err = error_of("(s1) ok\n(s2) " + "x" * 600)
    assert err.line == 2 and "500" in err.message


def test_script_too_long_names_the_limit() -> None:
    err = error_of("(s1) hello\n" * 10, ScriptLimits(max_chars=50))
    assert err.line is None and "50" in str(err)


def test_too_many_turns() -> None:
    err = error_of("(s1) a\n(s2) b\n(s1) c\n(s2) d", ScriptLimits(max_turns=3))
    assert err.line == 4 and "3" in err.message


@pytest.mark.parametrize(
    "marker", ["[pause abc]", "[pause 1.5min]", "[pause -1s]", "[停顿 一秒]", "[pause 1s", "[pause 1s 2s]"]
)
def test_malformed_pause_says_the_accepted_forms(marker: str) -> None:
    err = error_of(f"(s1) Hi.\n(s2) Hello {marker} there.")
    assert err.line == 2 and marker in err.message
    assert (
        "malformed pause" in err.message and "[pause 1.5s]" in err.message and "[pause 800ms]" in err.message
    )


def test_pause_over_the_limit() -> None:
    err = error_of("(s1) Hi.\n[pause 11s]")
    assert err.line == 2 and "10 s" in err.message
    err = error_of("(s1) Hi. [pause 6s]\n[pause 6s]")
    assert err.line == 2 and "add up to 12 s" in err.message


def test_pause_before_the_first_turn() -> None:
    err = error_of("[pause 1s]\n(s1) Hi.")
    assert err.line == 1


def test_text_before_the_first_tag() -> None:
    err = error_of("My great dialogue\n(s1) Hi.\n(s2) Hello.")
    assert err.line == 1 and "(s1)" in err.message and "#" in err.message


def test_mixed_tag_and_role_styles() -> None:
    err = error_of("(s1) Hi.\n角色2：你好")
    assert err.line == 2 and "(s2)" in err.message


def test_first_error_in_line_order_is_reported() -> None:
    err = error_of("(s1) !!!\n(s3) later")
    assert err.line == 1


def test_random_scripts_raise_only_script_errors() -> None:
    """Garbage in gives a ScriptError or a usable Dialogue, never a traceback from inside the parser."""
    pieces = ["(s1)", "(s2)", "(s3)", "角色1：", "A:", "Bob：", "[pause 1s]", "[pause", "<break>", "$", "$x^2$",
              "\\frac{", "}", "{", "\\sqrt[", "^", "_", "3.5", "-", "%", "2024-05-01", "14:30", "$5", "°C", "α",
              "√", "=", "<", ":", "你好", "hello", " ", "\n", "#", "😀", "…", "１２", "²", "\\", "1,234", "~", "&"]  # fmt: skip
    parsed = parse_random_scripts(pieces, seed=1234, max_pieces=25)
    for d in parsed:
        for turn in d.turns:
            assert turn.speaker in (0, 1) and turn.text and turn.speech_text and turn.language in ("en", "zh")
    assert len(parsed) > 20  # the generator does produce valid scripts, so both paths are exercised


def test_script_error_without_line_has_no_prefix() -> None:
    err = ScriptError("whole script is wrong")
    assert str(err) == "whole script is wrong" and err.line is None and err.message == "whole script is wrong"
    assert isinstance(err, ValueError)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_turns"):
        ScriptLimits(max_turns=0)


def test_windows_line_endings_and_bom() -> None:
    d = parse_script("\ufeff(s1) Hi.\r\n(s2) Hello.\r\n")
    assert texts(d) == [(0, "Hi."), (1, "Hello.")]


def test_to_dict_is_json_ready() -> None:
    d = parse_script("Alice: It costs $5.\n[pause 1s]\nBob: 好的")
    data = json.loads(json.dumps(d.to_dict(), ensure_ascii=False))
    assert data["format"] == "names"
    assert data["speakers"] == [{"index": 0, "name": "Alice"}, {"index": 1, "name": "Bob"}]
    assert data["turns"][0] == {
        "speaker": 0,
        "text": "It costs $5.",
        "speech_text": "It costs five dollars.",
        "language": "en",
        "pause_after": 1.0,
        "line": 1,
        "directions": [],
    }
    assert data["labels"] == "names"


# ---------------------------------------------------------------- CLI


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "dialogue", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=REPO,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("script", "fmt", "names"),
    [
        ("(s1) 你好！\n(s2) Hello!", "tags", ["Speaker 1", "Speaker 2"]),
        ("角色1：你好\n角色2：好", "roles", ["角色1", "角色2"]),
        ("A: one\nB: two", "letters", ["A", "B"]),
        ("Alice: hi\nBob: hello", "names", ["Alice", "Bob"]),
        ("Hello.\nHi.", "free", ["Speaker 1", "Speaker 2"]),
    ],
)
def test_cli_prints_json_for_every_format(tmp_path: Path, script: str, fmt: str, names: list[str]) -> None:
    path = tmp_path / "script.txt"
    path.write_text(script, encoding="utf-8")
    result = run_cli(str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == fmt
    assert [s["name"] for s in data["speakers"]] == names
    assert len(data["turns"]) == 2
    if fmt in ("tags", "roles"):
        assert "你好" in result.stdout  # ensure_ascii=False
    assert result.stdout.startswith("{\n  ")  # indent 2


def test_cli_reads_utf16_with_bom(tmp_path: Path) -> None:
    path = tmp_path / "notepad.txt"
    path.write_bytes("(s1) 你好\r\n(s2) 好".encode("utf-16"))
    result = run_cli(str(path))
    assert result.returncode == 0, result.stderr
    assert [t["text"] for t in json.loads(result.stdout)["turns"]] == ["你好", "好"]


def test_cli_reads_stdin() -> None:
    result = run_cli("-", stdin="(s1) It is 3:2.\n")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["turns"][0]["speech_text"] == "It is three to two."


def test_cli_invalid_script_exits_2_with_line() -> None:
    result = run_cli("-", stdin="(s1) Hi.\n(s3) Nope.\n")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: line 2: unknown speaker tag '(s3)'")


def test_cli_unreadable_file_exits_2(tmp_path: Path) -> None:
    result = run_cli(str(tmp_path / "missing.txt"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot read") and "missing.txt" in result.stderr
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x80\x81garbage\xc3")
    result = run_cli(str(binary))
    assert result.returncode == 2 and "not UTF-8" in result.stderr
