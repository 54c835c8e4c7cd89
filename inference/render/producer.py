"""The producer stage (``--prepare_on producer``): one preparer for every replica group.

With ``--prepare_on group`` each group's leader prepares its own jobs (Kokoro, scene, wav2vec2, T5) and its
ranks wait meanwhile. With a producer, world rank 0 runs one more thread with its own front-half encoders
on ``--producer_device`` (``cpu`` or ``cuda:N``, optionally capped at ``--producer_memory_gib``): it
claims the next queued job, prepares it while the groups denoise, and leaves the result in the job's
folder (``.prepared/``: ``tensors.safetensors`` and ``meta.json``, written last, atomically). The job
waits in the store as ``preparing`` with hand-off ``ready`` until a free group takes it
(``service.group_claims``); the producer stays at most ``ahead`` prepared jobs in front of the groups
(a bounded hand-off). The group's leader loads the tensors onto its device (``HandoffLoader``), encodes
each clip's conditioning (CLIP, VAE) and decodes, as before.

The producer touches no process group: it is a plain thread with its own encoders. This module holds the
placement checks and the hand-off format; the thread and the group's loader, which talk to the job store,
are ``service.producer``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save

from common.files import atomic_write, atomic_write_text
from inference.render.pipeline import Prepared, _resume_or_reset
from inference.render.sampler import plan_clips
from inference.render.settings import GenerationSettings
from inference.render.spec import JobSpec
from inference.render.worker import StartupError
from inference.scene.compose import Scene
from tts.timeline import Timeline, TurnTiming

logger = logging.getLogger(__name__)

HANDOFF_DIR = ".prepared"
HANDOFF_VERSION = 1


# ---------------------------------------------------------------------------------------------- placement


def parse_producer_device(text: str) -> torch.device:
    """``cpu`` or ``cuda[:N]`` that this host can use; anything else is a start-up error naming the flag."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise StartupError("--producer_device", f"{text!r} is not a device; use cpu or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise StartupError("--producer_device", f"{text!r}: the producer runs on cpu or cuda:N")
    if not torch.cuda.is_available():
        raise StartupError("--producer_device", f"{text}: this torch finds no CUDA device; use cpu")
    index = 0 if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise StartupError(
            "--producer_device", f"{text}: this host has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def check_memory_cap(
    device: torch.device, memory_gib: float | None, process_devices: set[str]
) -> float | None:
    """The fraction of ``device`` that ``--producer_memory_gib`` allows, or None without a cap. A cap is
    enforced by the CUDA allocator per process and device: refused on a CPU, and on a device this process's
    ranks already compute on (``process_devices``), where it would cap them too."""
    if memory_gib is None:
        return None
    if memory_gib <= 0:
        raise StartupError("--producer_memory_gib", f"must be positive, got {memory_gib}")
    if device.type != "cuda":
        raise StartupError("--producer_memory_gib", "a memory cap is enforced by the CUDA allocator; on the CPU the "
                           "producer shares its process's memory with rank 0, so no cap can be honoured: drop the "
                           "flag or use --producer_device cuda:N")  # fmt: skip
    if str(device) in process_devices:
        raise StartupError("--producer_memory_gib", f"{device} is also rank 0's device and the cap is per process "
                           "and device, so it would cap the DiT too; put the producer on another GPU")  # fmt: skip
    total = torch.cuda.get_device_properties(device).total_memory
    if memory_gib * 2**30 > total:
        raise StartupError(
            "--producer_memory_gib", f"{memory_gib} GiB is more than {device} has ({total / 2**30:.1f} GiB)"
        )
    return memory_gib * 2**30 / total


def apply_memory_cap(device: torch.device, memory_gib: float | None, process_devices: set[str]) -> str:
    """Cap the producer's memory on ``device`` (``check_memory_cap``): past it the CUDA allocator refuses, so
    a job that needs more fails its preparation, never the service. Returns a description."""
    fraction = check_memory_cap(device, memory_gib, process_devices)
    if fraction is None:
        return "no memory cap"
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    total = torch.cuda.get_device_properties(device).total_memory
    return f"capped at {memory_gib:g} GiB of {total / 2**30:.1f} GiB"


# ---------------------------------------------------------------------------------------------- hand-off


def handoff_dir(out_dir: Path) -> Path:
    return Path(out_dir) / HANDOFF_DIR


def save_handoff(prep: Prepared, timings: dict[str, float]) -> Path:
    """Write what a group needs of ``prep`` into ``<out_dir>/.prepared/``; ``meta.json`` last (the marker).
    Tensors go to CPU memory in safetensors (no pickles); the scene images are the job's own
    ``reference.png`` and ``overlay.png``, which ``Renderer.prepare`` already wrote."""
    folder = handoff_dir(prep.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    scene, timeline = prep.scene, prep.timeline
    tensors = {
        "reference": prep.reference,
        "audio_emb": prep.audio_emb,
        "context": prep.context,
        "context_null": prep.context_null,
        "masks": prep.masks,
        "tracks": torch.from_numpy(np.asarray(timeline.tracks)),
        "scene_masks": torch.from_numpy(np.asarray(scene.masks)),
        "scene_latent_masks": torch.from_numpy(np.asarray(scene.latent_masks)),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(folder / "tensors.safetensors", lambda f: f.write(save(tensors)))
    meta = {
        "version": HANDOFF_VERSION,
        "settings": prep.settings.to_dict(),
        "timeline": {
            "sample_rate": timeline.sample_rate,
            "speaker_names": list(timeline.speaker_names),
            "turns": [t.to_dict() for t in timeline.turns],
        },  # fmt: skip
        "scene": {
            "bucket": list(scene.bucket),
            "boxes": [list(b) for b in scene.boxes],
            "size": scene.size,
            "layout": scene.layout,
            "names": list(scene.names),
        },  # fmt: skip
        "timings": {k: float(v) for k, v in timings.items()},
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta))
    return folder


def load_handoff(spec: JobSpec, out_dir: Path, device: torch.device) -> tuple[Prepared, dict[str, float]]:
    """The ``Prepared`` a producer left in ``out_dir`` with its tensors on ``device``, resumed after the last
    clip an earlier attempt finished (as ``Renderer.prepare`` does); and the producer's stage timings."""
    folder = handoff_dir(out_dir)
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("version") != HANDOFF_VERSION:
        raise ValueError(f"hand-off version {meta.get('version')!r}, this code reads {HANDOFF_VERSION}")
    t = load_file(str(folder / "tensors.safetensors"))
    settings = GenerationSettings.from_dict(meta["settings"])
    tl = meta["timeline"]
    timeline = Timeline(int(tl["sample_rate"]), t["tracks"].numpy(), [TurnTiming(**d) for d in tl["turns"]],
                        tuple(tl["speaker_names"]))  # fmt: skip
    sc = meta["scene"]
    with Image.open(out_dir / "reference.png") as im, Image.open(out_dir / "overlay.png") as ov:
        image, overlay = im.convert("RGB"), ov.convert("RGB")
    scene = Scene(image=image, bucket=tuple(sc["bucket"]), boxes=tuple(tuple(b) for b in sc["boxes"]),
                  masks=t["scene_masks"].numpy(), latent_masks=t["scene_latent_masks"].numpy(), overlay=overlay,
                  size=int(sc["size"]), layout=sc["layout"], names=tuple(sc["names"]))  # fmt: skip
    audio_emb = t["audio_emb"]
    prep = Prepared(
        spec=spec,
        settings=settings,
        out_dir=Path(out_dir),
        timeline=timeline,
        scene=scene,
        reference=t["reference"].to(device),
        audio_emb=audio_emb,
        context=t["context"].to(device),
        context_null=t["context_null"].to(device),
        masks=t["masks"].to(device),
        plan=plan_clips(int(audio_emb.shape[1]), settings),
    )
    _resume_or_reset(
        prep
    )  # the spill state the producer's prepare() checked; a group may have rendered since
    return prep, {k: float(v) for k, v in meta.get("timings", {}).items()}
