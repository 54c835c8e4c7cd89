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

import html
import logging
import math
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

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


class EncoderError(ValueError):
    """Bad encoder input or weight file; ``field`` names it ("t5_checkpoint", "t5_tokenizer",
    "clip_checkpoint", "vae_checkpoint", "texts", "image", "video", "latent", "num_frames",
    "motion_frames", "ref_image")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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
    """Build a library model on the meta device, assign ``sd`` cast to ``dtype`` (a tensor stored under two
    keys stays one tensor), then move it to ``device`` in eval mode without gradients."""
    cast: dict[int, torch.Tensor] = {}
    for t in sd.values():
        if id(t) not in cast:
            cast[id(t)] = t.to(dtype)
    model = _meta_init(build)
    _load_into(model, {k: cast[id(t)] for k, t in sd.items()}, field)
    return _finish(model, torch.device(device), dtype)


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


def _t5_key_table(num_layers: int) -> dict[str, str]:
    """Wan T5 key -> transformers UMT5EncoderModel key (the token embedding is handled apart)."""
    table = {"norm.weight": "encoder.final_layer_norm.weight"}
    for i in range(num_layers):
        src, dst = f"blocks.{i}.", f"encoder.block.{i}."
        attn = dst + "layer.0.SelfAttention."
        ffn = dst + "layer.1.DenseReluDense."
        table[src + "norm1.weight"] = dst + "layer.0.layer_norm.weight"
        for p in ("q", "k", "v", "o"):
            table[src + f"attn.{p}.weight"] = attn + f"{p}.weight"
        # umT5 keeps one relative-position table per layer (Wan: shared_pos=False).
        table[src + "pos_embedding.embedding.weight"] = attn + "relative_attention_bias.weight"
        table[src + "norm2.weight"] = dst + "layer.1.layer_norm.weight"
        # Wan: fc2(fc1(x) * gelu(gate(x))); HF: wo(gelu(wi_0(x)) * wi_1(x)).
        table[src + "ffn.gate.0.weight"] = ffn + "wi_0.weight"
        table[src + "ffn.fc1.weight"] = ffn + "wi_1.weight"
        table[src + "ffn.fc2.weight"] = ffn + "wo.weight"
    return table


def t5_config_from_wan(sd: Mapping[str, torch.Tensor], field: str = "t5_checkpoint") -> Any:
    """UMT5Config describing the encoder stored in a Wan T5 state dict (everything is read from shapes:
    the number of heads from the per-layer relative-position table ``[num_buckets, heads]``)."""
    from transformers import UMT5Config

    vocab, d_model = _require(sd, "token_embedding.weight", field).shape
    num_layers = _block_count(sd, "blocks.")
    if num_layers == 0:
        raise EncoderError(field, "no 'blocks.N.' keys: not a Wan T5 encoder checkpoint")
    num_buckets, num_heads = _require(sd, "blocks.0.pos_embedding.embedding.weight", field).shape
    inner = _require(sd, "blocks.0.attn.q.weight", field).shape[0]
    d_ff = _require(sd, "blocks.0.ffn.fc1.weight", field).shape[0]
    if inner % num_heads:
        raise EncoderError(field, f"attention width {inner} is not divisible by {num_heads} heads")
    return UMT5Config(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(inner // num_heads),
        d_ff=int(d_ff),
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=int(num_heads),
        relative_attention_num_buckets=int(num_buckets),
        relative_attention_max_distance=T5_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",  # gelu_new (tanh form) == Wan's GELU
        layer_norm_epsilon=T5_EPS,
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def t5_wan_to_hf(sd: Mapping[str, torch.Tensor], field: str = "t5_checkpoint") -> StateDict:
    """Wan T5 encoder state dict -> ``UMT5EncoderModel`` state dict."""
    num_layers = _block_count(sd, "blocks.")
    table = _t5_key_table(num_layers)
    extra = [k for k in sd if k not in table and k != "token_embedding.weight"]
    if extra:
        raise EncoderError(field, f"unknown keys in the T5 checkpoint, e.g. {extra[:3]}")
    out = _rename(sd, table, field)
    emb = _require(sd, "token_embedding.weight", field)
    out["shared.weight"] = emb  # the same tensor twice: HF ties shared and encoder.embed_tokens
    out["encoder.embed_tokens.weight"] = emb
    return out


def t5_hf_to_wan(hf_sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Inverse of ``t5_wan_to_hf``: ``UMT5EncoderModel`` state dict -> Wan T5 encoder naming."""
    num_layers = _block_count(hf_sd, "encoder.block.")
    inverse = {dst: src for src, dst in _t5_key_table(num_layers).items()}
    out = {inverse[k]: v for k, v in hf_sd.items() if k in inverse}
    out["token_embedding.weight"] = hf_sd["shared.weight"]
    return out


_WHITESPACE = re.compile(r"\s+")
_ftfy_warned = threading.Event()


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (``clean='whitespace'``): ftfy fix, HTML unescape twice, collapse whitespace.

    ftfy is optional here: it only repairs mojibake, so a normal prompt is unchanged without it."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        if not _ftfy_warned.is_set():
            _ftfy_warned.set()
            logger.warning("ftfy is not installed: prompts are cleaned without its mojibake repair")
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class _ModelHolder:
    """Device and dtype of a wrapped library model (``self.model``)."""

    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


class T5Encoder(_ModelHolder):
    """umT5-XXL text encoder (``UMT5EncoderModel``) with Wan's tokenisation and per-prompt cut."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, text_len: int = TEXT_LEN) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @classmethod
    def from_wan(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        tokenizer_dir: str | Path | None = None,
        text_len: int = TEXT_LEN,
    ) -> T5Encoder:
        """Load from a Wan folder (``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl/``) or from the
        ``.pth`` itself; the tokenizer defaults to ``google/umt5-xxl/`` beside the checkpoint."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        ckpt = _checkpoint_file(path, T5_CHECKPOINT)
        tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else ckpt.parent / T5_TOKENIZER_DIR
        if not tok_dir.is_dir():
            raise EncoderError("t5_tokenizer", f"tokenizer folder not found: {tok_dir}")
        sd = load_wan_state_dict(ckpt, "t5_checkpoint")
        config = t5_config_from_wan(sd)
        model = _build_loaded(
            lambda: UMT5EncoderModel(config), t5_wan_to_hf(sd), "t5_checkpoint", device, dtype
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise EncoderError("t5_tokenizer", f"cannot load the tokenizer in {tok_dir}: {exc}") from exc
        if len(tokenizer) > config.vocab_size:
            raise EncoderError(
                "t5_tokenizer", f"tokenizer has {len(tokenizer)} tokens, the model only {config.vocab_size}"
            )
        logger.info(
            "T5 loaded from %s: %d layers, d_model %d, %s on %s",
            ckpt,
            config.num_layers,
            config.d_model,
            dtype,
            device,
        )
        return cls(model, tokenizer, text_len)

    def to(self, device: str | torch.device) -> T5Encoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        """texts: N prompts -> N tensors ``[L_i, d_model]`` (model dtype, model device), each cut to the
        prompt's real token count (EOS included), as Wan's ``T5EncoderModel.__call__`` returns them."""
        if isinstance(texts, str) or not isinstance(texts, list | tuple) or not texts:
            raise EncoderError("texts", "expected a non-empty list of strings")
        if not all(isinstance(t, str) for t in texts):
            raise EncoderError("texts", "every prompt must be a string")
        batch = self.tokenizer(
            [clean_prompt(t) for t in texts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths, strict=True)]


# ----------------------------------------------------------------------------------------------------
# CLIP vision tower (open-clip xlm-roberta-large ViT-H/14)
# ----------------------------------------------------------------------------------------------------


def _clip_layer_table(i: int) -> dict[str, str]:
    """Wan CLIP visual block ``i`` -> CLIPVisionModel layer ``i`` (fused qkv handled apart)."""
    src, dst = f"visual.transformer.{i}.", f"encoder.layers.{i}."
    table = {}
    for p in ("weight", "bias"):
        table[src + f"norm1.{p}"] = dst + f"layer_norm1.{p}"
        table[src + f"attn.proj.{p}"] = dst + f"self_attn.out_proj.{p}"
        table[src + f"norm2.{p}"] = dst + f"layer_norm2.{p}"
        table[src + f"mlp.0.{p}"] = dst + f"mlp.fc1.{p}"
        table[src + f"mlp.2.{p}"] = dst + f"mlp.fc2.{p}"
    return table


_CLIP_TOP_TABLE = {
    "visual.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "visual.pre_norm.weight": "pre_layrnorm.weight",
    "visual.pre_norm.bias": "pre_layrnorm.bias",
    "visual.post_norm.weight": "post_layernorm.weight",
    "visual.post_norm.bias": "post_layernorm.bias",
}


def clip_config_from_wan(
    sd: Mapping[str, torch.Tensor], num_heads: int = CLIP_NUM_HEADS, field: str = "clip_checkpoint"
) -> Any:
    """CLIPVisionConfig for the visual tower of a Wan CLIP state dict, with one layer fewer than stored:
    Wan reads the penultimate block (``use_31_block=True``), so the last block is never run."""
    from transformers import CLIPVisionConfig

    patch = _require(sd, "visual.patch_embedding.weight", field)
    if "visual.patch_embedding.bias" in sd:
        raise EncoderError(field, "patch embedding with bias (a CLIP without pre-norm) is not supported")
    _require(sd, "visual.pre_norm.weight", field)
    dim, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    num_pos = int(_require(sd, "visual.pos_embedding", field).shape[1])
    grid = math.isqrt(num_pos - 1)
    if grid * grid != num_pos - 1:
        raise EncoderError(field, f"{num_pos} position embeddings is not 1 + a square grid")
    stored = _block_count(sd, "visual.transformer.")
    if stored < 2:
        raise EncoderError(field, f"{stored} visual blocks: need at least 2 (the last one is dropped)")
    if dim % num_heads:
        raise EncoderError(field, f"width {dim} is not divisible by {num_heads} heads")
    return CLIPVisionConfig(
        hidden_size=dim,
        intermediate_size=int(_require(sd, "visual.transformer.0.mlp.0.weight", field).shape[0]),
        num_hidden_layers=stored - 1,
        num_attention_heads=num_heads,
        num_channels=3,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",  # Wan's ViT-H uses exact nn.GELU
        layer_norm_eps=CLIP_EPS,
        attention_dropout=0.0,
    )


def clip_wan_to_hf(sd: Mapping[str, torch.Tensor], field: str = "clip_checkpoint") -> StateDict:
    """Visual part of a Wan CLIP state dict -> ``CLIPVisionModel`` state dict for all blocks but the last.

    Skipped on purpose: the text tower (``textual.*``), ``log_scale``, the projection ``visual.head`` and
    the last visual block (never run with ``use_31_block``)."""
    used = _block_count(sd, "visual.transformer.") - 1
    table = dict(_CLIP_TOP_TABLE)
    for i in range(used):
        table.update(_clip_layer_table(i))
    out = _rename(sd, table, field)
    cls = _require(sd, "visual.cls_embedding", field)  # [1, 1, D]
    pos = _require(sd, "visual.pos_embedding", field)  # [1, N, D]
    out["embeddings.class_embedding"] = cls.reshape(cls.shape[-1])
    out["embeddings.position_embedding.weight"] = pos.reshape(pos.shape[-2], pos.shape[-1])
    for i in range(used):
        # Wan splits the fused projection as view(b, s, 3, heads, head_dim): rows are [q; k; v].
        src, dst = f"visual.transformer.{i}.attn.to_qkv.", f"encoder.layers.{i}.self_attn."
        for p in ("weight", "bias"):
            q, k, v = _require(sd, src + p, field).chunk(3, dim=0)
            out[dst + f"q_proj.{p}"], out[dst + f"k_proj.{p}"], out[dst + f"v_proj.{p}"] = q, k, v
    return out


def clip_hf_to_wan(hf_sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Inverse of ``clip_wan_to_hf`` for every layer present in ``hf_sd`` (a full tower: the Wan file
    stores all blocks, the loader then drops the last)."""
    num_layers = _block_count(hf_sd, "encoder.layers.")
    table = dict(_CLIP_TOP_TABLE)
    for i in range(num_layers):
        table.update(_clip_layer_table(i))
    inverse = {dst: src for src, dst in table.items()}
    out = {inverse[k]: v for k, v in hf_sd.items() if k in inverse}
    cls = hf_sd["embeddings.class_embedding"]
    pos = hf_sd["embeddings.position_embedding.weight"]
    out["visual.cls_embedding"] = cls.reshape(1, 1, -1)
    out["visual.pos_embedding"] = pos.reshape(1, *pos.shape)
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.self_attn.", f"visual.transformer.{i}.attn.to_qkv."
        for p in ("weight", "bias"):
            out[dst + p] = torch.cat([hf_sd[src + f"{n}_proj.{p}"] for n in ("q", "k", "v")], dim=0)
    return out


class ClipImageEncoder(_ModelHolder):
    """CLIP ViT-H/14 image features as Wan's ``CLIPModel.visual(..., use_31_block=True)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.image_size = int(model.config.image_size)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // int(self.model.config.patch_size)) ** 2 + 1

    @classmethod
    def from_wan(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float16,
        num_heads: int = CLIP_NUM_HEADS,
    ) -> ClipImageEncoder:
        """Load from a Wan folder or from ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``.
        Upstream runs CLIP in fp16 (``clip_dtype``)."""
        from transformers import CLIPVisionModel

        ckpt = _checkpoint_file(path, CLIP_CHECKPOINT)
        sd = load_wan_state_dict(ckpt, "clip_checkpoint")
        config = clip_config_from_wan(sd, num_heads)
        model = _build_loaded(
            lambda: CLIPVisionModel(config), clip_wan_to_hf(sd), "clip_checkpoint", device, dtype
        )
        logger.info(
            "CLIP visual loaded from %s: %d of %d blocks, width %d, %s on %s",
            ckpt,
            config.num_hidden_layers,
            config.num_hidden_layers + 1,
            config.hidden_size,
            dtype,
            device,
        )
        return cls(model)

    def to(self, device: str | torch.device) -> ClipImageEncoder:
        self.model.to(device)
        return self

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """image: [3, H, W] in [-1, 1] -> pixel values [1, 3, S, S] (float32, CLIP-normalised), as
        upstream: bicubic resize (no antialias, no clamp) to S x S, map to [0, 1], CLIP mean/std."""
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise EncoderError("image", f"expected a tensor [3, H, W] in [-1, 1], got {shape}")
        if not image.is_floating_point():
            raise EncoderError("image", f"expected a floating-point tensor in [-1, 1], got {image.dtype}")
        x = image.to(self.device, torch.float32)[None]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = x.mul(0.5).add(0.5)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image: [3, H, W] in [-1, 1] -> [1, 257, dim] hidden states after the penultimate block (no
        post-norm), in the model dtype."""
        pixels = self.preprocess(image).to(self.dtype)
        with _autocast(self.device, self.dtype):
            out = self.model(pixel_values=pixels).last_hidden_state
        return out.to(self.dtype)


# ----------------------------------------------------------------------------------------------------
# VAE (Wan2.1 causal 3-D VAE)
# ----------------------------------------------------------------------------------------------------

_RESIDUAL_RENAME = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_ATTENTION_PARAMS = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
_RESAMPLE_PARAMS = ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")


def _vae_encoder_kinds(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Kind of each ``encoder.downsamples.i``: 'res', 'down2d', 'down3d' or 'attn'."""
    kinds = []
    for i in range(_block_count(sd, "encoder.downsamples.")):
        rest = {k.split(".", 3)[3] for k in sd if k.startswith(f"encoder.downsamples.{i}.")}
        if "to_qkv.weight" in rest:
            kinds.append("attn")
        elif "time_conv.weight" in rest:
            kinds.append("down3d")
        elif "resample.1.weight" in rest:
            kinds.append("down2d")
        else:
            kinds.append("res")
    return kinds


def vae_config_from_wan(sd: Mapping[str, torch.Tensor], field: str = "vae_checkpoint") -> dict[str, Any]:
    """``AutoencoderKLWan`` keyword arguments read from a Wan2.1 VAE state dict: base width, per-level
    widths, residual blocks per level and which levels downsample in time."""
    base_dim = int(_require(sd, "encoder.conv1.weight", field).shape[0])
    z_dim = int(_require(sd, "conv2.weight", field).shape[0])
    if z_dim != VAE_Z_DIM:
        raise EncoderError(field, f"z_dim {z_dim}: only the 16-channel Wan2.1 VAE is supported")
    kinds = _vae_encoder_kinds(sd)
    if "attn" in kinds:
        raise EncoderError(field, "attention inside the down blocks (attn_scales) is not supported")
    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    for i, kind in enumerate(kinds):
        if kind == "res":
            levels[-1].append(i)
        else:
            temporal.append(kind == "down3d")
            levels.append([])
    num_res_blocks = len(levels[0])
    if num_res_blocks == 0 or any(len(level) != num_res_blocks for level in levels):
        raise EncoderError(field, f"uneven residual blocks per level: {[len(lv) for lv in levels]}")
    if len(levels) != 4 or sum(temporal) != 2:
        raise EncoderError(
            field, f"{len(levels)} levels / {sum(temporal)} temporal downsamples: Wan2.1 has 4 and 2"
        )
    widths = [int(sd[f"encoder.downsamples.{lv[-1]}.residual.6.weight"].shape[0]) for lv in levels]
    if any(w % base_dim for w in widths):
        raise EncoderError(field, f"level widths {widths} are not multiples of the base width {base_dim}")
    return {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": [w // base_dim for w in widths],
        "num_res_blocks": num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": temporal,
        "latents_mean": list(VAE_LATENT_MEAN),
        "latents_std": list(VAE_LATENT_STD),
    }


def _vae_key_table(config: Mapping[str, Any]) -> dict[str, str]:
    """Wan2.1 VAE key -> diffusers ``AutoencoderKLWan`` key, for the architecture in ``config``.

    Wan keeps the encoder's and decoder's blocks in flat ``Sequential``s; diffusers keeps the encoder flat
    (``down_blocks.i`` == ``downsamples.i``) but groups the decoder into ``up_blocks[level]`` with
    ``num_res_blocks + 1`` resnets and one upsampler (all but the last level)."""
    nrb = int(config["num_res_blocks"])
    levels = len(config["dim_mult"])
    dims = [config["base_dim"] * m for m in [1, *config["dim_mult"]]]
    table: dict[str, str] = {
        "conv1.weight": "quant_conv.weight",
        "conv1.bias": "quant_conv.bias",
        "conv2.weight": "post_quant_conv.weight",
        "conv2.bias": "post_quant_conv.bias",
    }

    def residual(src: str, dst: str, shortcut: bool) -> None:
        for a, b in _RESIDUAL_RENAME.items():
            if shortcut or not a.startswith("shortcut"):
                table[src + a] = dst + b

    for part in ("encoder", "decoder"):
        for p in ("weight", "bias"):
            table[f"{part}.conv1.{p}"] = f"{part}.conv_in.{p}"
            table[f"{part}.head.2.{p}"] = f"{part}.conv_out.{p}"
        table[f"{part}.head.0.gamma"] = f"{part}.norm_out.gamma"
        residual(f"{part}.middle.0.", f"{part}.mid_block.resnets.0.", False)
        for p in _ATTENTION_PARAMS:
            table[f"{part}.middle.1.{p}"] = f"{part}.mid_block.attentions.0.{p}"
        residual(f"{part}.middle.2.", f"{part}.mid_block.resnets.1.", False)

    # Encoder: per level, nrb residual blocks (the first may change width) then a downsample.
    idx = 0
    for level in range(levels):
        for r in range(nrb):
            name = f"encoder.downsamples.{idx}."
            residual(name, f"encoder.down_blocks.{idx}.", r == 0 and dims[level] != dims[level + 1])
            idx += 1
        if level != levels - 1:
            temporal = config["temperal_downsample"][level]
            for p in _RESAMPLE_PARAMS if temporal else _RESAMPLE_PARAMS[:2]:
                table[f"encoder.downsamples.{idx}.{p}"] = f"encoder.down_blocks.{idx}.{p}"
            idx += 1

    # Decoder: widths run backwards; after each (2x channel-halving) upsample the next level's first
    # resnet takes half the width, exactly as Wan's Decoder3d (and diffusers) build it.
    ddims = [config["base_dim"] * m for m in [config["dim_mult"][-1], *config["dim_mult"][::-1]]]
    temporal_up = list(config["temperal_downsample"])[::-1]
    idx = 0
    for level in range(levels):
        in_dim = ddims[level] // 2 if level > 0 else ddims[level]
        for r in range(nrb + 1):
            name = f"decoder.upsamples.{idx}."
            residual(name, f"decoder.up_blocks.{level}.resnets.{r}.", r == 0 and in_dim != ddims[level + 1])
            idx += 1
        if level != levels - 1:
            params = _RESAMPLE_PARAMS if temporal_up[level] else _RESAMPLE_PARAMS[:2]
            for p in params:
                table[f"decoder.upsamples.{idx}.{p}"] = f"decoder.up_blocks.{level}.upsamplers.0.{p}"
            idx += 1
    return table


def vae_wan_to_diffusers(
    sd: Mapping[str, torch.Tensor], field: str = "vae_checkpoint"
) -> tuple[StateDict, dict[str, Any]]:
    """Wan2.1 VAE state dict -> (diffusers ``AutoencoderKLWan`` state dict, its constructor kwargs)."""
    config = vae_config_from_wan(sd, field)
    table = _vae_key_table(config)
    extra = [k for k in sd if k not in table]
    if extra:
        raise EncoderError(field, f"unknown keys in the VAE checkpoint, e.g. {extra[:3]}")
    return _rename(sd, table, field), config


def vae_diffusers_to_wan(d_sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """Inverse of ``vae_wan_to_diffusers`` for a model built with ``config``."""
    inverse = {dst: src for src, dst in _vae_key_table(config).items()}
    missing = [k for k in d_sd if k not in inverse]
    if missing:
        raise KeyError(f"diffusers keys without a Wan name: {missing[:3]}")
    return {inverse[k]: v for k, v in d_sd.items()}


def conditioning_mask(num_frames: int, num_cond_frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """The 4-channel mask of the I2V conditioning, built as upstream ``MultiTalkPipeline.generate``:
    a per-frame mask (1 on the first ``num_cond_frames`` pixel frames), frame 0 repeated 4 times so the
    count becomes a multiple of 4, then folded as ``[T_lat, 4]`` and transposed -> ``[4, T_lat, h, w]``.
    With 1 conditioning frame only latent frame 0 is 1; with 25 motion frames latent frames 0..6 are."""
    _check_num_frames(num_frames)
    if not 1 <= num_cond_frames <= num_frames:
        raise EncoderError("motion_frames", f"{num_cond_frames} frames: need 1..{num_frames}")
    per_frame = torch.zeros(num_frames, lat_h, lat_w)
    per_frame[:num_cond_frames] = 1.0
    per_frame = torch.cat([per_frame[:1].repeat(4, 1, 1), per_frame[1:]], dim=0)
    return per_frame.view(-1, 4, lat_h, lat_w).transpose(0, 1).contiguous()


def _check_num_frames(num_frames: int) -> None:
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % VAE_STRIDE[0]:
        raise EncoderError("num_frames", f"{num_frames!r}: must be 4n + 1 (1, 5, ..., 81)")


class WanVae(_ModelHolder):
    """Wan2.1 VAE (diffusers ``AutoencoderKLWan``) with Wan's latent normalisation.

    Encode takes the posterior mean (as Wan), decode clamps to [-1, 1]; both work on one video without a
    batch axis and return float32, like ``wan.modules.vae.WanVAE``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        device = self.device
        self._mean = torch.tensor(VAE_LATENT_MEAN, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        std = torch.tensor(VAE_LATENT_STD, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        self._inv_std = 1.0 / std  # upstream multiplies by 1/std on encode and divides by it on decode

    @classmethod
    def from_wan(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> WanVae:
        """Load from a Wan folder or from ``Wan2.1_VAE.pth``. Upstream runs the VAE in float32."""
        from diffusers import AutoencoderKLWan

        ckpt = _checkpoint_file(path, VAE_CHECKPOINT)
        sd = load_wan_state_dict(ckpt, "vae_checkpoint")
        d_sd, config = vae_wan_to_diffusers(sd)
        model = _build_loaded(lambda: AutoencoderKLWan(**config), d_sd, "vae_checkpoint", device, dtype)
        logger.info("VAE loaded from %s: base width %d, %s on %s", ckpt, config["base_dim"], dtype, device)
        return cls(model)

    def to(self, device: str | torch.device) -> WanVae:
        self.model.to(device)
        self._mean = self._mean.to(device)
        self._inv_std = self._inv_std.to(device)
        return self

    @staticmethod
    def latent_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[16, T_lat, h, w] for a video of ``num_frames`` (4n + 1) frames of ``height`` x ``width``."""
        _check_num_frames(num_frames)
        return (VAE_Z_DIM, (num_frames - 1) // 4 + 1, height // 8, width // 8)

    def _check_video(self, video: torch.Tensor, field: str) -> None:
        if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[0] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise EncoderError(field, f"expected a tensor [3, T, H, W] in [-1, 1], got {shape}")
        if not video.is_floating_point():
            raise EncoderError(field, f"expected floating point values in [-1, 1], got {video.dtype}")
        _, t, h, w = video.shape
        if (t - 1) % 4:
            raise EncoderError(field, f"{t} frames: the VAE needs 4n + 1 frames")
        if h % 8 or w % 8 or h == 0 or w == 0:
            raise EncoderError(field, f"size {h}x{w}: height and width must be positive multiples of 8")

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video: [3, T, H, W] in [-1, 1], T = 4n + 1 -> normalised latent [16, T_lat, H/8, W/8] (float32)."""
        self._check_video(video, "video")
        x = video.to(self.device, self.dtype)[None]
        mu = self.model.encode(x).latent_dist.mode()[0].float()
        return (mu - self._mean) * self._inv_std

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent: normalised [16, T_lat, h, w] -> video [3, 4 (T_lat - 1) + 1, 8h, 8w] in [-1, 1] (float32)."""
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4 or latent.shape[0] != VAE_Z_DIM:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise EncoderError("latent", f"expected a tensor [16, T_lat, h, w], got {shape}")
        z = latent.to(self.device, torch.float32) / self._inv_std + self._mean
        out = self.model.decode(z[None].to(self.dtype)).sample[0]
        return out.float().clamp_(-1.0, 1.0)

    @torch.no_grad()
    def build_y(
        self, ref_image: torch.Tensor | None, num_frames: int, motion_frames: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The I2V conditioning ``y = [mask ; VAE(cond ; zeros)]``: [20, T_lat, H/8, W/8] (float32).

        ref_image: [3, H, W] in [-1, 1], the conditioning frame of the first clip.
        motion_frames: [3, M, H, W] in [-1, 1], the last M decoded frames of the previous clip (streaming).
            When given, the clip is conditioned on them alone, as upstream (``cond_image`` becomes the
            motion frames; the reference image is then not part of ``y`` and may be None).
        The VAE latents of the conditioning frames are ``y[4:, :1 + (M - 1) // 4]`` (upstream's
        ``latent_motion_frames``)."""
        _check_num_frames(num_frames)
        if motion_frames is not None:
            if not isinstance(motion_frames, torch.Tensor) or motion_frames.ndim != 4:
                raise EncoderError("motion_frames", "expected a tensor [3, M, H, W] in [-1, 1]")
            cond = motion_frames
            field = "motion_frames"
        else:
            if not isinstance(ref_image, torch.Tensor) or ref_image.ndim != 3:
                raise EncoderError("ref_image", "expected a tensor [3, H, W] in [-1, 1]")
            cond = ref_image[:, None]
            field = "ref_image"
        c, m, h, w = cond.shape
        if c != 3 or not cond.is_floating_point():
            raise EncoderError(
                field, f"expected 3 floating-point channels, got {tuple(cond.shape)} {cond.dtype}"
            )
        if not 1 <= m <= num_frames:
            raise EncoderError(field, f"{m} conditioning frames for a {num_frames}-frame clip")
        cond = cond.to(self.device, torch.float32)
        video = torch.cat([cond, cond.new_zeros(3, num_frames - m, h, w)], dim=1)
        self._check_video(video, field)
        latent = self.encode(video)
        mask = conditioning_mask(num_frames, m, h // 8, w // 8).to(latent.device)
        return torch.cat([mask, latent], dim=0)
