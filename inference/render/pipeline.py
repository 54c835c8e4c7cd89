"""The parts of one job from its ``JobSpec`` to an mp4, split along the process topology.

- ``Renderer`` lives on rank 0. ``prepare`` does everything before the video model (the spec's parsed
  dialogue -> Kokoro timeline, or the recordings; pictures -> scene; wav2vec2, T5, masks);
  ``clip_inputs`` builds one clip's conditioning (CLIP, VAE ``y``, motion latents, windowed audio);
  ``accept_clip`` decodes and colour-corrects a denoised clip; ``write_outputs`` muxes the mp4 and
  writes the side files.
- ``denoise_clip`` runs on every rank with the same tensors: the sampler's Euler loop around the
  DiT, with the ``sp`` object for sequence parallelism. Its inputs are exactly the tensors the engine
  broadcasts, so one process and P ranks run the same code.

The clip driver that strings them together is ``inference.render.worker.DialogueWorker`` (one DENOISE
message per clip, through the engine, on one process or many).

Tensor names broadcast per clip (B = 1, N = people, 1 or 2): ``context`` [1, L, text_dim], ``context_null``
[1, L', text_dim], ``clip_fea`` [1, 257, clip_dim], ``y`` [1, 20, T_lat, h, w], ``audio``
[1, N, frame_num, 5, layers, width], ``ref_target_masks`` [3, h, w], and for later clips ``motion_latent``
[16, T_m, h, w]. One person: the single-person path (no speaker routing; the masks give person 1 the
whole frame and the model does not read them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.files import atomic_write, atomic_write_text
from inference.checkpoint.lora import AdapterBank
from inference.checkpoint.weights import WeightPaths
from inference.model.sp import NoParallel, SequenceParallelism
from inference.parallel.cfg import GuidanceParallel, one_by_one
from inference.parallel.offload import EncoderHome
from inference.render.length import check_speech_length, length_record, speech_end, subtitles_within
from inference.render.sampler import (
    BRANCH_COND,
    BRANCH_DROP_AUDIO,
    BRANCH_DROP_TEXT,
    BRANCH_UNCOND,
    BatchFn,
    ClipPlan,
    ClipSpec,
    ModelFn,
    PassStats,
    clip_new_frames,
    color_match,
    motion_latent_frames,
    next_motion_frames,
    noise_for_clip,
    plan_clips,
    sample_clip,
    timesteps,
)
from inference.render.settings import FPS, GenerationSettings
from inference.render.spec import JobSpec
from inference.render.teacache import TeaCache, teacache_for
from inference.render.video_io import write_video
from inference.scene.compose import Scene, compose_scene, load_image, scene_from_image
from inference.scene.single import single_scene
from tts.engine import KokoroEngine
from tts.timeline import Timeline, build_timeline
from tts.user_audio import timeline_from_files

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]  # (percent 0..100, stage text)
TimingFn = Callable[[str, float], None]  # (name, seconds)

OUTPUT_VIDEO = "video.mp4"
OUTPUT_FILES = (
    OUTPUT_VIDEO,
    "subtitles.srt",
    "subtitles.vtt",
    "reference.png",
    "overlay.png",
    "mix.wav",
    "timeline.json",
)
FRAMES_SPILL_DIR = ".frames"  # per-clip decoded frames until the mux
FRAMES_FILE = "frames.npy"  # uint8 [T, H, W, 3] as handed to the encoder (RenderConfig.save_frames)
# Kokoro's vocoder draws noise: speech is seeded with a constant, so the same script and voices always
# sound the same (whatever the video seed), and a resumed render continues over identical audio.
TTS_SEED = 0

# Progress bands: preparing 0..10, rendering 10..95, encoding 95..100.
_PREPARE_END = 10.0
_RENDER_END = 95.0
RENDER_STAGES = frozenset({"prepare", "clips"})  # what a Renderer loads (see Renderer)


@dataclass
class Prepared:
    """Rank 0's state for one job between clips."""

    spec: JobSpec
    settings: GenerationSettings
    out_dir: Path
    timeline: Any  # tts.timeline.Timeline
    scene: Any  # inference.scene.Scene
    reference: torch.Tensor  # [3, H, W] in [-1, 1] at the render size
    audio_emb: torch.Tensor  # [people, T_audio, layers, width] fp32
    context: torch.Tensor  # [1, L, text_dim]
    context_null: torch.Tensor  # [1, L', text_dim]
    masks: torch.Tensor  # [3, h, w] at latent resolution
    plan: ClipPlan
    # Decoded clips spill to disk (uint8 [t, H, W, 3], one .npy per clip) so a 1000-frame 720p video never
    # sits in RAM whole (~2.7 GB); the muxer reads them back one clip at a time.
    frame_files: list[Path] = field(default_factory=list)
    motion: torch.Tensor | None = None  # [3, motion_frames, H, W] in [-1, 1]
    start_clip: int = 0  # > 0 when an interrupted render resumes after its last finished clip
    passes: list[dict[str, int]] = field(default_factory=list)  # model work per denoised clip

    @property
    def num_clips(self) -> int:
        return len(self.plan.clips)

    def record_passes(self, clip: int, passes: int, skipped: int, model_calls: int) -> None:
        """One denoised clip's model work: branch passes, of them skipped by TeaCache, and forwards."""
        self.passes.append(
            {"clip": clip, "passes": passes, "computed": passes - skipped, "skipped": skipped,
             "model_calls": model_calls}
        )  # fmt: skip

    def passes_record(self) -> dict[str, Any]:
        """The render record's "passes": per clip and totals (clips resumed from disk are not counted)."""
        total = {k: sum(c[k] for c in self.passes) for k in ("passes", "computed", "skipped", "model_calls")}
        return {**total, "per_clip": list(self.passes), "resumed_after_clip": self.start_clip}


@dataclass(frozen=True)
class RenderConfig:
    """How rank 0 runs its components. ``render_divisor`` shrinks the bucket (the tiny preset renders
    at an eighth of the 480p bucket, e.g. 64x112, so a CPU finishes a long video in seconds).
    ``save_frames`` also writes the frames before encoding (``frames.npy``), for exact comparisons."""

    device: torch.device = torch.device("cpu")
    t5_cpu: bool = False
    render_divisor: int = 1
    tts_gap_s: float = 0.25
    max_audio_seconds: float = 600.0
    save_frames: bool = False
    vae_tiling: str = "auto"  # VAE spatial tiles: auto (when whole frames would not fit the GPU) | on | off
    offload_model: bool = False  # T5, CLIP and the VAE in CPU memory, on the device only for their stage


def branch_model_fns(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    settings: GenerationSettings,
    *,
    sp: SequenceParallelism | None = None,
    cache: TeaCache | None = None,
) -> tuple[ModelFn, BatchFn]:
    """The DiT as the sampler's per-branch ``model_fn`` and batched ``batch_fn`` for one clip.

    Branches (upstream's CFG): cond = prompt + audio; drop_text = negative prompt + audio;
    uncond = negative prompt + silent single person; drop_audio = prompt + silent single person. The
    silent branches use one person of zeros, which also switches L-RoPE off, as upstream. The batched
    form stacks the branches' text contexts (zero-padded to one length, as the model pads them anyway),
    audio (the silent person padded with a zero second person, marked by ``persons``) and timesteps into
    one forward, so each layer issues one all-to-all for all branches.
    """
    sp = sp or NoParallel()
    y = tensors["y"]
    device = y.device
    audio = tensors["audio"]
    silent = torch.zeros_like(audio[:, -1:])
    masks = tensors["ref_target_masks"]
    args = {
        BRANCH_COND: (tensors["context"], audio),
        BRANCH_DROP_TEXT: (tensors["context_null"], audio),
        BRANCH_UNCOND: (tensors["context_null"], silent),
        BRANCH_DROP_AUDIO: (tensors["context"], silent),
    }

    def model_fn(latent: torch.Tensor, t: torch.Tensor, branch: str) -> torch.Tensor:
        context, audio_in = args[branch]
        out = model(
            latent[None],
            t.to(device),
            context,
            tensors["clip_fea"],
            y,
            audio_in,
            masks if audio_in.shape[1] == 2 else None,  # no routing for one (silent) person
            sp=sp,
            cache=None if cache is None else cache.bind((branch,)),
        )
        return out[0]

    def batch_fn(latent: torch.Tensor, t: torch.Tensor, branches: tuple[str, ...]) -> torch.Tensor:
        n = len(branches)
        contexts = [args[b][0] for b in branches]
        length = max(c.shape[1] for c in contexts)
        context = torch.cat([F.pad(c, (0, 0, 0, length - c.shape[1])) for c in contexts])
        people = audio.shape[1]
        persons = tuple(args[b][1].shape[1] for b in branches)
        audio_in = torch.cat(
            [F.pad(args[b][1], (0, 0) * 4 + (0, people - p)) for b, p in zip(branches, persons, strict=True)]
        )
        return model(
            latent[None].expand(n, *latent.shape),
            t.to(device).expand(n),
            context,
            tensors["clip_fea"].expand(n, -1, -1),
            y.expand(n, -1, -1, -1, -1),
            audio_in,
            masks if 2 in persons else None,
            sp=sp,
            persons=persons,
            cache=None if cache is None else cache.bind(branches),
        )

    return model_fn, batch_fn


def denoise_clip(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    settings: GenerationSettings,
    *,
    clip_index: int,
    sp: SequenceParallelism | None = None,
    progress: Callable[[int, int], None] | None = None,
    step_boundary: Callable[[torch.Tensor], bool] | None = None,
    batched: bool = False,
    stats: PassStats | None = None,
    adapters: AdapterBank | None = None,
    guidance: GuidanceParallel | None = None,
) -> torch.Tensor:
    """Denoise one clip; runs on every rank with identical ``tensors``. Returns the latent [16, T, h, w].

    step_boundary(latent): called before every step; True stops the clip (``Cancelled``). In the engine it
    all-reduces the cancel flag, so every rank stops at the same step.
    batched: run the guidance branches of a step as one forward (``branch_model_fns``); equal to one
    forward per branch up to float rounding. stats: filled with the clip's passes (computed / skipped by
    TeaCache when ``settings.teacache``) and forwards. adapters: switchable LoRAs, turned on or off for
    this clip by ``settings.lora`` (every rank does the same). guidance: with ``--cfg_parallel``, this
    rank's guidance group evaluates its share of each step's branches and one all-gather brings the rest.
    """
    sp = sp or NoParallel()
    stats = stats if stats is not None else PassStats()
    if adapters is not None:
        adapters.set_active(settings.lora)
    y = tensors["y"]
    _, _, t_lat, h, w = y.shape
    noise = noise_for_clip(settings.seed, clip_index, (16, t_lat, h, w)).to(y.device)
    cache = teacache_for(settings, sp, stats)
    model_fn, batch_fn = branch_model_fns(model, tensors, settings, sp=sp, cache=cache)
    return sample_clip(
        model_fn,
        noise,
        timesteps(settings.steps, settings.effective_shift),
        settings,
        motion_latent=tensors.get("motion_latent"),
        progress=progress,
        clip_index=clip_index,
        step_boundary=step_boundary,
        batch_fn=_guidance_split(guidance, model_fn, batch_fn if batched else None),
        stats=stats,
    )


def _guidance_split(
    guidance: GuidanceParallel | None, model_fn: ModelFn, batch_fn: BatchFn | None
) -> BatchFn | None:
    """The sampler's ``batch_fn``: unchanged on one guidance group, else each group's share of the branches
    (one forward per branch, or batched) followed by the all-gather."""
    if guidance is None:
        return batch_fn
    return guidance.wrap(batch_fn if batch_fn is not None else one_by_one(model_fn))


def _to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    x = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def _image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
    return arr.permute(2, 0, 1) / 127.5 - 1.0


def render_size(bucket: tuple[int, int], divisor: int) -> tuple[int, int]:
    """The size a job renders at: the bucket, or for the tiny preset the bucket / divisor rounded to a
    multiple of 16 (VAE stride 8 x patch 2), at least 32."""
    if divisor == 1:
        return bucket
    return tuple(max(32, 16 * round(side / divisor / 16)) for side in bucket)  # type: ignore[return-value]


def latent_masks_at(masks: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Pixel masks [3, H, W] (a partition) -> a partition [3, h, w] by area vote, every class the pixel
    masks have kept (a one-person scene has no person 2 and no background)."""
    m = torch.from_numpy(np.asarray(masks, dtype=np.float32))[None]
    area = F.interpolate(m, size=size, mode="area")[0]  # fraction of each class per cell
    label = area.argmax(0)
    out = F.one_hot(label, 3).permute(2, 0, 1).float()
    for c in range(3):  # a tiny render may lose a thin class: give it its best cell back
        if out[c].sum() == 0 and area[c].sum() > 0:
            # ... but never a class's last cell, or fixing one class would empty another.
            spare = out.sum((1, 2))[out.argmax(0)] > 1  # [h, w]
            idx = int(torch.where(spare, area[c], -1.0).flatten().argmax())
            out[:, idx // size[1], idx % size[1]] = 0
            out[c, idx // size[1], idx % size[1]] = 1
    return out


def t5_placement(device: torch.device, t5_cpu: bool) -> tuple[torch.device, torch.dtype]:
    """Where T5 runs and in which dtype: bf16 on the GPU, and with ``--t5_cpu`` bf16 on the CPU as
    upstream keeps it (11.4 GB of host RAM, fp32 would take 22.8 GB); fp32 only on a CPU-only run."""
    if t5_cpu:
        return torch.device("cpu"), torch.bfloat16
    return device, torch.float32 if device.type == "cpu" else torch.bfloat16


class Renderer:
    """Rank 0's components: Kokoro, wav2vec2, T5, CLIP and the VAE, loaded from ``paths``."""

    def __init__(
        self, paths: WeightPaths, config: RenderConfig = RenderConfig(), text_encoder: Any = None,
        stages: frozenset[str] = RENDER_STAGES,
    ) -> None:  # fmt: skip
        """``text_encoder``: T5 from elsewhere (``--t5_fsdp``: the handle on the T5 sharded over every rank);
        loaded here when None. With ``config.offload_model`` the encoders are loaded into CPU memory (in
        the dtype they compute in) and visit the device only for their stage (``EncoderHome``).
        ``stages``: "prepare" (Kokoro, wav2vec2, T5: ``prepare``) and/or "clips" (CLIP, VAE: ``clip_inputs``,
        ``accept_clip``); a producer prepares and a group leader renders clips (``--prepare_on producer``)."""
        # Imported here on purpose: transformers + diffusers take seconds to import, and only rank 0's
        # Renderer needs them (ranks > 0, the web process and the CLI's job checks never do).
        from inference.encoders import ClipImageEncoder, T5Encoder, WanVae
        from inference.encoders.wav2vec2 import AudioEncoder

        self.paths = paths
        self.config = config
        dev = config.device
        home = torch.device("cpu") if config.offload_model else dev  # where the weights are loaded
        self.home = EncoderHome(dev, config.offload_model)
        t0 = time.monotonic()
        self.stages = stages
        self.clip = self.vae = self.audio_encoder = None
        if text_encoder is None and "prepare" in stages:
            t5_device, t5_dtype = t5_placement(dev, config.t5_cpu)
            t5_device = torch.device("cpu") if config.offload_model else t5_device
            text_encoder = T5Encoder.from_wan(paths.wan_dir, device=t5_device, dtype=t5_dtype)
            if not config.t5_cpu:
                self.home.add(text_encoder)
        self.t5 = text_encoder
        if "clips" in stages:
            clip_dtype = torch.float32 if dev.type == "cpu" else torch.float16
            self.clip = self.home.add(ClipImageEncoder.from_wan(paths.wan_dir, device=home, dtype=clip_dtype))
            self.vae = self.home.add(
                WanVae.from_wan(
                    paths.wan_dir, device=home, dtype=torch.float32, tiling_mode=config.vae_tiling
                )
            )
        if "prepare" in stages:
            # wav2vec2 runs on the CPU, as upstream runs it (eager attention over a long track would not fit a GPU).
            self.audio_encoder = AudioEncoder(paths.wav2vec_dir, device="cpu")
        self._tts = None
        self._null_cache: dict[str, torch.Tensor] = {}
        logger.info("rank-0 encoders loaded in %.1fs", time.monotonic() - t0)

    @property
    def tts(self):
        """Kokoro, loaded on first use (a job with uploaded audio never needs it)."""
        if self._tts is None:
            self._tts = KokoroEngine(self.paths.kokoro_dir, device="cpu")
        return self._tts

    # ---- front half -------------------------------------------------------------------------

    def _timeline(self, spec: JobSpec, files: dict[str, Path]) -> Timeline:
        """The speech timeline: the spec's parsed dialogue spoken by Kokoro, or the recordings."""
        if spec.dialogue is not None:
            assert spec.voices is not None
            # build_timeline takes a voice per speaker; a one-person dialogue has no speaker-2 turns.
            voices = (spec.voices[0], spec.voices[-1])
            return build_timeline(spec.dialogue, voices, self.tts, gap_s=self.config.tts_gap_s, seed=TTS_SEED)
        assert spec.audio_mode is not None
        return timeline_from_files(
            files["person1"], files.get("person2"), spec.audio_mode, max_seconds=self.config.max_audio_seconds
        )

    def _scene(self, spec: JobSpec, settings: GenerationSettings, files: dict[str, Path]) -> Scene:
        size, names, sc = settings.resolution, spec.speaker_names, spec.scene
        if spec.layout == "single":
            return single_scene(load_image(files["image"], "image"), size=size, name=names[0])
        if spec.layout == "scene":
            boxes = None if sc.boxes is None else [list(b) for b in sc.boxes]
            return scene_from_image(load_image(files["scene"], "scene_image"), boxes, size=size, names=names)
        kwargs: dict[str, Any] = {"layout": sc.layout, "backdrop": sc.backdrop, "names": names}
        if sc.aspect:
            kwargs["aspect"] = sc.aspect
        left, right = load_image(files["left"], "left_image"), load_image(files["right"], "right_image")
        return compose_scene(left, right, size=size, **kwargs)

    def _encode_text(self, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.config.device
        with self.home.stage(self.t5):
            context = self.t5.encode([prompt])[0][None].to(dev, torch.float32)
            if negative not in self._null_cache:  # the negative prompt is the same for most jobs
                self._null_cache = {negative: self.t5.encode([negative])[0][None].to(dev, torch.float32)}
        return context, self._null_cache[negative]

    def prepare(
        self,
        spec: JobSpec,
        settings: GenerationSettings,
        inputs: Path,
        out_dir: Path,
        *,
        progress: ProgressFn | None = None,
        timing: TimingFn | None = None,
    ) -> Prepared:
        """Everything before the first clip: ``inputs`` holds the files the spec names, ``out_dir``
        receives the side outputs as they appear."""
        progress = progress or (lambda p, s: None)
        timing = timing or (lambda n, s: None)
        out_dir = Path(out_dir)
        files = spec.input_paths(inputs)
        settings = settings.with_resolved_seed()  # the service stores a concrete seed already
        out_dir.mkdir(parents=True, exist_ok=True)

        progress(1, "synthesising speech" if spec.dialogue is not None else "loading audio")
        t0 = time.monotonic()
        timeline = self._timeline(spec, files)
        timing("tts_time", time.monotonic() - t0)
        # The estimate at submission may have been low: speech past the cap fails here, never cut.
        scripted = spec.dialogue is not None
        check_speech_length(speech_end(timeline), settings.to_dict(), field="script" if scripted else "audio1",
                            source="as synthesised; the estimate from the script was lower" if scripted
                            else "the recordings")  # fmt: skip
        timeline.write(out_dir)

        progress(4, "composing the scene")
        t0 = time.monotonic()
        scene = self._scene(spec, settings, files)
        atomic_write(out_dir / "reference.png", lambda f: scene.image.save(f, format="PNG"))
        atomic_write(out_dir / "overlay.png", lambda f: scene.overlay.save(f, format="PNG"))
        render_hw = render_size(scene.bucket, self.config.render_divisor)
        image = (
            scene.image if render_hw == scene.bucket else scene.image.resize(render_hw[::-1], Image.BICUBIC)
        )
        reference = _image_to_tensor(image).to(self.config.device)
        if render_hw == scene.bucket:  # the scene's own latent masks (nearest, as upstream)
            masks = torch.from_numpy(scene.latent_masks).to(self.config.device)
        else:
            masks = latent_masks_at(scene.masks, (render_hw[0] // 8, render_hw[1] // 8)).to(
                self.config.device
            )
        timing("scene_time", time.monotonic() - t0)

        progress(6, "encoding audio (wav2vec2)")
        t0 = time.monotonic()
        tracks = timeline.resampled(16000)  # [2, M]; person 2's track is silent in a one-person job
        audio_emb = torch.stack([self.audio_encoder.encode(tracks[i]) for i in range(spec.people)])
        timing("audio_encode_time", time.monotonic() - t0)

        progress(8, "encoding the prompt (T5)")
        t0 = time.monotonic()
        context, context_null = self._encode_text(spec.prompt, settings.negative_prompt)
        timing("text_encode_time", time.monotonic() - t0)

        plan = plan_clips(int(audio_emb.shape[1]), settings)
        logger.info(
            "job prepared: %.2fs of audio -> %d frames in %d clip(s) at %dx%d, %d steps",
            timeline.duration,
            plan.output_frames,
            len(plan.clips),
            render_hw[1],
            render_hw[0],
            settings.steps,
        )
        progress(_PREPARE_END, f"prepared: {len(plan.clips)} clip(s)")
        prep = Prepared(
            spec=spec,
            settings=settings,
            out_dir=out_dir,
            timeline=timeline,
            scene=scene,
            reference=reference,
            audio_emb=audio_emb,
            context=context,
            context_null=context_null,
            masks=masks,
            plan=plan,
        )
        _resume_or_reset(prep)
        return prep

    # ---- per clip ---------------------------------------------------------------------------

    @torch.no_grad()
    def clip_inputs(self, prep: Prepared, clip: ClipSpec) -> dict[str, torch.Tensor]:
        """The tensors every rank needs for ``clip`` (see the module docstring for names and shapes)."""
        settings = prep.settings
        dev = self.config.device
        if clip.is_first:
            with self.home.stage(self.vae):
                y = self.vae.build_y(prep.reference, settings.frame_num)
            clip_image = prep.reference
            motion_latent = None
        else:
            assert prep.motion is not None, "clips must be accepted in order"
            with self.home.stage(self.vae):
                y = self.vae.build_y(None, settings.frame_num, motion_frames=prep.motion)
            clip_image = prep.motion[:, -1]
            motion_latent = y[4:, : motion_latent_frames(settings.motion_frames)].contiguous()
        idx = prep.plan.audio_indices(clip)  # [frame_num, 5]
        audio = prep.audio_emb[:, idx][None]  # [1, people, frame_num, 5, layers, width]
        with self.home.stage(self.clip):
            clip_fea = self.clip.encode(clip_image).to(dev, torch.float32)
        tensors = {
            "context": prep.context,
            "context_null": prep.context_null,
            "clip_fea": clip_fea,
            "y": y[None].to(dev, torch.float32),
            "audio": audio.to(dev, torch.float32).contiguous(),
            "ref_target_masks": prep.masks,
        }
        if motion_latent is not None:
            tensors["motion_latent"] = motion_latent.to(dev, torch.float32)
        return tensors

    @torch.no_grad()
    def accept_clip(self, prep: Prepared, clip: ClipSpec, latent: torch.Tensor) -> None:
        """Decode a denoised clip, colour-correct it toward the reference, keep its new frames and the
        motion frames for the next clip."""
        with self.home.stage(self.vae):
            video = self.vae.decode(latent.to(self.config.device))  # [3, frame_num, H, W]
        if prep.settings.color_correction > 0:
            video = color_match(video, prep.reference, prep.settings.color_correction)
        spill = prep.out_dir / FRAMES_SPILL_DIR
        spill.mkdir(exist_ok=True)
        path = spill / f"clip_{clip.index:04d}.npy"
        frames = _to_uint8_frames(clip_new_frames(video, clip))
        digest = hashlib.sha256()
        # A crash never leaves half a clip (atomic), and the record keeps the bytes' checksum.
        atomic_write(path, lambda f: np.save(_HashingWriter(f, digest), frames))
        _record_checksum(prep.out_dir, path.name, digest.hexdigest())
        prep.frame_files.append(path)
        if not clip.is_last:
            prep.motion = next_motion_frames(video, prep.settings.motion_frames).contiguous()

    def rewind(self, prep: Prepared, clip_index: int) -> None:
        """Forget clip ``clip_index`` and every later one (files too): the next clip rendered is that one,
        with the motion frames of the clip before it (or the reference image for the first)."""
        for path in prep.frame_files[clip_index:]:
            path.unlink(missing_ok=True)
        prep.frame_files = prep.frame_files[:clip_index]
        prep.motion = (
            _motion_from(prep.frame_files[-1], prep.settings.motion_frames, prep.reference.device)
            if prep.frame_files
            else None
        )

    def write_outputs(self, prep: Prepared) -> list[str]:
        """Mux the mp4 (atomically) with the mixed speech and subtitles; returns the output names.

        Every spilled clip is checked against its recorded checksum first: a damaged or missing one is
        never muxed. It and the later clips are removed and ``SpillDamagedError`` names it (the clip
        driver renders them again from their seeds)."""
        damaged = _first_damaged(prep.out_dir, prep.frame_files)
        if damaged is not None:
            index, why = damaged
            bad = prep.frame_files[index]
            self.rewind(prep, index)
            raise SpillDamagedError(index, f"{bad.name} {why}; it and the clips after it are rendered again")
        timeline = prep.timeline
        clips = [np.load(p, mmap_mode="r") for p in prep.frame_files]
        num_frames = sum(c.shape[0] for c in clips)
        height, width = clips[0].shape[1:3]
        write_video(
            (np.asarray(c) for c in clips),
            timeline.mix,
            timeline.sample_rate,
            prep.out_dir / OUTPUT_VIDEO,
            fps=FPS,
            subtitles=subtitles_within(timeline, num_frames / FPS),  # clip mode: its one clip's cues
        )
        meta = {
            "frames": int(num_frames),
            "fps": FPS,
            "size": [int(width), int(height)],
            "clips": prep.num_clips,
            "people": prep.spec.people,
            "settings": prep.settings.to_dict(),
            "scene": prep.scene.to_json(),
            "passes": prep.passes_record(),
            **length_record(timeline, prep.spec.dialogue, num_frames, prep.settings),
        }
        atomic_write_text(prep.out_dir / "render.json", json.dumps(meta, indent=1, ensure_ascii=False))
        names = [*OUTPUT_FILES, "render.json"]
        if self.config.save_frames:
            frames = np.concatenate(clips, axis=0)
            atomic_write(prep.out_dir / FRAMES_FILE, lambda f: np.save(f, frames))
            names.append(FRAMES_FILE)
        del clips
        shutil.rmtree(prep.out_dir / FRAMES_SPILL_DIR, ignore_errors=True)
        return [n for n in names if (prep.out_dir / n).is_file()]


SPILL_STATE = "state.json"
_HASH_CHUNK = 1 << 20


class SpillDamagedError(RuntimeError):
    """A spilled clip is missing or changed on disk; ``clip_index`` is where rendering must resume."""

    def __init__(self, clip_index: int, message: str) -> None:
        super().__init__(message)
        self.clip_index = clip_index


class _HashingWriter:
    """A write-only file wrapper that feeds everything written to ``digest``."""

    def __init__(self, f: Any, digest: Any) -> None:
        self._f, self._digest = f, digest

    def write(self, data: Any) -> int:
        self._digest.update(data)
        return self._f.write(data)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _record_checksum(out_dir: Path, name: str, digest: str) -> None:
    """Add one clip's checksum to the spill record (``.frames/state.json``, rewritten atomically)."""
    state = _read_spill_state(out_dir) or {}
    state.setdefault("checksums", {})[name] = digest
    atomic_write_text(out_dir / FRAMES_SPILL_DIR / SPILL_STATE, json.dumps(state))


def _first_damaged(out_dir: Path, files: list[Path]) -> tuple[int, str] | None:
    """``(index, why)`` of the first clip file that is missing, unrecorded or not what was written."""
    sums = (_read_spill_state(out_dir) or {}).get("checksums") or {}
    for index, path in enumerate(files):
        expected = sums.get(path.name) if isinstance(sums, dict) else None
        if not path.is_file():
            why = "is missing"
        elif not isinstance(expected, str):
            why = "has no recorded checksum"
        elif _sha256_file(path) != expected:
            why = "changed on disk after it was rendered (checksum mismatch)"
        else:
            continue
        logger.warning("spilled clip %s %s", path, why)
        return index, why
    return None


def _motion_from(path: Path, motion_frames: int, device: torch.device) -> torch.Tensor:
    """The next clip's motion frames from a saved clip: ``[3, motion_frames, H, W]`` in [-1, 1]."""
    last = np.load(path, mmap_mode="r")
    motion = torch.from_numpy(np.array(last[-motion_frames:], dtype=np.float32))
    return (motion.permute(3, 0, 1, 2) / 127.5 - 1.0).to(device).contiguous()


def _read_spill_state(out_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((out_dir / FRAMES_SPILL_DIR / SPILL_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("settings"), dict) else None


def _resume_or_reset(prep: Prepared) -> None:
    """Resume after the last clip an interrupted attempt finished, or start the spill folder afresh.

    An earlier attempt's clips are reused only when it rendered the same plan with the same settings
    (the inputs are the job's own saved files, and TTS, scene and noise are seeded). The next clip's
    motion frames come back from the last saved clip (its last ``motion_frames`` frames, 8-bit).
    """
    spill = prep.out_dir / FRAMES_SPILL_DIR
    state = {
        "settings": prep.settings.to_dict(),
        "num_audio_frames": prep.plan.num_audio_frames,
        "clips": len(prep.plan.clips),
    }
    done: list[Path] = []
    saved = _read_spill_state(prep.out_dir)
    if saved is not None and {k: saved.get(k) for k in state} == state:
        for clip in prep.plan.clips[:-1]:  # the last clip is cheap to redo and ends the job
            path = spill / f"clip_{clip.index:04d}.npy"
            if not path.is_file():
                break
            done.append(path)
        damaged = _first_damaged(prep.out_dir, done)
        if damaged is not None:  # re-rendered from its seed, like every clip after it
            logger.warning("resume: %s %s; rendering again from clip %d", done[damaged[0]].name, damaged[1],
                           damaged[0] + 1)  # fmt: skip
            for path in done[damaged[0] :]:
                path.unlink(missing_ok=True)
            done = done[: damaged[0]]
    if not done:
        shutil.rmtree(spill, ignore_errors=True)
        spill.mkdir(parents=True)
        atomic_write_text(spill / SPILL_STATE, json.dumps(state))
        return
    prep.motion = _motion_from(done[-1], prep.settings.motion_frames, prep.reference.device)
    prep.frame_files = done
    prep.start_clip = len(done)
    logger.info("resuming after %d finished clip(s) of %d", len(done), len(prep.plan.clips))


def clip_progress(prep: Prepared, clip: ClipSpec, step: int, total: int) -> tuple[float, str]:
    """Percent and stage text for step ``step`` of ``total`` in ``clip``."""
    done = (clip.index + step / max(total, 1)) / prep.num_clips
    pct = _PREPARE_END + (_RENDER_END - _PREPARE_END) * done
    return pct, f"clip {clip.index + 1} of {prep.num_clips}, step {step} of {total}"


def clip_stage(prep: Prepared, clip: ClipSpec, stage: str) -> tuple[float, str]:
    """Percent and stage text around ``clip``'s denoising: ``"conditioning"`` before it (CLIP and VAE
    encode of its conditioning), ``"decoding"`` after it (VAE decode and colour match)."""
    done = (clip.index + (1.0 if stage == "decoding" else 0.0)) / prep.num_clips
    pct = _PREPARE_END + (_RENDER_END - _PREPARE_END) * done
    return pct, f"{stage} clip {clip.index + 1} of {prep.num_clips}"


def expected_frames(audio_seconds: float, settings: GenerationSettings) -> int:
    """Frames a render of ``audio_seconds`` of speech produces (the audio length, capped)."""
    return min(math.floor(audio_seconds * FPS), settings.output_frame_cap)
