"""Quantised DiT weights (``--quant int8|fp8``) through optimum-quanto, in upstream MultiTalk's file layout.

Upstream publishes, under ``weights/MeiGen-MultiTalk/quant_models/``:

- ``dit_model_{int8,fp8}.safetensors`` + ``dit_model_map_{int8,fp8}.json``: the DiT after optimum-quanto's
  ``quantize`` + ``freeze``, saved with ``model.state_dict()``;
- ``quant_model_int8_FusionX.safetensors`` + ``quantization_map_int8_FusionX.json``: the same with the
  FusionX LoRA merged before quantising (upstream selects it with ``--lora_dir``).

A quantised ``nn.Linear`` named ``M`` is stored as ``M.weight._data`` [out, in] (int8, or float8_e4m3fn for
fp8), ``M.weight._scale`` [out, 1] (per output row, float), ``M.bias`` and the scalar ``M.input_scale`` /
``M.output_scale`` (1.0: activations are not quantised). The map JSON is ``{"M": {"weights": "qint8" |
"qfloat8_e4m3fn", "activations": "none"}}``. The weight is ``_data * _scale``.

Layers are quanto ``QLinear`` modules holding ``WeightQBytesTensor`` weights, so every matmul runs through
quanto's kernels. The linears the model computes in fp32 (``FP32_LINEARS``: time embedding, time projection,
output head; upstream's fp32 autocast islands) stay floating point: a file that quantises them is
dequantised there at load. Loading streams one transformer block at a time from the file, so host memory
never holds the whole model. Without a file, the bf16/fp32 checkpoint is quantised at load, layer by layer,
with quanto's absmax rule (the one ``quantize`` + ``freeze`` applies); ``write_quantized`` saves such a model
in upstream's layout.

Quantised weights replicate under Ulysses (each rank holds the whole int8 model) and cannot be sharded by
FSDP2 (``fully_shard`` fails on ``QLinear``), so ``--quant`` with ``--dit_fsdp full|keep`` is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from optimum.quanto import AbsmaxOptimizer, WeightQBytesTensor, qtype, qtypes, quantize, quantize_weight
from safetensors import safe_open
from safetensors.torch import save

from common.errors import InputError
from common.files import atomic_write_bytes, atomic_write_text
from inference.checkpoint.loader import check_keys, open_checkpoint, resolve_config
from inference.checkpoint.lora import LoraAdapter, merge_sources
from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT, build_model

logger = logging.getLogger(__name__)

QUANT_KINDS: tuple[str, ...] = ("int8", "fp8")
QUANT_SUBDIR = "quant_models"
# Our flag -> the quanto qtype names a map may use for it.
_QTYPE_NAMES = {"int8": ("qint8",), "fp8": ("qfloat8", "qfloat8_e4m3fn")}
_QTYPE = {"int8": "qint8", "fp8": "qfloat8_e4m3fn"}
# Linears the DiT computes in fp32 whatever the weight dtype (``_linear_fp32``): never quantised.
FP32_LINEARS: frozenset[str] = frozenset(
    {"time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"}
)
_QSUFFIXES = ("weight._data", "weight._scale", "input_scale", "output_scale")


class QuantError(InputError):
    """A quantised-weights option or file the loader cannot use; ``field`` names the flag."""


@dataclass(frozen=True)
class QuantSpec:
    """What ``--quant`` asks for: the kind, and upstream's file + map (None: quantise at load)."""

    kind: str
    weights_file: Path | None = None
    map_file: Path | None = None

    @property
    def qtype(self) -> qtype:
        return qtypes[_QTYPE[self.kind]]

    def describe(self) -> str:
        return (
            f"{self.kind} from {self.weights_file}"
            if self.weights_file
            else f"{self.kind} (quantised at load)"
        )


def _file_names(kind: str) -> list[tuple[str, str]]:
    """(weights, map) file names upstream uses for ``kind``."""
    names = [(f"dit_model_{kind}.safetensors", f"dit_model_map_{kind}.json")]
    if kind == "int8":
        names.append(("quant_model_int8_FusionX.safetensors", "quantization_map_int8_FusionX.json"))
    return names


def _map_for(weights_file: Path, kind: str) -> Path:
    """The map JSON beside a quantised weights file: upstream's paired name, else ``<stem>.json``."""
    candidates = [weights_file.parent / m for w, m in _file_names(kind) if w == weights_file.name]
    candidates += [weights_file.with_suffix(".json"), weights_file.parent / f"{weights_file.stem}_map.json"]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(p.name for p in candidates)
    raise QuantError("quant_dir", f"no quantization map beside {weights_file} (looked for {tried})")


def resolve_quant(
    kind: str | None, quant_dir: str | Path | None = None, lora_file: str | Path | None = None
) -> QuantSpec | None:
    """The ``QuantSpec`` for ``--quant KIND [--quant_dir PATH] [--lora_dir FILE]`` (None without --quant).

    ``quant_dir`` is upstream's: a folder holding ``quant_models/`` (or that folder itself) with
    ``dit_model_{KIND}.safetensors`` and its map; or, as InfiniteTalk, the ``.safetensors`` file itself.
    ``lora_file``, as upstream with ``--quant``, names a quantised file with a LoRA merged in
    (``quant_model_int8_FusionX.safetensors``); its map lies beside it. Without either the DiT checkpoint
    is quantised at load.

    Raises:
        QuantError: unknown kind, a folder or file that is missing, a map that cannot be found.
    """
    if kind is None:
        if quant_dir is not None or lora_file is not None:
            field = "quant_dir" if quant_dir is not None else "lora_dir"
            raise QuantError(
                field, "needs --quant int8|fp8 (merging a LoRA into bf16 weights is not supported)"
            )
        return None
    if kind not in QUANT_KINDS:
        raise QuantError("quant", f"unknown kind {kind!r}; choose one of {list(QUANT_KINDS)}")
    if lora_file is not None:
        path = Path(lora_file)
        if not path.is_file() or path.suffix != ".safetensors":
            raise QuantError(
                "lora_dir", f"{path}: expected upstream's quantised LoRA model (a .safetensors file)"
            )
        return QuantSpec(kind, path, _map_for(path, kind))
    if quant_dir is None:
        return QuantSpec(kind)
    path = Path(quant_dir)
    if path.is_file():
        return QuantSpec(kind, path, _map_for(path, kind))
    if not path.is_dir():
        raise QuantError("quant_dir", f"{path} does not exist")
    folder = path / QUANT_SUBDIR if (path / QUANT_SUBDIR).is_dir() else path
    weights_name, map_name = _file_names(kind)[0]
    if not (folder / weights_name).is_file():
        raise QuantError("quant_dir", f"{folder} has no {weights_name} (upstream's {QUANT_SUBDIR}/ layout)")
    if not (folder / map_name).is_file():
        raise QuantError("quant_dir", f"{folder} has {weights_name} but not its map {map_name}")
    return QuantSpec(kind, folder / weights_name, folder / map_name)


def is_quantized_file(path: str | Path) -> bool:
    """True for a safetensors file of quanto-quantised weights (it holds ``*.weight._data`` tensors), such as
    upstream's ``quant_model_int8_FusionX.safetensors`` that upstream passes as ``--lora_dir``."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return any(k.endswith(".weight._data") for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)


def split_quantized_lora(
    kind: str | None, lora_files: Sequence[str | Path]
) -> tuple[Path | None, list[Path]]:
    """Upstream's ``--quant int8 --lora_dir quant_models/quant_model_int8_FusionX.safetensors``: with
    ``--quant``, a quantised model among the ``--lora_dir`` files is the DiT to load (its LoRA is already
    merged in), not an adapter. Returns (that file or None, the real LoRA files)."""
    paths = [Path(p) for p in lora_files]
    if kind is None:
        return None, paths
    quantised = [p for p in paths if is_quantized_file(p)]
    if len(quantised) > 1:
        raise QuantError("lora_dir", f"more than one quantised model given: {[str(p) for p in quantised]}")
    if quantised and len(paths) > 1:
        raise QuantError("lora_dir", f"{quantised[0]} is a quantised model with its LoRA merged in; "
                         "it cannot be combined with further LoRA files")  # fmt: skip
    return (quantised[0], []) if quantised else (None, paths)


def check_quant_layout(
    spec: QuantSpec | None, dit_fsdp: str, world_size: int, switchable_loras: bool = False
) -> None:
    """Refuse what ``--quant`` cannot combine with: FSDP over several ranks (FSDP2 cannot shard quanto's
    quantised layers), and LoRAs switched per job (they keep and swap the float weights)."""
    if spec is None:
        return
    if dit_fsdp != "off" and world_size > 1:
        raise QuantError(
            "quant",
            f"--quant {spec.kind} cannot be combined with --dit_fsdp {dit_fsdp}: FSDP2 shards plain tensors only "
            "and fails on optimum-quanto's QLinear layers; use --dit_fsdp off (every rank holds the whole "
            f"{spec.kind} DiT, about half of bf16) or drop --quant",
        )
    if switchable_loras:
        raise QuantError(
            "lora_mode",
            f"--lora_mode switchable keeps the float weights to swap LoRAs per job, which --quant {spec.kind} "
            "replaces; use --lora_mode merged (the LoRA is merged, then quantised) or drop --quant",
        )


def quantisable_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers ``--quant`` quantises: all but ``FP32_LINEARS``."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in FP32_LINEARS]


def _read_map(spec: QuantSpec) -> dict[str, str]:
    """Map file -> {module: qtype name}, checked against ``spec.kind``."""
    assert spec.map_file is not None
    try:
        raw = json.loads(spec.map_file.read_text())
    except (OSError, ValueError) as exc:
        raise QuantError("quant_dir", f"cannot read the quantization map {spec.map_file}: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise QuantError("quant_dir", f"{spec.map_file}: expected a JSON object of module -> qconfig")
    out: dict[str, str] = {}
    for name, qconf in raw.items():
        if not isinstance(qconf, dict) or "weights" not in qconf:
            raise QuantError("quant_dir", f"{spec.map_file}: entry {name!r} has no 'weights'")
        if qconf.get("activations", "none") != "none":
            raise QuantError(
                "quant_dir", f"{spec.map_file}: {name} quantises activations; only weights are supported"
            )
        if qconf["weights"] == "none":
            continue
        if qconf["weights"] not in _QTYPE_NAMES[spec.kind]:
            raise QuantError(
                "quant", f"--quant {spec.kind} but {spec.map_file} holds {qconf['weights']} weights ({name})"
            )
        out[str(name)] = _QTYPE[spec.kind]
    return out


def _scale_for(weight: torch.Tensor, q: qtype, dtype: torch.dtype) -> torch.Tensor:
    """Per-row absmax scale (quanto's rule), rounded to ``dtype``, the dtype it is stored and used in."""
    return AbsmaxOptimizer()(weight.float(), qtype=q, axis=0).to(dtype)


def quantise_weight(weight: torch.Tensor, q: qtype, dtype: torch.dtype) -> WeightQBytesTensor:
    """Quantise one linear weight [out, in] per output row; the scale is kept in ``dtype``.

    The data are computed in fp32 against the already rounded scale, so ``_data * _scale`` is exactly the
    weight the layer uses. The tensor is quanto's kernel-agnostic layout (no device-specific repacking)."""
    scale = _scale_for(weight, q, dtype)
    packed = quantize_weight(weight.float(), qtype=q, axis=0, scale=scale.float(), optimized=False)
    return _qtensor(q, packed._data, scale)


def _qtensor(q: qtype, data: torch.Tensor, scale: torch.Tensor) -> WeightQBytesTensor:
    return WeightQBytesTensor(q, 0, data.shape, data.stride(), data, scale, None)


def _module_keys(prefix: str, module: nn.Module, quantised: set[str]) -> list[str]:
    """State-dict keys of the tensors ``module`` holds itself (not its children), in upstream's layout."""
    if prefix.rstrip(".") in quantised:
        keys = [
            f"{prefix}weight._data",
            f"{prefix}weight._scale",
            f"{prefix}input_scale",
            f"{prefix}output_scale",
        ]
        if module.bias is not None:
            keys.append(f"{prefix}bias")
        return keys
    return [prefix + n for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None]


def _expected_keys(model: nn.Module, quantised: set[str]) -> list[str]:
    return [
        k for name, m in model.named_modules() for k in _module_keys(f"{name}." if name else "", m, quantised)
    ]


def _stored_shapes(model: nn.Module, quantised: set[str]) -> dict[str, tuple[int, ...]]:
    """Shape of every stored tensor: ``_data`` as the weight, ``_scale`` [out, 1], the two scales []."""
    plain = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for key in _expected_keys(model, quantised):
        if key.endswith("weight._data"):
            shapes[key] = plain[key.removesuffix("._data")]
        elif key.endswith("weight._scale"):
            shapes[key] = (plain[key.removesuffix("._scale")][0], 1)
        elif key.endswith(("input_scale", "output_scale")) and key.rsplit(".", 1)[0] in quantised:
            shapes[key] = ()
        else:
            shapes[key] = plain[key]
    return shapes


def _materialise(
    model: nn.Module, q: qtype, quantised: set[str], tensors: Iterator[tuple[str, dict[str, torch.Tensor]]],
    device: torch.device, dtype: torch.dtype,
) -> None:  # fmt: skip
    """Fill a meta-built model module by module from ``(module name, {key: tensor})``.

    Quantised layers get a ``WeightQBytesTensor`` from ``_data`` / ``_scale`` (scale cast to ``dtype``);
    every other floating tensor is cast to ``dtype``; all land on ``device``."""
    modules = dict(model.named_modules())
    for name, found in tensors:
        module = modules[name]
        prefix = f"{name}." if name else ""
        if name in quantised:
            data = found[f"{prefix}weight._data"].to(device)
            scale = found[f"{prefix}weight._scale"].to(device, dtype)
            module.weight = nn.Parameter(_qtensor(q, data, scale), requires_grad=False)
            for buf in ("input_scale", "output_scale"):
                setattr(module, buf, torch.ones((), dtype=dtype, device=device))
            if module.bias is not None:
                module.bias = nn.Parameter(found[f"{prefix}bias"].to(device, dtype), requires_grad=False)
            continue
        for key, value in found.items():
            attr = key[len(prefix) :]
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value


def _groups(model: nn.Module, quantised: set[str]) -> Iterator[tuple[str, list[str]]]:
    for name, m in model.named_modules():
        keys = _module_keys(f"{name}." if name else "", m, quantised)
        if keys:
            yield name, keys


def _build_meta(config: DiTConfig, q: qtype, quantised: set[str], dtype: torch.dtype) -> MultiTalkDiT:
    model = build_model(config, "meta").requires_grad_(False).to(dtype)
    quantize(model, weights=q, include=sorted(quantised))  # QLinear shells on the meta device
    return model


def _finish(model: MultiTalkDiT, spec: QuantSpec, source: object, device: torch.device) -> MultiTalkDiT:
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise QuantError("quant", f"{len(left)} tensors were not loaded, e.g. {left[:3]}")
    logger.info(
        "DiT %s from %s on %s: %.2f GiB of weights", spec.kind, source, device, weight_bytes(model) / 2**30
    )
    return model.eval().requires_grad_(False)


@torch.no_grad()
def load_quantized_dit(
    folder: str | Path,
    spec: QuantSpec,
    device: torch.device | str,
    config: DiTConfig | None = None,
    dtype: torch.dtype | None = None,
    loras: Sequence[LoraAdapter] = (),
) -> MultiTalkDiT:
    """The DiT with quantised linears, whole on ``device`` (Ulysses-ready, not FSDP-sharded).

    Args:
        folder: the official-layout DiT folder (its ``config.json``; its weights when ``spec`` has no file).
        spec: from ``resolve_quant``.
        device: where the weights live.
        config: overrides ``folder/config.json``.
        dtype: compute dtype of activations, scales and the unquantised tensors (default bf16 on CUDA,
            fp32 on CPU).
        loras: adapters merged into the checkpoint's weights before they are quantised (a quantised file's
            weights are fixed: refused there).

    Raises:
        QuantError / CheckpointError: a file that does not match the model (missing keys, shapes, kinds).
    """
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = resolve_config(folder, config)
    probe = build_model(cfg, "meta")
    linears = set(quantisable_linears(probe))
    q = spec.qtype
    if spec.weights_file is None:
        refs = open_checkpoint(folder)
        check_keys({k: tuple(v.shape) for k, v in probe.state_dict().items()}, refs)
        if loras:
            refs = merge_sources(refs, loras)  # type: ignore[assignment]  # W + s dW in fp32, then quantised
        model = _build_meta(cfg, q, linears, dtype)

        def from_checkpoint() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
            for name, keys in _groups(probe, set()):
                prefix = f"{name}." if name else ""
                found = {k: refs[k].load(device=device) for k in keys}
                if name in linears:
                    w = found.pop(f"{prefix}weight")
                    qw = quantise_weight(w, q, dtype)
                    found[f"{prefix}weight._data"], found[f"{prefix}weight._scale"] = qw._data, qw._scale
                yield name, found

        _materialise(model, q, linears, from_checkpoint(), device, dtype)
        return _finish(model, spec, folder, device)

    if loras:
        raise QuantError("lora_dir", f"{spec.weights_file} is already quantised; a LoRA can only be merged before "
                         "quantising: drop --quant_dir to quantise the checkpoint at load")  # fmt: skip
    qmap = _read_map(spec)
    unknown = sorted(set(qmap) - linears - FP32_LINEARS)
    if unknown:
        raise QuantError(
            "quant_dir",
            f"{spec.map_file} quantises layers this DiT has not (or not as Linear): {unknown[:5]}",
        )
    quantised = set(qmap) - FP32_LINEARS
    islands = set(qmap) & FP32_LINEARS  # stored quantised, used dequantised (fp32 layers)
    expected = _expected_keys(probe, set(qmap))
    with safe_open(str(spec.weights_file), framework="pt", device="cpu") as f:
        present = set(f.keys())
        missing = [k for k in expected if k not in present]
        if missing:
            raise QuantError(
                "quant_dir", f"{spec.weights_file} lacks {len(missing)} tensors, e.g. {missing[:5]}"
            )
        extra = sorted(present - set(expected))
        if extra:
            logger.warning(
                "%s: ignoring %d tensors the DiT has no place for, e.g. %s",
                spec.weights_file,
                len(extra),
                extra[:3],
            )
        wrong = [
            f"{k}: file {list(got)} vs model {list(want)}"
            for k, want in _stored_shapes(probe, set(qmap)).items()
            if (got := tuple(f.get_slice(k).get_shape())) != want
        ]
        if wrong:
            raise QuantError(
                "quant_dir", f"{spec.weights_file} does not match the DiT: {'; '.join(wrong[:5])}"
            )
        model = _build_meta(cfg, q, quantised, dtype)

        def from_file() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
            for name, keys in _groups(probe, set(qmap)):
                found = {k: f.get_tensor(k) for k in keys}
                if name in islands:
                    data, scale = found.pop(f"{name}.weight._data"), found.pop(f"{name}.weight._scale")
                    found[f"{name}.weight"] = data.float() * scale.float()
                    found = {
                        k: v for k, v in found.items() if not k.endswith(("input_scale", "output_scale"))
                    }
                yield name, found

        _materialise(model, q, quantised, from_file(), device, dtype)
    return _finish(model, spec, spec.weights_file, device)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: quantised tensors count their data and scales."""
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if isinstance(t, WeightQBytesTensor):
            total += t._data.numel() * t._data.element_size() + t._scale.numel() * t._scale.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def planned_weight_bytes(config: DiTConfig, kind: str | None, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes ``load_quantized_dit`` (or a plain ``dtype`` load when ``kind`` is None) gives the DiT's weights:
    1 byte per quantised weight plus a ``dtype`` scale per output row, ``dtype`` for everything else."""
    model = build_model(config, "meta")
    linears = set(quantisable_linears(model)) if kind is not None else set()
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, m in model.named_modules():
        for pname, t in (*m._parameters.items(), *m._buffers.items()):
            if t is None:
                continue
            if name in linears and pname == "weight":
                total += t.numel() + t.shape[0] * size
            else:
                total += t.numel() * size
        if name in linears:
            total += 2 * size  # input_scale, output_scale
    return total


@torch.no_grad()
def write_quantized(model: MultiTalkDiT, out_dir: str | Path, kind: str) -> QuantSpec:
    """Quantise ``model``'s linears as ``--quant`` does and write upstream's layout:
    ``out_dir/quant_models/dit_model_{kind}.safetensors`` + ``dit_model_map_{kind}.json``.

    ``model`` is a float ``MultiTalkDiT`` (left unchanged); the scales are stored in its dtype."""
    if kind not in QUANT_KINDS:
        raise QuantError("quant", f"unknown kind {kind!r}; choose one of {list(QUANT_KINDS)}")
    q = qtypes[_QTYPE[kind]]
    linears = set(quantisable_linears(model))
    state: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if name in linears:
            qw = quantise_weight(m.weight, q, m.weight.dtype)
            state[f"{prefix}weight._data"] = qw._data
            state[f"{prefix}weight._scale"] = qw._scale
            one = torch.ones((), dtype=m.weight.dtype)
            state[f"{prefix}input_scale"], state[f"{prefix}output_scale"] = one, one.clone()
            if m.bias is not None:
                state[f"{prefix}bias"] = m.bias
            continue
        for pname, t in (*m._parameters.items(), *m._buffers.items()):
            if t is not None:
                state[prefix + pname] = t
    folder = Path(out_dir) / QUANT_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    weights_name, map_name = _file_names(kind)[0]
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(folder / weights_name, save(tensors, {"format": "pt"}))
    qmap = {name: {"weights": q.name, "activations": "none"} for name in sorted(linears)}
    atomic_write_text(folder / map_name, json.dumps(qmap, indent=2) + "\n")
    logger.info("wrote %s (%d quantised linears, %s)", folder / weights_name, len(linears), kind)
    return QuantSpec(kind, folder / weights_name, folder / map_name)


__all__ = [
    "FP32_LINEARS",
    "QUANT_KINDS",
    "QuantError",
    "QuantSpec",
    "check_quant_layout",
    "is_quantized_file",
    "load_quantized_dit",
    "planned_weight_bytes",
    "quantisable_linears",
    "quantise_weight",
    "resolve_quant",
    "split_quantized_lora",
    "weight_bytes",
    "write_quantized",
]
