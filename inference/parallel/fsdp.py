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

``--t5_fsdp``: ``load_t5`` shards the umT5 encoder the same way (each of its blocks, then the root with
the 256k-token embedding) from Wan's memory-mapped ``.pth``, so no rank holds all of T5 (11.4 GB bf16).
Every rank must then run every T5 forward: rank 0 holds a ``CollectiveTextEncoder`` whose ``encode``
is one ENCODE_TEXT step of the engine (``Engine.run_step``), and every rank's worker runs the local
sharded encoder for it.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from inference.checkpoint.loader import check_keys, open_checkpoint, resolve_config
from inference.checkpoint.lora import merge_sources
from inference.encoders.common import T5_CHECKPOINT, EncoderError, _checkpoint_file, load_wan_state_dict
from inference.encoders.t5 import (
    T5Encoder,
    load_t5_tokenizer,
    t5_config_from_wan,
    t5_tokenizer_dir,
    t5_wan_to_hf,
)
from inference.model.dit import build_model
from inference.parallel.context import ParallelContext
from inference.parallel.engine import Message, Op
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


def check_t5_fsdp(flag: bool, t5_cpu: bool = False) -> None:
    """``--t5_fsdp`` shards T5 over every rank's GPU; ``--t5_cpu`` keeps it whole on rank 0's CPU: not both."""
    if flag and t5_cpu:
        raise ParallelConfigError(
            "t5_fsdp",
            "cannot be combined with --t5_cpu: --t5_fsdp splits T5 over every rank's GPU, --t5_cpu keeps the "
            "whole T5 on rank 0's CPU; choose one",
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
    _shard_units(model, blocks, mesh, param_dtype or _default_param_dtype(mesh), reshard=mode == "full")
    logger.info("FSDP2 %s over %d ranks: %d blocks + root", mode, mesh.size(), len(blocks))
    return model


def _shard_units(
    model: nn.Module, blocks: nn.ModuleList, mesh: DeviceMesh, param_dtype: torch.dtype, reshard: bool
) -> None:
    """``fully_shard`` each block, then the root (whatever is left: embeddings, norms, head)."""
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)


def _cast_meta_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Set the storage dtype of floating parameters before sharding (free on the meta device); a parameter
    shared by two modules (T5's token embedding) stays one parameter."""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in cast:
                cast[id(p)] = nn.Parameter(p.to(dtype), requires_grad=False)
            module._parameters[name] = cast[id(p)]


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
    device: torch.device | None = None,
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
        device: where the weights are put; default ``ctx.device``. Block streaming
            (``inference.parallel.offload``) loads into CPU memory (mode "off" only) and moves what stays
            resident itself; ``dtype`` still defaults to the compute device's.

    Returns:
        The model in eval mode with gradients off.
    """
    mode = check_fsdp_mode(mode)
    target = ctx.device if device is None else torch.device(device)
    if target != ctx.device and mode != "off":
        raise ParallelConfigError("dit_fsdp", "FSDP2 shards live on the compute device; load to it")
    cfg = resolve_config(folder, config)  # type: ignore[arg-type]
    dtype = dtype or (torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    refs = open_checkpoint(folder)
    model = build_model(cfg, "meta").requires_grad_(False)
    _cast_meta_params(model, dtype)
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, refs)
    apply_fsdp(model, ctx.mesh, mode, param_dtype=dtype)
    model.to_empty(device=target)
    if loras:
        refs = merge_sources(refs, loras)  # type: ignore[arg-type]
    nread = fill_from_sources(model, refs, target)
    logger.info("rank %d: read %.1f MiB of weights (fsdp %s) into %s", ctx.rank, nread / 2**20, mode, target)
    logger.info("rank %d: %s", ctx.rank, report_memory(model, target))
    return model.eval().requires_grad_(False)


class _MemoryTensor:
    """A ``TensorSource`` over a tensor already in (memory-mapped) host memory."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def load(
        self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", rows: slice | None = None
    ) -> torch.Tensor:
        t = self.tensor if rows is None else self.tensor[rows]
        return t.to(device=device, dtype=dtype or t.dtype)


@torch.no_grad()
def load_t5(path: str | Path, ctx: ParallelContext, dtype: torch.dtype | None = None) -> T5Encoder:
    """umT5 sharded with FSDP2 over every rank of ``ctx`` (``--t5_fsdp``), from a Wan folder or the ``.pth``.

    Meta-device build -> cast to ``dtype`` -> shard each block, then the root -> allocate the local shards ->
    each rank copies its own rows from the memory-mapped checkpoint. Every rank must then call ``encode``
    with the same texts (the engine's ENCODE_TEXT step). On one process the encoder is loaded whole.

    Returns:
        A ``T5Encoder`` whose model is sharded (its forward all-gathers one block at a time).
    """
    from transformers import UMT5EncoderModel  # heavy; loaded only when T5 is sharded

    dtype = dtype or (torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    if not ctx.distributed or ctx.mesh is None or ctx.mesh.size() == 1:
        logger.info("--t5_fsdp on one process: nothing to shard, T5 is loaded whole")
        return T5Encoder.from_wan(path, device=ctx.device, dtype=dtype)
    ckpt = _checkpoint_file(path, T5_CHECKPOINT)
    tok_dir = t5_tokenizer_dir(ckpt)
    sd = load_wan_state_dict(ckpt, "t5_checkpoint")
    config = t5_config_from_wan(sd)
    sources = {k: _MemoryTensor(t) for k, t in t5_wan_to_hf(sd).items()}
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    model.requires_grad_(False)
    _cast_meta_params(model, dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(k for k in expected if k not in sources or sources[k].shape != expected[k])
    if wrong or len(expected) != len(sources):
        raise EncoderError(
            "t5_checkpoint",
            f"weights do not fit the model: {wrong[:3] or sorted(set(sources) - set(expected))[:3]}",
        )
    _shard_units(model, model.encoder.block, ctx.mesh, dtype, reshard=True)
    model.to_empty(device=ctx.device)
    nread = fill_from_sources(model, sources, ctx.device)
    logger.info(
        "rank %d: T5 sharded over %d ranks (%d layers, d_model %d, %s): read %.1f MiB",
        ctx.rank,
        ctx.world_size,
        config.num_layers,
        config.d_model,
        dtype,
        nread / 2**20,
    )
    return T5Encoder(model.eval(), load_t5_tokenizer(tok_dir, config.vocab_size))


class CollectiveTextEncoder:
    """Rank 0's handle on a T5 sharded over every rank: ``encode`` is one ENCODE_TEXT step of the engine,
    which every rank joins with its local shard (``Worker.step``). ``run_step`` is ``Engine.run_step``,
    bound once the engine exists."""

    def __init__(self, run_step: Callable[[Message], Any] | None = None) -> None:
        self.run_step = run_step

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        """texts: N prompts -> N tensors [L_i, d_model] from the sharded encoder (checked before anything is
        broadcast: a bad input must not reach the collective step)."""
        if isinstance(texts, str) or not isinstance(texts, list | tuple) or not texts:
            raise EncoderError("texts", "expected a non-empty list of strings")
        if not all(isinstance(t, str) for t in texts):
            raise EncoderError("texts", "every prompt must be a string")
        if self.run_step is None:
            raise RuntimeError("the sharded text encoder is used before the engine is running")
        return self.run_step(Message(Op.ENCODE_TEXT, settings={"texts": tuple(texts)}))


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
