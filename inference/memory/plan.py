"""The memory plan: per rank and per stage, the bytes of the tensors a layout puts on each GPU.

A job runs in stages; rank 0 runs all of them, the other ranks only the collective ones:

=============  ==================================================================  ===============
stage          what is on the GPU besides the resident weights                     ranks
=============  ==================================================================  ===============
text           T5 (whole, or its FSDP2 root + two blocks in flight) and its        0 (all: t5_fsdp)
               activations
conditioning   the VAE encoding the clip's conditioning video, then CLIP            0
denoise        DiT blocks in flight (FSDP2 gathers / streamed copies), the          all
               activations at the largest op, Ulysses' all-to-all buffers, the
               job's tensors and the sampler's latents
decode         the VAE decode (whole frames or tiles) and the decoded clip,         0
               then the colour correction
=============  ==================================================================  ===============

Resident between stages: the DiT (whole, its FSDP2 shard, or the persistent part when streaming), the
T5 shard (``--t5_fsdp``), and on rank 0 the encoders unless ``--offload_model`` keeps them in CPU memory.
wav2vec2 and Kokoro run on the CPU (as upstream), so they never count here.

Activations of the DiT are counted in units of one ``[S_loc, C]`` tensor (``S_loc`` tokens on this rank,
``C`` the model width, in the activation dtype): the number alive at its largest moments comes from the
code (``_DIT_MOMENTS``) and is checked against measurement by ``bench/memory.py``. The VAE's peaks come
from a dry run of the VAE code itself on the meta device (``inference.encoders.vae``).

``plan(sizes, layout, workload)`` returns a ``Plan``; ``Plan.verdict`` is one sentence (fits, or does not
and which flags would make it fit), the same sentence the service refuses a layout with at start-up.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass, field

from common.errors import InputError
from inference.memory.sizes import ModelSizes

logger = logging.getLogger(__name__)

GIB = 2**30
FSDP_MODES = ("off", "full", "keep")
VAE_TILING_MODES = ("auto", "on", "off")
QUANT_KINDS = ("int8", "fp8")
SIZES = {"multitalk-480": 480, "multitalk-720": 720}
DEFAULT_RESERVE_GIB = (
    1.0  # CUDA context, kernels' workspaces and allocator rounding: never planned for tensors
)

# Live [S_loc, C] tensors at the DiT's largest moments, per activation itemsize (2: bf16 on a GPU, 4: fp32 on a
# CPU), read off the code and checked by bench/memory.py:
# - attention: self-attention while RoPE rotates k (the residual stream, its modulated copy, q, k, v, rotated
#   q and RoPE's fp32 temporaries); with Ulysses the q/k/v all-to-all buffers come on top (``a2a``);
# - ffn: the residual stream, the block's earlier outputs still referenced and the modulated input, plus the
#   two [S_loc, ffn_dim] hidden states (counted apart).
_DIT_MOMENTS = {
    2: {"attention": 13.6, "a2a": 3.0, "ffn": 7.6},
    4: {"attention": 9.9, "a2a": 5.7, "ffn": 7.6},
}
_PATCH_INPUT_CHANNELS = 36  # noisy latent 16 + mask 4 + conditioning latent 16, concatenated before patching


class MemoryPlanError(InputError):
    """A layout or workload the plan cannot describe; ``field`` names the flag."""


@dataclass(frozen=True)
class Layout:
    """How a job is spread over the GPUs (the service's start-up flags, upstream's names).

    gpus: ranks, one GPU each; every rank joins Ulysses and FSDP2. gpu_gib: memory of each GPU.
    reserve_gib: kept free for the CUDA context, workspaces and allocator rounding.
    offload_model: None means upstream's default (True on one GPU, False on several).
    num_persistent_param_in_dit: None = the whole DiT resident; N = at most N parameters resident, the
    other blocks streamed from CPU memory (0 = lowest).
    vae_tiling: "auto" tiles the VAE when the whole-frame call would not fit in what is left.
    device: "cuda" (bf16 DiT and T5, fp16 CLIP, fp32 VAE) or "cpu" (fp32 everywhere, as the CPU paths run).
    rows: guidance branches evaluated in one forward (1 unless branches are batched).
    sp_size: ranks that share one forward's sequence (Ulysses x ring); None = every rank (without
    ``--cfg_parallel`` guidance groups).
    """

    gpus: int = 1
    gpu_gib: float = 24.0
    reserve_gib: float = DEFAULT_RESERVE_GIB
    dit_fsdp: str = "off"
    t5_fsdp: bool = False
    t5_cpu: bool = False
    offload_model: bool | None = None
    num_persistent_param_in_dit: int | None = None
    vae_tiling: str = "auto"
    vae_tile: int = 256
    vae_stride: int = 192
    quant: str | None = None
    device: str = "cuda"
    rows: int = 1
    sp_size: int | None = None

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise MemoryPlanError("gpus", f"must be at least 1, got {self.gpus}")
        if not self.gpu_gib > 0:
            raise MemoryPlanError("gpu-gib", f"must be positive, got {self.gpu_gib}")
        if self.dit_fsdp not in FSDP_MODES:
            raise MemoryPlanError(
                "dit_fsdp", f"unknown mode {self.dit_fsdp!r}; choose one of {list(FSDP_MODES)}"
            )
        if self.vae_tiling not in VAE_TILING_MODES:
            raise MemoryPlanError(
                "vae_tiling", f"choose one of {list(VAE_TILING_MODES)}, got {self.vae_tiling!r}"
            )
        if self.quant is not None and self.quant not in QUANT_KINDS:
            raise MemoryPlanError("quant", f"choose one of {list(QUANT_KINDS)}, got {self.quant!r}")
        n = self.num_persistent_param_in_dit
        if n is not None and n < 0:
            raise MemoryPlanError("num_persistent_param_in_dit", f"must be 0 or more, got {n}")
        if n is not None and self.sharded_dit:
            raise MemoryPlanError("num_persistent_param_in_dit", streaming_fsdp_reason(self.dit_fsdp))
        if self.device not in ("cuda", "cpu"):
            raise MemoryPlanError("device", f"cuda or cpu, got {self.device!r}")
        if self.rows < 1:
            raise MemoryPlanError("rows", f"must be at least 1, got {self.rows}")
        if self.sp_size is not None and not (
            1 <= self.sp_size <= self.gpus and self.gpus % self.sp_size == 0
        ):
            raise MemoryPlanError("sp_size", f"must divide the {self.gpus} ranks, got {self.sp_size}")

    @property
    def sharded_dit(self) -> bool:
        return self.dit_fsdp != "off" and self.gpus > 1

    @property
    def sharded_t5(self) -> bool:
        return self.t5_fsdp and self.gpus > 1

    @property
    def offload(self) -> bool:
        return self.gpus == 1 if self.offload_model is None else self.offload_model

    @property
    def streaming(self) -> bool:
        return self.num_persistent_param_in_dit is not None

    @property
    def usable_bytes(self) -> int:
        return int((self.gpu_gib - self.reserve_gib) * GIB)

    def replace(self, **changes: object) -> Layout:
        return dataclasses.replace(self, **changes)

    def flags(self) -> str:
        """The service flags that select this layout (defaults left out)."""
        out = [f"--nproc_per_node={self.gpus}" if self.gpus > 1 else "one process"]
        if self.dit_fsdp != "off":
            out.append("--dit_fsdp" if self.dit_fsdp == "full" else f"--dit_fsdp {self.dit_fsdp}")
        if self.t5_fsdp:
            out.append("--t5_fsdp")
        if self.t5_cpu:
            out.append("--t5_cpu")
        if self.offload_model is not None:
            out.append(f"--offload_model {str(self.offload_model).lower()}")
        if self.streaming:
            out.append(f"--num_persistent_param_in_dit {self.num_persistent_param_in_dit}")
        if self.vae_tiling != "auto":
            out.append(f"--vae_tiling {self.vae_tiling}")
        if self.quant:
            out.append(f"--quant {self.quant}")
        return " ".join(out)


def streaming_fsdp_reason(mode: str) -> str:
    return (
        f"cannot be combined with --dit_fsdp {mode}: FSDP2 already keeps only 1/P of every block on each GPU "
        "and gathers each block just in time, swapping the parameters it manages itself; streaming the same "
        "blocks from CPU memory would fight it. Use one of them (FSDP2 on several GPUs, streaming on one)"
    )


@dataclass(frozen=True)
class Workload:
    """One clip: ``frames`` (4n+1) of ``height`` x ``width`` pixels, ``persons`` speakers, T5 input of
    ``text_tokens``; later clips also keep ``motion_frames`` decoded frames on rank 0."""

    height: int
    width: int
    frames: int = 81
    persons: int = 2
    text_tokens: int = 512
    motion_frames: int = 25

    def __post_init__(self) -> None:
        if self.height % 16 or self.width % 16 or self.height <= 0 or self.width <= 0:
            raise MemoryPlanError(
                "size", f"{self.height}x{self.width}: sides must be positive multiples of 16"
            )
        if self.frames < 1 or (self.frames - 1) % 4:
            raise MemoryPlanError("frames", f"{self.frames}: must be 4n+1 (5, 9, ..., 81)")

    @classmethod
    def for_size(cls, size: str | int, frames: int = 81, **kwargs: object) -> Workload:
        """The largest-area bucket of a resolution family ("multitalk-480" / 480, "multitalk-720" / 720): the
        service cannot know a job's aspect ratio at start-up, so it plans for the worst."""
        from inference.scene.buckets import bucket_table

        key = SIZES.get(size, size) if isinstance(size, str) else size
        try:
            table = bucket_table(int(key))
        except (TypeError, ValueError):
            raise MemoryPlanError("size", f"unknown size {size!r}; choose one of {list(SIZES)}") from None
        h, w = max(table.values(), key=lambda hw: (hw[0] * hw[1], -abs(hw[0] - hw[1])))
        kwargs.setdefault("motion_frames", min(25, max(1, frames - 4)))  # upstream's 25, below a short clip
        return cls(h, w, frames, **kwargs)  # type: ignore[arg-type]

    @property
    def latent(self) -> tuple[int, int, int]:
        """(T_lat, h, w) of the clip's latent."""
        return (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8

    def tokens(self, patch: tuple[int, int, int]) -> int:
        t, h, w = self.latent
        return (t // patch[0]) * (h // patch[1]) * (w // patch[2])

    def clip_bytes(self) -> int:
        """The decoded clip [3, frames, H, W] float32."""
        return 3 * self.frames * self.height * self.width * 4

    def describe(self) -> str:
        return f"{self.width}x{self.height}, {self.frames} frames"


@dataclass(frozen=True)
class Item:
    name: str
    nbytes: int
    note: str = ""


@dataclass(frozen=True)
class Stage:
    name: str
    items: tuple[Item, ...]

    @property
    def total(self) -> int:
        return sum(i.nbytes for i in self.items)


@dataclass(frozen=True)
class RankPlan:
    """One rank's stages; ``ranks`` says which ranks it stands for (rank 0, or every other rank)."""

    ranks: str
    stages: tuple[Stage, ...]

    @property
    def peak(self) -> Stage:
        return max(self.stages, key=lambda s: s.total)


@dataclass(frozen=True)
class Plan:
    layout: Layout
    workload: Workload
    model: str
    ranks: tuple[RankPlan, ...]
    vae_tiled: bool
    suggestion: Layout | None = field(default=None, compare=False)

    @property
    def worst(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.peak.total)

    @property
    def fits(self) -> bool:
        return self.worst.peak.total <= self.layout.usable_bytes

    @property
    def verdict(self) -> str:
        lay, worst = self.layout, self.worst
        peak = worst.peak
        head = (
            f"{self.model} at {self.workload.describe()} on {lay.gpus} x {lay.gpu_gib:g} GiB "
            f"({lay.flags()}): "
        )
        if self.fits:
            tiled = ", VAE tiled" if self.vae_tiled and lay.vae_tiling == "auto" else ""
            return head + (
                f"fits: peak {gib(peak.total)} on {worst.ranks} ({peak.name}{tiled}) of "
                f"{gib(lay.usable_bytes)} usable"
            )
        biggest = max(peak.items, key=lambda i: i.nbytes)
        text = head + (
            f"does not fit: {worst.ranks} needs {gib(peak.total)} at {peak.name} ({biggest.name} "
            f"{gib(biggest.nbytes)}) but {gib(lay.usable_bytes)} is usable"
        )
        if self.suggestion is not None:
            return text + f"; {_change(lay, self.suggestion)} makes it fit"
        return text + "; no layout of the supported flags fits on these GPUs"


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"


# ---------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class _Dtypes:
    act: int  # DiT activations
    dit: int  # DiT weights (the storage dtype; quantised linears aside)
    t5: int
    clip: int
    vae: int


def _dtypes(layout: Layout) -> _Dtypes:
    if layout.device == "cpu":
        return _Dtypes(4, 4, 4, 4, 4)
    return _Dtypes(act=2, dit=2, t5=2, clip=2, vae=4)


def _persistent_blocks(sizes: ModelSizes, budget: int) -> tuple[bool, int]:
    """(root persistent?, number of persistent blocks) for at most ``budget`` resident DiT parameters, filled
    as ``inference.parallel.offload.stream_blocks`` fills it: the root first, then blocks in order."""
    dit = sizes.dit
    root = dit.root_params <= budget
    left = budget - (dit.root_params if root else 0)
    return root, min(dit.num_blocks, max(0, left) // dit.block_params)


def _dit_weights(sizes: ModelSizes, lay: Layout, dt: _Dtypes) -> tuple[Item, Item]:
    """(resident DiT weights, DiT weights in flight during a forward)."""
    dit, q = sizes.dit, lay.quant
    total = dit.total_bytes(dt.dit, q)
    block, root = dit.block_bytes(dt.dit, q), dit.root_bytes(dt.dit, q)
    if lay.streaming:
        root_kept, kept = _persistent_blocks(sizes, lay.num_persistent_param_in_dit or 0)
        streamed = dit.num_blocks - kept
        resident = kept * block + (root if root_kept else 0)
        flight = min(2, streamed) * block + (0 if root_kept else root)
        note = f"{kept} of {dit.num_blocks} blocks{' + root' if root_kept else ''}"
        return (Item("DiT weights (persistent)", resident, note),
                Item("DiT blocks in flight", flight, "current + prefetched block, streamed"))  # fmt: skip
    if lay.sharded_dit and lay.dit_fsdp == "full":
        shard = math.ceil(total / lay.gpus)
        flight = root + 2 * block + math.ceil(block / lay.gpus)
        return (Item("DiT shard", shard, f"1/{lay.gpus} of {gib(total)}"),
                Item("DiT blocks in flight", flight, "root + current + prefetched block, all-gathered"))  # fmt: skip
    note = "keep: gathered after the first forward" if lay.sharded_dit else "replicated"
    return Item("DiT weights", total, note), Item("DiT blocks in flight", 0)


def dit_activations(sizes: ModelSizes, lay: Layout, work: Workload, dt: _Dtypes) -> tuple[Item, Item]:
    """(activations at the largest op, Ulysses' attention buffers) of one DiT forward on one rank."""
    cfg = sizes.dit.config
    a, p, b = dt.act, lay.sp_size or lay.gpus, lay.rows
    s = work.tokens(cfg.patch_size)
    s_loc = math.ceil(s / p)
    x = b * s_loc * cfg.dim * a
    ff = b * s_loc * cfg.ffn_dim * a
    rope = s * cfg.head_dim * 4  # cos and sin tables [S, D/2] float32, over the whole sequence
    tokens = (
        b * s_loc * p * cfg.dim * a if p > 1 else 0
    )  # the patch embedding, whole sequence, before the shard
    patch_px = math.prod(cfg.patch_size)
    embed_in = b * s * patch_px * _PATCH_INPUT_CHANNELS * (4 + a)  # fp32 latents concatenated, then cast
    fp32_weight = 6 * cfg.dim * cfg.dim * 4 if dt.dit != 4 else 0  # time projection weight copied to fp32
    dequant = cfg.ffn_dim * cfg.dim * a if lay.quant else 0  # the largest quantised weight, dequantised
    k = _DIT_MOMENTS[a]
    a2a = k["a2a"] * x if p > 1 else 0
    moments = {
        "self-attention": k["attention"] * x + rope + tokens + a2a + dequant,
        "FFN": k["ffn"] * x + 2 * ff + rope + tokens + dequant,
        "patch embedding": (tokens or x) + embed_in + fp32_weight + 3 * rope,
    }
    op = max(moments, key=moments.__getitem__)
    buffers = a2a if op == "self-attention" else 0
    note = f"{op}; S_loc {s_loc} of {s} tokens" + (f", {b} rows" if b > 1 else "")
    return (Item("activations (largest op)", int(moments[op] - buffers), note),
            Item("attention buffers", int(buffers), "Ulysses q/k/v all-to-all" if buffers else ""))  # fmt: skip


def job_tensors(sizes: ModelSizes, lay: Layout, work: Workload, rank0: bool) -> Item:
    """The clip's broadcast tensors and the sampler's latents (float32), plus on rank 0 the motion frames
    kept between clips."""
    cfg = sizes.dit.config
    t, h, w = work.latent
    latent = 16 * t * h * w * 4
    cond = (
        2 * cfg.text_len * cfg.text_dim  # context, context_null (padded at most to text_len)
        + 257 * cfg.clip_dim
        + 20 * t * h * w
        + work.persons * work.frames * cfg.audio_window * cfg.audio_layers * cfg.audio_dim
        + 3 * h * w
    ) * 4
    sampler = 7 * latent  # latent, noise, three branch velocities, guidance temporaries
    motion = 3 * work.motion_frames * work.height * work.width * 4 if rank0 else 0
    return Item(
        "job tensors", cond + sampler + motion, "conditioning, latents" + (", motion frames" if rank0 else "")
    )


def t5_activations(sizes: ModelSizes, work: Workload, itemsize: int) -> int:
    """One umT5 forward over ``text_tokens``: the relative-position bucket arithmetic (int64 [L, L]) or the
    per-layer position bias [H, L, L] with the FFN hidden, plus the hidden states."""
    t5, n = sizes.t5, work.text_tokens
    buckets = 54 * n * n
    bias = 2 * t5.num_heads * n * n * itemsize + 4 * n * t5.d_ff * itemsize
    return max(buckets, bias) + 4 * n * t5.d_model * itemsize


def clip_activations(sizes: ModelSizes, itemsize: int) -> int:
    """One CLIP forward: the 224 x 224 preprocessing (float32) and the widest hidden states."""
    c = sizes.clip
    return 3 * 3 * c.image_size**2 * 4 + 4 * c.tokens * max(c.mlp, c.width) * itemsize


def _vae_peaks(sizes: ModelSizes, lay: Layout, work: Workload, tiled: bool) -> tuple[int, int]:
    """(encode, decode) peak bytes of the VAE calls of one clip, from the VAE code's own dry run."""
    from inference.encoders.vae import VaeTiling, vae_decode_bytes, vae_encode_bytes

    tiling = VaeTiling(lay.vae_tile, lay.vae_stride) if tiled else None
    cfg = sizes.vae.config
    enc = vae_encode_bytes(work.frames, work.height, work.width, tiling, config=cfg)
    dec = vae_decode_bytes(work.frames, work.height, work.width, tiling, config=cfg)
    return enc, dec


def _colour_bytes(work: Workload) -> int:
    """After the decode: the clip, its colour-corrected copy, and float64 Lab work on 8 frames at a time (up to
    11.6 chunk-sized float64 tensors alive at once, measured on ``sampler.color_match``)."""
    return 2 * work.clip_bytes() + int(11.6 * 3 * min(8, work.frames) * work.height * work.width * 8)


def _encoder_items(sizes: ModelSizes, lay: Layout, dt: _Dtypes) -> dict[str, int]:
    """Bytes of each rank-0 encoder's weights on the GPU while it is in use."""
    return {
        "T5": 0 if lay.t5_cpu else sizes.t5.params * dt.t5,
        "CLIP": sizes.clip.params * dt.clip,
        "VAE": sizes.vae.params * dt.vae,
    }


def _rank(sizes: ModelSizes, lay: Layout, work: Workload, rank0: bool, tiled: bool) -> RankPlan:
    dt = _dtypes(lay)
    dit_resident, dit_flight = _dit_weights(sizes, lay, dt)
    resident: list[Item] = [dit_resident]
    t5 = sizes.t5
    if lay.sharded_t5:
        resident.append(Item("T5 shard", math.ceil(t5.params * dt.t5 / lay.gpus), f"1/{lay.gpus}"))
    enc = _encoder_items(sizes, lay, dt)
    on_gpu = {}  # encoders resident on rank 0
    if rank0:
        for name, nbytes in enc.items():
            if name == "T5" and lay.sharded_t5:
                continue
            if not lay.offload and nbytes:
                resident.append(Item(name, nbytes, "resident"))
                on_gpu[name] = True

    def loaded(name: str) -> list[Item]:
        """An offloaded encoder, on the GPU for its own stage."""
        if on_gpu.get(name) or not enc[name]:
            return []
        return [Item(name, enc[name], "moved in for this stage")]

    stages: list[Stage] = []
    if lay.sharded_t5 or rank0:
        items: list[Item] = []
        if lay.sharded_t5:
            flight = (t5.root_params + 2 * t5.block_params + math.ceil(t5.block_params / lay.gpus)) * dt.t5
            items.append(Item("T5 in flight", flight, "embedding + current + prefetched block, all-gathered"))
        elif rank0:
            items += loaded("T5")
        if not lay.t5_cpu or lay.sharded_t5:
            items.append(Item("T5 activations", t5_activations(sizes, work, dt.t5)))
        stages.append(Stage("text", tuple(resident + items)))
    enc_peak, dec_peak = _vae_peaks(sizes, lay, work, tiled) if rank0 else (0, 0)
    if rank0:
        video = work.clip_bytes()  # the conditioning clip (image + zeros) the VAE encodes
        vae_stage = loaded("VAE") + [Item("VAE encode", enc_peak), Item("conditioning video", video)]
        clip_stage = loaded("CLIP") + [Item("CLIP activations", clip_activations(sizes, dt.clip))]
        cond = max((vae_stage, clip_stage), key=lambda s: sum(i.nbytes for i in s))
        motion = 3 * work.motion_frames * work.height * work.width * 4  # a later clip's conditioning frames
        stages.append(Stage("conditioning", tuple(resident + cond + [Item("motion frames", motion)])))
    act, buffers = dit_activations(sizes, lay, work, dt)
    stages.append(Stage("denoise", tuple(resident + [dit_flight, act, buffers,
                                                     job_tensors(sizes, lay, work, rank0)])))  # fmt: skip
    if rank0:
        clip = work.clip_bytes()
        decode = [Item("VAE decode", max(0, dec_peak - clip), "tiled" if tiled else "whole frames"),
                  Item("decoded clip", clip, "float32")]  # fmt: skip
        colour = [Item("decoded clip", 2 * clip, "float32, and its colour-corrected copy"),
                  Item("colour correction", _colour_bytes(work) - 2 * clip, "float64 Lab, 8 frames at a time")]  # fmt: skip
        post = max((decode, colour), key=lambda s: sum(i.nbytes for i in s))
        stages.append(
            Stage("decode", tuple(resident + loaded("VAE") + post + [Item("motion frames", motion)]))
        )
    return RankPlan("rank 0" if rank0 else f"ranks 1-{lay.gpus - 1}", tuple(stages))


def _build(sizes: ModelSizes, lay: Layout, work: Workload) -> Plan:
    def ranks(tiled: bool) -> tuple[RankPlan, ...]:
        out = [_rank(sizes, lay, work, True, tiled)]
        if lay.gpus > 1:
            out.append(_rank(sizes, lay, work, False, tiled))
        return tuple(out)

    tiled = lay.vae_tiling == "on"
    plans = ranks(tiled)
    if lay.vae_tiling == "auto":
        # As WanVae does at run time: tile when the whole-frame call needs more than is left on the GPU.
        rank0 = plans[0]
        if any(s.total > lay.usable_bytes for s in rank0.stages if s.name in ("conditioning", "decode")):
            tiled, plans = True, ranks(True)
    return Plan(lay, work, sizes.name, plans, tiled)


def plan(sizes: ModelSizes, layout: Layout, workload: Workload, *, suggest: bool = True) -> Plan:
    """The plan of ``layout`` for ``workload``; when it does not fit, ``suggestion`` holds the closest layout
    (fewest changed flags, cheapest first) that does, if any."""
    result = _build(sizes, layout, workload)
    if result.fits or not suggest:
        return result
    return dataclasses.replace(result, suggestion=_suggest(sizes, layout, workload))


# Changes tried when a layout does not fit, cheapest (in speed) first.
def _candidates(lay: Layout) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    if lay.vae_tiling == "off":
        out.append({"vae_tiling": "auto"})
    if not lay.offload:
        out.append({"offload_model": True})
    if lay.gpus > 1 and not lay.t5_fsdp and not lay.t5_cpu:
        out.append({"t5_fsdp": True})
    if lay.gpus > 1 and lay.dit_fsdp != "full" and lay.quant is None and not lay.streaming:
        out.append({"dit_fsdp": "full"})
    if not lay.t5_cpu and not lay.sharded_t5:
        out.append({"t5_cpu": True})
    if lay.quant is None and not lay.sharded_dit:
        out.append({"quant": "int8"})
    if not lay.streaming and not lay.sharded_dit:
        out.append({"num_persistent_param_in_dit": 0})
    return out


def _suggest(sizes: ModelSizes, lay: Layout, work: Workload) -> Layout | None:
    cands = _candidates(lay)
    for n in range(1, len(cands) + 1):
        for combo in itertools.combinations(cands, n):
            changes: dict[str, object] = {}
            for c in combo:
                changes.update(c)
            if "num_persistent_param_in_dit" in changes and changes.get("dit_fsdp", lay.dit_fsdp) != "off" \
                    and lay.gpus > 1:  # fmt: skip
                continue
            if "quant" in changes and changes.get("dit_fsdp", lay.dit_fsdp) != "off" and lay.gpus > 1:
                continue
            try:
                candidate = lay.replace(**changes)
            except MemoryPlanError:
                continue
            if _build(sizes, candidate, work).fits:
                if candidate.streaming:
                    candidate = _most_persistent(sizes, candidate, work)
                return candidate
    return None


def _most_persistent(sizes: ModelSizes, lay: Layout, work: Workload) -> Layout:
    """The largest ``num_persistent_param_in_dit`` (in whole blocks after the root) that still fits: the less
    is streamed, the faster each forward."""
    dit = sizes.dit
    best = lay
    for kept in range(1, dit.num_blocks + 1):
        budget = dit.root_params + kept * dit.block_params
        candidate = lay.replace(num_persistent_param_in_dit=budget)
        if not _build(sizes, candidate, work).fits:
            break
        best = candidate
    return best


def _change(old: Layout, new: Layout) -> str:
    """The flags to add to ``old`` to get ``new``."""
    parts = []
    for f in dataclasses.fields(Layout):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        flag = f"--{f.name}"
        if isinstance(after, bool):
            parts.append(
                flag if f.name == "t5_fsdp" or f.name == "t5_cpu" else f"{flag} {str(after).lower()}"
            )
        elif f.name == "dit_fsdp" and after == "full":
            parts.append("--dit_fsdp")
        else:
            parts.append(f"{flag} {after}")
    return " ".join(parts)
