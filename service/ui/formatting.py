"""Text and HTML the page shows: field labels as the user sees them, durations, plurals, the job status
panel with its stage line, subtitles conversion. Pure functions, no Gradio."""

from __future__ import annotations

import html
import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from service.errors import answer_for
from service.jobs import Job, JobState, JobStore

logger = logging.getLogger(__name__)


# Every form and setting field under the name the page gives it (errors name the field this way).
FIELD_LABELS: dict[str, str] = {
    "left_image": "Portrait of person 1 (left)",
    "right_image": "Portrait of person 2 (right)",
    "scene_image": "Scene image",
    "image": "Picture of the person",
    "single_image": "Picture of the person",
    "picture": "Pictures",
    "speech": "Script",
    "boxes": "Boxes",
    "layout": "Layout",
    "backdrop": "Backdrop",
    "aspect": "Aspect ratio",
    "size": "Resolution",
    "script": "Script",
    "voice": "Voice",
    "voice1": "Voice of person 1",
    "voice2": "Voice of person 2",
    "prompt": "Scene description",
    "preset": "Preset",
    "settings": "Settings",
    "names": "Speaker names",
    "audio1": "Recording of person 1 (left)",
    "audio2": "Recording of person 2 (right)",
    "audio_mode": "How the recordings play",
    "id": "Job",
}
SETTING_LABELS: dict[str, str] = {
    "steps": "Steps",
    "text_guidance": "Text guidance",
    "audio_guidance": "Audio guidance",
    "seed": "Seed",
    "resolution": "Resolution",
    "max_frames": "Maximum length",
    "color_correction": "Colour correction",
    "negative_prompt": "Negative prompt",
    "apg": "APG",
    "shift": "Shift",
    "frame_num": "Frames per clip",
    "motion_frames": "Motion frames",
    "mode": "Mode",
    "apg_momentum": "APG momentum",
    "apg_norm_threshold": "APG norm threshold",
}


def plural(count: float, word: str, words: str | None = None) -> str:
    """``"1 second"``, ``"2 seconds"``, ``"1.5 seconds"`` (numbers printed with ``:g``)."""
    one = count == 1
    return f"{count:g} {word if one else (words or word + 's')}"


def field_label(field: str | None) -> str:
    """The label the page shows for a form or settings field (``settings.max_frames`` -> Maximum length)."""
    if not field:
        return "Input"
    name = field.split(".", 1)[1] if field.startswith("settings.") else field
    return SETTING_LABELS.get(name) or FIELD_LABELS.get(name) or name.replace("_", " ").capitalize()


def error_parts(exc: BaseException, default_field: str | None = None) -> tuple[str | None, str]:
    """(label of the field or None, message): what the service tells a client about ``exc`` (the REST
    API's table, ``service.errors.answer_for``): an InputError's field and message, the store's errors
    (queue full, disk full, no such job ...) with theirs. ``default_field`` names the input when the
    error has none. An error the table does not know is a bug: logged with its traceback, one sentence."""
    answer = answer_for(exc)
    if answer is None:
        logger.error("unexpected error shown on the page", exc_info=exc)
        return None, f"Something went wrong ({type(exc).__name__}); the service log has the details."
    field = answer.field or default_field
    message = answer.message
    if field and message.startswith(f"{field}:"):
        message = message[len(field) + 1 :].strip()
    return (field_label(field) if field else None), message


def error_md(exc: BaseException, default_field: str | None = None) -> str:
    """``⚠️ **<label>**: <message>`` (see :func:`error_parts`); raw setting names become labels."""
    label, message = error_parts(exc, default_field)
    return f"⚠️ **{label}**: {message}" if label else f"⚠️ {message}"


def error_html(exc: BaseException, default_field: str | None = None) -> str:
    """The same sentence as :func:`error_md` as an HTML paragraph."""
    label, message = error_parts(exc, default_field)
    head = f"<b>{html.escape(label)}</b>: " if label else ""
    return f'<p class="dv-error">⚠️ {head}{html.escape(message)}</p>'


def fmt_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_time(ts: float | None) -> str:
    return "" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def short_id(job_id: str) -> str:
    return job_id[:8]


def srt_to_vtt(srt: str) -> str:
    """SRT text -> WebVTT text (timestamps use '.' and a WEBVTT header; cue numbers may stay)."""
    lines = ["WEBVTT", ""]
    for line in srt.replace("\r\n", "\n").split("\n"):
        if "-->" in line:
            line = line.replace(",", ".")
        lines.append(line)
    return "\n".join(lines).rstrip("\n") + "\n"


def has_cues(subtitles: str) -> bool:
    """Whether SRT/VTT text holds at least one cue (an uploaded-audio job's subtitles are empty)."""
    return "-->" in subtitles


def took_seconds(job: Job) -> float | None:
    """How long a job took: the engine's total_time, else finished - started; None while unknown."""
    took = job.timings.get("total_time")
    if took is None and job.started_at and job.finished_at:
        took = job.finished_at - job.started_at
    return took


def audio_job_summary(spec: Mapping[str, Any]) -> str:
    """History text of an uploaded-audio job: ``"audio files, add: 3.2 s + 4.1 s"``."""
    mode = spec.get("audio_mode") or "add"
    seconds = spec.get("audio_seconds") or {}
    lengths = [seconds.get(k) for k in ("person1", "person2")]
    if all(isinstance(v, int | float) for v in lengths):
        joiner = " + " if mode == "add" else " ‖ "
        return f"audio files, {mode}: " + joiner.join(fmt_duration(v) for v in lengths)
    return f"audio files, {mode}"


def job_summary(job: Job, width: int = 70) -> tuple[str, str]:
    """(what is said: the script's first lines or the recordings, voices) for lists of jobs."""
    spec = job.spec
    script = spec.get("script")
    voices = " + ".join(spec.get("voices") or [])
    if script:
        first = " / ".join(line.strip() for line in script.splitlines() if line.strip())
        return first[:width] + ("…" if len(first) > width else ""), voices
    if spec.get("audio_source") == "files":
        return audio_job_summary(spec), "own recordings"
    return "", voices


# ---------------------------------------------------------------------------------------------- stages

STAGES = ("speech", "scene", "conditioning", "denoising", "decoding", "muxing")
STAGE_LABELS = {
    "speech": "Speech",
    "scene": "Scene",
    "conditioning": "Conditioning",
    "denoising": "Denoising",
    "decoding": "Decoding",
    "muxing": "Muxing",
}
_STAGE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("speech", re.compile(r"^(preparing|synthesising speech|loading audio)")),
    ("scene", re.compile(r"^composing the scene")),
    ("conditioning", re.compile(r"^(encoding audio|encoding the prompt|prepared|conditioning)")),
    ("denoising", re.compile(r"^clip \d+ of \d+, step")),
    ("decoding", re.compile(r"^decoding")),
    ("muxing", re.compile(r"^(encoding the video|muxing)")),
)


def stage_of(stage_text: str) -> str | None:
    """Which of STAGES a renderer's stage text belongs to (None for texts outside the render)."""
    text = (stage_text or "").strip().lower()
    for name, pattern in _STAGE_PATTERNS:
        if pattern.match(text):
            return name
    return None


def _stepper(current: str) -> str:
    index = STAGES.index(current)
    parts = []
    for i, name in enumerate(STAGES):
        cls = "dv-step-done" if i < index else ("dv-step-now" if i == index else "dv-step-todo")
        parts.append(f'<span class="dv-step {cls}">{STAGE_LABELS[name]}</span>')
    return f'<div class="dv-steps" data-stage="{current}">{" › ".join(parts)}</div>'


def _ranks_text(ranks: Sequence[int]) -> str:
    """``rank 0``, ``ranks 2–3`` (a contiguous run) or ``ranks 0, 2, 5``."""
    ranks = [int(r) for r in ranks]
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"ranks {ranks[0]}–{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))


def group_text(group: Mapping[str, Any] | None) -> str:
    """Who ran a job, from ``stats.json``'s ``group`` (or the job row's group, ranks and devices):
    ``group 1 of 2 · ranks 2–3 · cuda:2, cuda:3 · node a``; empty when nothing is known."""
    if not group:
        return ""
    parts: list[str] = []
    index, count = group.get("group"), group.get("groups")
    if isinstance(index, int) and not (isinstance(count, int) and count <= 1):
        parts.append(f"group {index}" + (f" of {count}" if isinstance(count, int) else ""))
    ranks = group.get("ranks") or ()
    if ranks:
        parts.append(_ranks_text(ranks))
    devices = [str(d) for d in group.get("devices") or ()]
    if devices:
        same = len(set(devices)) == 1 and len(devices) > 1
        parts.append(f"{len(devices)} × {devices[0]}" if same else ", ".join(devices))
    if group.get("node"):
        parts.append(f"node {group['node']}")
    return " · ".join(parts)


def passes_text(passes: Mapping[str, Any] | None) -> str:
    """A render's model work from its ``passes`` record (``render.json`` / ``stats.json``): ``model passes:
    96 computed, 24 skipped by TeaCache (20%) in 48 batched forwards``; empty when there is none."""
    if not passes:
        return ""
    computed, skipped = int(passes.get("computed") or 0), int(passes.get("skipped") or 0)
    if computed + skipped == 0:
        return ""
    text = f"model passes: {computed} computed, "
    text += (
        f"{skipped} skipped by TeaCache ({100 * skipped / (computed + skipped):.0f}%)"
        if skipped
        else "none skipped"
    )
    calls = passes.get("model_calls")
    if isinstance(calls, int) and 0 < calls < computed:
        text += f" in {plural(calls, 'batched forward')}"
    resumed = passes.get("resumed_after_clip")
    if isinstance(resumed, int) and resumed > 0:
        text += f"; {plural(resumed, 'clip')} came from an earlier attempt (not counted)"
    return text


def job_group(job: Job) -> dict[str, Any] | None:
    """The job row's replica group, ranks and devices (set when a group claims it) as ``group_text`` takes."""
    if job.replica_group is None and not job.devices:
        return None
    return {"group": job.replica_group, "ranks": list(job.ranks), "devices": list(job.devices)}


def status_html(job: Job, store: JobStore, note: str = "", facts: str = "") -> str:
    """The status panel of one job: state, percent, progress bar, the stage by name, timings; ``facts``
    (plain text) says who ran a finished job and its model passes."""
    state = job.state.value
    progress = 100.0 if job.state == JobState.DONE else job.progress
    lines = [
        f'<div class="dv-status"><b>Job</b> <code>{short_id(job.id)}</code> '
        f'<span class="dv-state dv-state-{state}">{state}</span> <b>{progress:.0f}%</b>',
        f'<div class="dv-progress" role="progressbar" aria-valuenow="{progress:.0f}" aria-valuemin="0" '
        f'aria-valuemax="100"><div style="width: {progress:.1f}%"></div></div>',
    ]
    now = time.time()
    if job.state == JobState.QUEUED:
        waiting = store.count(state="queued")
        running = len(store.active())
        lines.append(
            f"Waiting in the queue: position <b>{job.queue_position}</b> of {waiting}"
            + (f", {plural(running, 'job')} running" if running else "")
            + f" · submitted {fmt_duration(now - job.created_at)} ago"
        )
        if job.stage and job.stage != "waiting in queue":
            lines.append(f"<br><em>{html.escape(job.stage)}</em>")
    elif job.is_active:
        current = stage_of(job.stage)
        if current is not None:
            lines.append(_stepper(current))
        elapsed = now - (job.started_at or job.created_at)
        label = f"{STAGE_LABELS[current]}: " if current else ""
        where = group_text(job_group(job))
        lines.append(
            f'<span class="dv-stage">{label}{html.escape(job.stage or state)}</span> · running for '
            f"{fmt_duration(elapsed)}" + (f" on {html.escape(where)}" if where else "")
        )
        if job.cancel_requested:
            lines.append(" · <b>cancelling…</b>")
    elif job.state == JobState.DONE:
        total = took_seconds(job)
        parts = [
            f"{k.removesuffix('_time').replace('_', ' ')} {fmt_duration(v)}" for k, v in job.timings.items()
        ]
        lines.append("Done" + (f" in {fmt_duration(total)}" if total is not None else "") + ".")
        if parts:
            lines.append(f"<br><small>{html.escape(' · '.join(parts))}</small>")
        if facts:
            lines.append(f'<br><small class="dv-facts">{html.escape(facts)}</small>')
    elif job.state == JobState.FAILED:
        lines.append(
            f'<span class="dv-error">Failed: {html.escape(job.error or "no reason recorded")}</span>'
        )
    elif job.state == JobState.CANCELLED:
        lines.append("Cancelled.")
    if note:
        lines.append(f'<br><span class="dv-error">{html.escape(note)}</span>')
    lines.append("</div>")
    return "\n".join(lines)
