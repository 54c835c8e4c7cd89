"""A retried POST /api/generate with the same Idempotency-Key returns the same job, never a second one."""

from __future__ import annotations

import threading
from pathlib import Path

from service.jobs import JobState
from tests.test_api import _audio_form, _err, _make


def _post(client, key: str | None):
    data, files = _audio_form()
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/api/generate", data=data, files=files, headers=headers)


def test_a_retried_submission_returns_the_same_job(tmp_path: Path) -> None:
    store, _engine, client = _make(tmp_path)
    try:
        first = _post(client, "retry-0c9f")
        again = _post(client, "retry-0c9f")
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert first.json()["task_id"] == again.json()["task_id"]
        assert store.count(state=JobState.QUEUED) == 1
        # Negative control: another key (or none) is another job.
        other = _post(client, "retry-7a11")
        plain = _post(client, None)
        ids = {first.json()["task_id"], other.json()["task_id"], plain.json()["task_id"]}
        assert len(ids) == 3 and store.count(state=JobState.QUEUED) == 3
        # The folder of the duplicate's inputs was never left behind.
        folders = [p for p in store.outputs_dir.iterdir() if p.is_dir() and len(p.name) == 32]
        assert len(folders) == 3
    finally:
        store.close()


def test_racing_retries_store_one_job(tmp_path: Path) -> None:
    store, _engine, client = _make(tmp_path)
    try:
        answers: list[str] = []

        def send() -> None:
            answers.append(_post(client, "race-1").json()["task_id"])

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(answers) == 4 and len(set(answers)) == 1
        assert store.count(state=JobState.QUEUED) == 1
    finally:
        store.close()


def test_a_malformed_key_is_refused_naming_the_header(tmp_path: Path) -> None:
    store, _engine, client = _make(tmp_path)
    try:
        _err(_post(client, "x" * 129), 400, "Idempotency-Key", "128")
        _err(_post(client, "has space"), 400, "Idempotency-Key")
        assert store.count(state=JobState.QUEUED) == 0
    finally:
        store.close()
