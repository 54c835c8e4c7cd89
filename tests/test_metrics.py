"""GET /api/metrics: Prometheus text with jobs by state, queue, engine liveness and stage timings."""

from __future__ import annotations

import re
import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.api import EngineStatus, ServiceInfo, WorkerStatus, create_app
from service.jobs import JobState, JobStore

SAMPLE = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (-?[0-9.e+-]+|NaN)$')


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        assert SAMPLE.match(line), line
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
    return out


def _store(tmp_path: Path) -> JobStore:
    store = JobStore(tmp_path / "jobs.db", tmp_path / "outputs")
    done = store.submit({"kind": "dialogue"}, {"steps": 4}, {})
    store.claim_next()
    for state in (JobState.RENDERING, JobState.ENCODING):
        store.set_state(done.id, state)
    store.add_timing(done.id, "video_time", 12.5)
    store.add_timing(done.id, "tts_time", 1.5)
    store.set_state(done.id, JobState.DONE)
    store.submit({"kind": "dialogue"}, {"steps": 4}, {})  # stays queued
    return store


def test_metrics_report_jobs_queue_engine_and_stage_times(tmp_path: Path) -> None:
    status = EngineStatus(True, time.time() - 2.0, (WorkerStatus(0, True, "x"), WorkerStatus(1, True, "x")))
    info = ServiceInfo(world_size=2, engine_status=lambda: status)
    client = TestClient(create_app(_store(tmp_path), info))
    resp = client.get("/api/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    s = _samples(resp.text)
    assert s['dialogue_jobs{state="done"}'] == 1 and s['dialogue_jobs{state="queued"}'] == 1
    assert s['dialogue_jobs{state="failed"}'] == 0
    assert s["dialogue_queue_size"] == 1 and s["dialogue_world_size"] == 2
    assert s["dialogue_engine_up"] == 1 and s["dialogue_busy_ranks"] == 2
    assert 1.5 < s["dialogue_engine_heartbeat_age_seconds"] < 60
    assert s['dialogue_stage_seconds_sum{stage="video_time"}'] == 12.5
    assert s['dialogue_stage_seconds_count{stage="tts_time"}'] == 1


def test_metrics_without_engine_and_behind_the_token(tmp_path: Path) -> None:
    client = TestClient(create_app(_store(tmp_path), ServiceInfo(), auth_token="s3cret"))
    assert client.get("/api/metrics").status_code == 401
    resp = client.get("/api/metrics", headers={"Authorization": "Bearer s3cret"})
    assert _samples(resp.text)["dialogue_engine_up"] == 0
    assert "dialogue_engine_heartbeat_age_seconds" not in resp.text
