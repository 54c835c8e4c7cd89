"""Fuzz: malformed requests of every field class (numbers, nesting, text, enums, aspect, files, data
URLs, queries, ids, previews) each get a 4xx naming the field: no 500, no hang, no stored job."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api import ServiceInfo, create_app
from service.jobs import JobStore
from service.validation import Limits
from tests.attack_cases import cases


def _speak(voice: str, text: str | None) -> bytes:
    return b"RIFF0000WAVE"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    store = JobStore(root / "outputs" / "jobs.db", root / "outputs", min_free_bytes=0)
    app = create_app(store, ServiceInfo(), limits=Limits(), tts_preview=_speak)
    with TestClient(app) as c:
        yield store, c
    store.close()


def test_malformed_requests_get_4xx_with_the_field(client) -> None:
    store, c = client
    failures = []
    for name, method, path, kwargs in cases():
        resp = c.request(method, path, **kwargs)
        try:
            body = resp.json()
            field = body["error"]["field"] if not body.get("success", True) else None
        except (ValueError, KeyError, TypeError):
            field = None
        unknown_path = resp.status_code == 404 and "no such API endpoint" in resp.text  # ../ folded away
        if not 400 <= resp.status_code < 500 or not (field or unknown_path):
            failures.append((name, resp.status_code, resp.text[:160]))
    assert failures == [], "\n".join(map(str, failures))
    assert store.count() == 0  # nothing malformed became a job
