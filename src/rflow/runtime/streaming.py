"""The block-streaming machinery behind :func:`rflow.runtime.offload.offload_`.

A :class:`Streamer` owns a model's streamed blocks. Each block's parameters and buffers (quantized
layers keep their packed weights in buffers) are packed into one flat host buffer — pinned when the
device is a CUDA GPU — at :data:`ALIGN`-byte offsets; between uses every tensor of the block is a view
into that buffer, so module classes, shapes, dtypes and ``state_dict`` stay what they were. A few
device buffers ("slots") of the largest streamed block's size, ``prefetch + 1`` of them, are
allocated once and reused.

Forward: before block i runs (a forward pre-hook) its host buffer is copied into a slot on a side
stream — one copy per block — and the compute stream waits on that copy's event; its tensors become
views of the slot. Blocks i+1 … i+prefetch in execution order (wrapping to the next model call) are
copied while i computes. After block i (a forward hook, run even when the block raises) its tensors
point at the host buffer again; before a slot is refilled the side stream waits on an event recorded
on the compute stream at that moment, so kernels still reading the slot finish first. Nothing waits
on the host per block. The model's own pre-hook starts a call: it counts steps and prefetches the
first streamed blocks while the embedders run.

Backward (training): while a streamed block runs with grad enabled, saved-tensor hooks
(``torch.autograd.graph.saved_tensors_hooks``) replace every tensor autograd saves that lives in the
block's slot — its weights and views of them — by a small record; in backward the record fetches the
block again (prefetching the blocks before it, in reverse order) and returns the same view of its new
slot. Gradient checkpointing recomputes a block's forward in backward without calling its hooks: it
does so inside :meth:`Streamer.recompute`, which binds the block to a slot the same way. Streamed weights are frozen: a parameter that requires grad is not streamed (LoRA adapters stay
resident with their gradients and optimizer state). A quantized layer computing in "dequant" mode
saves its dequantized weight, which is not slot memory: autograd keeps that dense weight until
backward (recomputing it there is not done yet).

On the CPU the same schedule runs: slots are CPU tensors, copies are CPU copies, and streams and
events are no-op stand-ins (:class:`NullStreams`), so tests drive every step without a CUDA call.
:attr:`Streamer.log` records each block's start, end and fetch (why: "fetch" on demand, "prefetch",
"backward") per step; :attr:`Streamer.stats` counts fetches, bytes and the most blocks materialised
at once (fetched and not yet finished). One streamer serves one thread.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

ALIGN = 512  # bytes between tensors in a block buffer: the CUDA caching allocator's granularity
LOG_LIMIT = 100_000  # log entries and per-step byte counts kept (the totals in ``stats`` are never cut)


def aligned(n: int) -> int:
    return -(-int(n) // ALIGN) * ALIGN


# ---------------------------------------------------------------------------------------------- streams


class NullEvent:
    """A CUDA event's stand-in on the CPU, where every copy is complete when it returns."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class NullStream:
    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass


class NullStreams:
    """The CPU's streams and events: no-ops (CPU copies are synchronous)."""

    def __init__(self):
        self.side = self._compute = NullStream()

    def compute(self):
        return self._compute

    def event(self):
        return NullEvent()

    def on_side(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


class CudaStreams:
    """A side stream for the copies; the compute stream is whichever is current when a block runs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)

    def compute(self):
        return torch.cuda.current_stream(self.device)

    def event(self):
        return torch.cuda.Event()

    def on_side(self):
        return torch.cuda.stream(self.side)

    def close(self) -> None:
        self.side.synchronize()


# ---------------------------------------------------------------------------------------------- blocks


@dataclass(eq=False)
class _Entry:
    """One tensor of a block: where it is registered and where it sits in the block's buffer."""

    module: nn.Module
    name: str
    param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def streamable(module: nn.Module, keep: set[int]) -> list[tuple[nn.Module, str, bool, Tensor]]:
    """(owner, name, is_parameter, tensor) of every tensor of ``module`` that streaming moves: buffers and
    frozen parameters, less the tensors whose ids are in ``keep`` (shared with other parts)."""
    out = []
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None and not p.requires_grad and id(p) not in keep:
                out.append((mod, name, True, p))
        for name, b in mod._buffers.items():
            if b is not None and id(b) not in keep:
                out.append((mod, name, False, b))
    return out


def span(tensors) -> int:
    """Bytes a block buffer needs for ``tensors`` (each aligned; a tensor registered twice counted once)."""
    seen = {id(t): aligned(t.numel() * t.element_size()) for *_, t in tensors}
    return sum(seen.values())


@dataclass(eq=False)
class Block:
    name: str
    index: int  # position among the streamed blocks, in execution order
    module: nn.Module
    entries: list[_Entry]
    span: int  # bytes of the buffer (aligned)
    host: Tensor  # flat uint8 buffer holding every entry
    slot: "Slot | None" = None
    live: bool = False  # fetched and not yet finished
    saving: object = None  # the saved-tensor hooks entered while the block runs with grad
    _views: dict = field(default_factory=dict)

    @classmethod
    def pack(cls, name: str, index: int, module: nn.Module, keep: set[int], pin: bool) -> "Block":
        """Copy the block's streamable tensors into one host buffer and point them at it."""
        tensors = streamable(module, keep)
        host = torch.empty(span(tensors) or ALIGN, dtype=torch.uint8, pin_memory=pin)
        entries, offsets, off = [], {}, 0
        for mod, pname, is_param, t in tensors:
            n = t.numel() * t.element_size()
            if id(t) not in offsets:
                offsets[id(t)] = off
                if n:
                    host[off : off + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
                off += aligned(n)
            entries.append(_Entry(mod, pname, is_param, offsets[id(t)], n, t.dtype, tuple(t.shape)))
        block = cls(name, index, module, entries, host.numel(), host)
        block.bind(host)
        return block

    def views(self, buf: Tensor) -> list[Tensor]:
        """The entries as views of ``buf`` (the host buffer or a slot), cached per buffer."""
        key = buf.data_ptr()
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = [buf[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)
                                    for e in self.entries]
        return v

    def bind(self, buf: Tensor) -> None:
        """Point every entry's parameter or buffer at its place in ``buf``."""
        for e, v in zip(self.entries, self.views(buf)):
            if e.param:
                e.module._parameters[e.name].data = v
            else:
                e.module._buffers[e.name] = v

    def tensor_ids(self) -> set[int]:
        """Ids of the parameter and buffer objects the block streams, as registered now."""
        return {id(e.module._parameters[e.name] if e.param else e.module._buffers[e.name]) for e in self.entries}


@dataclass(eq=False)
class Slot:
    buf: Tensor  # flat uint8 on the device
    ready: object  # event: the last copy into buf is done (recorded on the side stream)
    free: object  # event: the kernels enqueued before the last refill are done (compute stream)
    block: Block | None = None

    @property
    def ptr(self) -> int:
        return self.buf.untyped_storage().data_ptr()


class LogEntry(NamedTuple):
    step: int  # model calls started so far (0 before the first)
    kind: str  # "start" | "end" | "fetch" | "prefetch" | "backward"
    block: str
    nbytes: int = 0  # bytes copied (fetches)


class _Saved(NamedTuple):
    """What autograd keeps of a saved tensor that lives in a block's slot."""

    block: Block
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


# ---------------------------------------------------------------------------------------------- the streamer


class Streamer:
    """Streams ``blocks`` (already packed) of ``model`` into ``prefetch + 1`` slots on ``device``."""

    def __init__(self, model: nn.Module, blocks: list[Block], device: torch.device, prefetch: int):
        self.model, self.blocks, self.device, self.prefetch = model, blocks, device, int(prefetch)
        self.streams = CudaStreams(device) if device.type == "cuda" else NullStreams()
        slot_bytes = max(b.span for b in blocks)
        self.slots = [Slot(torch.empty(slot_bytes, dtype=torch.uint8, device=device), self.streams.event(),
                           self.streams.event()) for _ in range(min(self.prefetch + 1, len(blocks)))]
        self.log: deque[LogEntry] = deque(maxlen=LOG_LIMIT)
        self.step_bytes: deque[int] = deque(maxlen=LOG_LIMIT)  # bytes fetched during each model call
        self.stats = {"steps": 0, "fetches": 0, "bytes": 0, "backward_fetches": 0, "max_materialised": 0}
        self._stamp = itertools.count()
        self._used: dict[int, int] = {}  # id(slot) -> last use
        self._backward: Block | None = None  # the block backward is in
        self._handles = [model.register_forward_pre_hook(self._on_call)]
        for b in blocks:
            self._handles.append(b.module.register_forward_pre_hook(functools.partial(self._before, b)))
            self._handles.append(b.module.register_forward_hook(functools.partial(self._after, b), always_call=True))

    @property
    def slot_bytes(self) -> int:
        return self.slots[0].buf.numel()

    def materialised(self) -> list[str]:
        return [b.name for b in self.blocks if b.live]

    # -- copies

    def _victim(self, protect: set) -> Slot:
        empty = [s for s in self.slots if s.block is None]
        if empty:
            return empty[0]
        cands = [s for s in self.slots if s.block not in protect]
        if not cands:  # more blocks protected than slots: a bug in the schedule, not a user error
            raise RuntimeError(f"offload: no free slot among {len(self.slots)} for {[b.name for b in protect]}")
        return min(cands, key=lambda s: self._used.get(id(s), -1))

    def _fetch(self, block: Block, protect: set, kind: str) -> None:
        slot = self._victim(protect)
        if slot.block is not None:
            slot.block.slot, slot.block.live = None, False
        slot.block, block.slot = block, slot
        s = self.streams
        slot.free.record(s.compute())
        with s.on_side():
            s.side.wait_event(slot.free)
            slot.buf[: block.span].copy_(block.host, non_blocking=True)
            slot.ready.record(s.side)
        self._used[id(slot)] = next(self._stamp)
        self._live(block)
        st = self.stats
        st["fetches"] += 1
        st["bytes"] += block.span
        st["backward_fetches"] += kind == "backward"
        if not self.step_bytes:
            self.step_bytes.append(0)
        self.step_bytes[-1] += block.span
        self.log.append(LogEntry(st["steps"], kind, block.name, block.span))

    def _prefetch(self, targets: list[Block], protect: set, kind: str) -> None:
        for t in targets:
            if t.slot is None:
                self._fetch(t, protect, kind)

    def _live(self, block: Block) -> None:
        block.live = True
        self.stats["max_materialised"] = max(self.stats["max_materialised"], sum(b.live for b in self.blocks))

    def _use(self, block: Block) -> Tensor:
        self.streams.compute().wait_event(block.slot.ready)
        self._used[id(block.slot)] = next(self._stamp)
        return block.slot.buf

    # -- hooks

    def _on_call(self, module, args) -> None:
        self.stats["steps"] += 1
        self.step_bytes.append(0)
        if self._backward is not None:
            self._backward.live, self._backward = False, None
        first = self.blocks[: self.prefetch]
        self._prefetch(first, set(first), "prefetch")

    def _before(self, block: Block, module, args) -> None:
        if block.slot is None:
            self._fetch(block, {block}, "fetch")
        self._live(block)
        block.bind(self._use(block))
        self.log.append(LogEntry(self.stats["steps"], "start", block.name))
        n, i = len(self.blocks), block.index
        # ahead in execution order; wrapping to the next call only in inference (training goes backward next)
        steps = range(1, self.prefetch + 1)
        grad = torch.is_grad_enabled()
        ahead = [self.blocks[(i + k) % n] for k in steps if not grad or i + k < n]
        ahead = [b for b in dict.fromkeys(ahead) if b is not block]
        self._prefetch(ahead, {block, *ahead}, "prefetch")
        if grad:
            block.saving = torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, block), self._unpack)
            block.saving.__enter__()

    def _after(self, block: Block, module, *args) -> None:
        if block.saving is not None:
            saving, block.saving = block.saving, None
            saving.__exit__(None, None, None)
        block.bind(block.host)
        block.live = False
        self.log.append(LogEntry(self.stats["steps"], "end", block.name))

    # -- backward

    def _pack(self, block: Block, t: Tensor):
        slot = block.slot
        try:
            inside = slot is not None and t.untyped_storage().data_ptr() == slot.ptr
        except (RuntimeError, NotImplementedError):  # tensors without a storage of their own
            inside = False
        return _Saved(block, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset()) if inside else t

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        buf = self._for_backward(saved.block)
        return buf.view(saved.dtype).as_strided(saved.shape, saved.stride, saved.offset)

    def _for_backward(self, block: Block) -> Tensor:
        if self._backward is not block:
            if self._backward is not None:
                self._backward.live = False
            self._backward = block
            if block.slot is None:
                self._fetch(block, {block}, "backward")
            self._live(block)
            behind = [self.blocks[block.index - k] for k in range(1, self.prefetch + 1) if block.index - k >= 0]
            self._prefetch(behind, {block, *behind}, "backward")
        return self._use(block)

    @contextlib.contextmanager
    def recompute(self, module: nn.Module):
        """While backward recomputes streamed block ``module``'s forward (gradient checkpointing calls the
        block's forward without its hooks): the block fetched again if its slot was reused, the blocks
        before it prefetched, its tensors views of its slot; afterwards views of its host buffer again.
        A module that is not a streamed block is left alone."""
        block = next((b for b in self.blocks if b.module is module), None)
        if block is None:
            yield
            return
        block.bind(self._for_backward(block))
        try:
            yield
        finally:
            block.bind(block.host)

    # -- the end

    def close(self) -> None:
        """Remove the hooks and free the slots; every streamed tensor stays a view of its host buffer."""
        self.streams.close()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for b in self.blocks:
            if b.saving is not None:
                b.saving.__exit__(None, None, None)
                b.saving = None
            b.bind(b.host)
            b.slot, b.live, b._views = None, False, {}
        self.slots.clear()
