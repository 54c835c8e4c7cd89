"""The form: which values the page sends, how advanced values relate to a preset, and the two ways
between form values and a job (values -> submission, stored job -> values for "load settings").

``values`` is a dict keyed by :data:`FORM_FIELDS` (what the Generate button sends); images and
recordings are file paths. Pure Python and the store; no Gradio.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import InputError
from inference.render.intake import Limits, default_preset
from inference.render.settings import (
    FPS,
    MAX_FRAMES_LIMIT,
    PRESETS,
    GenerationSettings,
    LoraState,
    SettingsError,
    offered_presets,
    preset_catalog,
)
from inference.render.spec import JobSpec, default_prompt
from service import submit as one_submit
from service.jobs import Job, JobStore
from service.ui.formatting import field_label, plural
from service.validation import RequestError
from tts.voices import voices_by_language

LAYOUT_CHOICES = [("Side by side", "side_by_side"), ("Shared backdrop", "backdrop")]
BACKDROP_CHOICES = [("Blurred mix of both photos", "blur"), ("Plain colour", "plain")]
ASPECT_CHOICES = [
    ("16:9 wide", "16:9"),
    ("4:3", "4:3"),
    ("1:1 square", "1:1"),
    ("3:4", "3:4"),
    ("9:16 tall", "9:16"),
]
RESOLUTION_CHOICES = [("480p", 480), ("720p", 720)]
LENGTH_UNITS = ["seconds", "frames"]
PRESET_LABELS = {"fast": "Fast", "balanced": "Balanced", "quality": "Quality"}
# Where the speech comes from: the tab of the speech section that is open when Generate is pressed.
SPEECH_SCRIPT, SPEECH_AUDIO = "script", "audio"
# Who is in the picture: the tab of the people section (two portraits, one scene with both, one person).
SOURCE_PORTRAITS, SOURCE_SCENE, SOURCE_SINGLE = "portraits", "scene", "single"
AUDIO_MODE_CHOICES = [
    ("add: person 1 speaks first, then person 2 (one after the other)", "add"),
    ("para: both tracks play at once, as recorded (overlapping speech)", "para"),
]
AUDIO_FORMATS_TEXT = "WAV, FLAC, MP3 or M4A"
IMAGE_FORMATS_TEXT = "PNG, JPEG or WebP"

# Order of the values the Generate button sends (tests pass a dict with these keys).
FORM_FIELDS = (
    "source",
    "left_image",
    "right_image",
    "scene_image",
    "boxes",
    "layout",
    "backdrop",
    "aspect",
    "resolution",
    "script",
    "voice1",
    "voice2",
    "prompt",
    "preset",
    "steps",
    "text_guidance",
    "audio_guidance",
    "seed",
    "max_length",
    "length_unit",
    "color_correction",
    "negative_prompt",
    "apg",
    "speech",
    "audio1",
    "audio2",
    "audio_mode",
    "single_image",
)
# The values a preset fills (and the user may change: then a preset change keeps them).
ADVANCED_FIELDS = (
    "steps",
    "text_guidance",
    "audio_guidance",
    "seed",
    "resolution",
    "max_length",
    "color_correction",
    "negative_prompt",
    "apg",
)
_SETTING_OF = {"max_length": "max_frames"}  # advanced field -> GenerationSettings field


def voice_choices(installed: frozenset[str] | None = None) -> list[tuple[str, str]]:
    """Dropdown choices ``(label, id)`` grouped by language: ``"af_heart — American English, female, ..."``;
    only the installed voices when the service says which (the tiny demo has four)."""
    out: list[tuple[str, str]] = []
    for voices in voices_by_language().values():
        for v in voices:
            if installed is None or v.id in installed:
                out.append((f"{v.id} — {v.language_name}, {v.gender}, {v.description}", v.id))
    return out


def offered_preset_names(lora: LoraState = LoraState()) -> list[str]:
    """The presets this service runs (a service that merged its LoRA offers only its distilled one)."""
    return list(offered_presets(lora))


def usable_preset(preset: str | None, lora: LoraState = LoraState()) -> str:
    """``preset`` when this service offers it, else the preset a job that names none gets here."""
    return preset if preset in offered_presets(lora) else default_preset(lora)


def preset_summary(lora: LoraState = LoraState()) -> str:
    """``"Fast: 16 steps, guidance text 1 / audio 4, 480p · ..."`` for the preset picker: the presets this
    service offers with the values they run here (``preset_catalog``, what /api/info reports)."""
    parts = []
    for name, p in preset_catalog(lora).items():
        if not p["offered"]:
            continue
        shift = f", shift {p['shift']:g}" if p["shift"] is not None else ""
        parts.append(
            f"{PRESET_LABELS.get(name, name)}: {p['steps']} steps, guidance text {p['text_guidance']:g} / audio "
            f"{p['audio_guidance']:g}{shift}, {p['resolution']}p"
            + (" with the LoRA" if p["uses_lora"] else "")
        )
    return " · ".join(parts)


def preset_settings(
    preset: str, job_defaults: Mapping[str, Any] | None = None, lora: LoraState = LoraState()
) -> GenerationSettings:
    """What a job of ``preset`` renders with when the user changes nothing: the preset as this service
    runs it (``lora``), under the service's start-up settings (the same layering as the submission)."""
    if preset not in PRESETS:
        raise SettingsError(
            "preset", f"unknown preset {preset!r}; allowed: {', '.join(offered_presets(lora))}"
        )
    return PRESETS[preset].apply(dict(job_defaults or {}), lora)


def advanced_values(settings: GenerationSettings, length_unit: str = "seconds") -> dict[str, Any]:
    """The advanced fields' values for ``settings`` (maximum length in ``length_unit``)."""
    s = settings
    max_length = convert_length(s.max_frames, "frames", length_unit)
    return {
        "steps": s.steps,
        "text_guidance": s.text_guidance,
        "audio_guidance": s.audio_guidance,
        "seed": s.seed,
        "resolution": s.resolution,
        "max_length": max_length,
        "color_correction": s.color_correction,
        "negative_prompt": s.negative_prompt,
        "apg": s.apg,
    }


def convert_length(value: float | None, old_unit: str, new_unit: str) -> float | None:
    if value is None or old_unit == new_unit:
        return value
    return round(float(value) * FPS) if new_unit == "frames" else round(float(value) / FPS, 2)


def _length_frames(length: Any, unit: str, frame_num: int) -> int:
    try:
        value = float(length)
    except (TypeError, ValueError):
        raise SettingsError("max_frames", f"{length!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise SettingsError("max_frames", f"must be more than 0 {unit}, got {plural(value, unit[:-1])}")
    frames = round(value) if unit == "frames" else math.ceil(value * FPS - 1e-9)
    if frames < frame_num:
        raise SettingsError(
            "max_frames",
            f"{plural(value, unit[:-1])} is shorter than one clip; the least is {plural(frame_num, 'frame')} "
            f"= {plural(frame_num / FPS, 'second')}",
        )
    if frames > MAX_FRAMES_LIMIT:
        raise SettingsError(
            "max_frames",
            f"{plural(value, unit[:-1])} is more than the longest video, {plural(MAX_FRAMES_LIMIT, 'frame')} = "
            f"{plural(MAX_FRAMES_LIMIT / FPS, 'second')}",
        )
    return frames


def settings_overrides(
    values: Mapping[str, Any], job_defaults: Mapping[str, Any] | None = None, lora: LoraState = LoraState()
) -> dict[str, Any]:
    """Advanced values -> overrides relative to the preset under the service defaults (only what
    differs). Raises SettingsError naming the setting for a length shorter than one clip or a bad number."""
    base = preset_settings(values["preset"], job_defaults, lora).to_dict()
    candidate: dict[str, Any] = {}
    for key in ("steps", "text_guidance", "audio_guidance", "seed", "resolution", "color_correction", "apg"):
        if values.get(key) is not None:
            candidate[key] = values[key]
    for key in ("steps", "seed", "resolution"):
        if key in candidate and isinstance(candidate[key], float) and candidate[key].is_integer():
            candidate[key] = int(candidate[key])
    if values.get("negative_prompt") is not None:
        candidate["negative_prompt"] = values["negative_prompt"]
    if values.get("max_length") is not None:
        unit = values.get("length_unit") or "seconds"
        candidate["max_frames"] = _length_frames(values["max_length"], unit, base["frame_num"])
    return {k: v for k, v in candidate.items() if base.get(k) != v}


def preset_change(
    preset: str, length_unit: str, current: Mapping[str, Any], touched: set[str] | list[str],
    job_defaults: Mapping[str, Any] | None = None, lora: LoraState = LoraState(),
) -> tuple[dict[str, Any], str]:  # fmt: skip
    """A new preset fills the advanced fields the user has not set and keeps the ones they set.

    Returns (field -> new value, only for the untouched fields; a sentence saying what happened)."""
    new = advanced_values(preset_settings(preset, job_defaults, lora), length_unit)
    kept = [f for f in ADVANCED_FIELDS if f in set(touched)]
    label = PRESET_LABELS.get(preset, preset)
    if not kept:
        return new, f"{label} preset: every advanced value follows it."
    shown = ", ".join(f"{field_label(_SETTING_OF.get(f, f)).lower()} ({current.get(f)})" for f in kept)
    note = f"{label} preset filled the other advanced values; kept the ones you set: {shown}."
    return {k: v for k, v in new.items() if k not in kept}, note


# ---------------------------------------------------------------------------------------------- submit


def submit_form(
    store: JobStore,
    form: Mapping[str, Any],
    files: Mapping[str, bytes],
    *,
    limits: Limits | None = None,
    owner: str | None = None,
) -> str:
    """The service's one submit path (``service.submit.submit_form``, shared with REST) for one form
    submission by ``owner`` (a credential; None: everyone's); returns the new job's id, as the page's
    ``submit`` callable does. Raises InputError for bad input and the store's QueueFullError / DiskFullError."""
    limits = Limits() if limits is None else limits
    return one_submit.submit_form(store, form, files, limits=limits, owner=owner).id


def _file(values: Mapping[str, Any], key: str, what: str) -> bytes:
    if not values.get(key):
        raise RequestError(key, f"required: {what}")
    return Path(values[key]).read_bytes()


def form_from_values(
    values: Mapping[str, Any], job_defaults: Mapping[str, Any] | None = None, lora: LoraState = LoraState()
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Form values -> (REST form fields, uploaded files by form name). The open tabs decide what is sent
    (the submission refuses a script and recordings together, and counts people from what it gets).
    Raises InputError for a missing upload (naming it) or a bad advanced value."""
    source = values.get("source") or SOURCE_PORTRAITS
    one = source == SOURCE_SINGLE
    form: dict[str, Any] = {
        "prompt": (values.get("prompt") or "").strip() or None,
        "preset": values.get("preset"),
        "settings": settings_overrides(values, job_defaults, lora),
    }
    files: dict[str, bytes] = {}
    if values.get("speech") == SPEECH_AUDIO:
        files["audio1"] = _file(values, "audio1", f"upload the recording of person 1 ({AUDIO_FORMATS_TEXT})")
        if not one:
            files["audio2"] = _file(
                values, "audio2", f"upload the recording of person 2 ({AUDIO_FORMATS_TEXT})"
            )
            form["audio_mode"] = values.get("audio_mode") or "add"
    else:
        form.update(script=values.get("script") or "", voice1=values.get("voice1"))
        if not one:
            form["voice2"] = values.get("voice2")
    if one:
        files["image"] = _file(
            values, "single_image", f"upload a picture of the person ({IMAGE_FORMATS_TEXT})"
        )
    elif source == SOURCE_SCENE:
        files["scene_image"] = _file(
            values, "scene_image", f"upload one image with both people ({IMAGE_FORMATS_TEXT})"
        )
        boxes = values.get("boxes")
        if boxes and boxes.strip():
            form["boxes"] = boxes
    else:
        files["left_image"] = _file(
            values, "left_image", f"upload the portrait of person 1 ({IMAGE_FORMATS_TEXT})"
        )
        files["right_image"] = _file(
            values, "right_image", f"upload the portrait of person 2 ({IMAGE_FORMATS_TEXT})"
        )
        form["layout"] = values.get("layout") or "side_by_side"
        if form["layout"] == "backdrop":
            form["backdrop"] = values.get("backdrop") or "blur"
        if values.get("aspect"):
            form["aspect"] = values["aspect"]
    return form, files


# ---------------------------------------------------------------------------------------------- jobs


def job_spec(job: Job) -> JobSpec:
    """The stored job as the typed contract; InputError naming the job when it is no dialogue job."""
    try:
        return JobSpec.from_json(job.spec)
    except InputError as exc:
        raise RequestError("id", f"job {job.id[:8]} cannot be read back here ({exc.message})") from None


def rerun_inputs(store: JobStore, job: Job, *, new_seed: bool) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The REST form of a stored job (its input files from ``outputs/<id>/inputs/``), with a fresh random
    seed when ``new_seed``. Raises OSError when the inputs are gone."""
    spec = job_spec(job)

    def read(name: str) -> bytes:
        return store.input_path(job.id, name).read_bytes()

    overrides = dict(spec.settings_overrides)
    if new_seed:
        overrides["seed"] = -1  # drawn once at submission
    form: dict[str, Any] = {"prompt": spec.prompt, "preset": spec.preset, "settings": overrides}
    files: dict[str, bytes] = {}
    if spec.audio is not None:
        for i, person in enumerate(spec.audio.values(), start=1):
            files[f"audio{i}"] = read(person)
        if spec.people == 2:
            form["audio_mode"] = spec.audio_mode
    else:
        form["script"] = spec.script
        for i, voice in enumerate(spec.voices or (), start=1):
            form[f"voice{i}"] = voice
    if spec.layout == "single":
        files["image"] = read(spec.images["image"])
    elif spec.layout == "scene":
        files["scene_image"] = read(spec.images["scene"])
        if spec.scene.boxes is not None:
            form["boxes"] = json.dumps([list(b) for b in spec.scene.boxes])
    else:
        files["left_image"], files["right_image"] = read(spec.images["left"]), read(spec.images["right"])
        form["layout"] = spec.scene.layout
        if spec.scene.layout == "backdrop" and spec.scene.backdrop is not None:
            form["backdrop"] = spec.scene.backdrop
        if spec.scene.aspect is not None:
            form["aspect"] = spec.scene.aspect
    return form, files


def values_from_job(
    store: JobStore, job: Job, job_defaults: Mapping[str, Any] | None = None, lora: LoraState = LoraState()
) -> tuple[dict[str, Any], list[str], list[str]]:
    """A stored job back as form values ("load settings"): images and recordings as paths of the job's
    stored inputs, the script or recordings, voices, prompt, preset and the settings it rendered with
    (its concrete seed). Returns (values, advanced fields that differ from the preset, inputs that are
    no longer on disk)."""
    spec = job_spec(job)
    missing: list[str] = []

    def path(field: str, name: str) -> str | None:
        try:
            p = store.input_path(job.id, name)
        except (ValueError, OSError):
            p = None
        if p is None or not p.is_file():
            missing.append(field)
            return None
        return str(p)

    values: dict[str, Any] = {k: None for k in FORM_FIELDS}
    sc = spec.scene
    source = {"single": SOURCE_SINGLE, "scene": SOURCE_SCENE}.get(spec.layout, SOURCE_PORTRAITS)
    values.update(source=source, boxes="", layout="side_by_side", backdrop="blur", aspect="16:9")
    if source == SOURCE_SINGLE:
        values["single_image"] = path("single_image", spec.images["image"])
    elif source == SOURCE_SCENE:
        values["scene_image"] = path("scene_image", spec.images["scene"])
        values["boxes"] = json.dumps([list(b) for b in sc.boxes]) if sc.boxes is not None else ""
    else:
        values["left_image"] = path("left_image", spec.images["left"])
        values["right_image"] = path("right_image", spec.images["right"])
        values.update(layout=sc.layout, backdrop=sc.backdrop or "blur", aspect=sc.aspect or "16:9")
    voices = list(spec.voices or ())
    values.update(
        speech=SPEECH_AUDIO if spec.audio is not None else SPEECH_SCRIPT,
        script=spec.script or "",
        voice1=voices[0] if voices else None,
        voice2=voices[1] if len(voices) > 1 else None,
        audio_mode=spec.audio_mode or "add",
    )
    for i, name in enumerate((spec.audio or {}).values(), start=1):
        values[f"audio{i}"] = path(f"audio{i}", name)
    preset = usable_preset(spec.preset, lora)  # a preset this service does not offer: its default
    prompt = "" if spec.prompt == default_prompt(spec.people) else spec.prompt
    values.update(prompt=prompt, preset=preset, length_unit="seconds")
    values.update(advanced_values(GenerationSettings.from_dict(dict(job.settings)), "seconds"))
    base = advanced_values(preset_settings(preset, job_defaults, lora), "seconds")
    differ = [f for f in ADVANCED_FIELDS if base[f] != values[f]]
    return values, differ, missing
