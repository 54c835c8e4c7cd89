"""REST API of the dialogue video service (FastAPI), on top of the durable job store.

``create_app(store, info, auth_token=..., limits=..., tts_preview=...)`` returns a FastAPI app with the
routes under ``/api``, the OpenAPI schema at ``/openapi.json`` and Swagger UI at ``/docs``; the UI
author mounts Gradio on it with ``gr.mount_gradio_app(app, blocks, path="/")``. ``create_router``
returns the same routes as an ``APIRouter`` for mounting elsewhere: its routes turn every error into the
JSON error shape themselves, so they behave the same on any FastAPI (or Gradio) app.

Every error answer is ``{"success": false, "error": {"field": <input or null>, "message": <rule>}}``:
400 bad input, 401 auth, 404 unknown job/file, 409 wrong job state, 413 too large, 415 content type,
429 queue full, 503 no engine, 507 disk full; an unexpected failure is a logged 500 with an error id.

The API never touches ``torch.distributed`` or the engine: it writes jobs to the store and reads them
back. Live engine state (heartbeat, per-rank busy state) comes from ``ServiceInfo.engine_status``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import mimetypes
import tempfile
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from common.bounded import MAX_INT_DIGITS, MAX_JSON_DEPTH
from common.bounded import loads as bounded_json
from dialogue.script import parse_script
from inference.render.intake import Limits, check_text, check_voice
from inference.render.settings import preset_catalog
from inference.scene.compose import MAX_ASPECT, MAX_PIXELS, MIN_SHORT_SIDE
from service.errors import (
    AuthError,
    NoSuchEndpoint,
    NotReadyError,
    UnavailableError,
    UnsupportedMediaError,
    answer_for,
)
from service.jobs import (
    JOB_ID_RE,
    OUTPUT_NAME_RE,
    Job,
    JobNotFoundError,
    JobState,
    JobStore,
    OutputNotFoundError,
    validate_job_id,
)
from service.metrics import render_metrics
from service.previews import PreviewPool
from service.schemas import (
    CancelResponse,
    EngineStatus,
    ErrorResponse,
    GenerateResponse,
    JobJson,
    JobListResponse,
    JobStatusResponse,
    QueueResponse,
    ServiceInfo,
    TtsPreviewRequest,
    WorkerStatus,
    video_name,
)
from service.security import Gate, GateConfig, principal_of
from service.submit import submit_input
from service.validation import (
    PayloadTooLargeError,
    RequestError,
    check_form_items,
    request_from_form,
    request_from_json,
)
from tts.user_audio import MAX_VALUES_PER_SECOND, value_budget
from tts.voices import VOICES

logger = logging.getLogger(__name__)

__all__ = [
    "EngineStatus",
    "Limits",
    "ServiceInfo",
    "TtsPreview",
    "WorkerStatus",
    "create_app",
    "create_router",
]

TtsPreview = Callable[[str, str | None], bytes]
"""``tts_preview(voice_id, text_or_None) -> WAV bytes``; raises InputError on bad input."""


# ---------------------------------------------------------------------------------------------- errors


def _error_response(
    status: int, field: str | None, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = {"success": False, "error": {"field": field, "message": message}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _validation_field(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        if parts == ["body"]:  # the body as a whole (e.g. JSON that does not parse)
            return "body"
        parts = parts[1:]
    return ".".join(parts) or None


def error_response_for(exc: BaseException, request: Request | None = None) -> JSONResponse:
    """Map an exception raised while serving an /api request to the JSON error answer
    (``service.errors`` has the table; FastAPI's own validation errors name the parameter)."""
    answer = answer_for(exc)
    if answer is not None:
        return _error_response(answer.status, answer.field, answer.message, answer.headers)
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        message = str(first.get("msg", "invalid value"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return _error_response(400, _validation_field(first.get("loc", ())), message)
    if isinstance(exc, ClientDisconnect):
        return _error_response(400, "body", "the client disconnected before the request body was complete")
    if isinstance(exc, StarletteHTTPException):
        field_name = "body" if exc.status_code == 400 else None  # FastAPI's "error parsing the body"
        return _error_response(exc.status_code, field_name, str(exc.detail), getattr(exc, "headers", None))
    error_id = uuid.uuid4().hex[:12]
    where = f"{request.method} {request.url.path}" if request is not None else "request"
    logger.error("internal error %s while serving %s", error_id, where, exc_info=exc)
    return _error_response(500, None, f"internal error (id {error_id}); the service log has the details")


class JsonErrorRoute(APIRoute):
    """An APIRoute that answers every exception (validation, store, unexpected) with the JSON error
    shape itself, so the routes keep their contract on any app they are mounted on."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return error_response_for(exc, request)

        return route_handler


# ---------------------------------------------------------------------------------------------- helpers


def _plain(value: Any) -> Any:
    """JSON-ready copy of dataclasses, mappings and collections. Fields are read directly: ``asdict``
    deep-copies, which fails on read-only mappings such as ``MappingProxyType``."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):  # sorted: a set's order changes from one process to the next
        return sorted((_plain(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


SPOOL_IN_MEMORY = 1 << 20  # a request body past this size waits on disk, not in memory
REPLAY_CHUNK = 1 << 16
MAX_CONCURRENT_SUBMISSIONS = 2  # submissions decoded and checked at once; more wait their turn


class _PerLoopSemaphore:
    """An ``asyncio.Semaphore`` per event loop (uvicorn runs one; a test client may start several)."""

    def __init__(self, value: int) -> None:
        self.value = value
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._by_loop.get(loop)
        if sem is None:
            sem = self._by_loop[loop] = asyncio.Semaphore(self.value)
        return sem


async def buffered_request(request: Request, limit: int) -> Request:
    """``request`` with its whole body read, at most ``limit`` bytes (413 past that, without buffering
    the rest), replayed to whoever parses it next. The one place a request body is read. The body is
    spooled to a temporary file past ``SPOOL_IN_MEMORY`` and replayed in ``REPLAY_CHUNK`` pieces, so a
    large upload costs disk while it waits, not memory (the gate times its arrival). A JSON body is
    replayed in one piece: its parser needs it whole, and one piece is never copied again."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError("content-length", f"not a number: {declared[:40]!r}") from None
        if size > limit:
            raise PayloadTooLargeError("body", f"request body is {size} bytes; the limit is {limit}")
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - closed by the replay
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLargeError("body", f"request body is larger than the limit of {limit} bytes")
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    done = False
    piece = total if _content_type(request) == "application/json" else REPLAY_CHUNK

    async def receive() -> dict[str, Any]:
        nonlocal done
        if done:
            return {"type": "http.disconnect"}
        data = spool.read(piece)
        more = spool.tell() < total
        if not more:
            done = True
            spool.close()
        return {"type": "http.request", "body": data, "more_body": more}

    return Request(request.scope, receive)


async def read_upload(upload: UploadFile | None, limit: int) -> bytes | None:
    """An uploaded file's bytes, at most ``limit + 1`` of them (the size rule then refuses it); None
    for a browser's empty file input (no name, no bytes)."""
    if upload is None:
        return None
    data = await upload.read(limit + 1)
    return None if not data and not upload.filename else data


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _json_body(raw: bytes) -> Any:
    """The JSON body with bounded nesting and numbers (``common.bounded``); problems name ``body``."""
    return bounded_json(raw, "body")


# ---------------------------------------------------------------------------------------------- router


def create_router(
    store: JobStore,
    service_info: ServiceInfo,
    *,
    auth_token: str | None = None,
    limits: Limits = Limits(),
    tts_preview: TtsPreview | PreviewPool | None = None,
    share_jobs: bool = False,
) -> APIRouter:
    """All /api routes. ``auth_token``: when set, every route but /api/health needs
    ``Authorization: Bearer <token>`` (or a credential the app's ``Gate`` accepted). A job is visible to
    the credential that submitted it; ``share_jobs`` shows every job to every credential."""
    if auth_token is not None and not auth_token.strip():
        raise ValueError("auth_token must be a non-empty string or None (no auth)")
    previews = PreviewPool(tts_preview) if tts_preview is not None and not isinstance(tts_preview, PreviewPool) \
        else tts_preview  # fmt: skip

    submissions = _PerLoopSemaphore(MAX_CONCURRENT_SUBMISSIONS)

    def viewer(request: Request) -> str | None:
        """The credential whose jobs this request sees; None: every job."""
        return None if share_jobs else principal_of(request)

    def visible(job: Job, request: Request) -> Job:
        if not job.visible_to(viewer(request)):
            raise JobNotFoundError(job.id)  # another credential's job: as if it did not exist
        return job

    def require_auth(request: Request) -> None:
        if auth_token is None or principal_of(request) is not None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise AuthError("authorization", "this API needs a token: send 'Authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("authorization", "expected 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(token.strip().encode(), auth_token.encode()):
            raise AuthError("authorization", "invalid token")

    def prefix(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    class GenerateRoute(JsonErrorRoute):
        """POST /api/generate: the token is checked before the body is read, the body is read within
        ``limits.max_request_bytes``, and a multipart body that cannot be parsed names the body."""

        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            handler = APIRoute.get_route_handler(self)

            async def route_handler(request: Request) -> Response:
                try:
                    require_auth(request)
                    # Every body streams to its spool at once (each under the gate's body timeout);
                    # then at most MAX_CONCURRENT_SUBMISSIONS are parsed, decoded and checked at a time
                    # (each holds its uploads and decoded media), the others wait without a thread.
                    replay = await buffered_request(request, limits.max_request_bytes)
                    async with submissions.get():
                        return await handler(replay)
                except StarletteHTTPException as exc:
                    if exc.status_code != 400:
                        return error_response_for(exc, request)
                    return error_response_for(
                        RequestError("body", f"malformed multipart form: {exc.detail}"), request
                    )
                except Exception as exc:
                    return error_response_for(exc, request)

            return route_handler

    async def check_generate_request(request: Request) -> None:
        """Runs before FastAPI checks the form parameters, so the client learns what it sent wrong in
        our words: the content type, unknown or repeated fields, a file in a text field or the reverse."""
        content_type = _content_type(request)
        if content_type not in ("multipart/form-data", "application/json"):
            raise UnsupportedMediaError("content-type", f"unsupported content type {content_type[:60]!r}; send "
                                        "multipart/form-data or application/json")  # fmt: skip
        if content_type == "multipart/form-data":
            form = await request.form()
            check_form_items((key, not isinstance(value, str)) for key, value in form.multi_items())

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 429, 503, 507)
    }
    router = APIRouter(prefix="/api", route_class=JsonErrorRoute, responses=errors)
    protected = APIRouter(route_class=JsonErrorRoute, dependencies=[Depends(require_auth)])
    submit_router = APIRouter(route_class=GenerateRoute, dependencies=[Depends(require_auth)])

    @submit_router.post(
        "/generate",
        response_model=GenerateResponse,
        summary="Submit a video job (two people, or one)",
        description="A multipart form, or upstream MultiTalk's job JSON (see JobJson) with files as base64 "
        "data URLs. Two people: two portraits or one scene image, with two recordings or a script with lines "
        "for both speakers. One person: image (or left_image / scene_image alone) with audio1 or a script "
        "for speaker 1 only.",
        dependencies=[Depends(check_generate_request)],
        openapi_extra={
            "requestBody": {"content": {"application/json": {"schema": JobJson.model_json_schema()}}}
        },
    )
    async def generate(
        request: Request,
        left_image: Annotated[
            UploadFile | None, File(description="portrait of person 1 (left): JPEG, PNG or WebP")
        ] = None,
        right_image: Annotated[UploadFile | None, File(description="portrait of person 2 (right)")] = None,
        scene_image: Annotated[UploadFile | None, File(description="one image showing both people")] = None,
        image: Annotated[UploadFile | None, File(description="one person, full frame")] = None,
        audio1: Annotated[
            UploadFile | None, File(description="speech of person 1: WAV, FLAC, OGG, MP3 or M4A")
        ] = None,
        audio2: Annotated[UploadFile | None, File(description="speech of person 2")] = None,
        script: Annotated[str | None, Form(description="dialogue, e.g. '(s1) Hi!\n(s2) Hello.'")] = None,
        voice1: Annotated[str | None, Form(description="voice id of speaker 1 (GET /api/voices)")] = None,
        voice2: Annotated[str | None, Form(description="voice id of speaker 2")] = None,
        audio_mode: Annotated[Literal["add", "para"] | None, Form()] = None,
        boxes: Annotated[str | None, Form(description="JSON [[y0,x0,y1,x1],[..]], scene pixels")] = None,
        layout: Annotated[Literal["side_by_side", "backdrop"] | None, Form()] = None,
        backdrop: Annotated[Literal["blur", "plain"] | None, Form()] = None,
        aspect: Annotated[str | None, Form(description="W:H of the composed scene, e.g. 16:9")] = None,
        prompt: Annotated[str | None, Form()] = None,
        preset: Annotated[Literal["fast", "balanced", "quality"] | None, Form()] = None,
        settings: Annotated[
            str | None, Form(description='JSON overrides, e.g. {"steps": 20, "seed": 7}')
        ] = None,
        idempotency_key: Annotated[
            str | None,
            Header(alias="Idempotency-Key", description="a retry with the same key returns the same job"),
        ] = None,
    ) -> GenerateResponse:
        if _content_type(request) == "application/json":
            req = request_from_json(_json_body(await request.body()), limits)
        else:
            uploads = {"left_image": left_image, "right_image": right_image, "scene_image": scene_image,
                       "image": image, "audio1": audio1, "audio2": audio2}  # fmt: skip
            texts = {"script": script, "voice1": voice1, "voice2": voice2, "audio_mode": audio_mode,
                     "boxes": boxes, "layout": layout, "backdrop": backdrop, "aspect": aspect, "prompt": prompt,
                     "preset": preset, "settings": settings}  # fmt: skip
            files = {
                k: data
                for k, u in uploads.items()
                if (data := await read_upload(u, limits.max_upload_bytes)) is not None
            }
            req = request_from_form({k: v for k, v in texts.items() if v is not None}, files, limits)
        job = await run_in_threadpool(submit_input, store, req, limits, owner=principal_of(request),
                                      idempotency_key=idempotency_key)  # fmt: skip
        return GenerateResponse(task_id=job.id, status_url=f"{prefix(request)}/api/status/{job.id}",
                                status=job.state.value, queue_position=job.queue_position)  # fmt: skip

    @protected.get("/status/{job_id}", response_model=JobStatusResponse, summary="State of one job")
    async def status(job_id: str, request: Request) -> JobStatusResponse:
        job = visible(await run_in_threadpool(store.get, validate_job_id(job_id)), request)
        return JobStatusResponse.of(job, prefix(request), full=True)

    @protected.get("/jobs", response_model=JobListResponse, summary="Jobs, newest first")
    async def list_jobs(
        request: Request,
        limit: int = Query(20, ge=1, le=limits.max_list_limit),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
        state: JobState | None = Query(None),
    ) -> JobListResponse:
        who = viewer(request)

        def read() -> tuple[list[Job], int]:
            return store.list(limit, offset, state=state, visible_to=who), store.count(
                state=state, visible_to=who
            )

        jobs, total = await run_in_threadpool(read)
        views = [JobStatusResponse.of(j, prefix(request), full=False) for j in jobs]
        return JobListResponse(jobs=views, total=total, limit=limit, offset=offset)

    @protected.delete("/jobs/{job_id}", response_model=CancelResponse, summary="Cancel a job")
    async def cancel(job_id: str, request: Request) -> CancelResponse:
        visible(await run_in_threadpool(store.get, validate_job_id(job_id)), request)
        job = await run_in_threadpool(store.request_cancel, job_id)
        if job.state == JobState.CANCELLED:
            message = "cancelled"
        else:
            message = f"cancel requested; the engine stops the job at its next check (now {job.state.value})"
        return CancelResponse(task_id=job.id, status=job.state.value, cancel_requested=job.cancel_requested,
                              message=message)  # fmt: skip

    @protected.get("/queue", response_model=QueueResponse, summary="Workers, running jobs and the queue")
    async def queue(request: Request) -> QueueResponse:
        engine = _engine_status(service_info)
        queued, running = await run_in_threadpool(lambda: (store.queue(), store.active()))
        who = viewer(request)
        queue_size = len(queued)
        queued, running = [j for j in queued if j.visible_to(who)], [j for j in running if j.visible_to(who)]
        return QueueResponse(
            workers=[] if engine is None else [_plain(w) for w in engine.workers],
            groups=[] if engine is None else [_plain(g) for g in engine.groups],
            running=[JobStatusResponse.of(j, prefix(request), full=False) for j in running],
            queue=[JobStatusResponse.of(j, prefix(request), full=False) for j in queued],
            queue_size=queue_size,
            max_queue=store.max_queue,
        )

    @protected.head("/download/{job_id}", include_in_schema=False)
    @protected.get(
        "/download/{job_id}",
        summary="Download a job's video (or another output with ?file=)",
        response_class=FileResponse,
        responses={200: {"content": {"video/mp4": {}, "application/octet-stream": {}}}},
    )
    async def download(
        job_id: str, request: Request, file: str | None = Query(None, max_length=128)
    ) -> FileResponse:
        validate_job_id(job_id)
        if file is not None and not OUTPUT_NAME_RE.fullmatch(file):
            raise RequestError(
                "file", f"{file[:80]!r} is not an output file name (plain names such as video.mp4)"
            )
        job = visible(await run_in_threadpool(store.get, job_id), request)
        name = file
        if name is None:
            name = video_name(job)
            if name is None:
                if job.state != JobState.DONE:
                    raise NotReadyError(
                        "id", f"job {job_id} is {job.state.value}; the video is ready when it is done"
                    )
                raise OutputNotFoundError(
                    job_id, "", list(job.outputs), reason=f"job {job_id} has no video output"
                )
        path = await run_in_threadpool(store.output_path, job_id, name)
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, filename=f"{job_id}_{name}")

    @protected.get("/info", summary="Service configuration")
    async def info() -> dict[str, Any]:
        engine = _engine_status(service_info)
        return {
            "success": True,
            "world_size": service_info.world_size,
            "ulysses_size": service_info.ulysses_size,
            "ring_size": service_info.ring_size,
            "fsdp": {"dit": service_info.dit_fsdp, "t5": service_info.t5_fsdp},
            "model": service_info.model,
            "default_preset": service_info.default_preset,
            # Per preset: offered here, whether it runs with the LoRA, and its settings on this service.
            "presets": preset_catalog(service_info.lora),
            "resolution": service_info.resolution,
            "versions": _plain(service_info.versions),
            "weights": _plain(service_info.weights),
            "engine": None if engine is None else _plain(engine),
            "limits": {**_plain(limits), **_media_limits(limits)},
            "preview_limits": None if previews is None else _plain(previews.limits),
            "max_queue": store.max_queue,
            "retention_days": store.retention_days,
            "auth_required": auth_token is not None,
            "jobs_shared": share_jobs,
            **{str(k): _plain(v) for k, v in service_info.extra.items()},
        }

    @protected.get(
        "/metrics",
        summary="Prometheus metrics: jobs by state, queue, engine liveness, stage timings",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics() -> Response:
        text = await run_in_threadpool(
            render_metrics, store, service_info.engine_status, service_info.world_size
        )
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @protected.get("/voices", summary="Voices for the script's speakers")
    async def voices() -> dict[str, Any]:
        installed = limits.installed_voices
        return {
            "success": True,
            "voices": [
                {"id": vid, **_plain(v), "installed": installed is None or vid in installed}
                for vid, v in VOICES.items()
            ],
        }

    @protected.post(
        "/tts/preview",
        summary="Speak a sample line with one voice (WAV)",
        response_class=Response,
        responses={200: {"content": {"audio/wav": {}}}},
    )
    async def tts_preview_route(body: TtsPreviewRequest, request: Request) -> Response:
        voice = check_voice("voice", body.voice, None, limits.installed_voices)
        text = check_text("text", body.text, limits.max_preview_chars, required=False)
        if text is not None:
            _check_speakable(text)  # what a script refuses (emoji only, no words) a preview refuses too
        if previews is None:
            raise UnavailableError(
                "voice preview needs the TTS engine, which is not attached to this API process"
            )
        # The preview pool's own threads speak; this route only awaits, so no API thread is held.
        client = (request.client.host if request.client else "unknown") + "/" + str(principal_of(request))
        wav = await previews.speak_async(voice, text, client)  # bad text: an InputError, answered 400
        return Response(content=wav, media_type="audio/wav")

    public = APIRouter(route_class=JsonErrorRoute)

    @public.head("/health", include_in_schema=False)
    @public.get(
        "/health",
        summary="Engine alive, heartbeat age, store writable (503 when unhealthy)",
    )
    async def health() -> JSONResponse:
        problems: list[str] = []
        engine_view: dict[str, Any] = {"attached": service_info.engine_status is not None}
        try:
            engine = _engine_status(service_info)
        except Exception as exc:  # a broken status callable is itself an unhealthy engine
            logger.warning("engine_status failed: %r", exc)
            engine = None
            problems.append(f"engine status unavailable: {exc}")
        if service_info.engine_status is None:
            problems.append("no engine attached")
        elif engine is not None:
            age = None if engine.last_heartbeat is None else max(0.0, time.time() - engine.last_heartbeat)
            engine_view.update(alive=engine.alive, last_heartbeat_age_s=None if age is None else round(age, 3),
                               message=engine.message)  # fmt: skip
            if engine.groups:  # every replica group: where it runs and whether it serves
                keys = ("group", "node", "devices", "state", "heartbeat_age_s")
                engine_view["groups"] = [{k: g.get(k) for k in keys} for g in engine.groups]
            if not engine.alive:
                problems.append(f"engine not alive{': ' + engine.message if engine.message else ''}")
            beat_problem = engine.heartbeat_problem(service_info.heartbeat_timeout_s, time.time())
            if beat_problem is not None:
                problems.append(beat_problem)
        writable, store_msg = await run_in_threadpool(store.check_writable)
        if not writable:
            problems.append(store_msg)
        ok = not problems
        body = {
            "success": ok,
            "status": "ok" if ok else "unhealthy",
            "engine": engine_view,
            "store": {"writable": writable, "message": store_msg},
            "problems": problems,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    router.include_router(public)
    router.include_router(submit_router)
    router.include_router(protected)

    # Last: any other /api path answers 404 in the JSON shape, also when Gradio is mounted at "/"
    # (its mount would otherwise catch the path and answer in its own format).
    @router.api_route(
        "/{rest:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        include_in_schema=False,
    )
    async def unknown_endpoint(rest: str, request: Request) -> Response:
        raise NoSuchEndpoint(f"no such API endpoint: {request.method} {request.url.path}")

    return router


MAX_OFFSET = 2**62  # GET /api/jobs?offset=: SQLite integers are 64-bit


def _check_speakable(text: str) -> None:
    """Preview text must be what a one-speaker script accepts: words, not only emoji or symbols."""
    try:
        parse_script(text)
    except ValueError as exc:
        message = getattr(exc, "message", str(exc))
        raise RequestError("text", message) from None


def _media_limits(limits: Limits) -> dict[str, Any]:
    """Limits enforced below ``Limits``: image pixels and sides, the audio decode budget, JSON bounds."""

    return {
        "max_image_pixels": MAX_PIXELS,
        "min_image_short_side": MIN_SHORT_SIDE,
        "max_image_aspect": MAX_ASPECT,
        "max_audio_samples_per_second": MAX_VALUES_PER_SECOND,
        "max_audio_decoded_samples": value_budget(limits.max_audio_seconds),
        "max_json_depth": MAX_JSON_DEPTH,
        "max_integer_digits": MAX_INT_DIGITS,
        "max_list_offset": MAX_OFFSET,
    }


def _engine_status(info: ServiceInfo) -> EngineStatus | None:
    if info.engine_status is None:
        return None
    return info.engine_status()


# ---------------------------------------------------------------------------------------------- app


def job_file_guard(store: JobStore, share_jobs: bool) -> Callable[[str | None, str], bool]:
    """For the gate: may ``principal`` fetch ``target`` through Gradio's file route? Outside the outputs
    folder Gradio's own rules apply (its cache, allowed paths). Inside it only a job's folder qualifies
    (no hidden folders) and only for a credential that may see the job; the store's files, other
    folders and other credentials' jobs are refused. The UI's example pictures live in their own folder."""
    outputs = store.outputs_dir.resolve()

    def guard(principal: str | None, target: str) -> bool:
        try:
            path = Path(target).resolve()
        except (OSError, ValueError):
            return False
        if not path.is_relative_to(outputs):
            return True
        parts = path.relative_to(outputs).parts
        if len(parts) >= 2 and parts[0] == _EXAMPLES_DIRNAME:
            return True
        if len(parts) < 2 or not JOB_ID_RE.fullmatch(parts[0]) or any(p.startswith(".") for p in parts[1:]):
            return False
        try:
            job = store.get(parts[0])
        except (JobNotFoundError, ValueError):
            return False
        return share_jobs or job.visible_to(principal)

    return guard


_EXAMPLES_DIRNAME = "ui-examples"  # service.ui.examples.EXAMPLES_DIRNAME (the API does not import the UI)


def install_error_handlers(app: FastAPI) -> None:
    """JSON error shape for requests that match no route under /api (404/405) and for anything that
    escapes a route; other paths keep FastAPI's defaults (Gradio may be mounted there)."""

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if request.url.path.startswith("/api"):
            if exc.status_code == 404:
                return _error_response(
                    404, None, f"no such API endpoint: {request.method} {request.url.path}"
                )
            return error_response_for(exc, request)
        return await http_exception_handler(request, exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        return error_response_for(exc, request)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        return error_response_for(exc, request)

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


def create_app(
    store: JobStore,
    service_info: ServiceInfo,
    *,
    auth_token: str | None = None,
    limits: Limits = Limits(),
    tts_preview: TtsPreview | PreviewPool | None = None,
    users: Mapping[str, str] | None = None,
    share_jobs: bool = False,
    body_timeout_s: float = 30.0,
    title: str = "Dialogue video service",
    version: str = "0.1.0",
) -> FastAPI:
    """FastAPI app with the /api routes, /openapi.json and /docs; mount Gradio on it afterwards with
    ``gr.mount_gradio_app(app, blocks, path="/")``.

    The whole app (also what is mounted later) sits behind one ``service.security.Gate``: with
    ``auth_token`` and/or ``users`` (``--auth``) every route but ``GET/HEAD /api/health`` needs one of
    them, failed logins are throttled, request bodies are capped at ``limits.max_request_bytes`` and
    must keep arriving (``body_timeout_s``), and Gradio's file route serves a job's files only to the
    credential that may see the job (never the store's own files)."""
    app = FastAPI(
        title=title,
        version=version,
        description="Two-person dialogue talking videos (MultiTalk). Errors: "
        '{"success": false, "error": {"field", "message"}}.',
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.include_router(
        create_router(
            store,
            service_info,
            auth_token=auth_token,
            limits=limits,
            tts_preview=tts_preview,
            share_jobs=share_jobs,
        )  # fmt: skip
    )
    install_error_handlers(app)
    gate = GateConfig(auth_token, dict(users or {}), max_body_bytes=limits.max_request_bytes,
                      body_timeout_s=body_timeout_s)  # fmt: skip
    app.add_middleware(Gate, config=gate, file_guard=job_file_guard(store, share_jobs))
    app.state.store = store
    app.state.service_info = service_info
    return app
