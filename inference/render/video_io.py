"""Frames + audio -> H.264/AAC mp4 with imageio-ffmpeg's bundled ffmpeg; subtitles; PyAV probing.

Upstream (``save_video_ffmpeg``, ``research/multitalk.md`` §6.6) writes a temp video with imageio, cuts
the audio to ``T / fps`` seconds and muxes with ``-shortest``. Here the same result comes from two
ffmpeg runs that never hold the whole video in memory:

1. frames stream through a pipe into libx264 (yuv420p) -> a hidden temp mp4 beside the output;
2. the audio, cropped or zero-padded to exactly ``round(T * sample_rate / fps)`` samples, is encoded
   to AAC and muxed with the copied video stream -> a second temp file, then ``os.replace`` onto the
   output path. On any failure every temp file is removed and no partial output appears.

The ffmpeg binary is ``imageio_ffmpeg.get_ffmpeg_exe()`` (no system ffmpeg needed, nothing fetched).
"""

from __future__ import annotations

import logging
import numbers
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from common.errors import InputError
from common.files import atomic_write

logger = logging.getLogger(__name__)

SUBTITLE_FORMATS = ("srt", "vtt")
_WRITE_CHUNK_FRAMES = 16


class VideoIOError(InputError):
    """Bad input to the video writer or an unreadable media file; ``field`` names the input."""


@dataclass(frozen=True)
class MediaInfo:
    """What PyAV reports about a media file. Durations in seconds; audio fields are None without audio."""

    video_codec: str | None
    pix_fmt: str | None
    width: int
    height: int
    frames: int
    fps: float
    video_duration: float
    audio_codec: str | None
    audio_sample_rate: int | None
    audio_duration: float | None
    audio_channels: int | None = None


def ffmpeg_exe() -> str:
    """Path of the bundled ffmpeg binary."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _iter_frames(frames: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Yield uint8 chunks ``[t, H, W, 3]`` from an array ``[T, H, W, 3]`` or an iterable of frames
    ``[H, W, 3]`` / chunks ``[t, H, W, 3]``."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise VideoIOError("frames", f"expected uint8 [T, H, W, 3], got shape {list(frames.shape)}")
        for start in range(0, frames.shape[0], _WRITE_CHUNK_FRAMES):
            yield frames[start : start + _WRITE_CHUNK_FRAMES]
        return
    for item in frames:
        arr = np.asarray(item)
        yield arr[None] if arr.ndim == 3 else arr


def _check_chunk(chunk: np.ndarray, shape: tuple[int, int] | None) -> tuple[int, int]:
    if chunk.ndim != 4 or chunk.shape[-1] != 3:
        raise VideoIOError(
            "frames", f"each frame must be [H, W, 3] RGB, got a chunk of shape {list(chunk.shape)}"
        )
    if chunk.dtype != np.uint8:
        raise VideoIOError(
            "frames",
            f"frames must be uint8 in [0, 255], got {chunk.dtype}; convert e.g. with (x * 255).round()",
        )
    h, w = int(chunk.shape[1]), int(chunk.shape[2])
    if shape is None:
        if h % 2 or w % 2:
            raise VideoIOError(
                "frames", f"H.264 yuv420p needs even width and height, got {w}x{h}; crop or pad by one pixel"
            )
        return h, w
    if (h, w) != shape:
        raise VideoIOError("frames", f"frame size changed mid-stream from {shape[1]}x{shape[0]} to {w}x{h}")
    return shape


def _check_audio(audio: np.ndarray | None, sample_rate: int) -> np.ndarray | None:
    if audio is None:
        return None
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, (int, np.integer))
        or not 8000 <= sample_rate <= 192000
    ):
        raise VideoIOError(
            "sample_rate", f"sample_rate must be an integer in [8000, 192000] Hz, got {sample_rate!r}"
        )
    arr = np.asarray(audio)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise VideoIOError("audio", f"audio must be mono float32 [S], got shape {list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise VideoIOError("audio", f"audio must be float samples in [-1, 1], got {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise VideoIOError("audio", "audio contains NaN or infinite samples")
    return arr


def _fit_audio(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """Crop or zero-pad ``audio [S]`` to exactly ``n_samples``, clipped to [-1, 1]."""
    out = np.zeros(n_samples, dtype=np.float32)
    n = min(n_samples, audio.shape[0])
    out[:n] = np.clip(audio[:n], -1.0, 1.0)
    return out


def _ffmpeg_cmd(args: list[str]) -> list[str]:
    """The bundled ffmpeg, quiet except for errors, overwriting its output, then ``args``."""
    return [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]


def _ffmpeg_error(verb: str, what: str, rc: int, stderr: bytes) -> RuntimeError:
    tail = stderr.decode(errors="replace").strip()[-2000:]
    return RuntimeError(f"ffmpeg {verb} while {what} (exit {rc}): {tail}")


def _run_ffmpeg(args: list[str], what: str) -> None:
    proc = subprocess.run(_ffmpeg_cmd(args), capture_output=True, check=False)
    if proc.returncode != 0:
        raise _ffmpeg_error("failed", what, proc.returncode, proc.stderr)


def _encode_video(
    frames: np.ndarray | Iterable[np.ndarray], path: Path, fps: float, crf: int, preset: str
) -> tuple[int, int, int]:
    """Stream frames into libx264; returns ``(T, H, W)``. Raises and kills ffmpeg on any error."""
    chunks = _iter_frames(frames)
    shape: tuple[int, int] | None = None
    first: np.ndarray | None = None
    for chunk in chunks:
        shape = _check_chunk(chunk, None)
        first = chunk
        if chunk.shape[0]:
            break
    if first is None or shape is None or first.shape[0] == 0:
        raise VideoIOError("frames", "no frames to write; need at least one [H, W, 3] uint8 frame")
    h, w = shape
    cmd = _ffmpeg_cmd([
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", _fps_text(fps), "-i", "pipe:0",
        "-an", "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
        # BT.709 tags so players do not guess the colour matrix differently per resolution.
        "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709",
        "-f", "mp4", str(path),
    ])  # fmt: skip
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        count = 0
        try:
            assert proc.stdin is not None
            chunk: np.ndarray | None = first
            while chunk is not None:
                _check_chunk(chunk, shape)
                if chunk.shape[0]:
                    proc.stdin.write(np.ascontiguousarray(chunk).tobytes())
                    count += int(chunk.shape[0])
                chunk = next(chunks, None)
            proc.stdin.close()
            rc = proc.wait()
        except BrokenPipeError:
            rc = proc.wait()
            err.seek(0)
            raise _ffmpeg_error("stopped", "encoding video", rc, err.read()) from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if rc != 0:
            err.seek(0)
            raise _ffmpeg_error("failed", "encoding video", rc, err.read())
    return count, h, w


def _fps_text(fps: float) -> str:
    frac = Fraction(fps).limit_denominator(1001)
    return f"{frac.numerator}/{frac.denominator}"


def _check_subtitles(subtitles: Mapping[str, str] | None) -> dict[str, str]:
    if subtitles is None:
        return {}
    if not isinstance(subtitles, Mapping):
        raise VideoIOError(
            "subtitles", f"expected a dict like {{'srt': text, 'vtt': text}}, got {type(subtitles).__name__}"
        )
    out = {}
    for key, text in subtitles.items():
        fmt = str(key).lower().lstrip(".")
        if fmt not in SUBTITLE_FORMATS:
            raise VideoIOError(
                "subtitles", f"unknown subtitle format {key!r}; allowed: {list(SUBTITLE_FORMATS)}"
            )
        if not isinstance(text, str):
            raise VideoIOError("subtitles", f"subtitles[{key!r}] must be text, got {type(text).__name__}")
        out[fmt] = text
    return out


def write_video(
    frames: np.ndarray | Iterable[np.ndarray],
    audio: np.ndarray | None,
    sample_rate: int,
    out_path: str | Path,
    *,
    fps: float = 25,
    subtitles: Mapping[str, str] | None = None,
    crf: int = 18,
    preset: str = "medium",
    audio_bitrate: str = "192k",
) -> Path:
    """Write ``frames`` (uint8 ``[T, H, W, 3]``, or an iterable of ``[H, W, 3]`` frames / ``[t, H, W, 3]``
    chunks) with mono float32 ``audio [S]`` at ``sample_rate`` as H.264 yuv420p + AAC at ``fps``.

    The audio is cropped or zero-padded to exactly ``T / fps`` seconds. ``audio=None`` writes a silent
    video without an audio stream. ``subtitles`` (``{"srt": text, "vtt": text}``) are written beside the
    video as ``subtitles.srt`` / ``subtitles.vtt``, and the SRT also goes into the mp4 as a soft
    ``mov_text`` track (when there is audio). Every file appears atomically; returns the mp4 path.
    """
    out = Path(out_path)
    if not out.parent.is_dir():
        raise VideoIOError("out_path", f"folder does not exist: {str(out.parent)!r}")
    if isinstance(fps, bool) or not (isinstance(fps, numbers.Real) and 1 <= fps <= 240):
        raise VideoIOError("fps", f"fps must be a number in [1, 240], got {fps!r}")
    subs = _check_subtitles(subtitles)
    wav = _check_audio(audio, sample_rate)

    tag = uuid.uuid4().hex[:12]
    tmp_video = out.parent / f".{out.name}.{tag}.video.tmp"
    tmp_audio = out.parent / f".{out.name}.{tag}.audio.tmp"
    tmp_final = out.parent / f".{out.name}.{tag}.mux.tmp"
    tmp_srt = out.parent / f".{out.name}.{tag}.srt"
    try:
        n_frames, h, w = _encode_video(frames, tmp_video, fps, crf, preset)
        if wav is None:
            os.replace(tmp_video, out)
        else:
            n_samples = round(n_frames * sample_rate / fps)
            _fit_audio(wav, n_samples).tofile(tmp_audio)
            # A soft subtitle track (mov_text) inside the mp4 too, so players can switch captions on.
            sub_args: list[str] = []
            if subs.get("srt", "").strip():
                tmp_srt.write_text(subs["srt"], encoding="utf-8")
                sub_args = ["-i", str(tmp_srt), "-map", "2:s:0", "-c:s", "mov_text",
                            "-metadata:s:s:0", "handler_name=Dialogue"]  # fmt: skip
            _run_ffmpeg(
                ["-i", str(tmp_video), "-f", "f32le", "-ar", str(int(sample_rate)), "-ac", "1", "-i", str(tmp_audio),
                 *sub_args[:2], "-map", "0:v:0", "-map", "1:a:0", *sub_args[2:], "-c:v", "copy", "-c:a", "aac",
                 "-b:a", audio_bitrate, "-movflags", "+faststart", "-f", "mp4", str(tmp_final)],
                "muxing audio",
            )  # fmt: skip
            os.replace(tmp_final, out)
        for fmt, text in subs.items():
            atomic_write(out.parent / f"subtitles.{fmt}", lambda f, text=text: f.write(text.encode("utf-8")))
    finally:
        for tmp in (tmp_video, tmp_audio, tmp_final, tmp_srt):
            tmp.unlink(missing_ok=True)
    logger.info("wrote %s: %d frames %dx%d at %s fps", out, n_frames, w, h, fps)
    return out


# ----------------------------------------------------------------------------------------------------
# Reading (PyAV)
# ----------------------------------------------------------------------------------------------------


def _open(path: str | Path):  # returns av.container.InputContainer
    import av

    p = Path(path)
    if not p.is_file():
        raise VideoIOError("path", f"media file not found: {str(p)!r}")
    try:
        return av.open(str(p))
    except av.FFmpegError as exc:
        raise VideoIOError("path", f"{p.name!r} is not a readable media file ({exc})") from None


def _stream_duration(stream, container) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000
    return 0.0


def probe_media(path: str | Path) -> MediaInfo:
    """Codecs, size, frame count, fps and durations of a media file (PyAV)."""
    with _open(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        frames = 0
        if video is not None:
            frames = int(video.frames or 0)
            if frames == 0:  # containers without a frame count: demux and count packets
                frames = sum(1 for pkt in container.demux(video) if pkt.size)
        return MediaInfo(
            video_codec=video.codec_context.name if video is not None else None,
            pix_fmt=video.codec_context.pix_fmt if video is not None else None,
            width=int(video.codec_context.width) if video is not None else 0,
            height=int(video.codec_context.height) if video is not None else 0,
            frames=frames,
            fps=float(video.average_rate) if video is not None and video.average_rate else 0.0,
            video_duration=_stream_duration(video, container) if video is not None else 0.0,
            audio_codec=audio.codec_context.name if audio is not None else None,
            audio_sample_rate=int(audio.codec_context.sample_rate) if audio is not None else None,
            audio_duration=_stream_duration(audio, container) if audio is not None else None,
            audio_channels=int(audio.codec_context.channels) if audio is not None else None,
        )


def read_frames(path: str | Path) -> np.ndarray:
    """Decode every video frame as RGB: ``[T, H, W, 3]`` uint8."""
    with _open(path) as container:
        if not container.streams.video:
            raise VideoIOError("path", f"{Path(path).name!r} has no video stream")
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise VideoIOError("path", f"{Path(path).name!r} has no decodable frames")
    return np.stack(frames)


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream as mono float32 ``[S]`` and its sample rate."""
    with _open(path) as container:
        if not container.streams.audio:
            raise VideoIOError("path", f"{Path(path).name!r} has no audio stream")
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate)
        parts = []
        for frame in container.decode(audio=0):
            arr = frame.to_ndarray()  # planar: [C, n]; packed: [1, n * C]
            if np.issubdtype(arr.dtype, np.integer):
                arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
            if frame.format.is_planar:
                parts.append(arr.astype(np.float32).mean(axis=0))
            else:
                parts.append(arr.reshape(-1, len(frame.layout.channels)).astype(np.float32).mean(axis=1))
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), rate
