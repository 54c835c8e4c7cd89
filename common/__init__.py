"""The ground floor every package builds on: the user-facing error type and the atomic file writer."""

from common.errors import InputError
from common.files import atomic_write, atomic_write_bytes, atomic_write_text

__all__ = ["InputError", "atomic_write", "atomic_write_bytes", "atomic_write_text"]
