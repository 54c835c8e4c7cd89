"""The memory verdict at start-up: a layout that cannot fit the GPUs this process sees is refused before any
weight is loaded, with the plan's sentence (and the flags that would make it fit)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from inference.memory.plan import GIB, Layout, MemoryPlanError, Plan, Workload, plan
from inference.memory.sizes import ModelSizes

logger = logging.getLogger(__name__)


def gpu_gib(index: int) -> float | None:
    """Memory of the GPU this rank uses, or None without CUDA. The device is made current first, so the
    CUDA context this query may create is on the rank's own GPU (where it would go anyway), never GPU 0."""
    if not torch.cuda.is_available():
        return None
    index %= torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.cuda.get_device_properties(index).total_memory / GIB


def check_layout_fits(layout: Layout, preset: str, workload: Workload) -> Plan:
    """Plan ``layout`` for ``workload``; raise ``MemoryPlanError`` (field: the first flag to add, or
    ``memory``) with the plan's verdict when it does not fit. Returns the plan when it does."""
    result = plan(ModelSizes.preset(preset), layout, workload)
    if result.fits:
        logger.info("memory plan: %s", result.verdict)
        return result
    field = "memory"
    if result.suggestion is not None:
        changed = [f.name for f in dataclasses.fields(Layout)
                   if getattr(layout, f.name) != getattr(result.suggestion, f.name)]  # fmt: skip
        field = f"--{changed[0]}" if changed else field
    raise MemoryPlanError(field, result.verdict)


def startup_check(
    *,
    preset: str,
    world_size: int,
    local_rank: int,
    device: str | None,
    resolution: int,
    frames: int,
    dit_fsdp: str,
    t5_fsdp: bool,
    t5_cpu: bool,
    offload_model: bool | None,
    num_persistent_param_in_dit: int | None,
    vae_tiling: str,
    quant: str | None,
    sp_size: int | None = None,
    rows: int = 1,
) -> Plan | None:
    """The service's check: the plan of its flags on the GPUs found, for the default clip (``resolution``,
    ``frames``). Nothing is checked on a CPU (host memory is not planned). Raises ``MemoryPlanError``."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cpu":
        return None
    gib = gpu_gib(dev.index if dev is not None and dev.index is not None else local_rank)
    if gib is None:
        return None
    layout = Layout(
        gpus=world_size,
        gpu_gib=gib,
        dit_fsdp=dit_fsdp,
        t5_fsdp=t5_fsdp,
        t5_cpu=t5_cpu,
        offload_model=offload_model,
        num_persistent_param_in_dit=num_persistent_param_in_dit,
        vae_tiling=vae_tiling,
        quant=quant,
        sp_size=sp_size,
        rows=rows,
    )
    return check_layout_fits(layout, preset, Workload.for_size(resolution, frames))
