"""A render interrupted after a finished clip resumes there (same job folder) instead of starting over.

Real components throughout: the tiny weights (DiT, T5, CLIP, VAE, wav2vec2, Kokoro) through
``Renderer`` and ``generate``. The reference is the same job rendered without interruption.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.checkpoint.weights import WeightPaths
from inference.render.pipeline import (
    FRAMES_FILE,
    FRAMES_SPILL_DIR,
    JobRequest,
    RenderConfig,
    Renderer,
    generate,
)
from inference.render.sampler import Cancelled
from inference.render.settings import GenerationSettings

pytestmark = pytest.mark.slow

# Three turns: several seconds of speech, at least two clips of 81 frames (25 carried over).
SCRIPT = "(s1) Hello there, how are you today?\n(s2) I am fine, thank you so much.\n(s1) Great, let us go for a walk."


@pytest.fixture(scope="module")
def renderer_and_model(tiny_weights: Path):
    from inference.checkpoint.loader import load_model

    paths = WeightPaths.under(tiny_weights)
    renderer = Renderer(paths, RenderConfig(render_divisor=8, save_frames=True))
    model = load_model(paths.wan_dir, device="cpu", dtype=torch.float32)
    return renderer, model


def _request(portraits: tuple[Path, Path], **settings) -> JobRequest:
    values = {"steps": 2, "seed": 7, **settings}
    return JobRequest(
        settings=GenerationSettings.from_dict(values),
        script=SCRIPT,
        left_image=portraits[0],
        right_image=portraits[1],
    )


class _StopInClip:
    """should_stop() that cancels once ``clip`` (0-based) has started: earlier clips finish."""

    def __init__(self, steps: int, clip: int) -> None:
        self.calls, self.limit = 0, steps * clip + 1

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.limit


def test_interrupted_render_resumes_after_the_last_finished_clip(renderer_and_model, portrait_pngs, tmp_path):
    renderer, model = renderer_and_model
    req = _request(portrait_pngs)

    whole = tmp_path / "whole"
    generate(req, whole, model, renderer)
    reference = np.load(whole / FRAMES_FILE)

    job = tmp_path / "job"
    with pytest.raises(Cancelled):
        generate(req, job, model, renderer, should_stop=_StopInClip(steps=2, clip=1))
    assert sorted(p.name for p in (job / FRAMES_SPILL_DIR).glob("clip_*.npy")) == ["clip_0000.npy"]

    prep = renderer.prepare(req, job)
    assert prep.start_clip == 1 and prep.num_clips >= 2
    generate(req, job, model, renderer)
    resumed = np.load(job / FRAMES_FILE)
    assert not (job / FRAMES_SPILL_DIR).exists()  # spill folder removed after the mux

    assert resumed.shape == reference.shape
    first = prep.plan.clips[0].kept_frames
    assert np.array_equal(resumed[:first], reference[:first])  # the finished clip is reused as is
    # Later clips start from 8-bit motion frames instead of float ones: close, not bit-identical.
    later = np.abs(resumed[first:].astype(int) - reference[first:].astype(int))
    assert later.mean() < 2.0, later.mean()


def test_other_settings_start_over(renderer_and_model, portrait_pngs, tmp_path):
    renderer, model = renderer_and_model
    job = tmp_path / "job"
    with pytest.raises(Cancelled):
        generate(_request(portrait_pngs), job, model, renderer, should_stop=_StopInClip(steps=2, clip=1))
    changed = _request(portrait_pngs, steps=3)
    assert renderer.prepare(changed, job).start_clip == 0
    # ...and the earlier attempt's clips are gone, so they can never be mixed in later.
    assert not list((job / FRAMES_SPILL_DIR).glob("clip_*.npy"))


def test_a_fresh_random_seed_never_reuses_clips_of_another_draw(renderer_and_model, portrait_pngs, tmp_path):
    """The service stores a drawn seed at submission (tests/test_api.py); a negative seed reaching the
    renderer (CLI) is drawn anew per attempt, so the earlier attempt's clips must not be mixed in."""
    renderer, model = renderer_and_model
    req = _request(portrait_pngs, seed=-1)
    job = tmp_path / "job"
    with pytest.raises(Cancelled):
        generate(req, job, model, renderer, should_stop=_StopInClip(steps=2, clip=1))
    again = renderer.prepare(dataclasses.replace(req), job)
    assert again.settings.seed >= 0 and again.start_clip == 0
