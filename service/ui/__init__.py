"""Gradio UI of the dialogue video service: one page to set up, submit, follow, find again and re-run jobs.

Inputs on the left (who is in the picture, what they say, scene description and quality), Generate,
progress and the result on the right, a live queue, a gallery of finished videos and the history below.
Every job can load its settings back into the form or render again with a new seed.

``build_ui(store, submit=..., tts_preview=..., info=...)`` returns a ``gr.Blocks``; the entry point mounts
it on the REST app (``service.api.create_app``) with :func:`mount_ui`. Every handler works on the job store
and on pure-Python validators only; none touches torch.distributed. The handlers live on
:class:`UiHandlers` so tests can call them without a browser.

Modules: ``layout`` (components by page section), ``events`` (wiring), ``handlers`` (submit, load
settings, re-run, examples), ``previews`` (script, scene, recordings, estimate, voice), ``jobs_view``
(status, downloads, queue, gallery, history), ``form`` (form values <-> jobs), ``uploads`` (checks where
files enter), ``examples``, ``formatting``, ``style``, ``app`` (build and mount).

The current job id lives in the browser (``gr.BrowserState`` in localStorage, plus ``?job=<id>`` in the
address bar): reloading the page, reopening the browser or restarting the service reattaches to it.
"""

from service.ui.app import build_ui, mount_ui
from service.ui.examples import EXAMPLES, FORM_EXAMPLES
from service.ui.form import ADVANCED_FIELDS, FORM_FIELDS, preset_summary, submit_form, voice_choices
from service.ui.handlers import UiHandlers
from service.ui.style import UI_CSS

__all__ = [
    "ADVANCED_FIELDS",
    "EXAMPLES",
    "FORM_EXAMPLES",
    "FORM_FIELDS",
    "UI_CSS",
    "UiHandlers",
    "build_ui",
    "mount_ui",
    "preset_summary",
    "submit_form",
    "voice_choices",
]
