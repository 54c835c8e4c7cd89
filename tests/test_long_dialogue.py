"""Long dialogues render whole: the default length cap covers the script limits, speech longer than the cap
in force is refused at submission with the figures (and after TTS when the estimate was low), never cut;
audio, video and subtitles of a finished job end together; directions reach the render record.

Real components: ``inference.render.intake.build_job`` (the one submission check), the REST app over a
real store, the UI handlers, and the tiny weights through the one clip driver (``Runtime.render``).
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from fastapi.testclient import TestClient
from PIL import Image

from dialogue import parse_script
from inference.checkpoint.loader import load_model
from inference.checkpoint.weights import WeightPaths
from inference.parallel.context import ParallelContext
from inference.render.intake import Limits, build_job
from inference.render.length import (
    check_speech_length,
    estimate_speech_seconds,
    frames_needed,
    length_record,
    recordings_seconds,
    subtitles_within,
)
from inference.render.pipeline import FRAMES_SPILL_DIR, OUTPUT_VIDEO, RenderConfig, Renderer
from inference.render.settings import FPS, MAX_FRAMES_LIMIT, PRESETS, GenerationSettings
from inference.render.spec import JobInput, JobInputError, JobSpec
from inference.render.video_io import probe_media
from inference.render.worker import RenderFailed, RenderJob, Runtime, RuntimeOptions
from service.api import ServiceInfo, create_app
from service.jobs import JobStore
from tts.timeline import Timeline, TurnTiming

FRAME_S = 1.0 / FPS

# 28 turns, 3,100 characters, ten short pauses: about 169 s of speech with the tiny Kokoro (the estimate
# from the text says 212 s; the real Kokoro speaks about 15 characters a second).
TRIP = [
    "Did you get a chance to look at the train times for Saturday? I would like to leave early in the morning.",
    "I did. There is a fast train at seven fifteen and a slower one at eight, which stops in every small town.",
    "Seven fifteen sounds good to me. If we arrive before ten we can walk up to the castle before the crowds.",
    "That was my thought too. The guide book says the gardens behind the castle are best before lunch, anyway.",
    "Should we book a table somewhere for lunch, or just find a bakery and eat by the river like last summer?",
    "The river, definitely. The weather report promises sunshine, and I still remember that cheese bread.",
    "Then we need to bring a blanket. Mine is still in the car, so I can pick it up on the way to the station.",
    "Perfect. What about the afternoon? The museum of clocks is open until five, and it is close to the bridge.",
    "I read that they wind all the big clocks at three o'clock. It could be fun to see them all chime at once.",
    "Let us plan for that then. After the museum we could take the boat back instead of the train, if it runs.",
    "The boat runs on weekends only, and the last one leaves at six. It takes two hours, but the view is lovely.",
    "Two hours on the water after a long day sounds wonderful. I will bring a book and a warm jacket for later.",
    "Good idea, it gets cold on the deck once the sun goes down. Do you want me to buy the tickets online today?",
    "Yes, please. I will send you my half tonight. Is there a discount if we buy the train and boat together?",
    "There is a combined ticket, about twenty percent cheaper, but it has to be used on the same day, of course.",
    "That works for us, since we are doing everything on Saturday. Let us take the combined ticket, then.",
    "Done. I just need your date of birth for the booking form, they ask for it because of the age discount.",
    "Ha, I am afraid we are both too old for the youth price now. But put it in anyway, just in case it helps.",
    "It did not help, sadly. The total is forty two euros each, including the boat back in the evening.",
    "That is still a good price for a whole day out. Should we invite your sister too? She loves old castles.",
    "I asked her last week, but she is working on Saturday. She said to take lots of pictures of the gardens.",
    "We will. I will charge the camera tonight and clear the memory card, it is almost full from the wedding.",
    "Remember to pack the small umbrella too. The weather report has been wrong before, and often enough.",
    "True. I will pack the umbrella, the blanket, the camera, and some water. Anything else we might need?",
    "Maybe some cash for the bakery. Last time their card machine was broken and we had to borrow coins.",
    "Right, I had forgotten about that. I will stop at the bank on Friday afternoon on my way home from work.",
    "Great. So we meet at the station at seven, have a coffee, and take the seven fifteen train. Agreed?",
    "Agreed. Seven o'clock at the station, coffee first. I am really looking forward to it. See you Saturday!",
]
LONG_SCRIPT = "\n".join(
    f"{'Anna' if i % 2 == 0 else 'Ben'}: {text}" + (" [pause 1s]" if i % 3 == 2 else "")
    for i, text in enumerate(TRIP)
)
# Three short turns with directions: several seconds of speech, two or three clips.
SHORT_SCRIPT = (
    "Anna (smiling): Hello there, how are you today?\n"
    "Ben: *waves* I am fine, thank you. And you?\n"
    "Anna: Very well, thanks for asking."
)


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (300, 400), colour).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds: float, sr: int = 16000) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


LEFT, RIGHT = _png((30, 60, 120)), _png((120, 40, 40))


def _script_job(script: str, **settings) -> JobInput:
    return JobInput(left_image=LEFT, right_image=RIGHT, script=script, settings=settings or None)


def _refusal(req: JobInput) -> JobInputError:
    with pytest.raises(JobInputError) as info:
        build_job(req, Limits())
    return info.value


# ----------------------------------------------------------------------------------------- the cap


def test_the_default_cap_is_the_longest_video_and_holds_a_full_script() -> None:
    assert GenerationSettings().max_frames == MAX_FRAMES_LIMIT == 9000  # 6 minutes
    assert {p.settings.max_frames for p in PRESETS.values()} == {MAX_FRAMES_LIMIT}
    # A 5,000-character English dialogue (the script limit) fits the default cap by the estimate.
    turn = "Alice: " + "We could meet at the station early and take the fast train to the coast. " * 2
    script = "\n".join(turn if i % 2 == 0 else turn.replace("Alice", "Bob") for i in range(40))[:5000]
    dialogue = parse_script(script)
    assert len(script) == 5000 and 300 < estimate_speech_seconds(dialogue) < MAX_FRAMES_LIMIT / FPS
    submission = build_job(_script_job(script), Limits())
    assert submission.settings["max_frames"] == MAX_FRAMES_LIMIT and submission.spec.dialogue is not None


def test_the_28_turn_script_is_accepted_under_the_default_cap() -> None:
    dialogue = parse_script(LONG_SCRIPT)
    assert len(dialogue.turns) == 28 and dialogue.format == "names"
    assert 150 < estimate_speech_seconds(dialogue) < MAX_FRAMES_LIMIT / FPS
    assert build_job(_script_job(LONG_SCRIPT), Limits()).settings["max_frames"] == MAX_FRAMES_LIMIT
    # With upstream's cap of 40 s it is refused at submission, naming the cap, instead of cut to 40 s.
    error = _refusal(_script_job(LONG_SCRIPT, max_frames=1000))
    assert error.field == "settings.max_frames" and "max_frames = 1000 frames = 40 s" in error.message


def test_speech_longer_than_a_lower_cap_is_refused_at_submission_naming_the_cap() -> None:
    # About 60 s of speech against a cap of 40 s (upstream's 1000 frames).
    script = "\n".join(f"(s{1 + i % 2}) {t}" for i, t in enumerate(TRIP[:8]))
    seconds = estimate_speech_seconds(parse_script(script))
    assert 55 < seconds < 65
    error = _refusal(_script_job(script, max_frames=1000))
    assert error.field == "settings.max_frames"
    assert "max_frames = 1000 frames = 40 s" in error.message  # the cap
    assert f"{seconds:.0f} s of speech (estimated from the script)" in error.message  # the figure
    need = frames_needed(seconds)
    assert f"at least {need}" in error.message and need == math.ceil(seconds) * FPS  # how to raise it
    assert "never cut" in error.message
    # Negative control: the cap it asks for is accepted, one second less is not.
    assert build_job(_script_job(script, max_frames=need), Limits()).settings["max_frames"] == need
    assert _refusal(_script_job(script, max_frames=need - FPS)).field == "settings.max_frames"


def test_speech_past_the_longest_video_names_the_script() -> None:
    script = "\n".join(f"(s{1 + i % 2}) Turn number {i}. [pause 10s]" for i in range(40))  # 400 s of pauses
    error = _refusal(_script_job(script))
    assert error.field == "script"
    assert "longest video, 9000 frames = 360 s (6 min 00 s)" in error.message and "shorten" in error.message


def test_clip_mode_renders_one_clip_by_request_and_is_not_refused() -> None:
    settings = {"mode": "clip", "max_frames": 1000}
    check_speech_length(300.0, settings, field="script", source="estimated")  # no error: one clip asked
    script = "\n".join(f"(s{1 + i % 2}) {t}" for i, t in enumerate(TRIP[:8]))
    assert build_job(_script_job(script, mode="clip"), Limits()).settings["mode"] == "clip"


def test_recordings_are_checked_with_their_exact_lengths() -> None:
    assert recordings_seconds({"person1": 2.0, "person2": 2.5}, "add") == 4.5
    assert recordings_seconds({"person1": 2.0, "person2": 2.5}, "para") == 2.5
    req = JobInput(
        left_image=LEFT, right_image=RIGHT, audio1=_wav(2.0), audio2=_wav(2.5), settings={"max_frames": 101}
    )
    error = _refusal(req)  # one after the other: 4.5 s against a cap of 101 frames = 4.04 s
    assert error.field == "settings.max_frames"
    assert (
        "4.5 s of speech (the recordings)" in error.message
        and "max_frames = 101 frames = 4.0 s" in error.message
    )
    para = JobInput(left_image=LEFT, right_image=RIGHT, audio1=_wav(2.0), audio2=_wav(2.5), audio_mode="para",
                    settings={"max_frames": 101})  # fmt: skip
    assert build_job(para, Limits()).spec.audio_seconds == {"person1": 2.0, "person2": 2.5}


def test_clip_mode_subtitles_end_with_its_one_clip_and_the_record_says_cut() -> None:
    turns = [TurnTiming(0, 0, "Anna", 0.0, 2.0, "Hello there."), TurnTiming(1, 1, "Ben", 2.25, 4.0, "Hi!"),
             TurnTiming(2, 0, "Anna", 4.25, 6.0, "Bye.")]  # fmt: skip
    timeline = Timeline(24000, np.zeros((2, 24000 * 6 + 4800), np.float32), turns, ("Anna", "Ben"))
    whole = subtitles_within(timeline, 6.2)
    assert whole == {"srt": timeline.to_srt(), "vtt": timeline.to_vtt()}  # the speech fits: every cue as is
    one_clip = subtitles_within(timeline, 81 / FPS)  # 3.24 s
    assert "Bye." not in one_clip["srt"] and "00:00:02,250 --> 00:00:03,240" in one_clip["srt"]
    assert "00:00:03.240" in one_clip["vtt"]
    clip = GenerationSettings(mode="clip")
    record = length_record(timeline, None, 81, clip)
    assert record == {"length": {"speech_s": 6.0, "video_s": 3.24, "cap_frames": 81, "cut": True}}
    assert length_record(timeline, None, 155, GenerationSettings())["length"]["cut"] is False


# ----------------------------------------------------------------------------------------- REST


@pytest.fixture
def client(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite", tmp_path / "outputs", min_free_bytes=0)
    info = ServiceInfo()
    yield store, TestClient(create_app(store, info))
    store.close()


def _post(client: TestClient, script: str, settings: str | None = None):
    data = {"script": script, "voice1": "af_heart", "voice2": "am_adam"}
    if settings is not None:
        data["settings"] = settings
    files = {"left_image": ("l.png", LEFT, "image/png"), "right_image": ("r.png", RIGHT, "image/png")}
    return client.post("/api/generate", data=data, files=files)


def test_rest_accepts_a_3000_character_one_line_tag_script(client) -> None:
    store, http = client
    turns = [f"(s{1 + i % 2}) {TRIP[i % len(TRIP)]}" for i in range(40)]
    script = " ".join(turns)[:3000].rsplit(" ", 1)[0]
    assert "\n" not in script and len(script) > 2900
    resp = _post(http, script)
    assert resp.status_code == 200, resp.text
    spec = store.get(resp.json()["task_id"]).spec
    assert spec["turns"] >= 27 and spec["audio_source"] == "tts"


def test_rest_refuses_speech_over_the_cap_with_the_figures(client) -> None:
    store, http = client
    script = "\n".join(f"(s{1 + i % 2}) {t}" for i, t in enumerate(TRIP[:8]))
    resp = _post(http, script, settings='{"max_frames": 1000}')
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["field"] == "settings.max_frames" and "1000 frames = 40 s" in error["message"]
    assert re.search(r"raise the setting max_frames to at least \d+", error["message"])
    assert store.count() == 0  # nothing stored


# ----------------------------------------------------------------------------------------- UI


def test_the_page_says_so_before_submitting(tmp_path: Path) -> None:
    from service.ui import ADVANCED_FIELDS, UiHandlers
    from service.ui.layout import FORMAT_HELP

    store = JobStore(tmp_path / "jobs.sqlite", tmp_path / "outputs", min_free_bytes=0)
    try:
        ui = UiHandlers(
            store, submit=lambda form, files: None, tts_preview=None, info=lambda: {}, limits=Limits()
        )
        values = {"preset": "balanced", "length_unit": "seconds", **dict(zip(ADVANCED_FIELDS,
                  ui.preset_values("balanced"), strict=True))}  # fmt: skip
        script = "\n".join(f"(s{1 + i % 2}) {t}" for i, t in enumerate(TRIP[:8]))
        fits = ui.estimate({**values, "script": script})
        assert "clips" in fits and "⚠️" not in fits
        over = ui.estimate({**values, "script": script, "max_length": 40})
        assert "⚠️" in over and "40 s" in over and "at least" in over  # the submission's own sentence

        table, names = ui.parse_preview(SHORT_SCRIPT)
        assert names == ["Anna", "Ben"] and "directions (not spoken)" in table
        assert "<em>smiling</em>" in table and "<em>waves</em>" in table
        assert "*waves*" not in table  # the spoken column is the speech, without the direction
    finally:
        store.close()
    for shape in (
        "screenplay",
        "chat log",
        "WhatsApp",
        "Telegram",
        "Discord",
        "Slack",
        "list",
        "(whispering)",
    ):
        assert shape in FORMAT_HELP, shape
    assert "not spoken" in FORMAT_HELP


# ----------------------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def runtime(tiny_weights: Path) -> Runtime:
    paths = WeightPaths.under(tiny_weights)
    # 32x64 frames (a sixteenth of the bucket): the tiny VAE's decode dominates a long render on a CPU.
    renderer = Renderer(paths, RenderConfig(render_divisor=16))
    model = load_model(paths.wan_dir, device="cpu", dtype=torch.float32)
    return Runtime(RuntimeOptions(preset="tiny", weights=tiny_weights), ParallelContext.single("cpu"), model, paths,
                   renderer)  # fmt: skip


def _accepted(script: str, tmp: Path, **settings) -> tuple[JobSpec, dict, Path]:
    submission = build_job(_script_job(script, **settings), Limits())
    inputs = tmp / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for name, data in submission.files.items():
        (inputs / name).write_bytes(data)
    return submission.spec, submission.settings, inputs


def _render(runtime: Runtime, spec: JobSpec, settings: dict, inputs: Path, out: Path, **changes) -> dict:
    values = {**settings, "steps": 1, "seed": 7, **changes}
    runtime.render(RenderJob("long", spec, GenerationSettings.from_dict(values), inputs, out))
    return json.loads((out / "render.json").read_text())


def _srt_cues(path: Path) -> list[tuple[float, float]]:
    def seconds(stamp: str) -> float:
        h, m, rest = stamp.split(":")
        s, ms = rest.split(",")
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000

    return [
        (seconds(a), seconds(b))
        for a, b in re.findall(r"(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)", path.read_text())
    ]


def _check_whole(out: Path, meta: dict, turns: int) -> tuple[float, float]:
    """Audio, video and subtitles end together and every turn is in the subtitles; returns (speech end,
    video seconds)."""
    info = probe_media(out / OUTPUT_VIDEO)
    video_s = info.frames / FPS
    assert info.frames == meta["frames"]
    assert abs(info.video_duration - video_s) <= FRAME_S + 1e-6, info
    assert abs(info.audio_duration - video_s) <= FRAME_S + 1e-6, info  # the mux fits the audio to the video
    cues = _srt_cues(out / "subtitles.srt")
    assert len(cues) == turns  # no turn left out
    speech = meta["length"]["speech_s"]
    assert cues[-1][1] == pytest.approx(speech, abs=1e-3)
    assert speech <= video_s + 1e-6  # the speech is whole ...
    assert (
        video_s - speech <= 0.2 + FRAME_S + 1e-6
    )  # ... and the video ends with it (0.2 s of trailing silence)
    assert meta["length"]["cut"] is False
    return speech, video_s


def test_a_script_just_under_the_cap_renders_whole_and_one_frame_under_fails(runtime, tmp_path) -> None:
    spec, settings, inputs = _accepted(SHORT_SCRIPT, tmp_path)
    meta = _render(runtime, spec, settings, inputs, tmp_path / "whole")
    speech, video_s = _check_whole(tmp_path / "whole", meta, turns=3)
    assert [t["directions"] for t in meta["turns"]] == [["smiling"], ["waves"], []]  # for the prompt, later

    # A cap one frame past the synthesised speech: the trailing silence goes, the speech stays whole.
    cap = math.ceil(speech * FPS) + 1
    assert cap < meta["frames"]
    capped = _render(runtime, spec, settings, inputs, tmp_path / "capped", max_frames=cap)
    assert capped["frames"] == cap
    _check_whole(tmp_path / "capped", capped, turns=3)

    # One frame short of the speech: the job fails after TTS with the figures, before any clip, no video.
    short = math.floor(speech * FPS) - 1
    with pytest.raises(RenderFailed) as info:
        _render(runtime, spec, settings, inputs, tmp_path / "short", max_frames=short)
    reason = str(info.value)
    assert f"max_frames = {short} frames" in reason and "as synthesised" in reason and "at least" in reason
    assert not (tmp_path / "short" / OUTPUT_VIDEO).exists()
    assert not (tmp_path / "short" / FRAMES_SPILL_DIR).exists()


@pytest.mark.slow
def test_a_28_turn_dialogue_of_about_170_s_renders_whole(runtime, tmp_path) -> None:
    spec, settings, inputs = _accepted(LONG_SCRIPT, tmp_path)
    assert settings["max_frames"] == MAX_FRAMES_LIMIT
    # Few clips and passes: 201-frame clips with 9 motion frames cover 170 s in 23 clips instead of 75;
    # text guidance 1 (2 passes a step), no colour matching. The length rules are the same.
    meta = _render(runtime, spec, settings, inputs, tmp_path / "out", frame_num=201, motion_frames=9,
                   text_guidance=1.0, color_correction=0.0)  # fmt: skip
    speech, video_s = _check_whole(tmp_path / "out", meta, turns=28)
    assert 160 < speech < 180 and 160 < video_s < 181
    assert video_s > 1000 / FPS + 100  # far past upstream's 40 s cut
