"""Conditioning encoders of Wan2.1-I2V / MultiTalk, run by library classes from the official files.

- ``T5Encoder``: transformers ``UMT5EncoderModel`` + the umT5 tokenizer, weights converted at load from
  Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's own T5 naming).
- ``ClipImageEncoder``: transformers ``CLIPVisionModel`` from the visual tower of
  ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``; returns the penultimate block's hidden
  states like Wan's ``use_31_block=True`` (the last block is not even built).
- ``WanVae``: diffusers ``AutoencoderKLWan`` from ``Wan2.1_VAE.pth`` plus Wan's fixed per-channel latent
  normalisation, and ``build_y``, the 20-channel image conditioning of the I2V DiT.

Every key conversion is a plain rename table (Wan name -> library name) built from the architecture,
with an exact inverse (``*_hf_to_wan`` / ``vae_diffusers_to_wan``) that ``tiny_encoders`` uses to write
tiny random models in the official layout; the tests prove each conversion by round trip.

Shapes: ``L`` text tokens, ``T`` video frames, ``T_lat = (T - 1) / 4 + 1`` latent frames,
``h, w = H / 8, W / 8`` latent size.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from common.errors import InputError

logger = logging.getLogger(__name__)

# File names inside a Wan2.1-I2V folder (Wan's ``wan_multitalk_14B`` config).
T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
CLIP_CHECKPOINT = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_CHECKPOINT = "Wan2.1_VAE.pth"

TEXT_LEN = 512  # Wan pads/truncates every prompt to 512 tokens; the DiT pads the cut output back to it
T5_NUM_BUCKETS = 32
T5_MAX_DISTANCE = 128  # Wan's T5RelativeEmbedding max_dist
T5_EPS = 1e-6

CLIP_NUM_HEADS = 16  # ViT-H/14: 1280 / 16 = 80-wide heads (not recoverable from the weights)
CLIP_EPS = 1e-5
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VAE_Z_DIM = 16
VAE_STRIDE = (4, 8, 8)  # (t, h, w)
# Wan2.1 VAE latent statistics (wan/modules/vae.py): latent = (mu - mean) / std.
VAE_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
VAE_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

StateDict = dict[str, torch.Tensor]


class EncoderError(InputError):
    """Bad encoder input or weight file; ``field`` names it ("t5_checkpoint", "t5_tokenizer",
    "clip_checkpoint", "vae_checkpoint", "texts", "image", "video", "latent", "num_frames",
    "motion_frames", "ref_image")."""


# ----------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------


def load_wan_state_dict(path: str | Path, field: str) -> StateDict:
    """Load an official ``.pth`` state dict on the CPU, memory-mapped when the file allows it."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(field, f"weight file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Legacy (non-zip) torch files cannot be memory-mapped; read them whole.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderError(field, f"{path} is not a state dict of tensors")
    return dict(sd)


def _require(sd: Mapping[str, torch.Tensor], key: str, field: str) -> torch.Tensor:
    if key not in sd:
        raise EncoderError(field, f"missing key {key!r}: not a Wan checkpoint of the expected kind")
    return sd[key]


def _block_count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of consecutive ``{prefix}{i}.`` blocks (0, 1, ...) present in ``sd``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    n = 0
    while n in found:
        n += 1
    return n


def _rename(sd: Mapping[str, torch.Tensor], table: Mapping[str, str], field: str) -> StateDict:
    """Apply a full rename table; every table key must be present."""
    missing = [k for k in table if k not in sd]
    if missing:
        raise EncoderError(field, f"{len(missing)} expected keys missing, e.g. {missing[:3]}")
    return {new: sd[old] for old, new in table.items()}


def _load_into(model: torch.nn.Module, sd: StateDict, field: str) -> None:
    """Strict ``load_state_dict`` (assigning tensors) with the mismatch turned into an ``EncoderError``."""
    expected = dict(model.state_dict())
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    bad_shape = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shape:
        raise EncoderError(
            field,
            f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {bad_shape[:3]}",
        )
    model.load_state_dict(sd, strict=True, assign=True)


def _meta_init(build):
    """Build a library model with parameters on the meta device (buffers stay real), so that a 5.7 B
    parameter T5 is never randomly initialised before its weights are assigned."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def _checkpoint_file(path: str | Path, name: str) -> Path:
    """``path`` itself, or ``path/name`` when ``path`` is a Wan folder."""
    path = Path(path)
    return path / name if path.is_dir() else path


def _build_loaded(
    build: Callable[[], torch.nn.Module],
    sd: StateDict,
    field: str,
    device: str | torch.device,
    dtype: torch.dtype,
) -> torch.nn.Module:
    """Build a library model on the meta device, assign ``sd`` cast to ``dtype``, tie the keys that name one
    tensor in ``sd`` into one Parameter, then move it to ``device`` in eval mode without gradients."""
    cast: dict[int, torch.Tensor] = {}
    for t in sd.values():
        if id(t) not in cast:
            cast[id(t)] = t.to(dtype)
    model = _meta_init(build)
    _load_into(model, {k: cast[id(t)] for k, t in sd.items()}, field)
    _tie_shared(model, sd)
    return _finish(model, torch.device(device), dtype)


def _tie_shared(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Make every parameter key that names the same tensor in ``sd`` one ``Parameter`` (the first key's).

    ``load_state_dict(assign=True)`` wraps each key's tensor in its own Parameter: two Parameters over one
    storage, which ``model.to(device or dtype)`` copies apart (T5's 256k x 4096 token embedding, stored as
    ``shared.weight`` and ``encoder.embed_tokens.weight``, would take 2.1 GB twice on the GPU). Call it
    after loading and before any move."""
    first: dict[int, str] = {}
    for key, t in sd.items():
        owner = first.setdefault(id(t), key)
        if owner == key:
            continue
        module_path, _, name = key.rpartition(".")
        module = model.get_submodule(module_path)
        if not isinstance(getattr(module, name, None), torch.nn.Parameter):
            continue  # a buffer stored twice is copied like any buffer; only parameters are tied
        setattr(module, name, model.get_parameter(owner))


def _finish(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # The weights were cast before assignment; only cast again if the model made float tensors of its own.
    if any(t.is_floating_point() and t.dtype != dtype for t in (*model.parameters(), *model.buffers())):
        model = model.to(dtype=dtype)
    model = model.to(device=device)
    stray = [n for n, p in model.named_parameters() if p.is_meta] + [
        n for n, b in model.named_buffers() if b.is_meta
    ]
    if stray:
        raise RuntimeError(f"tensors left uninitialised after loading: {stray[:5]}")
    return model.eval().requires_grad_(False)


def _autocast(device: torch.device, dtype: torch.dtype):
    """Half-precision autocast on CUDA (as upstream runs CLIP); a no-op context elsewhere."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


# ----------------------------------------------------------------------------------------------------
# T5 (umT5-XXL encoder)
# ----------------------------------------------------------------------------------------------------


class _ModelHolder:
    """Device and dtype of a wrapped library model (``self.model``)."""

    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
