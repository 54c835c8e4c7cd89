"""The generate CLI end to end with the tiny weights: one process, bad jobs, and torchrun (2 ranks, Ulysses)
against one process on the frames before encoding."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile

from inference.render.video_io import probe_media, read_audio, read_frames
from tests.subprocess_env import offline_env

REPO = Path(__file__).resolve().parents[1]
FPS = 25
# About 6.9 s with the tiny Kokoro: 171 frames, three 81-frame clips (the second and third continue
# from motion frames).
SCRIPT = (
    "(s1) Hello there, how are you today?\n"
    "(s2) I am fine, thank you. And you?\n"
    "(s1) Very well, thanks for asking.\n"
    "(s2) Good to hear it."
)
STEPS = ["--sample_steps", "2"]
CLI_TIMEOUT_S = 300


def cli_env() -> dict[str, str]:
    return offline_env(PYTHONPATH=str(REPO))


def run_cli(args: list[str], *, ranks: int = 1, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m inference.generate ARGS`` (``ranks`` > 1: under torchrun) in ``cwd``, killed at a hard
    deadline."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "inference.generate", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "inference.generate", *args]  # fmt: skip
    cmd = ["timeout", "-k", "10", str(CLI_TIMEOUT_S), *cmd]
    return subprocess.run(
        cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=CLI_TIMEOUT_S + 30
    )


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@dataclass(frozen=True)
class Render:
    out: Path  # the mp4; side files are OUT.<name> beside it
    frames: Path  # --save_frames

    def side(self, name: str) -> Path:
        return self.out.parent / f"{self.out.stem}.{name}"


def render(job: Path, out_dir: Path, *extra: str, ranks: int = 1) -> Render:
    out_dir.mkdir(parents=True, exist_ok=True)
    result = Render(out_dir / "OUT.mp4", out_dir / "frames.npy")
    args = ["--preset", "tiny", "--weights", str(job.parent.parent / "weights"), "--input", str(job),
            "--out", str(result.out), "--save_frames", str(result.frames), *STEPS, *extra]  # fmt: skip
    proc = run_cli(args, ranks=ranks)
    assert proc.returncode == 0, explain(proc)
    assert result.out.is_file() and result.frames.is_file(), explain(proc)
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path, portrait_pngs) -> Path:
    """``weights`` (link to the session's tiny weights) and ``jobs/job.json`` with relative image paths."""
    root = tmp_path_factory.mktemp("generate")
    (root / "weights").symlink_to(tiny_weights, target_is_directory=True)
    jobs = root / "jobs"
    jobs.mkdir()
    for src, name in zip(portrait_pngs, ("left.png", "right.png"), strict=True):
        (jobs / name).symlink_to(src)
    job = {
        "left_image": "left.png",
        "right_image": "right.png",
        "script": SCRIPT,
        "voices": ["af_heart", "am_adam"],
        "prompt": "Two friends talking.",
    }
    (jobs / "job.json").write_text(json.dumps(job))
    return root


@pytest.fixture(scope="module")
def one_process(workdir: Path) -> Render:
    return render(workdir / "jobs" / "job.json", workdir / "one")


def max_level_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest per-channel difference in 8-bit levels between two uint8 videos of the same shape."""
    assert a.dtype == b.dtype == np.uint8
    assert a.shape == b.shape, f"{a.shape} vs {b.shape}"
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# ------------------------------------------------------------------------------------ one process


@pytest.mark.slow
def test_cli_renders_streams_of_matching_length(one_process: Render) -> None:
    info = probe_media(one_process.out)
    assert (info.video_codec, info.pix_fmt, info.audio_codec) == ("h264", "yuv420p", "aac")
    assert (info.width, info.height) == (112, 64)  # the tiny preset renders at an eighth of 896x448
    assert info.fps == FPS

    mix, rate = read_audio(one_process.side("mix.wav"))
    timeline = json.loads(one_process.side("timeline.json").read_text())
    seconds = mix.size / rate
    assert rate == timeline["sample_rate"] and abs(seconds - timeline["duration"]) < 1e-3
    assert seconds > 5.0  # the script is long enough for three clips
    assert abs(info.frames - int(seconds * FPS)) <= 1
    assert abs(info.video_duration - info.audio_duration) <= 1 / FPS
    assert abs(info.video_duration - info.frames / FPS) <= 1 / FPS

    meta = json.loads(one_process.side("render.json").read_text())
    assert meta["frames"] == info.frames and meta["clips"] == 3 and meta["settings"]["steps"] == 2
    for name in ("reference.png", "overlay.png", "subtitles.srt", "subtitles.vtt"):
        assert one_process.side(name).is_file(), name
    assert not list(one_process.out.parent.glob(".render-*")), "the work folder was left behind"


@pytest.mark.slow
def test_cli_saved_frames_are_what_was_encoded(one_process: Render) -> None:
    frames = np.load(one_process.frames)
    decoded = read_frames(one_process.out)
    assert frames.dtype == np.uint8 and frames.shape == decoded.shape == (decoded.shape[0], 64, 112, 3)
    # The tiny random VAE paints pixel-level noise, which yuv420p's halved chroma cannot carry, so
    # compare luma (H.264 keeps it at full resolution) and the overall correlation.
    f, d = frames.astype(np.float32), decoded.astype(np.float32)
    luma = np.array([0.2126, 0.7152, 0.0722], np.float32)
    err = np.abs(f @ luma - d @ luma).mean()
    assert err < 8.0, err
    assert np.corrcoef(f.ravel(), d.ravel())[0, 1] > 0.9
    assert frames.std() > 5.0  # not a blank video
    # frame order is kept: against the next frame the same measures fail
    assert np.abs(f[1:] @ luma - d[:-1] @ luma).mean() > 3 * err
    assert np.corrcoef(f[1:].ravel(), d[:-1].ravel())[0, 1] < 0.5


def _envelope(x: np.ndarray, rate: int, window_s: float = 0.02) -> np.ndarray:
    n = int(rate * window_s)
    x = x[: x.size // n * n].reshape(-1, n)
    return np.sqrt((x.astype(np.float64) ** 2).mean(axis=1))


@pytest.mark.slow
def test_cli_audio_stream_is_the_mix(one_process: Render) -> None:
    mix, mix_rate = read_audio(one_process.side("mix.wav"))
    audio, rate = read_audio(one_process.out)
    assert rate == mix_rate == 24000
    n = min(mix.size, audio.size)
    assert abs(mix.size - audio.size) <= rate / FPS  # the track is cut to the video length
    # Sample-level: the best alignment within +-2048 samples (AAC priming) correlates strongly.
    best = _best_lag_correlation(mix[:n], audio[:n], 2048)
    assert best > 0.9, best
    env_a, env_b = _envelope(mix[:n], rate), _envelope(audio[:n], rate)
    assert np.corrcoef(env_a, env_b)[0, 1] > 0.9
    # negative control: the same track half a second late does not match
    assert _best_lag_correlation(mix[:n], np.roll(audio[:n], rate // 2), 2048) < 0.5


def _best_lag_correlation(a: np.ndarray, b: np.ndarray, max_lag: int) -> float:
    """Highest Pearson correlation of ``a`` and ``b`` shifted by -max_lag..max_lag samples (via FFT)."""
    a = (a - a.mean()) / (a.std() + 1e-12)
    b = (b - b.mean()) / (b.std() + 1e-12)
    size = 1 << int(np.ceil(np.log2(a.size + b.size)))
    xc = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    lags = np.concatenate([xc[: max_lag + 1], xc[-max_lag:]])
    return float(lags.max() / a.size)


def _srt_cues(text: str) -> list[tuple[float, float, str]]:
    stamp = r"(\d\d):(\d\d):(\d\d),(\d\d\d)"
    cues = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        m = re.fullmatch(f"{stamp} --> {stamp}", lines[1])
        assert m, lines
        g = [int(v) for v in m.groups()]
        start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
        end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
        cues.append((start, end, "\n".join(lines[2:])))
    return cues


@pytest.mark.slow
def test_cli_subtitles_follow_the_timeline(one_process: Render) -> None:
    timeline = json.loads(one_process.side("timeline.json").read_text())
    turns = timeline["turns"]
    cues = _srt_cues(one_process.side("subtitles.srt").read_text(encoding="utf-8"))
    assert len(cues) == len(turns) == 4
    for (start, end, text), turn in zip(cues, turns, strict=True):
        assert abs(start - turn["start"]) <= 0.001 and abs(end - turn["end"]) <= 0.001
        assert text == f"{turn['speaker_name']}: {turn['text']}"
    assert [t["speaker"] for t in turns] == [0, 1, 0, 1]
    assert turns[-1]["end"] <= timeline["duration"]
    vtt = one_process.side("subtitles.vtt").read_text(encoding="utf-8")
    assert vtt.startswith("WEBVTT") and vtt.count(" --> ") == 4


# --------------------------------------------------------------------------------------- bad jobs


BAD_JOBS = {
    "missing_image": (
        {"left_image": "left.png", "right_image": "nobody.png", "script": SCRIPT},
        ["right_image", "nobody.png"],
    ),
    "invalid_script": (
        {"left_image": "left.png", "right_image": "right.png", "script": "(s1) Hi.\n(s2) Hello.\n(s3) Who?"},
        ["script", "line 3", "(s3)"],
    ),
    "unknown_voice": (
        {
            "left_image": "left.png",
            "right_image": "right.png",
            "script": SCRIPT,
            "voices": ["af_heart", "zz_x"],
        },
        ["voices[1]", "unknown voice 'zz_x'"],
    ),
    "corrupt_json": ('{"left_image": "left.png", "script": ', ["job file", "job.json"]),
    # A catalog voice the tiny weights do not have: refused at once, not after every weight has loaded.
    "voice_not_installed": (
        {
            "left_image": "left.png",
            "right_image": "right.png",
            "script": SCRIPT,
            "voices": ["af_heart", "bf_emma"],
        },
        ["voices[1]", "not installed", "am_adam"],
    ),
    "silent_person2": (
        {"cond_image": "left.png", "cond_audio": {"person1": "left.png", "person2": "None"}},
        ["cond_audio.person2", "silent", "leave person2 out"],
    ),
    "two_person_script_on_one_image": ({"image": "left.png", "script": SCRIPT}, ["script", "one-person job"]),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_cli_bad_job_exits_2_with_one_line(workdir: Path, tmp_path: Path, case: str) -> None:
    job, fragments = BAD_JOBS[case]
    folder = tmp_path / case
    folder.mkdir()
    for name in ("left.png", "right.png"):
        (folder / name).symlink_to(workdir / "jobs" / name)
    (folder / "job.json").write_text(job if isinstance(job, str) else json.dumps(job))
    out = tmp_path / "out" / "OUT.mp4"
    proc = run_cli(["--preset", "tiny", "--weights", str(workdir / "weights"), "--input",
                    str(folder / "job.json"), "--out", str(out), *STEPS])  # fmt: skip
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, explain(proc)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not out.exists() and not (tmp_path / "out").exists()
    assert "DiT loaded" not in proc.stderr, explain(proc)  # refused before any weight loaded


# ----------------------------------------------------------------------------------- torchrun (P=2)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_render_the_same_frames(workdir: Path, one_process: Render) -> None:
    two = render(workdir / "jobs" / "job.json", workdir / "two", ranks=2)
    a, b = np.load(one_process.frames), np.load(two.frames)
    assert max_level_diff(a, b) <= 1
    assert probe_media(two.out).frames == a.shape[0]
    assert two.side("subtitles.srt").read_text() == one_process.side("subtitles.srt").read_text()


@pytest.mark.slow
def test_frame_comparison_fails_for_another_seed(workdir: Path, one_process: Render) -> None:
    """Negative control for the parity test: the same job with another seed is not within one level."""
    other = render(workdir / "jobs" / "job.json", workdir / "seed43", "--seed", "43")
    a, b = np.load(one_process.frames), np.load(other.frames)
    assert max_level_diff(a, b) > 1
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() > 0.5
    # The seed changes only the noise: the first frame of each clip comes from the same reference image,
    # so the videos still share their size and length.
    assert a.shape == b.shape


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_bad_job_stops_every_rank(workdir: Path, tmp_path: Path) -> None:
    """A bad job is refused on rank 0 before any rank loads a weight; torchrun then stops rank 1 (it
    never waits for a first message)."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"left_image": str(workdir / "jobs" / "left.png"), "right_image": "x.png",
                               "script": SCRIPT}))  # fmt: skip
    proc = run_cli(["--preset", "tiny", "--weights", str(workdir / "weights"), "--input", str(job),
                    "--out", str(tmp_path / "o.mp4")], ranks=2)  # fmt: skip
    assert proc.returncode not in (0, 124, 137), explain(proc)  # torchrun reports rank 0's exit 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: right_image")]
    assert len(errors) == 1, explain(proc)
    assert "exitcode  : 2" in proc.stderr, explain(proc)
    assert "DiT loaded" not in proc.stderr, explain(proc)  # no rank loaded the model


# ------------------------------------------------------------------------- upstream's example jobs


def _upstream_folder(root: Path, portrait: Path) -> Path:
    """Upstream's repository layout with our own files: ``examples/single/single1.png``, ``.../1.wav``
    and the two single-person jobs as upstream writes them (paths relative to the repository root)."""
    single = root / "examples" / "single"
    single.mkdir(parents=True)
    (single / "single1.png").symlink_to(portrait)
    t = np.arange(int(1.2 * 16000)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 200 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    soundfile.write(single / "1.wav", wave.astype(np.float32), 16000)
    prompt = "A woman is passionately singing into a professional microphone in a recording studio."
    jobs = {
        "single_example_1.json": {"prompt": prompt, "cond_image": "examples/single/single1.png",
                                   "cond_audio": {"person1": "examples/single/1.wav"}},
        "single_example_tts_1.json": {"prompt": prompt, "cond_image": "examples/single/single1.png",
                                       "tts_audio": {"text": "Welcome to multi-talk, a video model.",
                                                     "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt"},
                                       "cond_audio": {}},
    }  # fmt: skip
    for name, job in jobs.items():
        (root / "examples" / name).write_text(json.dumps(job, indent=4))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("example", ["single_example_1.json", "single_example_tts_1.json"])
def test_upstream_single_person_examples_render_one_full_frame_speaker(
    workdir: Path, tmp_path: Path, portrait_pngs, example: str
) -> None:
    """Run from upstream's folder as upstream does (``examples/...`` relative to the working directory):
    one person, the whole frame the speaker's, one audio track into the model."""
    root = _upstream_folder(tmp_path / "MultiTalk", Path(portrait_pngs[0]))
    out = tmp_path / "out" / "OUT.mp4"
    args = ["--preset", "tiny", "--weights", str(workdir / "weights"), "--input", f"examples/{example}",
            "--out", str(out), "--mode", "clip", *STEPS]  # fmt: skip
    proc = run_cli(args, cwd=root)
    assert proc.returncode == 0, explain(proc)
    meta = json.loads((out.parent / "OUT.render.json").read_text())
    h, w = meta["scene"]["bucket"]
    assert meta["people"] == 1 and meta["scene"]["layout"] == "single"
    assert meta["scene"]["boxes"] == [[0, 0, h, w]] and h > w  # one full-frame box; a portrait bucket
    info = probe_media(out)
    assert info.frames > 0 and (info.width, info.height) == tuple(meta["size"])
    # Negative control: from the examples folder the same relative paths name nothing (upstream's
    # paths are not relative to the job file), and the job is refused before any weight loads.
    wrong = run_cli([*args[:5], example, *args[6:]], cwd=root / "examples")
    assert wrong.returncode == 2 and "file not found: examples/single/" in wrong.stderr, explain(wrong)
    assert "DiT loaded" not in wrong.stderr
