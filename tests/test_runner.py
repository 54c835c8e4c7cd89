"""service/runner.py: the store-backed sink/source and the speed estimates the UI shows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from inference.render.intake import Limits, build_job
from inference.render.spec import JobInput, JobSpec
from service.jobs import JobState, JobStore
from service.runner import EngineMonitor, StoreJobSource, StoreSink, learn_from_history

SPEC = {"kind": "dialogue", "version": 1}


def _finished_job(store: JobStore, *, steps: int, text_guidance: float, video: float, clips: int) -> str:
    job = store.submit(SPEC, {"steps": steps, "text_guidance": text_guidance, "resolution": 480}, {})
    claimed = store.claim_next(worker="test")
    assert claimed is not None and claimed.id == job.id
    store.set_state(job.id, JobState.RENDERING)
    store.set_state(job.id, JobState.ENCODING)
    store.add_timing(job.id, "video_time", video)
    store.add_timing(job.id, "decode_time", 2.0 * clips)
    (store.job_dir(job.id) / "render.json").write_text(json.dumps({"clips": clips}))
    return job.id


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.db", tmp_path / "outputs")


def test_speed_is_learned_from_a_finished_job(store: JobStore) -> None:
    monitor = EngineMonitor(world_size=2, device="cpu")
    assert monitor.speed() == {}  # nothing measured yet: the UI shows no time estimate
    job_id = _finished_job(store, steps=10, text_guidance=5.0, video=60.0, clips=2)
    StoreSink(store, monitor).done(job_id, ["render.json"])
    speed = monitor.speed()
    assert speed["step_time_s"] == {480: pytest.approx(60.0 / (2 * 10 * 3))}  # 3 passes per step
    assert speed["clip_overhead_s"] == pytest.approx(2.0)
    assert store.get(job_id).state == JobState.DONE


def test_two_pass_jobs_count_two_passes_and_history_seeds_the_estimate(store: JobStore) -> None:
    sink = StoreSink(store, EngineMonitor(1, "cpu"))
    job_id = _finished_job(store, steps=8, text_guidance=1.0, video=32.0, clips=1)
    sink.done(job_id, ["render.json"])
    fresh = EngineMonitor(1, "cpu")  # a restarted service
    learn_from_history(store, fresh)
    assert fresh.speed()["step_time_s"][480] == pytest.approx(32.0 / (8 * 2))


def test_a_job_without_render_json_teaches_nothing(store: JobStore) -> None:
    monitor = EngineMonitor(1, "cpu")
    job_id = _finished_job(store, steps=8, text_guidance=5.0, video=32.0, clips=1)
    (store.job_dir(job_id) / "render.json").unlink()
    StoreSink(store, monitor).done(job_id, [])
    assert monitor.speed() == {}


def _rendering_job(store: JobStore) -> str:
    job = store.submit(SPEC, {"steps": 4}, {})
    store.claim_next(worker="test")
    store.set_state(job.id, JobState.RENDERING)
    return job.id


def test_a_shutdown_requeues_the_job_without_counting_the_attempt(store: JobStore) -> None:
    sink = StoreSink(store, EngineMonitor(1, "cpu"))
    job_id = _rendering_job(store)
    sink.failed(job_id, "cancelled at step 3 (shutdown)", interrupted=True)
    job = store.get(job_id)
    assert job.state == JobState.QUEUED and job.attempts == 0  # not cancelled, not failed, not counted
    assert store.recover_interrupted() == []  # nothing left for the next start to recover


def test_a_user_cancel_during_a_shutdown_still_cancels(store: JobStore) -> None:
    sink = StoreSink(store, EngineMonitor(1, "cpu"))
    job_id = _rendering_job(store)
    store.request_cancel(job_id)
    sink.failed(job_id, "cancelled at step 3 (cancel request)", cancelled=True, interrupted=True)
    assert store.get(job_id).state == JobState.CANCELLED
    other = _rendering_job(store)
    sink.failed(other, "RuntimeError: decode failed")
    assert store.get(other).state == JobState.FAILED and "decode failed" in store.get(other).error


def test_the_source_reads_the_stored_job_spec_back_and_refuses_a_bad_one(store: JobStore) -> None:
    """The renderer gets the typed JobSpec the service stored (read strictly), its settings and its
    inputs folder; a stored spec that does not read back fails the job with the key it names."""
    buf = io.BytesIO()
    Image.new("RGB", (300, 400), (90, 120, 200)).save(buf, format="PNG")
    sub = build_job(JobInput(image=buf.getvalue(), script="Hello, this is me."), Limits())
    job = store.submit(sub.spec, sub.settings, sub.files)
    source = StoreJobSource(store, EngineMonitor(1, "cpu"), poll_s=0.01)
    render_job = source(0.5)
    assert render_job is not None and render_job.job_id == job.id
    assert (
        isinstance(render_job.spec, JobSpec) and render_job.spec == sub.spec and render_job.spec.people == 1
    )
    assert render_job.settings.seed == sub.settings["seed"]
    assert render_job.inputs == store.job_dir(job.id) / "inputs"
    assert render_job.spec.input_paths(render_job.inputs)["image"].read_bytes() == buf.getvalue()

    broken = dict(sub.spec.to_json(), people=3)
    bad = store.submit(broken, sub.settings, sub.files)
    assert source(0.2) is None
    failed = store.get(bad.id)
    assert failed.state == JobState.FAILED and "spec.people" in failed.error
