"""Planned against measured: run a job's stages on small random models and compare each stage's peak with
the plan's.

``measure(case)`` builds the DiT, T5, CLIP and the VAE of a ``Case`` (random weights, the library classes
the service loads), applies the case's layout (``--num_persistent_param_in_dit`` streaming, encoder
offload) and runs rank 0's stages the way ``Renderer`` and ``denoise_clip`` run them, under
``LiveTensors``: text (T5 over the prompt), conditioning (VAE ``build_y``, CLIP), denoise (a few sampling
steps with three guidance branches) and decode (VAE decode, colour correction). The measured peak of a
stage is every tensor alive at its worst moment that would sit on the GPU: the weights the layout keeps
there, the job's tensors, and what the stage allocates; host copies (offload, streaming) are left out, as
they live in CPU memory on a GPU host. On a CPU everything is fp32, so the plan is made with
``Layout(device="cpu")``.

Used by ``bench/memory.py`` (prints planned, measured and their ratio) and by the tests.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inference.memory.plan import Layout, Plan, Workload, plan
from inference.memory.sizes import ClipSizes, ModelSizes, T5Sizes
from inference.memory.track import LiveTensors

logger = logging.getLogger(__name__)

PROMPT = "two people talking in a video"


@dataclass(frozen=True)
class Case:
    """One small configuration and layout. ``dit``: DiT fields over ``DiTConfig.tiny()``; ``vae_base``: VAE
    base width; the encoders' widths are the tiny ones scaled by ``encoder_scale``."""

    name: str
    height: int
    width: int
    frames: int
    dit: dict[str, int] = field(default_factory=dict)
    vae_base: int = 8
    encoder_scale: int = 1
    num_persistent_param_in_dit: int | None = None
    offload_model: bool = False
    vae_tiling: str = "off"
    vae_tile: int = 256
    vae_stride: int = 192
    gpu_dtypes: bool = False  # bf16 DiT and T5, fp16 CLIP (as on a GPU), measured on the CPU all the same
    steps: int = 2

    def sizes(self) -> ModelSizes:
        from inference.checkpoint.weights import tiny_dit_config
        from inference.encoders import tiny

        s = self.encoder_scale
        vae = dict(tiny.tiny_vae_config(), base_dim=self.vae_base)
        widths = {"text_dim": 32 * s, "clip_dim": 64 * s}
        return ModelSizes.custom(
            self.name,
            dataclasses.replace(tiny_dit_config(), **widths, **self.dit),
            T5Sizes(
                vocab=tiny.TINY_T5_VOCAB, d_model=32 * s, d_ff=64 * s, num_layers=2, num_heads=4, d_kv=8 * s
            ),
            ClipSizes(width=64 * s, mlp=128 * s, layers=2, heads=16),
            vae,
            tiny.tiny_wav2vec2_config(),
        )

    def layout(self) -> Layout:
        return Layout(
            gpus=1,
            device="cuda" if self.gpu_dtypes else "cpu",
            offload_model=self.offload_model,
            num_persistent_param_in_dit=self.num_persistent_param_in_dit,
            vae_tiling=self.vae_tiling,
            vae_tile=self.vae_tile,
            vae_stride=self.vae_stride,
        )

    def workload(self) -> Workload:
        return Workload(self.height, self.width, self.frames, motion_frames=min(5, self.frames - 4))


@dataclass(frozen=True)
class StageResult:
    case: str
    stage: str
    planned: int
    measured: int
    resident: int  # the measured part alive before the stage began (weights, job tensors)

    @property
    def ratio(self) -> float:
        return self.measured / self.planned if self.planned else float("nan")


class DeviceTensors(LiveTensors):
    """``LiveTensors`` that leaves out storages marked as host memory (offload / streaming host copies)."""

    def __init__(self) -> None:
        super().__init__(devices=("cpu",))
        self._host: set[int] = set()

    def host(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            key = t.untyped_storage()._cdata
            self._host.add(key)
            self._alive.pop(key, None)

    def _register(self, t: torch.Tensor, op: str, inputs: set[int]) -> None:
        if t.untyped_storage()._cdata not in self._host:
            super()._register(t, op, inputs)


def host_tensors(streamer: object = None, home: object = None) -> list[torch.Tensor]:
    """The host copies a ``BlockStreamer`` and an ``EncoderHome`` keep (CPU memory on a GPU host)."""
    copies = []
    if streamer is not None:
        copies += [*streamer._copies.values(), *([streamer._root] if streamer._root is not None else [])]
    extras: list[torch.Tensor] = []
    if home is not None:
        for copy, more in home._homes.values():
            copies.append(copy)
            extras += more.values()
    return [t for c in copies for t in (*c._param_host, *(h for _, h in c._buffers))] + extras


def _build(case: Case, sizes: ModelSizes, tokenizer_dir: Path):
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from inference.encoders import ClipImageEncoder, T5Encoder, VaeTiling, WanVae
    from inference.encoders.t5 import load_t5_tokenizer
    from inference.model.dit import MultiTalkDiT

    torch.manual_seed(0)
    dit = MultiTalkDiT(sizes.dit.config).init_weights(0).eval().requires_grad_(False)
    t5s, cs = sizes.t5, sizes.clip
    t5_model = UMT5EncoderModel(
        UMT5Config(
            vocab_size=t5s.vocab,
            d_model=t5s.d_model,
            d_kv=t5s.d_kv,
            d_ff=t5s.d_ff,
            num_layers=t5s.num_layers,
            num_heads=t5s.num_heads,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            tie_word_embeddings=False,
        )  # fmt: skip
    ).eval()
    t5 = T5Encoder(t5_model, load_t5_tokenizer(tokenizer_dir, t5s.vocab))
    clip_model = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=cs.width,
            intermediate_size=cs.mlp,
            num_hidden_layers=cs.layers,
            num_attention_heads=cs.heads,
            image_size=cs.image_size,
            patch_size=cs.patch,
        )  # fmt: skip
    ).eval()
    clip = ClipImageEncoder(clip_model)
    tiling = VaeTiling(case.vae_tile, case.vae_stride)
    vae = WanVae(AutoencoderKLWan(**sizes.vae.config).eval(), tiling_mode=case.vae_tiling, tiling=tiling)
    for m in (t5.model, clip.model, vae.model):
        m.requires_grad_(False)
    if case.gpu_dtypes:
        dit.to(torch.bfloat16)
        t5.model.to(torch.bfloat16)
        clip.model.to(torch.float16)
    return dit, t5, clip, vae


@contextmanager
def _stage(live: DeviceTensors, results: dict[str, tuple[int, int]], name: str) -> Iterator[None]:
    live.reset_peak()
    before = live.live
    yield
    results[name] = (live.peak, before)


def measure(
    case: Case, on_stage: Callable[[str, DeviceTensors], None] | None = None
) -> tuple[Plan, list[StageResult]]:
    """Run ``case``'s stages under the tracker; returns the plan and one result per stage."""
    from inference.encoders.tiny import write_tiny_tokenizer
    from inference.parallel.offload import EncoderHome, stream_blocks
    from inference.render.pipeline import denoise_clip
    from inference.render.sampler import color_match
    from inference.render.settings import GenerationSettings

    sizes = case.sizes()
    layout, work = case.layout(), case.workload()
    planned = plan(sizes, layout, work, suggest=False)
    cfg = sizes.dit.config
    t_lat, h, w = work.latent
    g = torch.Generator().manual_seed(1)
    measured: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tok_dir = write_tiny_tokenizer(tmp)
        live = DeviceTensors()
        with live:
            dit, t5, clip, vae = _build(case, sizes, tok_dir)
            streamer = None
            if case.num_persistent_param_in_dit is not None:
                streamer = stream_blocks(dit, "cpu", case.num_persistent_param_in_dit)
            home = EncoderHome("cpu", case.offload_model)
            for enc in (t5, clip, vae):
                home.add(enc)
            live.host(host_tensors(streamer, home))
            with _stage(live, measured, "text"), home.stage(t5):
                context = t5.encode([PROMPT])[0][None].float()
                context_null = t5.encode(["bad quality"])[0][None].float()
            reference = torch.rand(3, work.height, work.width, generator=g) * 2 - 1
            # The previous clip's last frames, which rank 0 keeps for the next one (a later clip's view).
            motion = torch.rand(3, work.motion_frames, work.height, work.width, generator=g) * 2 - 1
            audio = torch.randn(
                1, 2, work.frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g
            )
            masks = torch.zeros(3, h, w)
            masks[0, :, : w // 2] = 1
            masks[1, :, w // 2 :] = 1
            with _stage(live, measured, "conditioning"):
                with home.stage(vae):
                    y = vae.build_y(reference, work.frames)[None]
                with home.stage(clip):
                    clip_fea = clip.encode(reference).float()
            del reference  # rank 0 keeps a render-size reference; the motion frames stand for later clips
            tensors = {"context": context, "context_null": context_null, "clip_fea": clip_fea, "y": y,
                       "audio": audio, "ref_target_masks": masks}  # fmt: skip
            settings = GenerationSettings(
                steps=case.steps, frame_num=work.frames, motion_frames=work.motion_frames
            )
            with _stage(live, measured, "denoise"):
                latent = denoise_clip(dit, tensors, settings, clip_index=0)
            del tensors, y, clip_fea, audio
            with _stage(live, measured, "decode"):
                with home.stage(vae):
                    video = vae.decode(latent)
                video = color_match(video, motion[:, 0], 1.0)
                del video
            if on_stage is not None:
                on_stage("done", live)
    out = [StageResult(case.name, s.name, s.total, *measured[s.name]) for s in planned.ranks[0].stages]
    return planned, out


SMALL_DIT = {"dim": 256, "ffn_dim": 704, "num_layers": 3}  # the 14B's ffn/dim ratio (2.7)
CASES: tuple[Case, ...] = (
    Case("resident, 256x256x17, DiT 256/704", 256, 256, 17, dit=SMALL_DIT),
    Case("streamed (0) + offload + VAE tiles, 256x256x17", 256, 256, 17, dit=SMALL_DIT,
         num_persistent_param_in_dit=0, offload_model=True, vae_tiling="on", vae_tile=128, vae_stride=96),
    Case("streamed (root + 1 block), 192x320x17, DiT 384", 192, 320, 17,
         dit={"dim": 384, "ffn_dim": 1024, "num_heads": 6, "num_layers": 3}, vae_base=12, encoder_scale=2,
         num_persistent_param_in_dit=-1),
    Case("GPU dtypes (bf16 DiT + T5), 256x256x17", 256, 256, 17, dit=SMALL_DIT, gpu_dtypes=True,
         offload_model=False),
)  # fmt: skip


def resolve(case: Case) -> Case:
    """A negative ``num_persistent_param_in_dit`` means "the root and that many blocks" (-1: one block)."""
    n = case.num_persistent_param_in_dit
    if n is None or n >= 0:
        return case
    dit = case.sizes().dit
    return dataclasses.replace(case, num_persistent_param_in_dit=dit.root_params - n * dit.block_params)


# ---------------------------------------------------------------------------------------------- one forward


@dataclass(frozen=True)
class ForwardCase:
    """One DiT forward on ``ranks`` gloo ranks (Ulysses over all, FSDP2 ``fsdp``), in ``dtype``."""

    name: str
    ranks: int
    height: int
    width: int
    frames: int
    dit: dict[str, int] = field(default_factory=dict)
    fsdp: str = "off"
    bf16: bool = False


FORWARD_CASES: tuple[ForwardCase, ...] = (
    ForwardCase("DiT forward, 1 rank, fp32", 1, 256, 256, 17, dit=SMALL_DIT),
    ForwardCase("DiT forward, 1 rank, bf16", 1, 256, 256, 17, dit=SMALL_DIT, bf16=True),
    ForwardCase("DiT forward, 2 ranks Ulysses + FSDP2 full, bf16", 2, 256, 256, 17, dit=SMALL_DIT, fsdp="full",
                bf16=True),
)  # fmt: skip


def _forward_sizes(case: ForwardCase) -> ModelSizes:
    return Case(case.name, case.height, case.width, case.frames, dit=case.dit).sizes()


def forward_planned(case: ForwardCase) -> int:
    """The plan's denoise stage without the job's tensors: DiT weights on the GPU, in flight, activations."""
    from inference.memory.plan import _dit_weights, _dtypes, dit_activations

    sizes = _forward_sizes(case)
    lay = Layout(gpus=case.ranks, device="cuda" if case.bf16 else "cpu", dit_fsdp=case.fsdp)
    work = Workload(case.height, case.width, case.frames)
    dt = _dtypes(lay)
    items = (*_dit_weights(sizes, lay, dt), *dit_activations(sizes, lay, work, dt))
    return sum(i.nbytes for i in items)


def forward_measured(ctx: object, case: ForwardCase) -> int:
    """On one rank (``ctx``: a ``ParallelContext``): resident weight bytes + the peak of one forward."""
    from inference.model.dit import MultiTalkDiT
    from inference.parallel.fsdp import apply_fsdp, param_bytes

    sizes = _forward_sizes(case)
    cfg = sizes.dit.config
    dtype = torch.bfloat16 if case.bf16 else torch.float32
    model = MultiTalkDiT(cfg).init_weights(0).to(dtype).eval().requires_grad_(False)
    apply_fsdp(model, ctx.mesh, case.fsdp, param_dtype=dtype)  # type: ignore[attr-defined]
    work = Workload(case.height, case.width, case.frames)
    t, h, w = work.latent
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2] = 1
    masks[1, :, w // 2 :] = 1
    inputs = {
        "x": torch.randn(1, 16, t, h, w, generator=g),
        "t": torch.tensor([500.0]),
        "context": torch.randn(1, 20, cfg.text_dim, generator=g),
        "clip_fea": torch.randn(1, 257, cfg.clip_dim, generator=g),
        "y": torch.randn(1, 20, t, h, w, generator=g),
        "audio": torch.randn(
            1, 2, work.frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g
        ),
        "ref_target_masks": masks,
    }
    resident = param_bytes(model)[0]
    with (
        torch.no_grad(),
        LiveTensors(devices=("cpu",)) as live,
    ):  # FSDP2's lazy init inside: its buffers count
        model(**inputs, sp=ctx.sequence_parallel())  # type: ignore[attr-defined]
    return resident + live.peak


def _forward_rank(rank: int, world: int, port: int, case: ForwardCase, out: object) -> None:
    import os

    from inference.parallel.context import ParallelContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    ctx = ParallelContext.from_env(device="cpu", data_timeout=120, control_timeout=300)
    try:
        out.put((rank, forward_measured(ctx, case)))  # type: ignore[attr-defined]
    finally:
        ctx.destroy()


def measure_forward(case: ForwardCase) -> tuple[int, list[int]]:
    """(planned, measured per rank) for one DiT forward; several ranks are spawned gloo processes."""
    import multiprocessing as mp
    import socket

    from inference.parallel.context import ParallelContext

    planned = forward_planned(case)
    if case.ranks == 1:
        return planned, [forward_measured(ParallelContext.single("cpu"), case)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    procs = [
        spawn.Process(target=_forward_rank, args=(r, case.ranks, port, case, queue))
        for r in range(case.ranks)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(60)
    return planned, [results[r] for r in range(case.ranks)]
