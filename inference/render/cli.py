"""Render one job from a JSON file to an mp4, on one process or under torchrun.

    python -m inference.generate --preset tiny --weights weights/tiny --input JOB.json --out OUT.mp4
    torchrun --nproc-per-node=2 -m inference.generate --preset tiny --weights weights/tiny \\
        --input JOB.json --out OUT.mp4 --ulysses_size 2

JOB.json is upstream MultiTalk's format (``prompt``, ``cond_image``, ``cond_audio`` {person1, person2},
``audio_type`` add|para, ``bbox``, ``tts_audio`` {text, human1_voice, human2_voice}) or ours
(``left_image``, ``right_image`` or ``scene_image`` + ``boxes``, ``script`` in any supported format,
``voices``, ``prompt``, optional ``settings``). Relative paths are relative to the JSON file. Bad jobs
print a clear error and exit 2 (on one process before any weights load). Under torchrun every rank
denoises (Ulysses) and rank 0 writes the mp4. ``--save_frames PATH.npy`` also keeps the uint8 frames
[T, H, W, 3] as they went into the encoder, to compare renders exactly (e.g. 1 rank against P ranks).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when torch "
                   "finds a GPU; the 14B preset refuses a CPU fallback unless --device cpu)")  # fmt: skip
    p.add_argument(
        "--save_frames",
        type=Path,
        default=None,
        metavar="PATH.npy",
        help="also save the rendered frames before encoding (uint8 [T, H, W, 3], numpy .npy)",
    )
    return p


def _settings(args: argparse.Namespace, job: dict):
    from inference.render.settings import PRESETS, GenerationSettings

    values: dict = {}
    if args.quality:
        values.update(PRESETS[args.quality].settings.to_dict())
    if isinstance(job.get("settings"), dict):
        values.update(job["settings"])
    if args.settings:
        try:
            extra = json.loads(args.settings)
        except ValueError as exc:
            raise ValueError(f"--settings: not valid JSON ({exc})") from None
        if not isinstance(extra, dict):
            raise ValueError("--settings: expected a JSON object")
        values.update(extra)
    for key, value in (("mode", args.mode), ("steps", args.sample_steps), ("seed", args.seed)):
        if value is not None:
            values[key] = value
    if args.preset == "tiny":
        values.setdefault("steps", 4)
    return GenerationSettings.from_dict(values)


def _load_job(args: argparse.Namespace):
    """Read and check the job file -> ``JobRequest``; raises ValueError with a one-line message."""
    from inference.render.pipeline import JobRequest

    try:
        job = json.loads(args.input.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the job file {args.input}: {exc}") from None
    settings = _settings(args, job if isinstance(job, dict) else {})
    return JobRequest.from_job_json(job, args.input.parent, settings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from inference.parallel.host import configure_cpu_threads
    from inference.render.worker import Runtime, RuntimeOptions, setup_logging

    configure_cpu_threads()  # torchrun leaves OMP_NUM_THREADS=1: rank 0's CPU work would get one thread

    req = None
    if int(os.environ.get("WORLD_SIZE", "1") or "1") == 1:
        # One process: refuse a bad job before loading any weights (minutes for the 14B model).
        # Under torchrun rank 0 checks it after start-up, so that it can stop the other ranks.
        try:
            req = _load_job(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    runtime = None
    try:
        runtime = Runtime.start(
            RuntimeOptions(
                preset=args.preset,
                weights=args.weights,
                ulysses_size=args.ulysses_size,
                dit_fsdp=args.dit_fsdp,
                t5_cpu=args.t5_cpu,
                device=args.device,
                save_frames=args.save_frames is not None,
            )
        )
        setup_logging(runtime.ctx.rank)
        if runtime.ctx.is_rank0:
            return _rank0(args, runtime, req)
        runtime.follow()
        return 0
    except (ValueError, OSError) as exc:
        if runtime is None or runtime.ctx.is_rank0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if runtime is not None:
            runtime.close()


def _rank0(args: argparse.Namespace, runtime, req) -> int:
    from inference.render.pipeline import FRAMES_FILE, OUTPUT_VIDEO

    try:
        if req is None:
            req = _load_job(args)
        out = args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".render-", dir=out.parent))
        try:
            names = runtime.render(req, work)
            for name in names:
                if name == OUTPUT_VIDEO:
                    target = out
                elif name == FRAMES_FILE and args.save_frames is not None:
                    target = args.save_frames
                    target.parent.mkdir(parents=True, exist_ok=True)
                else:
                    target = out.parent / f"{out.stem}.{name}"
                shutil.move(str(work / name), target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        runtime.shutdown()  # ranks > 0 may still wait for a first message
        return 2
    runtime.shutdown()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
