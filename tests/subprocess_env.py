"""The environment every test subprocess (CLI, service, torchrun) runs with."""

from __future__ import annotations

import os

# Variables of an enclosing torchrun would make a child think it is one rank of a group.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def offline_env(**extra: str) -> dict[str, str]:
    """os.environ, offline, one thread per process, no API token, no distributed variables."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    env.pop("DIALOGUE_API_TOKEN", None)
    for key in _DIST_VARS:
        env.pop(key, None)
    return env
