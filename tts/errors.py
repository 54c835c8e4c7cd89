"""Errors raised by the ``tts`` package.

Every error a user can cause is a ``common.errors.InputError`` that carries ``.field`` (the input it is
about), so the API can answer 4xx with the field name instead of a traceback.
"""

from __future__ import annotations

from common.errors import InputError


class TTSInputError(InputError):
    """Bad input to speech synthesis or audio loading. ``field`` names the offending input."""


class UnknownVoiceError(TTSInputError):
    """A voice id that is not a Kokoro v1.0 voice (``field == "voice"``)."""


class AudioInputError(TTSInputError):
    """An uploaded audio file that cannot be used (``field`` is ``"audio1"`` or ``"audio2"``)."""


class KokoroWeightsError(TTSInputError):
    """The local Kokoro folder is missing files or does not match its config (``field == "kokoro_dir"``)."""
