"""T5 / CLIP / VAE loaders: round trips through the official file layout, upstream semantics, shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from inference.encoders import (
    CLIP_CHECKPOINT,
    T5_CHECKPOINT,
    VAE_CHECKPOINT,
    ClipImageEncoder,
    EncoderError,
    T5Encoder,
    WanVae,
    clean_prompt,
    clip_hf_to_wan,
    clip_wan_to_hf,
    conditioning_mask,
    t5_hf_to_wan,
    t5_wan_to_hf,
    vae_diffusers_to_wan,
    vae_wan_to_diffusers,
)
from inference.encoders import tiny as te

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A Wan folder with the tiny T5, CLIP and VAE, plus their float32 library references."""
    folder = tmp_path_factory.mktemp("wan")
    refs = {
        "t5": te.write_tiny_t5(folder, seed=1),
        "clip": te.write_tiny_clip(folder, seed=2),
        "vae": te.write_tiny_vae(folder, seed=3),
    }
    return folder, refs


# ----------------------------------------------------------------------------------------------------
# Independent references of Wan's own math, read straight from the Wan-named state dicts
# ----------------------------------------------------------------------------------------------------


def _t5_bucket(rel: torch.Tensor, num_buckets: int = 32, max_dist: int = 128) -> torch.Tensor:
    half = num_buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))


def wan_t5_reference(sd: dict, ids: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's T5Encoder (shared_pos=False, no attention scaling, gated tanh-GELU FFN), in float32."""
    sd = {k: v.float() for k, v in sd.items()}

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    b, n = ids.shape
    x = F.embedding(ids, sd["token_embedding.weight"])
    buckets = _t5_bucket(torch.arange(n)[None, :] - torch.arange(n)[:, None])
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (
            (h @ sd[p + f"attn.{name}.weight"].T).view(b, n, heads, -1).transpose(1, 2) for name in "qkv"
        )
        bias = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        attn = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        x = x + (attn @ v).transpose(1, 2).reshape(b, n, -1) @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        gate = F.gelu(h @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + (gate * (h @ sd[p + "ffn.fc1.weight"].T)) @ sd[p + "ffn.fc2.weight"].T
        i += 1
    return rms(x, sd["norm.weight"])


def wan_clip_reference(sd: dict, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's VisionTransformer.forward(use_31_block=True): all blocks but the last, no post-norm."""
    patch = sd["visual.patch_embedding.weight"]
    dim = patch.shape[0]
    x = F.conv2d(pixels, patch, stride=patch.shape[-1]).flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd["visual.cls_embedding"].expand(x.shape[0], -1, -1), x], dim=1)
        + sd["visual.pos_embedding"]
    )
    x = F.layer_norm(x, (dim,), sd["visual.pre_norm.weight"], sd["visual.pre_norm.bias"], 1e-5)
    blocks = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("visual.transformer."))
    for i in range(blocks - 1):
        p = f"visual.transformer.{i}."
        h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-5)
        qkv = F.linear(h, sd[p + "attn.to_qkv.weight"], sd[p + "attn.to_qkv.bias"])
        q, k, v = qkv.view(x.shape[0], x.shape[1], 3, heads, -1).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + F.linear(
            a.transpose(1, 2).reshape(x.shape), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]
        )
        h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-5)
        h = F.gelu(F.linear(h, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]))
        x = x + F.linear(h, sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    return x


# ----------------------------------------------------------------------------------------------------
# T5
# ----------------------------------------------------------------------------------------------------

PROMPTS = ["two people talking in a video", "  The man &amp; the   woman,\n 42!  ", ""]


def test_t5_round_trip_is_exact(wan_dir):
    folder, refs = wan_dir
    enc = T5Encoder.from_wan(folder, device="cpu", dtype=torch.float32)
    out = enc.encode(PROMPTS)
    batch = enc.tokenizer(
        [clean_prompt(p) for p in PROMPTS],
        padding="max_length",
        max_length=512,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        ref = refs["t5"](input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    lengths = batch.attention_mask.sum(1).tolist()
    assert [o.shape for o in out] == [(n, te.TINY_T5_DIM) for n in lengths]
    assert lengths[2] == 1  # an empty prompt is just </s>
    for i, o in enumerate(out):
        assert torch.equal(o, ref[i, : lengths[i]])


def test_t5_matches_wan_math_from_official_keys(wan_dir):
    folder, _ = wan_dir
    enc = T5Encoder.from_wan(folder / T5_CHECKPOINT, dtype=torch.float32)
    texts = ["two people talking", "a woman in a video, 7 people"]
    batch = enc.tokenizer(texts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    sd = torch.load(folder / T5_CHECKPOINT, weights_only=True)
    ref = wan_t5_reference(sd, batch.input_ids, batch.attention_mask, te.TINY_T5_HEADS)
    for i, o in enumerate(enc.encode(texts)):
        torch.testing.assert_close(o, ref[i, : o.shape[0]], atol=1e-5, rtol=1e-5)


def test_t5_official_file_layout_and_inverse(wan_dir):
    folder, refs = wan_dir
    sd = torch.load(folder / T5_CHECKPOINT, weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    for key in (
        "token_embedding.weight",
        "blocks.1.attn.o.weight",
        "blocks.1.pos_embedding.embedding.weight",
        "blocks.0.ffn.gate.0.weight",
        "blocks.0.ffn.fc1.weight",
        "blocks.0.ffn.fc2.weight",
        "norm.weight",
    ):
        assert key in sd
    back = t5_hf_to_wan(t5_wan_to_hf(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    hf = t5_wan_to_hf(sd)
    assert hf.keys() == refs["t5"].state_dict().keys()


def test_t5_bf16_load_and_errors(wan_dir, tmp_path):
    folder, _ = wan_dir
    enc = T5Encoder.from_wan(folder, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and enc.dim == te.TINY_T5_DIM
    assert enc.encode(["a"])[0].dtype == torch.bfloat16
    with pytest.raises(EncoderError) as err:
        enc.encode("a bare string")
    assert err.value.field == "texts"
    with pytest.raises(EncoderError) as err:
        T5Encoder.from_wan(tmp_path / "nowhere.pth")
    assert err.value.field == "t5_tokenizer"
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    with pytest.raises(EncoderError) as err:
        T5Encoder.from_wan(tmp_path)
    assert err.value.field == "t5_checkpoint"


def test_clean_prompt_follows_wan_whitespace_cleaning():
    assert clean_prompt("  a \n\t b  &amp;amp; c ") == "a b & c"


# ----------------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------------


def test_clip_round_trip_is_exact_penultimate_block(wan_dir):
    folder, refs = wan_dir
    clip = ClipImageEncoder.from_wan(folder, dtype=torch.float32)
    assert clip.model.config.num_hidden_layers == te.TINY_CLIP_STORED_BLOCKS - 1
    image = torch.rand(3, 72, 120, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = clip.encode(image)
    assert out.shape == (1, te.TINY_CLIP_TOKENS, te.TINY_CLIP_DIM)
    with torch.no_grad():
        hidden = refs["clip"](pixel_values=clip.preprocess(image), output_hidden_states=True).hidden_states
    assert torch.equal(out, hidden[-2])  # after all but the last stored block, no post-norm
    assert not torch.allclose(out, hidden[-1])


def test_clip_matches_wan_math_and_preprocessing(wan_dir):
    folder, _ = wan_dir
    clip = ClipImageEncoder.from_wan(folder / CLIP_CHECKPOINT, dtype=torch.float32)
    image = torch.rand(3, 50, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # Upstream preprocessing: bicubic to 224 (align_corners=False), [-1,1] -> [0,1], CLIP mean/std.
    x = F.interpolate(image[None], size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(clip.preprocess(image), (x - mean) / std, atol=0, rtol=0)
    sd = torch.load(folder / CLIP_CHECKPOINT, weights_only=True)
    ref = wan_clip_reference(sd, (x - mean) / std, heads=16)
    torch.testing.assert_close(clip.encode(image), ref, atol=1e-5, rtol=1e-5)


def test_clip_skips_text_tower_and_inverse_round_trip(wan_dir):
    folder, refs = wan_dir
    sd = torch.load(folder / CLIP_CHECKPOINT, weights_only=True)
    assert any(k.startswith("textual.") for k in sd) and "log_scale" in sd and "visual.head" in sd
    hf = clip_wan_to_hf(sd)
    assert not any("textual" in k or "head" in k for k in hf)
    full = refs["clip"].state_dict()
    back = clip_hf_to_wan(full)
    assert all(torch.equal(back[k], sd[k]) for k in back)
    assert {k for k in sd if k.startswith("visual.") and k != "visual.head"} == back.keys()


def test_clip_rejects_bad_images(wan_dir):
    folder, _ = wan_dir
    clip = ClipImageEncoder.from_wan(folder, dtype=torch.float32)
    for bad in (torch.zeros(64, 64, 3), torch.zeros(1, 3, 64, 64), torch.zeros(3, 8, 8, dtype=torch.uint8)):
        with pytest.raises(EncoderError) as err:
            clip.encode(bad)
        assert err.value.field == "image"


# ----------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------


def _normalise(mu: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(te.VAE_LATENT_MEAN).view(-1, 1, 1, 1)
    std = torch.tensor(te.VAE_LATENT_STD).view(-1, 1, 1, 1)
    return (mu - mean) * (1.0 / std)


def test_vae_round_trip_is_exact(wan_dir):
    folder, refs = wan_dir
    vae = WanVae.from_wan(folder)
    video = torch.rand(3, 9, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latent = vae.encode(video)
    with torch.no_grad():
        mu = refs["vae"].encode(video[None]).latent_dist.mode()[0]
        assert torch.equal(latent, _normalise(mu))
        std = torch.tensor(te.VAE_LATENT_STD).view(-1, 1, 1, 1)
        mean = torch.tensor(te.VAE_LATENT_MEAN).view(-1, 1, 1, 1)
        ref_video = refs["vae"].decode((latent / (1.0 / std) + mean)[None]).sample[0]
    out = vae.decode(latent)
    assert torch.equal(out, ref_video.clamp(-1, 1))
    assert out.min() >= -1 and out.max() <= 1


def test_vae_shapes_for_81_frames(wan_dir):
    folder, _ = wan_dir
    vae = WanVae.from_wan(folder / VAE_CHECKPOINT)
    video = torch.rand(3, 81, 16, 16) * 2 - 1
    latent = vae.encode(video)
    assert latent.shape == (16, 21, 2, 2) == WanVae.latent_shape(81, 16, 16)
    assert latent.dtype == torch.float32
    assert vae.decode(latent).shape == (3, 81, 16, 16)


def test_vae_key_mapping_agrees_with_diffusers_single_file_converter():
    """diffusers' own Wan VAE converter (written for 2 residual blocks per level, like the real file) must
    produce the same names from our Wan-layout state dict."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    config = dict(te.tiny_vae_config(), base_dim=2, num_res_blocks=2)
    model = AutoencoderKLWan(**config)
    d_sd = model.state_dict()
    wan_sd = vae_diffusers_to_wan(d_sd, config)
    theirs = convert_wan_vae_to_diffusers(wan_sd)
    ours, inferred = vae_wan_to_diffusers(wan_sd)
    assert inferred["num_res_blocks"] == 2 and inferred["dim_mult"] == [1, 2, 4, 4]
    assert inferred["temperal_downsample"] == [False, True, True]
    assert theirs.keys() == ours.keys() == d_sd.keys()
    assert all(theirs[k] is ours[k] for k in ours)


def test_conditioning_mask_layout():
    first = conditioning_mask(81, 1, 2, 3)
    assert first.shape == (4, 21, 2, 3)
    assert first[:, 0].eq(1).all() and first[:, 1:].eq(0).all()
    streaming = conditioning_mask(81, 25, 2, 3)  # 25 motion frames -> latent frames 0..6
    assert streaming[:, :7].eq(1).all() and streaming[:, 7:].eq(0).all()
    # Channel c of latent frame t > 0 is pixel frame 4t + c - 3 (frame 0 fills all of latent frame 0).
    partial = conditioning_mask(9, 3, 1, 1)[:, :, 0, 0]
    assert partial.tolist() == [[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]]
    with pytest.raises(EncoderError) as err:
        conditioning_mask(80, 1, 2, 2)
    assert err.value.field == "num_frames"


def test_build_y_first_clip_and_motion_frames(wan_dir):
    folder, _ = wan_dir
    vae = WanVae.from_wan(folder)
    gen = torch.Generator().manual_seed(5)
    ref = torch.rand(3, 16, 24, generator=gen) * 2 - 1
    y = vae.build_y(ref, 9)
    assert y.shape == (20, 3, 2, 3)
    assert torch.equal(y[:4], conditioning_mask(9, 1, 2, 3))
    padded = torch.cat([ref[:, None], torch.zeros(3, 8, 16, 24)], dim=1)
    assert torch.equal(y[4:], vae.encode(padded))

    motion = torch.rand(3, 5, 16, 24, generator=gen) * 2 - 1
    y2 = vae.build_y(None, 9, motion_frames=motion)
    assert torch.equal(y2[:4], conditioning_mask(9, 5, 2, 3))
    assert y2[:4, :2].eq(1).all() and y2[:4, 2].eq(0).all()
    assert torch.equal(y2[4:], vae.encode(torch.cat([motion, torch.zeros(3, 4, 16, 24)], dim=1)))


def test_vae_rejects_bad_input(wan_dir, tmp_path):
    folder, _ = wan_dir
    vae = WanVae.from_wan(folder)
    cases = [
        (lambda: vae.encode(torch.zeros(3, 8, 16, 16)), "video"),
        (lambda: vae.encode(torch.zeros(3, 5, 12, 16)), "video"),
        (lambda: vae.decode(torch.zeros(4, 2, 2, 2)), "latent"),
        (lambda: vae.build_y(torch.zeros(3, 16, 16), 80), "num_frames"),
        (lambda: vae.build_y(None, 9), "ref_image"),
        (lambda: vae.build_y(None, 9, motion_frames=torch.zeros(3, 10, 16, 16)), "motion_frames"),
        (lambda: WanVae.from_wan(tmp_path), "vae_checkpoint"),
    ]
    for call, field in cases:
        with pytest.raises(EncoderError) as err:
            call()
        assert err.value.field == field


# ----------------------------------------------------------------------------------------------------
# Real sizes (meta tensors: shapes only, no memory)
# ----------------------------------------------------------------------------------------------------


def test_real_size_configs_are_read_from_official_shapes():
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from inference.encoders import clip_config_from_wan, t5_config_from_wan, vae_config_from_wan

    with torch.device("meta"):
        t5 = UMT5EncoderModel(
            UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
        )
        clip = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                image_size=224, patch_size=14,
            )
        )  # fmt: skip
        vae = AutoencoderKLWan()
    wan_t5 = t5_hf_to_wan(t5.state_dict())
    assert len(wan_t5) == 1 + 24 * 10 + 1
    cfg = t5_config_from_wan(wan_t5)
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads) == (
        256384, 4096, 64, 10240, 24, 64,
    )  # fmt: skip
    assert cfg.dense_act_fn == "gelu_new" and cfg.is_gated_act
    assert t5_wan_to_hf(wan_t5).keys() == t5.state_dict().keys()

    wan_clip = clip_hf_to_wan(clip.state_dict())
    assert "visual.transformer.31.attn.to_qkv.weight" in wan_clip
    assert wan_clip["visual.pos_embedding"].shape == (1, 257, 1280)
    ccfg = clip_config_from_wan(wan_clip)
    assert (ccfg.num_hidden_layers, ccfg.image_size, ccfg.patch_size, ccfg.intermediate_size) == (
        31,
        224,
        14,
        5120,
    )
    assert not any(".31." in k for k in clip_wan_to_hf(wan_clip))

    wan_vae = vae_diffusers_to_wan(vae.state_dict(), dict(vae.config))
    assert (
        "decoder.upsamples.4.shortcut.weight" in wan_vae
        and "encoder.downsamples.2.time_conv.weight" not in wan_vae
    )
    assert (
        "encoder.downsamples.5.time_conv.weight" in wan_vae
        and "decoder.upsamples.3.time_conv.weight" in wan_vae
    )
    vcfg = vae_config_from_wan(wan_vae)
    assert (vcfg["base_dim"], vcfg["num_res_blocks"], vcfg["dim_mult"]) == (96, 2, [1, 2, 4, 4])
    assert vcfg["temperal_downsample"] == [False, True, True]
