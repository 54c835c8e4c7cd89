"""Wiring: which event of which component calls which handler, with what it updates. The handlers are
:class:`service.ui.handlers.UiHandlers` methods; this module only turns their results into Gradio updates."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import gradio as gr

from service.ui.examples import EXAMPLES
from service.ui.form import (
    ADVANCED_FIELDS,
    FORM_FIELDS,
    SOURCE_PORTRAITS,
    SOURCE_SCENE,
    SOURCE_SINGLE,
    SPEECH_AUDIO,
    SPEECH_SCRIPT,
    voice_choices,
)
from service.ui.handlers import UiHandlers, request_principal
from service.ui.layout import Page
from service.ui.style import DISABLE_GENERATE_JS, JOB_URL_JS, SHOW_STATUS_JS
from service.ui.uploads import refused_upload

POLL_INTERVAL_S = 1.0  # the job on screen, while it runs
PANELS_INTERVAL_S = 2.0  # queue, gallery and history (sent only when something changed)
QUIET: dict[str, Any] = {"show_progress": "hidden", "queue": False}
# Events that set a gr.State with a .change listener stay queued: gradio reports State changes
# (which fire those listeners) only from queued events, not from queue=False ones.
QUEUED_QUIET: dict[str, Any] = {"show_progress": "hidden"}


def _messages(p: Page) -> list[Any]:
    """The messages a new form makes untrue (the first one says what was loaded)."""
    return [p.form_msg, p.left_msg, p.right_msg, p.scene_msg, p.single_msg, p.preview_msg, p.preset_note]


def _fill_targets(p: Page) -> list[Any]:
    """What "load settings" and the examples set: every form value, the two tab groups, the page's
    notion of touched settings and length unit, and the messages."""
    return [
        *(p.form[k] for k in FORM_FIELDS),
        p.people_tabs,
        p.speech_tabs,
        p.touched,
        p.unit_state,
        *_messages(p),
    ]


_N_MESSAGES = 7


def _fill(
    values: Mapping[str, Any] | None, touched: Sequence[str], message: str, voices: set[str]
) -> list[Any]:
    if values is None:
        return [gr.skip()] * (len(FORM_FIELDS) + 4) + [message] + [gr.skip()] * (_N_MESSAGES - 1)
    out: list[Any] = []
    gone: list[str] = []
    for key in FORM_FIELDS:
        value = values.get(key)
        if key in ("voice1", "voice2") and value not in voices:
            if value is not None:
                gone.append(str(value))
            out.append(gr.skip())  # a voice this service has not installed is not in the list
        elif key == "backdrop":  # shown with its layout in the same update
            out.append(gr.Dropdown(value=value, visible=values.get("layout") == "backdrop"))
        else:
            out.append(value)
    if gone and values.get("speech") != SPEECH_AUDIO:
        message += f" ⚠️ Voice {', '.join(gone)} is not installed here: the current choice stays."
    source = (
        values.get("source") if values.get("source") in (SOURCE_SCENE, SOURCE_SINGLE) else SOURCE_PORTRAITS
    )
    speech = SPEECH_AUDIO if values.get("speech") == SPEECH_AUDIO else SPEECH_SCRIPT
    out += [gr.Tabs(selected=source), gr.Tabs(selected=speech), list(touched), "seconds"]
    return out + [message] + [""] * (_N_MESSAGES - 1)


def wire(p: Page, h: UiHandlers, default_preset: str, adv: dict[str, Any], demo: gr.Blocks) -> None:
    """Attach every event of the page (called inside the ``gr.Blocks`` context)."""
    voices = {v for _, v in voice_choices(h.limits.installed_voices)}
    form_inputs = [p.form[k] for k in FORM_FIELDS]
    fill_targets = _fill_targets(p)
    advanced = [p.form[k] for k in ADVANCED_FIELDS]
    timer = gr.Timer(POLL_INTERVAL_S, active=False)
    panels_timer = gr.Timer(PANELS_INTERVAL_S)
    session_key = gr.State("")  # one random key per page: the same form sent twice from it is one job
    job_state = p.c["job_state"]
    prefs_state = p.c["prefs_state"]

    # ---- uploads: our own sentence under each picture; a file that is no picture is taken out again
    for comp, msg, field in ((p.left, p.left_msg, "left_image"), (p.right, p.right_msg, "right_image"),
                             (p.scene, p.scene_msg, "scene_image"), (p.single, p.single_msg, "single_image")):  # fmt: skip

        def check(value: Any, f: str = field) -> tuple[Any, str]:
            kept, message = h.image_check(value, f)
            return (gr.skip() if kept else None), message

        comp.upload(check, comp, [comp, msg], show_progress="hidden")
        comp.clear(lambda: "", None, msg, **QUIET)

    refused_targets = {"left_image": p.left_msg, "right_image": p.right_msg, "scene_image": p.scene_msg,
                       "single_image": p.single_msg, "audio1": p.audio1_msg, "audio2": p.audio2_msg}  # fmt: skip

    def on_refused(evt: gr.EventData) -> list[Any]:
        field, message = refused_upload(getattr(evt, "_data", None))
        return [message if f == field else gr.skip() for f in refused_targets]

    p.footer.upload(on_refused, None, list(refused_targets.values()), **QUIET)

    scene_inputs = [
        p.source,
        p.left,
        p.right,
        p.scene,
        p.boxes,
        p.layout,
        p.backdrop,
        p.aspect,
        p.resolution,
        p.names,
        p.single,
    ]
    # One listener for every trigger: a form filled at once (an example, loaded settings) composes once.
    scene_triggers = [c.change for c in (p.left, p.right, p.scene, p.single, p.layout, p.backdrop, p.aspect,
                                         p.resolution, p.names, p.source)]  # fmt: skip
    gr.on([*scene_triggers, p.boxes.submit, p.boxes.blur], h.overlay, scene_inputs, [p.overlay_img, p.overlay_msg],
          trigger_mode="always_last", show_progress="minimal")  # fmt: skip
    p.layout.change(lambda v: gr.Dropdown(visible=v == "backdrop"), p.layout, p.backdrop, **QUIET)
    p.tab_portraits.select(lambda: SOURCE_PORTRAITS, None, p.source, **QUEUED_QUIET)
    p.tab_scene.select(lambda: SOURCE_SCENE, None, p.source, **QUEUED_QUIET)
    p.tab_single.select(lambda: SOURCE_SINGLE, None, p.source, **QUEUED_QUIET)

    def people_mode(source: str) -> tuple[Any, ...]:
        """One person: one voice, one recording; the second person's controls rest."""
        one = source == SOURCE_SINGLE
        info = "Not used: a one-person video speaks with voice 1." if one else None
        return (gr.Dropdown(interactive=not one, info=info), gr.Button(interactive=not one),
                gr.Audio(visible=not one), gr.Radio(visible=not one))  # fmt: skip

    p.source.change(people_mode, p.source, [p.voice2, p.preview2, p.audio2, p.audio_mode], **QUIET)

    # ---- script, voices
    p.script.change(
        h.parse_preview, p.script, [p.parse_html, p.names], trigger_mode="always_last", **QUEUED_QUIET
    )
    p.tab_script.select(lambda: SPEECH_SCRIPT, None, p.speech, **QUEUED_QUIET)
    p.tab_audio.select(lambda: SPEECH_AUDIO, None, p.speech, **QUEUED_QUIET)
    for name, button in zip(EXAMPLES, p.script_examples, strict=True):
        button.click(lambda text=EXAMPLES[name]: text, None, p.script, **QUIET)

    def name_labels(ns: list[str]) -> tuple[Any, Any]:
        return (gr.Dropdown(label=f"Voice of person 1 (left): {ns[0]}"),
                gr.Dropdown(label=f"Voice of person 2 (right): {ns[1]}"))  # fmt: skip

    p.names.change(name_labels, p.names, [p.voice1, p.voice2], **QUIET)
    for button, voice, speaker in ((p.preview1, p.voice1, 0), (p.preview2, p.voice2, 1)):

        def hear(v: str, script: str, use: bool, who: int = speaker) -> tuple[Any, str]:
            audio, message = h.preview_voice(v, script, who, use)
            return gr.Audio(value=audio, visible=audio is not None), message

        button.click(hear, [voice, p.script, p.use_script], [p.preview_audio, p.preview_msg])

    def save_prefs(v1: str, v2: str) -> dict[str, str]:
        return {"voice1": v1, "voice2": v2}

    p.voice1.input(save_prefs, [p.voice1, p.voice2], prefs_state, **QUIET)
    p.voice2.input(save_prefs, [p.voice1, p.voice2], prefs_state, **QUIET)

    # ---- presets: a new preset fills only what the user did not set
    def on_preset(preset: str, unit: str, touched: list[str], *current: Any) -> list[Any]:
        new, note = h.preset_change(preset, unit, dict(zip(ADVANCED_FIELDS, current, strict=True)), touched)
        return [new.get(k, gr.skip()) for k in ADVANCED_FIELDS] + [note]

    p.preset.input(
        on_preset, [p.preset, p.length_unit, p.touched, *advanced], [*advanced, p.preset_note], **QUIET
    )
    for name in ADVANCED_FIELDS:
        p.form[name].input(lambda t, n=name: sorted({*(t or ()), n}), p.touched, p.touched, **QUIET)

    def reset(preset: str, unit: str) -> list[Any]:
        return [*h.preset_values(preset, unit), [], "Advanced values follow the preset again."]

    p.reset_btn.click(reset, [p.preset, p.length_unit], [*advanced, p.touched, p.preset_note], **QUIET)
    p.length_unit.change(
        lambda v, old, new: (h.convert_length(v, old, new), new),
        [p.max_length, p.unit_state, p.length_unit], [p.max_length, p.unit_state], **QUIET,
    )  # fmt: skip

    # ---- estimate and the recordings
    estimate_keys = [k for k in FORM_FIELDS if k not in ("left_image", "right_image", "scene_image")]
    estimate_inputs = [p.form[k] for k in estimate_keys]

    def on_estimate(*vals: Any) -> str:
        return h.estimate(dict(zip(estimate_keys, vals, strict=True)))

    estimate_triggers = [c.change for c in (p.preset, p.steps, p.text_guidance, p.audio_guidance, p.resolution,
                                            p.max_length, p.script, p.length_unit, p.speech)]  # fmt: skip
    gr.on(estimate_triggers, on_estimate, estimate_inputs, p.estimate_md, trigger_mode="always_last", **QUIET)
    audio_inputs = [p.audio1, p.audio2, p.audio_mode, p.source]
    # The estimate after the preview, which measures each recording once.
    gr.on([c.change for c in audio_inputs], h.audio_preview, audio_inputs, [p.audio1_msg, p.audio2_msg, p.audio_summary],
          trigger_mode="always_last", show_progress="minimal").then(on_estimate, estimate_inputs, p.estimate_md, **QUIET)  # fmt: skip

    # ---- messages that stop being true when the user changes the form
    user_edits = [
        comp.input for comp in form_inputs if hasattr(comp, "input") and not isinstance(comp, gr.State)
    ]
    gr.on(user_edits, None, None, [p.submit_msg, p.form_msg], js="() => ['', '']", **QUIET)

    # ---- generate (once per click: the button is disabled in the browser before anything is sent)
    # Every handler that lists, shows or changes jobs takes the caller from its gr.Request (first
    # parameter, so gradio fills it in before the component values): a gated service shows each
    # credential its own jobs, and jobs submitted here belong to the credential that submitted them.
    def on_generate(request: gr.Request, key: str, *vals: Any) -> tuple[Any, str, str, Any]:
        values = dict(zip(FORM_FIELDS, vals, strict=True))
        job_id, message = h.generate(values, session=key or None, owner=request_principal(request))
        return (job_id or gr.skip()), message, "", (job_id or gr.skip())

    (p.generate_btn.click(lambda: gr.Button(interactive=False), None, p.generate_btn, js=DISABLE_GENERATE_JS, **QUIET)
        .then(on_generate, [session_key, *form_inputs], [p.job_box, p.submit_msg, p.form_msg, p.watching],
              concurrency_limit=4, show_progress="minimal")
        .then(lambda: gr.Button(interactive=True), None, p.generate_btn, **QUIET)
        .then(None, None, None, js=SHOW_STATUS_JS))  # fmt: skip

    # ---- the job on screen
    def show(request: gr.Request, job_id: str, shown_id: str, watching: str) -> tuple[Any, ...]:
        r = h.poll(job_id, h.viewer(request))
        if r.video and shown_id != job_id:
            d = r.downloads
            video: Any = gr.Video(value=d.video or r.video, subtitles=r.subtitles)
            dls = [gr.DownloadButton(value=v, visible=bool(v)) for v in (d.video, d.srt, d.vtt, d.zip)]
            shown_id = job_id
        elif not r.video and shown_id != "":
            video, dls, shown_id = None, [gr.DownloadButton(value=None, visible=False)] * 4, ""
        else:
            video, dls = gr.skip(), [gr.skip()] * 4
        ended = r.terminal and bool(job_id) and watching == job_id
        return (
            r.html, video, *dls, shown_id, "" if r.terminal else (job_id or ""),
            gr.Timer(active=not r.terminal), gr.Button(interactive=r.cancellable),
            gr.Button(interactive=bool(job_id)), gr.Button(interactive=r.terminal and bool(job_id)),
            "" if ended else gr.skip(),
        )  # fmt: skip

    show_inputs = [p.job_box, p.shown, p.watching]
    show_outputs = [p.status_html, p.video, p.dl_video, p.dl_srt, p.dl_vtt, p.dl_zip, p.shown, p.watching, timer,
                    p.cancel_btn, p.load_btn, p.seed_btn, p.submit_msg]  # fmt: skip
    p.job_box.change(show, show_inputs, show_outputs, show_progress="hidden")
    p.job_box.change(lambda j: j, p.job_box, job_state, **QUIET)
    p.job_box.change(None, p.job_box, None, js=JOB_URL_JS)
    timer.tick(show, show_inputs, show_outputs, show_progress="hidden", concurrency_limit=None)

    def cancel(request: gr.Request, job_id: str) -> str:
        return h.cancel(job_id, h.viewer(request))

    p.cancel_btn.click(cancel, p.job_box, p.submit_msg).then(
        show, show_inputs, show_outputs, show_progress="hidden"
    )

    def load(request: gr.Request, job_id: str) -> list[Any]:
        values, touched, message = h.load_settings(job_id, h.viewer(request))
        return _fill(values, touched, message, voices)

    p.load_btn.click(load, p.job_box, fill_targets, show_progress="hidden")

    def new_seed(request: gr.Request, job_id: str) -> tuple[Any, str, Any]:
        new_id, message = h.rerun(
            job_id, new_seed=True, viewer=h.viewer(request), owner=request_principal(request)
        )
        return (new_id or gr.skip()), message, (new_id or gr.skip())

    p.seed_btn.click(new_seed, p.job_box, [p.job_box, p.submit_msg, p.watching])

    # ---- queue, gallery, history: refreshed while anything changes, each row with its actions
    def panels(request: gr.Request, sig: str, force: bool = False) -> list[Any]:
        viewer = h.viewer(request)
        new_sig = h.panels_signature(viewer=viewer)
        if new_sig == sig and not force:
            return [gr.skip()] * 6
        waiting = h.store.count(state="queued") + len(h.store.active())
        label = f"Queue ({waiting})" if waiting else "Queue"
        return [h.queue_html(viewer), h.gallery_html(viewer=viewer), h.history_html(viewer=viewer), h.header(),
                gr.Tab(label=label), new_sig]  # fmt: skip

    panel_outputs = [p.queue_html, p.gallery_html, p.history_html, p.header, p.queue_tab, p.panels_sig]
    panels_timer.tick(panels, p.panels_sig, panel_outputs, show_progress="hidden", concurrency_limit=None)

    def on_action(request: gr.Request, current: str, evt: gr.EventData) -> list[Any]:
        viewer = h.viewer(request)
        data = evt._data if isinstance(getattr(evt, "_data", None), dict) else {}
        action, job_id = str(data.get("action") or ""), str(data.get("job") or "")
        job_out: Any = gr.skip()
        watch: Any = gr.skip()
        message: Any = gr.skip()
        fill: list[Any] = [gr.skip()] * len(fill_targets)
        if action == "show":
            job_out = job_id
        elif action == "load":
            values, touched, text = h.load_settings(job_id, viewer)
            fill = _fill(values, touched, text, voices)
        elif action in ("seed", "retry"):
            new_id, message = h.rerun(
                job_id, new_seed=action == "seed", viewer=viewer, owner=request_principal(request)
            )
            job_out = watch = new_id or gr.skip()
        elif action == "cancel":
            message = h.cancel(job_id, viewer)
        elif action == "delete":
            message = h.delete(job_id, viewer)
            if job_id == current:
                job_out = ""
        return [job_out, message, watch, *panels(request, "", force=True), *fill]

    action_outputs = [p.job_box, p.submit_msg, p.watching, *panel_outputs, *fill_targets]
    for html_list in (p.queue_html, p.gallery_html, p.history_html):
        html_list.click(on_action, p.job_box, action_outputs, show_progress="hidden")

    # ---- examples that fill the whole form
    for i, button in enumerate(p.form_examples):
        button.click(lambda i=i: _fill(*h.example(i), voices), None, fill_targets, show_progress="hidden")

    # ---- page load: reattach to the browser's job, the lists, the remembered voices
    def on_load(stored: Any, prefs: Any, request: gr.Request) -> list[Any]:
        query = request.query_params.get("job") if request is not None else None
        current = h.current_job(stored, query, h.viewer(request))
        first_estimate = h.estimate({"preset": default_preset, **adv, "length_unit": "seconds"})
        v1, v2 = h.remembered_voices(prefs)
        return [current, first_estimate, v1 or gr.skip(), v2 or gr.skip(), secrets.token_hex(8),
                h.poll(current, h.viewer(request)).html, *panels(request, "", force=True)]  # fmt: skip

    demo.load(on_load, [job_state, prefs_state],
              [p.job_box, p.estimate_md, p.voice1, p.voice2, session_key, p.status_html, *panel_outputs])  # fmt: skip
