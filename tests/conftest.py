"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_kokoro_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random-weight Kokoro folder in the real layout (config.json, kokoro-v1_0.pth, voices/*.pt)
    with voices af_heart, am_adam, zf_xiaobei, zm_yunjian. About 225 MB, written once per session."""
    from tts.tiny import write_tiny_kokoro

    return write_tiny_kokoro(tmp_path_factory.mktemp("kokoro") / "Kokoro-82M", seed=0)
