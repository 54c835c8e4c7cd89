"""A render interrupted after a finished clip resumes there (same job folder) instead of starting over.

Real components throughout: the tiny weights (DiT, T5, CLIP, VAE, wav2vec2, Kokoro) through the one
clip driver (``DialogueWorker`` in the engine, one process, via ``Runtime.render``), stopped at the
engine's step boundary by a sink that asks to cancel. The reference is the same job rendered without
interruption.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.checkpoint.loader import load_model
from inference.checkpoint.weights import WeightPaths
from inference.parallel.context import ParallelContext
from inference.render.intake import Limits, build_job
from inference.render.pipeline import FRAMES_FILE, FRAMES_SPILL_DIR, RenderConfig, Renderer
from inference.render.settings import GenerationSettings
from inference.render.spec import JobInput, JobSpec
from inference.render.worker import RenderFailed, RenderJob, Runtime, RuntimeOptions

pytestmark = pytest.mark.slow

# Three turns: several seconds of speech, at least two clips of 81 frames (25 carried over).
SCRIPT = "(s1) Hello there, how are you today?\n(s2) I am fine, thank you so much.\n(s1) Great, let us go for a walk."


@pytest.fixture(scope="module")
def runtime(tiny_weights: Path) -> Runtime:
    paths = WeightPaths.under(tiny_weights)
    renderer = Renderer(paths, RenderConfig(render_divisor=8, save_frames=True))
    model = load_model(paths.wan_dir, device="cpu", dtype=torch.float32)
    options = RuntimeOptions(preset="tiny", weights=tiny_weights)
    return Runtime(options, ParallelContext.single("cpu"), model, paths, renderer)


@pytest.fixture(scope="module")
def accepted(portrait_pngs, tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSpec, Path]:
    """The job as the service accepts it: its JobSpec and its inputs folder."""
    left, right = (Path(p).read_bytes() for p in portrait_pngs)
    submission = build_job(JobInput(left_image=left, right_image=right, script=SCRIPT), Limits())
    inputs = tmp_path_factory.mktemp("inputs")
    for name, data in submission.files.items():
        (inputs / name).write_bytes(data)
    return submission.spec, inputs


def _job(accepted: tuple[JobSpec, Path], out: Path, **settings) -> RenderJob:
    spec, inputs = accepted
    values = {"steps": 2, "seed": 7, **settings}
    return RenderJob("resume", spec, GenerationSettings.from_dict(values), inputs, out)


class _StopInClip:
    """A sink that asks to cancel once ``clip`` (0-based) has run its first step: earlier clips finish.
    The worker asks after every step; the engine stops every rank at the next step boundary."""

    def __init__(self, steps: int, clip: int) -> None:
        self.calls, self.limit = 0, steps * clip + 1

    def cancel_requested(self, job_id: str) -> bool:
        self.calls += 1
        return self.calls >= self.limit

    def progress(self, job_id: str, percent: float, stage: str) -> None:
        pass

    def timing(self, job_id: str, name: str, seconds: float) -> None:
        pass

    def state(self, job_id: str, state: str) -> None:
        pass

    def done(self, job_id: str, outputs: list[str]) -> None:
        pass

    def failed(self, job_id: str, reason: str, *, cancelled: bool = False, interrupted: bool = False) -> None:
        pass


def _interrupt(runtime: Runtime, job: RenderJob) -> None:
    with pytest.raises(RenderFailed) as info:
        runtime.render(job, _StopInClip(steps=2, clip=1))
    assert info.value.cancelled and "cancel" in str(info.value)


def test_interrupted_render_resumes_after_the_last_finished_clip(runtime, accepted, tmp_path):
    whole = tmp_path / "whole"
    runtime.render(_job(accepted, whole))
    reference = np.load(whole / FRAMES_FILE)

    job = tmp_path / "job"
    _interrupt(runtime, _job(accepted, job))
    assert sorted(p.name for p in (job / FRAMES_SPILL_DIR).glob("clip_*.npy")) == ["clip_0000.npy"]

    spec, inputs = accepted
    prep = runtime.renderer.prepare(spec, _job(accepted, job).settings, inputs, job)
    assert prep.start_clip == 1 and prep.num_clips >= 2
    runtime.render(_job(accepted, job))
    resumed = np.load(job / FRAMES_FILE)
    assert not (job / FRAMES_SPILL_DIR).exists()  # spill folder removed after the mux

    assert resumed.shape == reference.shape
    first = prep.plan.clips[0].kept_frames
    assert np.array_equal(resumed[:first], reference[:first])  # the finished clip is reused as is
    # Later clips start from 8-bit motion frames instead of float ones: close, not bit-identical.
    later = np.abs(resumed[first:].astype(int) - reference[first:].astype(int))
    assert later.mean() < 2.0, later.mean()


def test_other_settings_start_over(runtime, accepted, tmp_path):
    job = tmp_path / "job"
    _interrupt(runtime, _job(accepted, job))
    changed = _job(accepted, job, steps=3)
    assert runtime.renderer.prepare(changed.spec, changed.settings, changed.inputs, job).start_clip == 0
    # ...and the earlier attempt's clips are gone, so they can never be mixed in later.
    assert not list((job / FRAMES_SPILL_DIR).glob("clip_*.npy"))


def test_a_fresh_random_seed_never_reuses_clips_of_another_draw(runtime, accepted, tmp_path):
    """The service and the CLI store a drawn seed when they accept a job (tests/test_api.py); a negative
    seed reaching the renderer is drawn anew per attempt, so the earlier attempt's clips must not be
    mixed in."""
    job = tmp_path / "job"
    _interrupt(runtime, _job(accepted, job, seed=-1))
    again = runtime.renderer.prepare(accepted[0], _job(accepted, job, seed=-1).settings, accepted[1], job)
    assert again.settings.seed >= 0 and again.start_clip == 0
