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


@pytest.fixture(scope="session")
def tiny_weights(tiny_kokoro_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete ``make_tiny`` weights root (DiT, T5, CLIP, VAE, wav2vec2, Kokoro), written once per
    session. Its ``Kokoro-82M`` is a link to ``tiny_kokoro_dir`` (same seed 0) instead of a second
    225 MB copy; ``make_tiny`` itself writes everything else and the marker, so the CLI's own
    ``make_tiny`` call finds the root complete and leaves it alone."""
    import tts.tiny
    from inference.checkpoint.weights import make_tiny

    def link_kokoro(out: str | Path, seed: int = 0) -> Path:
        assert seed == 0, "tiny_kokoro_dir holds seed 0"
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.symlink_to(tiny_kokoro_dir, target_is_directory=True)
        return out

    root = tmp_path_factory.mktemp("tiny_weights")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tts.tiny, "write_tiny_kokoro", link_kokoro)
        make_tiny(root, seed=0)
    return root


def _portrait(w: int, h: int, body: tuple[int, int, int], bg: tuple[int, int, int]):
    """A synthetic head-and-shoulders portrait (PIL RGB), head size proportional to the height."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[:h, :w]
    a = np.empty((h, w, 3), np.uint8)
    a[:] = bg
    a[(np.abs(xx - w / 2) < 0.3 * h) & (yy > 0.5 * h)] = body
    a[(yy - 0.3 * h) ** 2 + (xx - w / 2) ** 2 < (0.15 * h) ** 2] = (240, 200, 170)
    return Image.fromarray(a)


@pytest.fixture(scope="session")
def portrait_pngs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different 300x400 portrait PNGs (left, right) in one folder."""
    folder = tmp_path_factory.mktemp("portraits")
    left, right = folder / "left.png", folder / "right.png"
    _portrait(300, 400, (30, 60, 120), (200, 200, 150)).save(left)
    _portrait(300, 400, (120, 40, 40), (150, 190, 210)).save(right)
    return left, right
