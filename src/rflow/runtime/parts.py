"""``offload_parts_(pipe, ...)``: a pipeline's text encoders and VAE in host memory, on the device only while used.

::

    offload_parts_(pipe, *, text="swap", vae="swap", device=None) -> PartsPlan

The companion of :func:`rflow.runtime.offload.offload_` for the parts around the transformer. A text
encoder is needed once per prompt and the VAE once per image, so keeping them on the GPU between
uses costs memory the transformer's blocks could use (FLUX.1's T5-XXL alone is 9.5 GB in bf16).
Each part gets one of these modes:

* ``"swap"``: its weights live in host memory (pinned when ``device`` is a CUDA GPU); each call of
  its entry points (``encode``, ``decode``, ``encode_klein`` … see :data:`METHODS`) copies them to
  ``device``, runs there and points them back at the host copies afterwards. Weights are not copied
  back: the host copy is the weight, the device copy a temporary (a tensor the call replaced is
  copied home). Tensor arguments are moved to ``device``; results stay there.
* ``"cpu"``: the part lives and runs on the CPU; tensor arguments are moved to the CPU and the results
  to ``device`` (for a small GPU that cannot hold the text encoder at all).
* ``"resident"``: the part sits on ``device`` (what ``rflow.load`` does without offload); undoes the others.
* ``"auto"`` (:func:`auto_modes`): what fits the budget of the transformer's offload plan: everything
  resident when the plan streams nothing and all parts fit beside it; else the VAE swapped and the
  text encoders swapped if they fit beside the transformer's resident memory, block buffers and
  working reserve, and on the CPU if not.

Module classes, parameter objects and ``state_dict`` keys stay; the entry points are instance
attributes that shadow the class's methods. Parameters that require grad are never moved (like the
block streamer, which streams only frozen weights). Nested calls (``Flux2Codec.encode`` calls
``moments``) and :func:`holding` (several calls, one copy: the tiles of a tiled decode) copy once.
:attr:`Part.log` records every copy ("in", "out") with its bytes; on the CPU the copies are
CPU → CPU and cost nothing, but they run through :func:`_copy` all the same, so tests can drive the
machinery. Call ``offload_parts_(pipe, text="resident", vae="resident")`` before ``module.to(...)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..errors import UserError
from .offload import _tensors  # one walk over parameters and buffers

MODES = ("resident", "swap", "cpu", "auto")
# the entry points a pipeline part is called through (text encoders, codecs); those a class defines are wrapped
METHODS = ("encode", "decode", "moments", "decode_raw", "encode_klein", "encode_zimage")
_ATTR, _PLAN_ATTR = "_rflow_part", "_rflow_parts_plan"
LOG_LIMIT = 10_000


@dataclass
class PartsPlan:
    device: str
    text: str  # the text encoders' mode
    vae: str  # the VAE's mode
    text_bytes: int
    vae_bytes: int

    def summary(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        from ..memory import format_bytes as fb

        where = {"resident": f"resident on {self.device}", "swap": f"on {self.device} only while {{}}",
                 "cpu": "on the CPU"}
        return (f"text encoders ({fb(self.text_bytes)}) {where[self.text].format('encoding')}, "
                f"VAE ({fb(self.vae_bytes)}) {where[self.vae].format('in use')}")


class Move(NamedTuple):
    kind: str  # "in" (host -> device) | "out" (pointed back at the host copies)
    method: str  # the entry point that caused it ("hold" for holding())
    nbytes: int


def _copy(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` (``t`` itself when it is there already)."""
    return t.to(device, non_blocking=t.device.type == "cpu" and t.is_pinned())



def _same(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr()



def nbytes(module: nn.Module) -> int:
    seen = {id(t): t.numel() * t.element_size() for *_, t in _tensors(module)}
    return sum(seen.values())


def _place(module: nn.Module, device: torch.device, pin: bool = False) -> None:
    """Move every frozen tensor of ``module`` to ``device`` in place (pinned host memory with ``pin``)."""
    done: dict[int, Tensor] = {}
    for mod, name, is_param, t in list(_tensors(module)):
        if is_param and t.requires_grad:
            continue
        new = done.get(id(t))
        if new is None:
            src = t.data if is_param else t
            new = src.to(device)
            if pin and new.device.type == "cpu" and not new.is_pinned():
                try:
                    new = new.pin_memory()
                except RuntimeError:  # no pinnable memory left: pageable copies are slower, not wrong
                    pass
            done[id(t)] = new
        if is_param:
            t.data = new
        else:
            mod._buffers[name] = new


def _move_tensors(x, device: torch.device):
    """``x`` with every tensor in it (nested tuples, lists and dicts; objects with a ``to``) on ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_move_tensors(v, device) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_move_tensors(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _move_tensors(v, device) for k, v in x.items()}
    if hasattr(x, "__dataclass_fields__") and callable(getattr(x, "to", None)):  # a family's conditioning
        return x.to(device)
    return x


class Part:
    """One pipeline part (``name``: "text" or "vae") in ``mode`` "swap" or "cpu", computing for ``device``."""

    def __init__(self, name: str, module: nn.Module, mode: str, device: torch.device):
        self.name, self.module, self.mode, self.device = name, module, mode, device
        self.depth = 0
        self.swapped = False  # copied in (the copy may have been a no-op: CPU -> CPU)
        self.moved: list = []  # (owner, name, is_parameter, home tensor, device copy) while held
        self.log: list[Move] = []
        self.stats = {"calls": 0, "swaps": 0, "bytes": 0}

    @property
    def runs_on(self) -> torch.device:
        return torch.device("cpu") if self.mode == "cpu" else self.device

    @contextlib.contextmanager
    def held(self, method: str = "hold"):
        """The part on the device it runs on for the duration (copied once however deep the nesting)."""
        if self.depth == 0 and self.mode == "swap":
            self._swap_in(method)
        self.depth += 1
        try:
            yield self
        finally:
            self.depth -= 1
            if self.depth == 0 and self.swapped:
                self._swap_out(method)

    def call(self, method: str, args: tuple, kwargs: dict):
        self.stats["calls"] += 1
        bound = getattr(type(self.module), method).__get__(self.module)
        with self.held(method):
            where = self.runs_on
            out = bound(*_move_tensors(args, where), **_move_tensors(kwargs, where))
        return _move_tensors(out, self.device) if self.mode == "cpu" else out

    def _swap_in(self, method: str) -> None:
        done: dict[int, Tensor] = {}
        total = 0
        self.swapped = True
        try:
            for mod, name, is_param, t in list(_tensors(self.module)):
                if is_param and t.requires_grad:
                    continue
                home = t.data if is_param else t
                new = done.get(id(t))
                if new is None:
                    new = done[id(t)] = _copy(home, self.device)
                    total += 0 if _same(new, home) else home.numel() * home.element_size()
                if _same(new, home):
                    continue  # there already (or a parameter registered twice, moved at its first name)
                if is_param:
                    t.data = new
                else:
                    mod._buffers[name] = new
                self.moved.append((mod, name, is_param, home, new))
        except BaseException:  # out of device memory half-way: everything goes back home
            self._swap_out(method)
            raise
        self.stats["swaps"] += 1
        self.stats["bytes"] += total
        self._note(Move("in", method, total))

    def _swap_out(self, method: str) -> None:
        total = 0
        for mod, name, is_param, home, new in self.moved:
            now = mod._parameters[name] if is_param else mod._buffers[name]
            if now is None:
                continue
            cur = now.data if is_param else now
            if _same(cur, new):
                back = home
            else:  # the call replaced the tensor: keep what it left, in host memory
                back = cur.to(home.device)
            if is_param:
                now.data = back
            else:
                mod._buffers[name] = back
            total += home.numel() * home.element_size()
        self.moved, self.swapped = [], False
        self._note(Move("out", method, total))

    def _note(self, m: Move) -> None:
        if len(self.log) >= LOG_LIMIT:
            del self.log[: LOG_LIMIT // 2]
        self.log.append(m)


class _Entry:
    """An entry point of a part, installed on the instance: runs the class's method through :meth:`Part.call`."""

    def __init__(self, part: Part, method: str):
        self.part, self.method = part, method

    def __call__(self, *args, **kwargs):
        return self.part.call(self.method, args, kwargs)


def part_of(module) -> Part | None:
    """The :class:`Part` managing ``module`` (a text-encoder or VAE module), or None."""
    return getattr(module, "__dict__", {}).get(_ATTR)


def holding(module):
    """A context keeping ``module`` on its compute device throughout (one copy for several calls); a
    no-op for a module that is not an offloaded part."""
    part = part_of(module)
    return part.held() if part is not None else contextlib.nullcontext()


def parts_plan(pipe) -> PartsPlan | None:
    """The plan :func:`offload_parts_` last applied to ``pipe``, or None."""
    return pipe.__dict__.get(_PLAN_ATTR)


def _detach(module: nn.Module) -> None:
    part = module.__dict__.pop(_ATTR, None)
    if part is not None:
        if part.depth:
            raise RuntimeError(f"the {part.name} part is in use; it cannot be re-planned now")
        for m in METHODS:
            if isinstance(module.__dict__.get(m), _Entry):
                del module.__dict__[m]


def _attach(name: str, module: nn.Module, mode: str, device: torch.device) -> None:
    part = Part(name, module, mode, device)
    module.__dict__[_ATTR] = part
    for m in METHODS:
        if callable(getattr(type(module), m, None)):
            module.__dict__[m] = _Entry(part, m)


def _check_mode(what: str, mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"unknown {what} placement {mode!r}; choose resident, swap, cpu or auto")
    return mode


def auto_modes(text_bytes: int, vae_bytes: int, plan) -> tuple[str, str]:
    """(text mode, VAE mode) for the transformer's offload ``plan`` (see the module docstring)."""
    if plan is None or plan.mode == "none":
        return "resident", "resident"
    beside = plan.resident_bytes + plan.buffer_bytes + plan.reserve
    if plan.mode == "auto" and not plan.streamed and plan.budget is not None \
            and beside + text_bytes + vae_bytes <= plan.budget:
        return "resident", "resident"
    if plan.budget is None or beside + text_bytes <= plan.budget:
        return "swap", "swap"
    return "cpu", "swap"


def offload_parts_(pipe, *, text: str = "swap", vae: str = "swap", device=None) -> PartsPlan:
    """Place ``pipe.text_encoders`` and ``pipe.vae`` by mode (see the module docstring), in place; returns
    the plan. ``device``: where the pipeline computes (default: the transformer's device)."""
    from .offload import offload_plan

    _check_mode("text encoder", text)
    _check_mode("VAE", vae)
    dev = torch.device(device) if device is not None else pipe.device
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    te, codec = pipe.text_encoders, pipe.vae
    sizes = {"text": nbytes(te), "vae": nbytes(codec)}
    if "auto" in (text, vae):
        t, v = auto_modes(sizes["text"], sizes["vae"], offload_plan(pipe.transformer))
        text, vae = (t if text == "auto" else text), (v if vae == "auto" else vae)
    cpu = torch.device("cpu")
    for name, module, mode in (("text", te, text), ("vae", codec, vae)):
        _detach(module)
        if mode == "resident":
            _place(module, dev)
            continue
        _place(module, cpu, pin=mode == "swap" and dev.type == "cuda")
        _attach(name, module, mode, dev)
    plan = PartsPlan(device=str(dev), text=text, vae=vae, text_bytes=sizes["text"], vae_bytes=sizes["vae"])
    pipe.__dict__[_PLAN_ATTR] = plan
    return plan
