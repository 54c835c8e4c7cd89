"""Render a batch of jobs: ``python -m inference.batch jobs.jsonl --out DIR``, and ``render(job, out)`` for scripts.

    python -m inference.batch jobs.jsonl --out renders/ --preset tiny          # one loaded model, this process
    torchrun --nproc-per-node=2 -m inference.batch jobs.jsonl --out renders/   # the same over 2 ranks (Ulysses)
    python -m inference.batch jobs.jsonl --out renders/ --server http://host:8419 [--token T]   # a running service

``jobs.jsonl`` holds one job per line, the JSON the CLI reads (``python -m inference.generate --input``:
upstream MultiTalk's keys or ours, files by path relative to the jsonl's folder, else the working
directory), plus an optional ``"name"`` (the output folder; default ``job_0001`` by line). Each job ends in
``DIR/<name>/``: ``video.mp4``, its side files, ``stats.json`` and ``job.json`` (the line it came from).

Resumable: a job whose folder has its video, ``stats.json`` and the same ``job.json`` is skipped; a job
interrupted half-way resumes after its last finished clip (its work folder ``DIR/.work-<name>`` keeps the
clips); through a service, a job already submitted and still queued or running is waited for, not sent
again. Every job is checked before any weight loads; a bad line is reported with its line number and the
field, and the other jobs still render. Exit status: 0 when every job has its video, 1 otherwise.

``render(job, out_dir)`` renders one job in this process and returns the video's path; the model stays
loaded for the next call (``Batch``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import InputError
from common.files import atomic_write_bytes, atomic_write_text
from inference.parallel.host import configure_cpu_threads
from inference.render.cli import default_quality, local_limits, read_local_file
from inference.render.intake import Submission, build_job
from inference.render.pipeline import OUTPUT_VIDEO
from inference.render.settings import GenerationSettings
from inference.render.spec import JobInputError, parse_job_json
from inference.render.stats import STATS_FILE
from inference.render.worker import RenderJob, Runtime, RuntimeOptions, setup_logging

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
TASK_FILE = ".task_id"  # through a service: the id of the job submitted for this folder


@dataclass(frozen=True)
class BatchJob:
    """One line of the batch: its ``name`` (output folder), the job JSON and where its paths resolve."""

    name: str
    body: dict[str, Any]
    base: Path  # the jsonl (or job file) the relative paths are relative to
    line: int = 0

    def folder(self, out: Path) -> Path:
        return out / self.name

    def record(self) -> str:
        return json.dumps({"name": self.name, **self.body}, sort_keys=True, ensure_ascii=False)

    def finished(self, out: Path) -> bool:
        """Rendered before with this very job: video, stats.json and the same job.json."""
        folder = self.folder(out)
        try:
            same = (folder / JOB_FILE).read_text() == self.record()
        except OSError:
            return False
        return same and (folder / OUTPUT_VIDEO).is_file() and (folder / STATS_FILE).is_file()


def read_batch(path: Path) -> list[BatchJob]:
    """The jobs of a ``.jsonl`` file (blank lines and ``#`` comments skipped). A line that is not a JSON
    object, or a repeated name, raises ``JobInputError`` naming the line."""
    jobs: list[BatchJob] = []
    names: set[str] = set()
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise JobInputError(f"line {number}", f"not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise JobInputError(f"line {number}", "expected one JSON object per line")
        name = str(body.pop("name", f"job_{number:04d}"))
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise JobInputError(f"line {number}.name", f"{name!r} is not a folder name")
        if name in names:
            raise JobInputError(f"line {number}.name", f"{name!r} is used by an earlier line")
        names.add(name)
        jobs.append(BatchJob(name, body, path, number))
    return jobs


# ---------------------------------------------------------------------------------------------- local


def accept(job: BatchJob, options: RuntimeOptions) -> Submission:
    """Check one job as the CLI does (``inference.render.cli.load_job``) with its files read by path."""
    req = parse_job_json(job.body, read_local_file(job.base), source="cli", body_field=f"line {job.line}")
    req = dataclasses.replace(req, preset=req.preset or default_quality(options.speed.lora_state))
    return build_job(req, local_limits(options))


@dataclass
class _Outcome:
    outputs: list[str] = field(default_factory=list)
    error: str | None = None


class _BatchSink:
    """Per-job ends for ``Batch.render_all`` (``inference.render.worker.JobSink``)."""

    def __init__(self, progress: Callable[[str, float, str], None] | None) -> None:
        self.ended: dict[str, _Outcome] = {}
        self._progress = progress
        self._lock = threading.Lock()

    def progress(self, job_id: str, percent: float, stage: str) -> None:
        if self._progress is not None:
            self._progress(job_id, percent, stage)

    def timing(self, job_id: str, name: str, seconds: float) -> None:
        logger.debug("%s: %s = %.2fs", job_id, name, seconds)

    def state(self, job_id: str, state: str) -> None:
        logger.info("%s: %s", job_id, state)

    def cancel_requested(self, job_id: str) -> bool:
        return False

    def done(self, job_id: str, outputs: list[str]) -> None:
        with self._lock:
            self.ended[job_id] = _Outcome(outputs=list(outputs))

    def failed(self, job_id: str, reason: str, *, cancelled: bool = False, interrupted: bool = False) -> None:
        with self._lock:
            self.ended[job_id] = _Outcome(error=reason)

    def count(self) -> int:
        with self._lock:
            return len(self.ended)


class Batch:
    """One loaded model that renders jobs in this process (under torchrun: rank 0 drives, the others
    follow). Use ``render_all`` for many jobs, ``render`` for one."""

    def __init__(self, options: RuntimeOptions) -> None:
        self.options = options
        self.runtime = Runtime.start(options)

    @property
    def leader(self) -> bool:
        return self.runtime.ctx.is_rank0

    def render_all(
        self, jobs: Iterable[tuple[BatchJob, Submission]], out: Path,
        progress: Callable[[str, float, str], None] | None = None,
    ) -> dict[str, str | None]:  # fmt: skip
        """Render every job through one engine run (rank 0); ``{name: None or the reason it failed}``.
        Ranks > 0 call ``follow`` instead."""
        pending: list[RenderJob] = []
        for job, sub in jobs:
            work = out / f".work-{job.name}"
            (work / "inputs").mkdir(parents=True, exist_ok=True)
            for name, data in sub.files.items():
                atomic_write_bytes(work / "inputs" / name, data)
            settings = GenerationSettings.from_dict(sub.settings)
            pending.append(RenderJob(job.name, sub.spec, settings, work / "inputs", work))
        sink = _BatchSink(progress)
        total = len(pending)
        queue = list(reversed(pending))
        engine = None

        def source(timeout_s: float) -> RenderJob | None:
            if queue:
                return queue.pop()
            if sink.count() >= total:
                engine.request_shutdown()
            time.sleep(min(timeout_s, 0.05))
            return None

        if total:
            engine = self.runtime.make_engine(sink, source, heartbeat_s=30.0)
            engine.serve(install_signal_handlers=True)
            if self.runtime.finisher is not None:
                self.runtime.finisher.drain()
        results: dict[str, str | None] = {}
        for job in pending:
            outcome = sink.ended.get(job.job_id)
            if outcome is None:
                results[job.job_id] = "the engine stopped before the job ended"
            elif outcome.error is not None:
                results[job.job_id] = outcome.error
            else:
                _publish(job.out_dir, out / job.job_id, outcome.outputs)
                results[job.job_id] = None
        return results

    def follow(self) -> None:
        self.runtime.follow()

    def render(self, job: Mapping[str, Any] | str | os.PathLike[str], out_dir: str | os.PathLike[str],
               *, base_dir: str | os.PathLike[str] | None = None) -> Path:  # fmt: skip
        """Render one job (a dict or a job JSON file) into ``out_dir``; returns the video's path. One
        process only (under torchrun use ``render_all`` with ``follow`` on the other ranks)."""
        if self.runtime.ctx.distributed:
            raise RuntimeError(
                "Batch.render runs in one process; under torchrun use python -m inference.batch"
            )
        out_dir = Path(out_dir)
        if isinstance(job, Mapping):
            body, base = dict(job), Path(base_dir or Path.cwd()) / "job.json"
        else:
            base = Path(job)
            body = json.loads(base.read_text(encoding="utf-8"))
        bj = BatchJob(out_dir.name, body, base)
        sub = accept(bj, self.options)
        error = self.render_all([(bj, sub)], out_dir.parent)[bj.name]
        if error is not None:
            raise RuntimeError(f"{bj.name}: {error}")
        atomic_write_text(out_dir / JOB_FILE, bj.record())
        return out_dir / OUTPUT_VIDEO

    def close(self) -> None:
        self.runtime.close()


_DEFAULT: Batch | None = None


def render(job: Mapping[str, Any] | str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
           options: RuntimeOptions | None = None) -> Path:  # fmt: skip
    """Render one job in this process and return the path of its video (``out_dir/video.mp4``, with the
    side files and ``stats.json`` beside it). The model is loaded on the first call and kept for the
    next ones (``options`` on the first call: preset, weights, device; default the 14B preset). Later
    calls may repeat the same ``options``; different ones raise ValueError (the model is not reloaded)."""
    global _DEFAULT
    if _DEFAULT is None:
        torch.set_grad_enabled(False)
        _DEFAULT = Batch(options or RuntimeOptions())
    elif options is not None and options != _DEFAULT.options:
        raise ValueError(
            f"render: the model is already loaded with {_DEFAULT.options}; "
            "use a Batch of its own for other options"
        )
    return _DEFAULT.render(job, out_dir)


def _publish(work: Path, folder: Path, outputs: list[str]) -> None:
    """Move a finished job's outputs from its work folder into its own folder (replacing an older render)."""
    staging = folder.with_name(f".new-{folder.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in outputs:
        shutil.move(str(work / name), staging / name)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- service


def run_on_server(jobs: list[BatchJob], out: Path, server: str, *, token: str | None, in_flight: int,
                  report: Callable[[str], None]) -> dict[str, str | None]:  # fmt: skip
    """Send the jobs to a running service (at most ``in_flight`` queued at once), wait, download every
    output. A job already submitted for a folder (``.task_id``) and still alive is waited for, not resent."""
    # The client needs only requests: imported here so a local batch never loads it.
    from service.client import ApiError, DialogueClient, JobFailed

    client = DialogueClient(server, token=token)
    results: dict[str, str | None] = {}
    waiting: dict[str, tuple[BatchJob, str]] = {}
    todo = list(reversed(jobs))
    while todo or waiting:
        while todo and len(waiting) < in_flight:
            job = todo.pop()
            folder = job.folder(out)
            task = _live_task(client, folder / TASK_FILE)
            if task is None:
                try:
                    task = client.submit(job.body, base_dir=job.base.parent)
                except (ApiError, OSError) as exc:
                    results[job.name] = str(exc)
                    report(f"{job.name}: refused: {exc}")
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(folder / TASK_FILE, task)
            waiting[task] = (job, task)
        for task, (job, _) in list(waiting.items()):
            status = client.status(task)
            if status["status"] not in ("done", "failed", "cancelled"):
                continue
            del waiting[task]
            folder = job.folder(out)
            try:
                if status["status"] != "done":
                    raise JobFailed(status)
                for name in status["outputs"]:
                    client.download(task, folder / name, file=name)
                atomic_write_text(folder / JOB_FILE, job.record())
                (folder / TASK_FILE).unlink(missing_ok=True)
                results[job.name] = None
                report(f"{job.name}: done ({status['timing'].get('total_time', 0):.1f} s)")
            except (JobFailed, ApiError, OSError) as exc:
                (folder / TASK_FILE).unlink(missing_ok=True)
                results[job.name] = str(exc)
                report(f"{job.name}: failed: {exc}")
        if waiting:
            time.sleep(0.5)
    return results


def _live_task(client: Any, path: Path) -> str | None:
    """The task id saved for a folder when the service still has that job queued, running or done."""
    try:
        task = path.read_text().strip()
        status = client.status(task)
    except Exception:  # no file, an unknown id, a restarted service without it: submit again
        return None
    return task if status["status"] not in ("failed", "cancelled") else None


# ---------------------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inference.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("jobs", type=Path, help='a .jsonl file: one job JSON per line (optional "name")')
    p.add_argument("--out", type=Path, required=True, help="output folder: one sub-folder per job")
    p.add_argument("--server", default=None, help="render through a running service at this URL")
    p.add_argument("--token", default=os.environ.get("DIALOGUE_API_TOKEN"), help="the service's API token")
    p.add_argument("--in_flight", type=int, default=8, help="jobs queued on the service at once")
    p.add_argument("--preset", choices=("tiny", "multitalk-14b"), default="multitalk-14b")
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--ulysses_size", type=int, default=None)
    p.add_argument("--dit_fsdp", nargs="?", const="full", choices=("off", "full", "keep"), default="off")
    p.add_argument("--t5_cpu", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or "0")
    setup_logging(rank)
    say = print if rank == 0 else (lambda *_: None)
    try:
        jobs = read_batch(args.jobs)
    except (InputError, OSError) as exc:
        say(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not j.finished(args.out)]
    for job in jobs:
        if job not in todo:
            say(f"{job.name}: already rendered, skipped")
    if not todo:  # every rank sees the same folders: nothing to load a model for
        return _summary(jobs, todo, {}, say)
    if args.server is not None:
        results = run_on_server(todo, args.out, args.server, token=args.token, in_flight=max(1, args.in_flight),
                                report=say)  # fmt: skip
        return _summary(jobs, todo, results, say)
    options = RuntimeOptions(preset=args.preset, weights=args.weights, device=args.device,
                             ulysses_size=args.ulysses_size, dit_fsdp=args.dit_fsdp, t5_cpu=args.t5_cpu)  # fmt: skip
    accepted: list[tuple[BatchJob, Submission]] = []
    results = {}
    if rank == 0:  # every check before any weight loads
        for job in todo:
            try:
                accepted.append((job, accept(job, options)))
            except InputError as exc:
                results[job.name] = str(exc)
                say(f"{job.name} (line {job.line}): refused: {exc}")
    configure_cpu_threads()
    torch.set_grad_enabled(False)
    batch = Batch(options)
    try:
        if not batch.leader:
            batch.follow()
            return 0
        started = time.monotonic()
        ended = batch.render_all(accepted, args.out, progress=None)
        for job, _ in accepted:
            if ended[job.name] is None:
                atomic_write_text(job.folder(args.out) / JOB_FILE, job.record())
                say(f"{job.name}: done")
            else:
                say(f"{job.name}: failed: {ended[job.name]}")
        results.update(ended)
        say(f"{len(accepted)} job(s) rendered in {time.monotonic() - started:.1f} s")
    finally:
        batch.close()
    return _summary(jobs, todo, results, say)


def _summary(jobs: list[BatchJob], todo: list[BatchJob], results: Mapping[str, str | None],
             say: Callable[..., None]) -> int:  # fmt: skip
    failed = [n for n, err in results.items() if err is not None]
    say(f"batch: {len(jobs)} job(s), {len(jobs) - len(todo)} skipped, {len(todo) - len(failed)} rendered, "
        f"{len(failed)} failed")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
