"""``distributed_app.py --selftest``: the sequence-parallel DiT at P ranks against one process.

Every rank builds the same seeded MultiTalk-shaped model (40 heads like the real one, so any
Ulysses size the real model allows works here) and computes the single-process reference itself.
Then the same inputs run under Ulysses over all ranks, with the model replicated and with FSDP2
(full and keep), on a token grid whose length (21 tokens, 7 per latent frame) needs padding for
P in {2, 4, 5, 8} and puts rank boundaries mid-frame. The largest difference over all ranks and
variants is printed as one line; more than the tolerance (1e-5 in fp32 on CPU) fails.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
import torch.distributed as dist

from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT
from inference.model.sp import NoParallel
from inference.parallel.context import ParallelContext

logger = logging.getLogger(__name__)

GRID = (3, 2, 14)  # latent T, H, W -> 3 x 1 x 7 = 21 tokens
CPU_TOLERANCE = 1e-5
CUDA_TOLERANCE = 1e-3  # fp32 with TF32 off; kernels differ in summation order


def selftest_config() -> DiTConfig:
    """Tiny widths, but the real head count (40) so every allowed Ulysses size is testable."""
    return dataclasses.replace(DiTConfig.tiny(), num_heads=40, dim=640, ffn_dim=640)


def _inputs(cfg: DiTConfig, device: torch.device, seed: int = 11) -> dict[str, torch.Tensor]:
    t_lat, h, w = GRID
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2 - 1] = 1
    masks[1, :, w // 2 + 1 :] = 1
    masks[2] = 1 - masks[0] - masks[1]
    frames = 1 + cfg.vae_scale * (t_lat - 1)
    values = dict(
        x=torch.randn(1, 16, t_lat, h, w, generator=g),
        t=torch.tensor([613.0]),
        context=torch.randn(1, 7, cfg.text_dim, generator=g),
        clip_fea=torch.randn(1, 257, cfg.clip_dim, generator=g),
        y=torch.randn(1, 20, t_lat, h, w, generator=g),
        audio=torch.randn(1, 2, frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g),
        ref_target_masks=masks,
    )
    return {k: v.to(device) for k, v in values.items()}


@torch.no_grad()
def run_selftest(ctx: ParallelContext) -> tuple[bool, float, str]:
    """Returns (ok, max_abs_diff over all ranks, a one-line report)."""
    from inference.parallel.fsdp import apply_fsdp

    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cfg = selftest_config()
    model = MultiTalkDiT(cfg).init_weights(seed=0).to(ctx.device).eval().requires_grad_(False)
    inputs = _inputs(cfg, ctx.device)
    reference = model(**inputs, sp=NoParallel())
    sp = ctx.sequence_parallel()
    diffs = {"replicated": (model(**inputs, sp=sp) - reference).abs().max().item()}
    if ctx.distributed:
        for mode in ("full", "keep"):
            sharded = apply_fsdp(copy.deepcopy(model), ctx.mesh, mode, param_dtype=torch.float32)
            out = sharded(**inputs, sp=sp)
            out_again = sharded(**inputs, sp=sp)  # full re-gathers resharded weights, keep reuses them
            diffs[f"fsdp_{mode}"] = max(
                (out - reference).abs().max().item(), (out_again - reference).abs().max().item()
            )
    worst = torch.tensor([max(diffs.values())], dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=ctx.data)
    max_diff = float(worst.item())
    tolerance = CUDA_TOLERANCE if ctx.device.type == "cuda" else CPU_TOLERANCE
    seq_len = GRID[0] * (GRID[1] // 2) * (GRID[2] // 2)
    detail = " ".join(f"{k}={v:.2e}" for k, v in diffs.items())
    ok = max_diff <= tolerance and all(v == v for v in diffs.values())  # NaN fails too
    word = "ok" if ok else "FAILED"
    line = (
        f"selftest {word} max_abs_diff={max_diff:.3e} ranks={ctx.world_size} device={ctx.device.type} "
        f"tokens={seq_len} tolerance={tolerance:g} ({detail} on rank 0)"
    )
    return ok, max_diff, line
