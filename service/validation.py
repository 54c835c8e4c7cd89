"""A generate request as it arrives: a multipart form or a JSON body -> ``JobInput``.

- ``request_from_form(text, files, limits)``: form fields (text) and uploads (bytes), as the REST form
  and the Gradio UI send them.
- ``request_from_json(body, limits)``: upstream MultiTalk's job JSON or ours, read by the one job-JSON
  parser (``inference.render.spec.parse_job_json``), files as base64 data URLs. The service never reads
  files named by a client and never fetches from the network.

What a request may contain (its shape, upload sizes) is checked here; what it means (images, audio,
script, voices, settings, the number of people) is checked by ``inference.render.intake.build_job``,
shared with the CLI. Every problem is an ``InputError`` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from common.bounded import loads as bounded_json
from common.errors import InputError
from inference.render.intake import Limits, audio_extension
from inference.render.spec import JobInput, parse_job_json

logger = logging.getLogger(__name__)

__all__ = [
    "FORM_FILE_FIELDS",
    "FORM_TEXT_FIELDS",
    "Limits",
    "PayloadTooLargeError",
    "RequestError",
    "audio_extension",
    "check_form_field",
    "decode_data_url",
    "parse_json_field",
    "request_from_form",
    "request_from_json",
]

_DATA_URL_RE = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,"
)


class RequestError(InputError):
    """A request the service cannot take as sent (its shape or transport); ``field`` names the input."""


class PayloadTooLargeError(RequestError):
    """An upload or a request body over its size limit (HTTP 413)."""


# ---------------------------------------------------------------------------------------------- form

FORM_FILE_FIELDS = ("left_image", "right_image", "scene_image", "image", "audio1", "audio2")
FORM_TEXT_FIELDS = (
    "boxes",
    "script",
    "voice1",
    "voice2",
    "prompt",
    "preset",
    "settings",
    "audio_mode",
    "layout",
    "backdrop",
    "aspect",
)


def check_form_field(key: str, is_file: bool) -> None:
    """A form field name that exists, sent as the kind it is (a file upload or a text value)."""
    if key in FORM_FILE_FIELDS and not is_file:
        raise RequestError(key, "expected a file upload, got a text value")
    if key in FORM_TEXT_FIELDS and is_file:
        raise RequestError(key, "expected a text value, got a file upload")
    if key not in FORM_FILE_FIELDS and key not in FORM_TEXT_FIELDS:
        allowed = ", ".join((*FORM_FILE_FIELDS, *FORM_TEXT_FIELDS))
        raise RequestError(key, f"unknown form field; allowed: {allowed}")


def check_form_items(items: Iterable[tuple[str, bool]]) -> None:
    """Every ``(name, is_file)`` of a form: known names, the right kind, each name once."""
    seen: set[str] = set()
    for key, is_file in items:
        check_form_field(key, is_file)
        if key in seen:
            raise RequestError(key, "given more than once")
        seen.add(key)


def parse_json_field(field: str, text: str | None, expected: type | tuple[type, ...], what: str) -> Any:
    """Decode a JSON-valued form field (``settings``); None/blank stays None."""
    if text is None or not text.strip():
        return None
    try:
        value = bounded_json(text, field)  # depth and number bounds: no RecursionError/OverflowError later
    except InputError as exc:
        raise RequestError(field, f"{exc.message}; expected {what}") from None
    if not isinstance(value, expected):
        raise RequestError(field, f"expected {what}, got JSON {type(value).__name__}")
    return value


def request_from_form(text: Mapping[str, Any], files: Mapping[str, bytes], limits: Limits) -> JobInput:
    """Form fields (``FORM_TEXT_FIELDS`` -> str) and uploads (``FORM_FILE_FIELDS`` -> bytes) to a
    JobInput; shared by the REST form and the Gradio UI. Blank text counts as not given."""
    for key in text:
        check_form_field(key, is_file=False)
    for key, data in files.items():
        check_form_field(key, is_file=True)
        if not isinstance(data, bytes | bytearray):
            raise RequestError(key, f"expected file bytes, got {type(data).__name__}")
        if len(data) > limits.max_upload_bytes:
            raise PayloadTooLargeError(
                key, f"file is larger than the limit of {limits.max_upload_bytes} bytes"
            )
        if not data:
            raise RequestError(key, "the uploaded file is empty")

    def value(key: str) -> str | None:
        v = text.get(key)
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        if not isinstance(v, str):
            raise RequestError(key, f"expected text, got {type(v).__name__}")
        return v

    def upload(key: str) -> bytes | None:
        data = files.get(key)
        return None if data is None else bytes(data)

    return JobInput(
        left_image=upload("left_image"),
        right_image=upload("right_image"),
        scene_image=upload("scene_image"),
        image=upload("image"),
        boxes=value("boxes"),
        script=value("script"),
        voice1=value("voice1"),
        voice2=value("voice2"),
        prompt=value("prompt"),
        preset=value("preset"),
        settings=parse_json_field("settings", value("settings"), dict, 'an object such as {"steps": 20}'),
        audio1=upload("audio1"),
        audio2=upload("audio2"),
        audio_mode=value("audio_mode"),
        layout=value("layout"),
        backdrop=value("backdrop"),
        aspect=value("aspect"),
        source="form",
    )


# ---------------------------------------------------------------------------------------------- JSON


def decode_data_url(field: str, value: Any, limits: Limits) -> bytes:
    """``data:<mime>;base64,<payload>`` -> bytes. Server paths and URLs are refused: the service never
    reads files named by a client and never fetches from the network."""
    if not isinstance(value, str):
        raise RequestError(field, f"expected a base64 data URL string, got {type(value).__name__}")
    m = _DATA_URL_RE.match(value)
    if m is None:
        if re.match(r"^[a-z][a-z0-9+.-]*://", value, re.IGNORECASE):
            raise RequestError(
                field,
                "URLs are not fetched (the service works offline); send the file as a "
                "base64 data URL: data:<mime>;base64,<bytes>",
            )
        raise RequestError(
            field,
            "server file paths are not accepted; send the file content as a base64 data "
            "URL: data:<mime>;base64,<bytes>",
        )
    if not m.group("b64"):
        raise RequestError(field, "data URL must be base64-encoded (data:<mime>;base64,...)")
    payload = value[m.end() :]
    # 4 base64 characters carry 3 bytes: refuse before decoding anything too large.
    if len(payload) // 4 * 3 > limits.max_upload_bytes + 3:
        raise PayloadTooLargeError(field, f"file is larger than the limit of {limits.max_upload_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "data URL payload is not valid base64") from None
    if not data:
        raise RequestError(field, "the file is empty")
    if len(data) > limits.max_upload_bytes:
        raise PayloadTooLargeError(field, f"file is larger than the limit of {limits.max_upload_bytes} bytes")
    return data


def request_from_json(body: Any, limits: Limits) -> JobInput:
    """A job JSON body (upstream MultiTalk's keys or ours) with files as base64 data URLs -> JobInput."""
    return parse_job_json(body, lambda field, value: decode_data_url(field, value, limits), source="json")
