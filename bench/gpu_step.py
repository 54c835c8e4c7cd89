"""Seconds per DiT forward on one GPU: random 14B-shaped weights, 480p and 720p, flash-attn vs SDPA,
the guidance branches batched vs one after another, and peak memory.

The model is the real ``MultiTalkDiT`` with the 14B config, built on the meta device and filled with
random bf16 values on the GPU (no checkpoint needed). Inputs are one clip of 81 frames (21 latent
frames) at a 480p (448x896) or 720p (704x1280) bucket with two persons, as the service renders them.
For each attention kernel (SDPA always; flash3 / flash2 when installed) it times:

- sequential: the 3 guidance branches of one step as 3 forwards of batch 1;
- batched: the same 3 branches as one forward of batch 3;

and prints seconds per forward (per branch pass), the batched/sequential ratio and
``torch.cuda.max_memory_allocated`` for each. ``--layers N`` builds N of the 40 blocks and scales the
block time up to 40 (the embeddings and head are timed once) when the full model would take too long;
``--device cpu --config tiny`` is a smoke test of the script itself.

    python bench/gpu_step.py [--sizes 480 720] [--repeats 2] [--layers 40] [--kernels sdpa flash2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from inference.model.attention import flash_kernels, set_attention_kernel
from inference.model.config import DiTConfig
from inference.model.dit import build_model
from inference.render.pipeline import branch_model_fns
from inference.render.sampler import BRANCH_COND, BRANCH_DROP_TEXT, BRANCH_UNCOND
from inference.render.settings import GenerationSettings

BUCKETS = {480: (448, 896), 720: (704, 1280)}
BRANCHES = (BRANCH_COND, BRANCH_DROP_TEXT, BRANCH_UNCOND)


def random_model(cfg: DiTConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The DiT with random weights made on ``device`` (small std so activations stay finite)."""
    model = build_model(cfg, "meta").to(dtype)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def clip_tensors(cfg: DiTConfig, resolution: int, device: torch.device, frames: int = 81) -> dict:
    h, w = (s // 8 for s in BUCKETS[resolution])
    t_lat = (frames - 1) // 4 + 1
    g = torch.Generator(device=device).manual_seed(1)
    masks = torch.zeros(3, h, w, device=device)
    masks[0, :, : w // 2 - 2], masks[1, :, w // 2 + 2 :] = 1, 1
    masks[2] = 1 - masks[0] - masks[1]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    return {
        "context": rnd(1, min(60, cfg.text_len), cfg.text_dim),
        "context_null": rnd(1, min(120, cfg.text_len), cfg.text_dim),
        "clip_fea": rnd(1, 257, cfg.clip_dim),
        "y": rnd(1, 20, t_lat, h, w),
        "audio": rnd(1, 2, frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim),
        "ref_target_masks": masks,
        "latent": rnd(16, t_lat, h, w),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak GiB) of ``fn()`` after one warm-up call."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def measure(
    model, cfg: DiTConfig, res: int, kernels: list[str], device: torch.device, args, scale: float
) -> None:
    """Print the per-forward times at one resolution for every kernel."""
    tensors = clip_tensors(cfg, res, device, args.frames)
    latent = tensors.pop("latent")
    t = torch.tensor([700.0], device=device)
    tokens = latent.shape[1] * (latent.shape[2] // 2) * (latent.shape[3] // 2)
    model_fn, batch_fn = branch_model_fns(model, tensors, GenerationSettings(resolution=res))
    # Embeddings + head alone (no blocks), to scale the block part up to the full depth.
    blocks, model.blocks = model.blocks, torch.nn.ModuleList()
    with torch.no_grad():
        shell, _ = timed(lambda: model_fn(latent, t, BRANCH_COND), device, args.repeats)
    model.blocks = blocks
    for kernel in kernels:
        set_attention_kernel(kernel)
        with torch.no_grad():
            seq, seq_peak = timed(lambda: [model_fn(latent, t, b) for b in BRANCHES], device, args.repeats)
            bat, bat_peak = timed(lambda: batch_fn(latent, t, BRANCHES), device, args.repeats)
        per_seq = shell + (seq / 3 - shell) * scale
        per_bat = (shell * 3 + (bat - 3 * shell) * scale) / 3
        print(f"{res}p, {tokens} tokens, {kernel:>6}: {per_seq:7.2f} s per forward sequential "
              f"(peak {seq_peak:.1f} GiB), {per_bat:7.2f} s per branch batched x3 (peak {bat_peak:.1f} GiB), "
              f"batched/sequential {per_bat / per_seq:.2f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[480, 720], choices=sorted(BUCKETS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers", type=int, default=40, help="blocks built (time scaled to the config's count)")
    p.add_argument(
        "--kernels", nargs="+", default=None, help="default: sdpa plus every installed flash kernel"
    )
    p.add_argument("--config", choices=("multitalk-14b", "tiny"), default="multitalk-14b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--frames", type=int, default=81)
    args = p.parse_args()

    device = torch.device(args.device)
    full = DiTConfig.preset(args.config)
    cfg = dataclasses.replace(full, num_layers=min(args.layers, full.num_layers))
    scale = full.num_layers / cfg.num_layers
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kernels = args.kernels or ["sdpa", *flash_kernels()]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.config} with {cfg.num_layers}/{full.num_layers} blocks "
          f"(block time x{scale:g}), {dtype}, kernels {kernels}")  # fmt: skip
    model = random_model(cfg, device, dtype)
    for res in args.sizes:
        measure(model, cfg, res, kernels, device, args, scale)
    set_attention_kernel("auto")


if __name__ == "__main__":
    main()
