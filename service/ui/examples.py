"""Examples: script texts for every script format, and whole-form examples (pictures, script, voices,
prompt, preset) that fill the page in one click. The pictures are drawn here with Pillow (simple
illustrated people), so the examples need no downloaded files."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from common.files import atomic_write
from inference.render.settings import LoraState
from service.ui.form import (
    FORM_FIELDS,
    SOURCE_PORTRAITS,
    SOURCE_SCENE,
    SOURCE_SINGLE,
    SPEECH_SCRIPT,
    advanced_values,
    preset_settings,
    usable_preset,
)
from tts.voices import DEFAULT_VOICES

logger = logging.getLogger(__name__)

EXAMPLES_DIRNAME = "ui-examples"

# Script examples, one per format (the "Script formats" help loads them into the script box).
EXAMPLES: dict[str, str] = {
    "Tags (s1)/(s2)": "(s1) Did you finish the slides for tomorrow?\n(s2) Almost. I still need the chart.\n"
    "(s1) Great, send them over when you're done.",
    "角色1 / 角色2": "角色1：你好，今天的会议几点开始？\n角色2：下午三点，在二楼的会议室。\n角色1：好的，我会准时到。",
    "A: / B:": "A: Have you tried the new café on Main Street?\nB: Yes! Their espresso is excellent.\n"
    "A: Then let's go there on Friday.",
    "Names": "Alice: I think we should start with the budget.\nBob: Agreed. It's the hardest part.\n"
    "Alice: Then let's get it done first.",
    "One line per turn": "Good morning! How did you sleep?\nNot great, the neighbours were loud.\n"
    "Oh no. Coffee?\nYes, please.",
    "With pauses": "(s1) So, what did the doctor say?\n[pause 1.5s]\n(s2) She said... [pause 0.8s] "
    "everything is fine.\n(s1) That's wonderful news!",
    "Screenplay": "ANNA\n(smiling) You made it!\n\nBEN\nOf course. I wouldn't miss it.\n\nANNA\n"
    "Come in, the others are already here.",
    "Chat log": "[10:01] Anna: are you coming tonight?\n[10:02] Ben: yes! *waves* leaving in ten minutes\n"
    "[10:03] Anna: great, see you soon",
}


@dataclass(frozen=True)
class Person:
    """How one illustrated person looks (RGB colours)."""

    background: tuple[int, int, int]
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shirt: tuple[int, int, int]
    long_hair: bool = False


PEOPLE: dict[str, Person] = {
    "ana": Person((236, 196, 150), (232, 190, 160), (70, 40, 25), (180, 60, 70), long_hair=True),
    "ben": Person((150, 180, 220), (214, 170, 135), (40, 32, 28), (50, 90, 140)),
    "maya": Person((200, 205, 190), (170, 120, 90), (25, 20, 20), (230, 180, 60), long_hair=True),
    "tom": Person((190, 190, 200), (240, 205, 180), (160, 110, 60), (60, 120, 90)),
}


def draw_person(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], p: Person) -> None:
    """A head-and-shoulders figure filling ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = x0 + w // 2

    def sx(f: float) -> int:
        return int(x0 + f * w)

    def sy(f: float) -> int:
        return int(y0 + f * h)

    draw.ellipse((sx(0.08), sy(0.72), sx(0.92), sy(1.25)), fill=p.shirt)  # shoulders
    draw.rectangle((cx - w // 10, sy(0.55), cx + w // 10, sy(0.76)), fill=p.skin)  # neck
    if p.long_hair:
        draw.rounded_rectangle((sx(0.22), sy(0.14), sx(0.78), sy(0.72)), radius=w // 6, fill=p.hair)
    draw.ellipse((sx(0.28), sy(0.17), sx(0.72), sy(0.64)), fill=p.skin)  # face
    draw.chord((sx(0.26), sy(0.12), sx(0.74), sy(0.44)), 180, 360, fill=p.hair)  # hair line
    for ex in (0.40, 0.60):
        draw.ellipse((sx(ex - 0.035), sy(0.36), sx(ex + 0.035), sy(0.40)), fill=(255, 255, 255))
        draw.ellipse((sx(ex - 0.018), sy(0.365), sx(ex + 0.018), sy(0.395)), fill=(45, 35, 30))
        draw.line((sx(ex - 0.05), sy(0.33), sx(ex + 0.05), sy(0.325)), fill=p.hair, width=max(2, w // 80))
    draw.line((cx, sy(0.41), cx - w // 40, sy(0.48)), fill=(150, 100, 80), width=max(2, w // 120))  # nose
    draw.arc((sx(0.42), sy(0.48), sx(0.58), sy(0.56)), 10, 170, fill=(150, 60, 60), width=max(2, w // 90))


def portrait(p: Person, size: tuple[int, int] = (384, 512)) -> Image.Image:
    img = Image.new("RGB", size, p.background)
    draw = ImageDraw.Draw(img)
    for y in range(size[1]):  # a soft vertical gradient behind the person
        k = y / size[1]
        draw.line((0, y, size[0], y), fill=tuple(int(c * (1.05 - 0.25 * k)) for c in p.background))
    draw_person(draw, (0, size[1] // 12, size[0], size[1]), p)
    return img


SCENE_SIZE = (1024, 576)
SCENE_BOXES = [[96, 40, 576, 472], [96, 552, 576, 984]]  # [y0, x0, y1, x1] per person, rows first


def scene(left: Person, right: Person) -> Image.Image:
    """Two people at a table in one picture; SCENE_BOXES say where each one is."""
    w, h = SCENE_SIZE
    img = Image.new("RGB", SCENE_SIZE, (214, 200, 180))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, w, int(h * 0.55)), fill=(225, 215, 196))  # wall
    draw.rectangle(
        (int(w * 0.38), int(h * 0.08), int(w * 0.62), int(h * 0.42)), fill=(170, 200, 225)
    )  # window
    for person, (y0, x0, y1, x1) in ((left, SCENE_BOXES[0]), (right, SCENE_BOXES[1])):
        draw_person(draw, (x0, y0, x1, y1), person)
    draw.rectangle((0, int(h * 0.86), w, h), fill=(120, 80, 50))  # table
    return img


@dataclass(frozen=True)
class FormExample:
    """One whole-form example: who is in the picture (names in PEOPLE: two, or one for a one-person
    video), the words, voices and look."""

    label: str
    script: str
    prompt: str
    preset: str
    people: tuple[str, ...]
    voices: tuple[str, str] = DEFAULT_VOICES
    source: str = SOURCE_PORTRAITS
    layout: str = "side_by_side"
    backdrop: str = "blur"
    aspect: str = "16:9"


FORM_EXAMPLES: tuple[FormExample, ...] = (
    FormExample(
        "Two friends",
        "(s1) Hi Ben! Did you finish the slides for tomorrow?\n(s2) Almost. I still need the chart.\n"
        "(s1) Great, send them over when you're done.",
        "Two friends talk in a bright café, natural window light, relaxed and friendly.",
        "fast",
        ("ana", "ben"),
    ),
    FormExample(
        "Interview",
        "Maya: Thanks for joining us today. What got you into robotics?\n"
        "Tom: A broken toaster, honestly. I wanted to know how it worked.\nMaya: And now you build robots.",
        "A calm studio interview, two people facing the camera, soft studio lighting.",
        "balanced",
        ("maya", "tom"),
        layout="backdrop",
        backdrop="plain",
    ),
    FormExample(
        "One scene + boxes",
        "A: Have you tried the new café on Main Street?\nB: Yes! Their espresso is excellent.\n"
        "A: Then let's go there on Friday.",
        "Two people sit at a table by a window and chat.",
        "fast",
        ("ana", "tom"),
        source=SOURCE_SCENE,
    ),
    FormExample(
        "One person",
        "(s1) Hello and welcome! Today I will show you how to make a talking video from one photo.\n"
        "(s1) Upload a picture, write what to say, and press Generate.",
        "A presenter talks to the camera in a bright studio, friendly and clear.",
        "fast",
        ("maya",),
        source=SOURCE_SINGLE,
    ),
    FormExample(
        "Chinese dialogue",
        "角色1：你好，今天的会议几点开始？\n角色2：下午三点，在二楼的会议室。\n角色1：好的，我会准时到。",
        "两位同事在明亮的办公室里交谈，自然光。",
        "fast",
        ("maya", "ben"),
        voices=("zf_xiaobei", "zm_yunjian"),
    ),
)


def _write_png(path: Path, img: Image.Image) -> str:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: img.save(f, format="PNG"))
    return str(path)


def example_values(
    example: FormExample,
    folder: Path,
    *,
    installed_voices: frozenset[str] | None = None,
    job_defaults: Mapping[str, Any] | None = None,
    lora: LoraState = LoraState(),
) -> dict[str, Any]:
    """Every form value of ``example`` (keys: FORM_FIELDS); its pictures are drawn into ``folder`` once.
    A voice this service has not installed gives way to an installed one, a preset it does not offer
    (``lora``: a merged LoRA offers only the distilled one) to its default."""
    values: dict[str, Any] = {k: None for k in FORM_FIELDS}
    people = [PEOPLE[n] for n in example.people]
    if example.source == SOURCE_SINGLE:
        path = folder / f"portrait-{example.people[0]}.png"
        values.update(single_image=_write_png(path, portrait(people[0])), boxes="")
    elif example.source == SOURCE_SCENE:
        name = f"scene-{example.people[0]}-{example.people[1]}.png"
        values.update(scene_image=_write_png(folder / name, scene(*people)), boxes=str(SCENE_BOXES))
    else:
        values.update(
            left_image=_write_png(folder / f"portrait-{example.people[0]}.png", portrait(people[0])),
            right_image=_write_png(folder / f"portrait-{example.people[1]}.png", portrait(people[1])),
            boxes="",
        )
    voices = list(example.voices)
    preset = usable_preset(example.preset, lora)
    if installed_voices is not None:
        spare = [v for v in (*DEFAULT_VOICES, *sorted(installed_voices)) if v in installed_voices]
        for i, v in enumerate(voices):
            if v not in installed_voices and spare:
                voices[i] = next((s for s in spare if s not in voices), spare[0])
    values.update(
        source=example.source,
        layout=example.layout,
        backdrop=example.backdrop,
        aspect=example.aspect,
        script=example.script,
        voice1=voices[0],
        voice2=voices[1],
        prompt=example.prompt,
        preset=preset,
        length_unit="seconds",
        speech=SPEECH_SCRIPT,
        audio_mode="add",
        **advanced_values(preset_settings(preset, job_defaults, lora), "seconds"),
    )
    return values
