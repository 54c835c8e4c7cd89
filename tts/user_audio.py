"""Bring your own audio: one or two recordings -> a ``Timeline`` like the TTS path produces.

Each file is decoded (soundfile for wav/flac/mp3/ogg, PyAV for m4a and as a fallback), downmixed to
mono, resampled to 24 kHz with soxr and loudness-normalised to -23 LUFS (ITU-R BS.1770 integrated
loudness, pyloudnorm's K-weighting filters), as upstream MultiTalk normalises its inputs. Audio shorter
than one 400 ms measurement block, or quieter than the -70 LUFS absolute gate, is left at its level.

Memory is bounded by the output, not by the file: a small file can declare hours of 8-channel 96 kHz
audio. Before decoding, the header's rate x channels x seconds is held against a budget
(``MAX_VALUES_PER_SECOND`` per second of the length limit: 48 kHz stereo or 96 kHz mono), and the
decode streams block by block (downmix, then a streaming soxr resampler), so only the 24 kHz mono
result is ever held whole; the decoder counts what it really gets, so a header that lies fails too.

Then:

- ``add``: person 1's recording, then person 2's (sequential; each listener track is silent meanwhile),
- ``para``: both at once (the shorter one padded with silence),
- no second file: person 2 stays silent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tts.errors import AudioInputError, TTSInputError
from tts.timeline import Timeline, TurnTiming, min_length_samples

logger = logging.getLogger(__name__)
# The decoders (soundfile, PyAV, soxr, scipy, pyloudnorm) are imported where they are used: the API
# process imports this module for its limits and should not load them until audio arrives.

SAMPLE_RATE = 24_000
TARGET_LUFS = -23.0
# Peak below -80 dBFS counts as silence: nothing for a face to lip-sync to.
SILENCE_PEAK = 1e-4
SUPPORTED_FORMATS = ("wav", "flac", "mp3", "m4a", "ogg")
_SOUNDFILE_FORMATS = ("wav", "flac", "mp3", "ogg")
AUDIO_MODES = ("add", "para")
# Decoded sample values (rate x channels) allowed per second of the length limit: 48 kHz stereo or
# 96 kHz mono. With the default 600 s limit a file may hold 57.6 M values; more is refused unread.
MAX_VALUES_PER_SECOND = 96_000
# Sample values per decoded block (frames x channels): 4 MiB of float32 at a time.
_BLOCK_VALUES = 1 << 20
# BS.1770: 400 ms gating blocks, 75 % overlap, -70 LUFS absolute gate, relative gate 10 LU below.
_GATE_BLOCK_S = 0.4
_GATE_STEP = 0.25
_ABSOLUTE_GATE = -70.0
_RELATIVE_GATE = -10.0
_FILTER_CHUNK = 1 << 16


def value_budget(max_seconds: float) -> int:
    """Decoded sample values (frames x channels) one file may hold under ``max_seconds``."""
    return int(max_seconds * MAX_VALUES_PER_SECOND)


def _too_long(field: str, seconds: float, max_seconds: float) -> AudioInputError:
    return AudioInputError(
        field,
        f"{field} is too long: {seconds:.1f} s; the limit is {max_seconds:g} s ({max_seconds / 60:g} min)",
    )


def _check_header(
    field: str, name: str, rate: int, channels: int, seconds: float | None, max_s: float
) -> None:
    """Refuse from the header alone: unusable rate/channels, too long, or too many values to decode."""
    if rate <= 0 or channels <= 0:
        raise AudioInputError(
            field, f"{field} ({name}) declares {channels} channel(s) at {rate} Hz: not usable"
        )
    if seconds is None:
        return
    if seconds > max_s:
        raise _too_long(field, seconds, max_s)
    values = rate * channels * seconds
    budget = value_budget(max_s)
    if values > budget:
        raise AudioInputError(
            field,
            f"{field} ({name}) holds {channels} channel(s) x {rate} Hz x {seconds:.1f} s = {values / 1e6:.1f} M "
            f"samples; the limit is {budget / 1e6:.1f} M ({max_s:g} s of 48 kHz stereo); "
            "send mono or stereo at 48 kHz or less",
        )


class _MonoSink:
    """Streams ``[C, n]`` float32 blocks at ``rate`` into one 24 kHz mono track.

    Each block is checked (finite), downmixed (channel mean) and resampled with a streaming soxr
    resampler; frames are counted against the length limit and the value budget as they arrive.
    """

    def __init__(self, field: str, name: str, rate: int, channels: int, max_s: float, out_rate: int) -> None:
        import soxr

        self.field, self.name, self.rate, self.channels, self.max_s = field, name, rate, channels, max_s
        self.frames = 0
        self.peak = 0.0
        self.chunks: list[np.ndarray] = []
        self._max_frames = min(max_s * rate, value_budget(max_s) / channels)
        self._stream = None if rate == out_rate else soxr.ResampleStream(rate, out_rate, 1, quality="HQ")

    def add(self, block: np.ndarray) -> None:
        """``block: [C, n]`` float32."""
        if block.shape[1] == 0:
            return
        self.frames += block.shape[1]
        if self.frames > self._max_frames + self.rate:  # one second of slack for codec padding
            seconds = self.frames / self.rate
            if seconds > self.max_s:
                raise _too_long(self.field, seconds, self.max_s)
            _check_header(self.field, self.name, self.rate, self.channels, seconds, self.max_s)
        if not np.isfinite(block).all():
            raise AudioInputError(self.field, f"{self.field} ({self.name}) contains NaN or infinite samples")
        mono = block.mean(axis=0, dtype=np.float32) if block.shape[0] > 1 else block[0]
        self.peak = max(self.peak, float(np.max(np.abs(mono))))
        self._emit(mono, last=False)

    def _emit(self, mono: np.ndarray, *, last: bool) -> None:
        if self._stream is None:
            out = np.array(mono, dtype=np.float32)
        else:
            out = self._stream.resample_chunk(np.ascontiguousarray(mono, dtype=np.float32), last=last)
        if out.size:
            self.chunks.append(np.asarray(out, dtype=np.float32))

    def finish(self) -> np.ndarray:
        """The whole track, ``[N]`` float32 at the output rate."""
        if self._stream is not None and self.frames:
            self._emit(np.zeros(0, dtype=np.float32), last=True)
        out = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.float32)
        self.chunks = []
        return out


def _decode_soundfile(path: Path, field: str, max_seconds: float, out_rate: int) -> _MonoSink:
    """Stream via libsndfile; raises ``RuntimeError``-family errors if it cannot read the file."""
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        rate, channels = int(f.samplerate), int(f.channels)
        _check_header(field, path.name, rate, channels, f.frames / rate if rate > 0 else None, max_seconds)
        sink = _MonoSink(field, path.name, rate, channels, max_seconds, out_rate)
        for block in f.blocks(blocksize=max(1, _BLOCK_VALUES // channels), dtype="float32", always_2d=True):
            sink.add(block.T)
    return sink


def _pyav_blocks(container: Any, stream: Any) -> Iterator[np.ndarray]:
    """``[C, n]`` float32 blocks of one PyAV audio stream."""
    import av

    # Planar float keeps the channels apart; rate and layout stay as decoded (soxr resamples later).
    resampler = av.AudioResampler(format="fltp")
    for frame in container.decode(stream):
        for out in resampler.resample(frame):
            yield out.to_ndarray().reshape(len(out.layout.channels), -1)
    for out in resampler.resample(None):
        yield out.to_ndarray().reshape(len(out.layout.channels), -1)


def _decode_pyav(path: Path, field: str, max_seconds: float, out_rate: int) -> _MonoSink:
    """Stream via FFmpeg (PyAV): m4a/aac and anything libsndfile cannot read."""
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
        rate = int(stream.codec_context.sample_rate or stream.rate or 0)
        channels = int(stream.codec_context.channels or 0)
        _check_header(field, path.name, rate, channels, seconds, max_seconds)
        sink = _MonoSink(field, path.name, rate, channels, max_seconds, out_rate)
        for block in _pyav_blocks(container, stream):
            if block.shape[0] != channels:  # a stream whose layout changes mid-way: count what arrives
                sink.channels = channels = max(channels, block.shape[0])
            sink.add(block.astype(np.float32, copy=False))
    return sink


def _decode(path: Path, field: str, max_seconds: float, out_rate: int) -> _MonoSink:
    ext = path.suffix.lower().lstrip(".")
    errors: list[str] = []
    if ext in _SOUNDFILE_FORMATS:
        try:
            return _decode_soundfile(path, field, max_seconds, out_rate)
        except AudioInputError:
            raise
        except Exception as exc:  # libsndfile reports bad data as RuntimeError/LibsndfileError/TypeError
            errors.append(f"soundfile: {exc}")
    try:
        return _decode_pyav(path, field, max_seconds, out_rate)
    except AudioInputError:
        raise
    except Exception as exc:  # FFmpegError and friends: the file is not decodable audio
        errors.append(f"ffmpeg: {exc}")
    detail = "; ".join(e[:160] for e in errors)
    raise AudioInputError(
        field,
        f"{field} ({path.name}) could not be decoded as {ext} audio; the file may be corrupt ({detail})",
    )


def _k_weighting(rate: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """BS.1770 K-weighting at ``rate`` as pyloudnorm builds it: ``[(b, a, passband_gain)]`` per stage."""
    from pyloudnorm.iirfilter import IIRfilter

    stages = (
        IIRfilter(4.0, 1 / math.sqrt(2), 1500.0, rate, "high_shelf"),
        IIRfilter(0.0, 0.5, 38.0, rate, "high_pass"),
    )
    return [(np.asarray(s.b, dtype=np.float64), np.asarray(s.a, dtype=np.float64), float(s.passband_gain))
            for s in stages]  # fmt: skip


def integrated_loudness(audio: np.ndarray, rate: int) -> float:
    """Integrated gated loudness (LUFS) of mono ``audio: [N]``, measured in chunks.

    The same measurement as ``pyloudnorm.Meter(rate).integrated_loudness`` (K-weighting, 400 ms blocks
    with 75 % overlap, absolute and relative gates), but the filters run chunk by chunk with carried
    state, so the extra memory is a few chunks instead of several float64 copies of the track.
    Returns ``-inf`` when every block is below the gates.
    """
    from scipy.signal import lfilter

    n = audio.shape[0]
    block = _GATE_BLOCK_S * rate
    count = int(np.round((n / rate - _GATE_BLOCK_S) / (_GATE_BLOCK_S * _GATE_STEP))) + 1
    js = np.arange(count)
    lower = (block * (js * _GATE_STEP)).astype(np.int64)
    upper = np.minimum((block * (js * _GATE_STEP + 1)).astype(np.int64), n)
    marks = np.unique(np.concatenate([lower, upper]))  # sorted sample indices where a prefix sum is needed
    prefix = np.zeros(marks.size, dtype=np.float64)  # sum of squares of filtered audio[:mark]
    stages = _k_weighting(rate)
    states = [np.zeros(max(a.size, b.size) - 1) for b, a, _ in stages]
    total = 0.0
    m = 0
    while m < marks.size and marks[m] == 0:
        m += 1
    for start in range(0, n, _FILTER_CHUNK):
        x = audio[start : start + _FILTER_CHUNK].astype(np.float64)
        for k, (b, a, gain) in enumerate(stages):
            x, states[k] = lfilter(b, a, x, zi=states[k])
            x *= gain
        csum = np.cumsum(np.square(x))
        end = start + x.size
        while m < marks.size and marks[m] <= end:
            prefix[m] = total + csum[marks[m] - start - 1]
            m += 1
        total += float(csum[-1])
    at = {int(v): i for i, v in enumerate(marks)}
    z = (prefix[[at[int(u)] for u in upper]] - prefix[[at[int(v)] for v in lower]]) / block
    with np.errstate(divide="ignore"):
        levels = -0.691 + 10.0 * np.log10(z)
    above = levels >= _ABSOLUTE_GATE
    if not above.any():
        return -math.inf
    relative = -0.691 + 10.0 * math.log10(float(np.mean(z[above]))) + _RELATIVE_GATE
    gated = (levels > relative) & (levels > _ABSOLUTE_GATE)
    if not gated.any():
        return -math.inf
    return -0.691 + 10.0 * math.log10(float(np.mean(z[gated])))


def loudness_normalize(audio: np.ndarray, rate: int, target_lufs: float = TARGET_LUFS) -> np.ndarray:
    """Scale ``audio: [N]`` float32 to ``target_lufs`` integrated loudness, in place; returns it unchanged
    when it cannot be measured (shorter than one 400 ms block, or fully below the -70 LUFS gate)."""
    if audio.size < math.ceil(_GATE_BLOCK_S * rate) + 1:
        return audio
    loudness = integrated_loudness(audio, rate)
    if not math.isfinite(loudness) or loudness < _ABSOLUTE_GATE:
        return audio
    audio *= np.float32(10.0 ** ((target_lufs - loudness) / 20.0))
    return audio


def load_audio(
    path: Path | str, field: str = "audio1", *, max_seconds: float = 600.0, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Decode, downmix, resample and loudness-normalise one recording, streaming.

    Returns ``audio: [N]`` float32 at ``sample_rate``. Raises ``AudioInputError`` (``.field == field``)
    for a missing, empty, unsupported, corrupt, silent or too-long file, or one whose rate x channels x
    length is over the decode budget (``value_budget(max_seconds)``).
    """
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
    sink = _decode(path, field, max_seconds, sample_rate)
    if sink.frames == 0:
        raise AudioInputError(field, f"{field} ({path.name}) contains no audio samples")
    seconds = sink.frames / sink.rate
    if seconds > max_seconds:
        raise _too_long(field, seconds, max_seconds)
    if sink.peak <= SILENCE_PEAK:
        raise AudioInputError(field, f"{field} ({path.name}) is silent: there is no speech to animate")
    out = loudness_normalize(sink.finish(), sample_rate)
    logger.info("%s: %s, %.2f s at %d Hz, %d channel(s)", field, path.name, seconds, sink.rate, sink.channels)
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
