"""Official-layout checkpoint writer/loader: round trip, strict key and shape errors, config.json."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inference.checkpoint.loader import (
    INDEX_NAME,
    MULTITALK_FILE_NAME,
    CheckpointError,
    is_audio_key,
    iter_checkpoint_tensors,
    load_model,
    open_checkpoint,
    save_checkpoint,
)
from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT


def tiny_inputs() -> dict[str, torch.Tensor]:
    cfg = DiTConfig.tiny()
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, 4, 4)
    masks[0, :, :2], masks[1, :, 2:] = 1, 1
    return dict(
        x=torch.randn(1, 16, 2, 4, 4, generator=g),
        t=torch.tensor([500.0]),
        context=torch.randn(1, 3, cfg.text_dim, generator=g),
        clip_fea=torch.randn(1, 2, cfg.clip_dim, generator=g),
        y=torch.randn(1, 20, 2, 4, 4, generator=g),
        audio=torch.randn(1, 2, 5, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g),
        ref_target_masks=masks,
    )


@pytest.fixture(scope="module")
def tiny() -> MultiTalkDiT:
    # requires_grad off, as load_model returns it: autograd-enabled params pick other CPU kernels (1-ulp noise).
    return MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=7).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_ckpt")
    save_checkpoint(tiny, folder, num_shards=3)
    return folder


def test_layout_matches_official(saved, tiny):
    names = sorted(p.name for p in saved.iterdir())
    assert names == [
        "config.json",
        "diffusion_pytorch_model-00001-of-00003.safetensors",
        "diffusion_pytorch_model-00002-of-00003.safetensors",
        "diffusion_pytorch_model-00003-of-00003.safetensors",
        INDEX_NAME,
        MULTITALK_FILE_NAME,
    ]
    index = json.loads((saved / INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == set(tiny.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tiny.state_dict().values())
    for key, name in weight_map.items():
        assert (name == MULTITALK_FILE_NAME) == is_audio_key(key), key
    with safe_open(str(saved / MULTITALK_FILE_NAME), framework="pt") as f:
        audio_keys = set(f.keys())
    assert "audio_proj.proj1_vf.weight" in audio_keys and "blocks.1.norm_x.weight" in audio_keys
    assert "blocks.0.audio_cross_attn.kv_linear.bias" in audio_keys
    assert not any(k.startswith("blocks.0.self_attn") for k in audio_keys)
    assert DiTConfig.from_json(saved / "config.json") == DiTConfig.tiny()


def test_round_trip_is_exact(saved, tiny):
    loaded = load_model(saved, device="cpu")
    assert loaded.config == tiny.config
    ref = tiny.state_dict()
    got = loaded.state_dict()
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training
    inp = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inp), tiny(**inp))


def test_load_casts_to_requested_dtype(saved, tiny):
    loaded = load_model(saved, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    w = tiny.state_dict()["blocks.0.ffn.0.weight"]
    assert torch.equal(loaded.state_dict()["blocks.0.ffn.0.weight"], w.to(torch.bfloat16))


def test_open_checkpoint_and_lazy_slices(saved, tiny):
    refs = open_checkpoint(saved)
    ref = refs["audio_proj.proj3.weight"]
    assert ref.shape == (4 * 16, 32) and ref.dtype == torch.float32 and ref.path.name == MULTITALK_FILE_NAME
    full = tiny.state_dict()["audio_proj.proj3.weight"]
    assert torch.equal(ref.load(rows=slice(8, 16)), full[8:16])
    assert ref.load(dtype=torch.bfloat16).dtype == torch.bfloat16
    streamed = dict(iter_checkpoint_tensors(refs, keys=["head.head.weight", "blocks.1.norm_x.bias"]))
    assert torch.equal(streamed["head.head.weight"], tiny.state_dict()["head.head.weight"])


def _rewrite_file(folder, name, edit):
    path = folder / name
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(path))


def _copy(saved, tmp_path):
    for p in saved.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    return tmp_path


def test_missing_and_unexpected_keys_are_named(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    index = json.loads((folder / INDEX_NAME).read_text())
    del index["weight_map"]["blocks.1.audio_cross_attn.proj.weight"]
    index["weight_map"]["blocks.9.extra.weight"] = MULTITALK_FILE_NAME
    index["weight_map"]["blocks.9.other.weight"] = MULTITALK_FILE_NAME
    (folder / INDEX_NAME).write_text(json.dumps(index))
    _rewrite_file(
        folder,
        MULTITALK_FILE_NAME,
        lambda t: t.update(
            {"blocks.9.extra.weight": torch.zeros(2), "blocks.9.other.weight": torch.zeros(2)}
        ),
    )
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu")
    msg = str(err.value)
    assert "missing keys 1 (blocks.1.audio_cross_attn.proj.weight)" in msg
    assert "unexpected keys 2 (blocks.9.extra.weight, blocks.9.other.weight)" in msg
    assert err.value.field == "checkpoint"


def test_shape_mismatch_is_named(saved):
    wider = DiTConfig(**{**DiTConfig.tiny().__dict__, "ffn_dim": 96})
    with pytest.raises(
        CheckpointError, match=r"blocks\.0\.ffn\.0\.weight: checkpoint \[128, 64\] vs model \[96, 64\]"
    ):
        load_model(saved, config=wider, device="cpu")


def test_index_key_absent_from_its_shard(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _rewrite_file(folder, MULTITALK_FILE_NAME, lambda t: t.pop("audio_proj.norm.bias"))
    with pytest.raises(CheckpointError, match="lacks keys .*audio_proj.norm.bias"):
        open_checkpoint(folder)


def test_missing_shard_and_folder(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="00002-of-00003.safetensors listed in the index is missing"):
        load_model(folder, device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")


def test_missing_config_needs_a_preset(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu")
    assert err.value.field == "config"
    assert load_model(folder, config=DiTConfig.tiny(), device="cpu").config == DiTConfig.tiny()


def test_official_wan_config_json(tmp_path):
    official = {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "dim": 5120,
        "eps": 1e-06,
        "ffn_dim": 13824,
        "freq_dim": 256,
        "in_dim": 36,
        "model_type": "i2v",
        "num_heads": 40,
        "num_layers": 40,
        "out_dim": 16,
        "text_len": 512,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(official))
    assert DiTConfig.from_json(path) == DiTConfig.multitalk_14b()
