"""The gate of the web process, and the rates and throttles it and the routes use.

``Gate`` is ASGI middleware in front of the whole app: one credential check for every route (REST,
docs, the Gradio page, its events, uploads and files), failed logins throttled per client address,
request bodies capped and timed while they stream in. ``GET/HEAD /api/health`` stays open for probes.

``RateLimiter`` is a token bucket per key (a client address, a user name): ``rate`` requests per
``per_s`` seconds, bursting to ``rate``. Over it, ``take`` raises ``RateLimitedError`` with the seconds
until the next request would be allowed (answered 429 with Retry-After). Keys are forgotten once their
bucket is full again, so the table stays small however many addresses knock.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.errors import InputError
from service.validation import PayloadTooLargeError

logger = logging.getLogger(__name__)


class RateLimitedError(RuntimeError):
    """Too many requests (429); ``retry_after_s`` says when to come back."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


class RateLimiter:
    """Token bucket per key: ``rate`` tokens per ``per_s`` seconds, at most ``rate`` saved up."""

    def __init__(self, rate: int, per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 1 or per_s <= 0:
            raise ValueError(f"rate must be >= 1 and per_s > 0, got {rate} per {per_s}")
        self.rate, self.per_s = rate, per_s
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.rate), now))
        return min(float(self.rate), tokens + (now - at) * self.rate / self.per_s)

    def allowed(self, key: str) -> bool:
        """Would ``take(key)`` succeed now (without taking)?"""
        with self._lock:
            return self._tokens(key, self._clock()) >= 1.0

    def take(self, key: str, what: str = "requests") -> None:
        """Spend one token of ``key``; raises ``RateLimitedError`` when none is left."""
        with self._lock:
            now = self._clock()
            tokens = self._tokens(key, now)
            if tokens < 1.0:
                wait = (1.0 - tokens) * self.per_s / self.rate
                raise RateLimitedError(
                    f"too many {what}: at most {self.rate} per {self.per_s:g} s; try again in {math.ceil(wait)} s",
                    retry_after_s=wait,
                )
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > 4096:
                self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        for key in [k for k in self._buckets if self._tokens(k, now) >= self.rate]:
            del self._buckets[key]


# ---------------------------------------------------------------------------------------------- gate

OPEN_PATHS = frozenset({"/api/health"})
"""Paths answered without credentials (GET/HEAD only): the health probe of load balancers and
orchestrators, which says whether the engine beats and the store is writable and nothing more."""

BASIC_REALM = "Dialogue video service"
_GRADIO_FILE_PREFIXES = ("/gradio_api/file=", "/file=")


@dataclass(frozen=True)
class GateConfig:
    """Who may use the service. ``api_token``: the ``--api_token`` (``Authorization: Bearer <token>``,
    or the password of HTTP basic auth under any user name, for browsers); ``users``: ``--auth``
    name -> password (HTTP basic auth). With neither, the gate is open (loopback development).
    ``failures_per_minute``: wrong credentials one client address may send per minute before it is
    answered 429 without a check. ``max_body_bytes``: any request body larger is refused (413) while it
    streams in; ``body_timeout_s``: longest wait for the next piece of a body (408 after it)."""

    api_token: str | None = None
    users: Mapping[str, str] = field(default_factory=dict)
    failures_per_minute: int = 10
    max_body_bytes: int | None = None
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.api_token is not None and not self.api_token.strip():
            raise ValueError("api_token must be a non-empty string or None (no auth)")
        for name, password in self.users.items():
            if not name or ":" in name or not password:
                raise ValueError("--auth needs user:password with a non-empty user (no ':') and password")

    @property
    def enabled(self) -> bool:
        return self.api_token is not None or bool(self.users)


def principal_of(scope_or_request: Any) -> str | None:
    """The credential the gate accepted for this request ("token" or "user:<name>"), None when open."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    state = scope.get("state") or {}
    return state.get("principal") if isinstance(state, dict) else getattr(state, "principal", None)


class Gate:
    """ASGI middleware in front of the whole app (REST, docs, the Gradio page, its API, uploads and
    files): every request needs a credential except GET/HEAD on ``OPEN_PATHS``.

    The accepted credential is left in ``scope["state"]["principal"]`` for the routes (job ownership).
    ``file_guard(principal, path) -> bool`` decides Gradio's ``/gradio_api/file=<path>`` requests (the
    UI's videos and downloads): a path it refuses is answered 404 before Gradio sees it. Request bodies
    are capped at ``max_body_bytes`` and must keep arriving (``body_timeout_s`` between pieces).
    """

    def __init__(
        self, app: Any, config: GateConfig, file_guard: Callable[[str | None, str], bool] | None = None
    ):
        self.app = app
        self.config = config
        self.file_guard = file_guard
        self._failures = RateLimiter(config.failures_per_minute, 60.0)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        principal: str | None = None
        if self.config.enabled and not (path in OPEN_PATHS and method in ("GET", "HEAD")):
            client = (scope.get("client") or ("unknown", 0))[0]
            header = _header(scope, b"authorization")
            if header is None:
                await _refuse(scope, send, 401, "authorization", self._ask(path), self._challenge(path))
                return
            if not self._failures.allowed(client):
                await _refuse(scope, send, 429, "authorization", "too many failed logins from this address; "
                              "wait a minute", {"Retry-After": "60"})  # fmt: skip
                return
            principal = self._check(header)
            if principal is None:
                with contextlib.suppress(RateLimitedError):
                    self._failures.take(client, "failed logins")
                logger.warning("refused credentials from %s for %s %s", client, method, path[:120])
                await _refuse(scope, send, 401, "authorization", self._wrong(header), self._challenge(path))
                return
            scope.setdefault("state", {})["principal"] = principal
        if scope["type"] == "http" and self.file_guard is not None:
            target = _gradio_file_target(path)
            if target is not None and not self.file_guard(principal, target):
                await _refuse(scope, send, 404, "file", "no such file")
                return
        if scope["type"] != "http" or method not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.config.max_body_bytes
        declared = _header(scope, b"content-length")
        if limit is not None and declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(scope, send, 413, "body", f"request body is {declared} bytes; the limit is {limit}")
            return
        started = False

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._bounded(receive), tracked_send)
        except (PayloadTooLargeError, BodyTimeoutError) as exc:  # a route that let it escape (Gradio's)
            if not started:
                status = 413 if isinstance(exc, PayloadTooLargeError) else 400
                await _refuse(scope, send, status, exc.field, exc.message)

    # -- credentials

    def _check(self, header: str) -> str | None:
        scheme, _, value = header.partition(" ")
        value = value.strip()
        token = self.config.api_token
        if scheme.lower() == "bearer":
            if token is not None and value and hmac.compare_digest(value.encode(), token.encode()):
                return "token"
            return None
        if scheme.lower() == "basic":
            try:
                name, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            expected = self.config.users.get(name)
            if expected is not None and hmac.compare_digest(password.encode(), expected.encode()):
                return f"user:{name}"
            if token is not None and password and hmac.compare_digest(password.encode(), token.encode()):
                return "token"
        return None

    def _challenge(self, path: str) -> dict[str, str]:
        if path.startswith("/api") and self.config.api_token is not None:
            return {"WWW-Authenticate": "Bearer"}
        return {"WWW-Authenticate": f'Basic realm="{BASIC_REALM}", charset="UTF-8"'}

    def _ask(self, path: str) -> str:
        if path.startswith("/api") and self.config.api_token is not None:
            return "this API needs a token: send 'Authorization: Bearer <token>'"
        return "this service needs a login (HTTP basic auth: --auth user and password, or any user with the API token)"

    def _wrong(self, header: str) -> str:
        scheme = header.partition(" ")[0].lower()
        if scheme == "bearer":
            return "invalid token"
        if scheme == "basic":
            return "invalid user name or password"
        return "expected 'Authorization: Bearer <token>' or HTTP basic auth"

    # -- bodies

    def _bounded(self, receive: Any) -> Any:
        """``receive`` that counts the body against ``max_body_bytes`` and waits ``body_timeout_s`` at most
        for each piece."""
        limit, timeout = self.config.max_body_bytes, self.config.body_timeout_s
        seen = 0

        async def bounded_receive() -> dict[str, Any]:
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                raise BodyTimeoutError(
                    "body", f"no part of the request body arrived for {timeout:g} s"
                ) from None
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if limit is not None and seen > limit:
                    raise PayloadTooLargeError(
                        "body", f"request body is larger than the limit of {limit} bytes"
                    )
            return message

        return bounded_receive


class BodyTimeoutError(InputError):
    """A request body that stopped arriving (answered 400 naming ``body``; the connection is closed)."""


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _gradio_file_target(path: str) -> str | None:
    """The file a Gradio file route asks for (``/gradio_api/file=/abs/path``, also under a mount prefix)."""
    for prefix in _GRADIO_FILE_PREFIXES:
        at = path.find(prefix)
        if at >= 0:
            return urllib.parse.unquote(path[at + len(prefix) :])
    return None


async def _refuse(
    scope: dict[str, Any],
    send: Any,
    status: int,
    field_name: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer in the API's JSON error shape (a websocket is closed with policy-violation)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"success": False, "error": {"field": field_name, "message": message}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if status in (400, 413):
        raw.append((b"connection", b"close"))
    try:
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
    except RuntimeError:  # the response had already started; nothing more can be said
        logger.warning("could not answer %d: the response had already started", status)
