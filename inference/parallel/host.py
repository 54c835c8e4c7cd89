"""What this host gives a rank: its device, its CPU threads and its free device memory.

- ``resolve_device``: the device a preset runs on. A CPU-only torch on a GPU host would otherwise fall
  back to the CPU and gloo without a word and load the 14B DiT in fp32 (~75 GB per rank); the 14B
  preset on a CPU is refused unless ``--device cpu`` asks for it.
- ``configure_cpu_threads``: torchrun sets ``OMP_NUM_THREADS=1`` when it starts several processes, so
  rank 0's CPU work (Kokoro, wav2vec2, a CPU T5) would run on one thread; each local process gets its
  share of the cores this process may use instead.
- ``free_device_bytes``: the memory a rank can still allocate. The driver's free figure
  (``mem_get_info``) counts blocks PyTorch freed but keeps cached as used; they are free to PyTorch.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from inference.parallel.layout import ParallelConfigError

logger = logging.getLogger(__name__)

CPU_ONLY_PRESETS = frozenset({"tiny"})  # presets meant to run on a CPU; any other needs a GPU or --device cpu


# ---------------------------------------------------------------------------------------- memory


def free_device_bytes(driver_free: int, reserved: int, allocated: int) -> int:
    """Bytes a PyTorch process can still allocate on its device.

    ``driver_free``: the driver's free memory (``torch.cuda.mem_get_info``); ``reserved``: memory the
    caching allocator holds (``memory_reserved``); ``allocated``: the part of it in live tensors
    (``memory_allocated``). Cached but unused blocks (``reserved - allocated``) are free to PyTorch.
    """
    if min(driver_free, reserved, allocated) < 0 or allocated > reserved:
        raise ValueError(
            f"inconsistent allocator figures: free {driver_free}, reserved {reserved}, allocated {allocated}"
        )
    return driver_free + reserved - allocated


def device_free_bytes(device: torch.device) -> int:
    """``free_device_bytes`` from the allocator of a CUDA ``device``."""
    driver_free, _ = torch.cuda.mem_get_info(device)
    return free_device_bytes(
        driver_free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    )


# ---------------------------------------------------------------------------------------- threads


def cpu_threads_per_process(cores: int, local_world_size: int) -> int:
    """This process's share of ``cores`` when ``local_world_size`` processes run on the host."""
    return max(1, cores // max(1, local_world_size))


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_cpu_threads(environ: Mapping[str, str] | None = None, cores: int | None = None) -> int:
    """Set torch's intra-op threads for this rank and return the count.

    One process: what ``OMP_NUM_THREADS`` says, else torch's default. Several local processes
    (``LOCAL_WORLD_SIZE`` > 1): ``OMP_NUM_THREADS=1`` is torchrun's default, not a choice, so each
    process gets ``cores // LOCAL_WORLD_SIZE`` threads; another explicit value is kept.
    """
    env = os.environ if environ is None else environ
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1") or "1")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if local_world <= 1 or (omp and omp != "1"):
        threads = int(omp) if omp.isdigit() and int(omp) > 0 else torch.get_num_threads()
        why = f"OMP_NUM_THREADS={omp}" if omp else "torch's default"
    else:
        cores = available_cores() if cores is None else cores
        threads = cpu_threads_per_process(cores, local_world)
        why = f"{cores} cores / {local_world} local processes"
    torch.set_num_threads(threads)
    logger.info("rank %s: %d CPU threads (%s)", env.get("RANK", "0"), threads, why)
    return threads


# ---------------------------------------------------------------------------------------- device


@dataclass(frozen=True)
class HostGpus:
    """What the host and the installed torch say about GPUs."""

    torch_version: str
    torch_cuda: str | None  # CUDA version torch was built with; None for a CPU-only build
    cuda_available: bool
    host_gpus: int  # NVIDIA GPUs nvidia-smi lists (0 when it is absent)

    @classmethod
    def probe(cls) -> HostGpus:
        """The installed torch, and (only when it finds no GPU) what ``nvidia-smi`` lists."""
        available = torch.cuda.is_available()
        return cls(torch.__version__, torch.version.cuda, available, 0 if available else count_host_gpus())


def count_host_gpus(timeout_s: float = 20.0) -> int:
    """NVIDIA GPUs on this host according to ``nvidia-smi -L`` (0 when it is missing or fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def resolve_device(preset: str, requested: str | None, gpus: HostGpus) -> str | None:
    """The device to run ``preset`` on: ``requested`` as given, or None (cuda:LOCAL_RANK when CUDA works).

    Raises ``ParallelConfigError`` (field ``device``) for a CUDA device torch cannot use, and for a
    GPU preset that would fall back to the CPU without ``--device cpu``.
    """
    if requested is not None:
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise ParallelConfigError(
                "device", f"not a torch device: {requested!r} (cpu, cuda or cuda:N)"
            ) from None
        if dev.type not in ("cpu", "cuda"):
            raise ParallelConfigError("device", f"unsupported device {requested!r}; use cpu, cuda or cuda:N")
        if dev.type == "cuda" and not gpus.cuda_available:
            raise ParallelConfigError("device", f"{requested} asked for, but {_no_cuda_reason(gpus)}")
        return requested
    if gpus.cuda_available:
        return None
    if preset not in CPU_ONLY_PRESETS:
        raise ParallelConfigError(
            "device",
            f"the {preset} preset needs a GPU, but {_no_cuda_reason(gpus)}. On the CPU it would load in "
            "fp32 (about 75 GB of RAM per process); pass --device cpu to run it there anyway",
        )
    if gpus.host_gpus:
        logger.warning("%s; the %s preset runs on the CPU", _no_cuda_reason(gpus), preset)
    return None


def _no_cuda_reason(gpus: HostGpus) -> str:
    if gpus.torch_cuda is None:
        reason = f"torch {gpus.torch_version} is a CPU-only build"
        if gpus.host_gpus:
            reason += (
                f" although nvidia-smi lists {gpus.host_gpus} GPU(s): install the CUDA build "
                "(bash launch/setup.sh chooses it on a GPU host)"
            )
        return reason
    return f"torch {gpus.torch_version} (CUDA {gpus.torch_cuda}) finds no usable GPU"
