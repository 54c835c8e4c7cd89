"""``distributed_app.py --selftest``: the sequence-parallel DiT at P ranks against one process.

Every rank builds the same seeded MultiTalk-shaped model (40 heads like the real one, so any
Ulysses size the real model allows works here) and computes the single-process reference itself.
Then the same inputs run under Ulysses over all ranks, with the model replicated and with FSDP2
(full and keep), on a token grid whose length (21 tokens, 7 per latent frame) needs padding for
P in {2, 4, 5, 8} and puts rank boundaries mid-frame. The largest difference over all ranks and
variants is printed as one line; more than the tolerance (1e-5 in fp32 on CPU) fails.

The ranks run the layout the flags give (``--ulysses_size``, ``--ring_size``, ``--cfg_parallel``): with a
ring, the forward also runs once with the log-sum-exp rescale of the running output left out, and that
negative control must exceed the tolerance; with guidance groups, every group runs the forward and the
per-step all-gather of the branch predictions is checked.

``dtype=torch.bfloat16`` (``launch/selftest.sh N --dtype bf16``) runs the same comparison with the
model in bf16, as the GPU service runs it (on CUDA with flash-attn when it is installed). The
tolerance comes from bf16's machine epsilon: each bf16 run is within one bf16 step of the exact
result at the output's largest magnitude, so two runs may differ by ``BF16_STEPS`` steps,
``2 * eps * max|reference|``. The bf16 reference must also stay within that of the fp32 one (a kernel
that is wrong at P=1 too would pass the P-vs-1 comparison). The speaker-routing (L-RoPE) positions,
rounded to bf16 as upstream computes them, are compared token by token: each must be a bf16 value and
differ from one process's by at most one bf16 step at its magnitude (a step flip where a score sits
on a rounding boundary). Subtle errors below bf16's rounding are the fp32 run's job.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from inference.model.attention import attention_kernel_for, set_attention_kernel
from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT
from inference.model.sp import NoParallel, SequenceParallelism
from inference.parallel.context import ParallelContext
from inference.parallel.fsdp import apply_fsdp
from inference.parallel.ring import UnifiedSequenceParallel

logger = logging.getLogger(__name__)

GRID = (3, 2, 14)  # latent T, H, W -> 3 x 1 x 7 = 21 tokens
CPU_TOLERANCE = 1e-5
CUDA_TOLERANCE = 1e-3  # fp32 with TF32 off; kernels differ in summation order
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7: one bf16 step at magnitude 1
BF16_STEPS = 2  # two bf16 runs, each within one step of the exact result


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
def run_selftest(ctx: ParallelContext, dtype: torch.dtype = torch.float32) -> tuple[bool, float, str]:
    """Returns (ok, max_abs_diff over all ranks, a one-line report). ``dtype``: fp32 or bf16."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"selftest dtype must be float32 or bfloat16, got {dtype}")
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cfg = selftest_config()
    model = MultiTalkDiT(cfg).init_weights(seed=0).to(ctx.device).eval().requires_grad_(False)
    inputs = _inputs(cfg, ctx.device)
    fp32_reference = None
    if dtype == torch.bfloat16:
        fp32_reference = model(**inputs, sp=NoParallel())
        model = model.to(dtype)
    with _routing_positions(model) as reference_positions:
        reference = model(**inputs, sp=NoParallel())
    kernel = attention_kernel_for(torch.empty(0, dtype=dtype, device=ctx.device))
    kernel_diff = None
    if kernel != "sdpa":  # a GPU with flash-attn: the same forward through torch SDPA
        set_attention_kernel("sdpa")
        try:
            kernel_diff = (model(**inputs, sp=NoParallel()) - reference).abs().max().item()
        finally:
            set_attention_kernel("auto")
    sp = ctx.sequence_parallel()
    with _routing_positions(model) as positions:
        diffs = {"replicated": (model(**inputs, sp=sp) - reference).abs().max().item()}
    routing = [_position_counts(positions, reference_positions, ctx.device)]
    if ctx.distributed:
        for mode in ("full", "keep"):
            sharded = apply_fsdp(copy.deepcopy(model), ctx.mesh, mode, param_dtype=dtype)
            with _routing_positions(sharded) as positions:
                out = sharded(**inputs, sp=sp)
            out_again = sharded(**inputs, sp=sp)  # full re-gathers resharded weights, keep reuses them
            routing.append(_position_counts(positions, reference_positions, ctx.device))
            diffs[f"fsdp_{mode}"] = max(
                (out - reference).abs().max().item(), (out_again - reference).abs().max().item()
            )
    control = _ring_negative_control(ctx, model, inputs, sp, reference)
    layout_ok, layout_note = _guidance_check(ctx)
    worst = torch.tensor([max(diffs.values())], dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=ctx.data)
    max_diff = float(worst.item())
    seq_len = GRID[0] * (GRID[1] // 2) * (GRID[2] // 2)
    detail = " ".join(f"{k}={v:.2e}" for k, v in diffs.items())
    finite = all(v == v for v in diffs.values())  # NaN fails too
    if dtype == torch.float32:
        tolerance = CUDA_TOLERANCE if ctx.device.type == "cuda" else CPU_TOLERANCE
        ok = max_diff <= tolerance and finite and layout_ok and (control is None or control > tolerance)
        word = "ok" if ok else "FAILED"
        line = (
            f"selftest {word} max_abs_diff={max_diff:.3e} ranks={ctx.world_size} device={ctx.device.type} "
            f"tokens={seq_len} tolerance={tolerance:g} ({detail} on rank 0){layout_note}"
            f"{_control_note(control, tolerance)}"
        )
        return ok, max_diff, line
    scale = reference.abs().max().item()
    tolerance = BF16_STEPS * BF16_EPS * scale
    assert fp32_reference is not None
    vs_fp32 = (reference - fp32_reference).abs().max().item()
    counts = torch.stack(routing).sum(0)  # [tokens, flips, beyond one step, not bf16] over variants
    if ctx.distributed:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=ctx.data)
    tokens, flips, beyond, unrounded = (int(c) for c in counts.tolist())
    ok = finite and max_diff <= tolerance and vs_fp32 <= tolerance and tokens > 0 and beyond == unrounded == 0
    ok = ok and layout_ok and (control is None or control > tolerance)
    if kernel_diff is not None:
        ok = ok and kernel_diff <= tolerance
        kernel += f" {kernel}_vs_sdpa={kernel_diff:.3e}"
    elif ctx.device.type == "cuda":
        kernel += "(no flash-attn installed)"
    word = "ok" if ok else "FAILED"
    line = (
        f"selftest {word} dtype=bf16 max_abs_diff={max_diff:.3e} ranks={ctx.world_size} "
        f"device={ctx.device.type} attention={kernel} tokens={seq_len} "
        f"tolerance={tolerance:.3e} (= {BF16_STEPS} x bf16 eps {BF16_EPS:g} x max|reference| {scale:.3f}) "
        f"bf16_vs_fp32={vs_fp32:.3e} routing_positions={tokens} one_step_flips={flips} "
        f"beyond_one_step={beyond} not_bf16={unrounded} ({detail} on rank 0){layout_note}"
        f"{_control_note(control, tolerance)}"
    )
    return ok, max_diff, line


@contextmanager
def _routing_positions(model: torch.nn.Module) -> Iterator[dict[int, tuple[int, torch.Tensor]]]:
    """Collect, per block, ``(start, q_positions [B, n])`` of the audio cross-attention calls of
    ``model`` (the speaker-routing L-RoPE positions of this rank's tokens, global index ``start``)."""
    seen: dict[int, tuple[int, torch.Tensor]] = {}
    handles = []
    for index, block in enumerate(model.blocks):
        signature = inspect.signature(block.audio_cross_attn.forward)

        def hook(_module, args, kwargs, index=index, signature=signature) -> None:
            bound = signature.bind(*args, **kwargs).arguments
            if bound.get("q_positions") is not None:
                seen[index] = (int(bound["start"]), bound["q_positions"].detach().float().clone())

        handles.append(block.audio_cross_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _bf16_step(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at magnitude ``x`` (normal range)."""
    tiny = torch.finfo(torch.bfloat16).tiny
    return BF16_EPS * torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=tiny))))


def _position_counts(
    positions: dict[int, tuple[int, torch.Tensor]],
    reference: dict[int, tuple[int, torch.Tensor]],
    device: torch.device,
) -> torch.Tensor:
    """[tokens compared, differing by one bf16 step, differing by more, not a bf16 value] (float64)."""
    counts = torch.zeros(4, dtype=torch.float64)
    for index, (start, pos) in positions.items():
        ref = reference[index][1][:, start : start + pos.shape[1]]
        diff = (pos - ref).abs()
        step = torch.maximum(_bf16_step(ref), _bf16_step(pos))
        counts += torch.tensor(
            [
                pos.numel(),
                int(((diff > 0) & (diff <= step)).sum()),
                int((diff > step).sum()),
                int((pos != pos.to(torch.bfloat16).float()).sum()),
            ],
            dtype=torch.float64,
        )
    return counts.to(device)


def _ring_negative_control(
    ctx: ParallelContext,
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    sp: SequenceParallelism,
    reference: torch.Tensor,
) -> float | None:
    """Under ring attention, the same forward with the log-sum-exp rescale of the running output left
    out; the smallest difference over all ranks, which must exceed the tolerance. None without a ring."""
    if not isinstance(sp, UnifiedSequenceParallel):
        return None
    sp._rescale = False
    try:
        diff = (model(**inputs, sp=sp) - reference).abs().max().double()
    finally:
        sp._rescale = True
    least = diff.reshape(1).to(ctx.device)
    dist.all_reduce(least, op=dist.ReduceOp.MIN, group=ctx.data)
    return float(least.item())


def _control_note(control: float | None, tolerance: float) -> str:
    if control is None:
        return ""
    verdict = "fails as it must" if control > tolerance else "DID NOT FAIL"
    return f" negative_control(ring without LSE rescale)={control:.3e} {verdict}"


def _guidance_check(ctx: ParallelContext) -> tuple[bool, str]:
    """The layout in the report line and, with guidance groups, the per-step all-gather of 3 and 2
    branches (each group's share, returned in branch order on every rank)."""
    layout = ctx.parallel_layout
    note = f" layout=({layout.describe()})"
    guidance = ctx.guidance_parallel()
    if guidance is None:
        return True, note
    latent = torch.arange(24, dtype=torch.float32, device=ctx.device).view(2, 3, 2, 2)
    t = torch.ones(1, device=ctx.device)
    ok = True
    for branches in (("cond", "drop_text", "uncond"), ("cond", "drop_audio")):

        def evaluate(
            x: torch.Tensor, _t: torch.Tensor, share: tuple[str, ...], names=branches
        ) -> torch.Tensor:
            return torch.stack([x * (1 + names.index(b)) for b in share])

        got = guidance.wrap(evaluate)(latent, t, branches)
        expected = torch.stack([latent * (1 + j) for j in range(len(branches))])
        ok = ok and torch.equal(got, expected)
    flag = torch.tensor([0.0 if ok else 1.0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.data)
    ok = flag.item() == 0.0
    return ok, note + f" guidance_all_gather={'ok' if ok else 'FAILED'}"
