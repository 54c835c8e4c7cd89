"""Bring-your-own audio: formats, resampling, loudness, add/para layout, errors, CLI."""

from __future__ import annotations

import math

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from tts.errors import AudioInputError, TTSInputError
from tts.user_audio import SAMPLE_RATE, TARGET_LUFS, load_audio, timeline_from_files


def speechlike(
    seconds: float, rate: int, channels: int = 1, level: float = 0.05, seed: int = 0
) -> np.ndarray:
    """``[N, C]`` float32: a 180 Hz buzz with syllable-rate amplitude modulation and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    x = np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)) + 0.05 * rng.standard_normal(
        t.size
    )
    x = (level * x).astype(np.float32)
    return np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], axis=1) if channels > 1 else x[:, None]


def lufs(x: np.ndarray) -> float:
    return pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(x.astype(np.float64))


def write_m4a(path, data: np.ndarray, rate: int) -> None:
    import av

    layout = "stereo" if data.shape[1] == 2 else "mono"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data.T), format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.mark.parametrize(
    ("ext", "rate", "channels"),
    [("wav", 44_100, 2), ("flac", 16_000, 1), ("mp3", 48_000, 2), ("ogg", 22_050, 1), ("m4a", 44_100, 2)],
)
def test_formats_decode_resample_and_normalise(tmp_path, ext: str, rate: int, channels: int) -> None:
    path = tmp_path / f"voice.{ext}"
    data = speechlike(1.5, rate, channels)
    if ext == "m4a":
        write_m4a(path, data, rate)
    else:
        sf.write(path, data, rate, **({"subtype": "PCM_16"} if ext == "wav" else {}))
    out = load_audio(path, "audio1")
    assert out.ndim == 1 and out.dtype == np.float32 and np.isfinite(out).all()
    # lossy codecs add encoder delay/padding; the length is still 1.5 s at 24 kHz give or take ~0.1 s
    assert abs(out.size - 1.5 * SAMPLE_RATE) < 0.1 * SAMPLE_RATE
    assert abs(lufs(out) - TARGET_LUFS) < 0.5


def test_resampling_keeps_pitch(tmp_path) -> None:
    rate = 8_000
    t = np.arange(rate) / rate
    sf.write(tmp_path / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)
    out = load_audio(tmp_path / "tone.wav")
    assert out.size == SAMPLE_RATE
    assert np.argmax(np.abs(np.fft.rfft(out))) == 440


def test_too_short_to_measure_is_left_at_its_level(tmp_path) -> None:
    x = speechlike(0.2, SAMPLE_RATE)[:, 0]
    sf.write(tmp_path / "blip.wav", x, SAMPLE_RATE, subtype="FLOAT")
    out = load_audio(tmp_path / "blip.wav")
    np.testing.assert_allclose(out, x, atol=1e-7)


def test_add_and_para_layouts(tmp_path) -> None:
    sf.write(tmp_path / "a.wav", speechlike(1.0, 24_000), 24_000)
    sf.write(tmp_path / "b.flac", speechlike(2.0, 48_000, seed=1), 48_000)
    n1, n2 = 24_000, 48_000

    add = timeline_from_files(tmp_path / "a.wav", tmp_path / "b.flac", "add", min_frames=1, margin_s=0.0)
    assert add.sample_rate == 24_000 and add.tracks.shape == (2, n1 + n2)
    assert add.tracks[0, :n1].any() and not add.tracks[0, n1:].any()
    assert not add.tracks[1, :n1].any() and add.tracks[1, n1:].any()
    assert [(t.speaker, t.start, t.end) for t in add.turns] == [(0, 0.0, 1.0), (1, 1.0, 3.0)]

    para = timeline_from_files(tmp_path / "a.wav", tmp_path / "b.flac", "para", min_frames=1, margin_s=0.0)
    assert para.tracks.shape == (2, n2)  # the shorter track is padded
    assert para.tracks[0, :n1].any() and not para.tracks[0, n1:].any() and para.tracks[1].any()
    assert [(t.start, t.end) for t in para.turns] == [(0.0, 1.0), (0.0, 2.0)]
    assert np.max(np.abs(para.mix)) <= 0.99 + 1e-6

    solo = timeline_from_files(tmp_path / "a.wav", None, "para", speaker_names=("Ann", "Ben"))
    assert not solo.tracks[1].any() and len(solo.turns) == 1 and solo.speaker_names == ("Ann", "Ben")
    assert solo.num_frames(25) >= 81  # padded to one clip
    assert solo.to_srt() == ""  # no transcript for uploaded audio


def test_errors_name_the_file(tmp_path) -> None:
    good = tmp_path / "good.wav"
    sf.write(good, speechlike(1.5, 16_000), 16_000)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    silent = tmp_path / "silent.flac"
    sf.write(silent, np.zeros(16_000, dtype=np.float32), 16_000)
    empty = tmp_path / "empty.mp3"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    bad_m4a = tmp_path / "bad.m4a"
    bad_m4a.write_bytes(bytes(range(256)) * 8)

    cases = [
        ((corrupt, good), "audio1", "corrupt"),
        ((good, corrupt), "audio2", "corrupt"),
        ((good, bad_m4a), "audio2", "could not be decoded"),
        ((silent, good), "audio1", "silent"),
        ((good, empty), "audio2", "empty"),
        ((text, good), "audio1", "unsupported audio format"),
        ((tmp_path / "missing.wav", good), "audio1", "not found"),
    ]
    for (p1, p2), field, words in cases:
        with pytest.raises(AudioInputError) as info:
            timeline_from_files(p1, p2, "add")
        assert info.value.field == field and words in str(info.value), (p1.name, p2.name, str(info.value))
        assert isinstance(info.value, ValueError)

    with pytest.raises(AudioInputError, match=r"the limit is 1 s") as info:
        timeline_from_files(good, None, "add", max_seconds=1)
    assert info.value.field == "audio1"
    with pytest.raises(AudioInputError, match=r"together 3\.0 s; the limit is 2 s") as info:
        timeline_from_files(good, good, "add", max_seconds=2)
    assert info.value.field == "audio2"
    with pytest.raises(TTSInputError) as info:
        timeline_from_files(good, good, "mix")
    assert info.value.field == "audio_mode"


def test_nan_samples_rejected(tmp_path) -> None:
    x = speechlike(1.0, 16_000)[:, 0]
    x[100] = math.nan
    sf.write(tmp_path / "nan.wav", x, 16_000, subtype="FLOAT")
    with pytest.raises(AudioInputError, match="NaN"):
        load_audio(tmp_path / "nan.wav", "audio2")


def test_cli_user_audio(tmp_path, capsys) -> None:
    from tts.__main__ import main

    sf.write(tmp_path / "a.wav", speechlike(1.0, 16_000), 16_000)
    sf.write(tmp_path / "b.wav", speechlike(1.0, 16_000, seed=2), 16_000)
    out = tmp_path / "out"
    assert main(["--audio1", str(tmp_path / "a.wav"), "--audio2", str(tmp_path / "b.wav"), "--mode", "para",
                 "--out", str(out)]) == 0  # fmt: skip
    mix, rate = sf.read(out / "mix.wav")
    assert rate == 24_000 and mix.size >= 81 / 25 * 24_000
    assert (out / "timeline.json").is_file() and (out / "subtitles.vtt").read_text().startswith("WEBVTT")
    (tmp_path / "bad.wav").write_bytes(b"nope")
    assert main(["--audio1", str(tmp_path / "bad.wav"), "--out", str(out)]) == 2
    assert "audio1" in capsys.readouterr().err


def test_header_budget_refuses_before_decoding(tmp_path) -> None:
    # 8 channels x 96 kHz x 1.5 s = 1.15 M values: over the 2 s budget (192 k values), refused unread.
    path = tmp_path / "wide.flac"
    sf.write(path, np.full((144_000, 8), 0.25, dtype=np.float32), 96_000, subtype="PCM_16")
    with pytest.raises(AudioInputError, match=r"8 channel\(s\) x 96000 Hz x 1\.5 s") as info:
        load_audio(path, "audio2", max_seconds=2)
    assert info.value.field == "audio2"
    # Negative control: the same file under a budget that holds it decodes.
    assert load_audio(path, "audio2", max_seconds=13).size == 36_000


def test_streamed_decode_matches_one_shot_resample_and_pyloudnorm(tmp_path) -> None:
    import soxr

    from tts.user_audio import integrated_loudness

    rate = 44_100
    data = speechlike(7.3, rate, channels=2)
    data[:rate] = 0.0  # a silent second exercises the gates
    sf.write(tmp_path / "v.wav", data, rate, subtype="FLOAT")
    out = load_audio(tmp_path / "v.wav")
    ref = np.asarray(soxr.resample(data.mean(axis=1), rate, SAMPLE_RATE, quality="HQ"), dtype=np.float32)
    assert out.shape == ref.shape
    ref *= 10 ** ((TARGET_LUFS - lufs(ref)) / 20)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    for x in (ref, ref[: SAMPLE_RATE // 2 + 7], np.zeros(SAMPLE_RATE, dtype=np.float32)):
        want = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(x.astype(np.float64))
        got = integrated_loudness(x, SAMPLE_RATE)
        assert got == pytest.approx(want, abs=1e-9) or (math.isinf(got) and math.isinf(want))
