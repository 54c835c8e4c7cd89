"""MultiTalk DiT: Wan2.1-I2V-14B plus the audio adapter and per-block audio cross-attention.

Single-device math written once for 1..P ranks: every sequence-parallel step goes through
the ``sp`` object (``inference.parallel``; ``NoParallel`` on one process). Attribute names
equal the official checkpoint keys (Wan shards + ``multitalk.safetensors``), so real weights
load with a strict check and no key mapping.

Order follows Wan's ``wan/modules/model.py``: helpers, norms, attention, blocks, model.
Facts (shapes, constants, numerics) come from Wan-Video/Wan2.1 ``wan/modules/model.py`` and
MeiGen-AI/MultiTalk ``wan/modules/{multitalk_model,attention}.py`` and
``wan/utils/multitalk_utils.py``; the code is our own.

Shapes: ``B`` batch, ``S`` video tokens (T_lat * N_h * N_w), ``S_loc`` tokens on this rank
(padded), ``n`` real tokens on this rank, ``C`` dim, ``H`` heads, ``D`` head dim,
``N_a`` audio tokens per latent frame (context_tokens * persons), ``C_a`` audio token width.

Numerics as upstream: timestep embedding, the 6-way modulation, the gated residuals and the
head run in fp32 (upstream: ``amp.autocast(float32)``); norms compute in fp32 and return the
input dtype; RoPE angles come from float64 tables.

CLI (``inference/model/__main__.py``): ``python -m inference.model keys --preset multitalk-14b|tiny`` prints ``key<TAB>shape``
per tensor and the parameter count (built on the meta device, no memory used).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from inference.model.attention import attend, frame_local_attention
from inference.model.config import DiTConfig
from inference.model.layers import (
    ModelInputError,
    _linear_fp32,
    audio_key_positions,
    pack_audio_windows,
    rope_1d_tables,
    rope_3d_tables,
    rotate_pairs,
    routing_head_fn,
    routing_positions,
    sinusoidal_embedding_1d,
)
from inference.model.sp import HeadFn, NoParallel, RopeFn, SequenceParallelism

logger = logging.getLogger(__name__)

__all__ = ["ModelInputError", "MultiTalkDiT", "pack_audio_windows", "rope_3d_tables", "routing_positions"]


class WanRMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32, then scaled by ``weight`` in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., C] -> [..., C]."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and returned in the input dtype (non-affine by default)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., C] -> [..., C]."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------


class _QKVOAttention(nn.Module):
    """The q/k/v/o projections and q/k RMSNorms that Wan's attentions share (keys ``q k v o norm_q norm_k``)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()


class WanSelfAttention(_QKVOAttention):
    """Self-attention with q/k RMSNorm over all heads and 3-D RoPE; keys ``q k v o norm_q norm_k``."""

    def forward(
        self,
        x: torch.Tensor,
        seq_len: int,
        rope: RopeFn,
        sp: SequenceParallelism,
        head_fn: HeadFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, S_loc, C] -> ([B, S_loc, C], routing stat [n, S_loc] summed over heads, or None)."""
        b, s = x.shape[:2]
        shape = (b, s, self.num_heads, self.head_dim)
        # The RMSNorm spans all heads, so it must run before any head scatter (inside sp).
        q = self.norm_q(self.q(x)).view(shape)
        k = self.norm_k(self.k(x)).view(shape)
        v = self.v(x).view(shape)
        out, stat = sp.attention(q, k, v, seq_len, rope, head_fn)
        return self.o(out.flatten(2).to(x.dtype)), stat


class WanI2VCrossAttention(_QKVOAttention):
    """Text + CLIP-image cross-attention with separate image k/v; keys add ``k_img v_img norm_k_img``."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__(dim, num_heads, qk_norm, eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor) -> torch.Tensor:
        """x: [B, S_loc, C]; context: [B, text_len, C] (padding attended, as upstream);
        context_img: [B, 257, C] -> [B, S_loc, C]."""
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(context)).view(b, -1, n, d)
        v = self.v(context).view(b, -1, n, d)
        k_img = self.norm_k_img(self.k_img(context_img)).view(b, -1, n, d)
        v_img = self.v_img(context_img).view(b, -1, n, d)
        out = attend(q, k, v).flatten(2) + attend(q, k_img, v_img).flatten(2)
        return self.o(out)


class WanAudioCrossAttention(nn.Module):
    """MultiTalk's frame-local audio cross-attention (upstream ``SingleStreamMutiAttention``).

    Keys ``q_linear kv_linear proj`` (upstream builds it with qk_norm=False: no norm weights).
    Video tokens of latent frame t attend only to the audio tokens of frame t. With two
    persons, L-RoPE rotates q by the token's routing position and the audio keys by their
    person's position; with one person (and the null-audio CFG passes) no RoPE is used.
    """

    def __init__(self, dim: int, audio_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        audio: torch.Tensor,
        start: int,
        tokens_per_frame: int,
        q_positions: torch.Tensor | None = None,
        k_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend a token chunk to its frames' audio tokens.

        Args:
            x: [B, n, C] the real tokens with global indices [start, start + n), n >= 1.
            audio: [B, T_lat, N_a, C_a] adapter output for all latent frames.
            start: global index of x's first token (may be mid-frame).
            tokens_per_frame: N_h * N_w.
            q_positions: [B, n] L-RoPE positions of the queries, or None (no RoPE).
            k_positions: [N_a] L-RoPE positions of one frame's audio keys (with q_positions).

        Returns:
            [B, n, C].
        """
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        f0 = start // tokens_per_frame
        f1 = (start + n - 1) // tokens_per_frame + 1
        frames = audio[:, f0:f1]  # only the frames this chunk touches
        n_a = frames.shape[2]
        kv = self.kv_linear(frames.flatten(1, 2)).view(b, (f1 - f0) * n_a, 2, h, d)
        k, v = kv.unbind(2)
        q = self.q_linear(x).view(b, n, h, d)
        if q_positions is not None:
            if k_positions is None:
                raise ValueError("k_positions are required with q_positions")
            q = rotate_pairs(q, *rope_1d_tables(q_positions, d))
            k = rotate_pairs(k, *rope_1d_tables(k_positions.to(k.device).repeat(f1 - f0), d))
        out = frame_local_attention(q, k, v, start - f0 * tokens_per_frame, tokens_per_frame, n_a)
        return self.proj(out.flatten(2))


# ---------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioGroup:
    """The batch rows that share a person count, with their audio tokens.

    rows: batch indices (None: every row); audio: [b, T_lat, N_a, C_a] adapter output of those rows;
    routing: head_fn for the speaker map and k_positions: [N_a] audio key L-RoPE positions (two
    persons only, else None).
    """

    rows: tuple[int, ...] | None
    audio: torch.Tensor
    routing: HeadFn | None
    k_positions: torch.Tensor | None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The group's rows of a batch-first tensor."""
        return x if self.rows is None else x[list(self.rows)]


@dataclass(frozen=True)
class BlockInputs:
    """Per-forward values shared by all blocks (replicated on every rank).

    context: [B, text_len, C]; context_img: [B, N_img, C]; audio_groups: rows of the batch by person
    count (one group when all rows have the same count); token_start/token_end: this rank's real
    token range; routing: head_fn for the speaker map over the rows that have two persons (None when
    no row has).
    """

    seq_len: int
    tokens_per_frame: int
    rope: RopeFn
    sp: SequenceParallelism
    context: torch.Tensor
    context_img: torch.Tensor
    audio_groups: tuple[AudioGroup, ...]
    token_start: int
    token_end: int
    routing: HeadFn | None


class BlockCache(Protocol):
    """Optional stand-in for the block stack (TeaCache): it may run ``blocks`` or reuse a residual.

    x: [B, S_loc, C] the stack's input; e: [B, C] time embedding and e0: [B, 6, C] time modulation
    (fp32, replicated); blocks(x) runs every block. Returns the stack's output [B, S_loc, C].
    """

    def __call__(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        e0: torch.Tensor,
        blocks: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor: ...


class WanAttentionBlock(nn.Module):
    """One MultiTalk block: modulated self-attn, text/image cross-attn, audio cross-attn, modulated FFN."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.class_range = cfg.class_range
        self.class_interval = cfg.class_interval
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = (
            WanLayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        )
        self.cross_attn = WanI2VCrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.audio_cross_attn = WanAudioCrossAttention(dim, cfg.output_dim, cfg.num_heads)
        self.norm_x = (
            WanLayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.norm_input_visual else nn.Identity()
        )

    def forward(self, x: torch.Tensor, e0: torch.Tensor, inp: BlockInputs) -> torch.Tensor:
        """x: [B, S_loc, C]; e0: [B, 6, C] float32 -> [B, S_loc, C]."""
        dtype = x.dtype
        e = (self.modulation.float() + e0).chunk(6, dim=1)  # 6 x [B, 1, C] fp32

        y, stat = self.self_attn(
            (self.norm1(x).float() * (1 + e[1]) + e[0]).to(dtype), inp.seq_len, inp.rope, inp.sp, inp.routing
        )
        x = (x.float() + y.float() * e[2]).to(dtype)
        del y  # free the attention output before the cross-attentions and the FFN

        x = x + self.cross_attn(self.norm3(x), inp.context, inp.context_img)

        if inp.routing is not None and stat is None:
            raise RuntimeError("sp.attention returned no routing map although head_fn was given")
        n = inp.token_end - inp.token_start
        audio_terms = []
        for group in inp.audio_groups:
            xg = group.take(x)
            q_positions = None
            if group.routing is not None:
                if n > 0:
                    # stat holds [b2 * 3, S_loc] for the two-person rows only (this group).
                    ref_map = stat.reshape(xg.shape[0], -1, stat.shape[-1])[:, :, :n] / self.num_heads
                else:  # no real tokens on this rank: still join the min/max collectives
                    ref_map = xg.new_zeros(xg.shape[0], 3, 0).float()
                q_positions = routing_positions(ref_map, inp.sp, self.class_range, self.class_interval, dtype)
            if n > 0:
                x_a = self.audio_cross_attn(
                    self.norm_x(xg[:, :n]),
                    group.audio,
                    inp.token_start,
                    inp.tokens_per_frame,
                    q_positions,
                    group.k_positions,
                )
                audio_terms.append((group, x_a))
        if audio_terms:
            if len(audio_terms) == 1 and audio_terms[0][0].rows is None:
                x_a = audio_terms[0][1]
            else:
                x_a = x.new_empty(x.shape[0], n, x.shape[2])
                for group, term in audio_terms:
                    x_a[list(group.rows)] = term
            # Padding rows (if any) get no audio term; they are dropped at gather.
            x = x + F.pad(x_a, (0, 0, 0, x.shape[1] - n))
            del x_a, audio_terms  # not kept alive through the FFN

        y = self.ffn((self.norm2(x).float() * (1 + e[4]) + e[3]).to(dtype))
        return (x.float() + y.float() * e[5]).to(dtype)


class Head(nn.Module):
    """Output head: modulated non-affine LayerNorm + Linear to prod(patch) * out_dim, in fp32."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, S_loc, C]; e: [B, C] float32 -> [B, S_loc, prod(patch) * out_dim] float32."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return _linear_fp32(self.head, self.norm(x).float() * (1 + scale) + shift)


class MLPProj(nn.Module):
    """CLIP image tokens -> model width: LN, Linear, GELU, Linear, LN (keys ``proj.{0,1,3,4}``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            nn.LayerNorm(out_dim),
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, N_img, clip_dim] -> [B, N_img, C]."""
        return self.proj(image_embeds)


class AudioProjModel(nn.Module):
    """MultiTalk audio adapter: windowed wav2vec2 features -> context_tokens audio tokens per latent frame.

    Keys ``proj1`` (first frame, W*L*C_w -> hidden), ``proj1_vf`` (later frames, 8*L*C_w -> hidden),
    ``proj2``, ``proj3`` (hidden -> context_tokens * output_dim), ``norm`` (LayerNorm(output_dim)).
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.context_tokens = cfg.context_tokens
        self.output_dim = cfg.output_dim
        self.proj1 = nn.Linear(cfg.audio_input_dim, cfg.intermediate_dim)
        self.proj1_vf = nn.Linear(cfg.audio_input_dim_vf, cfg.intermediate_dim)
        self.proj2 = nn.Linear(cfg.intermediate_dim, cfg.intermediate_dim)
        self.proj3 = nn.Linear(cfg.intermediate_dim, cfg.context_tokens * cfg.output_dim)
        self.norm = nn.LayerNorm(cfg.output_dim) if cfg.norm_output_audio else nn.Identity()

    def forward(self, first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        """first: [N, 1, W, L, C_w]; later: [N, T_lat-1, W+vae_scale-1, L, C_w] (N = B * persons)
        -> [N, T_lat, context_tokens, output_dim]."""
        a = torch.relu(self.proj1(first.flatten(2)))  # [N, 1, hidden]
        b = torch.relu(self.proj1_vf(later.flatten(2)))  # [N, T_lat-1, hidden]
        h = torch.relu(self.proj2(torch.cat([a, b], dim=1)))
        tokens = self.proj3(h).unflatten(-1, (self.context_tokens, self.output_dim))
        if isinstance(self.norm, nn.LayerNorm):
            # fp32 LayerNorm, as InfiniteTalk does around this norm.
            w, bias = self.norm.weight.float(), self.norm.bias.float()
            return F.layer_norm(tokens.float(), self.norm.normalized_shape, w, bias, self.norm.eps).to(
                tokens.dtype
            )
        return tokens


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------


class MultiTalkDiT(nn.Module):
    """Wan2.1-I2V DiT with MultiTalk's audio adapter and per-block audio cross-attention.

    Build on the meta device for real weights (``inference.checkpoint.load_model``) or on CPU
    with ``init_weights(seed)`` for tiny random models.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        cfg = config
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)
        self.img_emb = MLPProj(cfg.clip_dim, dim)
        self.audio_proj = AudioProjModel(cfg)

    # ---- weights -------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> MultiTalkDiT:
        """Seeded random init for tiny models (upstream's scheme, except a non-zero head so the
        output depends on the input; upstream zeros it for training from scratch)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def fill(t: torch.Tensor, fn) -> None:
            # Draw on CPU with the generator so results do not depend on the device.
            tmp = torch.empty(t.shape, dtype=torch.float32)
            fn(tmp)
            t.copy_(tmp)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                fill(m.weight, lambda w: nn.init.xavier_uniform_(w, generator=gen))
                if m.bias is not None:
                    fill(m.bias, lambda b: nn.init.normal_(b, std=0.02, generator=gen))
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                fill(m.weight, lambda w: nn.init.normal_(w, mean=1.0, std=0.05, generator=gen))
                fill(m.bias, lambda b: nn.init.normal_(b, std=0.02, generator=gen))
            elif isinstance(m, WanRMSNorm):
                fill(m.weight, lambda w: nn.init.normal_(w, mean=1.0, std=0.05, generator=gen))
        w = self.patch_embedding.weight
        fill(w, lambda t: nn.init.xavier_uniform_(t.view(t.shape[0], -1), generator=gen))
        fill(self.patch_embedding.bias, lambda b: nn.init.normal_(b, std=0.02, generator=gen))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    fill(m.weight, lambda t: nn.init.normal_(t, std=0.02, generator=gen))
        dim = self.config.dim
        for block in self.blocks:
            fill(block.modulation, lambda t: nn.init.normal_(t, std=dim**-0.5, generator=gen))
        fill(self.head.modulation, lambda t: nn.init.normal_(t, std=dim**-0.5, generator=gen))
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- forward -------------------------------------------------------------------

    def _validate(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor,
        y: torch.Tensor,
        audio: torch.Tensor,
        ref_target_masks: torch.Tensor | None,
        two_persons: bool,
    ) -> None:
        cfg = self.config
        if x.ndim != 5:
            raise ModelInputError(
                "x", f"expected [B, {cfg.out_dim}, T_lat, H_lat, W_lat], got {tuple(x.shape)}"
            )
        b, _, tl, hl, wl = x.shape
        if y.ndim != 5 or y.shape[0] != b or tuple(y.shape[2:]) != (tl, hl, wl):
            raise ModelInputError("y", f"expected [B={b}, C, {tl}, {hl}, {wl}], got {tuple(y.shape)}")
        if x.shape[1] + y.shape[1] != cfg.in_dim:
            raise ModelInputError(
                "y",
                f"x has {x.shape[1]} and y {y.shape[1]} channels; together they must be in_dim={cfg.in_dim}",
            )
        pt, ph, pw = cfg.patch_size
        if tl % pt or hl % ph or wl % pw:
            raise ModelInputError(
                "x", f"latent grid {(tl, hl, wl)} is not divisible by patch_size {cfg.patch_size}"
            )
        if t.shape != (b,):
            raise ModelInputError("t", f"expected [B={b}] timesteps, got {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ModelInputError(
                "context", f"expected [B={b}, L, {cfg.text_dim}], got {tuple(context.shape)}"
            )
        if context.shape[1] > cfg.text_len:
            raise ModelInputError("context", f"{context.shape[1]} text tokens exceed text_len={cfg.text_len}")
        if clip_fea.ndim != 3 or clip_fea.shape[0] != b or clip_fea.shape[2] != cfg.clip_dim:
            raise ModelInputError(
                "clip_fea", f"expected [B={b}, N_img, {cfg.clip_dim}], got {tuple(clip_fea.shape)}"
            )
        want_tail = (cfg.audio_window, cfg.audio_layers, cfg.audio_dim)
        if audio.ndim != 6 or audio.shape[0] != b or tuple(audio.shape[3:]) != want_tail:
            raise ModelInputError(
                "audio",
                f"expected [B={b}, persons, T_frames, {', '.join(map(str, want_tail))}], got {tuple(audio.shape)}",
            )
        frames = 1 + cfg.vae_scale * (tl - 1)
        if audio.shape[2] != frames:
            raise ModelInputError(
                "audio", f"{audio.shape[2]} video frames do not match {tl} latent frames (need {frames})"
            )
        if audio.shape[1] not in (1, 2):
            raise ModelInputError("audio", f"1 or 2 persons are supported, got {audio.shape[1]}")
        if two_persons:
            if ref_target_masks is None:
                raise ModelInputError(
                    "ref_target_masks", "two persons need [3, H_lat, W_lat] person/background masks"
                )
            if ref_target_masks.shape != (3, hl, wl):
                raise ModelInputError(
                    "ref_target_masks",
                    f"expected [3, {hl}, {wl}] (person 1, person 2, background), got "
                    f"{tuple(ref_target_masks.shape)}",
                )

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """Windowed wav2vec2 features -> audio tokens, persons concatenated along tokens.

        Args:
            audio: [B, n_person, T_frames, W, L, C_w].

        Returns:
            [B, T_lat, n_person * context_tokens, output_dim] (person 1's tokens first).
        """
        b, n = audio.shape[:2]
        dtype = self.audio_proj.proj1.weight.dtype
        first, later = pack_audio_windows(audio.to(dtype), self.config.vae_scale)
        tokens = self.audio_proj(first.flatten(0, 1), later.flatten(0, 1))  # [B*n, T_lat, M, C_a]
        tokens = tokens.unflatten(0, (b, n))  # [B, n, T_lat, M, C_a]
        return tokens.permute(0, 2, 1, 3, 4).flatten(2, 3)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor,
        y: torch.Tensor,
        audio: torch.Tensor,
        ref_target_masks: torch.Tensor | None = None,
        sp: SequenceParallelism | None = None,
        *,
        persons: Sequence[int] | None = None,
        cache: BlockCache | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity.

        Args:
            x: [B, 16, T_lat, H_lat, W_lat] noisy latent.
            t: [B] timesteps in [0, 1000].
            context: [B, L_txt <= text_len, text_dim] T5 features (zero-padded to text_len here).
            clip_fea: [B, 257, clip_dim] CLIP penultimate-layer tokens.
            y: [B, 20, T_lat, H_lat, W_lat] mask (4) + conditioning latent (16).
            audio: [B, n_person, T_frames, 5, 12, audio_dim] windowed wav2vec2 features,
                T_frames = 4 * (T_lat - 1) + 1; n_person 1 (single person or null audio: no
                L-RoPE) or 2 (L-RoPE speaker routing).
            ref_target_masks: [3, H_lat, W_lat] person 1 / person 2 / background masks at latent
                resolution (required for two persons, ignored for one).
            sp: sequence parallelism; ``NoParallel()`` when None.
            persons: per batch row, how many of ``audio``'s persons are real (1 or n_person; default
                all): the guidance branches of one step run as one batch, and the silent branches
                have one person (no L-RoPE) while the others have two. Row i uses ``audio[i, :persons[i]]``.
            cache: optional stand-in for the block stack (TeaCache, ``BlockCache``).

        Returns:
            [B, 16, T_lat, H_lat, W_lat] float32.
        """
        sp = NoParallel() if sp is None else sp
        cfg = self.config
        persons = self._persons(audio, persons)
        self._validate(x, t, context, clip_fea, y, audio, ref_target_masks, 2 in persons)
        dtype = self.patch_embedding.weight.dtype

        # patch embedding: [B, 36, T, H, W] -> [B, S, C]
        # One row at a time, as upstream: conv3d kernels differ by batch size, and the guidance branches
        # of a step, batched, must match their one-row forwards.
        xy = torch.cat([x, y], dim=1).to(dtype)
        tokens = torch.cat([self.patch_embedding(row[None]) for row in xy])
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2)
        seq_len = math.prod(grid)
        tokens_per_frame = grid[1] * grid[2]

        # time embedding, fp32 as upstream: e [B, C], e0 [B, 6, C]. Row by row: a matrix-vector product
        # and a matrix product round differently, and batched guidance rows must match one-row forwards.
        s = sinusoidal_embedding_1d(cfg.freq_dim, t)
        e = torch.cat(
            [
                _linear_fp32(self.time_embedding[2], F.silu(_linear_fp32(self.time_embedding[0], r[None])))
                for r in s
            ]
        )
        e0 = torch.cat([_linear_fp32(self.time_projection[1], F.silu(r[None])) for r in e]).unflatten(
            1, (6, cfg.dim)
        )

        # text (zero-padded to text_len before the embedding, as upstream) and CLIP context
        context = F.pad(context.to(dtype), (0, 0, 0, cfg.text_len - context.shape[1]))
        context = self.text_embedding(context)
        context_img = self.img_emb(clip_fea.to(dtype))

        # audio tokens per person count: [b, T_lat, N_a, C_a] for the rows of each group
        groups = []
        routing = None
        for count in sorted(set(persons)):
            rows = tuple(i for i, p in enumerate(persons) if p == count)
            if len(rows) == len(persons):
                rows = None  # every row: no gather
            group_audio = audio if rows is None else audio[list(rows)]
            tokens_g = self.embed_audio(group_audio[:, :count]).to(dtype)
            group_routing = k_positions = None
            if count == 2:
                masks = F.interpolate(ref_target_masks[None].float(), size=grid[1:], mode="nearest")[0] > 0
                group_routing = routing = _rows_head_fn(routing_head_fn(masks.flatten(1).to(x.device)), rows)
                k_positions = audio_key_positions(
                    tokens_g.shape[2], 1, cfg.class_range, cfg.class_interval
                ).to(x.device)
            groups.append(AudioGroup(rows, tokens_g, group_routing, k_positions))

        cos, sin = rope_3d_tables(cfg.head_dim, grid, device=x.device)

        def rope(u: torch.Tensor, start: int = 0) -> torch.Tensor:
            n = u.shape[1]
            return rotate_pairs(u, cos[start : start + n], sin[start : start + n])

        start, end = sp.token_range(seq_len)
        inputs = BlockInputs(
            seq_len=seq_len,
            tokens_per_frame=tokens_per_frame,
            rope=rope,
            sp=sp,
            context=context,
            context_img=context_img,
            audio_groups=tuple(groups),
            token_start=start,
            token_end=end,
            routing=routing,
        )

        def run_blocks(h: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                h = block(h, e0, inputs)
            return h

        h = sp.shard(tokens)
        del xy, tokens  # under sequence parallelism the shard is a copy: drop the full sequence
        if end - start > h.shape[1]:
            raise RuntimeError(f"sp.token_range gave {end - start} tokens but the shard holds {h.shape[1]}")
        h = run_blocks(h) if cache is None else cache(h, e, e0, run_blocks)
        out = sp.gather(self.head(h, e), seq_len)  # [B, S, prod(patch) * out_dim] fp32
        return self.unpatchify(out, grid)

    @staticmethod
    def _persons(audio: torch.Tensor, persons: Sequence[int] | None) -> tuple[int, ...]:
        """Per-row person counts, checked: each 1 or ``audio.shape[1]``."""
        if audio.ndim < 2:
            raise ModelInputError("audio", f"expected [B, n_person, ...], got {tuple(audio.shape)}")
        b, n = audio.shape[:2]
        if persons is None:
            return (n,) * b
        counts = tuple(int(p) for p in persons)
        if len(counts) != b or any(p not in (1, n) for p in counts):
            raise ModelInputError("persons", f"expected {b} counts, each 1 or {n}, got {list(persons)}")
        return counts

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, pt*ph*pw*c] -> [B, c, f*pt, h*ph, w*pw]."""
        b = x.shape[0]
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        u = x.reshape(b, f, h, w, pt, ph, pw, c)
        u = u.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return u.reshape(b, c, f * pt, h * ph, w * pw)


def _rows_head_fn(head_fn: HeadFn, rows: tuple[int, ...] | None) -> HeadFn:
    """A routing head_fn evaluated only on batch ``rows`` (all rows when None): [len(rows) * 3, S]."""
    if rows is None:
        return head_fn
    index = list(rows)

    def on_rows(q: torch.Tensor, k: torch.Tensor, head_start: int) -> torch.Tensor:
        return head_fn(q[index], k[index], head_start)

    return on_rows


def compile_unavailable(device_type: str) -> str | None:
    """Why torch.compile's default backend (inductor) cannot run on ``device_type`` here, or None."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device_type == "cuda":
        from torch.utils._triton import has_triton  # inductor's own check for its GPU code generator

        return None if has_triton() else "triton is not installed"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return "no C++ compiler found for inductor's CPU code"
    return None


def compile_blocks(model: MultiTalkDiT, backend: str = "inductor", device_type: str | None = None) -> str:
    """``torch.compile`` every transformer block in place (``nn.Module.compile``: state-dict keys and
    FSDP2 wrapping stay as they are). Returns the backend in use, or ``"eager"`` when the backend cannot
    run on this machine (the reason is logged and the model runs uncompiled)."""
    device_type = device_type or next(model.parameters()).device.type
    if backend == "inductor":
        reason = compile_unavailable(device_type)
        if reason is not None:
            logger.warning("--compile: %s; running the blocks uncompiled", reason)
            return "eager"
    for block in model.blocks:
        block.compile(backend=backend, dynamic=False)
    logger.info("compiled %d transformer blocks with torch.compile (backend %s)", len(model.blocks), backend)
    return backend


def build_model(config: DiTConfig, device: torch.device | str = "meta") -> MultiTalkDiT:
    """Construct without initialising real storage when ``device`` is ``"meta"``."""
    with torch.device(device):
        return MultiTalkDiT(config)
