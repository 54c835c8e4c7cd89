"""What the UI tests share: a real JobStore, portraits and recordings on disk, the handlers build_ui wires
(submitting through the service's one submit path), a filled form, and a job moved along the way an
engine moves it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from PIL import Image

from service.jobs import JobStore
from service.ui import ADVANCED_FIELDS, UiHandlers, submit_form


def _portrait(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (320, 400)) -> str:
    Image.new("RGB", size, colour).save(path)
    return str(path)


def _handlers(store: JobStore, **kwargs: Any) -> UiHandlers:
    """The handlers build_ui wires (test_build_ui_* checks that build_ui hands out the same class)."""
    kwargs.setdefault("tts_preview", None)
    kwargs.setdefault("info", lambda: {"model": "tiny", "default_preset": "fast"})
    return UiHandlers(
        store, submit=lambda form, files, owner=None: submit_form(store, form, files, owner=owner), **kwargs
    )


def _values(ui: UiHandlers, portraits: tuple[str, str], **over: Any) -> dict[str, Any]:
    values = {
        "source": "portraits",
        "left_image": portraits[0],
        "right_image": portraits[1],
        "scene_image": None,
        "boxes": "",
        "layout": "side_by_side",
        "backdrop": "blur",
        "aspect": "16:9",
        "script": "(s1) Hello there!\n(s2) Hi, nice to see you.",
        "voice1": "af_heart",
        "voice2": "am_adam",
        "prompt": "",
        "preset": "fast",
        "length_unit": "seconds",
    }
    values.update(dict(zip(ADVANCED_FIELDS, ui.preset_values("fast"), strict=True)))
    values.update(over)
    return values


def _tone(path: Path, seconds: float, rate: int = 16000, fmt: str = "WAV") -> str:
    """A 220 Hz tone (uploaded speech must not be silent) written as ``fmt`` at ``path``."""
    t = np.arange(round(seconds * rate)) / rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format=fmt)
    return str(path)


def _finish(store: JobStore, job_id: str, outputs: dict[str, bytes]) -> None:
    """What an engine does: claim, render, write outputs, done."""
    job = store.claim_next("test")
    assert job is not None and job.id == job_id
    store.set_state(job_id, "rendering")
    store.set_state(job_id, "encoding")
    for name, data in outputs.items():
        (store.job_dir(job_id) / name).write_bytes(data)
    store.set_outputs(job_id, list(outputs))
    store.add_timing(job_id, "total_time", 12.5)
    store.set_state(job_id, "done")


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (640, 360), (10, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    s = JobStore(tmp_path / "jobs.db", tmp_path / "outputs", min_free_bytes=0)
    yield s
    s.close()


@pytest.fixture
def portraits(tmp_path: Path) -> tuple[str, str]:
    return _portrait(tmp_path / "left.png", (200, 120, 90)), _portrait(tmp_path / "right.png", (90, 120, 200))


@pytest.fixture
def ui(store: JobStore) -> UiHandlers:
    return _handlers(store)


@pytest.fixture
def recordings(tmp_path: Path) -> tuple[str, str]:
    return _tone(tmp_path / "one.wav", 1.0), _tone(tmp_path / "two.flac", 1.5, fmt="FLAC")
