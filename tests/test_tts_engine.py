"""KokoroEngine through the real KModel with random weights (tts.tiny), and timelines built with it."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import tts.engine
from dialogue import parse_script
from tts.engine import (
    PREVIEW_LINES,
    SAMPLE_RATE,
    SUBMODULES,
    KokoroEngine,
    Synthesizer,
    _verify_loaded,
    g2p_code,
    split_phonemes,
)
from tts.errors import KokoroWeightsError, TTSInputError, UnknownVoiceError
from tts.timeline import OUTPUT_FILES, build_timeline, turn_seed

EN = "Hi there."
ZH = "你好。"


@pytest.fixture(scope="module")
def engine(tiny_kokoro_dir) -> KokoroEngine:
    return KokoroEngine(tiny_kokoro_dir)


# ------------------------------------------------------------------ loading


def test_missing_folder_and_files_are_named(tmp_path) -> None:
    with pytest.raises(KokoroWeightsError) as info:
        KokoroEngine(tmp_path / "nope")
    assert info.value.field == "kokoro_dir" and "does not exist" in str(info.value)
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "config.json").write_text("{}")
    with pytest.raises(KokoroWeightsError) as info:
        KokoroEngine(tmp_path / "k")
    assert "kokoro-v1_0.pth" in str(info.value) and "voices/*.pt" in str(info.value)


def test_bad_config_and_checkpoint_are_reported(tmp_path, tiny_kokoro_dir) -> None:
    k = tmp_path / "k"
    (k / "voices").mkdir(parents=True)
    (k / "voices" / "af_heart.pt").symlink_to(tiny_kokoro_dir / "voices" / "af_heart.pt")
    (k / "config.json").write_text("{not json")
    torch.save({"weights": torch.zeros(2)}, k / "kokoro-v1_0.pth")
    with pytest.raises(KokoroWeightsError, match="not readable JSON"):
        KokoroEngine(k)
    (k / "config.json").write_bytes((tiny_kokoro_dir / "config.json").read_bytes())
    with pytest.raises(KokoroWeightsError, match="not a Kokoro checkpoint"):
        KokoroEngine(k)


def test_partial_checkpoint_is_rejected() -> None:
    # KModel falls back to strict=False loading; the engine must notice parameters that were not loaded.
    model = torch.nn.Module()
    for name in SUBMODULES:
        setattr(model, name, torch.nn.Linear(2, 2))
    full = {name: getattr(model, name).state_dict() for name in SUBMODULES}
    _verify_loaded(model, full, "x.pth")
    prefixed = {name: {f"module.{k}": v for k, v in sd.items()} for name, sd in full.items()}
    _verify_loaded(model, prefixed, "x.pth")
    partial = dict(full, decoder={"weight": full["decoder"]["weight"]})
    with pytest.raises(KokoroWeightsError, match="decoder"):
        _verify_loaded(model, partial, "x.pth")


def test_engine_basics(engine: KokoroEngine) -> None:
    assert isinstance(engine, Synthesizer)
    assert engine.sample_rate == SAMPLE_RATE == 24_000
    assert engine.available_voices == ("af_heart", "am_adam", "zf_xiaobei", "zm_yunjian")
    assert [v.id for v in engine.installed_voices()] == list(engine.available_voices)
    with pytest.raises(UnknownVoiceError) as info:
        engine.synthesize(EN, "xx_nobody", "en", seed=0)
    assert info.value.field == "voice"
    with pytest.raises(UnknownVoiceError, match="installed: af_heart"):
        engine.synthesize(EN, "bf_emma", "en", seed=0)  # a real Kokoro voice, not in this folder
    for kwargs, field in (
        ({"text": "  "}, "text"),
        ({"text": "... —"}, "text"),
        ({"language": "fr"}, "language"),
        ({"speed": 0.0}, "speed"),
        ({"seed": "1"}, "seed"),
    ):
        call = {"text": EN, "voice": "af_heart", "language": "en", "seed": 0} | kwargs
        with pytest.raises(TTSInputError) as err:
            engine.synthesize(**call)
        assert err.value.field == field, kwargs


# ---------------------------------------------------------------- synthesis


def test_english_synthesis_is_seeded_and_leaves_rng_alone(engine: KokoroEngine) -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    t0 = time.perf_counter()
    a = engine.synthesize(EN, "af_heart", "en", seed=5)
    elapsed = time.perf_counter() - t0
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG stream untouched
    assert a.dtype == np.float32 and a.ndim == 1
    assert a.size > SAMPLE_RATE // 10 and a.size % 600 == 0  # 600 samples per duration frame
    assert np.isfinite(a).all() and np.abs(a).max() > 1e-3
    b = engine.synthesize(EN, "af_heart", "en", seed=5)
    np.testing.assert_array_equal(a, b)
    c = engine.synthesize(EN, "af_heart", "en", seed=6)
    assert a.shape == c.shape and not np.array_equal(a, c)  # only the vocoder noise differs
    d = engine.synthesize(EN, "am_adam", "en", seed=5)
    assert not np.array_equal(a[: min(a.size, d.size)], d[: min(a.size, d.size)])
    print(f"tiny Kokoro: {a.size / SAMPLE_RATE:.2f} s of audio in {elapsed:.2f} s")


def test_chinese_turns_with_chinese_and_english_voices(engine: KokoroEngine) -> None:
    zh = engine.synthesize(ZH, "zf_xiaobei", "zh", seed=0)
    assert zh.dtype == np.float32 and zh.size > 0 and np.isfinite(zh).all()
    en_voice = engine.synthesize(ZH, "am_adam", "zh", seed=0)  # English voice, Chinese G2P
    assert en_voice.size == zh.size or en_voice.size > 0
    (ps,) = engine.phonemize("我们用GPU。", "z")
    assert "↓" in ps or "→" in ps or "↗" in ps or "↘" in ps  # Mandarin tones as arrows
    assert "GPU" not in ps and "ʤ" in ps  # the Latin run is phonemised by the English G2P


def test_espeak_fallback_warns_once(engine: KokoroEngine, monkeypatch, caplog) -> None:
    monkeypatch.setattr(tts.engine, "_espeak_warned", False)
    monkeypatch.setattr(engine, "_spacy", False)
    with caplog.at_level("WARNING", logger="tts.engine"):
        first = engine.phonemize("Hello world.", "a")
        engine.phonemize("Hello again.", "b")
    assert [r.levelname for r in caplog.records].count("WARNING") == 1
    assert "en_core_web_sm" in caplog.text
    assert first == ["həlˈO wˈɜːld."]  # misaki's espeak mapping (diphthong O) for American English


def test_g2p_choice_and_chunking() -> None:
    assert g2p_code("z", "en") == "a" and g2p_code("b", "en") == "b" and g2p_code("a", "zh") == "z"
    with pytest.raises(TTSInputError):
        g2p_code("a", "de")
    text = ("ab, " * 100 + "cd. ") * 3
    chunks = split_phonemes(text, limit=510)
    assert all(len(c) <= 510 for c in chunks) and len(chunks) >= 3
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")
    assert chunks[0].endswith((".", ","))


def test_long_text_is_chunked_and_concatenated(engine: KokoroEngine, monkeypatch) -> None:
    # Shrink the 510-phoneme chunk limit so that a short text needs several model calls.
    monkeypatch.setattr(tts.engine, "MAX_PHONEMES", 12)
    text = "Hi there, Bob. How are you?"
    chunks = engine.phonemize(text, "a")
    assert len(chunks) >= 2 and all(len(c) <= 12 for c in chunks)
    lengths: list[int] = []
    real_model = engine._model

    def spy(ps: str, style: torch.Tensor, speed: float) -> torch.Tensor:
        assert len(ps) <= 12 and style.shape == (1, 256)
        out = real_model(ps, style, speed)
        lengths.append(out.numel())
        return out

    monkeypatch.setattr(engine, "_model", spy)
    audio = engine.synthesize(text, "af_heart", "en", seed=0, speed=2.0)
    assert len(lengths) == len(chunks) and audio.size == sum(lengths)


def test_preview_in_voice_language(engine: KokoroEngine) -> None:
    zh = engine.preview("zm_yunjian")
    en = engine.preview("af_heart", seed=3)
    assert zh.size > 0 and en.size > 0 and zh.dtype == en.dtype == np.float32
    # the Chinese line goes through the tone-arrow G2P, so it is not the English line
    assert any(a in "".join(engine.phonemize(PREVIEW_LINES["z"], "z")) for a in "↓→↗↘")


# ----------------------------------------------------------------- timeline

SCRIPT = "Alice: Hi there.\nBob: 你好。[pause 0.5s]\nAlice: Bye."
VOICES = ("af_heart", "zm_yunjian")


@pytest.fixture(scope="module")
def timeline(engine: KokoroEngine):
    return build_timeline(parse_script(SCRIPT), VOICES, engine, seed=0)


def test_timeline_through_real_kokoro(engine: KokoroEngine, timeline) -> None:
    tl = timeline
    sr = tl.sample_rate
    assert sr == 24_000 and tl.tracks.shape[0] == 2 and tl.tracks.dtype == np.float32
    assert [t.speaker for t in tl.turns] == [0, 1, 0] and tl.speaker_names == ("Alice", "Bob")
    dlg = parse_script(SCRIPT)
    assert [t.language for t in dlg.turns] == ["en", "zh", "en"]
    for i, (t, turn) in enumerate(zip(tl.turns, dlg.turns, strict=True)):
        start, end = round(t.start * sr), round(t.end * sr)
        assert tl.tracks[t.speaker, start:end].any()
        assert not tl.tracks[1 - t.speaker, start:end].any()  # listener silent
        if i < 2:  # the speaker's segment is exactly what the engine says for this turn and seed
            expected = engine.synthesize(turn.speech_text, VOICES[t.speaker], turn.language, turn_seed(0, i))
            np.testing.assert_array_equal(tl.tracks[t.speaker, start:end], expected)
    # nothing outside the turns
    mask = np.zeros(tl.num_samples, dtype=bool)
    for t in tl.turns:
        mask[round(t.start * sr) : round(t.end * sr)] = True
    assert not tl.tracks[:, ~mask].any()
    # gap 0.25 s between turns; turn 2 also waits for the 0.5 s pause
    assert tl.turns[1].start - tl.turns[0].end == pytest.approx(0.25, abs=1 / sr)
    assert tl.turns[2].start - tl.turns[1].end == pytest.approx(0.75, abs=1 / sr)
    assert tl.num_frames(25) >= 81
    assert tl.resampled(16_000).shape == (2, round(tl.num_samples * 16_000 / sr))
    srt_times = [line for line in tl.to_srt().splitlines() if "-->" in line]
    assert len(srt_times) == 3
    ms = round(tl.turns[1].start * 1000)
    assert srt_times[1].startswith(f"00:00:{ms // 1000:02d},{ms % 1000:03d}")


def test_timeline_seed_determinism(engine: KokoroEngine, timeline) -> None:
    again = build_timeline(parse_script(SCRIPT), VOICES, engine, seed=0)
    np.testing.assert_array_equal(again.tracks, timeline.tracks)
    other = build_timeline(parse_script(SCRIPT), VOICES, engine, seed=1)
    assert other.tracks.shape == timeline.tracks.shape and not np.array_equal(other.tracks, timeline.tracks)


# ---------------------------------------------------------------------- CLI


_network_guard = {"on": False}


def _refuse_network(event: str, args: tuple) -> None:
    if _network_guard["on"] and event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
        raise RuntimeError(f"network access during TTS: {event} {args[:2]}")


def test_cli_script_writes_six_files_offline(tiny_kokoro_dir, tmp_path, capsys) -> None:
    """Engine load, English and Chinese G2P and synthesis with every socket lookup refused."""
    from tts.__main__ import main

    sys.addaudithook(_refuse_network)  # audit hooks cannot be removed; the flag turns this one off

    script = tmp_path / "dialogue.txt"
    script.write_text("(s1) Hi there. (s2) 你好。", encoding="utf-8")
    out = tmp_path / "out"
    _network_guard["on"] = True
    try:
        rc = main(["--script", str(script), "--voices", "af_heart,zf_xiaobei", "--kokoro-dir", str(tiny_kokoro_dir),
                   "--out", str(out), "--seed", "3"])  # fmt: skip
    finally:
        _network_guard["on"] = False
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    s1, r1 = sf.read(out / "speaker1.wav")
    s2, r2 = sf.read(out / "speaker2.wav")
    assert r1 == r2 == 24_000 and s1.shape == s2.shape and s1.any() and s2.any()
    assert "Speaker 1: Hi there." in (out / "subtitles.srt").read_text(encoding="utf-8")
    assert "mix.wav" in capsys.readouterr().out


def test_cli_bad_input_exits_2(tiny_kokoro_dir, tmp_path, capsys) -> None:
    from tts.__main__ import main

    script = tmp_path / "d.txt"
    script.write_text("(s1) Hi.", encoding="utf-8")
    args = ["--script", str(script), "--kokoro-dir", str(tiny_kokoro_dir), "--out", str(tmp_path / "o")]
    assert main([*args, "--voices", "af_heart,am_nobody"]) == 2
    assert "voice" in capsys.readouterr().err
    assert main([*args, "--voices", "af_heart,am_adam", "--kokoro-dir", str(tmp_path / "none")]) == 2
    assert "kokoro_dir" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert main(["--script", str(empty), "--voices", "af_heart,am_adam", "--out", str(tmp_path / "o")]) == 2
    assert "script" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "o")])
    assert info.value.code == 2


def test_cli_make_tiny_reuses_existing_folder(tiny_kokoro_dir, capsys) -> None:
    from tts.__main__ import main

    before = (tiny_kokoro_dir / "kokoro-v1_0.pth").stat().st_mtime_ns
    assert main(["make-tiny", "--out", str(tiny_kokoro_dir)]) == 0
    assert (tiny_kokoro_dir / "kokoro-v1_0.pth").stat().st_mtime_ns == before
    assert "random weights" in capsys.readouterr().out
