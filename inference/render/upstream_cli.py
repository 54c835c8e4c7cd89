"""Upstream MultiTalk's ``generate_multitalk.py`` flags for ``python -m inference.generate``.

The commands in upstream's README run unchanged: ``--ckpt_dir weights/Wan2.1-I2V-14B-480P --wav2vec_dir
weights/chinese-wav2vec2-base --input_json JOB.json --save_file NAME`` plus the sampling flags. Each flag
maps onto this project's own option:

- paths: ``--ckpt_dir`` (the Wan folder; its parent is the weights root), ``--wav2vec_dir`` (must be the
  root's ``chinese-wav2vec2-base``), ``--input_json`` (= ``--input``), ``--save_file`` (``NAME.mp4`` =
  ``--out``; without either, upstream's automatic name ``multitalk-14B_<size>_<job>.mp4``);
- job settings: ``--base_seed`` (seed), ``--size`` (resolution), ``--frame_num``, ``--motion_frame``,
  ``--mode``, ``--sample_steps``, ``--sample_shift``, ``--sample_text_guide_scale``,
  ``--sample_audio_guide_scale``, ``--use_apg`` / ``--apg_momentum`` / ``--apg_norm_threshold``,
  ``--color_correction_strength``, ``--use_teacache`` / ``--teacache_thresh``;
- start-up: ``--lora_dir`` / ``--lora_scale`` (``inference.render.speed``), ``--t5_cpu``, ``--dit_fsdp``,
  ``--ulysses_size``, ``--ring_size``, and ``--quant``, ``--quant_dir``, ``--offload_model``,
  ``--num_persistent_param_in_dit``, ``--t5_fsdp`` under the service's option names
  (``RuntimeOptions``): a flag whose option this build does not have yet, or that the runtime refuses,
  says so and the command exits 2;
- ``--task`` (only ``multitalk-14B``) is accepted; ``--audio_mode localfile|tts`` must agree with the
  job file (recordings in ``cond_audio`` or a ``tts_audio`` block), else the command exits 2 naming it;
  ``--audio_save_dir`` (upstream's cache of wav2vec2 features) is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from common.errors import InputError
from common.flags import flag_bool
from inference.checkpoint.weights import WeightPaths
from inference.render.speed import teacache_defaults

SIZES = {"multitalk-480": 480, "multitalk-720": 720}
# Start-up flags other parts of the project implement, under the option names the service uses.
RUNTIME_FLAGS = ("quant", "quant_dir", "offload_model", "num_persistent_param_in_dit", "t5_fsdp")
# Upstream flag -> job setting.
SETTING_FLAGS = {
    "base_seed": "seed",
    "frame_num": "frame_num",
    "motion_frame": "motion_frames",
    "sample_shift": "shift",
    "sample_text_guide_scale": "text_guidance",
    "sample_audio_guide_scale": "audio_guidance",
    "apg_momentum": "apg_momentum",
    "apg_norm_threshold": "apg_norm_threshold",
    "color_correction_strength": "color_correction",
}


class UpstreamFlagError(InputError):
    """An upstream flag this build cannot honour; ``field`` is the flag."""


def add_upstream_flags(p: argparse.ArgumentParser) -> None:
    """Upstream's flags that the parser does not have under the same name already."""
    p.add_argument("--task", default="multitalk-14B", help="upstream's model task (only multitalk-14B)")
    p.add_argument("--ckpt_dir", type=Path, default=None, help="upstream's name: the Wan folder")
    p.add_argument("--wav2vec_dir", type=Path, default=None, help="upstream's name: the wav2vec2 folder")
    p.add_argument("--input_json", type=Path, default=None, help="upstream's name for --input")
    p.add_argument("--save_file", default=None, help="upstream's name: output NAME (NAME.mp4 is written)")
    p.add_argument("--audio_save_dir", default=None, help="refused: wav2vec2 features are not cached")
    p.add_argument(
        "--audio_mode",
        choices=("localfile", "tts"),
        default=None,
        help="must match the job file: cond_audio recordings or a tts_audio block",
    )
    p.add_argument("--base_seed", type=int, default=None, help="noise seed (negative: random)")
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="resolution family")
    p.add_argument("--frame_num", type=int, default=None, help="frames per clip (4n+1)")
    p.add_argument("--motion_frame", type=int, default=None, help="overlap frames between clips")
    p.add_argument("--sample_shift", type=float, default=None)
    p.add_argument("--sample_text_guide_scale", type=float, default=None)
    p.add_argument("--sample_audio_guide_scale", type=float, default=None)
    p.add_argument("--use_apg", action="store_true", help="Adaptive Projected Guidance")
    p.add_argument("--apg_momentum", type=float, default=None)
    p.add_argument("--apg_norm_threshold", type=float, default=None)
    p.add_argument("--color_correction_strength", type=float, default=None)
    p.add_argument("--quant", choices=("int8", "fp8"), default=None, help="quantised DiT weights")
    p.add_argument("--quant_dir", type=Path, default=None, help="folder (or file) of quantised weights")
    p.add_argument(
        "--offload_model", type=flag_bool, default=None, help="move models to the CPU between uses"
    )
    p.add_argument("--num_persistent_param_in_dit", type=int, default=None,
                   help="DiT parameters kept on the GPU; the rest stream in per forward")  # fmt: skip
    p.add_argument("--t5_fsdp", action="store_true", help="shard T5 over the ranks")


def normalize(args: argparse.Namespace) -> argparse.Namespace:
    """Fold upstream's path flags into ours (``--weights``, ``--input``, ``--out``); UpstreamFlagError
    names a flag that cannot be honoured."""
    if args.task != "multitalk-14B":
        raise UpstreamFlagError("--task", f"{args.task!r}: only multitalk-14B is supported")
    if args.audio_save_dir is not None:
        raise UpstreamFlagError(
            "--audio_save_dir", "not supported: wav2vec2 features are computed per job and not cached"
        )
    if args.ckpt_dir is not None:
        root = args.ckpt_dir.parent
        want = WeightPaths.under(root).wan_dir
        if args.ckpt_dir.resolve() != want.resolve():
            raise UpstreamFlagError(
                "--ckpt_dir", f"the Wan folder must be named {want.name} (got {args.ckpt_dir})"
            )
        if args.weights is not None and args.weights.resolve() != root.resolve():
            raise UpstreamFlagError("--ckpt_dir", f"points into {root}, but --weights is {args.weights}")
        args.weights = root
    if args.wav2vec_dir is not None:
        root = args.weights if args.weights is not None else Path("weights")
        want = WeightPaths.under(root).wav2vec_dir
        if args.wav2vec_dir.resolve() != want.resolve():
            raise UpstreamFlagError(
                "--wav2vec_dir",
                f"wav2vec2 is read from {want} (the weights root's folder); got {args.wav2vec_dir}",
            )
    if args.input is None:
        args.input = args.input_json
    elif args.input_json is not None and args.input_json != args.input:
        raise UpstreamFlagError("--input_json", "give --input or --input_json, not two different files")
    if args.input is None:
        raise UpstreamFlagError("--input", "required: the job JSON (--input or --input_json)")
    if args.out is None:
        name = args.save_file or f"multitalk-14B_{args.size or 'multitalk-480'}_{args.input.stem}"
        args.out = Path(name if name.endswith(".mp4") else f"{name}.mp4")
    elif args.save_file is not None:
        raise UpstreamFlagError("--save_file", "give --out or --save_file, not both")
    return args


def setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Job settings from upstream's sampling flags (only the flags given)."""
    values = {
        setting: getattr(args, flag)
        for flag, setting in SETTING_FLAGS.items()
        if getattr(args, flag) is not None
    }
    if args.size is not None:
        values["resolution"] = SIZES[args.size]
    if args.use_apg:
        values["apg"] = True
    return values | teacache_defaults(args)


def runtime_overrides(args: argparse.Namespace, options_type: type) -> dict[str, Any]:
    """``RuntimeOptions`` fields for ``--quant`` and the other start-up flags given; a flag whose option
    the runtime does not have is refused by name. ``--offload_model False`` is passed on: it overrides
    the one-GPU default of offloading."""
    names = {f.name for f in dataclasses.fields(options_type)}
    values: dict[str, Any] = {}
    for flag in RUNTIME_FLAGS:
        value = getattr(args, flag)
        if value is None or (value is False and flag not in names):  # off needs no option to honour it
            continue
        if flag not in names:
            raise UpstreamFlagError(f"--{flag}", "not supported by this build yet")
        values[flag] = value
    return values
