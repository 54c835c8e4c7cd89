"""Weights that live in CPU memory and visit the GPU: offloaded encoders and streamed DiT blocks.

Both work by repointing a module's parameters and buffers (``param.data``): a *host copy* of every tensor
stays in CPU memory for the life of the process (pinned when CUDA is there, so copies can run
asynchronously); ``load`` copies it to the compute device, ``release`` drops the device copy and points the
module back at the host copy. Inference never changes weights, so nothing is copied back. Tied parameters
(one ``Parameter`` under two names) are copied once and stay tied.

- ``--offload_model true`` (``EncoderHome``): T5, CLIP and the VAE live in CPU memory and are on the GPU only
  inside their stage (``with home.stage(t5): ...``). wav2vec2 runs on the CPU as upstream runs it.
- ``--num_persistent_param_in_dit N`` (``stream_blocks``): at most N DiT parameters stay on the GPU (the
  root first, then whole blocks in order); every other block is copied in just before its forward and
  dropped after it, the next streamed block's copy running on a side stream while the current block
  computes (CUDA). 0 is the least memory: only two blocks (and the root during a forward) on the GPU.
  Works with Ulysses (blocks are plain modules); FSDP2 manages its parameters itself, so the two are not
  combined (``check_streaming``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from inference.parallel.layout import ParallelConfigError

logger = logging.getLogger(__name__)


def check_streaming(num_persistent: int | None, dit_fsdp: str, world_size: int) -> None:
    """Start-up check of ``--num_persistent_param_in_dit``: a count of parameters, not with FSDP2."""
    if num_persistent is None:
        return
    if num_persistent < 0:
        raise ParallelConfigError(
            "num_persistent_param_in_dit",
            f"a count of parameters, 0 (least GPU memory) or more; got {num_persistent}",
        )
    if dit_fsdp != "off" and world_size > 1:
        from inference.memory.plan import streaming_fsdp_reason

        raise ParallelConfigError("num_persistent_param_in_dit", streaming_fsdp_reason(dit_fsdp))


class HostCopy:
    """The parameters and buffers of some modules, kept in CPU memory and copied to a device on demand.

    Args:
        modules: whose *own* tensors (``recurse=False``) this copy manages; pass ``m.modules()`` for a subtree.
        pin: page-lock the host tensors (needs CUDA) so device copies can be asynchronous.

    After construction the modules point at the host copies (no device memory).
    """

    def __init__(self, modules: Iterable[nn.Module], pin: bool = False) -> None:
        self._params: list[nn.Parameter] = []
        self._param_host: list[torch.Tensor] = []
        self._buffers: list[tuple[list[tuple[nn.Module, str]], torch.Tensor]] = []
        seen: dict[int, int] = {}
        buffers: dict[int, int] = {}
        for module in modules:
            for p in module._parameters.values():
                if p is None or id(p) in seen:
                    continue
                seen[id(p)] = len(self._params)
                self._params.append(p)
                self._param_host.append(_host(p.data, pin))
            for name, b in module._buffers.items():
                if b is None:
                    continue
                if id(b) in buffers:
                    self._buffers[buffers[id(b)]][0].append((module, name))
                    continue
                buffers[id(b)] = len(self._buffers)
                self._buffers.append(([(module, name)], _host(b, pin)))
        self.loaded_on: torch.device | None = None
        self.release()

    @property
    def nbytes(self) -> int:
        tensors = [*self._param_host, *(h for _, h in self._buffers)]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self._param_host)

    def device_tensors(self) -> list[torch.Tensor]:
        """The tensors the modules use now (device copies while loaded)."""
        return [p.data for p in self._params] + [
            owners[0][0]._buffers[owners[0][1]] for owners, _ in self._buffers
        ]

    def load(self, device: torch.device, non_blocking: bool = False) -> None:
        """Point the modules at fresh copies on ``device`` (always a copy, also on the CPU)."""
        for p, host in zip(self._params, self._param_host, strict=True):
            p.data = host.to(device, non_blocking=non_blocking, copy=True)
        for owners, host in self._buffers:
            copy = host.to(device, non_blocking=non_blocking, copy=True)
            for module, name in owners:
                module._buffers[name] = copy
        self.loaded_on = torch.device(device)

    def release(self) -> None:
        """Point the modules back at the host copies; the device copies are freed once nothing uses them."""
        for p, host in zip(self._params, self._param_host, strict=True):
            p.data = host
        for owners, host in self._buffers:
            for module, name in owners:
                module._buffers[name] = host
        self.loaded_on = None


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not pin or not _plain(t) or t.is_pinned():  # quantised weights (tensor subclasses) stay pageable
        return t
    return t.pin_memory()


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def _can_pin(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


# ---------------------------------------------------------------------------------------- encoders


class EncoderHome:
    """Where rank 0's encoders live between their stages.

    Without offload every encoder stays on the compute device and ``stage`` does nothing. With offload,
    ``add`` moves an encoder (an object with a ``.model`` module, such as ``T5Encoder`` or ``WanVae``) to
    CPU memory; ``stage`` puts it on the device for the ``with`` block and takes it off again. Small tensors
    the wrapper holds itself (the VAE's latent mean and scale) follow it.
    """

    def __init__(self, device: torch.device | str, offload: bool) -> None:
        self.device = torch.device(device)
        self.offload = offload
        self._homes: dict[int, tuple[HostCopy, dict[str, torch.Tensor]]] = {}

    def add(self, encoder: object) -> object:
        """Register ``encoder``; with offload its weights move to CPU memory now. Returns ``encoder``."""
        if not self.offload:
            return encoder
        model = encoder.model  # type: ignore[attr-defined]
        copy = HostCopy(model.modules(), pin=_can_pin(self.device))
        extras = {k: v for k, v in vars(encoder).items() if isinstance(v, torch.Tensor)}
        for name, t in extras.items():
            setattr(encoder, name, t.to("cpu"))
        self._homes[id(encoder)] = (copy, {k: v.to("cpu") for k, v in extras.items()})
        logger.info("%s offloaded to CPU memory (%.1f MiB)", type(encoder).__name__, copy.nbytes / 2**20)
        return encoder

    @contextlib.contextmanager
    def stage(self, *encoders: object) -> Iterator[None]:
        """The encoders are on the device inside the block (nothing happens without offload)."""
        moved = [e for e in encoders if id(e) in self._homes]
        try:
            for encoder in moved:
                copy, extras = self._homes[id(encoder)]
                copy.load(self.device)
                for name, t in extras.items():
                    setattr(encoder, name, t.to(self.device))
            yield
        finally:
            for encoder in moved:
                copy, extras = self._homes[id(encoder)]
                copy.release()
                for name, t in extras.items():
                    setattr(encoder, name, t)


# ---------------------------------------------------------------------------------------- DiT blocks


@dataclass(frozen=True)
class StreamPlan:
    """Which units of the DiT stay on the device for ``budget`` resident parameters."""

    budget: int
    root_persistent: bool
    persistent_blocks: int
    num_blocks: int
    resident_params: int

    def describe(self) -> str:
        streamed = self.num_blocks - self.persistent_blocks
        root = "root and " if self.root_persistent else ""
        return (
            f"{root}{self.persistent_blocks} of {self.num_blocks} blocks resident "
            f"({self.resident_params:,} parameters, budget {self.budget:,}); {streamed} streamed"
        )


def plan_streaming(model: nn.Module, budget: int) -> StreamPlan:
    """The root (every parameter outside ``model.blocks``) first, then whole blocks in order, while the
    total stays within ``budget`` parameters. The memory plan fills it the same way."""
    blocks = model.blocks
    block_numels = [sum(p.numel() for p in b.parameters()) for b in blocks]
    root = sum(p.numel() for p in model.parameters()) - sum(block_numels)
    root_kept = root <= budget
    used = root if root_kept else 0
    kept = 0
    for n in block_numels:
        if used + n > budget:
            break
        used += n
        kept += 1
    return StreamPlan(budget, root_kept, kept, len(blocks), used)


class BlockStreamer:
    """Streams the blocks of a DiT (``model.blocks``) from host memory to ``device`` around each forward.

    Hooks on every streamed block load it before its forward (or wait for its prefetch) and release it
    after; loading block ``i`` also starts the copy of the next streamed block, on a side stream with CUDA,
    so at most two streamed blocks are on the device at once. A streamed root (embeddings, adapters, head)
    is loaded for the model's whole forward. Results are bit-identical to a resident model: the same
    tensors in the same order, only their location changes.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, num_persistent: int) -> None:
        self.model = model
        self.device = torch.device(device)
        self.plan = plan_streaming(model, num_persistent)
        pin = _can_pin(self.device)
        blocks = list(model.blocks)
        root_modules = [m for name, m in model.named_modules() if not _in_blocks(name)]
        self._root = None if self.plan.root_persistent else HostCopy(root_modules, pin)
        self._copies: dict[int, HostCopy] = {}
        for i, block in enumerate(blocks):
            if i < self.plan.persistent_blocks:
                block.to(self.device)
            else:
                self._copies[i] = HostCopy(block.modules(), pin)
        if self.plan.root_persistent:
            for m in root_modules:
                for p in m._parameters.values():
                    if p is not None:
                        p.data = p.data.to(self.device)
                for name, b in m._buffers.items():
                    if b is not None:
                        m._buffers[name] = b.to(self.device)
        self._order = sorted(self._copies)
        self._pending: dict[int, torch.cuda.Event | None] = {}
        # Copies overlap compute on a side stream (CUDA, plain tensors); quantised weights (tensor subclasses)
        # are copied on the compute stream, where no cross-stream bookkeeping is needed.
        plain = all(_plain(t) for c in self._copies.values() for t in c._param_host)
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" and plain else None
        self._handles = []
        for i in self._order:
            block = blocks[i]
            self._handles.append(block.register_forward_pre_hook(lambda _m, _a, i=i: self._enter(i)))
            self._handles.append(block.register_forward_hook(lambda _m, _a, _o, i=i: self._leave(i)))
        self._handles.append(model.register_forward_pre_hook(lambda _m, _a: self._model_enter()))
        self._handles.append(model.register_forward_hook(lambda _m, _a, _o: self._model_leave()))
        logger.info("DiT streaming on %s: %s", self.device, self.plan.describe())

    def remove(self) -> None:
        """Detach the hooks (the weights stay where they are)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _prefetch(self, i: int) -> None:
        if i in self._pending:
            return
        copy = self._copies[i]
        if self._side is None:
            copy.load(self.device)
            self._pending[i] = None
            return
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            copy.load(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._side)
        self._pending[i] = event

    def _next_after(self, i: int) -> int | None:
        later = [j for j in self._order if j > i]
        return later[0] if later else None

    def _enter(self, i: int) -> None:
        self._prefetch(i)
        event = self._pending[i]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in self._copies[i].device_tensors():
                t.record_stream(current)  # made on the side stream, used on this one
        nxt = self._next_after(i)
        if nxt is not None:
            self._prefetch(nxt)

    def _leave(self, i: int) -> None:
        self._copies[i].release()
        self._pending.pop(i, None)

    def _model_enter(self) -> None:
        if self._root is not None:
            self._root.load(self.device)
        if self._order:
            self._prefetch(self._order[0])  # overlaps the embeddings

    def _model_leave(self) -> None:
        if self._root is not None:
            self._root.release()


def _in_blocks(name: str) -> bool:
    return name == "blocks" or name.startswith("blocks.")


def stream_blocks(model: nn.Module, device: torch.device | str, num_persistent: int) -> BlockStreamer:
    """Keep at most ``num_persistent`` parameters of ``model`` (built in CPU memory) on ``device`` and stream
    the rest per forward; see ``BlockStreamer``."""
    if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        raise ParallelConfigError(
            "num_persistent_param_in_dit", f"{type(model).__name__} has no blocks to stream"
        )
    if num_persistent < 0:
        raise ParallelConfigError(
            "num_persistent_param_in_dit",
            f"a count of parameters, 0 (least GPU memory) or more; got {num_persistent}",
        )
    return BlockStreamer(model, device, num_persistent)
