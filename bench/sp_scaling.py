"""Sequence-parallel scaling: bytes per sampling step per rank of each layout (14B by formula; a small config
on CPU, measured), then one DiT forward at P=1 and at P=world timed on CPU (gloo, one thread per rank).

Layouts (``inference.parallel.layout``): Ulysses U; Ulysses U x ring R (keys and values circulate over R
Ulysses groups, ``--ring_size``); guidance-parallel (``--cfg_parallel``: G groups, each runs its share of
the 3 guidance branches of a step, then one all-gather of the predictions). Per block and forward a rank
sends

    all-to-all   4 * S_loc * C * b * (U - 1) / U    q, k, v in and the output back, inside its Ulysses group
    ring p2p     2 * S_loc * C * b * (R - 1)         its ring chunk's k and v (C/U channels x U S_loc tokens)
    routing      12 * S_loc * (U - 1) + 48 (P-1)/P   fp32 routing-map reduce-scatter and min/max (two persons)

with S_loc = ceil(S / (U R)) and b bytes per activation, plus per forward the gather of the head output
(64 fp32 per token: (P - 1) S_loc x 256 bytes) and per step ceil(3 / G) latents x (G - 1) for the guidance
all-gather. A step is the 3 branches (cond and drop_text with two persons, uncond with one); with G groups
the rank in group 0 runs ceil(3 / G) of them. Ulysses alone cannot use 16 ranks with 40 heads (16 does
not divide 40); Ulysses 8 x ring 2 can, and with 8 GPUs per node only the ring's transfers (and the small
final gather) leave a node.

The measured part runs the real ``MultiTalkDiT`` with a narrow config (dim 512, 8 heads of 64, FFN 1536,
4 blocks) on 4 gloo ranks, one step of 3 branches per layout, and prints rank 0's counted bytes
(``comm_bytes`` of its sp and guidance objects) next to the formula for the same shape.

The timing part (skip with ``--skip_timing``) compares one forward at P=1 and Ulysses P=world on a
480x832 latent grid of 3 latent frames (3 x 30 x 52 = 4680 tokens, two persons). CPU timings are a
sanity check of the code path, not a GPU prediction: with 2 cores, P=2 can at best halve the time, and
gloo over loopback is far slower than NVLink.

    python bench/sp_scaling.py [--world 2] [--frames 3] [--height 60] [--width 104] [--repeats 2] [--skip_timing]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT
from inference.model.sp import NoParallel
from inference.parallel.cfg import one_by_one
from inference.parallel.context import ParallelContext
from inference.parallel.layout import ParallelLayout
from inference.parallel.ulysses import SequenceParallel
from inference.scene.buckets import DEFAULT_SCENE_ASPECT, bucket_for_aspect

CONFIG = DiTConfig(dim=512, ffn_dim=1536, num_heads=8, num_layers=4, freq_dim=256)
BRANCHES = ("cond", "drop_text", "uncond")  # the 3-pass step; uncond has one (silent) person
TWO_PERSONS = {"cond": True, "drop_text": True, "uncond": False}
LATENT_FRAMES_14B = 21  # 81 video frames
GIB = 2**30


# ---- formula ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the byte counts depend on: S tokens, the model width and depth, the latent, bytes per activation."""

    tokens: int
    dim: int
    layers: int
    latent_numel: int
    act_bytes: int
    head_out: int = 64  # prod(patch) * out_dim values per token, fp32


def shape_14b(size: int) -> tuple[Shape, str]:
    """The 14B model at the default two-person scene bucket of ``size`` (480 or 720), bf16 activations."""
    h, w = bucket_for_aspect(DEFAULT_SCENE_ASPECT, size)
    per_frame = (h // 16) * (w // 16)
    latent = 16 * LATENT_FRAMES_14B * (h // 8) * (w // 8)
    cfg = DiTConfig.multitalk_14b()
    shape = Shape(LATENT_FRAMES_14B * per_frame, cfg.dim, cfg.num_layers, latent, 2)
    return shape, f"{size}p ({w}x{h}, S = {LATENT_FRAMES_14B} x {per_frame} = {shape.tokens} tokens)"


def forward_bytes(shape: Shape, layout: ParallelLayout, two_persons: bool) -> dict[str, float]:
    """Bytes one rank sends in one forward, by kind (the formula in the module docstring)."""
    u, r = layout.ulysses, layout.ring
    p = u * r
    out = dict.fromkeys(("all_to_all", "ring_p2p", "routing", "gather"), 0.0)
    if p == 1:
        return out
    s_loc = math.ceil(shape.tokens / p)
    c, b, n = shape.dim, shape.act_bytes, shape.layers
    out["all_to_all"] = n * 4 * s_loc * c * b * (u - 1) / u
    out["ring_p2p"] = n * 2 * s_loc * c * b * (r - 1)
    if two_persons:
        out["routing"] = n * (12 * s_loc * (u - 1) + 2 * 24 * (p - 1) / p)
    out["gather"] = s_loc * shape.head_out * 4 * (p - 1)
    return out


def step_bytes(shape: Shape, layout: ParallelLayout) -> tuple[dict[str, float], int]:
    """Bytes the rank in guidance group 0 sends in one 3-branch step, and its forwards per step."""
    mine = BRANCHES[0 :: layout.cfg]
    total = dict.fromkeys(("all_to_all", "ring_p2p", "routing", "gather", "cfg_gather"), 0.0)
    for branch in mine:
        for kind, value in forward_bytes(shape, layout, TWO_PERSONS[branch]).items():
            total[kind] += value
    if layout.cfg > 1:
        slots = math.ceil(len(BRANCHES) / layout.cfg)
        total["cfg_gather"] = slots * shape.latent_numel * 4 * (layout.cfg - 1)
    return total, len(mine)


FORMULA_LAYOUTS = [
    ParallelLayout(ulysses=8),
    ParallelLayout(ulysses=4, ring=2),
    ParallelLayout(ulysses=8, ring=2),
    ParallelLayout(ulysses=2, cfg=3),
    ParallelLayout(ulysses=4, cfg=2),
    ParallelLayout(ulysses=8, cfg=2),
    ParallelLayout(ulysses=8, cfg=3),
]


def print_formula() -> None:
    print("== 14B (dim 5120, 40 blocks, bf16), bytes per sampling step (3 branches) per rank, by formula ==")
    for size in (480, 720):
        shape, label = shape_14b(size)
        print(f"-- {label}")
        base = None
        print(f"  {'layout':40s} {'ranks':>5s} {'fwd/step':>8s} {'all-to-all':>10s} {'ring p2p':>9s} "
              f"{'routing+gather':>14s} {'cfg gather':>10s} {'total GiB':>9s} {'vs U8':>6s}")  # fmt: skip
        for layout in FORMULA_LAYOUTS:
            parts, forwards = step_bytes(shape, layout)
            total = sum(parts.values())
            base = total if base is None else base
            small = parts["routing"] + parts["gather"]
            print(f"  {layout.describe():40s} {layout.world_size:5d} {forwards:8d} "
                  f"{parts['all_to_all'] / GIB:10.3f} {parts['ring_p2p'] / GIB:9.3f} {small / GIB:14.4f} "
                  f"{parts['cfg_gather'] / GIB:10.4f} {total / GIB:9.3f} {total / base:6.2f}")  # fmt: skip
    print(
        "  (GiB per rank per step; with 8 GPUs per node, Ulysses 8 x ring 2 keeps every all-to-all inside a"
    )
    print(
        "   node: only its ring p2p crosses. Guidance groups cut the forwards per rank instead of the bytes.)"
    )


# ---- measured (CPU, small config) ------------------------------------------------------------------

MEASURED_WORLD = 4
MEASURED_LAYOUTS = [
    ParallelLayout(ulysses=4),
    ParallelLayout(ulysses=2, ring=2),
    ParallelLayout(ulysses=1, ring=4),
    ParallelLayout(ulysses=2, cfg=2),
    ParallelLayout(ulysses=1, cfg=2, ring=2),
]
MEASURED_GRID = (3, 16, 24)  # latent T, H, W -> 3 x 8 x 12 = 288 tokens


def make_inputs(frames: int, height: int, width: int) -> dict[str, torch.Tensor]:
    cfg = CONFIG
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, height, width)
    masks[0, :, : width // 3] = 1
    masks[1, :, 2 * width // 3 :] = 1
    masks[2] = 1 - masks[0] - masks[1]
    n_frames = 1 + cfg.vae_scale * (frames - 1)
    return dict(
        x=torch.randn(1, 16, frames, height, width, generator=g),
        t=torch.tensor([500.0]),
        context=torch.randn(1, cfg.text_len, cfg.text_dim, generator=g),
        clip_fea=torch.randn(1, 257, cfg.clip_dim, generator=g),
        y=torch.randn(1, 20, frames, height, width, generator=g),
        audio=torch.randn(1, 2, n_frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g),
        ref_target_masks=masks,
    )


def _measure_rank(ctx: ParallelContext, q) -> None:
    """Every layout in turn: one 3-branch step; rank 0 reports its counted bytes per kind."""
    model = MultiTalkDiT(CONFIG).init_weights(seed=0).eval().requires_grad_(False)
    inputs = make_inputs(*MEASURED_GRID)
    silent = torch.zeros_like(inputs["audio"][:, :1])
    report = []
    for layout in MEASURED_LAYOUTS:
        lctx = ctx.with_layout(layout)
        sp, guidance = lctx.sequence_parallel(), lctx.guidance_parallel()

        def model_fn(latent: torch.Tensor, t: torch.Tensor, branch: str, sp=sp) -> torch.Tensor:
            two = TWO_PERSONS[branch]
            audio = inputs["audio"] if two else silent
            masks = inputs["ref_target_masks"] if two else None
            args = (latent[None], t, inputs["context"], inputs["clip_fea"], inputs["y"], audio, masks)
            return model(*args, sp=sp)[0]

        evaluate = one_by_one(model_fn)
        if guidance is not None:
            evaluate = guidance.wrap(evaluate)
        with torch.no_grad():
            evaluate(inputs["x"][0], inputs["t"], BRANCHES)
        counted = dict(getattr(sp, "comm_bytes", {}))
        counted["cfg_gather"] = guidance.comm_bytes["all_gather"] if guidance is not None else 0
        report.append((layout, counted))
    if ctx.rank == 0:
        q.put(report)


def _spawned(rank: int, world: int, port: int, target, args: tuple, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    ctx = ParallelContext.from_env(device="cpu", data_timeout=600, control_timeout=600)
    target(ctx, *args, q)
    ctx.destroy()


def spawn(world: int, target, *args) -> list:
    """Run ``target(ctx, *args, queue)`` on ``world`` gloo ranks; return what the ranks put on the queue."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = [ctx.Process(target=_spawned, args=(r, world, port, target, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = []
    while len(results) < world and any(p.is_alive() for p in procs) or not q.empty():
        try:
            results.append(q.get(timeout=1.0))
        except Exception:  # queue.Empty: keep waiting while ranks run
            continue
    for p in procs:
        p.join(60)
    return results


def print_measured() -> None:
    t_lat, h, w = MEASURED_GRID
    tokens = t_lat * (h // 2) * (w // 2)
    latent = 16 * t_lat * h * w
    shape = Shape(tokens, CONFIG.dim, CONFIG.num_layers, latent, 4)
    print(f"\n== measured on CPU: dim {CONFIG.dim}, {CONFIG.num_heads} heads, {CONFIG.num_layers} blocks, fp32, "
          f"S = {tokens} tokens, {MEASURED_WORLD} gloo ranks; rank 0, one 3-branch step ==")  # fmt: skip
    (report,) = spawn(MEASURED_WORLD, _measure_rank)
    print(f"  {'layout':40s} {'all-to-all':>10s} {'ring p2p':>9s} {'routing+gather':>14s} {'cfg gather':>10s} "
          f"{'total KiB':>10s} {'formula KiB':>11s} {'measured/formula':>16s}")  # fmt: skip
    for layout, counted in report:
        formula, _ = step_bytes(shape, layout)
        small = sum(counted.get(k, 0) for k in ("reduce_scatter", "all_reduce", "all_gather"))
        total = sum(counted.values())
        expected = sum(formula.values())
        print(f"  {layout.describe():40s} {counted.get('all_to_all', 0) / 1024:10.1f} "
              f"{counted.get('ring_p2p', 0) / 1024:9.1f} {small / 1024:14.2f} {counted['cfg_gather'] / 1024:10.1f} "
              f"{total / 1024:10.1f} {expected / 1024:11.1f} {total / expected:16.4f}")  # fmt: skip


# ---- timing (Ulysses, P=1 vs P=world) --------------------------------------------------------------


def timed_forwards(sp, args: argparse.Namespace) -> tuple[float, float, torch.Tensor]:
    """Best wall time and best CPU time (this process) per forward, and the output."""
    model = MultiTalkDiT(CONFIG).init_weights(seed=0).eval().requires_grad_(False)
    inputs = make_inputs(args.frames, args.height, args.width)
    with torch.no_grad():
        out = model(**inputs, sp=sp)  # warm-up
        if isinstance(sp, SequenceParallel):
            sp.comm_bytes = dict.fromkeys(sp.comm_bytes, 0)
        times, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(**inputs, sp=sp)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return min(times), min(cpu), out


def _timing_rank(ctx: ParallelContext, args: argparse.Namespace, q) -> None:
    sp = ctx.sequence_parallel()
    seconds, cpu, out = timed_forwards(sp, args)
    per_forward = {k: v // args.repeats for k, v in sp.comm_bytes.items()}
    q.put((ctx.rank, seconds, per_forward, out if ctx.rank == 0 else None, cpu))


def print_timing(args: argparse.Namespace) -> None:
    seq = args.frames * (args.height // 2) * (args.width // 2)
    p, c, nbytes = args.world, CONFIG.dim, 4
    print(f"\n== timing: one forward, Ulysses P=1 vs P={p}, fp32, S = {args.frames} x {args.height // 2} x "
          f"{args.width // 2} = {seq} tokens; one thread per rank ==")  # fmt: skip
    t1, c1, ref = timed_forwards(NoParallel(), args)
    print(f"P=1: {t1:.3f} s / forward (CPU {c1:.3f} s)")

    results = sorted(spawn(p, _timing_rank, args), key=lambda r: r[0])
    tp = max(r[1] for r in results)  # the slowest rank sets the pace
    diff = (results[0][3] - ref).abs().max().item()
    cp = max(r[4] for r in results)
    print(
        f"P={p}: {tp:.3f} s / forward (slowest rank; per rank {[round(r[1], 3) for r in results]}; "
        f"CPU per rank {[round(r[4], 3) for r in results]})"
    )
    print(
        f"speed-up {t1 / tp:.2f}x, parallel efficiency {t1 / tp / p:.0%}; max |out P={p} - out P=1| = {diff:.2e}"
    )
    # Wall time depends on free cores (shared CI machines); CPU time per rank does not.
    print(f"CPU-time speed-up {c1 / cp:.2f}x (work per rank incl. communication, independent of load)")

    s_loc = -(-seq // p)
    per_rank_formula = 4 * s_loc * c * nbytes * (p - 1) / p * CONFIG.num_layers
    measured = results[0][2]
    print("bytes sent per forward by rank 0 (measured, by collective):")
    for kind, value in measured.items():
        print(f"  {kind:15s} {value / 2**20:10.2f} MiB")
    print(
        f"Ulysses all-to-all formula, {CONFIG.num_layers} blocks: per rank 4*S_loc*C*b*(P-1)/P = "
        f"{per_rank_formula / 2**20:.2f} MiB (measured {measured['all_to_all'] / 2**20:.2f} MiB, ratio "
        f"{measured['all_to_all'] / per_rank_formula:.4f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks of the timing run")
    parser.add_argument("--frames", type=int, default=3, help="latent frames")
    parser.add_argument("--height", type=int, default=60, help="latent height (480 px / 8)")
    parser.add_argument("--width", type=int, default=104, help="latent width (832 px / 8)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip_timing", action="store_true", help="byte tables only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print_formula()
    print_measured()
    if not args.skip_timing:
        print_timing(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
