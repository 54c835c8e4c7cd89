"""Gradio UI handlers against a real JobStore: upload checks, parse preview, scene overlay, presets (a
preset keeps what the user set; the presets a service's LoRA mode offers, with the values it runs),
submit (once per double click), one-person jobs (and loading one back), examples that fill the whole
form, voice preview, labels; plus the Blocks build and the mount on the REST app. The job views (status,
downloads, queue, gallery, history, settings that come back, each credential's jobs) are in
tests/test_ui_jobs.py.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from inference.render.settings import SettingsError
from service.jobs import JobState, JobStore
from service.ui import ADVANCED_FIELDS, EXAMPLES, UiHandlers, build_ui, mount_ui, preset_summary, submit_form
from service.validation import Limits, RequestError
from tests import ui_support
from tests.ui_support import _finish, _handlers, _portrait, _tone, _values

# the shared fixtures, bound here so pytest finds them for this module's tests
store, portraits, ui, recordings = (
    ui_support.store,
    ui_support.portraits,
    ui_support.ui,
    ui_support.recordings,
)

# ---------------------------------------------------------------------------------------------- build


def test_build_ui_renders_every_main_control(store: JobStore) -> None:
    import gradio as gr

    demo = build_ui(store, submit=lambda f, fl: "x", tts_preview=None, info=lambda: {})
    assert isinstance(demo, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    for elem in ("left-portrait", "right-portrait", "scene-image", "boxes", "layout", "resolution",
                 "overlay-preview", "script-box", "parse-preview", "voice1", "voice2", "prompt", "preset",
                 "generate-btn", "cancel-btn", "job-id", "job-status", "result-video", "downloads", "history",
                 "audio-tab", "audio1", "audio2", "audio-mode", "audio-preview", "single-image", "queue", "gallery",
                 "dl-video", "dl-srt", "dl-vtt", "dl-zip", "load-settings-btn", "new-seed-btn", "preset-note",
                 "example-0", "left-message", "single-message", "dv-inputs", "dv-output"):  # fmt: skip
        assert elem in ids, elem
    # The script tab comes first (the default): the browser tests type into #script-box.
    tabs = [b for b in demo.blocks.values() if type(b).__name__ == "Tab"]
    labels = [t.label for t in tabs]
    assert labels.index("Script (text to speech)") + 1 == labels.index("Upload audio")
    audio = [
        b for b in demo.blocks.values() if type(b).__name__ == "Audio" and b.elem_id in ("audio1", "audio2")
    ]
    assert [(a.type, a.label) for a in audio] == [
        ("filepath", "Recording of person 1 (left)"),
        ("filepath", "Recording of person 2 (right)"),
    ]
    kinds = {type(b).__name__ for b in demo.blocks.values()}
    assert {"BrowserState", "Timer", "Video", "HTML", "Accordion", "DownloadButton"} <= kinds
    # Inputs on the left, Generate and the result on the right: both columns in one row, Generate first
    # in the right one.
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["dv-inputs"].parent is by_id["dv-output"].parent
    assert _first_button(by_id["dv-output"]).elem_id == "generate-btn"
    people = [t.label for t in tabs if t.elem_id in ("portraits-tab", "scene-tab", "single-tab")]
    assert people == ["Two portraits", "One scene + boxes", "One person"]
    # Resolution sits with the preset (quality), not with the pictures.
    assert by_id["resolution"].parent is by_id["preset"].parent
    voice_dd = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "voice1")
    labels = dict((v, k) for k, v in voice_dd.choices)
    assert labels["af_heart"].startswith("af_heart — American English, female")
    assert labels["zf_xiaobei"].startswith("zf_xiaobei — Mandarin Chinese, female")
    assert isinstance(demo.dialogue_handlers, UiHandlers)
    # A failing info callable must not break the page.
    broken = build_ui(store, submit=lambda f, fl: "x", tts_preview=None, info=lambda: 1 / 0)
    assert "service info unavailable" in broken.dialogue_handlers.header()


def _first_button(block: Any) -> Any:
    for child in getattr(block, "children", []):
        if type(child).__name__ == "Button":
            return child
        found = _first_button(child)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------- script


def test_parse_preview_lists_turns_with_names(ui: UiHandlers) -> None:
    html, names = ui.parse_preview("Alice: Hello!\nBob: Hi Alice. [pause 1.5s]\nAlice: Shall we start?")
    assert names == ["Alice", "Bob"]
    assert "3 turns" in html and "names" in html
    assert "<b>Bob</b> (right)" in html and "[pause 1.5 s]" in html


def test_parse_preview_shows_error_with_line(ui: UiHandlers) -> None:
    html, names = ui.parse_preview("A: hello\nB: hi\nC: who am I?")
    assert "line 3" in html and "dv-error" in html and "Traceback" not in html
    assert names == ["Speaker 1", "Speaker 2"]
    assert "Write the dialogue" in ui.parse_preview("   ")[0]


def test_every_example_parses(ui: UiHandlers) -> None:
    for name, text in EXAMPLES.items():
        html, _ = ui.parse_preview(text)
        assert "dv-error" not in html, name
    assert "[pause" in ui.parse_preview(EXAMPLES["With pauses"])[0]


# ---------------------------------------------------------------------------------------------- scene


def test_overlay_from_two_portraits(ui: UiHandlers, portraits: tuple[str, str]) -> None:
    img, msg = ui.overlay(
        "portraits", *portraits, None, "", "side_by_side", "blur", "16:9", 480, ["Ann", "Ben"]
    )
    assert img is not None and img.size == (896, 448)
    assert "Ann" in msg and "Ben" in msg and "896×448" in msg
    img2, _ = ui.overlay("portraits", *portraits, None, "", "backdrop", "plain", "1:1", 480, None)
    assert img2 is not None and img2.size[0] == img2.size[1]
    missing, msg = ui.overlay(
        "portraits", portraits[0], None, None, "", "side_by_side", "blur", "16:9", 480, None
    )
    assert missing is None and "person 2 (right)" in msg


def test_overlay_errors_are_inline(ui: UiHandlers, tmp_path: Path, portraits: tuple[str, str]) -> None:
    tiny = _portrait(tmp_path / "tiny.png", (1, 2, 3), (100, 100))
    img, msg = ui.overlay(
        "portraits", tiny, portraits[1], None, "", "side_by_side", "blur", "16:9", 480, None
    )
    assert img is None and msg.startswith("⚠️ **Portrait of person 1 (left)**") and "256" in msg
    scene = _portrait(tmp_path / "scene.png", (50, 60, 70), (800, 400))
    img, msg = ui.overlay(
        "scene", None, None, scene, "[[40, 20, 380, 400], [40, 420, 380, 780]]", "", "", "", 480, None
    )
    assert img is not None, msg
    img, msg = ui.overlay(
        "scene", None, None, scene, "[[0, 0, 400, 800], [0, 0, 400, 790]]", "", "", "", 480, None
    )
    assert img is None and "**Boxes**" in msg and "overlap" in msg
    img, msg = ui.overlay("scene", None, None, scene, "not json", "", "", "", 480, None)
    assert img is None and "not valid JSON" in msg


# ---------------------------------------------------------------------------------------------- presets


def test_preset_fill_and_overrides(ui: UiHandlers) -> None:
    fast = dict(zip(ADVANCED_FIELDS, ui.preset_values("fast"), strict=True))
    # the default maximum length is the longest video, 6 min (upstream's 40 s cut long dialogues)
    assert fast["steps"] == 16 and fast["text_guidance"] == 1.0 and fast["max_length"] == 360.0
    assert (
        dict(zip(ADVANCED_FIELDS, ui.preset_values("quality", "frames"), strict=True))["max_length"] == 9000
    )
    assert "Fast: 16 steps, guidance text 1 / audio 4, 480p" in preset_summary()
    base = {"preset": "fast", "length_unit": "seconds", **fast}
    assert ui.settings_overrides(base) == {}
    changed = ui.settings_overrides({**base, "steps": 20.0, "seed": -1, "max_length": 60, "resolution": 720})
    assert changed == {"steps": 20, "seed": -1, "max_frames": 1500, "resolution": 720}
    assert ui.settings_overrides({**base, "length_unit": "frames", "max_length": 201}) == {"max_frames": 201}
    with pytest.raises(SettingsError) as err:
        ui.settings_overrides({**base, "max_length": 2})
    assert err.value.field == "max_frames" and "2 seconds is shorter than one clip" in str(err.value)
    assert "81 frames = 3.24 seconds" in str(err.value)
    with pytest.raises(SettingsError, match="1 second is shorter"):  # one second, not "1 seconds"
        ui.settings_overrides({**base, "max_length": 1})
    with pytest.raises(SettingsError, match="longest video"):
        ui.settings_overrides({**base, "max_length": 400})
    assert (
        ui.convert_length(40, "seconds", "frames") == 1000
        and ui.convert_length(1000, "frames", "seconds") == 40
    )


def test_estimate_uses_script_length_and_step_time(store: JobStore) -> None:
    ui = _handlers(store, info=lambda: {"step_time_s": {480: 0.5}})
    values = {"preset": "balanced", "length_unit": "seconds", "script": "(s1) Hi.\n(s2) Hello."}
    values.update(dict(zip(ADVANCED_FIELDS, ui.preset_values("balanced"), strict=True)))
    text = ui.estimate(values)
    assert "1 clip × 30 steps × 3 passes = 90 transformer passes" in text
    assert "45 s" in text  # 30 steps x 3 passes x 0.5 s
    no_time = _handlers(store, info=lambda: {}).estimate({**values, "script": ""})
    assert "estimated time" not in no_time and "write a script" in no_time
    # A settings error names the setting as the page does ("Maximum length", not max_frames), in the
    # right number.
    bad = ui.estimate({**values, "max_length": 1})
    assert "⚠️ **Maximum length**: 1 second is shorter" in bad and "max_frames" not in bad


# ---------------------------------------------------------------------------------------------- submit


def test_generate_submits_job_to_store(ui: UiHandlers, store: JobStore, portraits: tuple[str, str]) -> None:
    job_id, msg = ui.generate(_values(ui, portraits, steps=20, seed=7, prompt="Two friends in a café."))
    assert job_id is not None and job_id[:8] in msg and "position 1" in msg
    job = store.get(job_id)
    assert job.state == JobState.QUEUED
    assert job.spec["script"].startswith("(s1) Hello there!") and job.spec["voices"] == [
        "af_heart",
        "am_adam",
    ]
    assert job.spec["preset"] == "fast" and job.spec["settings_overrides"] == {"steps": 20, "seed": 7}
    assert job.settings["steps"] == 20 and job.settings["text_guidance"] == 1.0
    assert job.spec["prompt"] == "Two friends in a café."
    assert job.spec["scene"]["layout"] == "side_by_side"
    left = store.input_path(job_id, job.spec["images"]["left"])
    assert left.read_bytes() == Path(portraits[0]).read_bytes()


def test_generate_rejects_bad_input_with_field(
    ui: UiHandlers, store: JobStore, portraits: tuple[str, str]
) -> None:
    job_id, msg = ui.generate(_values(ui, portraits, script="A: hi\nB: yo\nC: third"))
    assert job_id is None and "**Script**" in msg and "line 3" in msg
    job_id, msg = ui.generate(_values(ui, portraits, right_image=None))
    assert job_id is None and "person 2 (right)" in msg
    job_id, msg = ui.generate(_values(ui, portraits, voice2="xx_nobody"))
    assert job_id is None and "**Voice of person 2**" in msg
    job_id, msg = ui.generate(_values(ui, portraits, steps=0))
    assert job_id is None and "**Steps**: 0 is out of range" in msg
    assert store.count() == 0


def test_generate_from_scene_with_boxes(ui: UiHandlers, store: JobStore, tmp_path: Path) -> None:
    scene = _portrait(tmp_path / "scene.png", (40, 50, 60), (800, 400))
    values = _values(
        ui, ("", ""), source="scene", scene_image=scene, boxes="[[40, 20, 380, 400], [40, 420, 380, 780]]"
    )
    job_id, msg = ui.generate(values)
    assert job_id is not None, msg
    job = store.get(job_id)
    assert job.spec["layout"] == "scene"
    assert job.spec["scene"]["boxes"] == [[40, 20, 380, 400], [40, 420, 380, 780]]


def test_submit_form_contract(store: JobStore, portraits: tuple[str, str]) -> None:
    files = {"left_image": Path(portraits[0]).read_bytes(), "right_image": Path(portraits[1]).read_bytes()}
    job_id = submit_form(
        store, {"script": "(s1) a\n(s2) b", "settings": '{"steps": 5}', "preset": "fast"}, files
    )
    assert store.get(job_id).settings["steps"] == 5
    with pytest.raises(RequestError) as err:
        submit_form(store, {"script": "(s1) a", "colour": "red"}, files)
    assert err.value.field == "colour"
    with pytest.raises(RequestError) as err:
        submit_form(store, {"script": "(s1) a", "settings": "{oops"}, files)
    assert err.value.field == "settings"


# ---------------------------------------------------------------------------------------------- audio


def test_audio_preview_lengths_and_modes(ui: UiHandlers, recordings: tuple[str, str]) -> None:
    m1, m2, line = ui.audio_preview(*recordings, "add")
    assert m1 == "✓ 1.0 s" and m2 == "✓ 1.5 s"
    assert "Person 1 speaks 1.0 s, then person 2 1.5 s → about 2.5 s of video" in line
    assert "about 1.5 s of video" in ui.audio_preview(*recordings, "para")[2]
    assert "Upload one recording per person" in ui.audio_preview(None, None, "add")[2]


def test_audio_preview_errors_inline_with_field(
    ui: UiHandlers, recordings: tuple[str, str], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    m1, m2, line = ui.audio_preview(str(corrupt), recordings[1], "add")
    assert m1.startswith("⚠️ **Recording of person 1 (left)**:") and "not a readable audio file" in m1
    assert m2 == "✓ 1.5 s" and "Fix the recording" in line and "Traceback" not in m1
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(16000, np.float32), 16000)
    m2 = ui.audio_preview(recordings[0], str(silent), "para")[1]
    assert m2.startswith("⚠️ **Recording of person 2 (right)**:") and "silent" in m2
    m1, m2, line = ui.audio_preview(recordings[0], None, "add")
    assert m1 == "✓ 1.0 s" and m2 == "" and "recording of person 2 (right) too" in line
    short = _handlers(ui.store, limits=Limits(max_audio_seconds=1.2))
    assert "too long" in short.audio_preview(*recordings, "para")[1]


def test_generate_in_audio_mode_sends_files_not_script(
    ui: UiHandlers, store: JobStore, portraits: tuple[str, str], recordings: tuple[str, str]
) -> None:
    sent: list[tuple[dict[str, Any], dict[str, bytes]]] = []

    def spy(form: dict[str, Any], files: dict[str, bytes]) -> str:
        sent.append((form, files))
        return submit_form(store, form, files)

    spying = UiHandlers(store, submit=spy, tts_preview=None, info=lambda: {})
    # The script and voices keep their values while the audio tab is open: the tab decides what is sent.
    values = _values(
        ui, portraits, speech="audio", audio1=recordings[0], audio2=recordings[1], audio_mode="para"
    )
    job_id, msg = spying.generate(values)
    assert job_id is not None, msg
    form, files = sent[-1]
    assert form["audio_mode"] == "para" and not {"script", "voice1", "voice2"} & form.keys()
    assert files["audio1"] == Path(recordings[0]).read_bytes() and set(files) >= {"audio1", "audio2"}
    job = store.get(job_id)
    assert job.spec["audio_source"] == "files" and job.spec["audio_mode"] == "para"
    assert job.spec["script"] is None and job.spec["voices"] is None
    assert job.spec["audio_seconds"] == {"person1": 1.0, "person2": 1.5}
    assert (
        store.input_path(job_id, job.spec["audio"]["person2"]).read_bytes()
        == Path(recordings[1]).read_bytes()
    )

    # Back on the script tab the same values send the script and voices, and no audio.
    job_id, msg = spying.generate({**values, "speech": "script"})
    assert job_id is not None, msg
    form, files = sent[-1]
    assert form["script"].startswith("(s1) Hello") and form["voice1"] == "af_heart"
    assert "audio_mode" not in form and not {"audio1", "audio2"} & files.keys()
    assert store.get(job_id).spec["audio_source"] == "tts"


def test_generate_in_audio_mode_names_the_bad_field(
    ui: UiHandlers, store: JobStore, portraits: tuple[str, str], recordings: tuple[str, str], tmp_path: Path
) -> None:
    audio = _values(ui, portraits, speech="audio", audio1=recordings[0], audio2=None, audio_mode="add")
    job_id, msg = ui.generate(audio)
    assert job_id is None and msg.startswith("⚠️ **Recording of person 2 (right)**: required")
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(b"\xff\xfb" + b"\x13" * 3000)
    job_id, msg = ui.generate({**audio, "audio2": str(corrupt)})
    assert job_id is None and msg.startswith("⚠️ **Recording of person 2 (right)**:")
    job_id, msg = ui.generate({**audio, "audio2": recordings[1], "audio_mode": "loud"})
    assert job_id is None and "**How the recordings play**" in msg and "'para'" in msg
    assert store.count() == 0


def test_estimate_in_audio_mode_uses_recording_lengths(store: JobStore, recordings: tuple[str, str]) -> None:
    ui = _handlers(store, info=lambda: {})
    values = {"preset": "fast", "length_unit": "seconds", "speech": "audio", "audio_mode": "add"}
    values.update(dict(zip(ADVANCED_FIELDS, ui.preset_values("fast"), strict=True)))
    assert "upload both recordings" in ui.estimate(values)
    assert "≈ 2.5 s of video" in ui.estimate({**values, "audio1": recordings[0], "audio2": recordings[1]})
    para = {**values, "audio1": recordings[0], "audio2": recordings[1], "audio_mode": "para"}
    assert "≈ 1.5 s of video" in ui.estimate(para)
    assert "write a script" in ui.estimate({**para, "speech": "script"})


def test_history_and_rerun_of_ui_audio_job(
    ui: UiHandlers, store: JobStore, portraits: tuple[str, str], recordings: tuple[str, str]
) -> None:
    values = _values(
        ui, portraits, speech="audio", audio1=recordings[0], audio2=recordings[1], audio_mode="add"
    )
    first, msg = ui.generate(values)
    assert first is not None, msg
    _finish(store, first, {"video.mp4": b"x"})
    rows, ids = ui.history()
    assert (
        ids == [first] and rows[0][7] == "own recordings" and rows[0][8] == "audio files, add: 1.0 s + 1.5 s"
    )
    again, msg = ui.rerun(first)
    assert again is not None and again[:8] in msg
    a, b = store.get(first), store.get(again)
    assert b.spec == a.spec and b.settings == a.settings and b.spec["audio_source"] == "files"
    for name in a.inputs:
        assert store.input_path(again, name).read_bytes() == store.input_path(first, name).read_bytes()


# ---------------------------------------------------------------------------------------------- voices


def test_voice_preview_without_engine(ui: UiHandlers) -> None:
    audio, msg = ui.preview_voice("af_heart")
    assert audio is None and "Kokoro TTS engine" in msg
    audio, msg = ui.preview_voice("zz_nobody")
    assert audio is None and "unknown voice" in msg


def test_remembered_voices(ui: UiHandlers) -> None:
    assert ui.remembered_voices({"voice1": "bf_emma", "voice2": "zm_yunxi"}) == ("bf_emma", "zm_yunxi")
    assert ui.remembered_voices({"voice1": "gone_voice"}) == (None, None)
    assert ui.remembered_voices(None) == (None, None)
    # A catalog voice that this service has not installed is not in the dropdowns: not restored.
    only_two = _handlers(ui.store, limits=Limits(installed_voices=frozenset({"af_heart", "bf_emma"})))
    assert only_two.remembered_voices({"voice1": "bf_emma", "voice2": "zm_yunxi"}) == ("bf_emma", None)


def test_voice_preview_with_engine_results(store: JobStore) -> None:
    # Test double of the TTS engine (the Kokoro engine has its own tests): tuple, WAV bytes, bad input.
    calls: list[tuple[str, str | None]] = []

    def tuple_tts(voice: str, text: str | None) -> tuple[int, np.ndarray]:
        calls.append((voice, text))
        return 24000, np.full(12000, 0.1, np.float32)

    audio, msg = _handlers(store, tts_preview=tuple_tts).preview_voice("bf_emma")
    assert calls == [("bf_emma", None)] and audio[0] == 24000 and audio[1].shape == (12000,)
    assert "British English" in msg and "0.5 s" in msg

    def wav_tts(voice: str, text: str | None) -> bytes:
        buf = io.BytesIO()
        soundfile.write(buf, np.zeros((4800, 2), np.float32), 24000, format="WAV")
        return buf.getvalue()

    audio, _ = _handlers(store, tts_preview=wav_tts).preview_voice("af_heart")
    assert audio[0] == 24000 and audio[1].shape == (4800,)

    def refusing_tts(voice: str, text: str | None) -> bytes:
        raise ValueError("voice af_heart is not installed")

    audio, msg = _handlers(store, tts_preview=refusing_tts).preview_voice("af_heart")
    assert audio is None and "not installed" in msg
    audio, msg = _handlers(store, tts_preview=lambda v, t: "nonsense").preview_voice("af_heart")
    assert audio is None and "no usable audio" in msg


# ---------------------------------------------------------------------------------------------- mount


def test_mount_on_rest_app(store: JobStore) -> None:
    from fastapi.testclient import TestClient

    from service.api import ServiceInfo, create_app

    app = create_app(store, ServiceInfo())
    demo = build_ui(store, submit=lambda f, fl: submit_form(store, f, fl), tts_preview=None, info=lambda: {})
    mount_ui(app, demo, store)
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        config = client.get("/config").json()
        assert config["title"] == "Dialogue video" and ".dv-progress" in config["css"]
        assert client.get("/api/jobs").json()["total"] == 0  # the REST routes still answer
        # The footer's "Use via API" leads to the REST API's own docs (not gradio's endpoints), which answer.
        footer = [c for c in config["components"] if "Use via API" in str(c.get("props", {}).get("value"))]
        assert (
            config["footer_links"] == []
            and len(footer) == 1
            and 'href="/docs"' in footer[0]["props"]["value"]
        )
        assert client.get("/docs").status_code == 200
        # The outputs are served to the page, the browser secret beside them is not.
        secret = store.outputs_dir / ".ui_browser_secret"
        refused = client.get(f"/gradio_api/file={secret}")
        assert (
            secret.is_file() and refused.status_code in (403, 404) and secret.read_text() not in refused.text
        )
        example = next((store.outputs_dir / "ui-examples").glob("*.png"), None) or _drawn_example(demo)
        assert client.get(f"/gradio_api/file={example}").status_code == 200
    assert str(store.outputs_dir) in demo.allowed_paths

    app2 = create_app(store, ServiceInfo())
    mount_ui(app2, build_ui(store, submit=lambda f, fl: "x", tts_preview=None, info=lambda: {}), store,
             auth=("user", "pass"))  # fmt: skip
    with TestClient(app2) as client:
        assert client.get("/config").status_code == 401
        assert client.get("/api/jobs").status_code == 200  # the API has its own (token) auth


# ---------------------------------------------------------------------------------------------- uploads


def test_a_non_image_upload_gets_our_sentence(
    store: JobStore, tmp_path: Path, portraits: tuple[str, str]
) -> None:
    import gradio as gr
    from gradio.data_classes import ImageData

    from service.ui.uploads import checked_image

    wav = tmp_path / "voice.png"  # a WAV renamed .png
    _tone(wav, 0.5)
    ui = _handlers(store)
    kept, msg = ui.image_check(str(wav), "left_image")
    assert kept is None and msg.startswith("⚠️ **Portrait of person 1 (left)**: 'voice.png' is not a picture")
    assert "WAV audio" in msg and "PNG, JPEG or WebP" in msg and "Traceback" not in msg
    small = _portrait(tmp_path / "small.png", (1, 2, 3), (100, 100))
    kept, msg = ui.image_check(small, "single_image")
    assert kept is None and msg.startswith("⚠️ **Picture of the person**") and "256" in msg
    assert ui.image_check(portraits[0], "right_image") == (portraits[0], "")
    assert ui.image_check(None, "left_image") == (None, "")
    # The page's image upload hands such a file on (our check answers); the stock component raises.
    payload = ImageData(path=str(wav), orig_name="voice.png")
    assert checked_image(type="filepath", image_mode=None).preprocess(payload) == str(wav)
    with pytest.raises(Exception):  # noqa: B017 - whatever Pillow raises: the framework's own error
        gr.Image(type="filepath", image_mode=None).preprocess(payload)
    # Submitting it names the field too (never "Error").
    job_id, msg = ui.generate(_values(ui, (str(wav), portraits[1])))
    assert job_id is None and msg.startswith("⚠️ **Portrait of person 1 (left)**") and store.count() == 0


def test_a_file_the_browser_holds_back_gets_our_sentence() -> None:
    from service.ui.uploads import refused_upload

    field, msg = refused_upload({"id": "right-portrait", "name": "notes.txt", "type": "text/plain"})
    assert field == "right_image" and msg.startswith(
        "⚠️ **Portrait of person 2 (right)**: 'notes.txt' is not a picture"
    )
    assert "text/plain" in msg and "PNG, JPEG or WebP" in msg
    field, msg = refused_upload({"id": "audio2", "name": "face.png", "type": "image/png"})
    assert (
        field == "audio2"
        and msg.startswith("⚠️ **Recording of person 2 (right)**")
        and "WAV, FLAC, MP3 or M4A" in msg
    )
    field, msg = refused_upload({"id": "single-image", "name": "x", "type": ""})
    assert field == "single_image" and "unknown type" in msg
    assert refused_upload({"id": "somewhere-else"}) == (None, "") and refused_upload(None) == (None, "")


# ---------------------------------------------------------------------------------------------- presets


def test_a_preset_keeps_what_the_user_set_and_says_so(ui: UiHandlers) -> None:
    current = dict(zip(ADVANCED_FIELDS, ui.preset_values("fast"), strict=True))
    current.update(seed=-1, steps=20)
    new, note = ui.preset_change("quality", "seconds", current, ["seed", "steps"])
    assert "seed" not in new and "steps" not in new  # kept
    assert new["text_guidance"] == 5.0 and new["max_length"] == 360.0  # filled from the preset
    assert "kept the ones you set: steps (20), seed (-1)" in note and note.startswith("Quality preset")
    new, note = ui.preset_change("balanced", "frames", current, [])
    assert new["steps"] == 30 and new["seed"] == 42 and new["max_length"] == 9000
    assert note == "Balanced preset: every advanced value follows it."


def test_presets_sit_under_the_service_defaults(store: JobStore, portraits: tuple[str, str]) -> None:
    # A service started with --sample_steps 10: the form shows 10, and a job that keeps it renders 10.
    ui = _handlers(store, limits=Limits(job_defaults={"steps": 10}))
    sent: list[dict[str, Any]] = []
    limits = Limits(job_defaults={"steps": 10})
    ui._submit = lambda form, files: sent.append(form) or submit_form(store, form, files, limits=limits)
    values = _values(ui, portraits)
    assert values["steps"] == 10
    job_id, msg = ui.generate(values)
    assert job_id is not None, msg
    assert sent[-1]["settings"] == {} and store.get(job_id).settings["steps"] == 10
    # The preset's own value differs from the service default: it is sent as the user's choice.
    job_id, _ = ui.generate({**values, "steps": 16})
    assert sent[-1]["settings"] == {"steps": 16} and store.get(job_id).settings["steps"] == 16


def test_presets_follow_the_services_lora_mode(store: JobStore, portraits: tuple[str, str]) -> None:
    import gradio as gr

    from inference.render.settings import LoraState, preset_catalog
    from service.ui.form import offered_preset_names

    # Merged LoRA: every job runs distilled, so only "fast" is offered, with the values it runs.
    merged = LoraState.of("merged", ["lightx2v_rank64"])
    limits = Limits(lora=merged)
    ui = _handlers(store, limits=limits)
    ui._submit = lambda form, files, owner=None: submit_form(store, form, files, limits=limits)
    catalog = preset_catalog(merged)  # what /api/info reports per preset
    assert offered_preset_names(merged) == [n for n, p in catalog.items() if p["offered"]] == ["fast"]
    assert preset_summary(merged) == "Fast: 4 steps, guidance text 1 / audio 2, shift 2, 480p with the LoRA"
    fast = dict(zip(ADVANCED_FIELDS, ui.preset_values("fast"), strict=True))
    shown = (fast["steps"], fast["text_guidance"], fast["audio_guidance"])
    assert shown == (
        catalog["fast"]["steps"],
        catalog["fast"]["text_guidance"],
        catalog["fast"]["audio_guidance"],
    )
    assert shown == (4, 1.0, 2.0)
    job_id, msg = ui.generate(_values(ui, portraits))
    assert job_id is not None, msg
    job = store.get(job_id)
    assert (job.settings["steps"], job.settings["shift"], job.settings["lora"]) == (4, 2.0, True)
    assert job.spec["settings_overrides"] == {}  # the form's values are the preset's: nothing overridden
    assert "Step-distilled" in ui.estimate(_values(ui, portraits))
    job_id, msg = ui.generate(_values(ui, portraits, preset="balanced"))
    assert job_id is None and msg.startswith("⚠️ **Preset**") and "fast" in msg
    values, _, _ = ui.example(1)  # the interview example asks for "balanced": this service's default instead
    assert values["preset"] == "fast" and values["steps"] == 4
    demo = build_ui(store, submit=ui._submit, tts_preview=None, info=lambda: {"default_preset": "balanced"},
                    limits=limits)  # fmt: skip
    by_id = {b.elem_id: b for b in demo.blocks.values() if isinstance(b, gr.components.Component)}
    assert [v for _, v in by_id["preset"].choices] == ["fast"] and by_id["preset"].value == "fast"
    assert by_id["steps"].value == 4 and "shift 2" in by_id["preset"].info
    # Switchable FusionX: "fast" runs its 8 distilled steps; balanced and quality stay offered without it.
    switch = LoraState.of("switchable", ["Wan2.1_I2V_14B_FusionX_LoRA"])
    ui2 = _handlers(store, limits=Limits(lora=switch))
    assert offered_preset_names(switch) == ["fast", "balanced", "quality"]
    assert ui2.preset_values("fast")[:3] == (8, 1.0, 2.0) and ui2.preset_values("balanced")[:3] == (
        30,
        5.0,
        4.0,
    )
    assert "Fast: 8 steps, guidance text 1 / audio 2, shift 2, 480p with the LoRA" in preset_summary(switch)
    balanced = dict(zip(ADVANCED_FIELDS, ui2.preset_values("balanced"), strict=True))
    new, _ = ui2.preset_change("fast", "seconds", balanced, [])
    assert (new["steps"], new["text_guidance"], new["audio_guidance"]) == (8, 1.0, 2.0)
    # Negative control: without a LoRA "fast" is the 16-step preset and every preset is offered.
    plain = _handlers(store)
    assert plain.preset_values("fast")[0] == 16 and "with the LoRA" not in preset_summary()
    assert offered_preset_names() == ["fast", "balanced", "quality"]


# ---------------------------------------------------------------------------------------------- submit once


def test_the_same_form_twice_from_one_page_is_one_job(
    ui: UiHandlers, store: JobStore, portraits: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    values = _values(ui, portraits)
    first, _ = ui.generate(values, session="page-a")
    again, msg = ui.generate(values, session="page-a")  # a double click
    assert again == first and "Already submitted" in msg and store.count() == 1
    other, _ = ui.generate(values, session="page-b")  # another browser: its own job
    changed, _ = ui.generate({**values, "steps": 20}, session="page-a")  # a different form: a new job
    assert len({first, other, changed}) == 3 and store.count() == 3
    # Negative controls: no page key, or a second click after the window, make new jobs.
    ui.generate(values)
    ui.generate(values)
    assert store.count() == 5
    monkeypatch.setattr("service.ui.handlers.DEDUPE_WINDOW_S", 0.0)
    later, _ = ui.generate(values, session="page-a")
    assert later not in (first, other, changed) and store.count() == 6


# ---------------------------------------------------------------------------------------------- one person


def test_one_person_job_from_the_page(
    ui: UiHandlers, store: JobStore, portraits: tuple[str, str], recordings
) -> None:
    one = {**_values(ui, portraits), "source": "single", "single_image": portraits[0],
           "script": "(s1) Hello, I am the only one here.\n(s1) And I keep talking."}  # fmt: skip
    job_id, msg = ui.generate(one)
    assert job_id is not None, msg
    spec = store.get(job_id).spec
    assert spec["people"] == 1 and spec["layout"] == "single" and spec["voices"] == ["af_heart"]
    loaded, _, _ = ui.load_settings(job_id)
    assert loaded["source"] == "single" and loaded["voice2"] is None and loaded["left_image"] is None
    assert Path(loaded["single_image"]).read_bytes() == Path(portraits[0]).read_bytes()
    img, text = ui.overlay(
        "single", None, None, None, "", "", "", "", 480, ["Ann", "Speaker 2"], portraits[0]
    )
    assert img is not None and "One person, Ann, fills the frame" in text
    # One recording for one person; the second recording's box is not asked for.
    audio = {**one, "speech": "audio", "audio1": recordings[0], "audio2": None}
    job_id, msg = ui.generate(audio)
    assert job_id is not None, msg
    assert store.get(job_id).spec["audio"] == {"person1": "audio1.wav"}
    assert (
        ui.audio_preview(recordings[0], None, "add", "single")[2]
        == "One person speaks 1.0 s → about 1.0 s of video."
    )
    # A two-person script on a one-person video names the script line.
    job_id, msg = ui.generate({**one, "script": "(s1) Hi.\n(s2) Hello."})
    assert job_id is None and msg.startswith("⚠️ **Script**") and "line 2" in msg
    job_id, msg = ui.generate({**one, "single_image": None})
    assert job_id is None and msg.startswith("⚠️ **Picture of the person**: required")


def test_a_stored_one_person_job_loads_back_and_submits_again_without_voice2(
    store: JobStore, portraits: tuple[str, str]
) -> None:
    sent: list[tuple[dict[str, Any], set[str]]] = []

    def spy(form: dict[str, Any], files: dict[str, bytes], owner: str | None = None) -> str:
        sent.append((dict(form), set(files)))
        return submit_form(store, form, files, owner=owner)

    ui = UiHandlers(store, submit=spy, tts_preview=None, info=lambda: {})
    # A one-person job as the service stores it (REST: one image, a speaker-1 script, one voice).
    script = "(s1) Hello, it is just me today.\n(s1) And I keep talking."
    first = submit_form(store, {"script": script, "voice1": "bf_emma", "preset": "fast", "settings": {"seed": 5}},
                        {"image": Path(portraits[0]).read_bytes()})  # fmt: skip
    spec = store.get(first).spec
    assert spec["people"] == 1 and spec["layout"] == "single" and spec["images"] == {"image": "image.png"}
    loaded, _, _ = ui.load_settings(first)
    assert loaded["source"] == "single" and loaded["speech"] == "script" and loaded["script"] == script
    assert loaded["voice1"] == "bf_emma" and loaded["voice2"] is None and loaded["seed"] == 5
    # The page keeps whatever voice 2 showed before (loading skips a voice the job does not have): not sent.
    again, msg = ui.generate({**loaded, "voice2": "am_adam"})
    assert again is not None, msg
    form, files = sent[-1]
    assert "voice2" not in form and files == {"image"} and form["voice1"] == "bf_emma"
    a, b = store.get(first), store.get(again)
    assert (b.spec["people"], b.spec["layout"], b.spec["images"], b.spec["voices"]) == (1, "single", spec["images"],
                                                                                          ["bf_emma"])  # fmt: skip
    assert a.settings == b.settings and b.spec["script"] == script
    assert store.input_path(again, "image.png").read_bytes() == Path(portraits[0]).read_bytes()
    # History / gallery "New seed" re-submits the same one-person form.
    rerun, msg = ui.rerun(first, new_seed=True)
    assert rerun is not None, msg
    assert "voice2" not in sent[-1][0] and sent[-1][1] == {"image"} and store.get(rerun).spec["people"] == 1
    # Negative control: the same values as a two-portrait job do send voice 2.
    two = {**loaded, "voice2": "am_adam", "source": "portraits", "left_image": portraits[0],
           "right_image": portraits[1], "script": "(s1) Hi.\n(s2) Hello."}  # fmt: skip
    assert ui.generate(two)[0] is not None and sent[-1][0]["voice2"] == "am_adam"


# ---------------------------------------------------------------------------------------------- examples


def test_every_form_example_fills_the_form_and_submits(store: JobStore) -> None:
    from service.ui import FORM_EXAMPLES

    ui = _handlers(
        store, limits=Limits(installed_voices=frozenset({"af_heart", "am_adam", "zf_xiaobei", "zm_yunjian"}))
    )
    for i, example in enumerate(FORM_EXAMPLES):
        values, touched, text = ui.example(i)
        assert touched == [] and example.label in text
        assert values["script"] and values["prompt"] and values["preset"] in ("fast", "balanced", "quality")
        assert values["voice1"] in {"af_heart", "am_adam", "zf_xiaobei", "zm_yunjian"}
        job_id, msg = ui.generate(values)
        assert job_id is not None, (example.label, msg)
        spec = store.get(job_id).spec
        assert spec["people"] == (1 if example.source == "single" else 2) and spec["prompt"] == example.prompt
    # The pictures are drawn once, beside the outputs.
    drawn = sorted(p.name for p in (store.outputs_dir / "ui-examples").iterdir())
    assert drawn and all(name.endswith(".png") for name in drawn)


def test_voice_preview_speaks_a_line_of_the_script(store: JobStore) -> None:
    calls: list[tuple[str, str | None]] = []

    def tts(voice: str, text: str | None) -> tuple[int, np.ndarray]:
        calls.append((voice, text))
        return 24000, np.full(2400, 0.1, np.float32)

    ui = _handlers(store, tts_preview=tts)
    script = "Ann: Hello there, I am Ann.\nBen: And I am Ben, the one on the right."
    audio, msg = ui.preview_voice("am_adam", script, 1, True)
    assert calls[-1] == ("am_adam", "And I am Ben, the one on the right.") and audio is not None
    assert 'saying "And I am Ben' in msg
    ui.preview_voice("am_adam", script, 1, False)  # the voice's own sample when asked for
    assert calls[-1] == ("am_adam", None)
    _, msg = ui.preview_voice("af_heart", "Ann: Only Ann speaks.", 1, True)
    assert calls[-1] == ("af_heart", None) and "no line of person 2" in msg


def test_errors_say_what_the_rest_api_says(
    ui: UiHandlers, portraits: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    from service.jobs import DiskFullError, JobNotFoundError, QueueFullError
    from service.ui.formatting import error_html, error_md

    assert error_md(SettingsError("max_frames", "2 seconds is shorter than one clip")) == (
        "⚠️ **Maximum length**: 2 seconds is shorter than one clip"
    )
    assert error_md(QueueFullError(3)) == "⚠️ the queue is full (3 jobs waiting); try again later"
    assert error_md(DiskFullError(0, 2**20, 2**30)).startswith("⚠️ not enough free disk space")
    assert error_md(JobNotFoundError("0" * 32)) == f"⚠️ **Job**: no job with id {'0' * 32}"
    assert (
        error_html(RequestError("voice1", "<b>"))
        == '<p class="dv-error">⚠️ <b>Voice of person 1</b>: &lt;b&gt;</p>'
    )

    class Lookalike(Exception):  # a field and a message do not make an error the service answers
        field, message = "script", "internal detail"

    with caplog.at_level("ERROR"):
        text = error_md(Lookalike("C:/tmp/secret"))
    assert text == "⚠️ Something went wrong (Lookalike); the service log has the details."
    assert "secret" not in text and "Lookalike" in caplog.text

    # The store's refusals reach the page the same way.
    def full(form: dict[str, Any], files: dict[str, bytes], owner: str | None = None) -> str:
        raise QueueFullError(4)

    ui._submit = full
    job_id, msg = ui.generate(_values(ui, portraits))
    assert job_id is None and msg == "⚠️ the queue is full (4 jobs waiting); try again later"


def test_labels_and_plurals() -> None:
    from service.ui.formatting import field_label, plural, stage_of

    assert field_label("settings.max_frames") == field_label("max_frames") == "Maximum length"
    assert (
        field_label("settings.text_guidance") == "Text guidance"
        and field_label("audio_mode") == "How the recordings play"
    )
    assert [plural(1, "second"), plural(2, "second"), plural(1.5, "clip"), plural(1, "process", "processes")] == [
        "1 second", "2 seconds", "1.5 clips", "1 process"]  # fmt: skip
    assert stage_of("clip 3 of 5, step 2 of 16") == "denoising" and stage_of("waiting in queue") is None


def _drawn_example(demo: Any) -> Path:
    values, _, _ = demo.dialogue_handlers.example(0)
    return Path(values["left_image"])
