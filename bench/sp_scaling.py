"""Ulysses scaling on CPU: one DiT forward at P=1 and at P=2 (gloo, one thread per rank).

The model is the real ``MultiTalkDiT`` with a narrow config (dim 512, 8 heads of 64, FFN 1536,
4 blocks; text, CLIP and audio shapes as upstream) on a 480x832 latent grid of 3 latent frames:
3 x 30 x 52 = 4680 tokens, two persons (routing map + L-RoPE active).

Prints the time per forward, speed-up, parallel efficiency and the bytes each rank sent, next to
the Ulysses estimate. Per block, each rank sends (P-1)/P of its q, k, v (3 S_loc C) in one
all-to-all and of its attention output (S_loc C) in another:

    per rank  = 4 * S_loc * C * bytes * (P - 1) / P      (S_loc = S / P)
    all ranks = 4 * S * C * bytes * (P - 1) / P

CPU timings are a sanity check of the code path, not a GPU prediction: with 2 cores, P=2 can at
best halve the time, and gloo over loopback is far slower than NVLink.

    python bench/sp_scaling.py [--world 2] [--frames 3] [--height 60] [--width 104] [--repeats 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT
from inference.model.sp import NoParallel
from inference.parallel.context import ParallelContext
from inference.parallel.ulysses import SequenceParallel

CONFIG = DiTConfig(dim=512, ffn_dim=1536, num_heads=8, num_layers=4, freq_dim=256)


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


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, q) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    ctx = ParallelContext.from_env(device="cpu", data_timeout=600, control_timeout=600)
    sp = ctx.sequence_parallel()
    seconds, cpu, out = timed_forwards(sp, args)
    per_forward = {k: v // args.repeats for k, v in sp.comm_bytes.items()}
    q.put((rank, seconds, per_forward, out if rank == 0 else None, cpu))
    ctx.destroy()


def run_parallel(world: int, args: argparse.Namespace) -> list[tuple]:
    spawn = mp.get_context("spawn")
    q = spawn.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = [spawn.Process(target=_rank, args=(r, world, port, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(60)
    return sorted(results, key=lambda r: r[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--frames", type=int, default=3, help="latent frames")
    parser.add_argument("--height", type=int, default=60, help="latent height (480 px / 8)")
    parser.add_argument("--width", type=int, default=104, help="latent width (832 px / 8)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    seq = args.frames * (args.height // 2) * (args.width // 2)
    p, c, nbytes = args.world, CONFIG.dim, 4
    print(
        f"config: dim {c}, {CONFIG.num_heads} heads, ffn {CONFIG.ffn_dim}, {CONFIG.num_layers} blocks, fp32"
    )
    print(f"tokens: S = {args.frames} x {args.height // 2} x {args.width // 2} = {seq}; one thread per rank")

    t1, c1, ref = timed_forwards(NoParallel(), args)
    print(f"P=1: {t1:.3f} s / forward (CPU {c1:.3f} s)")

    results = run_parallel(p, args)
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
    all_formula = 4 * seq * c * nbytes * (p - 1) / p * CONFIG.num_layers
    measured = results[0][2]
    print("bytes sent per forward by rank 0 (measured, by collective):")
    for kind, value in measured.items():
        print(f"  {kind:15s} {value / 2**20:10.2f} MiB")
    print(
        f"Ulysses formula, {CONFIG.num_layers} blocks: per rank 4*S_loc*C*b*(P-1)/P = "
        f"{per_rank_formula / 2**20:.2f} MiB (measured all-to-all {measured['all_to_all'] / 2**20:.2f} MiB); "
        f"all ranks 4*S*C*b*(P-1)/P = {all_formula / 2**20:.2f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
