"""Job views: the status of the job on screen with its downloads, the live queue, the gallery of finished
videos and the history, each row with its actions (show, load settings, new seed, cancel, delete).
A mixin of :class:`service.ui.handlers.UiHandlers` (it reads ``self.store``)."""

from __future__ import annotations

import html
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from common.files import atomic_write, atomic_write_text
from inference.render.stats import read_stats
from service.jobs import (
    InvalidTransitionError,
    Job,
    JobNotFoundError,
    JobState,
    JobStore,
    OutputNotFoundError,
    validate_job_id,
)
from service.ui.formatting import (
    STAGE_LABELS,
    error_html,
    error_md,
    fmt_duration,
    fmt_time,
    group_text,
    has_cues,
    job_group,
    job_summary,
    passes_text,
    plural,
    short_id,
    srt_to_vtt,
    stage_of,
    status_html,
    took_seconds,
)

logger = logging.getLogger(__name__)

HISTORY_LIMIT = 50
GALLERY_LIMIT = 24
DOWNLOADS_DIR = "downloads"  # inside the job's folder: named copies for the browser, removed with the job
THUMB_SIZE = (320, 180)
VIDEO_FILE, SRT_FILE, VTT_FILE = "video.mp4", "subtitles.srt", "subtitles.vtt"
# Files of a finished job that go into its zip of side files (the video and subtitles download alone).
RENDER_FILE = "render.json"  # the render record (inference.render.pipeline): size, clips, settings, passes
SIDE_FILES = ("reference.png", "overlay.png", "mix.wav", "timeline.json", RENDER_FILE)


@dataclass(frozen=True)
class Downloads:
    """Named copies of a job's files (``dialogue-<short id>.mp4`` ...); None where the job has none."""

    video: str | None = None
    srt: str | None = None
    vtt: str | None = None
    zip: str | None = None

    def paths(self) -> list[str]:
        return [p for p in (self.video, self.srt, self.vtt, self.zip) if p]


@dataclass(frozen=True)
class PollResult:
    """What one status poll shows (handler-level view, before Gradio updates)."""

    html: str
    terminal: bool
    video: str | None
    subtitles: str | None
    downloads: Downloads = field(default_factory=Downloads)
    cancellable: bool = False
    done: bool = False


def _button(action: str, job_id: str, label: str, title: str, cls: str = "") -> str:
    return (
        f'<button type="button" class="dv-act {cls}" data-action="{action}" data-job="{job_id}" '
        f'title="{html.escape(title)}">{label}</button>'
    )


def _file_link(path: str, label: str, name: str) -> str:
    # The page's script turns data-file into a URL under this app's root (see style.ACTIONS_JS).
    return f'<a class="dv-act" data-file="{html.escape(path)}" download="{html.escape(name)}">{label}</a>'


class JobHandlers:
    """Every method that takes ``viewer`` (the caller's credential, ``UiHandlers.viewer``; None: every job)
    sees only that credential's jobs: another's job is answered as if it did not exist, as in REST."""

    store: JobStore

    def visible_job(self, job_id: str, viewer: str | None = None) -> Job:
        """The job ``job_id`` if ``viewer`` may see it; InvalidJobIdError / JobNotFoundError otherwise."""
        job = self.store.get(validate_job_id(job_id.strip()))
        if not job.visible_to(viewer):
            raise JobNotFoundError(job.id)
        return job

    # -- the job on screen

    def current_job(self, stored: Any, query_job: str | None, viewer: str | None = None) -> str:
        """The job to reattach to on page load: ``?job=`` in the URL first, then the browser's stored id."""
        for candidate in (query_job, stored):
            if isinstance(candidate, str) and candidate:
                try:
                    self.visible_job(candidate, viewer)
                except (ValueError, JobNotFoundError):
                    continue
                return candidate
        return ""

    def poll(self, job_id: str | None, viewer: str | None = None) -> PollResult:
        """Status of one job for the status panel (HTML), its result files when done."""
        if not job_id:
            return PollResult("<p>No job yet: fill in the form and press Generate.</p>", True, None, None)
        try:
            job = self.visible_job(job_id, viewer)
        except (ValueError, JobNotFoundError) as exc:
            return PollResult(error_html(exc), True, None, None)
        video = subtitles = None
        downloads = Downloads()
        note = ""
        facts = ""
        if job.state == JobState.DONE:
            video, subtitles, downloads, note = self._results(job)
            facts = self.run_facts(job)
        cancellable = job.state == JobState.QUEUED or (job.is_active and not job.cancel_requested)
        return PollResult(
            status_html(job, self.store, note, facts), job.is_terminal, video, subtitles, downloads,
            cancellable, job.state == JobState.DONE,
        )  # fmt: skip

    def run_facts(self, job: Job) -> str:
        """Who ran a finished job and its model passes (computed / skipped by TeaCache), from its
        ``stats.json`` (group, ranks, devices, passes) or, without one, its ``render.json`` and the job row;
        empty when neither says."""
        folder = self.store.job_dir(job.id)
        stats = read_stats(folder) or {}
        passes = stats.get("passes")
        if not passes:
            try:
                render = json.loads((folder / RENDER_FILE).read_text())
            except (OSError, ValueError):
                render = None
            passes = render.get("passes") if isinstance(render, dict) else None
        group = stats.get("group") if isinstance(stats.get("group"), dict) else job_group(job)
        where = group_text(group)
        parts = [
            f"ran on {where}" if where else "",
            passes_text(passes if isinstance(passes, dict) else None),
        ]
        return " · ".join(p for p in parts if p)

    def _outputs(self, job: Job) -> tuple[dict[str, Path], list[str]]:
        paths: dict[str, Path] = {}
        missing: list[str] = []
        for name in job.outputs:
            try:
                paths[name] = self.store.output_path(job.id, name)
            except OutputNotFoundError as exc:
                missing.append(str(exc))
        return paths, missing

    def _results(self, job: Job) -> tuple[str | None, str | None, Downloads, str]:
        if job.purged_at is not None:
            return None, None, Downloads(), "The outputs of this job were removed by the retention clean-up."
        paths, missing = self._outputs(job)
        note = "; ".join(missing)
        if VIDEO_FILE not in paths:
            return None, None, Downloads(), note or "This job finished without a video file."
        try:
            downloads = self.downloads(job, paths)
        except OSError as exc:
            logger.warning("job %s: could not prepare the downloads: %s", job.id, exc)
            return str(paths[VIDEO_FILE]), None, Downloads(), f"the downloads could not be prepared ({exc})"
        return str(paths[VIDEO_FILE]), downloads.vtt, downloads, note

    def downloads(self, job: Job, paths: dict[str, Path] | None = None) -> Downloads:
        """Named copies in ``outputs/<id>/downloads/``: ``dialogue-<short>.mp4``, ``.srt`` and ``.vtt`` when
        the subtitles have cues (an uploaded-audio job has none), ``dialogue-<short>-files.zip`` of the side
        files. Made once (hard links where the disk allows) and removed with the job."""
        if paths is None:
            paths = self._outputs(job)[0]
        folder = self.store.job_dir(job.id) / DOWNLOADS_DIR
        folder.mkdir(exist_ok=True)
        stem = f"dialogue-{short_id(job.id)}"

        def named(src: Path, name: str) -> str:
            dst = folder / name
            if not dst.is_file():
                try:
                    os.link(src, dst)
                except OSError:  # no hard links here (another disk, some network file systems): copy
                    atomic_write(dst, lambda f: f.write(src.read_bytes()))
            return str(dst)

        video = named(paths[VIDEO_FILE], f"{stem}.mp4") if VIDEO_FILE in paths else None
        srt_text = paths[SRT_FILE].read_text(encoding="utf-8") if SRT_FILE in paths else ""
        srt = vtt = None
        if has_cues(srt_text):
            srt = named(paths[SRT_FILE], f"{stem}.srt")
            if VTT_FILE in paths:
                vtt = named(paths[VTT_FILE], f"{stem}.vtt")
            else:  # browsers only show WebVTT
                vtt_path = folder / f"{stem}.vtt"
                if not vtt_path.is_file():
                    atomic_write_text(vtt_path, srt_to_vtt(srt_text))
                vtt = str(vtt_path)
        side = [paths[n] for n in SIDE_FILES if n in paths]
        archive = None
        if side:
            zip_path = folder / f"{stem}-files.zip"
            if not zip_path.is_file():

                def write_zip(fh: Any) -> None:
                    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                        for p in side:
                            zf.write(p, arcname=p.name)

                atomic_write(zip_path, write_zip)
            archive = str(zip_path)
        return Downloads(video, srt, vtt, archive)

    def thumbnail(self, job: Job) -> str | None:
        """A small JPEG of the job's reference picture (the still the video starts from), made once."""
        try:
            src = self.store.output_path(job.id, "reference.png")
        except OutputNotFoundError:
            return None
        dst = self.store.job_dir(job.id) / DOWNLOADS_DIR / "thumbnail.jpg"
        if not dst.is_file():
            try:
                dst.parent.mkdir(exist_ok=True)
                with Image.open(src) as im:
                    im = im.convert("RGB")
                    im.thumbnail(THUMB_SIZE)
                    atomic_write(dst, lambda f: im.save(f, format="JPEG", quality=80))
            except OSError as exc:
                logger.warning("job %s: no thumbnail (%s)", job.id, exc)
                return None
        return str(dst)

    # -- actions

    def cancel(self, job_id: str | None, viewer: str | None = None) -> str:
        if not job_id:
            return "No job to cancel."
        try:
            job = self.store.request_cancel(self.visible_job(job_id, viewer).id)
        except InvalidTransitionError:
            return "This job has already finished; nothing to cancel."
        except (ValueError, JobNotFoundError) as exc:
            return error_md(exc)
        if job.state == JobState.CANCELLED:
            return f"Job `{short_id(job.id)}` cancelled."
        return f"Cancel requested: the engine stops job `{short_id(job.id)}` at its next step."

    def delete(self, job_id: str | None, viewer: str | None = None) -> str:
        """Remove a finished job with its files (gallery and history ``Delete``)."""
        if not job_id:
            return "No job to delete."
        try:
            self.store.delete(self.visible_job(job_id, viewer).id)
        except InvalidTransitionError:
            return "⚠️ This job has not finished: cancel it first, then delete it."
        except (ValueError, JobNotFoundError) as exc:
            return error_md(exc)
        return f"Deleted job `{short_id(job_id)}` and its files."

    # -- lists

    def history(
        self, limit: int = HISTORY_LIMIT, viewer: str | None = None
    ) -> tuple[list[list[Any]], list[str]]:
        """Rows for the history table (newest first) and the job id of each row."""
        rows: list[list[Any]] = []
        ids: list[str] = []
        for job in self.store.list(limit, visible_to=viewer):
            what, voices = job_summary(job)
            took = took_seconds(job)
            status = job.state.value
            if job.state == JobState.QUEUED and job.queue_position:
                status += f" (#{job.queue_position})"
            elif job.is_active:
                status += f" {job.progress:.0f}%"
            rows.append(
                [
                    short_id(job.id),
                    fmt_time(job.created_at),
                    status,
                    job.spec.get("preset", ""),
                    job.settings.get("steps", ""),
                    f"{job.settings.get('resolution', '')}p",
                    job.settings.get("seed", ""),
                    voices,
                    what,
                    "" if took is None else round(took, 1),
                ]
            )
            ids.append(job.id)
        return rows, ids

    def _row_actions(self, job: Job) -> str:
        acts = [_button("show", job.id, "Show", "Show this job's status and video")]
        if job.spec.get("kind") == "dialogue":
            acts.append(
                _button("load", job.id, "Load settings", "Put this job's inputs and settings in the form")
            )
            if job.is_terminal and job.purged_at is None:
                acts.append(
                    _button("seed", job.id, "New seed", "Render the same inputs again with a new seed")
                )
        if job.is_terminal and job.state != JobState.DONE and job.purged_at is None:
            acts.append(_button("retry", job.id, "Retry", "Submit the same inputs and seed again"))
        if not job.is_terminal and not job.cancel_requested:
            acts.append(_button("cancel", job.id, "Cancel", "Cancel this job", "dv-act-stop"))
        if job.is_terminal:
            acts.append(_button("delete", job.id, "Delete", "Delete this job and its files", "dv-act-stop"))
        return "".join(acts)

    def history_html(self, limit: int = HISTORY_LIMIT, viewer: str | None = None) -> str:
        jobs = self.store.list(limit, visible_to=viewer)
        if not jobs:
            return '<p class="dv-empty">No jobs yet.</p>'
        head = "".join(
            f"<th>{h}</th>" for h in ("job", "created", "status", "preset · steps · res · seed", "voices", "script",
                                      "time", "")
        )  # fmt: skip
        rows = []
        for job in jobs:
            what, voices = job_summary(job, 60)
            took = took_seconds(job)
            status = job.state.value
            if job.state == JobState.QUEUED and job.queue_position:
                status += f" #{job.queue_position}"
            elif job.is_active:
                status += f" {job.progress:.0f}%"
            s = job.settings
            rows.append(
                f'<tr data-job="{job.id}"><td><code>{short_id(job.id)}</code></td><td>{fmt_time(job.created_at)}</td>'
                f'<td><span class="dv-state dv-state-{job.state.value}">{html.escape(status)}</span></td>'
                f"<td>{html.escape(str(job.spec.get('preset', '')))} · {s.get('steps', '')} · "
                f"{s.get('resolution', '')}p · {s.get('seed', '')}</td><td>{html.escape(voices)}</td>"
                f"<td>{html.escape(what)}</td><td>{'' if took is None else fmt_duration(took)}</td>"
                f'<td class="dv-acts">{self._row_actions(job)}</td></tr>'
            )
        return f'<table class="dv-jobs" id="history-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'

    def queue_html(self, viewer: str | None = None) -> str:
        """Running and waiting jobs of this service (``viewer``'s own), in the order they run, each with
        Show and Cancel; positions are places in the whole queue."""
        active, queued = self.store.active(), self.store.queue()
        others = len(active) + len(queued)
        active, queued = (
            [j for j in active if j.visible_to(viewer)],
            [j for j in queued if j.visible_to(viewer)],
        )
        others -= len(active) + len(queued)
        more = (
            f'<p class="dv-empty">{plural(others, "job")} of other users running or waiting.</p>'
            if others
            else ""
        )
        if not active and not queued:
            return more or '<p class="dv-empty">Nothing is running or waiting.</p>'
        rows = []
        for job in [*active, *queued]:
            what, _ = job_summary(job, 60)
            if job.is_active:
                stage = stage_of(job.stage)
                where = f"{job.progress:.0f}% · " + (f"{STAGE_LABELS[stage]}: " if stage else "") + job.stage
                ran_by = group_text(job_group(job))
                where += f" · on {ran_by}" if ran_by else ""
                place = "running"
            else:
                where = f"waiting · submitted {fmt_time(job.created_at)}"
                place = f"#{job.queue_position}"
            rows.append(
                f'<tr data-job="{job.id}"><td><b>{place}</b></td><td><code>{short_id(job.id)}</code></td>'
                f"<td>{html.escape(where)}</td><td>{html.escape(what)}</td>"
                f'<td class="dv-acts">{self._row_actions(job)}</td></tr>'
            )
        return f'<table class="dv-jobs" id="queue-table"><tbody>{"".join(rows)}</tbody></table>{more}'

    def gallery_html(self, limit: int = GALLERY_LIMIT, viewer: str | None = None) -> str:
        """Finished videos as cards: thumbnail, when, how long, who ran it and its model passes, and
        Show / Download / Load settings / New seed / Delete."""
        cards = []
        for job in self.store.list(limit, state="done", visible_to=viewer):
            if job.purged_at is not None:
                continue
            paths, _ = self._outputs(job)
            if VIDEO_FILE not in paths:
                continue
            try:
                video = self.downloads(job, paths).video
            except OSError as exc:
                logger.warning("job %s: no gallery download (%s)", job.id, exc)
                video = None
            thumb = self.thumbnail(job)
            what, _ = job_summary(job, 48)
            facts = self.run_facts(job)
            took = took_seconds(job)
            img = (
                f'<img data-file="{html.escape(thumb)}" alt="job {short_id(job.id)}" loading="lazy">'
                if thumb
                else '<div class="dv-nothumb">no picture</div>'
            )
            link = _file_link(video, "Download", Path(video).name) if video else ""
            facts_line = f'<br><small class="dv-facts">{html.escape(facts)}</small>' if facts else ""
            cards.append(
                f'<div class="dv-card" data-job="{job.id}"><div class="dv-thumb" data-action="show" data-job="{job.id}">'
                f'{img}</div><div class="dv-cap"><code>{short_id(job.id)}</code> · {fmt_time(job.created_at)}'
                f"{'' if took is None else ' · ' + fmt_duration(took)}<br><small>{html.escape(what)}</small>"
                f"{facts_line}</div>"
                f'<div class="dv-acts">{_button("show", job.id, "Show", "Show this video")}{link}'
                f"{_button('load', job.id, 'Load settings', 'Put its inputs and settings in the form')}"
                f"{_button('seed', job.id, 'New seed', 'Render the same inputs with a new seed')}"
                f"{_button('delete', job.id, 'Delete', 'Delete this job and its files', 'dv-act-stop')}</div></div>"
            )
        if not cards:
            return '<p class="dv-empty">Finished videos appear here.</p>'
        return f'<div class="dv-gallery" id="gallery-grid">{"".join(cards)}</div>'

    def panels_signature(self, limit: int = HISTORY_LIMIT, viewer: str | None = None) -> str:
        """Changes whenever a list would show something new (cheap: one query of the newest jobs)."""
        jobs = self.store.list(limit, visible_to=viewer)
        return (
            "|".join(
                f"{j.id[:8]}{j.state.value}{j.progress:.0f}{j.stage}{int(j.cancel_requested)}{j.purged_at}"
                for j in jobs
            )
            + f"|{self.store.count()}|{self.store.count(state='queued')}"  # others' jobs move the queue too
        )
