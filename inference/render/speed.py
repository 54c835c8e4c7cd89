"""Start-up side of the few-passes features: LoRAs, TeaCache defaults, batched guidance, GPU kernels.

Flags shared by ``python -m inference.generate`` and the service (upstream MultiTalk's names where it
has them):

- ``--lora_dir A [B ...]`` / ``--lora_scale s [...]``: LoRA files (``inference.checkpoint.lora``) and
  their strengths, one per file or one for all (upstream's default 1.2; its README passes 1.0).
- ``--lora_mode merged|switchable``: merged into the weights while they load (upstream's way; every job
  then runs with them) or kept beside them so each job's preset turns them on or off
  (``settings.lora``): one service serves the distilled "fast" preset and the 40-step "quality" one.
- ``--use_teacache`` / ``--teacache_thresh``: TeaCache for every job by default (job settings
  ``teacache`` / ``teacache_thresh``; a job may turn it off).
- ``--batched_guidance auto|on|off``: the 2-3 guidance branches of a step as one forward of batch 2-3
  (``auto``: when the GPU has the memory for the larger activations; decided on rank 0 per clip and sent
  with the clip, so every rank runs the same way).
- ``--compile``: ``torch.compile`` of the transformer blocks (eager when the backend cannot run here).
- ``--attention auto|flash3|flash2|sdpa``: the attention kernel for bf16/fp16 GPU tensors.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import InputError
from inference.checkpoint.lora import LORA_MODES, AdapterBank, LoraAdapter, read_loras
from inference.model.attention import KERNELS, set_attention_kernel
from inference.model.config import DiTConfig
from inference.model.dit import build_model, compile_blocks
from inference.render.settings import LoraState

logger = logging.getLogger(__name__)

BATCHED_MODES = ("auto", "on", "off")
UPSTREAM_LORA_SCALE = 1.2  # generate_multitalk.py's default for --lora_scale
# Headroom over the estimated activations before auto turns batching on (allocator slack, fragmentation).
BATCH_MEMORY_MARGIN = 1.5


class SpeedOptionError(InputError):
    """A speed flag that cannot be honoured; ``field`` is the flag as typed (``--lora_mode``)."""


@dataclass(frozen=True)
class SpeedOptions:
    lora_dir: tuple[Path, ...] = ()
    lora_scale: tuple[float, ...] = (UPSTREAM_LORA_SCALE,)
    lora_mode: str = "merged"
    batched_guidance: str = "auto"
    compile: bool = False
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.lora_mode not in LORA_MODES:
            raise SpeedOptionError("--lora_mode", f"{self.lora_mode!r}; choose one of {list(LORA_MODES)}")
        if self.batched_guidance not in BATCHED_MODES:
            raise SpeedOptionError(
                "--batched_guidance", f"{self.batched_guidance!r}; choose one of {list(BATCHED_MODES)}"
            )
        if self.attention not in KERNELS:
            raise SpeedOptionError("--attention", f"{self.attention!r}; choose one of {list(KERNELS)}")
        if self.lora_dir and len(self.lora_scale) not in (1, len(self.lora_dir)):
            raise SpeedOptionError(
                "--lora_scale",
                f"{len(self.lora_dir)} LoRA file(s) but {len(self.lora_scale)} scales; give one, or one per file",
            )

    @property
    def lora_state(self) -> LoraState:
        return LoraState.of(self.lora_mode, [p.stem for p in self.lora_dir])


def add_speed_flags(p: argparse.ArgumentParser) -> None:
    """The flags above, on a parser."""
    p.add_argument("--lora_dir", type=Path, nargs="+", default=None, metavar="FILE",
                   help="LoRA .safetensors file(s), e.g. FusionX or lightx2v (upstream's name)")  # fmt: skip
    p.add_argument("--lora_scale", type=float, nargs="+", default=None, metavar="S",
                   help=f"LoRA strength, one for all files or one per file (default {UPSTREAM_LORA_SCALE}, "
                   "as upstream)")  # fmt: skip
    p.add_argument("--lora_mode", choices=LORA_MODES, default="merged",
                   help="merged into the weights (every job uses it) or switchable per job by its preset")  # fmt: skip
    p.add_argument("--use_teacache", action="store_true", help="TeaCache for every job by default")
    p.add_argument("--teacache_thresh", type=float, default=None,
                   help="TeaCache threshold, 0.2..0.5 recommended (default 0.2)")  # fmt: skip
    p.add_argument("--batched_guidance", choices=BATCHED_MODES, default="auto",
                   help="run the guidance branches of a step as one batched forward")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--attention", choices=KERNELS, default="auto", help="attention kernel for GPU tensors")


def speed_options(args: argparse.Namespace) -> SpeedOptions:
    """SpeedOptions from parsed flags (``add_speed_flags``)."""
    return SpeedOptions(
        lora_dir=tuple(args.lora_dir or ()),
        lora_scale=tuple(args.lora_scale) if args.lora_scale else (UPSTREAM_LORA_SCALE,),
        lora_mode=args.lora_mode,
        batched_guidance=args.batched_guidance,
        compile=args.compile,
        attention=args.attention,
    )


def teacache_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Job defaults from ``--use_teacache`` / ``--teacache_thresh``."""
    values: dict[str, Any] = {}
    if args.use_teacache:
        values["teacache"] = True
    if args.teacache_thresh is not None:
        values["teacache_thresh"] = args.teacache_thresh
    return values


@dataclass
class ModelSpeed:
    """What the loaded model runs with: the options, switchable adapters, the compile backend."""

    options: SpeedOptions = field(default_factory=SpeedOptions)
    adapters: AdapterBank | None = None
    compiled: str = "off"

    @property
    def lora(self) -> LoraState:
        return self.options.lora_state

    def batched(self, device: torch.device, branches: int, bytes_per_branch: int) -> bool:
        """Rank 0's per-clip choice. ``auto``: on when free device memory holds the activations of all
        branches at once, with a margin (always on for CPU tensors)."""
        mode = self.options.batched_guidance
        if mode != "auto":
            return mode == "on"
        if device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(device)
        return free >= BATCH_MEMORY_MARGIN * branches * bytes_per_branch

    def info(self) -> dict[str, Any]:
        """For /api/info: the LoRAs, their mode, batched guidance, compile and attention settings."""
        return {
            "lora": {
                "mode": self.lora.mode,
                "files": [str(p) for p in self.options.lora_dir],
                "scales": list(self.options.lora_scale),
                "distilled_steps": self.lora.steps if self.lora.loaded else None,
            },
            "batched_guidance": self.options.batched_guidance,
            "compile": self.compiled,
            "attention": self.options.attention,
        }


def read_adapters(options: SpeedOptions, config: DiTConfig) -> list[LoraAdapter]:
    """Read and check ``--lora_dir`` against the model's parameters (before any weight loads)."""
    if not options.lora_dir:
        return []
    shapes = {k: tuple(v.shape) for k, v in build_model(config, "meta").state_dict().items()}
    return read_loras(options.lora_dir, options.lora_scale, shapes)


def merged_loras(options: SpeedOptions, adapters: Sequence[LoraAdapter]) -> Sequence[LoraAdapter]:
    """The adapters the loader merges: all of them in merged mode, none in switchable mode."""
    return adapters if options.lora_mode == "merged" else ()


def finish_model(
    model: torch.nn.Module, options: SpeedOptions, adapters: Sequence[LoraAdapter], device: torch.device
) -> ModelSpeed:
    """After loading: the attention kernel, switchable adapters, then ``--compile``."""
    set_attention_kernel(options.attention)
    bank = AdapterBank(model, adapters) if adapters and options.lora_mode == "switchable" else None
    compiled = compile_blocks(model, device_type=device.type) if options.compile else "off"
    if adapters:
        logger.info("LoRA %s: %s", options.lora_mode, ", ".join(f"{a.name} x{a.scale:g}" for a in adapters))
    return ModelSpeed(options, bank, compiled)
