"""Per-job statistics: ``stats.json`` beside every finished video, and every rank's peak memory per clip.

``stats.json`` (written atomically by the group leader when the video is muxed)::

    {"job_id", "seed", "frames", "fps", "seconds", "clips", "size": [w, h], "steps",
     "timings": {"tts_time": s, ..., "total_time": s},        # the stages the store also lists
     "throughput": {"frames_per_second": f, "video_seconds_per_hour": ...},
     "passes": {"passes", "computed", "skipped", "model_calls", "per_clip": [...], "resumed_after_clip"},
     "memory": {"kind": "cuda_max_allocated" | "process_max_rss", "peak_bytes": {rank: bytes}},
     "group": {"group", "groups", "ranks", "devices", "node"}, "prepared_on": "group" | "producer",
     "versions": {"python", "torch", ...}, "finished_at": unix seconds}

``peak_bytes`` is, per world rank, the most memory that rank held while denoising this job's clips: on
CUDA the allocator's peak (reset before each clip), on a CPU the process's peak resident set (which
never goes down, so it is an upper bound for the job).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import platform
import resource
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.files import atomic_write_text
from inference.parallel.context import ParallelContext
from inference.parallel.groups import ReplicaGroup

logger = logging.getLogger(__name__)

STATS_FILE = "stats.json"
PACKAGES = ("torch", "transformers", "diffusers", "kokoro", "gradio", "numpy", "av")


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window on ``device`` (CUDA only; a process's RSS peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def local_peak_bytes(device: torch.device) -> int:
    """This rank's peak memory: the CUDA allocator's peak since ``reset_peak``, else the process's max RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def memory_kind(device: torch.device) -> str:
    return "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"


def gather_peak_bytes(ctx: ParallelContext) -> torch.Tensor:
    """Every rank's ``local_peak_bytes`` as int64 [world_size] (group order). A collective on the data
    group: every rank of the group calls it at the same point (the end of a clip)."""
    local = torch.tensor([local_peak_bytes(ctx.device)], dtype=torch.int64, device=ctx.device)
    if not ctx.distributed:
        return local.cpu()
    out = torch.empty(ctx.world_size, dtype=torch.int64, device=ctx.device)
    dist.all_gather_into_tensor(out, local, group=ctx.data)
    return out.cpu()


def merge_peaks(old: Sequence[int], new: Sequence[int]) -> list[int]:
    """Element-wise max of two per-rank peak lists (the first clip's list when ``old`` is empty)."""
    if not old:
        return [int(v) for v in new]
    return [max(int(a), int(b)) for a, b in zip(old, new, strict=True)]


def software_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def build_stats(
    *,
    job_id: str,
    render: Mapping[str, Any],
    timings: Mapping[str, float],
    group: ReplicaGroup,
    peak_bytes: Sequence[int],
    memory: str,
    prepared_on: str,
) -> dict[str, Any]:
    """The ``stats.json`` record from the job's ``render.json`` contents (``render``) and its timings."""
    frames, fps = int(render["frames"]), float(render["fps"])
    settings = render.get("settings", {})
    total = float(timings.get("total_time", 0.0))
    video_s = frames / fps if fps > 0 else 0.0
    ranks = group.ranks if len(peak_bytes) == group.size else tuple(range(len(peak_bytes)))
    return {
        "job_id": job_id,
        "seed": settings.get("seed"),
        "steps": settings.get("steps"),
        "frames": frames,
        "fps": fps,
        "seconds": round(video_s, 3),
        "clips": int(render["clips"]),
        "size": list(render.get("size", [])),
        "timings": {k: round(float(v), 4) for k, v in sorted(timings.items())},
        "throughput": {
            "frames_per_second": round(frames / total, 4) if total > 0 else None,
            "video_seconds_per_hour": round(3600.0 * video_s / total, 2) if total > 0 else None,
        },
        "passes": render.get("passes", {}),
        "memory": {
            "kind": memory,
            "peak_bytes": {str(r): int(b) for r, b in zip(ranks, peak_bytes, strict=True)},
        },
        "group": group.to_json(),
        "prepared_on": prepared_on,
        "versions": software_versions(),
        "finished_at": round(time.time(), 3),
    }


def write_stats(out_dir: Path, stats: Mapping[str, Any]) -> str:
    """Write ``stats.json`` into ``out_dir`` atomically; returns its name."""
    atomic_write_text(Path(out_dir) / STATS_FILE, json.dumps(stats, indent=1, ensure_ascii=False))
    return STATS_FILE


def read_stats(out_dir: Path) -> dict[str, Any] | None:
    """A job's ``stats.json``, or None when it has none (or it does not read back)."""
    try:
        data = json.loads((Path(out_dir) / STATS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
