"""The model stage: ``DiTConfig``, the MultiTalk DiT (single-device math, official key names), its
attention kernels and the ``sp`` seam (``NoParallel``). Nothing here imports the process-group API or
``inference.parallel``; the parallel implementations plug in through the ``sp`` object."""

from inference.model.config import ConfigError, DiTConfig
from inference.model.dit import MultiTalkDiT, build_model
from inference.model.layers import ModelInputError
from inference.model.sp import NoParallel, SequenceParallelism

__all__ = [
    "ConfigError",
    "DiTConfig",
    "ModelInputError",
    "MultiTalkDiT",
    "NoParallel",
    "SequenceParallelism",
    "build_model",
]
