"""mp4 writing with the bundled ffmpeg, probing and reading back with PyAV (tiny videos)."""

from __future__ import annotations

import numpy as np
import pytest

from inference.render.video_io import VideoIOError, probe_media, read_audio, read_frames, write_video

FPS = 25


def gradient_frames(t: int, h: int = 64, w: int = 96) -> np.ndarray:
    """Smooth moving gradient, [T, H, W, 3] uint8 (compresses well and survives H.264 closely)."""
    yy, xx = np.mgrid[:h, :w]
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        out[i, ..., 0] = (xx * 2 + i * 4) % 256
        out[i, ..., 1] = (yy * 3) % 256
        out[i, ..., 2] = 128
    return out


def tone(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
    n = round(seconds * sr)
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(("sr", "audio_seconds"), [(16000, 0.7), (24000, 3.0)])
def test_mp4_streams_and_durations(tmp_path, sr, audio_seconds):
    frames = gradient_frames(30)  # 1.2 s
    out = write_video(frames, tone(audio_seconds, sr), sr, tmp_path / "v.mp4", fps=FPS)
    assert out == tmp_path / "v.mp4" and leftovers(tmp_path) == ["v.mp4"]
    info = probe_media(out)
    assert (info.video_codec, info.pix_fmt) == ("h264", "yuv420p")
    assert (info.width, info.height, info.frames) == (96, 64, 30)
    assert info.fps == pytest.approx(FPS)
    assert (info.audio_codec, info.audio_sample_rate, info.audio_channels) == ("aac", sr, 1)
    # Audio was padded (0.7 s) or cropped (3.0 s) to the video's 1.2 s.
    assert info.video_duration == pytest.approx(1.2, abs=1 / FPS)
    assert info.audio_duration == pytest.approx(info.video_duration, abs=1 / FPS)


def test_audio_content_is_kept_then_padded_with_silence(tmp_path):
    sr = 16000
    out = write_video(gradient_frames(50), tone(1.0, sr), sr, tmp_path / "v.mp4")  # 2 s video, 1 s tone
    audio, rate = read_audio(out)
    assert rate == sr
    rms = lambda a: float(np.sqrt(np.mean(a**2)))  # noqa: E731
    assert rms(audio[int(0.1 * sr) : int(0.9 * sr)]) > 0.15  # tone (0.3 / sqrt 2 = 0.21)
    assert rms(audio[int(1.2 * sr) : int(1.9 * sr)]) < 0.01  # zero padding


def test_frames_round_trip(tmp_path):
    frames = gradient_frames(12)
    out = write_video(frames, tone(0.5, 16000), 16000, tmp_path / "v.mp4")
    back = read_frames(out)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 4


def test_iterator_of_frames_and_chunks_streams(tmp_path):
    frames = gradient_frames(20)
    chunks = iter(
        [frames[:7], frames[7], frames[8:8], frames[8:]]
    )  # a chunk, a frame, an empty chunk, a chunk
    out = write_video(chunks, tone(0.8, 24000), 24000, tmp_path / "v.mp4")
    assert probe_media(out).frames == 20


def test_exception_mid_stream_leaves_no_file(tmp_path):
    frames = gradient_frames(10)
    old = tmp_path / "v.mp4"
    write_video(frames[:5], None, 16000, old)
    before = old.read_bytes()

    def broken():
        yield from frames[:6]
        raise RuntimeError("decoder crashed")

    with pytest.raises(RuntimeError, match="decoder crashed"):
        write_video(broken(), tone(1.0, 16000), 16000, tmp_path / "new.mp4")
    with pytest.raises(RuntimeError, match="decoder crashed"):
        write_video(broken(), tone(1.0, 16000), 16000, old)
    assert leftovers(tmp_path) == ["v.mp4"]
    assert old.read_bytes() == before  # the earlier complete file is untouched


def test_ffmpeg_failure_is_reported_and_cleaned(tmp_path):
    with pytest.raises(RuntimeError, match="ffmpeg"):
        write_video(gradient_frames(4), tone(0.2, 16000), 16000, tmp_path / "v.mp4", preset="no-such-preset")
    assert leftovers(tmp_path) == []


def test_subtitles_written_beside_video(tmp_path):
    srt = "1\n00:00:00,000 --> 00:00:00,400\nHello\n"
    vtt = "WEBVTT\n\n00:00.000 --> 00:00.400\nHello\n"
    out = write_video(
        gradient_frames(10), tone(0.4, 16000), 16000, tmp_path / "v.mp4", subtitles={"srt": srt, "vtt": vtt}
    )
    assert (tmp_path / "subtitles.srt").read_text() == srt
    assert (tmp_path / "subtitles.vtt").read_text() == vtt
    assert leftovers(tmp_path) == ["subtitles.srt", "subtitles.vtt", out.name]


def test_silent_video_has_no_audio_stream(tmp_path):
    info = probe_media(write_video(gradient_frames(5), None, 16000, tmp_path / "v.mp4"))
    assert info.frames == 5 and info.audio_codec is None and info.audio_duration is None


@pytest.mark.parametrize(
    ("frames", "audio", "kwargs", "field", "match"),
    [
        (gradient_frames(3, 63, 96), None, {}, "frames", "even"),
        (gradient_frames(3).astype(np.float32), None, {}, "frames", "uint8"),
        (gradient_frames(3)[..., :2], None, {}, "frames", "RGB"),
        (np.zeros((0, 64, 96, 3), np.uint8), None, {}, "frames", "no frames"),
        (iter([gradient_frames(2), gradient_frames(2, 32, 32)]), None, {}, "frames", "changed"),
        (gradient_frames(3), np.zeros((2, 100), np.float32), {}, "audio", "mono"),
        (gradient_frames(3), np.zeros(100, np.int16), {}, "audio", "float"),
        (gradient_frames(3), np.full(100, np.nan, np.float32), {}, "audio", "NaN"),
        (gradient_frames(3), np.zeros(100, np.float32), {"sample_rate": 10}, "sample_rate", "8000"),
        (gradient_frames(3), None, {"fps": 0}, "fps", "fps"),
        (gradient_frames(3), None, {"subtitles": {"ass": "x"}}, "subtitles", "srt"),
    ],
)
def test_input_errors(tmp_path, frames, audio, kwargs, field, match):
    sr = kwargs.pop("sample_rate", 16000)
    with pytest.raises(VideoIOError, match=match) as info:
        write_video(frames, audio, sr, tmp_path / "v.mp4", **kwargs)
    assert info.value.field == field and isinstance(info.value, ValueError)
    assert leftovers(tmp_path) == []


def test_missing_folder_and_bad_media(tmp_path):
    with pytest.raises(VideoIOError) as info:
        write_video(gradient_frames(2), None, 16000, tmp_path / "nope" / "v.mp4")
    assert info.value.field == "out_path"
    (tmp_path / "x.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoIOError, match="not a readable media file"):
        probe_media(tmp_path / "x.mp4")
    with pytest.raises(VideoIOError, match="not found"):
        read_frames(tmp_path / "missing.mp4")


def test_srt_is_also_a_soft_subtitle_track_in_the_mp4(tmp_path):
    import av

    srt = (
        "1\n00:00:00,000 --> 00:00:00,800\nAlice: 你好, hello\n\n2\n00:00:00,900 --> 00:00:01,500\nBob: Hi!\n"
    )
    out = write_video(
        gradient_frames(40), tone(1.6, 16000), 16000, tmp_path / "v.mp4", subtitles={"srt": srt}
    )
    with av.open(str(out)) as container:
        subs = [s for s in container.streams if s.type == "subtitle"]
        assert len(subs) == 1 and subs[0].codec_context.name == "mov_text"
        texts = [bytes(p).decode("utf-8", "replace") for p in container.demux(subs[0]) if p.size]
    assert any("Alice: 你好, hello" in t for t in texts) and any("Bob: Hi!" in t for t in texts)
    info = probe_media(out)
    assert info.frames == 40 and info.audio_codec == "aac"  # video and audio unaffected
    assert leftovers(tmp_path) == ["subtitles.srt", "v.mp4"]  # no temporary files left
