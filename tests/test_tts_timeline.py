"""Timeline layout, padding, mix, resampling, subtitles and files, with a fake synthesiser.

The same timeline through the real (tiny, random-weight) Kokoro is tested in test_tts_engine.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from dialogue import Dialogue, Speaker, Turn
from tts.engine import Synthesizer
from tts.errors import TTSInputError, UnknownVoiceError
from tts.timeline import OUTPUT_FILES, Timeline, TurnTiming, build_timeline, turn_seed


class FakeSynth:
    """Deterministic stand-in: a constant-amplitude block whose length is 100 samples per character."""

    def __init__(self, sample_rate: int = 16_000, amplitude: float = 0.5) -> None:
        self.sample_rate = sample_rate
        self.amplitude = amplitude
        self.calls: list[tuple[str, str, str, int, float]] = []

    def synthesize(self, text: str, voice: str, language: str, seed: int, speed: float = 1.0) -> np.ndarray:
        self.calls.append((text, voice, language, seed, speed))
        if voice == "bad_voice":
            raise UnknownVoiceError("voice", "unknown voice 'bad_voice'")
        if text == "@@@":
            raise TTSInputError("text", "nothing speakable in '@@@'")
        return np.full(100 * len(text), self.amplitude, dtype=np.float32)


def make_dialogue(*turns: tuple[int, str, float], names: tuple[str, str] = ("Alice", "Bob")) -> Dialogue:
    return Dialogue(
        speakers=(Speaker(0, names[0]), Speaker(1, names[1])),
        turns=tuple(
            Turn(speaker=s, text=t, speech_text=t.lower(), language="en", pause_after=p, line=i + 1)
            for i, (s, t, p) in enumerate(turns)
        ),
        format="names",
    )


def test_fake_satisfies_protocol() -> None:
    assert isinstance(FakeSynth(), Synthesizer)


def test_layout_gaps_pauses_and_listener_silence() -> None:
    synth = FakeSynth(sample_rate=16_000)
    dlg = make_dialogue((0, "Hello there", 0.5), (1, "Hi", 0.0), (0, "Bye now", 0.3))
    tl = build_timeline(dlg, ("af_heart", "am_adam"), synth, gap_s=0.25, seed=7, min_frames=1, margin_s=0.2)
    sr = 16_000
    n = [100 * len(t) for t in ("hello there", "hi", "bye now")]
    starts = [0, n[0] + round(0.75 * sr), 0]
    starts[2] = starts[1] + n[1] + round(0.25 * sr)
    assert [round(t.start * sr) for t in tl.turns] == starts
    assert [round(t.end * sr) for t in tl.turns] == [s + k for s, k in zip(starts, n, strict=True)]
    # tail: last turn's pause_after + margin
    assert tl.num_samples == starts[2] + n[2] + round(0.3 * sr) + round(0.2 * sr)
    assert tl.tracks.shape == (2, tl.num_samples) and tl.tracks.dtype == np.float32
    # each speaker's samples are exactly their own turns; the listener's track is silent meanwhile
    expected = np.zeros_like(tl.tracks)
    for t, k in zip(tl.turns, n, strict=True):
        expected[t.speaker, round(t.start * sr) : round(t.start * sr) + k] = 0.5
    np.testing.assert_array_equal(tl.tracks, expected)
    # voices follow roles, speech_text is spoken, text is shown, seeds are per turn
    assert [c[1] for c in synth.calls] == ["af_heart", "am_adam", "af_heart"]
    assert [c[0] for c in synth.calls] == ["hello there", "hi", "bye now"]
    assert [t.text for t in tl.turns] == ["Hello there", "Hi", "Bye now"]
    assert [c[3] for c in synth.calls] == [turn_seed(7, i) for i in range(3)]
    assert len({c[3] for c in synth.calls}) == 3
    assert [t.speaker_name for t in tl.turns] == ["Alice", "Bob", "Alice"]
    assert tl.sample_rate == sr


def test_short_dialogue_padded_to_min_frames() -> None:
    tl = build_timeline(make_dialogue((0, "Hi", 0.0)), ("af_heart", "am_adam"), FakeSynth(24_000))
    assert tl.duration >= 81 / 25 + 0.2 - 1e-9
    assert tl.num_frames(25) >= 81
    assert tl.duration < 81 / 25 + 0.2 + 1e-3
    assert np.count_nonzero(tl.tracks[0]) == 200 and not tl.tracks[1].any()


def test_mix_is_peak_limited_tracks_untouched() -> None:
    tl = build_timeline(
        make_dialogue((0, "Loud", 0.0), (1, "Also loud", 0.0)), ("a", "b"), FakeSynth(amplitude=1.5)
    )
    mix = tl.mix
    assert mix.shape == (tl.num_samples,) and mix.dtype == np.float32
    assert np.max(np.abs(mix)) == pytest.approx(0.99, abs=1e-6)
    assert np.max(tl.tracks) == pytest.approx(1.5)
    quiet = Timeline(16_000, np.stack([np.full(10, 0.2), np.full(10, 0.3)]).astype(np.float32))
    np.testing.assert_allclose(quiet.mix, 0.5, atol=1e-7)


def test_resampled_keeps_frequency_and_shape() -> None:
    sr = 24_000
    t = np.arange(sr) / sr
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    tl = Timeline(sr, np.stack([tone, np.zeros_like(tone)]))
    out = tl.resampled(16_000)
    assert out.shape == (2, 16_000) and out.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(out[0]))
    assert np.argmax(spectrum) == 440  # 1 s of audio: bin index == Hz
    assert not out[1].any()
    np.testing.assert_array_equal(tl.resampled(sr), tl.tracks)


def test_subtitles_match_timeline() -> None:
    tl = Timeline(
        16_000,
        np.zeros((2, 80_000), dtype=np.float32),
        turns=[
            TurnTiming(0, 0, "Alice", 0.0, 1.2345, "Hello <there> & you"),
            TurnTiming(1, 1, "Bob", 1.5, 3.0, "Hi\nagain"),
            TurnTiming(2, 0, "Alice", 3661.5, 3662.0, ""),
        ],
        speaker_names=("Alice", "Bob"),
    )
    assert tl.to_srt() == (
        "1\n00:00:00,000 --> 00:00:01,234\nAlice: Hello <there> & you\n\n2\n00:00:01,500 --> 00:00:03,000\nBob: Hi again\n"
    )
    assert tl.to_vtt() == (
        "WEBVTT\n\n1\n00:00:00.000 --> 00:00:01.234\n<v Alice>Hello &lt;there&gt; &amp; you\n\n"
        "2\n00:00:01.500 --> 00:00:03.000\n<v Bob>Hi again\n"
    )
    data = json.loads(tl.to_json())
    assert data["speaker_names"] == ["Alice", "Bob"]
    assert data["sample_rate"] == 16_000 and data["num_samples"] == 80_000 and data["duration"] == 5.0
    assert [(d["start"], d["end"], d["speaker"]) for d in data["turns"]] == [
        (0.0, 1.2345, 0),
        (1.5, 3.0, 1),
        (3661.5, 3662.0, 0),
    ]


def test_write_six_files_atomically(tmp_path) -> None:
    tl = build_timeline(make_dialogue((0, "Hello", 0.0), (1, "World", 0.0)), ("a", "b"), FakeSynth(24_000))
    written = tl.write(tmp_path / "out")
    assert sorted(written) == sorted(OUTPUT_FILES)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(OUTPUT_FILES)  # no temp files left
    for name, row in (("speaker1.wav", tl.tracks[0]), ("speaker2.wav", tl.tracks[1]), ("mix.wav", tl.mix)):
        audio, rate = sf.read(written[name], dtype="float32")
        assert rate == 24_000
        np.testing.assert_array_equal(audio, row)
    srt = written["subtitles.srt"].read_text(encoding="utf-8")
    assert "Alice: Hello" in srt and "Bob: World" in srt
    assert written["subtitles.vtt"].read_text(encoding="utf-8").startswith("WEBVTT")
    assert json.loads(written["timeline.json"].read_text(encoding="utf-8"))["num_samples"] == tl.num_samples


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"voices": ("af_heart",)}, "voices"),
        ({"gap_s": -0.1}, "gap_s"),
        ({"gap_s": float("nan")}, "gap_s"),
        ({"min_frames": 0}, "min_frames"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    voices = kwargs.pop("voices", ("af_heart", "am_adam"))
    with pytest.raises(TTSInputError) as info:
        build_timeline(make_dialogue((0, "Hi", 0.0)), voices, FakeSynth(), **kwargs)
    assert info.value.field == field


def test_synth_errors_point_at_voice_or_script_line() -> None:
    with pytest.raises(UnknownVoiceError) as info:
        build_timeline(make_dialogue((0, "Hi", 0.0), (1, "Yo", 0.0)), ("af_heart", "bad_voice"), FakeSynth())
    assert info.value.field == "voice2"
    dlg = make_dialogue((0, "Hi", 0.0), (1, "@@@", 0.0))
    with pytest.raises(TTSInputError) as info2:
        build_timeline(dlg, ("af_heart", "am_adam"), FakeSynth())
    assert info2.value.field == "script" and "line 2" in str(info2.value)
    with pytest.raises(TTSInputError) as info3:
        build_timeline(Dialogue((Speaker(0, "A"), Speaker(1, "B")), (), "free"), ("a", "b"), FakeSynth())
    assert info3.value.field == "script"
