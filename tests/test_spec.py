"""The job contract: ``JobSpec`` (strict JSON both ways), the one job-JSON parser (upstream MultiTalk's keys
and ours, for REST and the CLI), the intake rules (people, pictures, speech, voices, settings) and the CLI's
file resolution. Real images and audio, generated here; no model."""

from __future__ import annotations

import argparse
import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from PIL import Image

from common.errors import InputError
from inference.render.cli import build_parser, installed_voices, load_job, read_local_file
from inference.render.intake import Limits, build_job
from inference.render.settings import PRESETS
from inference.render.spec import DEFAULT_PROMPTS, JobInput, JobInputError, JobSpec, parse_job_json

SCRIPT = "(s1) Hello there, how are you today?\n(s2) I am fine, thank you."
MONOLOGUE = "Welcome to multi-talk, this is an audio-driven video generation model."


def _png(w: int = 320, h: int = 384, colour: tuple[int, int, int] = (200, 120, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds: float = 0.5, hz: float = 220.0) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


LEFT, RIGHT, SCENE, PORTRAIT = _png(), _png(colour=(90, 120, 200)), _png(640, 360), _png(400, 600)
AUDIO1, AUDIO2 = _wav(), _wav(0.7, 330.0)


def expect(field: str, *fragments: str):
    """pytest.raises for an InputError naming ``field`` whose message holds every fragment."""

    class _Check:
        def __enter__(self):
            self._raises = pytest.raises(InputError)
            self.info = self._raises.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._raises.__exit__(*exc)
            err = self.info.value
            assert err.field == field, f"field {err.field!r} != {field!r}: {err}"
            assert str(err).startswith(f"{field}: ")
            for frag in fragments:
                assert frag in err.message, f"{frag!r} not in {err.message!r}"
            return handled

    return _Check()


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    """A folder with the files a job may name, each with its own bytes (the parser does not decode)."""
    for name in ("left.png", "right.png", "scene.png", "a.wav", "b.wav"):
        (tmp_path / name).write_bytes(name.encode())
    return tmp_path


def parse(body: Any, base: Path) -> JobInput:
    return parse_job_json(body, read_local_file(base / "job.json"), source="cli", body_field="input")


# ------------------------------------------------------------------------------------ our JSON keys


def test_our_keys_portraits_script_voices(job_dir: Path) -> None:
    req = parse(
        {
            "left_image": "left.png",
            "right_image": str(job_dir / "right.png"),  # absolute paths are kept
            "script": SCRIPT,
            "voices": ["bf_emma", "am_adam"],
            "prompt": "Two friends talking.",
            "layout": "backdrop",
        },
        job_dir,
    )
    assert req.left_image == b"left.png" and req.right_image == b"right.png"
    assert req.scene_image is None and req.audio1 is None
    assert req.script == SCRIPT and (req.voice1, req.voice2) == ("bf_emma", "am_adam")
    assert req.prompt == "Two friends talking." and req.layout == "backdrop" and req.source == "cli"
    assert req.name("voice2") == "voices[1]" and req.name("speech") == "script"


def test_our_keys_scene_boxes_and_audio_files(job_dir: Path) -> None:
    boxes = {"person2": [10, 60, 90, 100], "person1": [10, 0, 90, 40]}
    req = parse({"scene_image": "scene.png", "boxes": boxes, "audio": ["a.wav", "b.wav"], "audio_mode": "para"},
                job_dir)  # fmt: skip
    assert req.scene_image == b"scene.png" and req.left_image is None and req.boxes == boxes
    assert (req.audio1, req.audio2, req.audio_mode) == (b"a.wav", b"b.wav", "para")
    assert req.script is None and req.name("audio2") == "audio[1]" and req.name("boxes") == "boxes"
    one = parse({"image": "left.png", "audio": ["a.wav"]}, job_dir)
    assert one.image == b"left.png" and one.audio2 is None


# ------------------------------------------------------------------------------------ upstream's keys


def test_upstream_keys_cond_audio_bbox(job_dir: Path) -> None:
    req = parse(
        {
            "prompt": "A man and a woman talk in a kitchen.",
            "cond_image": "scene.png",
            "audio_type": "para",
            "cond_audio": {"person1": "a.wav", "person2": "b.wav"},
            "bbox": {"person2": [160, 1320, 1280, 2280], "person1": [160, 120, 1280, 1080]},
        },
        job_dir,
    )
    assert req.scene_image == b"scene.png" and (req.audio1, req.audio2) == (b"a.wav", b"b.wav")
    assert req.audio_mode == "para" and req.boxes["person1"] == [160, 120, 1280, 1080]
    # errors name the keys the client sent
    assert [req.name(k) for k in ("scene_image", "boxes", "audio2", "audio_mode", "speech")] == [
        "cond_image", "bbox", "cond_audio.person2", "audio_type", "tts_audio"
    ]  # fmt: skip


def test_upstream_keys_tts_audio_voice_paths(job_dir: Path) -> None:
    req = parse(
        {
            "prompt": "Two people talk.",
            "cond_image": "scene.png",
            "audio_type": "add",  # ignored in TTS mode, as upstream
            "cond_audio": {},  # upstream's TTS examples keep an empty cond_audio
            "tts_audio": {
                "text": "(s1) do you know multi-talk? (s2) yes, I know it, that's amazing! (s1) Me too.",
                "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt",
                "human2_voice": "weights/Kokoro-82M/voices/am_adam.pt",
            },
        },
        job_dir,
    )
    assert (req.voice1, req.voice2) == ("af_heart", "am_adam") and req.audio1 is None
    assert req.script.startswith("(s1) do you know") and req.name("script") == "tts_audio.text"


@pytest.mark.parametrize(
    ("body", "field", "fragments"),
    [
        ({"cond_image": "scene.png", "cond_audio": {"person1": "a.wav", "person2": "b2.wav"}},
         "cond_audio.person2", ["file not found", "b2.wav"]),
        ({"cond_image": "scene.png", "cond_audio": {"person1": "a.wav", "person2": "None"}},
         "cond_audio.person2", ["silent", "leave person2 out"]),
        ({"cond_image": "scene.png", "cond_audio": {"person1": "a.wav"}, "tts_audio": {"text": SCRIPT}},
         "cond_audio", ["not both"]),
        ({"cond_image": "scene.png", "scene_image": "scene.png"}, "scene_image", ["cond_image"]),
        ({"left_image": "left.png", "voices": "af_heart"}, "voices", ["one or two"]),
        ({"left_image": "left.png", "voices": [3, "am_adam"]}, "voices[0]", ["expected a voice id"]),
        ({"cond_video": "x.mp4"}, "cond_video", ["not supported"]),
        ({"sample_steps": 4}, "sample_steps", ["unknown key"]),
        ({"left_image": "left.png", "prompt": 5}, "prompt", ["string"]),
        ({"tts_audio": {"text": 5}}, "tts_audio.text", ["required"]),
    ],
)  # fmt: skip
def test_parser_errors_name_the_key(job_dir: Path, body: dict, field: str, fragments: list[str]) -> None:
    with expect(field, *fragments):
        parse(body, job_dir)


@pytest.mark.parametrize("data", [["left.png"], "left.png", None, 3])
def test_non_object_json_refused(job_dir: Path, data: Any) -> None:
    with expect("input", "JSON object"):
        parse(data, job_dir)


def test_cli_paths_resolve_against_the_working_directory_then_the_job_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream runs ``examples/x.json`` from its root with paths such as ``examples/single/1.wav``:
    relative to the working directory. A path not found there is looked up beside the job file."""
    root = tmp_path / "upstream"
    (root / "examples" / "single").mkdir(parents=True)
    (root / "examples" / "single" / "1.wav").write_bytes(b"from the root")
    (root / "examples" / "beside.wav").write_bytes(b"beside the job")
    (root / "examples" / "examples" / "single").mkdir(parents=True)
    (root / "examples" / "examples" / "single" / "1.wav").write_bytes(b"wrong: relative to the json")
    read = read_local_file(Path("examples/job.json"))
    monkeypatch.chdir(root)
    assert read("cond_audio.person1", "examples/single/1.wav") == b"from the root"
    assert read("cond_audio.person1", "beside.wav") == b"beside the job"
    with expect("cond_audio.person1", "file not found", "nowhere.wav"):
        read("cond_audio.person1", "nowhere.wav")


# ------------------------------------------------------------------------------------ intake: two people


def test_two_portraits_and_a_dialogue_make_a_two_person_job() -> None:
    sub = build_job(JobInput(left_image=LEFT, right_image=RIGHT, script=SCRIPT, voice2="bf_emma"), Limits())
    spec = sub.spec
    assert (spec.people, spec.layout, spec.scene.layout) == (2, "portraits", "side_by_side")
    assert spec.voices == ("af_heart", "bf_emma")  # the default first voice, the chosen second
    assert len(spec.dialogue.turns) == 2 and spec.prompt == DEFAULT_PROMPTS[2]
    assert sorted(sub.files) == ["left_image.png", "right_image.png"]
    assert sub.settings["steps"] == PRESETS["balanced"].settings.steps and sub.settings["seed"] >= 0


@pytest.mark.parametrize(
    ("req", "field", "fragments"),
    [
        (JobInput(left_image=LEFT, script=SCRIPT), "right_image", ["required"]),
        (JobInput(left_image=LEFT, right_image=RIGHT, script="(s1) Only I speak here."), "script",
         ["only speaker 1 has lines", "one image"]),
        (JobInput(left_image=LEFT, right_image=RIGHT, audio1=AUDIO1), "audio2", ["required"]),
        (JobInput(left_image=LEFT, right_image=RIGHT, script=SCRIPT, audio1=AUDIO1), "script", ["not both"]),
        (JobInput(left_image=LEFT, right_image=RIGHT), "script", ["required"]),
        (JobInput(left_image=LEFT, right_image=RIGHT, script="(s1) Hi.\n(s3) Who am I?"), "script", ["line 2"]),
        (JobInput(left_image=LEFT, right_image=RIGHT, script=SCRIPT, voice2="zz_ghost"), "voice2",
         ["unknown voice 'zz_ghost'"]),
    ],
)  # fmt: skip
def test_two_person_jobs_refuse_what_does_not_fit(req: JobInput, field: str, fragments: list[str]) -> None:
    with expect(field, *fragments):
        build_job(req, Limits())


def test_voices_not_installed_are_refused_before_anything_loads() -> None:
    limits = Limits(installed_voices=frozenset({"af_heart", "am_adam"}))
    with expect("voice2", "not installed", "am_adam"):
        build_job(JobInput(left_image=LEFT, right_image=RIGHT, script=SCRIPT, voice2="bf_emma"), limits)


# ------------------------------------------------------------------------------------ intake: one person


@pytest.mark.parametrize("field", ["image", "left_image", "scene_image"])
def test_one_image_and_one_recording_make_a_one_person_job(field: str) -> None:
    sub = build_job(JobInput(**{field: PORTRAIT}, audio1=AUDIO1), Limits())
    spec = sub.spec
    assert (spec.people, spec.layout, spec.scene.layout, spec.audio_source) == (
        1,
        "single",
        "single",
        "files",
    )
    h, w = spec.scene.bucket
    assert spec.scene.scene_boxes == ((0, 0, h, w),) and h > w  # the whole frame, a portrait bucket
    assert spec.images == {"image": "image.png"} and spec.audio == {"person1": "audio1.wav"}
    assert spec.audio_seconds == {"person1": 0.5} and spec.prompt == DEFAULT_PROMPTS[1]
    assert sorted(sub.files) == ["audio1.wav", "image.png"]


def test_a_monologue_with_one_voice_is_a_one_person_job() -> None:
    spec = build_job(JobInput(image=PORTRAIT, script=MONOLOGUE, voice1="bf_emma"), Limits()).spec
    assert (spec.people, spec.voices, spec.speaker_names) == (1, ("bf_emma",), ("Speaker 1",))
    assert {t.speaker for t in spec.dialogue.turns} == {0}


@pytest.mark.parametrize(
    ("req", "field", "fragments"),
    [
        (JobInput(image=PORTRAIT, script=SCRIPT), "script", ["one-person job", "line 2", "speaker 2"]),
        (JobInput(image=PORTRAIT, audio1=AUDIO1, audio2=AUDIO2), "audio2", ["one recording"]),
        (JobInput(image=PORTRAIT, script=MONOLOGUE, voice2="am_adam"), "voice2", ["one voice"]),
        (JobInput(image=PORTRAIT, right_image=RIGHT, audio1=AUDIO1), "right_image", ["one image"]),
        (JobInput(image=PORTRAIT, left_image=LEFT, audio1=AUDIO1), "left_image", ["not both"]),
        (JobInput(image=PORTRAIT, audio1=AUDIO1, layout="backdrop"), "layout", ["two portraits only"]),
        (JobInput(audio1=AUDIO1), "left_image", ["required", "one image"]),
        (JobInput(image=b"RIFF....WAVEfmt not an image", audio1=AUDIO1), "image", ["not a supported image"]),
    ],
)  # fmt: skip
def test_one_person_jobs_refuse_a_second_person(req: JobInput, field: str, fragments: list[str]) -> None:
    with expect(field, *fragments):
        build_job(req, Limits())


def test_upstream_single_example_is_a_one_person_job(job_dir: Path) -> None:
    """upstream's single_example_1.json and single_example_tts_1.json, with our own files."""
    (job_dir / "single1.png").write_bytes(PORTRAIT)
    (job_dir / "1.wav").write_bytes(AUDIO1)
    recorded = parse({"prompt": "A woman sings.", "cond_image": "single1.png", "cond_audio": {"person1": "1.wav"}},
                     job_dir)  # fmt: skip
    spoken = parse({"prompt": "A woman sings.", "cond_image": "single1.png", "cond_audio": {},
                    "tts_audio": {"text": MONOLOGUE, "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt"}},
                   job_dir)  # fmt: skip
    for req in (recorded, spoken):
        spec = build_job(req, Limits()).spec
        assert (spec.people, spec.layout, spec.source) == (1, "single", "cli")
    two = parse({"cond_image": "single1.png", "cond_audio": {"person1": "1.wav"},
                 "bbox": {"person1": [0, 0, 300, 200], "person2": [0, 200, 300, 400]}}, job_dir)  # fmt: skip
    with expect("cond_audio.person2", "required"):  # boxes for two people, one recording
        build_job(two, Limits())


# ------------------------------------------------------------------------------------ JobSpec JSON


@pytest.fixture(scope="module")
def specs() -> dict[str, JobSpec]:
    return {
        "portraits_tts": build_job(
            JobInput(left_image=LEFT, right_image=RIGHT, script=SCRIPT, layout="backdrop", aspect="4:3"),
            Limits(),
        ).spec,  # fmt: skip
        "scene_files": build_job(
            JobInput(
                scene_image=SCENE,
                boxes=[[20, 20, 340, 300], [20, 340, 340, 620]],
                audio1=AUDIO1,
                audio2=AUDIO2,
                audio_mode="para",
            ),
            Limits(),
        ).spec,  # fmt: skip
        "single_tts": build_job(JobInput(image=PORTRAIT, script=MONOLOGUE), Limits()).spec,
    }


@pytest.mark.parametrize("name", ["portraits_tts", "scene_files", "single_tts"])
def test_spec_json_round_trip(specs: dict[str, JobSpec], name: str) -> None:
    spec = specs[name]
    stored = json.loads(json.dumps(spec.to_json()))  # as SQLite keeps it
    again = JobSpec.from_json(stored)
    assert again == spec and again.to_json() == stored


def test_spec_json_keeps_the_rest_field_names(specs: dict[str, JobSpec]) -> None:
    data = specs["scene_files"].to_json()
    assert data["layout"] == "scene" and data["images"] == {"scene": "scene_image.png"}
    assert (
        data["scene"]["boxes"] == [[20, 20, 340, 300], [20, 340, 340, 620]] and data["audio_mode"] == "para"
    )
    assert data["script"] is None and data["voices"] is None and data["kind"] == "dialogue"
    tts = specs["portraits_tts"].to_json()
    assert (
        tts["turns"] == 2
        and tts["speakers"] == ["Speaker 1", "Speaker 2"]
        and tts["voices"] == ["af_heart", "am_adam"]
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("people"), "spec.people"),
        (lambda d: d.update(colour="red"), "spec.colour"),
        (lambda d: d.update(people="2"), "spec.people"),
        (lambda d: d.update(people=1), "spec.layout"),
        (lambda d: d.update(voices=["af_heart"]), "spec.voices"),
        (lambda d: d.update(turns=5), "spec.turns"),
        (lambda d: d["scene"].update(bucket=[448]), "spec.scene.bucket"),
        (lambda d: d["images"].update(left="../../etc/passwd"), "spec.images"),
        (lambda d: d["dialogue"]["turns"][0].pop("text"), "spec.dialogue.turns[0].text"),
        (lambda d: d.update(version=9), "spec.version"),
        (lambda d: d.update(audio={"person1": "a.wav"}), "spec.audio"),
    ],
)
def test_spec_from_json_is_strict_and_names_the_key(specs: dict[str, JobSpec], change, field: str) -> None:
    data = copy.deepcopy(specs["portraits_tts"].to_json())
    change(data)
    with pytest.raises(JobInputError) as info:
        JobSpec.from_json(data)
    assert info.value.field == field, info.value


def test_version_1_specs_are_read_as_two_person_jobs(specs: dict[str, JobSpec]) -> None:
    """Jobs stored before one-person jobs existed (queued across an upgrade) still render."""
    v2 = specs["portraits_tts"].to_json()
    v1 = {k: v for k, v in v2.items() if k not in ("people", "dialogue")}
    v1["version"] = 1
    v1["scene"] = {k: v for k, v in v2["scene"].items() if k != "boxes"}
    spec = JobSpec.from_json(v1)
    assert spec == specs["portraits_tts"]


def test_input_paths_refuse_missing_or_escaping_files(specs: dict[str, JobSpec], tmp_path: Path) -> None:
    spec = specs["scene_files"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("scene_image.png", "audio1.wav"):
        (inputs / name).write_bytes(b"x")
    with expect("inputs", "audio2.wav"):
        spec.input_paths(inputs)
    (inputs / "audio2.wav").write_bytes(b"x")
    assert spec.input_paths(inputs) == {
        "scene": (inputs / "scene_image.png").resolve(),
        "person1": (inputs / "audio1.wav").resolve(),
        "person2": (inputs / "audio2.wav").resolve(),
    }


# ------------------------------------------------------------------------------------ the CLI's job


def _args(tmp_path: Path, job: dict, *flags: str) -> argparse.Namespace:
    """The CLI's own parse of ``--input job.json --out ...`` plus ``flags``."""
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
    argv = ["--preset", "tiny", "--weights", str(tmp_path / "no-weights"), "--input", str(path),
            "--out", str(tmp_path / "out.mp4"), *flags]  # fmt: skip
    return build_parser().parse_args(argv)


def test_cli_job_settings_and_unicode(tmp_path: Path) -> None:
    (tmp_path / "left.png").write_bytes(LEFT)
    (tmp_path / "right.png").write_bytes(RIGHT)
    job = {"left_image": "left.png", "right_image": "right.png", "script": "(s1) Grüße!\n(s2) 你好。",
           "settings": {"seed": 5}}  # fmt: skip
    sub = load_job(_args(tmp_path, job))
    assert sub.spec.script == job["script"] and sub.spec.source == "cli"
    assert (sub.settings["steps"], sub.settings["seed"]) == (4, 5)  # tiny: 4 steps unless told otherwise
    assert sub.settings["text_guidance"] == PRESETS["quality"].settings.text_guidance  # upstream's defaults
    sub = load_job(
        _args(tmp_path, job, "--quality", "fast", "--sample_steps", "3", "--settings", '{"seed": 9}')
    )
    assert (sub.settings["steps"], sub.settings["seed"], sub.spec.preset) == (3, 9, "fast")
    with expect("--settings", "JSON object"):
        load_job(_args(tmp_path, job, "--settings", "[1]"))


def test_cli_checks_installed_voices_without_loading_anything(tmp_path: Path) -> None:
    (tmp_path / "left.png").write_bytes(LEFT)
    (tmp_path / "right.png").write_bytes(RIGHT)
    job = {
        "left_image": "left.png",
        "right_image": "right.png",
        "script": SCRIPT,
        "voices": ["af_heart", "bf_emma"],
    }
    args = _args(tmp_path, job)
    assert installed_voices(args) == frozenset({"af_heart", "am_adam", "zf_xiaobei", "zm_yunjian"})
    with expect("voices[1]", "not installed"):
        load_job(args)
    with expect("input", "not valid JSON", "job.json"):
        (tmp_path / "job.json").write_text('{"left_image": "left.png", "script": ')
        load_job(args)


def test_cli_audio_mode_must_agree_with_the_job_file(tmp_path: Path) -> None:
    (tmp_path / "left.png").write_bytes(LEFT)
    (tmp_path / "right.png").write_bytes(RIGHT)
    job = {"left_image": "left.png", "right_image": "right.png", "script": "(s1) Hi.\n(s2) Hello."}
    assert load_job(_args(tmp_path, job, "--audio_mode", "tts")).spec.audio_source == "tts"  # agrees
    with expect("--audio_mode", "cond_audio", "script"):
        load_job(_args(tmp_path, job, "--audio_mode", "localfile"))
