"""Tiny random encoders written in the official file layout, for tests and ``--preset tiny``.

Each writer builds a small library model from a seed and saves it exactly where and how the real
weights live, using the inverse key mappings of ``inference.encoders``, so the real loaders read it:

=================  ==========================================================  =====================
writer             files (relative to ``folder``)                              tiny size
=================  ==========================================================  =====================
write_tiny_t5      models_t5_umt5-xxl-enc-bf16.pth (bf16, Wan T5 names),       d_model 32, 2 layers,
                   google/umt5-xxl/ (tokenizer.json + tokenizer_config.json)   4 heads x 8, d_ff 64
write_tiny_clip    models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth     width 64, 3 blocks
                   (fp32; visual.* with Wan names, plus a few textual.* keys   stored (2 run), 16
                   and log_scale that the loader must skip)                    heads, mlp 128, 224 px
                                                                               patch 14 -> 257 tokens
write_tiny_vae     Wan2.1_VAE.pth (fp32, Wan names)                            base width 4, 1 res
                                                                               block/level, z 16,
                                                                               stride (4, 8, 8)
write_tiny_wav2vec2  chinese-wav2vec2-base/{config.json, model.safetensors,    hidden 32, 2 layers,
                   preprocessor_config.json} (Wav2Vec2ForPreTraining keys,     CNN 7 x 32 channels
                   as the real repo)                                           with the real strides
=================  ==========================================================  =====================

The umT5 tokenizer cannot be downloaded here, so ``write_tiny_t5`` builds a small sentencepiece-style
Unigram tokenizer in code (``tokenizers``: NFKC, metaspace "▁", ``</s>`` appended, ids pad 0 / eos 1 /
unk 2 like umT5; ASCII letters, digits, punctuation and a few whole words) and saves it with
``save_pretrained`` as a ``T5Tokenizer`` into ``google/umt5-xxl/``. Characters outside it map to
``<unk>``. The T5 vocabulary equals the tokenizer size (``TINY_T5_VOCAB``).

Every writer returns the reference library model (float32, eval) whose outputs the loader must
reproduce exactly; its weights are already rounded to the stored precision.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path

import torch

from inference.encoders import (
    CLIP_CHECKPOINT,
    CLIP_EPS,
    CLIP_NUM_HEADS,
    T5_CHECKPOINT,
    T5_EPS,
    T5_MAX_DISTANCE,
    T5_NUM_BUCKETS,
    T5_TOKENIZER_DIR,
    VAE_CHECKPOINT,
    VAE_LATENT_MEAN,
    VAE_LATENT_STD,
    clip_hf_to_wan,
    t5_hf_to_wan,
    vae_diffusers_to_wan,
)

logger = logging.getLogger(__name__)

WAV2VEC2_DIR = "chinese-wav2vec2-base"

TINY_T5_DIM = 32
TINY_T5_LAYERS = 2
TINY_T5_HEADS = 4
TINY_T5_FF = 64

TINY_CLIP_DIM = 64
TINY_CLIP_STORED_BLOCKS = 3  # the loader runs all but the last (use_31_block)
TINY_CLIP_MLP = 128
TINY_CLIP_TOKENS = 257  # 224 / 14 = 16 -> 16 * 16 + 1, as the real ViT-H/14

TINY_VAE_BASE_DIM = 4
TINY_VAE_RES_BLOCKS = 1

TINY_WAV2VEC2_DIM = 32
TINY_WAV2VEC2_LAYERS = 2

_WORDS = ("a", "the", "and", "two", "people", "person", "man", "woman", "talking", "video", "in", "of")
_SPECIALS = ("<pad>", "</s>", "<unk>")


def _tiny_tokenizer_vocab() -> list[tuple[str, float]]:
    """Unigram pieces with log-probabilities: whole words first (preferred), then single characters."""
    pieces = ["▁" + w for w in _WORDS] + ["▁"]
    pieces += list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
    vocab = [(s, 0.0) for s in _SPECIALS]
    vocab += [
        (p, -1.0 - 0.01 * i) if p.startswith("▁") and len(p) > 1 else (p, -5.0) for i, p in enumerate(pieces)
    ]
    return vocab


TINY_T5_VOCAB = len(_tiny_tokenizer_vocab())


def write_tiny_tokenizer(folder: str | Path) -> Path:
    """Save the tiny umT5-style tokenizer into ``folder/google/umt5-xxl/``; returns that folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram(_tiny_tokenizer_vocab(), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    wrapped = T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )
    out = Path(folder) / T5_TOKENIZER_DIR
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return out


def _round_to(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Round every float tensor to ``dtype`` and back, so the fp32 reference equals what is stored."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype).float())
    return model


def write_tiny_t5(folder: str | Path, seed: int = 0) -> torch.nn.Module:
    """Tiny random umT5 encoder as ``folder/models_t5_umt5-xxl-enc-bf16.pth`` (bf16) + tokenizer.
    Returns the float32 ``UMT5EncoderModel`` reference."""
    from transformers import UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(folder)
    config = UMT5Config(
        vocab_size=TINY_T5_VOCAB,
        d_model=TINY_T5_DIM,
        d_kv=TINY_T5_DIM // TINY_T5_HEADS,
        d_ff=TINY_T5_FF,
        num_layers=TINY_T5_LAYERS,
        num_heads=TINY_T5_HEADS,
        relative_attention_num_buckets=T5_NUM_BUCKETS,
        relative_attention_max_distance=T5_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=T5_EPS,
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = UMT5EncoderModel(config).eval()
    with torch.no_grad():
        # Random norms and position biases so a swapped key would change the output.
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("relative_attention_bias.weight"):
                p.normal_(0.0, 1.0)
    _round_to(model, torch.bfloat16)
    wan_sd = {k: v.to(torch.bfloat16).contiguous() for k, v in t5_hf_to_wan(model.state_dict()).items()}
    torch.save(wan_sd, folder / T5_CHECKPOINT)
    return model


def write_tiny_clip(folder: str | Path, seed: int = 0) -> torch.nn.Module:
    """Tiny random CLIP vision tower as ``folder/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``
    (fp32). Returns the float32 ``CLIPVisionModel`` reference with all stored blocks; the loader must
    equal its ``hidden_states[-2]`` (the penultimate block's output)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = CLIPVisionConfig(
        hidden_size=TINY_CLIP_DIM,
        intermediate_size=TINY_CLIP_MLP,
        num_hidden_layers=TINY_CLIP_STORED_BLOCKS,
        num_attention_heads=CLIP_NUM_HEADS,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=CLIP_EPS,
    )
    torch.manual_seed(seed)
    model = CLIPVisionModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    wan_sd = {k: v.contiguous() for k, v in clip_hf_to_wan(model.state_dict()).items()}
    g = torch.Generator().manual_seed(seed + 1)
    # Parts of the real file the loader must skip: projection head, text tower, logit scale.
    wan_sd["visual.head"] = torch.randn(TINY_CLIP_DIM, 16, generator=g)
    wan_sd["textual.token_embedding.weight"] = torch.randn(10, 16, generator=g)
    wan_sd["textual.head.0.weight"] = torch.randn(12, 16, generator=g)
    wan_sd["log_scale"] = torch.tensor(4.6052)
    torch.save(wan_sd, folder / CLIP_CHECKPOINT)
    return model


def tiny_vae_config() -> dict:
    """``AutoencoderKLWan`` kwargs of the tiny VAE: Wan2.1's layout (4 levels, time downsampling in
    the last two, z 16) with base width 4 and one residual block per level."""
    return {
        "base_dim": TINY_VAE_BASE_DIM,
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": TINY_VAE_RES_BLOCKS,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "latents_mean": list(VAE_LATENT_MEAN),
        "latents_std": list(VAE_LATENT_STD),
    }


def write_tiny_vae(folder: str | Path, seed: int = 0) -> torch.nn.Module:
    """Tiny random Wan2.1 VAE as ``folder/Wan2.1_VAE.pth`` (fp32). Returns the ``AutoencoderKLWan``."""
    from diffusers import AutoencoderKLWan

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_vae_config()
    torch.manual_seed(seed)
    model = AutoencoderKLWan(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or name.endswith("proj.weight"):
                # diffusers zero-inits the attention output projection; make it count.
                p.normal_(0.0, 0.05)
    wan_sd = {k: v.contiguous() for k, v in vae_diffusers_to_wan(model.state_dict(), config).items()}
    torch.save(wan_sd, folder / VAE_CHECKPOINT)
    return model


def tiny_wav2vec2_config(**overrides) -> object:
    """Wav2Vec2Config shaped like chinese-wav2vec2-base (group-norm CNN with the real kernels and strides,
    post-LN encoder, no conv bias) but 32 wide and 2 layers deep."""
    from transformers import Wav2Vec2Config

    kwargs = dict(
        hidden_size=TINY_WAV2VEC2_DIM,
        num_hidden_layers=TINY_WAV2VEC2_LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_bias=False,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        num_codevectors_per_group=8,
        num_codevector_groups=2,
        codevector_dim=16,
        proj_codevector_dim=16,
        architectures=["Wav2Vec2ForPreTraining"],
    )
    kwargs.update(overrides)
    return Wav2Vec2Config(**kwargs)


def write_tiny_wav2vec2(folder: str | Path, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """Tiny random wav2vec2 as ``folder/chinese-wav2vec2-base/`` (config.json, model.safetensors with
    ``Wav2Vec2ForPreTraining`` keys, preprocessor_config.json). Returns the ``Wav2Vec2Model`` reference.
    ``config_overrides`` change the tiny config (tests use other CNN strides)."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

    out = Path(folder) / WAV2VEC2_DIR
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Wav2Vec2ForPreTraining(tiny_wav2vec2_config(**config_overrides)).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=False,
    ).save_pretrained(str(out))
    return model.wav2vec2
