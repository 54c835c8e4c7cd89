"""Measure the bytes of live tensors: a ``TorchDispatchMode`` that sees every tensor an op creates.

``LiveTensors`` registers each storage an op returns that none of its inputs already had (views and
in-place results add nothing) and follows it until it is freed (a weak finalizer on the storage object,
which torch keeps unique per storage). Sizes are read again after every op, so storages that FSDP2 frees
and re-allocates in place (``resize_``) are counted while they hold memory. It measures tensors, not the
process: the caching allocator's rounding, host RSS and buffers a kernel allocates and frees inside one
op are out of it. Tensors that existed before tracking started (weights, inputs) are not seen; the caller
adds them as known resident bytes.

    with LiveTensors() as live:
        out = model(x)
    live.peak            # most bytes alive at once since tracking started
    live.peak_tensors    # what was alive at that moment, largest first (with snapshot=True)
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveTensor:
    """One storage alive at the peak: the op that made it, the tensor's shape and dtype, its bytes."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class LiveTensors(TorchDispatchMode):
    """Bytes of the storages created since ``__enter__`` that are still alive; ``peak`` is the maximum.

    ``devices`` limits counting to tensors on those device types (default: every device but meta).
    ``snapshot=True`` keeps the list of live tensors at the peak (``peak_tensors``).
    """

    def __init__(self, devices: tuple[str, ...] | None = None, snapshot: bool = False) -> None:
        super().__init__()
        self.devices = devices
        self.snapshot = snapshot
        self.live = 0
        self.peak = 0
        self.peak_tensors: list[LiveTensor] = []
        self._alive: dict[int, tuple[weakref.ref, str, tuple[int, ...], torch.dtype]] = {}

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now (at a stage boundary)."""
        self._refresh()
        self.peak = self.live
        if self.snapshot:
            self.peak_tensors = self._listing()

    def _listing(self) -> list[LiveTensor]:
        out = []
        for ref, op, shape, dtype in self._alive.values():
            storage = ref()
            if storage is not None and storage.nbytes():
                out.append(LiveTensor(op, shape, dtype, storage.nbytes()))
        return sorted(out, key=lambda t: -t.nbytes)

    def _refresh(self) -> None:
        total = 0
        for ref, *_ in self._alive.values():
            storage = ref()
            if storage is not None:
                total += storage.nbytes()
        self.live = total

    def _register(self, t: torch.Tensor, op: str, inputs: set[int]) -> None:
        if self.devices is None and t.device.type == "meta":
            return
        if self.devices is not None and t.device.type not in self.devices:
            return
        key = _storage_key(t)
        if key < 0 or key in self._alive or key in inputs:  # a view or an in-place result: no new memory
            return
        storage = t.untyped_storage()
        self._alive[key] = (weakref.ref(storage), op, tuple(t.shape), t.dtype)
        weakref.finalize(storage, self._alive.pop, key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._register(t, name, inputs)
        self._refresh()
        if self.live > self.peak:
            self.peak = self.live
            if self.snapshot:
                self.peak_tensors = self._listing()
        return out


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return -1
