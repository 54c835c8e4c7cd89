"""Model passes per video, FLOPs per pass and the physical floor per GPU, and batched vs sequential guidance.

For a 10-second two-person video (250 frames in clips of 81 with 25 motion frames = 5 clips) at 480p and
720p, prints forwards of the 14B DiT per clip and per video for:

- baseline: 40 steps x 3 guidance passes (upstream's defaults);
- FusionX LoRA: 8 steps x 2 passes (text guidance 1), lightx2v LoRA: 4 steps x 2 passes;
- TeaCache (threshold 0.2 and 0.5) on the baseline: computed from the real time-embedding weights when
  ``--weights`` holds them (TeaCache's decisions depend only on the timestep modulation, so they are
  exact without running the DiT); otherwise upstream's published estimate (2-3x) is shown, marked so.

FLOPs per forward come from the model config (2 x multiply-adds of every linear layer per token, plus
4 S L C for each attention over L keys), and the floor is FLOPs / peak dense bf16 throughput per GPU
type (100 % utilisation, 1 GPU; divide by the GPU count for a perfectly parallel group).

Last, the measured CPU time of one denoising step on a mid-size config (the real model code with a
narrow width), guidance branches one after another vs batched into one forward, and their ratio: wall
time, and this process's CPU time, which other processes on a shared machine disturb less. Once on one
process (the same FLOPs either way, so only kernel efficiency differs) and once on ``--world`` gloo ranks
with Ulysses and FSDP2 (full), where a batched step gathers each block's weights once instead of once per
branch and sends one all-to-all pair per block for all branches.

    python bench/passes.py [--weights weights/Wan2.1-I2V-14B-480P] [--repeats 5] [--world 2] [--skip-cpu]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from inference.checkpoint.loader import open_checkpoint, resolve_config
from inference.model.config import DiTConfig
from inference.model.dit import MultiTalkDiT
from inference.model.layers import sinusoidal_embedding_1d
from inference.parallel.context import ParallelContext
from inference.parallel.fsdp import apply_fsdp
from inference.render.pipeline import branch_model_fns
from inference.render.sampler import evaluate_branches, passes_for, timesteps
from inference.render.settings import GenerationSettings, count_clips
from inference.render.teacache import TeaCache, TeaCacheConfig

VIDEO_SECONDS = 10.0
FPS = 25
# A 16:9-ish bucket per family: 480p 448x896 (ratio 0.50), 720p 704x1280 (ratio 0.55).
BUCKETS = {480: (448, 896), 720: (704, 1280)}
# Peak dense bf16 tensor throughput (TFLOP/s, no sparsity), from the vendors' data sheets.
GPUS = {"RTX 4090": 165.2, "L40S": 362.1, "A100": 312.0, "H100 SXM": 989.4, "H200": 989.4, "B200": 2250.0}
PUBLISHED_TEACACHE = {0.2: 2.0, 0.5: 3.0}  # upstream README: "approximately 2~3x"


def tokens_for(resolution: int, frame_num: int = 81, cfg: DiTConfig | None = None) -> tuple[int, int]:
    """(video tokens, tokens per latent frame) of one clip."""
    cfg = cfg or DiTConfig.multitalk_14b()
    h, w = BUCKETS[resolution]
    t_lat = (frame_num - 1) // 4 + 1
    per_frame = (h // 8 // cfg.patch_size[1]) * (w // 8 // cfg.patch_size[2])
    return t_lat * per_frame, per_frame


def flops_per_forward(cfg: DiTConfig, tokens: int, persons: int = 2) -> float:
    """FLOPs of one DiT forward over ``tokens`` video tokens (linear layers + attention, fp-agnostic)."""
    c, f = cfg.dim, cfg.ffn_dim
    n_audio = cfg.context_tokens * persons  # audio keys per latent frame
    per_token_linear = (
        4 * c * c + 2 * c * c + 2 * c * c + 2 * c * f
    )  # self qkvo, cross q/o, audio q/proj, FFN
    context_linear = 2 * c * c * (cfg.text_len + 257) + 2 * cfg.output_dim * c * n_audio  # k/v of text+image
    attention = 4 * c * (tokens * tokens + tokens * (cfg.text_len + 257) + tokens * n_audio)
    per_block = 2 * tokens * per_token_linear + 2 * context_linear + attention
    embed = 2 * tokens * cfg.in_dim * math.prod(cfg.patch_size) * c + 2 * cfg.text_len * cfg.text_dim * c
    head = 2 * tokens * c * math.prod(cfg.patch_size) * cfg.out_dim
    return cfg.num_layers * per_block + embed + head


def teacache_forwards(weights: Path | None, thresh: float, resolution: int, steps: int) -> tuple[int, str]:
    """Computed forwards per clip (3 branches) with TeaCache, and where the number comes from."""
    if weights is not None:
        try:
            e0s = modulations_from_weights(weights, steps, resolution)
        except (OSError, ValueError, KeyError) as exc:
            print(f"  (cannot read time-embedding weights from {weights}: {exc})")
        else:
            cache = TeaCache(TeaCacheConfig(thresh, resolution, steps))
            for e0 in e0s:
                cache.run(("cond",), torch.zeros(1, 1, 1), e0[:, 0], e0, lambda x: x)
            computed = sum(1 for _, _, c in cache.decisions if c)
            return 3 * computed, "measured from the time-embedding weights"
    return round(3 * steps / PUBLISHED_TEACACHE[thresh]), "published 2-3x estimate (no weights given)"


def modulations_from_weights(folder: Path, steps: int, resolution: int) -> list[torch.Tensor]:
    """e0 [1, 6, C] for every step of the default schedule, from the checkpoint's time layers only."""
    cfg = resolve_config(folder)
    refs = open_checkpoint(folder)
    w = {
        k: refs[k].load(torch.float32) for k in refs if k.startswith(("time_embedding.", "time_projection."))
    }
    shift = GenerationSettings(resolution=resolution).effective_shift
    out = []
    for t in timesteps(steps, shift)[:-1]:
        s = sinusoidal_embedding_1d(cfg.freq_dim, t[None])
        e = F.linear(F.silu(F.linear(s, w["time_embedding.0.weight"], w["time_embedding.0.bias"])),
                     w["time_embedding.2.weight"], w["time_embedding.2.bias"])  # fmt: skip
        e0 = F.linear(F.silu(e), w["time_projection.1.weight"], w["time_projection.1.bias"])
        out.append(e0.unflatten(1, (6, cfg.dim)))
    return out


def print_passes(weights: Path | None) -> None:
    cfg = DiTConfig.multitalk_14b()
    frames = int(VIDEO_SECONDS * FPS)
    for res in (480, 720):
        settings = GenerationSettings(resolution=res)
        clips = count_clips(frames, settings)
        tokens, per_frame = tokens_for(res)
        flops = flops_per_forward(cfg, tokens)
        print(f"\n{res}p bucket {BUCKETS[res][0]}x{BUCKETS[res][1]}: {tokens} tokens per clip ({per_frame} per "
              f"latent frame), {VIDEO_SECONDS:.0f} s = {frames} frames = {clips} clips, "
              f"{flops / 1e15:.2f} PFLOP per forward")  # fmt: skip
        schemes = [("baseline 40 x 3", 120, "upstream defaults"), ("FusionX 8 x 2", 16, "LoRA"),
                   ("lightx2v 4 x 2", 8, "LoRA")]  # fmt: skip
        for thresh in (0.2, 0.5):
            n, source = teacache_forwards(weights, thresh, res, 40)
            schemes.append((f"TeaCache {thresh} (40 x 3)", n, source))
        header = f"  {'scheme':<26}{'fwd/clip':>9}{'fwd/video':>10}{'vs base':>8}  " + "".join(
            f"{g + ' s':>12}" for g in GPUS
        )
        print(header + "   (floor per video on 1 GPU at peak)")
        for name, per_clip, source in schemes:
            per_video = per_clip * clips
            floors = "".join(f"{per_video * flops / (tf * 1e12):>12.0f}" for tf in GPUS.values())
            print(f"  {name:<26}{per_clip:>9}{per_video:>10}{120 / per_clip:>7.1f}x  {floors}   {source}")
        per_fwd = "  ".join(f"{g} {flops / (tf * 1e12):.1f} s" for g, tf in GPUS.items())
        print(f"  floor per forward: {per_fwd}")


def cpu_ratio(repeats: int, frames: int, height: int, width: int, threads: int) -> None:
    torch.set_num_threads(threads)
    cfg, tensors, latent = _cpu_setup(frames, height, width)
    model = MultiTalkDiT(cfg).init_weights(seed=0).eval().requires_grad_(False)
    tokens = frames * (height // 2) * (width // 2)
    print(f"\nCPU, {threads} thread(s): dim {cfg.dim}, {cfg.num_heads} heads, {cfg.num_layers} blocks, "
          f"{tokens} tokens, two persons; one denoising step, median of {repeats}, sequential and batched "
          "interleaved (load from other processes hits both alike)")  # fmt: skip
    for text in (5.0, 1.0):
        branches = passes_for(text)
        model_fn, batch_fn = branch_model_fns(model, tensors, GenerationSettings(text_guidance=text))
        with torch.no_grad():
            t = torch.tensor([700.0])
            seq_out = evaluate_branches(model_fn, latent, t, branches)
            bat_out = evaluate_branches(model_fn, latent, t, branches, batch_fn=batch_fn)
        diff = max((seq_out[b] - bat_out[b]).abs().max().item() for b in branches)
        times = _step_times(model, tensors, latent, branches, repeats)
        (seq, cseq), (bat, cbat) = times["sequential"], times["batched"]
        print(f"  {len(branches)} branches: wall sequential {seq:.3f} s, batched {bat:.3f} s, ratio "
              f"{bat / seq:.2f} (speed-up {seq / bat:.2f}x); process CPU time sequential {cseq:.3f} s, batched "
              f"{cbat:.3f} s, ratio {cbat / cseq:.2f} (speed-up {cseq / cbat:.2f}x); max |diff| {diff:.1e}")  # fmt: skip


def _cpu_setup(
    frames: int, height: int, width: int
) -> tuple[DiTConfig, dict[str, torch.Tensor], torch.Tensor]:
    """The mid-size config, one clip's tensors and a latent (seeded, identical on every rank)."""
    cfg = DiTConfig(dim=512, ffn_dim=1536, num_heads=8, num_layers=4, freq_dim=256)
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, height, width)
    masks[0, :, : width // 2 - 2], masks[1, :, width // 2 + 2 :] = 1, 1
    masks[2] = 1 - masks[0] - masks[1]
    tensors = {
        "context": torch.randn(1, 40, cfg.text_dim, generator=g),
        "context_null": torch.randn(1, 120, cfg.text_dim, generator=g),
        "clip_fea": torch.randn(1, 257, cfg.clip_dim, generator=g),
        "y": torch.randn(1, 20, frames, height, width, generator=g),
        "audio": torch.randn(
            1, 2, 1 + cfg.vae_scale * (frames - 1), 5, cfg.audio_layers, cfg.audio_dim, generator=g
        ),
        "ref_target_masks": masks,
    }
    return cfg, tensors, torch.randn(16, frames, height, width, generator=g)


def _step_times(model, tensors, latent, branches, repeats: int, sp=None) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds of one step, sequential and batched, interleaved."""
    text = 5.0 if len(branches) == 3 else 1.0
    model_fn, batch_fn = branch_model_fns(model, tensors, GenerationSettings(text_guidance=text), sp=sp)
    t = torch.tensor([700.0])
    wall: dict[str, list[float]] = {"sequential": [], "batched": []}
    cpu: dict[str, list[float]] = {"sequential": [], "batched": []}
    with torch.no_grad():
        evaluate_branches(model_fn, latent, t, branches, batch_fn=batch_fn)  # warm-up
        for _ in range(repeats):
            for name, fn in (("sequential", None), ("batched", batch_fn)):
                t0, c0 = time.perf_counter(), time.process_time()
                evaluate_branches(model_fn, latent, t, branches, batch_fn=fn)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {k: (sorted(wall[k])[len(wall[k]) // 2], sorted(cpu[k])[len(cpu[k]) // 2]) for k in wall}


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    ctx = ParallelContext.from_env(device="cpu", data_timeout=600, control_timeout=600)
    cfg, tensors, latent = _cpu_setup(args.frames, args.height, args.width)
    model = MultiTalkDiT(cfg).init_weights(seed=0).eval().requires_grad_(False)
    apply_fsdp(model, ctx.mesh, "full", param_dtype=torch.float32)
    times = _step_times(model, tensors, latent, passes_for(5.0), args.repeats, sp=ctx.sequence_parallel())
    q.put((rank, times))
    ctx.destroy()


def cpu_ratio_ranks(args: argparse.Namespace) -> None:
    """The same step on ``--world`` gloo ranks: Ulysses over all of them and FSDP2 (full) on the DiT, so a
    batched step issues one all-to-all pair and one weight all-gather per block instead of three."""
    mpctx = mp.get_context("spawn")
    q = mpctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [mpctx.Process(target=_rank, args=(r, args.world, port, args, q)) for r in range(args.world)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join(60)
    seq_wall = max(r["sequential"][0] for r in results.values())
    bat_wall = max(r["batched"][0] for r in results.values())
    seq_cpu = max(r["sequential"][1] for r in results.values())
    bat_cpu = max(r["batched"][1] for r in results.values())
    print(f"  {args.world} gloo ranks (Ulysses {args.world} + FSDP2 full), 3 branches: wall sequential "
          f"{seq_wall:.3f} s, batched {bat_wall:.3f} s, ratio {bat_wall / seq_wall:.2f} (speed-up "
          f"{seq_wall / bat_wall:.2f}x); CPU time per rank ratio {bat_cpu / seq_cpu:.2f} "
          f"(speed-up {seq_cpu / bat_cpu:.2f}x)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--weights", type=Path, default=None, help="a Wan/MultiTalk weights folder (time layers read)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--frames", type=int, default=3, help="latent frames of the CPU config")
    p.add_argument("--height", type=int, default=16, help="latent height of the CPU config")
    p.add_argument("--width", type=int, default=28, help="latent width of the CPU config")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--world", type=int, default=2, help="gloo ranks for the Ulysses + FSDP2 ratio (1: skip)")
    p.add_argument("--skip-cpu", action="store_true", help="print the pass arithmetic only")
    args = p.parse_args()
    print_passes(args.weights)
    if not args.skip_cpu:
        cpu_ratio(args.repeats, args.frames, args.height, args.width, args.threads)
        if args.world > 1:
            cpu_ratio_ranks(args)


if __name__ == "__main__":
    main()
