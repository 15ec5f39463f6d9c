"""``offload_(model, ...)``: run a transformer bigger than the GPU's free memory by streaming its blocks.

::

    offload_(model, *, vram=None, mode="blocks", device=None, prefetch=1, reserve=None) -> OffloadPlan

A transformation verb in the style of ``quantize_``: it changes ``model`` in place (module classes,
parameter objects and ``state_dict`` keys stay; only where the tensors live changes and hooks are
added) and returns the :class:`OffloadPlan` it applied. The blocks are the family's repeated blocks
(``blocks(model)`` of its family module, in execution order; for a model of no known family, the
elements of its top-level ``nn.ModuleList`` s in registration order). Everything else — embedders,
modulations, norms, the final layer — and parameters that require grad stay resident on ``device``.

``mode``:

* ``"blocks"``: with ``vram`` (bytes, or a size such as ``"4GiB"``), keep as many blocks resident as
  fit in it and stream the others; without ``vram``, stream every block (the least memory).
* ``"auto"``: stream only what does not fit: in ``vram`` if given, else in the device's free memory
  (plus what the model already holds there); a model that fits is simply moved to ``device``.
* ``"none"``: undo any offload and move the whole model to ``device``.

The budget holds the resident parts, the resident blocks, ``prefetch + 1`` buffers of the largest
streamed block and a working ``reserve`` for activations. The default reserve is what
:mod:`rflow.memory` estimates one model call at the family's default size (batch 1) needs — 1.5 × the
per-token peak of one block × (image tokens + text tokens) — plus 64 MiB of workspace: about 0.9 GB
for FLUX.1-dev in bf16 at 1024². Larger images or batches need a larger ``reserve`` (or ``vram``).
Which blocks stay: the largest first (fewest bytes streamed per call), ties in execution order. A
budget below the minimum (resident parts, the buffers and the reserve) is a :class:`UserError`.

``prefetch``: blocks copied ahead of the one computing (0: copy each block when it is called).
Streaming runs on CUDA devices (pinned host memory, a side stream) and on the CPU (the same schedule
with plain copies, for tests); :mod:`.streaming` describes it, training (backward) included.
:func:`plan_offload` (same arguments) says what ``offload_`` would do without changing the model (a
meta-device model works: ``rflow.load`` checks the budget that way before reading weights);
:func:`streamer` gives the live :class:`~rflow.runtime.streaming.Streamer` (log and counters),
:func:`offload_plan` the plan last applied. Offloading again replaces the previous plan; call
``offload_(model, mode="none")`` before ``model.to(...)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import UserError, flag
from .streaming import ALIGN, Block, Streamer, aligned, span, streamable

MODES = ("none", "blocks", "auto")
_ATTR, _PLAN_ATTR = "_rflow_streamer", "_rflow_offload_plan"


@dataclass
class OffloadPlan:
    mode: str
    device: str
    resident: list[str]  # blocks kept on the device
    streamed: list[str]  # blocks streamed from host memory, in execution order
    resident_bytes: int  # on the device: everything but the streamed blocks
    buffer_bytes: int  # the device buffers streamed blocks are copied into (slots × largest block)
    streamed_bytes: int  # copied to the device per model call
    reserve: int  # working memory counted for activations
    budget: int | None  # the memory planned into (None: no limit given or known)
    prefetch: int

    def summary(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        from ..memory import format_bytes as fb

        n = len(self.resident) + len(self.streamed)
        if not self.streamed:
            return f"offload: all {n} blocks resident on {self.device} ({fb(self.resident_bytes)})"
        return (f"offload: {len(self.streamed)} of {n} blocks streamed to {self.device} "
                f"({fb(self.streamed_bytes)} per call, prefetch {self.prefetch}), {fb(self.resident_bytes)} resident "
                f"+ {fb(self.buffer_bytes)} of block buffers")


# ---------------------------------------------------------------------------------------------- options


def check_options(mode: str, vram=None, reserve=None) -> tuple[str, int | None, int | None]:
    """(mode, vram bytes, reserve bytes), checked: a bad value is a one-line :class:`UserError`."""
    if mode not in MODES:
        raise UserError(f"unknown {flag('offload')} {mode!r}; choose none, blocks or auto")
    out = []
    for name, v in (("vram", vram), ("reserve", reserve)):
        if v is None:
            out.append(None)
        elif isinstance(v, bool) or not isinstance(v, (int, str)):
            raise UserError(f"{flag(name)} must be a size such as 4GiB, not {v!r}")
        elif isinstance(v, str):
            from ..compress.capture import parse_bytes

            try:
                out.append(parse_bytes(v))
            except UserError as e:
                raise UserError(f"{flag(name)}: {e}") from None
        elif v < (1 if name == "vram" else 0):
            raise UserError(f"{flag(name)} must be positive, got {v}")
        else:
            out.append(int(v))
    if mode == "none" and out[0] is not None:
        raise UserError(f"{flag('vram')} applies to {flag('offload', 'blocks')} or auto, not none")
    return mode, out[0], out[1]


# ---------------------------------------------------------------------------------------------- planning


def block_names(model: nn.Module) -> list[str]:
    """The streamable blocks of ``model``, in execution order (see the module docstring)."""
    from ..compress.units import family_of

    try:
        fam = family_of(getattr(model, "config", None))
    except UserError:
        fam = None
    if fam is not None and hasattr(fam, "blocks"):
        return list(fam.blocks(model))
    return [f"{n}.{i}" for n, m in model.named_children() if isinstance(m, nn.ModuleList) for i in range(len(m))]


def working_reserve(model: nn.Module, device, size: tuple[int, int] | None = None,
                    text_tokens: int | None = None) -> int:
    """Activation memory of one model call at ``size`` (width, height; default: the family's) with
    ``text_tokens`` (default: the family's maximum), batch 1 — see the module docstring."""
    from ..compress.units import family_of
    from ..memory import FIXED_OVERHEAD, _activation_itemsize, _token_bytes

    try:
        fam = family_of(getattr(model, "config", None))
    except UserError:
        return FIXED_OVERHEAD
    w, h = size or fam.DEFAULT_SIZE
    tokens = (w // 16) * (h // 16) + (fam.MAX_SEQUENCE_LENGTH if text_tokens is None else text_tokens)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    e = _activation_itemsize(dtype, torch.device(device))
    return tokens * _token_bytes(model.config, e) * 3 // 2 + FIXED_OVERHEAD


def choose(sizes: list[int], fixed: int, budget: int | None, reserve: int, prefetch: int,
           mode: str) -> list[bool]:
    """Which blocks stream (True) for block ``sizes`` in execution order, ``fixed`` bytes of resident parts."""
    n = len(sizes)
    if mode == "none" or n == 0 or (mode == "auto" and (budget is None or fixed + sum(sizes) + reserve <= budget)):
        return [False] * n
    if budget is None:  # "blocks" without a budget: stream them all
        return [True] * n
    order = sorted(range(n), key=lambda i: (-sizes[i], i))  # the largest stay resident first
    for k in range(n, -1, -1):
        rest = order[k:]
        buffers = min(prefetch + 1, len(rest)) * max((sizes[i] for i in rest), default=0)
        if fixed + sum(sizes[i] for i in order[:k]) + buffers + reserve <= budget:
            keep = set(order[:k])
            return [i not in keep for i in range(n)]
    from ..memory import format_bytes as fb

    least = fixed + min(prefetch + 1, n) * max(sizes) + reserve
    raise UserError(f"{flag('vram')} {fb(budget)} is below the {fb(least)} streaming needs here: {fb(fixed)} of "
                    f"resident weights, {min(prefetch + 1, n)} block buffers of {fb(max(sizes))} and a "
                    f"{fb(reserve)} working reserve")


def _tensors(model: nn.Module):
    """(owner, name, is_parameter, tensor) of every parameter and buffer of ``model``."""
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                yield mod, name, True, p
        for name, b in mod._buffers.items():
            if b is not None:
                yield mod, name, False, b


def _shared(model: nn.Module, blocks: list[nn.Module]) -> set[int]:
    """Ids of tensors registered in more than one block, or in a block and outside all of them."""
    owner: dict[int, int] = {}
    shared = set()
    inside = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
    for mod, _, _, t in _tensors(model):
        where = inside.get(id(mod), -1)
        if owner.setdefault(id(t), where) != where:
            shared.add(id(t))
    return shared


def _to(model: nn.Module, device: torch.device, skip: set[int]) -> None:
    """Move every tensor of ``model`` but those whose ids are in ``skip`` to ``device``, in place."""
    for mod, name, is_param, t in list(_tensors(model)):
        if id(t) in skip or t.device == device:
            continue
        if is_param:
            t.data = t.data.to(device)
        else:
            mod._buffers[name] = t.to(device)


# ---------------------------------------------------------------------------------------------- the verb


def streamer(model: nn.Module) -> Streamer | None:
    """The streamer running ``model``'s offload, or None."""
    return model.__dict__.get(_ATTR)


def offload_plan(model: nn.Module) -> OffloadPlan | None:
    """The plan :func:`offload_` last applied to ``model``, or None."""
    return model.__dict__.get(_PLAN_ATTR)


def _detach(model: nn.Module) -> None:
    s = model.__dict__.pop(_ATTR, None)
    if s is not None:
        s.close()


def _device(model: nn.Module, device) -> torch.device:
    if device is None:
        s = streamer(model)
        if s is not None:
            return s.device
        from ..pipeline import default_device

        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {dev}: CUDA is not available here")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _budget(model: nn.Module, device: torch.device, vram: int | None, mode: str) -> int | None:
    if vram is not None or mode != "auto":
        return vram
    from ..memory import available_bytes

    free = available_bytes(device)
    if free is None:
        return None
    here = {id(t): t.numel() * t.element_size() for *_, t in _tensors(model) if t.device == device}
    return free + sum(here.values())


def _planned(model: nn.Module, vram, mode, device, prefetch, reserve):
    mode, vram, reserve = check_options(mode, vram, reserve)
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 0 <= prefetch <= 64:
        raise UserError(f"prefetch must be an integer 0-64, not {prefetch!r}")
    dev = _device(model, device)
    if mode != "none" and dev.type not in ("cuda", "cpu"):
        raise UserError(f"offload streams blocks to a CUDA GPU (or the CPU), not {dev}")
    names = block_names(model)
    mods = [model.get_submodule(n) for n in names]
    shared = _shared(model, mods)
    sizes = [span(streamable(m, shared)) for m in mods]
    every = {id(t): aligned(t.numel() * t.element_size()) for *_, t in _tensors(model)}
    fixed = sum(every.values()) - sum(sizes)
    reserve = working_reserve(model, dev) if reserve is None else reserve
    budget = _budget(model, dev, vram, mode)
    streamed = choose(sizes, fixed, budget, reserve, prefetch, mode)
    moving = [z for z, x in zip(sizes, streamed) if x]
    plan = OffloadPlan(mode=mode, device=str(dev), resident=[n for n, x in zip(names, streamed) if not x],
                       streamed=[n for n, x in zip(names, streamed) if x], resident_bytes=fixed + sum(sizes) - sum(moving),
                       buffer_bytes=min(prefetch + 1, len(moving)) * max(moving + [ALIGN]) if moving else 0,
                       streamed_bytes=sum(moving), reserve=reserve, budget=budget, prefetch=prefetch)
    return plan, dev, dict(zip(names, mods)), shared


def plan_offload(model: nn.Module, *, vram: int | str | None = None, mode: str = "blocks", device=None,
                 prefetch: int = 1, reserve: int | str | None = None) -> OffloadPlan:
    """The plan :func:`offload_` would apply, without changing ``model``; sizes are all it reads, so a
    model built on the meta device (in the dtype it will load in) can be checked before any weight is read."""
    return _planned(model, vram, mode, device, prefetch, reserve)[0]


def offload_(model: nn.Module, *, vram: int | str | None = None, mode: str = "blocks", device=None,
             prefetch: int = 1, reserve: int | str | None = None) -> OffloadPlan:
    """Offload ``model``'s blocks to host memory and stream them to ``device`` (see the module docstring);
    returns the plan. Idempotent: a second call undoes the first before planning anew."""
    plan, dev, mods, shared = _planned(model, vram, mode, device, prefetch, reserve)
    _detach(model)
    blocks: list[Block] = []
    for name in plan.streamed:
        blocks.append(Block.pack(name, len(blocks), mods[name], shared, pin=dev.type == "cuda"))
    _to(model, dev, set().union(*(b.tensor_ids() for b in blocks)))
    if blocks:
        model.__dict__[_ATTR] = Streamer(model, blocks, dev, prefetch)
    model.__dict__[_PLAN_ATTR] = plan
    return plan
