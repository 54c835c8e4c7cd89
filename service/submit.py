"""The one submit path of the service, shared by REST and the UI: request -> ``JobSpec`` -> store.

    submit_form(store, form, files, *, limits=Limits(), owner=None) -> Job
        ``form``: text fields by REST form name (script, voice1, voice2, prompt, preset, settings,
        layout, backdrop, aspect, boxes, audio_mode); a dict/list value (e.g. settings) is sent as the
        JSON text the REST form would carry; None means not given.
        ``files``: uploads by form name (left_image, right_image, scene_image, image, audio1, audio2).
    submit_input(store, job_input, limits, *, owner=None, idempotency_key=None) -> Job
        a JobInput already decoded from its transport (REST's multipart form or JSON body); a repeated
        ``idempotency_key`` from the same owner returns the earlier job instead of storing a second one.

Both check everything before anything is stored (``inference.render.intake.build_job``) and raise
``InputError`` (``field`` + ``message``) for bad input, ``QueueFullError`` / ``DiskFullError`` from the
store; ``service.errors.answer_for`` turns any of them into what the client is told.

One person: ``image`` (or ``left_image`` / ``scene_image`` alone) with ``audio1`` alone, or with a
script whose lines are all speaker 1's and ``voice1``; any second-person input (``right_image``,
``boxes``, ``audio2``, ``voice2``, a line for speaker 2) makes it a two-person job.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from common.errors import InputError
from inference.render.intake import Limits, build_job
from inference.render.spec import JobInput
from service.jobs import Job, JobStore
from service.validation import request_from_form

logger = logging.getLogger(__name__)

IDEMPOTENCY_KEY_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

__all__ = ["submit_form", "submit_input"]


def submit_input(
    store: JobStore,
    job_input: JobInput,
    limits: Limits,
    *,
    owner: str | None = None,
    idempotency_key: str | None = None,
) -> Job:
    """Check ``job_input`` and store it as a queued job (``owner``: the submitting credential). With an
    ``idempotency_key`` (REST's ``Idempotency-Key`` header) a retry of the same submission returns the job
    the first one stored."""
    if idempotency_key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(idempotency_key):
        raise InputError(
            "Idempotency-Key", "must be 1 to 128 characters of letters, digits and - _ . : (e.g. a UUID)"
        )
    submission = build_job(job_input, limits)
    job = store.submit(
        submission.spec, submission.settings, submission.files, owner=owner, idempotency_key=idempotency_key
    )
    logger.info("job %s accepted: %d person(s), %s, %s", job.id, submission.spec.people,
                submission.spec.layout, submission.spec.audio_source)  # fmt: skip
    return job


def submit_form(
    store: JobStore,
    form: Mapping[str, Any],
    files: Mapping[str, bytes],
    *,
    limits: Limits = Limits(),
    owner: str | None = None,
) -> Job:
    """One form submission (UI or REST form), checked and stored (``owner``: the submitting credential);
    see the module docstring."""
    text = {
        key: json.dumps(value) if isinstance(value, dict | list) else value
        for key, value in form.items()
        if value is not None
    }
    return submit_input(store, request_from_form(text, files, limits), limits, owner=owner)
