"""The page's event handlers as plain methods (store + validators only; callable from tests without a
browser). :class:`UiHandlers` joins the previews (``previews.py``) and the job views (``jobs_view.py``)
and adds submission, "load settings", re-runs and the examples."""

from __future__ import annotations

import hashlib
import html
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from service.jobs import DiskFullError, JobNotFoundError, JobStore, QueueFullError
from service.security import principal_of
from service.ui import examples
from service.ui.form import (
    ADVANCED_FIELDS,
    advanced_values,
    convert_length,
    form_from_values,
    preset_change,
    preset_settings,
    rerun_inputs,
    settings_overrides,
    values_from_job,
)
from service.ui.formatting import error_md, field_label, plural, short_id
from service.ui.jobs_view import JobHandlers
from service.ui.previews import PreviewHandlers, TtsPreviewFn
from service.ui.uploads import AudioLengths
from service.validation import Limits

logger = logging.getLogger(__name__)

SubmitFn = Callable[..., str]
"""``submit(form, files) -> job id``: form fields as the REST multipart form (``script``, ``voice1``,
``voice2``, ``prompt``, ``preset``, ``settings`` (dict or JSON text), ``layout``, ``backdrop``, ``aspect``,
``boxes``, ``audio_mode``), files by form name (``left_image``, ``right_image``, ``scene_image``, ``image``,
``audio1``, ``audio2``) -> bytes. Called as ``submit(form, files, owner=<credential>)`` when the page's
caller has one (a gated service: ``--api_token`` / ``--auth``): the job belongs to that credential.
Raises InputError (``field``, ``message``) for bad input."""
InfoFn = Callable[[], Mapping[str, Any]]

# The same form from the same browser within this many seconds is the same submission (a double click).
DEDUPE_WINDOW_S = 10.0
_MAX_SESSIONS = 256


class UiHandlers(PreviewHandlers, JobHandlers):
    """The UI's event handlers (store + validators only; callable from tests)."""

    def __init__(
        self,
        store: JobStore,
        *,
        submit: SubmitFn,
        tts_preview: TtsPreviewFn | None,
        info: InfoFn,
        limits: Limits | None = None,
        share_jobs: bool = False,
    ) -> None:
        self.store = store
        self.share_jobs = share_jobs  # every credential sees every job (--share_jobs), as in REST
        self._submit = submit
        self._tts_preview = tts_preview
        self._info = info
        # The REST limits: the audio checks apply the same size/length rules, the presets the same defaults.
        self.limits = Limits() if limits is None else limits
        self.job_defaults = dict(self.limits.job_defaults or {})
        self.lora = self.limits.lora  # which presets this service offers and what they run (its LoRA mode)
        self.audio = AudioLengths(self.limits)
        self.examples_dir = store.outputs_dir / examples.EXAMPLES_DIRNAME
        self._lock = threading.Lock()
        self._recent: dict[str, tuple[str, float, str]] = {}  # session -> (fingerprint, time, job id)
        self._session_locks: dict[str, threading.Lock] = {}

    # -- who is asking

    def viewer(self, request: Any) -> str | None:
        """Whose jobs a page request sees: its credential (:func:`request_principal`), None (every job)
        on an open service or with ``share_jobs``."""
        return None if self.share_jobs else request_principal(request)

    # -- service info

    def info(self) -> dict[str, Any]:
        try:
            return dict(self._info())
        except Exception as exc:  # the page must still render when the info callable fails
            logger.warning("service info unavailable: %r", exc)
            return {"error": str(exc)}

    def header(self) -> str:
        """One line about the service: model, devices, engine state, queue."""
        info = self.info()
        parts: list[str] = []
        if "error" in info:
            parts.append(f"service info unavailable ({html.escape(str(info['error']))})")
        if info.get("model"):
            parts.append(f"model **{info['model']}**")
        world = info.get("world_size")
        if world:
            sp = info.get("ulysses_size")
            parts.append(
                plural(int(world), "process", "processes") + (f" (Ulysses {sp})" if sp and sp > 1 else "")
            )
        engine = info.get("engine")
        if isinstance(engine, Mapping):
            alive = engine.get("alive")
            parts.append(
                "engine " + ("running" if alive else f"not running {engine.get('message') or ''}".strip())
            )
        elif engine is None and "engine" in info:
            parts.append("no engine attached (jobs wait in the queue)")
        elif isinstance(engine, str):
            parts.append(html.escape(engine))
        groups = info.get("groups")  # replica groups (--replicas): each one's state and current job
        if isinstance(groups, list) and len(groups) > 1:
            parts.append(", ".join(_group_word(g) for g in groups if isinstance(g, Mapping)))
        try:
            queued, running = self.store.count(state="queued"), len(self.store.active())
            parts.append(f"{plural(queued, 'job')} waiting, {running} running")
        except Exception as exc:
            parts.append(f"job store unreadable: {exc}")
        return " · ".join(parts)

    # -- presets

    def preset_values(self, preset: str, length_unit: str = "seconds") -> tuple[Any, ...]:
        """Advanced-settings values of a preset (under the service defaults), in ADVANCED_FIELDS order."""
        values = advanced_values(preset_settings(preset, self.job_defaults, self.lora), length_unit)
        return tuple(values[k] for k in ADVANCED_FIELDS)

    def settings_overrides(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return settings_overrides(values, self.job_defaults, self.lora)

    def convert_length(self, value: float | None, old_unit: str, new_unit: str) -> float | None:
        return convert_length(value, old_unit, new_unit)

    def preset_change(
        self, preset: str, length_unit: str, current: Mapping[str, Any], touched: Any
    ) -> tuple[dict[str, Any], str]:
        return preset_change(preset, length_unit, current, set(touched or ()), self.job_defaults, self.lora)

    # -- submit

    def generate(
        self, values: Mapping[str, Any], session: str | None = None, owner: str | None = None
    ) -> tuple[str | None, str]:
        """Validate and submit one job from the form values (keys: FORM_FIELDS) for ``owner`` (the
        caller's credential, :func:`request_principal`; None on an open service).

        The same form sent again from the same browser session within DEDUPE_WINDOW_S (a double click)
        returns the job of the first send instead of making a second one. Returns (job id or None, Markdown).
        """
        try:
            form, files = form_from_values(values, self.job_defaults, self.lora)
        except OSError as exc:
            return None, f"⚠️ could not read an uploaded file: {exc}"
        except ValueError as exc:
            return None, error_md(exc)
        key = _fingerprint(form, files)
        with self._session_lock(session):
            if session is not None:
                seen = self._recent.get(session)
                if seen is not None and seen[0] == key and time.monotonic() - seen[1] < DEDUPE_WINDOW_S:
                    first = seen[2]
                    return first, f"Already submitted as job `{short_id(first)}`; this is the same request."
            try:
                job_id = self._send(form, files, owner)
            except (ValueError, QueueFullError, DiskFullError) as exc:
                return None, error_md(exc)
            if session is not None:
                self._recent[session] = (key, time.monotonic(), job_id)
        job = self.store.get(job_id)
        where = f"position {job.queue_position} in the queue" if job.queue_position else job.state.value
        return job_id, f"Submitted job `{short_id(job_id)}` ({where})."

    def _session_lock(self, session: str | None) -> threading.Lock:
        if session is None:
            return threading.Lock()
        with self._lock:
            if session not in self._session_locks and len(self._session_locks) >= _MAX_SESSIONS:
                oldest = next(iter(self._session_locks))
                self._session_locks.pop(oldest)
                self._recent.pop(oldest, None)
            return self._session_locks.setdefault(session, threading.Lock())

    def _send(self, form: dict[str, Any], files: dict[str, bytes], owner: str | None) -> str:
        return self._submit(form, files) if owner is None else self._submit(form, files, owner=owner)

    def rerun(
        self,
        job_id: str | None,
        *,
        new_seed: bool = False,
        viewer: str | None = None,
        owner: str | None = None,
    ) -> tuple[str | None, str]:
        """Submit a new job (``owner``'s) with the same inputs (files from ``outputs/<id>/inputs/``) and
        settings as ``viewer``'s job ``job_id``; with a fresh random seed when ``new_seed``."""
        if not job_id:
            return None, "Choose a job first."
        try:
            job = self.visible_job(job_id, viewer)
            form, files = rerun_inputs(self.store, job, new_seed=new_seed)
            new_id = self._send(form, files, owner)
        except OSError as exc:
            return None, f"⚠️ the inputs of job {short_id(job_id)} are no longer on disk ({exc})"
        except (ValueError, QueueFullError, DiskFullError, JobNotFoundError) as exc:
            return None, error_md(exc)
        seed = self.store.get(new_id).settings.get("seed")
        how = f"with a new seed ({seed})" if new_seed else f"with the same seed ({seed})"
        return new_id, f"Re-submitted job `{short_id(job_id)}` {how} as `{short_id(new_id)}`."

    # -- settings that come back

    def load_settings(
        self, job_id: str | None, viewer: str | None = None
    ) -> tuple[dict[str, Any] | None, list[str], str]:
        """A stored job's inputs and settings as form values: (values or None, the advanced fields that
        differ from its preset, a sentence saying what was loaded and what could not be)."""
        if not job_id:
            return None, [], "Choose a job first."
        try:
            job = self.visible_job(job_id, viewer)
            values, differ, missing = values_from_job(self.store, job, self.job_defaults, self.lora)
        except (ValueError, JobNotFoundError) as exc:
            return None, [], error_md(exc)
        text = (
            f"Loaded the settings of job `{short_id(job.id)}` (seed {values['seed']}: the same video again; "
            "set the seed to -1 or use New seed for another take)."
        )
        if missing:
            text += " ⚠️ No longer on disk: " + ", ".join(field_label(f) for f in missing) + " — upload again."
        return values, differ, text

    def example(self, index: int) -> tuple[dict[str, Any], list[str], str]:
        """Whole-form example ``index`` of ``examples.FORM_EXAMPLES`` as form values."""
        ex = examples.FORM_EXAMPLES[index]
        values = examples.example_values(
            ex,
            self.examples_dir,
            installed_voices=self.limits.installed_voices,
            job_defaults=self.job_defaults,
            lora=self.lora,
        )
        return values, [], f"Example “{ex.label}” loaded: every field is filled; press Generate."


def request_principal(request: Any) -> str | None:
    """The credential of a page request (a ``gr.Request``): the one the app's gate accepted
    (``service.security.principal_of`` on the HTTP request Gradio hands over: ``"token"`` or
    ``"user:<name>"``), else Gradio's own login (``mount_ui(auth=...)``: ``request.username``) as
    ``"user:<name>"``; None on an open service or without a request (tests, scripts)."""
    if request is None:
        return None
    http = getattr(request, "request", None)
    principal = principal_of(http) if http is not None else None
    if principal is None and getattr(request, "username", None):
        principal = f"user:{request.username}"
    return principal


def _fingerprint(form: Mapping[str, Any], files: Mapping[str, bytes]) -> str:
    h = hashlib.sha256(json.dumps(form, sort_keys=True, default=str).encode())
    for name in sorted(files):
        h.update(name.encode())
        h.update(hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def _group_word(group: Mapping[str, Any]) -> str:
    """``group 1 busy (42%)`` / ``group 0 idle`` for the header."""
    state = html.escape(str(group.get("state", "?")))
    progress = group.get("progress")
    done = f" ({float(progress):.0f}%)" if state == "busy" and isinstance(progress, int | float) else ""
    return f"group {html.escape(str(group.get('group', '?')))} {state}{done}"
