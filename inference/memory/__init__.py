"""The memory plan: which layout fits which GPUs, per rank and per stage (``python -m inference.memory``)."""

from inference.memory.plan import GIB, Layout, MemoryPlanError, Plan, Workload, plan
from inference.memory.sizes import ModelSizes

__all__ = ["GIB", "Layout", "MemoryPlanError", "ModelSizes", "Plan", "Workload", "plan"]
