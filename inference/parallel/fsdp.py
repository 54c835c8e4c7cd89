"""FSDP2 for inference, and loading weights so that no rank ever holds the whole model.

``apply_fsdp`` shards each transformer block, then the root (torchtitan's order), over the
same 1-D mesh the sequence parallelism uses: FSDP shards weights, Ulysses shards activations.

- ``off``: replicated weights (about 35 GiB bf16 for the 14B DiT); no all-gathers.
- ``full``: ``reshard_after_forward=True`` (ZeRO-3): each block is all-gathered for its forward and
  freed after; about 1/P of the weights per rank at rest.
- ``keep``: ``reshard_after_forward=False``: gathered once and kept; lowest communication, memory
  close to replicated after the first forward, but still loaded sharded.

``load_dit`` builds the DiT on the meta device, shards it, allocates only the local shards and
fills them from the official safetensors layout: every rank reads its own rows of each tensor
(``safe_open(...).get_slice``, memory-mapped), casts them to the storage dtype and copies them
into place, one tensor at a time. No rank reads the full fp32 model, and nothing is scattered
over the network.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from inference.checkpoint.loader import check_keys, open_checkpoint, resolve_config
from inference.checkpoint.lora import merge_sources
from inference.model.dit import build_model
from inference.parallel.context import ParallelContext
from inference.parallel.layout import ParallelConfigError

logger = logging.getLogger(__name__)

FsdpMode = Literal["off", "full", "keep"]
FSDP_MODES: tuple[str, ...] = ("off", "full", "keep")


class TensorSource(Protocol):
    """One stored tensor: ``inference.checkpoint.TensorRef`` satisfies this."""

    shape: tuple[int, ...]

    def load(
        self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", rows: slice | None = None
    ) -> torch.Tensor: ...


def check_fsdp_mode(mode: str) -> FsdpMode:
    if mode not in FSDP_MODES:
        raise ParallelConfigError("dit_fsdp", f"unknown mode {mode!r}; choose one of {list(FSDP_MODES)}")
    return mode  # type: ignore[return-value]


def check_t5_fsdp(flag: bool) -> None:
    """``--t5_fsdp`` is refused: the T5 encoder runs on rank 0 only and is never sharded."""
    if flag:
        raise ParallelConfigError(
            "t5_fsdp",
            "sharding T5 is not supported: the text encoder runs on rank 0 only (its context is "
            "broadcast to the other ranks); drop --t5_fsdp, or offload T5 to the CPU to save GPU memory",
        )


def _default_param_dtype(mesh: DeviceMesh) -> torch.dtype:
    return torch.bfloat16 if mesh.device_type == "cuda" else torch.float32


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh | None,
    mode: str = "full",
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each of ``model.blocks``, then the root.

    Args:
        model: a module with a ``blocks`` ModuleList (real or meta parameters).
        mesh: 1-D device mesh (``ParallelContext.mesh``); None or a 1-rank mesh means nothing to shard.
        mode: "off" | "full" | "keep" (see the module docstring).
        param_dtype: compute dtype of the gathered weights; default bf16 on CUDA, fp32 on CPU.
            Inputs are not cast (the model casts its own inputs; timesteps stay fp32).

    Returns:
        ``model`` (its parameters become DTensors sharded on dim 0 unless mode is "off").
    """
    mode = check_fsdp_mode(mode)
    if mode == "off":
        return model
    if mesh is None or mesh.size() == 1:
        logger.info("FSDP %s requested on one rank: weights stay whole", mode)
        return model
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ParallelConfigError("dit_fsdp", f"{type(model).__name__} has no transformer blocks to shard")
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype or _default_param_dtype(mesh),
        reduce_dtype=torch.float32,
        cast_forward_inputs=False,
    )
    reshard = mode == "full"
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    logger.info("FSDP2 %s over %d ranks: %d blocks + root", mode, mesh.size(), len(blocks))
    return model


def _cast_meta_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Set the storage dtype of floating parameters before sharding (free on the meta device)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                module._parameters[name] = nn.Parameter(p.to(dtype), requires_grad=False)


def _shard_rows(param: DTensor) -> slice:
    """Rows of the global tensor this rank holds under FSDP2's dim-0 sharding (torch.chunk rule)."""
    if len(param.placements) != 1 or param.placements[0] != Shard(0):
        raise RuntimeError(f"expected a 1-D mesh with Shard(0), got placements {param.placements}")
    mesh = param.device_mesh
    n, world, rank = param.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return slice(start, min(start + chunk, n))


@torch.no_grad()
def fill_from_sources(model: nn.Module, sources: Mapping[str, TensorSource], device: torch.device) -> int:
    """Copy every parameter/buffer of ``model`` from ``sources`` (same keys), reading only this rank's
    rows of sharded (DTensor) parameters. Shapes were checked by the caller. Returns the bytes read."""
    nread = 0
    for key, target in model.state_dict(keep_vars=True).items():
        src = sources[key]
        if isinstance(target, DTensor):
            local = target.to_local()
            rows = _shard_rows(target)
            if local.shape[0] != rows.stop - rows.start:
                raise RuntimeError(f"{key}: local shard has {local.shape[0]} rows, expected {rows}")
            if local.numel() == 0:
                continue
            data = src.load(dtype=local.dtype, device=device, rows=rows)
            local.copy_(data)
        else:
            data = src.load(dtype=target.dtype, device=device)
            target.copy_(data)
        nread += data.numel() * data.element_size()
    return nread


@torch.no_grad()
def load_dit(
    folder: str | Path,
    ctx: ParallelContext,
    mode: str = "off",
    config: object | None = None,
    dtype: torch.dtype | None = None,
    loras: Sequence[object] = (),
) -> nn.Module:
    """Build the MultiTalk DiT for this rank from an official-layout weights folder.

    Meta-device build -> cast to ``dtype`` -> ``apply_fsdp`` -> allocate local storage -> strict key
    and shape check against the index -> fill (each rank its own rows). With mode "off" every rank
    gets the whole model in ``dtype`` (read tensor by tensor).

    Args:
        folder: weights folder (``inference.checkpoint`` layout: index + shards + multitalk file).
        ctx: this rank's context (device, mesh).
        mode: "off" | "full" | "keep".
        config: a ``DiTConfig``; read from ``folder/config.json`` when None.
        dtype: storage dtype; default bf16 on CUDA, fp32 on CPU.
        loras: LoRA adapters (``inference.checkpoint.lora``) merged while the weights stream in; each
            rank merges only the rows it holds.

    Returns:
        The model in eval mode with gradients off.
    """
    mode = check_fsdp_mode(mode)
    cfg = resolve_config(folder, config)  # type: ignore[arg-type]
    dtype = dtype or (torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    refs = open_checkpoint(folder)
    model = build_model(cfg, "meta").requires_grad_(False)
    _cast_meta_params(model, dtype)
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, refs)
    apply_fsdp(model, ctx.mesh, mode, param_dtype=dtype)
    model.to_empty(device=ctx.device)
    if loras:
        refs = merge_sources(refs, loras)  # type: ignore[arg-type]
    nread = fill_from_sources(model, refs, ctx.device)
    logger.info("rank %d: read %.1f MiB of weights (fsdp %s)", ctx.rank, nread / 2**20, mode)
    logger.info("rank %d: %s", ctx.rank, report_memory(model, ctx.device))
    return model.eval().requires_grad_(False)


def param_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of parameters and buffers held by this rank, bytes of the whole model)."""
    local = total = 0
    for t in (*model.parameters(), *model.buffers()):
        size = t.element_size()
        total += t.numel() * size
        local += (t.to_local() if isinstance(t, DTensor) else t).numel() * size
    return local, total


def report_memory(model: nn.Module, device: torch.device | str) -> str:
    """One log line: parameter bytes on this rank (of the whole model) and peak memory where known."""
    device = torch.device(device)
    local, total = param_bytes(model)
    parts = [f"params {local / 2**20:.1f} MiB on this rank of {total / 2**20:.1f} MiB"]
    if device.type == "cuda":
        parts.append(f"peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    # ru_maxrss is in KiB on Linux.
    parts.append(f"peak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return ", ".join(parts)
