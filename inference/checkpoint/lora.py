"""LoRA adapters for the MultiTalk DiT (FusionX, lightx2v step distillation): read, check, merge, switch.

Accepted file layouts (safetensors; one file, one layout):

- upstream MultiTalk / ComfyUI (what ``wan/wan_lora.py`` merges): ``diffusion_model.<module>.lora_down.weight``
  with ``.lora_up.weight``; ``diffusion_model.<stem>.diff`` (a full delta of ``<stem>.weight``) and
  ``.diff_b`` (a delta of ``<stem>.bias``). Also ``<block>.diff_m`` (a delta of the block's
  ``modulation``, written by lightx2v's I2V files; upstream skips it) and optional ``.alpha``.
- PEFT / diffusers: ``transformer.`` or ``diffusion_model.`` prefix, ``<module>.lora_A.weight`` with
  ``.lora_B.weight`` (an adapter name between, ``lora_A.<name>.weight``, is accepted) and ``lora_B.bias``
  (diffusers' bias delta). Module names are Wan's (``blocks.0.self_attn.q``) or diffusers'
  ``WanTransformer3DModel`` names (``blocks.0.attn1.to_q``), mapped to Wan's.
- kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (underscores for dots; ``lora_unet__`` and half-dotted ``lora_unet_blocks_0.self_attn.q``
  variants too). The underscore path is matched against the model's own module names.

A low-rank pair gives ``dW = factor * up @ down`` (conv weights: flattened, then reshaped), a ``.diff``
gives ``dW = diff``. Loading ``W' = W + scale * dW`` per LoRA, in fp32, rounded once to the storage dtype.

``.alpha``: ``factor = alpha / rank`` when the file carries an alpha for that module, else 1. This is the
kohya / PEFT / ComfyUI convention the files are written for (a LoRA trained with alpha a and rank r
adds ``a / r * B A``). Upstream MultiTalk's merge ignores ``.alpha`` keys altogether, i.e. always uses
factor 1: the two are the same for files without alpha keys or with alpha == rank, which is the case for
ComfyUI-extracted files such as the FusionX and lightx2v LoRAs upstream's README names; there the merge
here equals upstream's fp32 merge bit for bit (upstream: ``param.add_(matmul(up, down) * scale)``, same
order of operations). A file with alpha != rank is merged as its trainer meant, which upstream would not
do; a warning says so.

Every key must map to a parameter of the model with a fitting shape; otherwise the file is refused
with ``LoraError`` naming the file and the key (upstream silently skips keys without its prefix).

Two ways to use the adapters:

- merged (``merge_sources``): wraps checkpoint tensors so that ``load(dtype, device, rows)`` returns
  ``W + s dW`` for the requested rows only. ``load_model`` and the FSDP2 loader read through it, so the
  merge happens while the weights stream in, one tensor at a time, and under FSDP2 each rank merges only
  its own row slice: there is never an fp32 copy of the whole model.
- switchable (``AdapterBank``): the model keeps W; ``set_active(True)`` turns the adapters on for the
  next forwards. Low-rank deltas of the linear layers inside the transformer blocks run as
  ``y = W x + b + s * factor * up(down(x))`` (forward hooks; the factors stay rank-sized). Every other
  delta (norm weights, biases, modulation, embeddings, head) is small or runs outside ``nn.Linear.__call__``
  and is switched by copying a merged or a base copy of the parameter (this rank's shard under FSDP2).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from common.errors import InputError

logger = logging.getLogger(__name__)

LORA_MODES = ("merged", "switchable")

# diffusers WanTransformer3DModel names -> Wan names, applied to the dotted path after ``blocks.N.``
# or at the top level (first match wins; longest first).
_DIFFUSERS_BLOCK = (
    ("attn1.to_q", "self_attn.q"),
    ("attn1.to_k", "self_attn.k"),
    ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"),
    ("attn1.norm_q", "self_attn.norm_q"),
    ("attn1.norm_k", "self_attn.norm_k"),
    ("attn2.to_q", "cross_attn.q"),
    ("attn2.to_k", "cross_attn.k"),
    ("attn2.to_v", "cross_attn.v"),
    ("attn2.to_out.0", "cross_attn.o"),
    ("attn2.add_k_proj", "cross_attn.k_img"),
    ("attn2.add_v_proj", "cross_attn.v_img"),
    ("attn2.norm_q", "cross_attn.norm_q"),
    ("attn2.norm_k", "cross_attn.norm_k"),
    ("attn2.norm_added_k", "cross_attn.norm_k_img"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("scale_shift_table", "modulation"),
)
_DIFFUSERS_TOP = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("patch_embedding", "patch_embedding"),
    ("proj_out", "head.head"),
)
_PREFIXES = ("diffusion_model.", "transformer.", "model.diffusion_model.", "base_model.model.")
_KOHYA = re.compile(r"^lora_unet_+")
# (regex on the key's tail, role, target parameter name under the module)
_SUFFIXES = (
    (re.compile(r"\.lora_down\.weight$"), "down", "weight"),
    (re.compile(r"\.lora_up\.weight$"), "up", "weight"),
    (re.compile(r"\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight$"), "down", "weight"),
    (re.compile(r"\.lora_B(?:\.[A-Za-z0-9_-]+)?\.weight$"), "up", "weight"),
    (re.compile(r"\.lora_B(?:\.[A-Za-z0-9_-]+)?\.bias$"), "diff", "bias"),
    (re.compile(r"\.alpha$"), "alpha", "weight"),
    (re.compile(r"\.diff_b$"), "diff", "bias"),
    (re.compile(r"\.diff_m$"), "diff", "modulation"),
    (re.compile(r"\.diff$"), "diff", "weight"),
)


class LoraError(InputError):
    """A LoRA file that cannot be applied; ``field`` is ``lora_dir`` (or ``lora_scale``), the message
    names the file and the offending key."""


# ---------------------------------------------------------------------------------------------- deltas


@dataclass(frozen=True)
class LowRankDelta:
    """dW = factor * up @ down. down: [r, in, *k] (A); up: [out, r, *1] (B); dW: [out, in, *k]."""

    down: torch.Tensor
    up: torch.Tensor
    factor: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def rows(self, rows: slice | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """fp32 dW (or only ``rows`` of its first dim): [rows, in, *k]. Same operation order as
        upstream's merge: ``matmul(up, down)``, then the factor (not applied when it is 1)."""
        up = self.up if rows is None else self.up[rows]
        up = up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32)
        delta = (up @ down.flatten(1)).view(up.shape[0], *down.shape[1:])
        return delta * self.factor if self.factor != 1.0 else delta


@dataclass(frozen=True)
class FullDelta:
    """dW = diff, stored with the parameter's shape."""

    diff: torch.Tensor

    def rows(self, rows: slice | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        d = self.diff if rows is None else self.diff[rows]
        return d.to(device=device, dtype=torch.float32)


Delta = LowRankDelta | FullDelta


@dataclass(frozen=True)
class LoraAdapter:
    """One LoRA file checked against the model: parameter key -> delta, and its user scale."""

    name: str
    path: Path
    scale: float
    deltas: Mapping[str, Delta]

    @property
    def num_params(self) -> int:
        n = 0
        for d in self.deltas.values():
            n += d.down.numel() + d.up.numel() if isinstance(d, LowRankDelta) else d.diff.numel()
        return n


# ---------------------------------------------------------------------------------------------- parsing


def _module_path(stem: str, kohya: bool, underscore_paths: Mapping[str, str]) -> str | None:
    """A key's module part -> the model's dotted module path (None when nothing matches)."""
    if kohya:
        return underscore_paths.get(stem.replace(".", "_"))
    m = re.match(r"^(blocks\.\d+\.)(.*)$", stem)
    head, rest = (m.group(1), m.group(2)) if m else ("", stem)
    table = _DIFFUSERS_BLOCK if m else _DIFFUSERS_TOP
    for theirs, ours in table:
        if rest == theirs or rest.startswith(theirs + "."):
            return head + ours + rest[len(theirs) :]
    return stem


def _split_key(key: str) -> tuple[str, str, str, bool] | None:
    """key -> (module stem, role, target param name, kohya?) or None when no suffix matches."""
    kohya = bool(_KOHYA.match(key))
    body = _KOHYA.sub("", key, count=1) if kohya else key
    if not kohya:
        for prefix in _PREFIXES:
            if body.startswith(prefix):
                body = body[len(prefix) :]
                break
    for pattern, role, target in _SUFFIXES:
        m = pattern.search(body)
        if m:
            return body[: m.start()], role, target, kohya
    return None


def _underscore_paths(param_keys: Iterable[str]) -> dict[str, str]:
    """Every module/parameter stem of the model, with dots as underscores -> the dotted path."""
    out: dict[str, str] = {}
    clash: set[str] = set()
    for key in param_keys:
        parts = key.split(".")
        for i in range(1, len(parts) + 1):
            dotted = ".".join(parts[:i])
            flat = dotted.replace(".", "_")
            if out.get(flat, dotted) != dotted:
                clash.add(flat)
            out[flat] = dotted
    for flat in clash:
        out.pop(flat)
    return out


def read_lora(path: str | Path, shapes: Mapping[str, tuple[int, ...]], scale: float = 1.0) -> LoraAdapter:
    """Read a LoRA file and check every key against the model's parameters.

    Args:
        path: a ``.safetensors`` LoRA in one of the layouts above.
        shapes: the model's state-dict keys -> shapes (e.g. from a meta-device model).
        scale: the user's strength (upstream ``--lora_scale``).

    Raises:
        LoraError: unreadable file, a key that maps to no parameter, an unpaired ``lora_down``/``up``,
            an alpha without its pair, or a delta whose shape does not fit the parameter.
    """
    path = Path(path)
    if not (isinstance(scale, int | float) and not isinstance(scale, bool) and math.isfinite(scale)):
        raise LoraError("lora_scale", f"{path.name}: the scale must be a finite number, got {scale!r}")
    if not path.is_file():
        raise LoraError("lora_dir", f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError("lora_dir", f"{path}: not a readable safetensors file ({exc})") from None
    if not tensors:
        raise LoraError("lora_dir", f"{path}: the file holds no tensors")

    underscore = _underscore_paths(shapes)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # param key -> role -> (file key, tensor)
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            raise LoraError(
                "lora_dir",
                f"{path.name}: key {key!r} is not a LoRA key (expected lora_down/lora_up, lora_A/lora_B, "
                ".alpha, .diff, .diff_b or .diff_m)",
            )
        stem, role, target, kohya = split
        module = _module_path(stem, kohya, underscore)
        param = f"{module}.{target}" if module is not None else None
        if param is None or param not in shapes:
            raise LoraError(
                "lora_dir",
                f"{path.name}: key {key!r} matches no parameter of the model (looked for {param!r})",
            )
        slot = parts.setdefault(param, {})
        if role in slot:
            raise LoraError("lora_dir", f"{path.name}: keys {slot[role][0]!r} and {key!r} both set {param}")
        slot[role] = (key, tensor)

    deltas: dict[str, Delta] = {}
    alpha_differs = []
    for param, slot in parts.items():
        shape = tuple(shapes[param])
        if "diff" in slot:
            key, diff = slot.pop("diff")
            if tuple(diff.shape) != shape:
                raise LoraError(
                    "lora_dir", f"{path.name}: {key!r} has shape {list(diff.shape)}, {param} is {list(shape)}"
                )
            if slot:  # a low-rank pair on the same parameter: refuse rather than guess the order
                raise LoraError(
                    "lora_dir", f"{path.name}: {param} has both a full diff ({key!r}) and LoRA factors"
                )
            deltas[param] = FullDelta(diff)
            continue
        if "down" not in slot or "up" not in slot:
            have = ", ".join(k for k, _ in slot.values())
            raise LoraError("lora_dir", f"{path.name}: {have} lacks its lora_down/lora_up partner")
        (down_key, down), (up_key, up) = slot["down"], slot["up"]
        rank = down.shape[0] if down.ndim >= 2 else -1
        fits = (
            down.ndim >= 2
            and up.ndim == down.ndim
            and up.shape[1] == rank
            and all(s == 1 for s in up.shape[2:])
            and (up.shape[0], *down.shape[1:]) == shape
        )
        if not fits:
            raise LoraError(
                "lora_dir",
                f"{path.name}: {down_key!r} {list(down.shape)} and {up_key!r} {list(up.shape)} do not "
                f"make a delta of {param} {list(shape)}",
            )
        factor = 1.0
        if "alpha" in slot:
            alpha_key, alpha = slot["alpha"]
            if alpha.numel() != 1 or not math.isfinite(float(alpha.float())):
                raise LoraError("lora_dir", f"{path.name}: {alpha_key!r} is not a finite scalar")
            factor = float(alpha.float()) / rank
            if factor != 1.0:
                alpha_differs.append(alpha_key)
        deltas[param] = LowRankDelta(down, up, factor)
    if alpha_differs:
        logger.warning(
            "%s: %d alpha value(s) differ from the rank (e.g. %s); merged as alpha/rank like kohya/PEFT/"
            "ComfyUI, which upstream MultiTalk (it ignores alpha) would not do",
            path.name,
            len(alpha_differs),
            alpha_differs[0],
        )
    adapter = LoraAdapter(path.stem, path, float(scale), deltas)
    logger.info(
        "LoRA %s: %d parameters touched, %.1fM adapter values, scale %g",
        path.name,
        len(deltas),
        adapter.num_params / 1e6,
        scale,
    )
    return adapter


def read_loras(
    paths: Sequence[str | Path], scales: Sequence[float], shapes: Mapping[str, tuple[int, ...]]
) -> list[LoraAdapter]:
    """``--lora_dir A [B ...] --lora_scale s [...]``: one scale for all files, or one per file."""
    if not paths:
        return []
    scales = list(scales) if scales else [1.0]
    if len(scales) == 1:
        scales = scales * len(paths)
    if len(scales) != len(paths):
        raise LoraError(
            "lora_scale", f"{len(paths)} LoRA file(s) but {len(scales)} scales; give one, or one per file"
        )
    return [read_lora(p, shapes, s) for p, s in zip(paths, scales, strict=True)]


def deltas_by_key(adapters: Sequence[LoraAdapter]) -> dict[str, list[tuple[Delta, float]]]:
    """parameter key -> [(delta, scale), ...] in the order the files were given."""
    out: dict[str, list[tuple[Delta, float]]] = {}
    for adapter in adapters:
        for key, delta in adapter.deltas.items():
            out.setdefault(key, []).append((delta, adapter.scale))
    return out


def merge_into(
    base: torch.Tensor, deltas: Sequence[tuple[Delta, float]], rows: slice | None = None
) -> torch.Tensor:
    """fp32 ``base + s1 dW1 + s2 dW2 ...`` for ``rows`` of the parameter (base holds exactly those rows)."""
    w = base.to(torch.float32, copy=True)
    for delta, scale in deltas:
        w.add_(delta.rows(rows, w.device) * scale)
    return w


# ---------------------------------------------------------------------------------------------- merged


class MergedSource:
    """A checkpoint tensor with LoRA deltas added on read (satisfies the FSDP loader's TensorSource)."""

    def __init__(self, base: Any, deltas: Sequence[tuple[Delta, float]]) -> None:
        self.base = base
        self.deltas = list(deltas)
        self.shape: tuple[int, ...] = tuple(base.shape)
        self.dtype: torch.dtype = getattr(base, "dtype", torch.float32)

    def load(
        self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", rows: slice | None = None
    ) -> torch.Tensor:
        """``rows`` of W + sum(s dW), merged in fp32 on ``device``, returned in ``dtype``."""
        w = merge_into(self.base.load(dtype=torch.float32, device=device, rows=rows), self.deltas, rows)
        return w.to(dtype or self.dtype)


def merge_sources(refs: Mapping[str, Any], adapters: Sequence[LoraAdapter]) -> dict[str, Any]:
    """Checkpoint refs with every LoRA-touched key wrapped in a ``MergedSource`` (others unchanged)."""
    touched = deltas_by_key(adapters)
    missing = sorted(k for k in touched if k not in refs)
    if missing:
        raise LoraError("lora_dir", f"the checkpoint lacks LoRA target(s) {missing[:5]}")
    return {k: MergedSource(v, touched[k]) if k in touched else v for k, v in refs.items()}


# ---------------------------------------------------------------------------------------------- switchable


def _local(param: torch.Tensor) -> tuple[torch.Tensor, slice | None]:
    """This rank's storage of a parameter and the global rows it holds (None: the whole tensor).

    FSDP2 shards dim 0 with torch.chunk's rule (ceil(n / P) rows per rank, the last ones shorter or empty).
    """
    if not isinstance(param, DTensor):
        return param.data, None
    if len(param.placements) != 1 or param.placements[0] != Shard(0):
        raise RuntimeError(f"expected FSDP2's Shard(0) on a 1-D mesh, got {param.placements}")
    n, world, rank = param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return param.to_local(), slice(start, min(start + chunk, n))


class _LowRankHook:
    """Forward hook of one nn.Linear: out += sum(s * factor * up(down(x))) while the bank is active."""

    def __init__(self, bank: AdapterBank, factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        self.bank = bank
        self.factors = factors  # (down [r, in], up [out, r], s * factor), in the layer's dtype/device

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        if not self.bank.active:
            return out
        x = args[0]
        for down, up, s in self.factors:
            out = out + F.linear(F.linear(x, down), up) * s
        return out


class AdapterBank:
    """Switchable LoRAs on a loaded model (see the module docstring). Inactive after construction."""

    def __init__(self, model: nn.Module, adapters: Sequence[LoraAdapter]) -> None:
        if not adapters:
            raise LoraError("lora_dir", "switchable LoRA mode needs at least one LoRA file")
        self.model = model
        self.adapters = list(adapters)
        self.active = False
        self._handles: list[Any] = []
        self._swaps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (storage, base, merged)
        self.hooked_layers = 0
        params = dict(model.named_parameters())
        hooks: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        with torch.no_grad():
            for key, items in deltas_by_key(adapters).items():
                module_path, _, leaf = key.rpartition(".")
                module = model.get_submodule(module_path) if module_path else model
                low_rank = all(isinstance(d, LowRankDelta) for d, _ in items)
                if (
                    low_rank
                    and leaf == "weight"
                    and isinstance(module, nn.Linear)
                    and key.startswith("blocks.")
                ):
                    weight = params[key]
                    dev, dt = weight.device, weight.dtype
                    for delta, scale in items:
                        assert isinstance(delta, LowRankDelta)
                        hooks.setdefault(module_path, []).append(
                            (delta.down.to(dev, dt), delta.up.to(dev, dt), scale * delta.factor)
                        )
                    continue
                storage, rows = _local(params[key])
                if storage.numel() == 0:
                    continue
                merged = merge_into(storage, items, rows).to(storage.dtype)
                self._swaps.append((storage, storage.detach().clone(), merged))
        for module_path, factors in hooks.items():
            hook = _LowRankHook(self, factors)
            self._handles.append(model.get_submodule(module_path).register_forward_hook(hook))
        self.hooked_layers = len(hooks)
        logger.info(
            "switchable LoRA: %d linear layers hooked (low rank), %d tensors switched by copy",
            self.hooked_layers,
            len(self._swaps),
        )

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @torch.no_grad()
    def set_active(self, on: bool) -> None:
        """Turn the adapters on or off for the following forwards (every rank must do the same)."""
        if on == self.active:
            return
        for storage, base, merged in self._swaps:
            storage.copy_(merged if on else base)
        self.active = on
        if self._swaps:
            _drop_gathered_weights(self.model)

    def remove(self) -> None:
        """Switch off and detach the hooks."""
        self.set_active(False)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _drop_gathered_weights(model: nn.Module) -> None:
    """FSDP2 with reshard_after_forward=False keeps gathered weights between forwards: free them so the
    next forward gathers the switched shards."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
