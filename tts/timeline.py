"""Dialogue -> two per-speaker audio tracks, turn timings and subtitles.

MultiTalk drives each person's face from that person's own audio track, so a dialogue becomes two
tracks of equal length: while one person speaks, the other's track is silent (as upstream's
``process_tts_multi``). Unlike upstream, turns do not abut: ``gap_s`` plus each turn's
``pause_after`` separates them, and the total is padded so that the video reaches at least
``min_frames`` frames (one 81-frame clip) with ``margin_s`` of audio to spare.

Layout, in samples at the synthesiser's rate ``sr``::

    turn 0 audio | gap_s + pause_after[0] | turn 1 audio | gap_s + pause_after[1] | ... | turn K-1 audio
    | pause_after[K-1] + margin_s | (more silence up to (min_frames / fps + margin_s) seconds if short)
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import soundfile as sf

from common.files import atomic_write, atomic_write_text
from tts.errors import TTSInputError, UnknownVoiceError

if TYPE_CHECKING:
    from dialogue import Dialogue
    from tts.engine import Synthesizer

logger = logging.getLogger(__name__)

# The mix is scaled down when its peak would exceed this (float WAV keeps the tracks exact).
PEAK_LIMIT = 0.99
OUTPUT_FILES = ("speaker1.wav", "speaker2.wav", "mix.wav", "subtitles.srt", "subtitles.vtt", "timeline.json")
TIMELINE_JSON_VERSION = 1


@dataclass(frozen=True)
class TurnTiming:
    """Where one turn sits in the timeline (seconds from the start)."""

    index: int
    speaker: int
    speaker_name: str
    start: float
    end: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "speaker": self.speaker,
            "speaker_name": self.speaker_name,
            "start": round(self.start, 6),
            "end": round(self.end, 6),
            "text": self.text,
        }


@dataclass
class Timeline:
    """Two aligned speech tracks plus turn timings.

    sample_rate: Hz of ``tracks`` (24 kHz for Kokoro and for normalised user audio).
    tracks: ``[2, N]`` float32; row 0 is speaker 1 (left person), row 1 speaker 2.
    turns: one ``TurnTiming`` per spoken turn, in order.
    speaker_names: display names used in subtitles.
    """

    sample_rate: int
    tracks: np.ndarray
    turns: list[TurnTiming] = field(default_factory=list)
    speaker_names: tuple[str, str] = ("Speaker 1", "Speaker 2")

    def __post_init__(self) -> None:
        tracks = np.asarray(self.tracks, dtype=np.float32)
        if tracks.ndim != 2 or tracks.shape[0] != 2:
            raise ValueError(f"tracks must be [2, N], got shape {tracks.shape}")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
        self.tracks = np.ascontiguousarray(tracks)
        self.speaker_names = (str(self.speaker_names[0]), str(self.speaker_names[1]))

    @property
    def num_samples(self) -> int:
        return int(self.tracks.shape[1])

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.num_samples / self.sample_rate

    def num_frames(self, fps: float = 25) -> int:
        """Whole video frames the audio covers at ``fps``."""
        return int(self.num_samples * fps // self.sample_rate)

    @property
    def mix(self) -> np.ndarray:
        """``[N]`` float32: both tracks summed, scaled down as a whole if the peak would pass 0.99."""
        mix = self.tracks.sum(axis=0, dtype=np.float32)
        peak = float(np.max(np.abs(mix))) if mix.size else 0.0
        if peak > PEAK_LIMIT:
            mix *= PEAK_LIMIT / peak
        return mix

    def resampled(self, rate: int) -> np.ndarray:
        """``[2, M]`` float32 tracks at ``rate`` Hz (soxr, high quality), e.g. 16 kHz for wav2vec2."""
        import soxr

        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        if rate == self.sample_rate:
            return self.tracks.copy()
        out = soxr.resample(self.tracks.T, self.sample_rate, rate, quality="HQ")
        return np.ascontiguousarray(np.asarray(out, dtype=np.float32).T)

    # ------------------------------------------------------------- subtitles
    def _cues(self) -> list[TurnTiming]:
        return [t for t in self.turns if t.text.strip()]

    def to_srt(self) -> str:
        """SubRip subtitles, one cue per turn: ``Name: text``. Turns without text (user audio) are skipped."""
        blocks = []
        for n, t in enumerate(self._cues(), start=1):
            text = _one_line(t.text)
            blocks.append(f"{n}\n{_srt_time(t.start)} --> {_srt_time(t.end)}\n{t.speaker_name}: {text}\n")
        return "\n".join(blocks)

    def to_vtt(self) -> str:
        """WebVTT subtitles, one cue per turn with a voice span: ``<v Name>text``."""
        blocks = ["WEBVTT\n"]
        for n, t in enumerate(self._cues(), start=1):
            name = _vtt_escape(t.speaker_name).replace(">", "")
            text = _vtt_escape(_one_line(t.text))
            blocks.append(f"{n}\n{_vtt_time(t.start)} --> {_vtt_time(t.end)}\n<v {name}>{text}\n")
        return "\n".join(blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": TIMELINE_JSON_VERSION,
            "sample_rate": self.sample_rate,
            "num_samples": self.num_samples,
            "duration": round(self.duration, 6),
            "speaker_names": list(self.speaker_names),
            "turns": [t.to_dict() for t in self.turns],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    def write(self, out_dir: Path | str) -> dict[str, Path]:
        """Write ``speaker1.wav``, ``speaker2.wav``, ``mix.wav`` (32-bit float WAV at ``sample_rate``),
        ``subtitles.srt``, ``subtitles.vtt`` and ``timeline.json`` into ``out_dir``.

        Each file is written to a temporary name in ``out_dir`` and renamed, so a reader never sees
        a half-written file. Returns ``{file name: path}``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        for name, audio in (
            ("speaker1.wav", self.tracks[0]),
            ("speaker2.wav", self.tracks[1]),
            ("mix.wav", self.mix),
        ):
            written[name] = atomic_write(out / name, lambda f, a=audio: _write_wav(f, a, self.sample_rate))
        for name, text in (
            ("subtitles.srt", self.to_srt()),
            ("subtitles.vtt", self.to_vtt()),
            ("timeline.json", self.to_json()),
        ):
            written[name] = atomic_write_text(out / name, text)
        return written


def _write_wav(f: BinaryIO, audio: np.ndarray, rate: int) -> None:
    sf.write(f, audio, rate, format="WAV", subtype="FLOAT")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _split_ms(seconds: float) -> tuple[int, int, int, int]:
    ms = max(0, round(seconds * 1000))
    return ms // 3_600_000, ms // 60_000 % 60, ms // 1000 % 60, ms % 1000


def _srt_time(seconds: float) -> str:
    h, m, s, ms = _split_ms(seconds)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def _vtt_time(seconds: float) -> str:
    h, m, s, ms = _split_ms(seconds)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def min_length_samples(sample_rate: int, fps: float, min_frames: int, margin_s: float) -> int:
    """Samples needed for ``min_frames`` video frames at ``fps`` plus ``margin_s`` seconds."""
    return math.ceil((min_frames / fps + margin_s) * sample_rate)


def turn_seed(seed: int, index: int) -> int:
    """Seed for turn ``index``: distinct per turn, reproducible for the same dialogue seed."""
    return (int(seed) * 1_000_003 + index) % (2**63)


def _check_number(name: str, value: Any, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TTSInputError(name, f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise TTSInputError(name, f"{name} must be between {low} and {high}, got {value}")
    return float(value)


def build_timeline(
    dialogue: Dialogue,
    voices: tuple[str, str],
    synth: Synthesizer,
    *,
    gap_s: float = 0.25,
    seed: int = 0,
    fps: float = 25,
    min_frames: int = 81,
    margin_s: float = 0.2,
    speed: float = 1.0,
) -> Timeline:
    """Speak every turn of ``dialogue`` with its speaker's voice and lay the turns out in time.

    voices: ``(voice of speaker 0, voice of speaker 1)``.
    synth: ``KokoroEngine`` or anything with ``sample_rate`` and ``synthesize(...)``.
    Turn ``i`` is synthesised with seed ``turn_seed(seed, i)``: the same seed gives the same tracks.
    Returns a ``Timeline`` with ``tracks: [2, N]`` at ``synth.sample_rate``.
    """
    if (
        not isinstance(voices, tuple | list)
        or len(voices) != 2
        or not all(isinstance(v, str) for v in voices)
    ):
        raise TTSInputError("voices", f"expected two voice ids (speaker 1, speaker 2), got {voices!r}")
    gap_s = _check_number("gap_s", gap_s, low=0.0, high=10.0)
    margin_s = _check_number("margin_s", margin_s, low=0.0, high=10.0)
    fps = _check_number("fps", fps, low=1.0, high=240.0)
    if isinstance(min_frames, bool) or not isinstance(min_frames, int) or min_frames < 1:
        raise TTSInputError("min_frames", f"min_frames must be a positive integer, got {min_frames!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TTSInputError("seed", f"seed must be an integer, got {seed!r}")
    turns = list(dialogue.turns)
    if not turns:
        raise TTSInputError("script", "the dialogue has no turns to speak")
    sr = int(synth.sample_rate)
    names = (dialogue.speakers[0].name, dialogue.speakers[1].name)

    placed: list[tuple[int, int, np.ndarray]] = []  # (speaker, start sample, audio [n])
    timings: list[TurnTiming] = []
    cursor = 0
    for i, turn in enumerate(turns):
        speaker = int(turn.speaker)
        if speaker not in (0, 1):
            raise TTSInputError("script", f"line {turn.line}: speaker index must be 0 or 1, got {speaker}")
        pause = _check_number("pause_after", turn.pause_after, low=0.0, high=60.0)
        text = turn.speech_text if turn.speech_text.strip() else turn.text
        try:
            audio = synth.synthesize(text, voices[speaker], turn.language, turn_seed(seed, i), speed)
        except UnknownVoiceError as exc:
            raise UnknownVoiceError(f"voice{speaker + 1}", str(exc)) from None
        except TTSInputError as exc:
            if exc.field in ("text", "language"):
                raise TTSInputError("script", f"line {turn.line}: {exc}") from None
            raise
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.size == 0:
            raise TTSInputError("script", f"line {turn.line}: the turn produced no audio")
        start, end = cursor, cursor + audio.size
        placed.append((speaker, start, audio))
        timings.append(TurnTiming(i, speaker, names[speaker], start / sr, end / sr, turn.text))
        is_last = i == len(turns) - 1
        cursor = end + round(((0.0 if is_last else gap_s) + pause) * sr)
        logger.debug("turn %d (speaker %d): %.2f s .. %.2f s", i, speaker, start / sr, end / sr)

    total = max(cursor + round(margin_s * sr), min_length_samples(sr, fps, min_frames, margin_s))
    tracks = np.zeros((2, total), dtype=np.float32)
    for speaker, start, audio in placed:
        tracks[speaker, start : start + audio.size] = audio
    timeline = Timeline(sample_rate=sr, tracks=tracks, turns=timings, speaker_names=names)
    logger.info("timeline: %d turns, %.2f s, %d frames at %g fps", len(turns), timeline.duration,
                timeline.num_frames(fps), fps)  # fmt: skip
    return timeline
