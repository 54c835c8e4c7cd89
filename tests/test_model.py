"""MultiTalk DiT: tiny-model shapes, upstream formulas, audio packing, L-RoPE routing, 14B key list."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from inference.model.__main__ import main as _main
from inference.model.attention import frame_local_attention
from inference.model.config import ConfigError, DiTConfig
from inference.model.dit import (
    ModelInputError,
    MultiTalkDiT,
    WanAudioCrossAttention,
    audio_key_positions,
    build_model,
    pack_audio_windows,
    rope_3d_tables,
    rotate_pairs,
    routing_head_fn,
    routing_positions,
    sinusoidal_embedding_1d,
)
from inference.model.sp import NoParallel

T_LAT, H_LAT, W_LAT = 3, 4, 6  # token grid 3 x 2 x 3 = 18 tokens, 6 per frame


def tiny_inputs(persons: int = 2, seed: int = 1, batch: int = 1) -> dict[str, torch.Tensor]:
    cfg = DiTConfig.tiny()
    g = torch.Generator().manual_seed(seed)
    frames = 1 + cfg.vae_scale * (T_LAT - 1)
    masks = torch.zeros(3, H_LAT, W_LAT)
    masks[0, 1:, : W_LAT // 2] = 1
    masks[1, 1:, W_LAT // 2 :] = 1
    masks[2] = 1 - masks[0] - masks[1]
    return dict(
        x=torch.randn(batch, 16, T_LAT, H_LAT, W_LAT, generator=g),
        t=torch.full((batch,), 700.0),
        context=torch.randn(batch, 5, cfg.text_dim, generator=g),
        clip_fea=torch.randn(batch, 3, cfg.clip_dim, generator=g),
        y=torch.randn(batch, 20, T_LAT, H_LAT, W_LAT, generator=g),
        audio=torch.randn(
            batch, persons, frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g
        ),
        ref_target_masks=masks,
    )


@pytest.fixture(scope="module")
def tiny_model() -> MultiTalkDiT:
    torch.manual_seed(123)  # only the seeded init below must matter
    return MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=0).eval()


# ---- config --------------------------------------------------------------------------


def test_presets_and_derived_sizes():
    big = DiTConfig.multitalk_14b()
    assert (big.head_dim, big.rope_dims) == (128, (44, 42, 42))
    assert (big.audio_input_dim, big.audio_input_dim_vf, big.audio_window_vf) == (46080, 73728, 8)
    tiny = DiTConfig.tiny()
    assert (tiny.dim, tiny.num_heads, tiny.head_dim, tiny.num_layers) == (64, 4, 16, 2)
    assert (tiny.audio_input_dim, tiny.audio_input_dim_vf) == (5 * 2 * 32, 8 * 2 * 32)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError) as err:
        DiTConfig(model_type="t2v")
    assert err.value.field == "model_type"
    with pytest.raises(ConfigError) as err:
        DiTConfig(dim=100, num_heads=3)
    assert err.value.field == "num_heads"
    with pytest.raises(ConfigError) as err:
        DiTConfig(window_size=(4, 4))
    assert err.value.field == "window_size"
    with pytest.raises(ConfigError):
        DiTConfig.preset("huge")


# ---- 14B key list ----------------------------------------------------------------------


def test_14b_keys_shapes_and_count():
    model = build_model(DiTConfig.multitalk_14b())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # 14 top-level Wan tensors + 8 img_emb + 10 audio_proj + 40 blocks x (34 Wan + 8 audio) + head 3.
    assert len(shapes) == 1633
    assert sum(math.prod(s) for s in shapes.values()) == 18_882_046_784
    expected = {
        "patch_embedding.weight": (5120, 36, 1, 2, 2),
        "text_embedding.0.weight": (5120, 4096),
        "time_projection.1.weight": (30720, 5120),
        "blocks.0.self_attn.q.weight": (5120, 5120),
        "blocks.0.self_attn.norm_q.weight": (5120,),
        "blocks.39.cross_attn.k_img.weight": (5120, 5120),
        "blocks.39.cross_attn.norm_k_img.weight": (5120,),
        "blocks.0.norm3.weight": (5120,),
        "blocks.0.ffn.0.weight": (13824, 5120),
        "blocks.0.modulation": (1, 6, 5120),
        "blocks.7.audio_cross_attn.q_linear.weight": (5120, 5120),
        "blocks.7.audio_cross_attn.kv_linear.weight": (10240, 768),
        "blocks.7.audio_cross_attn.proj.bias": (5120,),
        "blocks.7.norm_x.bias": (5120,),
        "head.head.weight": (64, 5120),
        "head.modulation": (1, 2, 5120),
        "img_emb.proj.0.weight": (1280,),
        "img_emb.proj.3.weight": (5120, 1280),
        "audio_proj.proj1.weight": (512, 46080),
        "audio_proj.proj1_vf.weight": (512, 73728),
        "audio_proj.proj3.weight": (24576, 512),
        "audio_proj.norm.weight": (768,),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    # Non-affine norms carry no weights, exactly as the official checkpoint.
    assert not any(k.startswith(("blocks.0.norm1", "blocks.0.norm2", "head.norm")) for k in shapes)
    audio = sum(math.prod(s) for k, s in shapes.items() if "audio" in k or "norm_x" in k)
    assert audio == 74_214_400 + 40 * 60_323_840  # adapter 74.2 M + 40 blocks x 60.3 M = 2.487 B


def test_keys_cli_prints_every_tensor(capsys):
    assert _main(["keys", "--preset", "tiny"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    model = MultiTalkDiT(DiTConfig.tiny())
    assert len(lines) == len(model.state_dict()) + 1
    assert lines[0] == "patch_embedding.weight\t[64, 36, 1, 2, 2]"
    assert lines[-1].startswith(f"# parameters\t{model.num_parameters()}")


# ---- forward ---------------------------------------------------------------------------


def test_tiny_forward_shape_and_determinism(tiny_model):
    inp = tiny_inputs()
    with torch.no_grad():
        out = tiny_model(**inp)
        again = tiny_model(**inp)
        other = MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=0).eval()(**inp)
        reseeded = MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=1).eval()(**inp)
    assert out.shape == (1, 16, T_LAT, H_LAT, W_LAT) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3
    assert torch.equal(out, again) and torch.equal(out, other)
    assert not torch.allclose(out, reseeded)


def test_batch_rows_are_independent(tiny_model):
    a, b = tiny_inputs(seed=1), tiny_inputs(seed=2)
    both = {k: torch.cat([a[k], b[k]]) if k != "ref_target_masks" else a[k] for k in a}
    with torch.no_grad():
        out = tiny_model(**both)
        out_a, out_b = tiny_model(**a), tiny_model(**b)
    torch.testing.assert_close(out[:1], out_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], out_b, atol=1e-5, rtol=1e-5)


def test_output_depends_on_each_conditioning_input(tiny_model):
    base = tiny_inputs()
    with torch.no_grad():
        ref = tiny_model(**base)
        for name in ("context", "clip_fea", "y", "audio", "t"):
            changed = dict(base)
            changed[name] = base[name] + 0.5 if name != "t" else base[name] - 300
            assert not torch.allclose(tiny_model(**changed), ref), name


def test_one_person_pass_ignores_masks_and_two_person_pass_uses_them(tiny_model):
    one = tiny_inputs(persons=1)
    with torch.no_grad():
        with_masks = tiny_model(**one)
        without = tiny_model(**{**one, "ref_target_masks": None})
        null_audio = tiny_model(**{**one, "audio": torch.zeros_like(one["audio"])})
    # One person (and the null-audio CFG pass): no routing, no L-RoPE, masks irrelevant.
    assert torch.equal(with_masks, without)
    assert torch.isfinite(null_audio).all()
    two = tiny_inputs(persons=2)
    swapped = two["ref_target_masks"][[1, 0, 2]]
    with torch.no_grad():
        assert not torch.allclose(tiny_model(**two), tiny_model(**{**two, "ref_target_masks": swapped}))


def test_forward_rejects_bad_inputs(tiny_model):
    inp = tiny_inputs()
    cases = {
        "audio": {"audio": inp["audio"][:, :, :-1]},
        "ref_target_masks": {"ref_target_masks": None},
        "context": {"context": torch.randn(1, 17, 32)},
        "y": {"y": inp["y"][:, :19]},
        "t": {"t": torch.tensor(5.0)},
    }
    for field, change in cases.items():
        with pytest.raises(ModelInputError) as err:
            tiny_model(**{**inp, **change})
        assert err.value.field == field
    with pytest.raises(ModelInputError, match="1 or 2 persons"):
        three = tiny_inputs(persons=2)
        tiny_model(**{**three, "audio": torch.cat([three["audio"], three["audio"][:, :1]], dim=1)})


# ---- helpers against upstream's formulas ------------------------------------------------


def test_sinusoid_matches_wan_formula():
    t = torch.tensor([0.0, 999.0, 321.5])
    half = 128
    ang = t.double()[:, None] * torch.pow(10000, -torch.arange(half).double() / half)[None]
    ref = torch.cat([ang.cos(), ang.sin()], 1).float()
    torch.testing.assert_close(sinusoidal_embedding_1d(256, t), ref)


@pytest.mark.parametrize("head_dim", [16, 128])
def test_rope_3d_matches_upstream_complex_table(head_dim):
    grid = (3, 2, 5)

    def params(n: int, dim: int) -> torch.Tensor:  # Wan's rope_params
        f = torch.outer(torch.arange(n), 1.0 / torch.pow(10000, torch.arange(0, dim, 2).double() / dim))
        return torch.polar(torch.ones_like(f), f)

    d = head_dim
    freqs = torch.cat([params(64, d - 4 * (d // 6)), params(64, 2 * (d // 6)), params(64, 2 * (d // 6))], 1)
    c = d // 2
    ft, fh, fw = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    table = torch.cat(
        [
            ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
            fw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        -1,
    ).reshape(f * h * w, 1, -1)
    x = torch.randn(2, f * h * w, 3, d)
    ref = torch.view_as_real(
        torch.view_as_complex(x.double().reshape(2, f * h * w, 3, -1, 2)) * table
    ).flatten(3)
    cos, sin = rope_3d_tables(d, grid)
    torch.testing.assert_close(rotate_pairs(x, cos, sin), ref.float(), atol=1e-5, rtol=1e-5)


def test_routing_head_fn_matches_explicit_masked_softmax():
    g = torch.Generator().manual_seed(3)
    b, s, h, d, n_ref = 2, 14, 3, 16, 6
    q, k = torch.randn(b, s, h, d, generator=g), torch.randn(b, s, h, d, generator=g)
    masks = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    stat = routing_head_fn(masks)(q, k, 0)  # [B*3, S]
    probs = torch.softmax(torch.einsum("bshd,bjhd->bhsj", q, k[:, :n_ref]) / math.sqrt(d), -1)
    ref = torch.einsum("bhsj,cj->bcs", probs, masks.float()) / masks.sum(1).float()[None, :, None]
    torch.testing.assert_close(stat.view(b, 3, s), ref, atol=1e-5, rtol=1e-5)


def test_sinusoid_and_modulation_in_fp32_with_bf16_weights(tiny_model):
    model = MultiTalkDiT(DiTConfig.tiny()).init_weights(seed=0).to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(**tiny_inputs())
        ref = tiny_model(**tiny_inputs())
    assert out.dtype == torch.float32
    # bf16 weights and activations stay close to the fp32 model.
    assert (out - ref).abs().mean() < 0.1 * ref.abs().mean()


# ---- audio windows and packing -----------------------------------------------------------


def test_pack_audio_windows_3113_layout():
    # audio[..., f, w, 0, 0] = 10 * f + w identifies (video frame, window slot).
    frames, window = 9, 5
    code = (10 * torch.arange(frames)[:, None] + torch.arange(window)[None, :]).float()
    audio = code[None, None, :, :, None, None].expand(1, 2, frames, window, 2, 3)
    first, later = pack_audio_windows(audio, vae_scale=4)
    assert first.shape == (1, 2, 1, 5, 2, 3)
    assert later.shape == (1, 2, 2, 8, 2, 3)
    assert first[0, 0, 0, :, 0, 0].tolist() == [0, 1, 2, 3, 4]
    # Latent frame 1 = video frames 1..4: [f1 w0..2, f2 w2, f3 w2, f4 w2..4].
    assert later[0, 0, 0, :, 0, 0].tolist() == [10, 11, 12, 22, 32, 42, 43, 44]
    assert later[0, 1, 1, :, 0, 0].tolist() == [50, 51, 52, 62, 72, 82, 83, 84]
    with pytest.raises(ModelInputError):
        pack_audio_windows(audio[:, :, :8], vae_scale=4)


def test_embed_audio_concatenates_persons_along_tokens(tiny_model):
    inp = tiny_inputs(persons=2)
    with torch.no_grad():
        both = tiny_model.embed_audio(inp["audio"])
        p1 = tiny_model.embed_audio(inp["audio"][:, :1])
        p2 = tiny_model.embed_audio(inp["audio"][:, 1:])
    m = DiTConfig.tiny().context_tokens
    assert both.shape == (1, T_LAT, 2 * m, DiTConfig.tiny().output_dim)
    torch.testing.assert_close(both[:, :, :m], p1)
    torch.testing.assert_close(both[:, :, m:], p2)


# ---- L-RoPE routing ---------------------------------------------------------------------


class FixedRangeSP(NoParallel):
    """Test double: pretends other ranks contributed the given global max/min."""

    def __init__(self, gmax: torch.Tensor, gmin: torch.Tensor) -> None:
        self.gmax, self.gmin = gmax, gmin

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x, self.gmax)

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(x, self.gmin)


def test_routing_positions_for_a_crafted_map():
    # 5 tokens; rows: person 1, person 2, background.
    ref = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.1, 0.3],
            [0.1, 0.8, 0.2, 0.0, 0.6],
            [0.0, 0.0, 0.0, 0.7, 0.1],
        ]
    )[None]
    pos = routing_positions(ref, NoParallel(), class_range=24, class_interval=4, dtype=torch.float32)[0]
    # token 0: person 1 at its max -> 4; token 1: person 2 at its max -> 24; token 2: person 1
    # (0.5 - 0.1) / 0.8 * 4 = 2; token 3: background -> 12; token 4: person 2 0.6/0.8*4 + 20 = 23.
    torch.testing.assert_close(pos, torch.tensor([4.0, 24.0, 2.0, 12.0, 23.0]), atol=1e-5, rtol=0)
    # Global min/max from other ranks rescale the local tokens.
    sp = FixedRangeSP(gmax=torch.tensor([[1.7, 0.8, 0.7]]), gmin=torch.tensor([[0.1, 0.0, 0.0]]))
    pos = routing_positions(ref, sp, class_range=24, class_interval=4, dtype=torch.float32)[0]
    torch.testing.assert_close(pos[[0, 2]], torch.tensor([2.0, 1.0]), atol=1e-5, rtol=0)
    # bf16 activations round the positions as upstream (which computes them in bf16).
    pos16 = routing_positions(ref, NoParallel(), 24, 4, dtype=torch.bfloat16)
    assert torch.equal(pos16, pos16.to(torch.bfloat16).float())


def test_audio_key_positions():
    assert audio_key_positions(4, 2, 24, 4).tolist() == [2, 2, 22, 22, 2, 2, 22, 22]


def test_lrope_rotates_queries_and_keys_by_position():
    attn = WanAudioCrossAttention(dim=32, audio_dim=8, num_heads=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 32, generator=g)
    audio = torch.randn(1, 2, 4, 8, generator=g)  # 2 frames x (2 persons x 2 tokens)
    kpos = audio_key_positions(4, 1, 24, 4)
    near1 = attn(x, audio, 0, 3, torch.full((1, 6), 2.0), kpos)
    # Shifting every query and key position by the same amount leaves the scores unchanged.
    shifted = attn(x, audio, 0, 3, torch.full((1, 6), 5.0), kpos + 3.0)
    torch.testing.assert_close(near1, shifted, atol=1e-5, rtol=1e-5)
    near2 = attn(x, audio, 0, 3, torch.full((1, 6), 22.0), kpos)
    assert not torch.allclose(near1, near2, atol=1e-4)


# ---- frame-local audio attention ---------------------------------------------------------


def dense_masked_reference(q, k, v, start, q_per_frame, kv_per_frame):
    """Block-diagonal attention with an explicit boolean mask (the CPU reference)."""
    qf = (start + torch.arange(q.shape[1])) // q_per_frame - start // q_per_frame
    kf = torch.arange(k.shape[1]) // kv_per_frame
    mask = qf[:, None] == kf[None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("start,n", [(0, 24), (5, 9), (2, 3), (6, 12), (11, 13)])
def test_frame_local_attention_matches_masked_reference(start, n):
    tpf, kvpf = 6, 4
    g = torch.Generator().manual_seed(start * 31 + n)
    f0, f1 = start // tpf, (start + n - 1) // tpf + 1
    q = torch.randn(2, n, 3, 8, generator=g)
    k = torch.randn(2, (f1 - f0) * kvpf, 3, 8, generator=g)
    v = torch.randn(2, (f1 - f0) * kvpf, 3, 8, generator=g)
    out = frame_local_attention(q, k, v, start - f0 * tpf, tpf, kvpf)
    torch.testing.assert_close(out, dense_masked_reference(q, k, v, start, tpf, kvpf), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lrope", [False, True])
def test_audio_attention_on_mid_frame_chunk_equals_rows_of_full(lrope):
    torch.manual_seed(0)
    attn = WanAudioCrossAttention(dim=32, audio_dim=8, num_heads=2)
    tpf, frames = 6, 4
    x = torch.randn(2, tpf * frames, 32)
    audio = torch.randn(2, frames, 4, 8)
    qpos = torch.rand(2, tpf * frames) * 24 if lrope else None
    kpos = audio_key_positions(4, 1, 24, 4) if lrope else None
    full = attn(x, audio, 0, tpf, qpos, kpos)
    # Upstream's per-frame reshape, as the single-GPU reference.
    if not lrope:
        per_frame = torch.cat(
            [attn(x[:, f * tpf : (f + 1) * tpf], audio[:, f : f + 1], 0, tpf) for f in range(frames)], dim=1
        )
        torch.testing.assert_close(full, per_frame, atol=1e-5, rtol=1e-5)
    for start, end in [(3, 9), (5, 20), (7, 8), (12, 24)]:
        chunk = attn(x[:, start:end], audio, start, tpf, None if qpos is None else qpos[:, start:end], kpos)
        torch.testing.assert_close(chunk, full[:, start:end], atol=1e-5, rtol=1e-5)


def test_frame_local_attention_checks_key_coverage():
    q = torch.randn(1, 5, 2, 4)
    k = torch.randn(1, 4, 2, 4)
    with pytest.raises(ValueError, match="frames"):
        frame_local_attention(q, k, k, 4, 6, 4)  # 5 tokens from offset 4 span 2 frames
