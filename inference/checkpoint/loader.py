"""Read and write MultiTalk DiT weights in the official upstream layout.

Layout of a weights folder (``weights/Wan2.1-I2V-14B-480P`` after MultiTalk's "link" step):

- ``config.json``: Wan's model config (``dim``, ``num_heads`` ...); optional when a preset is given.
- ``diffusion_pytorch_model.safetensors.index.json``: ``{"metadata": {"total_size": N},
  "weight_map": {key: file}}``. MeiGen's index maps the Wan keys to the 7 Wan shards and the
  audio keys to ``multitalk.safetensors``.
- the shard files (``diffusion_pytorch_model-0000i-of-0000n.safetensors``, ``multitalk.safetensors``).

Loading builds the model on the meta device, checks every key and shape against the index
before touching data, then streams tensors one at a time (``safetensors.safe_open``) into
storage of the target dtype, so host RAM never holds an fp32 copy of the model.
``open_checkpoint`` / ``TensorRef.load(rows=...)`` are the primitives an FSDP loader can use
to read per-rank slices.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from common.errors import InputError
from inference.checkpoint.lora import LoraAdapter, deltas_by_key, merge_into
from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT, build_model

if TYPE_CHECKING:  # quant imports this module
    from inference.checkpoint.quant import QuantSpec

logger = logging.getLogger(__name__)

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE_NAME = "diffusion_pytorch_model.safetensors"
MULTITALK_FILE_NAME = "multitalk.safetensors"
CONFIG_NAME = "config.json"
# How many key names an error message lists before summarising with a count.
_SHOW = 5

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(InputError):
    """A weights folder is incomplete or does not match the model; ``field`` is ``"checkpoint"``."""


def is_audio_key(key: str) -> bool:
    """True for MultiTalk's added weights (stored in ``multitalk.safetensors``)."""
    return key.startswith("audio_proj.") or ".audio_cross_attn." in key or ".norm_x." in key


def _names(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOW])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > _SHOW else ''})"


@dataclass(frozen=True)
class TensorRef:
    """A lazily loaded tensor of a checkpoint: its file, stored shape and dtype."""

    key: str
    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(
        self,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Read the tensor (or ``rows`` of its first dim, e.g. one FSDP shard) into ``dtype``."""
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            t = f.get_slice(self.key)[rows] if rows is not None else f.get_tensor(self.key)
        return t.to(device=device, dtype=dtype or t.dtype)


def _read_index(folder: Path) -> dict[str, str]:
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError("checkpoint", f"{index_path} is not a safetensors index ({err})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError("checkpoint", f"{index_path} has an empty or invalid weight_map")
        return {str(k): str(v) for k, v in weight_map.items()}
    # No index: a single-file DiT, with the MultiTalk file beside it when present.
    files = [name for name in (SINGLE_FILE_NAME, MULTITALK_FILE_NAME) if (folder / name).is_file()]
    if SINGLE_FILE_NAME not in files:
        raise CheckpointError("checkpoint", f"{folder} has neither {INDEX_NAME} nor {SINGLE_FILE_NAME}")
    weight_map: dict[str, str] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt", device="cpu") as f:
            weight_map.update({k: name for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return weight_map


def open_checkpoint(folder: str | Path) -> dict[str, TensorRef]:
    """Map every key of a weights folder to its file, shape and dtype (headers only, no data).

    Raises:
        CheckpointError: the folder, index or a shard is missing, or a shard lacks a key the
            index assigns to it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError("checkpoint", f"weights folder {folder} does not exist")
    weight_map = _read_index(folder)
    by_file: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        by_file.setdefault(name, []).append(key)
    refs: dict[str, TensorRef] = {}
    for name, keys in sorted(by_file.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(
                "checkpoint",
                f"shard {name} listed in the index is missing from {folder} ({len(keys)} tensors)",
            )
        with safe_open(str(path), framework="pt", device="cpu") as f:
            present = set(f.keys())
            absent = [k for k in keys if k not in present]
            if absent:
                raise CheckpointError(
                    "checkpoint", f"{name} lacks keys the index assigns to it: {_names(absent)}"
                )
            for key in keys:
                sl = f.get_slice(key)
                dtype = _ST_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise CheckpointError(
                        "checkpoint", f"{name}:{key} has unsupported dtype {sl.get_dtype()}"
                    )
                refs[key] = TensorRef(key, path, tuple(sl.get_shape()), dtype)
    return refs


def iter_checkpoint_tensors(
    refs: dict[str, TensorRef] | str | Path,
    keys: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one at a time, opening each shard once (file order)."""
    if not isinstance(refs, dict):
        refs = open_checkpoint(refs)
    wanted = list(refs) if keys is None else list(keys)
    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        if key not in refs:
            raise CheckpointError("checkpoint", f"key {key!r} is not in the checkpoint")
        by_file.setdefault(refs[key].path, []).append(key)
    for path, file_keys in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in file_keys:
                t = f.get_tensor(key)
                yield key, t.to(device=device, dtype=dtype or t.dtype)


def check_keys(expected: dict[str, tuple[int, ...]], refs: dict[str, TensorRef]) -> None:
    """Strict comparison of model tensors with checkpoint tensors.

    Raises:
        CheckpointError: naming missing keys, unexpected keys (first few + counts) and every
            shape mismatch.
    """
    missing = expected.keys() - refs.keys()
    unexpected = refs.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    mismatched = [
        f"{k}: checkpoint {list(refs[k].shape)} vs model {list(shape)}"
        for k, shape in sorted(expected.items())
        if k in refs and tuple(refs[k].shape) != tuple(shape)
    ]
    if mismatched:
        more = f" (+{len(mismatched) - _SHOW} more)" if len(mismatched) > _SHOW else ""
        problems.append(f"shape mismatches {len(mismatched)}: " + "; ".join(mismatched[:_SHOW]) + more)
    if problems:
        raise CheckpointError("checkpoint", "weights do not match the model: " + " | ".join(problems))


def default_device_dtype() -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA, fp32 on CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    return torch.device("cpu"), torch.float32


def resolve_config(folder: str | Path, config: DiTConfig | None = None) -> DiTConfig:
    """An explicit config wins; otherwise ``folder/config.json`` (missing audio keys take defaults)."""
    if config is not None:
        return config
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError("config", f"{path} is missing; pass a preset config")
    return DiTConfig.from_json(path)


@torch.no_grad()
def load_model(
    folder: str | Path,
    config: DiTConfig | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    loras: Sequence[LoraAdapter] = (),
    quant: QuantSpec | None = None,
) -> MultiTalkDiT:
    """Build the DiT on the meta device and stream the folder's weights into it.

    Args:
        folder: official-layout weights folder.
        config: model config; read from ``folder/config.json`` when None.
        dtype, device: target storage; default bf16 on CUDA, fp32 on CPU.
        loras: adapters (``inference.checkpoint.lora.read_loras``) merged into each weight as it
            streams in: ``W + s dW`` in fp32, one tensor at a time, then cast to ``dtype``.
        quant: ``--quant`` (``inference.checkpoint.quant.resolve_quant``): int8/fp8 linears, read from
            upstream's quantised file or quantised as they stream in; ``dtype`` is then the compute dtype.

    Returns:
        The model in eval mode with ``requires_grad`` off.
    """
    cfg = resolve_config(folder, config)
    default_dev, default_dtype = default_device_dtype()
    device = torch.device(device) if device is not None else default_dev
    dtype = dtype or (default_dtype if device.type == default_dev.type else torch.float32)
    if quant is not None:
        from inference.checkpoint.quant import load_quantized_dit  # quant imports this module

        return load_quantized_dit(folder, quant, device, cfg, dtype, loras)
    refs = open_checkpoint(folder)
    model = build_model(cfg, "meta").to(dtype)
    targets = model.state_dict(keep_vars=True)
    check_keys({k: tuple(v.shape) for k, v in targets.items()}, refs)
    model.to_empty(device=device)
    targets = model.state_dict(keep_vars=True)
    nbytes = 0
    merged = deltas_by_key(loras)
    for key, tensor in iter_checkpoint_tensors(refs, keys=targets.keys()):
        if key in merged:
            tensor = merge_into(tensor, merged.pop(key))
        targets[key].copy_(tensor)  # casts to the target dtype/device; one source tensor alive at a time
        nbytes += tensor.numel() * tensor.element_size()
    logger.info(
        "loaded %d tensors (%.2f GB read) from %s into %s %s",
        len(targets),
        nbytes / 1e9,
        folder,
        device,
        dtype,
    )
    return model.eval().requires_grad_(False)


def save_checkpoint(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    folder: str | Path,
    num_shards: int = 2,
    config: DiTConfig | None = None,
) -> dict[str, str]:
    """Write the official layout: Wan shards + ``multitalk.safetensors`` + index (+ ``config.json``).

    Args:
        model_or_state_dict: a ``MultiTalkDiT`` (its config is written too) or a state dict.
        folder: created if needed; existing files of the same names are overwritten.
        num_shards: number of Wan shards (7 upstream), balanced by bytes in key order.
        config: written as ``config.json`` (defaults to the model's config).

    Returns:
        The index's weight_map (key -> file name).
    """
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
        config = config or getattr(model_or_state_dict, "config", None)
    else:
        state = dict(model_or_state_dict)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wan_keys = [k for k in state if not is_audio_key(k)]
    audio_keys = [k for k in state if is_audio_key(k)]
    if not 1 <= num_shards <= max(1, len(wan_keys)):
        raise CheckpointError("num_shards", f"num_shards must be in [1, {len(wan_keys)}], got {num_shards}")

    def nbytes(k: str) -> int:
        return state[k].numel() * state[k].element_size()

    # Contiguous groups of roughly equal byte size.
    total_wan = sum(nbytes(k) for k in wan_keys)
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    acc = 0
    for i, key in enumerate(wan_keys):
        remaining_keys = len(wan_keys) - i
        shard = min(num_shards - 1, math.floor(acc * num_shards / max(total_wan, 1)))
        # Keep at least one key for each later shard.
        shard = max(shard, num_shards - remaining_keys)
        groups[shard].append(key)
        acc += nbytes(key)
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(
            {k: state[k].detach().cpu().contiguous() for k in keys}, str(folder / name), {"format": "pt"}
        )
        weight_map.update({k: name for k in keys})
    if audio_keys:
        tensors = {k: state[k].detach().cpu().contiguous() for k in audio_keys}
        save_file(tensors, str(folder / MULTITALK_FILE_NAME), {"format": "pt"})
        weight_map.update({k: MULTITALK_FILE_NAME for k in audio_keys})
    index = {
        "metadata": {"total_size": sum(nbytes(k) for k in state)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if config is not None:
        (folder / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    logger.info(
        "saved %d tensors to %s (%d Wan shards + %s)", len(state), folder, num_shards, MULTITALK_FILE_NAME
    )
    return weight_map
