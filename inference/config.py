"""Kept import path: ``from inference.config import DiTConfig`` (the config lives in ``inference.model.config``)."""

from inference.model.config import *  # noqa: F403
from inference.model.config import ConfigError, DiTConfig

__all__ = ["ConfigError", "DiTConfig"]
