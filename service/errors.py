"""What the service tells a client when something goes wrong: one table for REST and the UI.

``answer_for(exc)`` -> ``Answer(status, field, message, headers)`` or None for an unexpected error
(the caller logs it and answers 500 with an error id). Bad input of any kind is an ``InputError``
(``field`` + ``message``); the store's errors and the few HTTP-only conditions below have their row.

    400  InputError (form, JSON, image, audio, script, voice, settings, job id)
    401  AuthError                      404  JobNotFoundError (id), OutputNotFoundError (file), NoSuchEndpoint
    409  InvalidTransitionError (id), NotReadyError
    413  PayloadTooLargeError           415  UnsupportedMediaError
    429  QueueFullError, RateLimitedError (Retry-After)   503  UnavailableError   507  DiskFullError
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from common.errors import InputError
from service.jobs import (
    DiskFullError,
    InvalidTransitionError,
    JobNotFoundError,
    OutputNotFoundError,
    QueueFullError,
)
from service.security import RateLimitedError
from service.validation import PayloadTooLargeError


class AuthError(InputError):
    """Missing or wrong credentials (401); ``field`` is ``authorization``."""


class UnsupportedMediaError(InputError):
    """A request body of a content type the endpoint does not take (415)."""


class NotReadyError(InputError):
    """The job exists but is not in a state that has what was asked for (409)."""


class UnavailableError(RuntimeError):
    """A part of the service this request needs is not attached to this process (503)."""


class NoSuchEndpoint(LookupError):
    """A path under /api that names no endpoint (404)."""


@dataclass(frozen=True)
class Answer:
    status: int
    field: str | None
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)


_SAME = object()  # the row's field is the exception's own ``field``

# (exception class, HTTP status, field or _SAME, headers); the first row that matches wins.
_TABLE: tuple[tuple[type[BaseException], int, object, Mapping[str, str]], ...] = (
    (AuthError, 401, _SAME, {"WWW-Authenticate": "Bearer"}),
    (UnsupportedMediaError, 415, _SAME, {}),
    (NotReadyError, 409, _SAME, {}),
    (PayloadTooLargeError, 413, _SAME, {}),
    (InputError, 400, _SAME, {}),
    (JobNotFoundError, 404, "id", {}),
    (OutputNotFoundError, 404, "file", {}),
    (NoSuchEndpoint, 404, None, {}),
    (InvalidTransitionError, 409, "id", {}),
    (QueueFullError, 429, None, {"Retry-After": "30"}),
    (RateLimitedError, 429, None, {}),  # Retry-After: the limiter's own wait
    (UnavailableError, 503, None, {}),
    (DiskFullError, 507, None, {}),
)


def answer_for(exc: BaseException) -> Answer | None:
    """The answer for ``exc``, or None when it is not an error the service expects (a bug: log, 500)."""
    for cls, status, field_name, headers in _TABLE:
        if isinstance(exc, cls):
            if field_name is _SAME:
                assert isinstance(exc, InputError)
                return Answer(status, exc.field, exc.message, headers)
            if isinstance(exc, RateLimitedError):
                headers = {"Retry-After": str(exc.retry_after_s)}
            return Answer(status, field_name, str(exc), headers)  # type: ignore[arg-type]
    return None
