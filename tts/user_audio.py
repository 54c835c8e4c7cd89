"""Bring your own audio: one or two recordings -> a ``Timeline`` like the TTS path produces.

Each file is decoded (soundfile for wav/flac/mp3/ogg, PyAV for m4a and as a fallback), downmixed to
mono, resampled to 24 kHz with soxr and loudness-normalised to -23 LUFS (pyloudnorm, ITU-R BS.1770),
as upstream MultiTalk normalises its inputs. Audio shorter than one 400 ms measurement block, or
quieter than the -70 LUFS absolute gate, is left at its level. Then:

- ``add``: person 1's recording, then person 2's (sequential; each listener track is silent meanwhile),
- ``para``: both at once (the shorter one padded with silence),
- no second file: person 2 stays silent.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from tts.errors import AudioInputError, TTSInputError
from tts.timeline import Timeline, TurnTiming, min_length_samples

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
TARGET_LUFS = -23.0
# Peak below -80 dBFS counts as silence: nothing for a face to lip-sync to.
SILENCE_PEAK = 1e-4
SUPPORTED_FORMATS = ("wav", "flac", "mp3", "m4a", "ogg")
_SOUNDFILE_FORMATS = ("wav", "flac", "mp3", "ogg")
AUDIO_MODES = ("add", "para")


def _too_long(field: str, seconds: float, max_seconds: float) -> AudioInputError:
    return AudioInputError(
        field,
        f"{field} is too long: {seconds:.1f} s; the limit is {max_seconds:g} s ({max_seconds / 60:g} min)",
    )


def _decode_soundfile(path: Path, field: str, max_seconds: float) -> tuple[np.ndarray, int]:
    """``([N, C] float32, rate)`` via libsndfile; raises ``RuntimeError``-family errors if it cannot."""
    import soundfile as sf

    info = sf.info(str(path))
    if info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
        raise _too_long(field, info.frames / info.samplerate, max_seconds)
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return data, int(rate)


def _decode_pyav(path: Path, field: str, max_seconds: float) -> tuple[np.ndarray, int]:
    """``([N, C] float32, rate)`` via FFmpeg (PyAV): m4a/aac and anything libsndfile cannot read."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise AudioInputError(field, f"{field} has no audio stream")
        stream = container.streams.audio[0]
        seconds = None
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / av.time_base
        if seconds is not None and seconds > max_seconds:
            raise _too_long(field, seconds, max_seconds)
        # Planar float keeps the channels apart; rate and layout stay as decoded (soxr resamples later).
        resampler = av.AudioResampler(format="fltp")
        blocks: list[np.ndarray] = []
        rate = 0
        count = 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                rate = out.sample_rate
                block = out.to_ndarray().reshape(len(out.layout.channels), -1)
                blocks.append(block)
                count += block.shape[1]
            if rate and count > (max_seconds + 1) * rate:
                raise _too_long(field, count / rate, max_seconds)
        for out in resampler.resample(None):
            blocks.append(out.to_ndarray().reshape(len(out.layout.channels), -1))
    if not blocks or rate <= 0:
        return np.zeros((0, 1), dtype=np.float32), max(rate, SAMPLE_RATE)
    return np.concatenate(blocks, axis=1).T.astype(np.float32), int(rate)


def _decode(path: Path, field: str, max_seconds: float) -> tuple[np.ndarray, int]:
    ext = path.suffix.lower().lstrip(".")
    errors: list[str] = []
    if ext in _SOUNDFILE_FORMATS:
        try:
            return _decode_soundfile(path, field, max_seconds)
        except AudioInputError:
            raise
        except Exception as exc:  # libsndfile reports bad data as RuntimeError/LibsndfileError/TypeError
            errors.append(f"soundfile: {exc}")
    try:
        return _decode_pyav(path, field, max_seconds)
    except AudioInputError:
        raise
    except Exception as exc:  # FFmpegError and friends: the file is not decodable audio
        errors.append(f"ffmpeg: {exc}")
    detail = "; ".join(e[:160] for e in errors)
    raise AudioInputError(
        field,
        f"{field} ({path.name}) could not be decoded as {ext} audio; the file may be corrupt ({detail})",
    )


def loudness_normalize(audio: np.ndarray, rate: int, target_lufs: float = TARGET_LUFS) -> np.ndarray:
    """Scale ``audio: [N]`` to ``target_lufs`` integrated loudness; returns it unchanged when it cannot
    be measured (shorter than one 400 ms block, or fully below the -70 LUFS gate)."""
    import pyloudnorm

    meter = pyloudnorm.Meter(rate)
    if audio.size < math.ceil(meter.block_size * rate) + 1:
        return audio
    loudness = meter.integrated_loudness(audio.astype(np.float64))
    if not math.isfinite(loudness) or loudness < -70.0:
        return audio
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    return (audio * gain).astype(np.float32)


def load_audio(
    path: Path | str, field: str = "audio1", *, max_seconds: float = 600.0, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Decode, downmix, resample and loudness-normalise one recording.

    Returns ``audio: [N]`` float32 at ``sample_rate``. Raises ``AudioInputError`` (``.field == field``)
    for a missing, empty, unsupported, corrupt, silent or too-long file.
    """
    import soxr

    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if ext not in SUPPORTED_FORMATS:
        shown = f".{ext}" if ext else "no extension"
        raise AudioInputError(
            field, f"{field}: unsupported audio format ({shown}); allowed: {', '.join(SUPPORTED_FORMATS)}"
        )
    if not path.is_file():
        raise AudioInputError(field, f"{field}: file not found: {path}")
    if path.stat().st_size == 0:
        raise AudioInputError(field, f"{field} ({path.name}) is an empty file")
    data, rate = _decode(path, field, max_seconds)
    if data.size == 0:
        raise AudioInputError(field, f"{field} ({path.name}) contains no audio samples")
    if not np.isfinite(data).all():
        raise AudioInputError(field, f"{field} ({path.name}) contains NaN or infinite samples")
    seconds = data.shape[0] / rate
    if seconds > max_seconds:
        raise _too_long(field, seconds, max_seconds)
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if float(np.max(np.abs(mono))) <= SILENCE_PEAK:
        raise AudioInputError(field, f"{field} ({path.name}) is silent: there is no speech to animate")
    if rate != sample_rate:
        mono = np.asarray(soxr.resample(mono, rate, sample_rate, quality="HQ"), dtype=np.float32)
    out = loudness_normalize(np.ascontiguousarray(mono, dtype=np.float32), sample_rate)
    logger.info("%s: %s, %.2f s at %d Hz, %d channel(s)", field, path.name, seconds, rate, data.shape[1])
    return out


def timeline_from_files(
    path1: Path | str,
    path2: Path | str | None = None,
    mode: str = "add",
    *,
    max_seconds: float = 600.0,
    speaker_names: tuple[str, str] = ("Speaker 1", "Speaker 2"),
    fps: float = 25,
    min_frames: int = 81,
    margin_s: float = 0.2,
) -> Timeline:
    """Build a two-track ``Timeline`` (24 kHz) from user recordings.

    mode: ``"add"`` (person 1 then person 2) or ``"para"`` (simultaneous, shorter padded).
    max_seconds: limit for each file and, in ``add`` mode, for both together.
    The result is padded with silence to at least ``min_frames / fps + margin_s`` seconds.
    Turn timings carry no text, so the subtitle files have no cues.
    """
    if mode not in AUDIO_MODES:
        raise TTSInputError(
            "audio_mode",
            f"unknown audio mode {str(mode)[:40]!r}; allowed: 'add' (person 1 speaks, then person 2) "
            "or 'para' (both tracks at once)",
        )
    a1 = load_audio(path1, "audio1", max_seconds=max_seconds)
    a2 = load_audio(path2, "audio2", max_seconds=max_seconds) if path2 is not None else None
    sr = SAMPLE_RATE
    names = (str(speaker_names[0]), str(speaker_names[1]))
    n1 = a1.size
    turns = [TurnTiming(0, 0, names[0], 0.0, n1 / sr, "")]
    if a2 is None:
        length = n1
    elif mode == "add":
        length = n1 + a2.size
        if length > max_seconds * sr:
            raise AudioInputError(
                "audio2",
                f"in 'add' mode the two recordings play one after the other: together {length / sr:.1f} s; "
                f"the limit is {max_seconds:g} s",
            )
        turns.append(TurnTiming(1, 1, names[1], n1 / sr, length / sr, ""))
    else:
        length = max(n1, a2.size)
        turns.append(TurnTiming(1, 1, names[1], 0.0, a2.size / sr, ""))
    total = max(length, min_length_samples(sr, fps, min_frames, margin_s))
    tracks = np.zeros((2, total), dtype=np.float32)
    tracks[0, :n1] = a1
    if a2 is not None:
        start = n1 if mode == "add" else 0
        tracks[1, start : start + a2.size] = a2
    return Timeline(sample_rate=sr, tracks=tracks, turns=turns, speaker_names=names)
