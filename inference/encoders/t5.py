"""T5 text encoder: transformers UMT5EncoderModel from Wan's umT5-XXL checkpoint (key tables both ways)."""

from __future__ import annotations

import html
import logging
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from inference.encoders.common import (
    T5_CHECKPOINT,
    T5_EPS,
    T5_MAX_DISTANCE,
    T5_TOKENIZER_DIR,
    TEXT_LEN,
    EncoderError,
    StateDict,
    _block_count,
    _build_loaded,
    _checkpoint_file,
    _ModelHolder,
    _rename,
    _require,
    load_wan_state_dict,
)

logger = logging.getLogger(__name__)


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
    # The same tensor under both keys: ``_build_loaded`` ties them into one Parameter before any move.
    out["shared.weight"] = emb
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


def t5_tokenizer_dir(checkpoint: Path, tokenizer_dir: str | Path | None = None) -> Path:
    """The umT5 tokenizer folder: ``tokenizer_dir``, or ``google/umt5-xxl/`` beside the checkpoint."""
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else checkpoint.parent / T5_TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise EncoderError("t5_tokenizer", f"tokenizer folder not found: {tok_dir}")
    return tok_dir


def load_t5_tokenizer(tok_dir: Path, vocab_size: int) -> Any:
    """The umT5 tokenizer in ``tok_dir`` (local files only), checked against the model's vocabulary."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EncoderError("t5_tokenizer", f"cannot load the tokenizer in {tok_dir}: {exc}") from exc
    if len(tokenizer) > vocab_size:
        raise EncoderError(
            "t5_tokenizer", f"tokenizer has {len(tokenizer)} tokens, the model only {vocab_size}"
        )
    return tokenizer


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
        from transformers import UMT5EncoderModel

        ckpt = _checkpoint_file(path, T5_CHECKPOINT)
        tok_dir = t5_tokenizer_dir(ckpt, tokenizer_dir)
        sd = load_wan_state_dict(ckpt, "t5_checkpoint")
        config = t5_config_from_wan(sd)
        model = _build_loaded(
            lambda: UMT5EncoderModel(config), t5_wan_to_hf(sd), "t5_checkpoint", device, dtype
        )
        tokenizer = load_t5_tokenizer(tok_dir, config.vocab_size)
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
