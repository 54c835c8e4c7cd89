"""Render one job from a JSON file to an mp4, on one process or under torchrun.

    python -m inference.generate --preset tiny --weights weights/tiny --input JOB.json --out OUT.mp4
    torchrun --nproc-per-node=2 -m inference.generate --preset tiny --weights weights/tiny \\
        --input JOB.json --out OUT.mp4 --ulysses_size 2

JOB.json is upstream MultiTalk's format (``prompt``, ``cond_image``, ``cond_audio`` {person1, person2},
``audio_type`` add|para, ``bbox``, ``tts_audio`` {text, human1_voice, human2_voice}) or ours
(``left_image``, ``right_image`` or ``scene_image`` + ``boxes``, ``script`` in any supported format,
``voices``, ``prompt``, optional ``settings``). Relative paths are relative to the JSON file. Bad jobs
print a clear error and exit 2. Under torchrun every rank denoises (Ulysses) and rank 0 writes the mp4.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inference.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "multitalk-14b"), default="multitalk-14b")
    p.add_argument(
        "--weights", type=Path, default=None, help="weights root (default weights/ or weights/tiny)"
    )
    p.add_argument("--input", type=Path, required=True, help="job JSON")
    p.add_argument("--out", type=Path, required=True, help="output mp4 (side files go beside it)")
    p.add_argument("--quality", choices=("fast", "balanced", "quality"), default=None, help="settings preset")
    p.add_argument("--settings", default=None, help="JSON object of setting overrides")
    p.add_argument("--mode", choices=("streaming", "clip"), default=None)
    p.add_argument("--sample_steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ulysses_size", type=int, default=None, help="default: the world size")
    p.add_argument("--dit_fsdp", choices=("off", "full", "keep"), default="off")
    p.add_argument("--t5_cpu", action="store_true")
    return p


def _settings(args: argparse.Namespace, job: dict):
    from inference.settings import PRESETS, GenerationSettings

    values: dict = {}
    if args.quality:
        values.update(PRESETS[args.quality].settings.to_dict())
    if isinstance(job.get("settings"), dict):
        values.update(job["settings"])
    if args.settings:
        extra = json.loads(args.settings)
        if not isinstance(extra, dict):
            raise ValueError("--settings: expected a JSON object")
        values.update(extra)
    for key, value in (("mode", args.mode), ("steps", args.sample_steps), ("seed", args.seed)):
        if value is not None:
            values[key] = value
    if args.preset == "tiny":
        values.setdefault("steps", 4)
    return GenerationSettings.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from inference.runtime import Runtime, RuntimeOptions, setup_logging

    runtime = None
    try:
        runtime = Runtime.start(
            RuntimeOptions(
                preset=args.preset,
                weights=args.weights,
                ulysses_size=args.ulysses_size,
                dit_fsdp=args.dit_fsdp,
                t5_cpu=args.t5_cpu,
            )
        )
        setup_logging(runtime.ctx.rank)
        if runtime.ctx.is_rank0:
            return _rank0(args, runtime)
        runtime.follow()
        return 0
    except (ValueError, OSError) as exc:
        if runtime is None or runtime.ctx.is_rank0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if runtime is not None:
            runtime.close()


def _rank0(args: argparse.Namespace, runtime) -> int:
    from inference.pipeline import JobRequest

    try:
        job = json.loads(args.input.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the job file {args.input}: {exc}", file=sys.stderr)
        runtime.shutdown()
        return 2
    try:
        settings = _settings(args, job if isinstance(job, dict) else {})
        req = JobRequest.from_job_json(job, args.input.parent, settings)
        out = args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".render-", dir=out.parent))
        try:
            names = runtime.render(req, work)
            for name in names:
                target = out if name == "video.mp4" else out.parent / f"{out.stem}.{name}"
                shutil.move(str(work / name), target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        runtime.shutdown()
        return 2
    runtime.shutdown()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
