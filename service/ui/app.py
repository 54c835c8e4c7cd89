"""The page as a ``gr.Blocks`` (:func:`build_ui`) and its mount on the REST app (:func:`mount_ui`)."""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

import gradio as gr

from service.jobs import JobStore
from service.ui.events import wire
from service.ui.form import ADVANCED_FIELDS, usable_preset
from service.ui.handlers import InfoFn, SubmitFn, UiHandlers
from service.ui.layout import TITLE, build_page
from service.ui.previews import TtsPreviewFn
from service.ui.style import UI_CSS
from service.validation import Limits

logger = logging.getLogger(__name__)

BROWSER_STORAGE_KEY = "dialogue_video_current_job"
PREFS_STORAGE_KEY = "dialogue_video_prefs"
SECRET_FILE = ".ui_browser_secret"


def browser_secret(store: JobStore) -> str:
    """A per-installation secret for gr.BrowserState, kept beside the outputs so that a restarted
    service can still read the job id the browser stored (gradio's default is random per process)."""
    path = store.outputs_dir / SECRET_FILE
    try:
        value = path.read_text().strip()
        if len(value) >= 16:
            return value
    except OSError:
        pass
    value = secrets.token_hex(16)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
    except FileExistsError:  # another process won the race: use its secret
        return path.read_text().strip() or value
    except OSError as exc:
        logger.warning(
            "could not keep the UI browser secret in %s (%s); a restart forgets browser jobs", path, exc
        )
    return value


def build_ui(
    store: JobStore,
    *,
    submit: SubmitFn,
    tts_preview: TtsPreviewFn | None,
    info: InfoFn,
    limits: Limits | None = None,
    share_jobs: bool = False,
) -> gr.Blocks:
    """The whole page as a ``gr.Blocks`` (not launched). Mount it with :func:`mount_ui` (CSS, allowed
    paths, auth) or ``blocks.launch(css=UI_CSS, allowed_paths=[str(store.outputs_dir)], ...)``.

    ``submit(form, files) -> job id`` is the REST API's validation + store path;
    ``tts_preview(voice, text|None)`` speaks a sample or a line (None: the preview says no TTS engine is
    attached); ``info()`` describes the service (keys read: model, world_size, ulysses_size, engine,
    default_preset, step_time_s (seconds per model pass per clip, a number or {480: s, 720: s}),
    clip_overhead_s); ``limits`` (``service.validation.Limits``, default the REST defaults) sizes the upload
    checks and carries the service's job defaults and LoRA mode (which presets are offered, what they
    run): pass the ones ``submit`` uses. Behind the app's gate (``--api_token``, ``--auth``) each
    credential sees its own jobs, and ``submit`` gets ``owner=`` it, unless ``share_jobs`` (as REST).
    """
    h = UiHandlers(
        store, submit=submit, tts_preview=tts_preview, info=info, limits=limits, share_jobs=share_jobs
    )
    # The service's default preset, or this LoRA mode's default when the page was told one it does not offer.
    default_preset = usable_preset(str(h.info().get("default_preset") or ""), h.lora)
    adv = dict(zip(ADVANCED_FIELDS, h.preset_values(default_preset), strict=True))
    secret = browser_secret(store)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        page = build_page(h, default_preset, adv)
        # The current job id (localStorage + ?job=) and the last chosen voices, remembered per browser.
        page.c["job_state"] = gr.BrowserState("", storage_key=BROWSER_STORAGE_KEY, secret=secret)
        page.c["prefs_state"] = gr.BrowserState({}, storage_key=PREFS_STORAGE_KEY, secret=secret)
        wire(page, h, default_preset, adv, demo)
    demo.dialogue_handlers = h  # type: ignore[attr-defined]  # for tests and the entry point's diagnostics
    return demo


def mount_ui(
    app: Any,
    blocks: gr.Blocks,
    store: JobStore,
    *,
    path: str = "/",
    auth: tuple[str, str] | list[tuple[str, str]] | None = None,
    root_path: str | None = None,
) -> Any:
    """Mount the UI on the REST app (``service.api.create_app``) with the page CSS, the outputs folder as
    the only extra allowed path (its browser secret blocked), optional basic auth (gradio's login page)
    and no SSR. The footer's "Use via API" leads to the REST API's ``/docs``. Returns the app."""
    return gr.mount_gradio_app(
        app,
        blocks,
        path=path,
        auth=auth,
        root_path=root_path,
        allowed_paths=[str(store.outputs_dir)],
        blocked_paths=[str(store.outputs_dir / SECRET_FILE)],
        css=UI_CSS,
        footer_links=[],
        run_history=False,
        ssr_mode=False,
        show_error=True,
    )
