"""GPU memory per stage beside the plan: random weights in the real shapes (14B DiT, umT5-XXL, CLIP ViT-H/14, the
Wan2.1 VAE), the service's layout flags, and ``torch.cuda.max_memory_allocated`` of each stage of one clip.

    python bench/gpu_memory.py --size multitalk-480 --num_persistent_param_in_dit 0         # one GPU
    torchrun --nproc_per_node=8 bench/gpu_memory.py --size multitalk-720 --t5_fsdp --dit_fsdp
    python bench/gpu_memory.py --preset tiny --device cpu    # a CPU smoke run (live-tensor tracker instead)

Per rank: stage, planned GiB, measured GiB (allocated; reserved beside it), measured / planned. Rank 0 runs
text, conditioning, denoise (one sampling step: three guidance forwards) and decode; the other ranks join
the collective ones. ``bench/gpu_memory.sh`` runs the standard set. Weights are random (no download):
memory does not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.flags import flag_bool
from inference.memory.measure import DeviceTensors, host_tensors
from inference.memory.plan import SIZES, Layout, Workload, gib, plan
from inference.memory.sizes import ModelSizes
from inference.parallel.context import ParallelContext

logger = logging.getLogger("gpu_memory")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("multitalk-14b", "tiny"), default="multitalk-14b")
    p.add_argument("--size", choices=tuple(SIZES), default="multitalk-480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dit_fsdp", nargs="?", const="full", default="off", choices=("off", "full", "keep"))
    p.add_argument("--t5_fsdp", action="store_true")
    p.add_argument("--t5_cpu", action="store_true")
    p.add_argument("--offload_model", type=flag_bool, default=None)
    p.add_argument("--num_persistent_param_in_dit", type=int, default=None)
    p.add_argument("--vae_tiling", choices=("auto", "on", "off"), default="auto")
    return p


def _random_(module: torch.nn.Module) -> None:
    """Fill every floating parameter (its local shard under FSDP2) with small random values."""
    with torch.no_grad():
        for p in module.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.is_floating_point():
                local.normal_(0.0, 0.02)


class Meter:
    """Peak bytes of one stage: the CUDA allocator's counters, or live tensors on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = DeviceTensors() if device.type == "cpu" else None  # host copies are left out
        self.results: dict[str, tuple[int, int]] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.cpu is None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.cpu.reset_peak()
        t0 = time.monotonic()
        yield
        if self.cpu is None:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
        else:
            peak = reserved = self.cpu.peak
        self.results[name] = (peak, reserved)
        logger.info("stage %s: %.2f GiB in %.1fs", name, peak / 2**30, time.monotonic() - t0)


def run(args: argparse.Namespace) -> int:
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from inference.encoders import ClipImageEncoder, T5Encoder, VaeTiling, WanVae
    from inference.encoders.t5 import load_t5_tokenizer
    from inference.encoders.tiny import write_tiny_tokenizer
    from inference.model.dit import build_model
    from inference.parallel.fsdp import _cast_meta_params, _shard_units, apply_fsdp
    from inference.parallel.offload import EncoderHome, stream_blocks
    from inference.render.pipeline import denoise_clip
    from inference.render.sampler import color_match
    from inference.render.settings import GenerationSettings

    ctx = ParallelContext.from_env(device=args.device)
    dev = ctx.device
    gpu = dev.type == "cuda"
    sizes = ModelSizes.preset(args.preset)
    work = Workload.for_size(args.size, args.frames)
    total = torch.cuda.get_device_properties(dev).total_memory / 2**30 if gpu else 1e6
    layout = Layout(gpus=ctx.world_size, gpu_gib=total, dit_fsdp=args.dit_fsdp, t5_fsdp=args.t5_fsdp,
                    t5_cpu=args.t5_cpu, offload_model=args.offload_model,
                    num_persistent_param_in_dit=args.num_persistent_param_in_dit, vae_tiling=args.vae_tiling,
                    device="cuda" if gpu else "cpu")  # fmt: skip
    planned = plan(sizes, layout, work, suggest=False)
    low = torch.bfloat16 if gpu else torch.float32
    meter = Meter(dev)
    cm = meter.cpu if meter.cpu is not None else contextlib.nullcontext()
    with cm, torch.no_grad():
        # DiT: meta build, then sharded / streamed / whole, random values.
        dit = build_model(sizes.dit.config, "meta").requires_grad_(False)
        _cast_meta_params(dit, low)
        streamer = None
        if layout.streaming:
            dit.to_empty(device="cpu")
            _random_(dit)
            streamer = stream_blocks(dit, dev, layout.num_persistent_param_in_dit or 0)
        else:
            apply_fsdp(dit, ctx.mesh, args.dit_fsdp, param_dtype=low)
            dit.to_empty(device=dev)
            _random_(dit)
        # T5 (umT5 encoder shapes, the tiny tokenizer: memory depends on the 512 padded tokens only).
        t5s, cs = sizes.t5, sizes.clip
        with torch.device("meta"):
            t5_model = UMT5EncoderModel(UMT5Config(vocab_size=t5s.vocab, d_model=t5s.d_model, d_kv=t5s.d_kv,
                                                   d_ff=t5s.d_ff, num_layers=t5s.num_layers,
                                                   num_heads=t5s.num_heads, feed_forward_proj="gated-gelu",
                                                   dropout_rate=0.0, tie_word_embeddings=False))  # fmt: skip
        t5_model.requires_grad_(False)
        t5_dtype = low if not args.t5_cpu else torch.bfloat16
        _cast_meta_params(t5_model, t5_dtype)
        home_dev = torch.device("cpu") if (layout.offload or args.t5_cpu) else dev
        if layout.sharded_t5:
            _shard_units(t5_model, t5_model.encoder.block, ctx.mesh, t5_dtype, reshard=True)
            home_dev = dev
        t5_model.to_empty(device=home_dev)
        _random_(t5_model)
        tmp = tempfile.mkdtemp()
        t5 = T5Encoder(t5_model.eval(), load_t5_tokenizer(write_tiny_tokenizer(tmp), t5s.vocab))
        home = EncoderHome(dev, layout.offload)
        if ctx.is_rank0:
            clip_model = CLIPVisionModel(CLIPVisionConfig(hidden_size=cs.width, intermediate_size=cs.mlp,
                                                          num_hidden_layers=cs.layers, num_attention_heads=cs.heads,
                                                          image_size=cs.image_size, patch_size=cs.patch))  # fmt: skip
            clip = ClipImageEncoder(
                clip_model.eval().requires_grad_(False).to(home_dev, torch.float16 if gpu else low)
            )
            vae_model = AutoencoderKLWan(**sizes.vae.config).eval().requires_grad_(False).to(home_dev)
            vae = WanVae(
                vae_model, tiling_mode=args.vae_tiling, tiling=VaeTiling(layout.vae_tile, layout.vae_stride)
            )
            if not layout.sharded_t5 and not args.t5_cpu:
                home.add(t5)
            home.add(clip)
            home.add(vae)
        if meter.cpu is not None:
            meter.cpu.host(host_tensors(streamer, home))
        # ---- stages
        texts = ["two people talking in a video", "bright tones, overexposed, static"]
        if layout.sharded_t5 or ctx.is_rank0:
            with meter.stage("text"), home.stage(t5):
                out = [t5.encode([text])[0] for text in texts]  # one prompt per forward, as Renderer does
            if layout.sharded_t5 and not ctx.is_rank0:
                out = None
        cfg = sizes.dit.config
        t_lat, h, w = work.latent
        tensors: dict[str, torch.Tensor] = {}
        if ctx.is_rank0:
            assert out is not None
            context, context_null = (o[None].to(dev, torch.float32) for o in out)
            g = torch.Generator().manual_seed(0)
            reference = (torch.rand(3, work.height, work.width, generator=g) * 2 - 1).to(dev)
            motion = (torch.rand(3, work.motion_frames, work.height, work.width, generator=g) * 2 - 1).to(dev)
            with meter.stage("conditioning"):
                with home.stage(vae):
                    y = vae.build_y(reference, work.frames)[None].to(dev)
                with home.stage(clip):
                    clip_fea = clip.encode(reference).to(dev, torch.float32)
            masks = torch.zeros(3, h, w, device=dev)
            masks[0, :, : w // 2] = 1
            masks[1, :, w // 2 :] = 1
            audio = torch.randn(
                1, 2, work.frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g
            )
            tensors = {"context": context, "context_null": context_null, "clip_fea": clip_fea, "y": y,
                       "audio": audio.to(dev), "ref_target_masks": masks}  # fmt: skip
        tensors = _broadcast(ctx, tensors)
        settings = GenerationSettings(steps=1, frame_num=work.frames, motion_frames=work.motion_frames)
        with meter.stage("denoise"):
            latent = denoise_clip(dit, tensors, settings, clip_index=0, sp=ctx.sequence_parallel())
        del tensors
        if ctx.is_rank0:
            with meter.stage("decode"):
                with home.stage(vae):
                    video = vae.decode(latent)
                video = color_match(video, motion[:, 0], 1.0)
                del video
    rows = planned.ranks[0] if ctx.is_rank0 else planned.ranks[-1]
    lines = [f"rank {ctx.rank}: {planned.verdict}"]
    for stage in rows.stages:
        if stage.name not in meter.results:
            continue
        peak, reserved = meter.results[stage.name]
        lines.append(f"  {stage.name:13s} planned {gib(stage.total):>10s}  measured {gib(peak):>10s} "
                     f"(reserved {gib(reserved)})  ratio {peak / stage.total:.3f}")  # fmt: skip
    print("\n".join(lines), flush=True)
    if ctx.distributed:
        ctx.barrier()  # the other ranks wait for rank 0's decode before the groups go
        ctx.destroy()
    return 0


def _broadcast(ctx: ParallelContext, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's job tensors on every rank (names and shapes first, then the data), as the engine sends them."""
    if not ctx.distributed:
        return tensors
    import torch.distributed as dist

    box = [{k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}]
    dist.broadcast_object_list(box, src=0, group=ctx.control)
    out = {}
    for name, (shape, dtype) in sorted(box[0].items()):
        t = tensors[name].contiguous() if ctx.is_rank0 else torch.empty(shape, dtype=dtype, device=ctx.device)
        dist.broadcast(t, src=0, group=ctx.data)
        out[name] = t
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
