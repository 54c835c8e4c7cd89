"""The page by section: inputs on the left (people, what they say, scene description, quality), Generate,
progress and the result on the right, the queue, gallery and history below. Builds the components only;
``events.py`` wires them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from inference.render.settings import DEFAULT_PROMPT
from service.ui.examples import EXAMPLES, FORM_EXAMPLES
from service.ui.form import (
    ASPECT_CHOICES,
    AUDIO_FORMATS_TEXT,
    AUDIO_MODE_CHOICES,
    BACKDROP_CHOICES,
    FORM_FIELDS,
    IMAGE_FORMATS_TEXT,
    LAYOUT_CHOICES,
    LENGTH_UNITS,
    PRESET_LABELS,
    RESOLUTION_CHOICES,
    SOURCE_PORTRAITS,
    SOURCE_SCENE,
    SOURCE_SINGLE,
    SPEECH_AUDIO,
    SPEECH_SCRIPT,
    offered_preset_names,
    preset_summary,
    voice_choices,
)
from service.ui.formatting import fmt_duration
from service.ui.handlers import UiHandlers
from service.ui.style import ACTIONS_JS, FOOTER_HTML, UPLOAD_GUARD_JS
from service.ui.uploads import checked_image
from tts.voices import DEFAULT_VOICES

TITLE = "Dialogue video"
FORMAT_HELP = """\
**Script formats** (detected automatically; the preview says which one it chose; Chinese, English or mixed):

| format | example | who is who |
|---|---|---|
| tags | `(s1) Hello! (s2) Hi.` (also `[s1]`, `（s1）`; several on one line) | s1 = person 1 (left), s2 = person 2 (right) |
| roles | `角色1：你好` / `Speaker 2: Hi` | the number |
| letters | `A: Hello` / `B: Hi` | A left, B right |
| names | `Alice: Hello` / `Bob (whispering): Hi` | first name to speak is on the left |
| screenplay | `ALICE` on its own line, her lines below; a blank line; `BOB` ... | first name is on the left |
| chat log | `[10:01] Alice: hi`, `10:01 Alice: hi`, `Alice (10:01): hi`; copies from WhatsApp, Telegram, Discord and Slack | first sender is on the left |
| list | `- Alice: hi`, `* B: hi`, `1. (s1) hi` | as the labels after the marker |
| free | one line per turn, no labels | alternating left, right, left ... |

Timestamps, list markers and names are not spoken. **Directions are not spoken** either: `(smiling)`,
`*waves*`, `[laughs]`, `（笑）` and a label's parenthetical (`Bob (whispering):`) are kept aside, shown in the
preview's last column. Pauses: `[pause 1.5s]`, `[pause 800ms]`, `[停顿 1秒]`, `<break time="1s"/>`, `(pause 2s)`;
`[pause]`, `(pause)`, `(beat)` or a lone `…` is a short pause. A line without a label continues the previous
turn; lines starting with `#` are comments. The video is as long as the speech (up to the Maximum length).
"""


@dataclass
class Page:
    """Every component the events need, by name (``form`` holds the FORM_FIELDS components)."""

    form: dict[str, Any]
    c: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.c[name]
        except KeyError:
            raise AttributeError(name) from None


def _image(label: str, elem_id: str) -> gr.Image:
    return checked_image(
        label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"], height=210,
        elem_id=elem_id,
    )  # fmt: skip


def _msg(elem_id: str, value: str = "") -> gr.Markdown:
    return gr.Markdown(value, elem_id=elem_id, elem_classes=["dv-msg"])


def _people(c: dict[str, Any], h: UiHandlers) -> None:
    gr.Markdown("### 1 · Who is in the picture", elem_classes=["dv-section"])
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            with gr.Tabs(selected=SOURCE_PORTRAITS, elem_id="people-tabs") as c["people_tabs"]:
                with gr.Tab("Two portraits", id=SOURCE_PORTRAITS, elem_id="portraits-tab") as c[
                    "tab_portraits"
                ]:
                    with gr.Row():
                        with gr.Column(min_width=140):
                            c["left"] = _image("Person 1 (left)", "left-portrait")
                            c["left_msg"] = _msg("left-message")
                        with gr.Column(min_width=140):
                            c["right"] = _image("Person 2 (right)", "right-portrait")
                            c["right_msg"] = _msg("right-message")
                    with gr.Row():
                        c["layout"] = gr.Radio(
                            LAYOUT_CHOICES, value="side_by_side", label="Layout", elem_id="layout"
                        )
                        c["backdrop"] = gr.Dropdown(
                            BACKDROP_CHOICES,
                            value="blur",
                            label="Backdrop",
                            visible=False,
                            elem_id="backdrop",
                        )
                        c["aspect"] = gr.Dropdown(
                            ASPECT_CHOICES, value="16:9", label="Aspect ratio", elem_id="aspect"
                        )
                with gr.Tab("One scene + boxes", id=SOURCE_SCENE, elem_id="scene-tab") as c["tab_scene"]:
                    c["scene"] = _image("Scene with both people", "scene-image")
                    c["scene_msg"] = _msg("scene-message")
                    c["boxes"] = gr.Textbox(
                        label="Boxes (optional)",
                        placeholder='[[y0, x0, y1, x1], [y0, x0, y1, x1]]  or  {"person1": [...], "person2": [...]}',
                        info="Pixels of the uploaded image, rows first (upstream MultiTalk's bbox). Empty: left and "
                        "right halves. Press Enter or leave the box to update the preview.",
                        elem_id="boxes",
                    )
                with gr.Tab("One person", id=SOURCE_SINGLE, elem_id="single-tab") as c["tab_single"]:
                    c["single"] = _image("The person (one picture)", "single-image")
                    c["single_msg"] = _msg("single-message")
                    gr.Markdown(
                        "One person fills the frame and speaks one voice: a script whose lines are all "
                        "speaker 1's (`(s1) ...` or one name), or one recording."
                    )
            gr.Markdown(f"<small>Pictures: {IMAGE_FORMATS_TEXT}, short side at least 256 px.</small>")
        with gr.Column(scale=2, min_width=220):
            c["overlay_img"] = gr.Image(
                label="Who is where (preview)", interactive=False, height=210, elem_id="overlay-preview"
            )
            c["overlay_msg"] = gr.Markdown(
                "Upload the two portraits to see who is where.", elem_id="overlay-message"
            )


def _speech(c: dict[str, Any], h: UiHandlers) -> None:
    gr.Markdown("### 2 · What they say", elem_classes=["dv-section"])
    voices = voice_choices(h.limits.installed_voices)
    with gr.Tabs(selected=SPEECH_SCRIPT, elem_id="speech-tabs") as c["speech_tabs"]:
        with gr.Tab("Script (text to speech)", id=SPEECH_SCRIPT, elem_id="script-tab") as c["tab_script"]:
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=260):
                    c["script"] = gr.Textbox(
                        label="Script", lines=5, max_lines=30, elem_id="script-box",
                        placeholder="(s1) Hello! How are you?\n(s2) Fine, thanks. And you?",
                    )  # fmt: skip
                with gr.Column(scale=2, min_width=220):
                    c["parse_html"] = gr.HTML(h.parse_preview("")[0], elem_id="parse-preview")
            with gr.Row():
                c["voice1"] = gr.Dropdown(
                    voices, value=DEFAULT_VOICES[0], label="Voice of person 1 (left)", elem_id="voice1"
                )
                c["voice2"] = gr.Dropdown(
                    voices, value=DEFAULT_VOICES[1], label="Voice of person 2 (right)", elem_id="voice2"
                )
            with gr.Row(equal_height=True):
                c["preview1"] = gr.Button("▶ Hear voice 1", size="sm", elem_id="preview1")
                c["preview2"] = gr.Button("▶ Hear voice 2", size="sm", elem_id="preview2")
                c["use_script"] = gr.Checkbox(
                    True, label="Speak a line of my script", elem_id="preview-use-script"
                )
            c["preview_audio"] = gr.Audio(
                label="Voice preview", type="numpy", interactive=False, autoplay=True, visible=False
            )
            c["preview_msg"] = _msg("preview-message")
            with gr.Accordion("Script formats, pauses and examples", open=False):
                gr.Markdown(FORMAT_HELP)
                with gr.Row(elem_classes=["dv-examples"]):
                    c["script_examples"] = [gr.Button(name, size="sm") for name in EXAMPLES]
        with gr.Tab("Upload audio", id=SPEECH_AUDIO, elem_id="audio-tab") as c["tab_audio"]:
            gr.Markdown(
                f"One recording per person ({AUDIO_FORMATS_TEXT}, up to {fmt_duration(h.limits.max_audio_seconds)}), "
                "used as they are: no voices and no script apply while this tab is open."
            )
            with gr.Row(equal_height=False):
                with gr.Column(min_width=160):
                    c["audio1"] = gr.Audio(
                        label="Recording of person 1 (left)",
                        type="filepath",
                        sources=["upload"],
                        elem_id="audio1",
                    )
                    c["audio1_msg"] = _msg("audio1-message")
                with gr.Column(min_width=160):
                    c["audio2"] = gr.Audio(
                        label="Recording of person 2 (right)",
                        type="filepath",
                        sources=["upload"],
                        elem_id="audio2",
                    )
                    c["audio2_msg"] = _msg("audio2-message")
            c["audio_mode"] = gr.Radio(
                AUDIO_MODE_CHOICES, value="add", label="How the recordings play", elem_id="audio-mode"
            )
            c["audio_summary"] = gr.Markdown(h.audio_preview(None, None, "add")[2], elem_id="audio-preview")  # fmt: skip


def _quality(c: dict[str, Any], h: UiHandlers, default_preset: str, adv: dict[str, Any]) -> None:
    gr.Markdown("### 3 · Scene description and quality", elem_classes=["dv-section"])
    c["prompt"] = gr.Textbox(
        label="Scene description (prompt)", lines=2, placeholder=DEFAULT_PROMPT, elem_id="prompt",
        info="Empty: the default shown in grey.",
    )  # fmt: skip
    with gr.Row():
        c["preset"] = gr.Radio(
            [(PRESET_LABELS.get(n, n), n) for n in offered_preset_names(h.lora)], value=default_preset,
            label="Preset", info=preset_summary(h.lora), elem_id="preset", scale=3,
        )  # fmt: skip
        c["resolution"] = gr.Radio(
            RESOLUTION_CHOICES, value=adv["resolution"], label="Resolution", elem_id="resolution", scale=1
        )
    c["preset_note"] = _msg("preset-note")
    c["estimate_md"] = gr.Markdown(elem_id="estimate")
    with gr.Accordion("Advanced settings (filled from the preset)", open=False, elem_id="advanced"):
        with gr.Row():
            c["steps"] = gr.Slider(1, 100, value=adv["steps"], step=1, label="Steps", elem_id="steps")
            c["text_guidance"] = gr.Slider(
                1.0, 20.0, value=adv["text_guidance"], step=0.5, label="Text guidance", elem_id="text-guidance",
                info="1 = skip the text branch (2 passes per step instead of 3)",
            )  # fmt: skip
            c["audio_guidance"] = gr.Slider(
                1.0,
                20.0,
                value=adv["audio_guidance"],
                step=0.5,
                label="Audio guidance",
                elem_id="audio-guidance",
            )
        with gr.Row():
            c["seed"] = gr.Number(
                value=adv["seed"], precision=0, label="Seed", info="-1 = random", elem_id="seed"
            )
            c["max_length"] = gr.Number(
                value=adv["max_length"], label="Maximum length", minimum=0, elem_id="max-length"
            )
            c["length_unit"] = gr.Radio(
                LENGTH_UNITS, value="seconds", label="Length unit", elem_id="length-unit"
            )
            c["color_correction"] = gr.Slider(
                0.0, 1.0, value=adv["color_correction"], step=0.05, label="Colour correction",
                info="match each clip's colours to the picture", elem_id="color-correction",
            )  # fmt: skip
            c["apg"] = gr.Checkbox(value=adv["apg"], label="APG (adaptive projected guidance)", elem_id="apg")
        c["negative_prompt"] = gr.Textbox(
            value=adv["negative_prompt"], lines=2, label="Negative prompt", elem_id="negative-prompt"
        )
        c["reset_btn"] = gr.Button("Reset to the preset", size="sm", elem_id="reset-advanced")


def _output(c: dict[str, Any]) -> None:
    with gr.Row(elem_id="dv-generate-bar"):
        c["generate_btn"] = gr.Button(
            "Generate", variant="primary", elem_id="generate-btn", scale=3, size="lg"
        )
        c["cancel_btn"] = gr.Button(
            "Cancel job", variant="stop", interactive=False, elem_id="cancel-btn", scale=1, size="lg"
        )
    c["submit_msg"] = _msg("submit-message")
    c["job_box"] = gr.Textbox(label="Current job", interactive=False, elem_id="job-id", visible="hidden")
    c["status_html"] = gr.HTML(elem_id="job-status")
    c["video"] = gr.Video(label="Result", interactive=False, elem_id="result-video", height=330)
    with gr.Row(elem_id="downloads"):
        c["dl_video"] = gr.DownloadButton("⤓ Video (mp4)", visible=False, size="sm", elem_id="dl-video")
        c["dl_srt"] = gr.DownloadButton("⤓ Subtitles (srt)", visible=False, size="sm", elem_id="dl-srt")
        c["dl_vtt"] = gr.DownloadButton("⤓ Subtitles (vtt)", visible=False, size="sm", elem_id="dl-vtt")
        c["dl_zip"] = gr.DownloadButton("⤓ Side files (zip)", visible=False, size="sm", elem_id="dl-zip")
    with gr.Row(elem_id="job-actions"):
        c["load_btn"] = gr.Button("Load settings", size="sm", interactive=False, elem_id="load-settings-btn")
        c["seed_btn"] = gr.Button(
            "Re-run with a new seed", size="sm", interactive=False, elem_id="new-seed-btn"
        )


def _jobs(c: dict[str, Any]) -> None:
    with gr.Tabs(selected="queue", elem_id="jobs-tabs"):
        with gr.Tab("Queue", id="queue", elem_id="queue-tab") as c["queue_tab"]:
            c["queue_html"] = gr.HTML(js_on_load=ACTIONS_JS, elem_id="queue")
        with gr.Tab("Gallery", id="gallery", elem_id="gallery-tab"):
            c["gallery_html"] = gr.HTML(js_on_load=ACTIONS_JS, elem_id="gallery")
        with gr.Tab("History", id="history", elem_id="history-tab"):
            c["history_html"] = gr.HTML(js_on_load=ACTIONS_JS, elem_id="history")


def build_page(h: UiHandlers, default_preset: str, adv: dict[str, Any]) -> Page:
    """Create every component inside the current ``gr.Blocks``; returns them by name."""
    c: dict[str, Any] = {}
    with gr.Row(equal_height=False, elem_id="dv-header"):
        gr.Markdown(f"# {TITLE}", elem_id="dv-title")
        c["header"] = gr.Markdown(elem_id="service-info")
    # Values the page keeps between events.
    c["source"] = gr.State(SOURCE_PORTRAITS)
    c["speech"] = gr.State(SPEECH_SCRIPT)
    c["names"] = gr.State(["Speaker 1", "Speaker 2"])
    c["touched"] = gr.State([])  # advanced fields the user set: a preset change keeps them
    c["unit_state"] = gr.State("seconds")
    c["shown"] = gr.State("")  # the job whose result is on screen (the video is set once, not per poll)
    c["watching"] = gr.State("")  # the job seen running: its messages clear when it ends
    c["panels_sig"] = gr.State("")
    with gr.Row(equal_height=False, elem_id="dv-main"):
        with gr.Column(scale=6, min_width=340, elem_id="dv-inputs"):
            with gr.Row(elem_classes=["dv-examples"], elem_id="form-examples"):
                gr.Markdown("**Start from an example:**")
                c["form_examples"] = [
                    gr.Button(ex.label, size="sm", elem_id=f"example-{i}")
                    for i, ex in enumerate(FORM_EXAMPLES)
                ]
            c["form_msg"] = _msg("form-message")
            _people(c, h)
            _speech(c, h)
            _quality(c, h, default_preset, adv)
        with gr.Column(scale=5, min_width=340, elem_id="dv-output"):
            _output(c)
    _jobs(c)
    # The footer also carries the upload guard: its "upload" event says which file the browser held back.
    c["footer"] = gr.HTML(FOOTER_HTML, js_on_load=UPLOAD_GUARD_JS)
    names = {"left_image": "left", "right_image": "right", "scene_image": "scene", "single_image": "single"}
    form = {k: c[names.get(k, k)] for k in FORM_FIELDS}
    return Page(form=form, c=c)
