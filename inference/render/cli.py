"""Render one job from a JSON file to an mp4, on one process or under torchrun.

    python -m inference.generate --preset tiny --weights weights/tiny --input JOB.json --out OUT.mp4
    torchrun --nproc-per-node=2 -m inference.generate --preset tiny --weights weights/tiny \\
        --input JOB.json --out OUT.mp4 --ulysses_size 2

JOB.json is upstream MultiTalk's format (``prompt``, ``cond_image``, ``cond_audio`` {person1[, person2]},
``audio_type`` add|para, ``bbox``, ``tts_audio`` {text, human1_voice[, human2_voice]}) or ours
(``left_image``, ``right_image``, ``scene_image`` + ``boxes`` or ``image`` for one person, ``script`` in
any supported format, ``voices``, ``audio``, ``prompt``, ``preset``, ``settings``), read by the same parser
and checked by the same rules as a REST job (``inference.render.spec``, ``inference.render.intake``).
One ``cond_audio`` entry (or a speaker-1 script with one voice) is a one-person job, as upstream's
``single_example_*.json``. Relative paths are resolved against the working directory, as upstream does,
and failing that against the JSON file's folder.

Every check that needs no model (files present and decodable, voices installed, the number of people,
settings) runs before any weight loads; a bad job prints one ``error:`` line and exits 2. Under torchrun
every rank denoises (Ulysses) and rank 0 writes the mp4. ``--save_frames PATH.npy`` also keeps the uint8
frames [T, H, W, 3] as they went into the encoder, to compare renders exactly (1 rank against P ranks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from common.errors import InputError
from common.files import atomic_write_bytes
from inference.checkpoint.weights import WeightPaths
from inference.parallel.host import configure_cpu_threads
from inference.render.intake import Limits, Submission, build_job
from inference.render.pipeline import FRAMES_FILE, OUTPUT_VIDEO
from inference.render.settings import GenerationSettings, LoraState
from inference.render.spec import JobInputError, ReadFile, parse_job_json
from inference.render.speed import add_speed_flags, speed_options
from inference.render.upstream_cli import add_upstream_flags, normalize, runtime_overrides, setting_overrides
from inference.render.worker import RenderFailed, RenderJob, Runtime, RuntimeOptions, setup_logging
from tts.tiny import DEFAULT_TINY_VOICES

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inference.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "multitalk-14b"), default="multitalk-14b")
    p.add_argument(
        "--weights", type=Path, default=None, help="weights root (default weights/ or weights/tiny)"
    )
    p.add_argument("--input", type=Path, default=None, help="job JSON (upstream: --input_json)")
    p.add_argument("--out", type=Path, default=None, help="output mp4, side files beside it (--save_file)")
    p.add_argument("--quality", choices=("fast", "balanced", "quality"), default=None, help="settings preset")
    p.add_argument("--settings", default=None, help="JSON object of setting overrides")
    p.add_argument("--mode", choices=("streaming", "clip"), default=None)
    p.add_argument("--sample_steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ulysses_size", type=int, default=None, help="default: ranks / (ring x groups)")
    p.add_argument("--ring_size", type=int, default=1, help="ring attention degree (ranks = ulysses x ring)")
    p.add_argument("--cfg_parallel", action="store_true", help="guidance branches on separate rank groups")
    p.add_argument("--dit_fsdp", nargs="?", const="full", choices=("off", "full", "keep"), default="off",
                   help="FSDP2 for the DiT (upstream's bare --dit_fsdp = full)")  # fmt: skip
    p.add_argument("--t5_cpu", action="store_true")
    p.add_argument("--vae_tiling", choices=("auto", "on", "off"), default="auto",
                   help="VAE in spatial tiles: auto = when whole frames would not fit the GPU's free memory")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when torch "
                   "finds a GPU; the 14B preset refuses a CPU fallback unless --device cpu)")  # fmt: skip
    p.add_argument(
        "--save_frames",
        type=Path,
        default=None,
        metavar="PATH.npy",
        help="also save the rendered frames before encoding (uint8 [T, H, W, 3], numpy .npy)",
    )
    add_speed_flags(p)
    add_upstream_flags(p)
    return p


# Files of a local job: the renderer's own limits apply (audio length, image size), not upload sizes.
MAX_FILE_BYTES = 2**31


def read_local_file(job_file: Path) -> ReadFile:
    """``read_file`` for job JSON that names files by path: relative to the working directory (as
    upstream resolves them), failing that relative to the job file's folder."""

    def read(key: str, value: Any) -> bytes:
        if not isinstance(value, str) or not value:
            raise JobInputError(key, f"expected a file path, got {value!r}"[:200])
        path = Path(value)
        places = [path] if path.is_absolute() else [Path.cwd() / path, job_file.parent / path]
        for place in places:
            if place.is_file():
                size = place.stat().st_size
                if size > MAX_FILE_BYTES:
                    raise JobInputError(key, f"{place} is {size} bytes; the limit is {MAX_FILE_BYTES}")
                try:
                    return place.read_bytes()
                except OSError as exc:
                    raise JobInputError(key, f"cannot read {place}: {exc.strerror or exc}") from None
        folders = dict.fromkeys(str(place.parent.resolve()) for place in places)  # once each, in order
        where = str(path) if path.is_absolute() else " or ".join(folders)
        raise JobInputError(key, f"file not found: {value} (looked in {where})")

    return read


def voices_in(options: RuntimeOptions) -> frozenset[str] | None:
    """The voices the weights folder has (the tiny preset writes its four at start-up when missing);
    None when there is no voice folder yet (start-up then names the missing weights)."""
    paths = WeightPaths.under(options.weights_root)
    if (paths.kokoro_dir / "voices").is_dir():
        return frozenset(paths.voices())
    return frozenset(DEFAULT_TINY_VOICES) if options.preset == "tiny" else None


def installed_voices(args: argparse.Namespace) -> frozenset[str] | None:
    """``voices_in`` for the CLI's ``--preset`` and ``--weights``."""
    return voices_in(RuntimeOptions(preset=args.preset, weights=args.weights))


def default_quality(lora: LoraState) -> str:
    """The settings preset of a job that names none: with a merged LoRA every job runs distilled, so
    upstream's README commands then mean the fast preset; otherwise upstream's defaults."""
    return "fast" if lora.mode == "merged" else "quality"


def local_limits(options: RuntimeOptions) -> Limits:
    """The limits of a job read from local files (CLI and batch): the renderer's own limits apply,
    not upload sizes; the tiny preset defaults to 4 steps."""
    return Limits(max_upload_bytes=MAX_FILE_BYTES, installed_voices=voices_in(options),
                  job_defaults={"steps": 4} if options.preset == "tiny" else None,
                  lora=options.speed.lora_state)  # fmt: skip


def load_job(args: argparse.Namespace) -> Submission:
    """Read and check the job file with the flags' settings; JobInputError names what is wrong.

    Settings: the preset (``--quality``, else the job's ``preset``, else ``quality``: upstream's
    defaults), then (tiny preset) 4 steps, then the job's ``settings``, ``--settings`` and the flags."""
    try:
        body = json.loads(args.input.read_text(encoding="utf-8"))
    except OSError as exc:
        raise JobInputError(
            "input", f"cannot read the job file {args.input}: {exc.strerror or exc}"
        ) from None
    except ValueError as exc:
        raise JobInputError("input", f"the job file {args.input} is not valid JSON: {exc}") from None
    req = parse_job_json(body, read_local_file(args.input), source="cli", body_field="input")
    overrides: Any = req.settings
    if args.settings:
        try:
            extra = json.loads(args.settings)
        except ValueError as exc:
            raise JobInputError("--settings", f"not valid JSON ({exc})") from None
        if not isinstance(extra, dict):
            raise JobInputError("--settings", "expected a JSON object")
        overrides = {**(overrides if isinstance(overrides, dict) else {}), **extra}
    flags = {"mode": args.mode, "steps": args.sample_steps, "seed": args.seed, **setting_overrides(args)}
    if any(v is not None for v in flags.values()):
        base = overrides if isinstance(overrides, dict) else {}
        overrides = {**base, **{k: v for k, v in flags.items() if v is not None}}
    options = RuntimeOptions(preset=args.preset, weights=args.weights, speed=speed_options(args))
    default = default_quality(options.speed.lora_state)
    req = dataclasses.replace(req, preset=args.quality or req.preset or default, settings=overrides)
    submission = build_job(req, local_limits(options))
    # Upstream's --audio_mode says where the speech comes from; the job file must agree with it.
    wanted = {"tts": "tts", "localfile": "files"}.get(args.audio_mode or "")
    if wanted is not None and submission.spec.audio_source != wanted:
        raise JobInputError(
            "--audio_mode",
            f"{args.audio_mode} asks for "
            + ("a tts_audio block (text and voices)" if wanted == "tts" else "recordings in cond_audio")
            + f", but the job file gives {'a script' if submission.spec.audio_source == 'tts' else 'recordings'}",
        )
    return submission


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args = normalize(args)  # upstream's --ckpt_dir, --input_json, --save_file, ...
        speed, extra = speed_options(args), runtime_overrides(args, RuntimeOptions)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_cpu_threads()  # torchrun leaves OMP_NUM_THREADS=1: rank 0's CPU work would get one thread
    submission = None
    if int(os.environ.get("RANK", "0") or "0") == 0:
        # Refuse a bad job before any weight loads (minutes for the 14B model). Under torchrun a refused
        # job ends rank 0 here, before the process group forms, and torchrun stops the other ranks.
        try:
            submission = load_job(args)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    runtime = None
    try:
        runtime = Runtime.start(
            RuntimeOptions(
                preset=args.preset,
                weights=args.weights,
                ulysses_size=args.ulysses_size,
                ring_size=args.ring_size,
                cfg_parallel=args.cfg_parallel,
                dit_fsdp=args.dit_fsdp,
                t5_cpu=args.t5_cpu,
                device=args.device,
                save_frames=args.save_frames is not None,
                vae_tiling=args.vae_tiling,
                speed=speed,
                **extra,
            )
        )
        setup_logging(runtime.ctx.rank)
        if runtime.ctx.is_rank0:
            assert submission is not None
            return _rank0(args, runtime, submission)
        runtime.follow()
        return 0
    except (ValueError, OSError) as exc:
        if runtime is None or runtime.ctx.is_rank0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if runtime is not None:
            runtime.close()


def _rank0(args: argparse.Namespace, runtime: Runtime, submission: Submission) -> int:
    """Render the accepted job in a work folder beside ``--out``, then move the outputs into place."""
    try:
        out = args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".render-", dir=out.parent))
        try:
            inputs = work / "inputs"
            inputs.mkdir()
            for name, data in submission.files.items():
                atomic_write_bytes(inputs / name, data)
            settings = GenerationSettings.from_dict(submission.settings)
            names = runtime.render(RenderJob("cli", submission.spec, settings, inputs, work))
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
    except RenderFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        runtime.shutdown()
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        runtime.shutdown()  # ranks > 0 may still wait for a first message
        return 2
    runtime.shutdown()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
