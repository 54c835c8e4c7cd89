"""Tiny encoder writers: official file layout, seeded determinism, and the sizes other parts rely on."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from inference.encoders import (
    CLIP_CHECKPOINT,
    T5_CHECKPOINT,
    T5_TOKENIZER_DIR,
    VAE_CHECKPOINT,
    ClipImageEncoder,
    T5Encoder,
    WanVae,
)
from inference.encoders import tiny as te
from inference.encoders.wav2vec2 import AudioEncoder

torch.set_num_threads(1)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_writers_produce_the_official_layout_and_loadable_sizes(tmp_path):
    te.write_tiny_t5(tmp_path, seed=0)
    te.write_tiny_clip(tmp_path, seed=0)
    te.write_tiny_vae(tmp_path, seed=0)
    te.write_tiny_wav2vec2(tmp_path, seed=0)
    for name in (T5_CHECKPOINT, CLIP_CHECKPOINT, VAE_CHECKPOINT):
        assert (tmp_path / name).is_file()
    assert (tmp_path / T5_TOKENIZER_DIR / "tokenizer.json").is_file()
    w2v = tmp_path / te.WAV2VEC2_DIR
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (w2v / name).is_file()
    config = json.loads((w2v / "config.json").read_text())
    assert config["architectures"] == ["Wav2Vec2ForPreTraining"] and config["feat_extract_norm"] == "group"
    assert all(
        k.startswith(("wav2vec2.", "quantizer.", "project_")) for k in load_file(w2v / "model.safetensors")
    )
    assert json.loads((w2v / "preprocessor_config.json").read_text())["do_normalize"] is True

    t5 = T5Encoder.from_wan(tmp_path, dtype=torch.float32)
    assert t5.dim == te.TINY_T5_DIM and len(t5.tokenizer) == te.TINY_T5_VOCAB
    ids = t5.tokenizer(["two people talking"]).input_ids[0]
    assert ids[-1] == 1 and 2 not in ids  # whole words known, </s> appended
    assert t5.tokenizer(["日本"]).input_ids[0][-2] == 2  # unknown characters -> <unk>
    clip = ClipImageEncoder.from_wan(tmp_path, dtype=torch.float32)
    assert clip.dim == te.TINY_CLIP_DIM and clip.num_tokens == te.TINY_CLIP_TOKENS
    vae = WanVae.from_wan(tmp_path)
    assert vae.model.config.z_dim == 16 and vae.model.config.base_dim == te.TINY_VAE_BASE_DIM
    audio = AudioEncoder(w2v)
    assert (audio.num_layers, audio.hidden_size) == (te.TINY_WAV2VEC2_LAYERS, te.TINY_WAV2VEC2_DIM)


def test_writers_are_seeded(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder, seed in ((a, 7), (b, 7), (c, 8)):
        te.write_tiny_t5(folder, seed)
        te.write_tiny_clip(folder, seed)
        te.write_tiny_vae(folder, seed)
    for name in (T5_CHECKPOINT, CLIP_CHECKPOINT, VAE_CHECKPOINT):
        sa, sb, sc = (torch.load(f / name, weights_only=True) for f in (a, b, c))
        assert _same(sa, sb) and not _same(sa, sc)
