"""LoRA adapters beside a model's linear layers, in place: ``add_lora_``, ``fuse_lora_``, ``unfuse_lora_``,
``remove_lora_``.

A LoRA adds ``scale · (x Aᵀ) Bᵀ`` to a linear layer's output (A: rank × in, B: rows × rank). rflow
computes it beside the base matmul, in a forward hook: the layer's weight — a dense ``nn.Linear`` or a
packed :class:`~rflow.quant.linear.QuantLinear` (int8, fp8, GGUF), resident or streamed by
:mod:`rflow.runtime.offload` — is never read, expanded or changed, so a LoRA costs its own few
megabytes and a quantized layer keeps its compute mode. Module classes stay; each adapted layer gets
one side module ``lora`` (a :class:`LoRAStack`), so ``state_dict`` gains
``<layer>.lora.adapters.<name>.<i>.lora_A`` / ``lora_B``.

Row offsets: one :class:`LoRA` covers output rows ``[offset, offset + rows)`` of its layer. A LoRA
trained on diffusers' separate ``to_q`` / ``to_k`` / ``to_v`` lands on rows of rflow's fused ``qkv``
(or FLUX's ``linear1``: q, k, v and the MLP input); its product is added to that slice alone, never
through a zero-padded B. Several LoRAs stack: each layer sums every active one, each times its
multiplier (the user's scale).

``fuse_lora_`` merges ``W + scale · B A`` into dense weights (faster sampling, same numbers up to
rounding) after keeping a copy of the original weight in host memory, which ``unfuse_lora_`` writes
back bit for bit. A quantized layer has no dense weight to merge into: fusing a model whose LoRA sits
on one is a :class:`~rflow.errors.UserError` (its adapter already runs beside the quantized matmul).

For training, ``add_lora_(..., trainable=True)`` makes every ``lora_A`` / ``lora_B`` a parameter that
requires grad (:func:`lora_parameters`); the base stays frozen and autograd runs through the hook.

Quantize (:func:`rflow.quant.api.quantize_`) before adding LoRAs: it replaces each layer it quantizes,
and the layer's side module and hook go with the old one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NonFiniteError, UserError

ATTR = "lora"  # the side module's name on an adapted layer
_NAME = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass
class LoRAWeight:
    """One low-rank update of one layer, as a reader produces it."""

    layer: str  # qualified name of the linear layer in the model it is added to
    down: Tensor  # A: (rank, in_features)
    up: Tensor  # B: (rows, rank)
    scale: float = 1.0  # the file's own factor (alpha / rank, as its tool defines it)
    offset: int = 0  # first output row it lands on
    source: str = ""  # where it came from (a file and key), for messages


def is_linear(module: nn.Module) -> bool:
    from ..quant.linear import QuantLinear

    return isinstance(module, (nn.Linear, QuantLinear))


def _dims(layer: nn.Module) -> tuple[int, int]:
    return int(layer.in_features), int(layer.out_features)


def _dense_dtype(layer: nn.Module) -> torch.dtype:
    return layer.weight.dtype if isinstance(layer, nn.Linear) else layer.weight_dtype


def _device(layer: nn.Module) -> torch.device:
    for t in (*layer._parameters.values(), *layer._buffers.values()):
        if t is not None:
            return t.device
    return torch.device("cpu")


class LoRA(nn.Module):
    """``scale · (x Aᵀ) Bᵀ`` for output rows ``[offset, offset + rows)`` of one layer."""

    def __init__(self, down: Tensor, up: Tensor, scale: float = 1.0, offset: int = 0, trainable: bool = False):
        super().__init__()
        self.lora_A = nn.Parameter(down, requires_grad=trainable)
        self.lora_B = nn.Parameter(up, requires_grad=trainable)
        self.scale, self.offset = float(scale), int(offset)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rows(self) -> int:
        return self.lora_B.shape[0]

    def forward(self, x: Tensor, multiplier: float = 1.0) -> Tensor:
        a = self.lora_A.to(x.device, x.dtype)
        b = self.lora_B.to(x.device, x.dtype)
        return F.linear(F.linear(x, a) * (self.scale * multiplier), b)

    def delta_weight(self, multiplier: float = 1.0) -> Tensor:
        """``scale · B A`` (rows × in) in float32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * (self.scale * multiplier)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, rows={self.offset}:{self.offset + self.rows}, scale={self.scale:g}"


class LoRAStack(nn.Module):
    """The LoRAs of one layer by name (``adapters[name]``: its pieces), each times ``multipliers[name]``;
    ``fused``: the names merged into the dense weight, ``original``: that weight before the first merge."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.multipliers: dict[str, float] = {}
        self.fused: dict[str, float] = {}
        self.original: Tensor | None = None

    def apply_to(self, x: Tensor, out: Tensor) -> Tensor:
        """``out`` (the base layer's output for ``x``) plus every active, unfused LoRA (a new tensor:
        ``out`` itself is left as it is, for whoever else holds it)."""
        result = None
        width = out.shape[-1]
        for name, pieces in self.adapters.items():
            m = self.multipliers[name]
            if name in self.fused or m == 0.0:
                continue
            for p in pieces:
                d = p(x, m).to(out.dtype)
                full = p.offset == 0 and p.rows == width
                if result is None:
                    if full:
                        result = out + d
                        continue
                    result = out.clone()
                if full:
                    result.add_(d)
                else:
                    result[..., p.offset:p.offset + p.rows].add_(d)
        return out if result is None else result


def _hook(layer: nn.Module, args, out):
    stack = layer._modules.get(ATTR)
    if not isinstance(stack, LoRAStack):
        return out
    return stack.apply_to(args[0], out)


def lora_layers(model: nn.Module) -> dict[str, tuple[nn.Module, LoRAStack]]:
    """Every adapted layer of ``model``: qualified name -> (layer, its LoRAStack)."""
    out = {}
    for name, m in model.named_modules():
        stack = m._modules.get(ATTR) if is_linear(m) else None
        if isinstance(stack, LoRAStack):
            out[name] = (m, stack)
    return out


def lora_names(model: nn.Module) -> list[str]:
    """The names of the LoRAs on ``model``, in the order they were added."""
    names: dict[str, None] = {}
    for _, stack in lora_layers(model).values():
        names.update(dict.fromkeys(stack.adapters))
    return list(names)


def lora_parameters(model: nn.Module, name: str | None = None) -> Iterator[nn.Parameter]:
    """Every ``lora_A`` / ``lora_B`` of ``model`` (of LoRA ``name`` only, if given)."""
    for _, stack in lora_layers(model).values():
        for n, pieces in stack.adapters.items():
            if name is None or n == name:
                for p in pieces:
                    yield p.lora_A
                    yield p.lora_B


def check_name(name: str, taken: Iterable[str] = ()) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"LoRA name {name!r}: use letters, digits, '_' and '-'")
    if hasattr(nn.ModuleDict, name):
        raise UserError(f"LoRA name {name!r} is the name of a torch Module attribute; choose another")
    if name in set(taken):
        raise UserError(f"a LoRA named {name!r} is already loaded; remove it first or choose another name")
    return name


def check_weights(model: nn.Module, weights: list[LoRAWeight]) -> dict[str, nn.Module]:
    """Every weight fits its layer (exists, is linear, shapes, rows in range, finite numbers): the
    layers by name, or a UserError naming the weight's source; nothing is changed."""
    modules = dict(model.named_modules())
    layers = {}
    for w in weights:
        where = w.source or w.layer
        layer = modules.get(w.layer)
        if layer is None or not is_linear(layer):
            what = "is not a linear layer" if layer is not None else "is not a layer"
            raise UserError(f"{where}: {w.layer!r} {what} of this {type(model).__name__}")
        n_in, n_out = _dims(layer)
        A, B = w.down, w.up
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] < 1 or B.shape[1] != A.shape[0] or A.shape[1] != n_in:
            raise UserError(f"{where}: LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit {w.layer} "
                            f"(in {n_in}, out {n_out}): expected A (rank, {n_in}) and B (rows, rank)")
        if w.offset < 0 or B.shape[0] < 1 or w.offset + B.shape[0] > n_out:
            raise UserError(f"{where}: rows {w.offset}:{w.offset + B.shape[0]} are outside {w.layer}'s {n_out} outputs")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise UserError(f"{where}: LoRA weights must be floating point, not {A.dtype} / {B.dtype}")
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())) or not torch.isfinite(torch.tensor(w.scale)):
            raise NonFiniteError(f"{where}: the LoRA holds NaN or infinity")
        layers[w.layer] = layer
    return layers


def add_lora_(model: nn.Module, weights: Iterable[LoRAWeight], *, name: str, scale: float = 1.0,
              trainable: bool = False, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """Add LoRA ``name`` (its ``weights``, each on one layer's rows) to ``model`` in place, times ``scale``.

    The tensors are copied in the layer's dense dtype (``dtype`` if given) onto the layer's device, or
    the device an offloaded model computes on (``device`` if given). Everything is checked first
    (:func:`check_weights`): on a UserError nothing has changed. Returns ``model``."""
    weights = list(weights)
    if not weights:
        raise UserError(f"LoRA {name!r} has no weights")
    check_name(name, lora_names(model))
    if not torch.isfinite(torch.tensor(float(scale))):
        raise UserError(f"LoRA scale must be a finite number, not {scale!r}")
    layers = check_weights(model, weights)
    if device is None:
        from ..runtime.offload import offload_plan

        plan = offload_plan(model)
        device = torch.device(plan.device) if plan is not None else None
    for w in weights:
        layer = layers[w.layer]
        stack = layer._modules.get(ATTR)
        if not isinstance(stack, LoRAStack):
            stack = LoRAStack()
            layer.add_module(ATTR, stack)
            layer.register_forward_hook(_hook)
        if name not in stack.adapters:
            stack.adapters[name] = nn.ModuleList()
            stack.multipliers[name] = float(scale)
        dev, dt = device or _device(layer), dtype or _dense_dtype(layer)
        piece = LoRA(w.down.detach().to(dev, dt, copy=True), w.up.detach().to(dev, dt, copy=True),
                     w.scale, w.offset, trainable)
        stack.adapters[name].append(piece)
    return model


def _names(model: nn.Module, names) -> list[str]:
    have = lora_names(model)
    if names is None:
        return have
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in have:
            raise UserError(f"no LoRA named {n!r} on this model (loaded: {', '.join(have) or 'none'})")
    return names


@torch.no_grad()
def _merge(layer: nn.Linear, stack: LoRAStack, names: list[str]) -> None:
    if stack.original is None:
        stack.original = layer.weight.detach().to("cpu", copy=True)
    w = layer.weight
    for n in names:
        if n in stack.adapters and n not in stack.fused:
            m = stack.multipliers[n]
            for p in stack.adapters[n]:
                w[p.offset:p.offset + p.rows] += p.delta_weight(m).to(w.device, w.dtype)
            stack.fused[n] = m


@torch.no_grad()
def _restore(layer: nn.Linear, stack: LoRAStack) -> None:
    if stack.original is not None:
        layer.weight.copy_(stack.original.to(layer.weight.device))
    stack.original, stack.fused = None, {}


def check_fusable(model: nn.Module, names: list[str]) -> list[tuple[nn.Linear, LoRAStack]]:
    """The layers LoRAs ``names`` adapt, all dense; a LoRA on a quantized layer is a UserError."""
    todo = [(n, layer, stack) for n, (layer, stack) in lora_layers(model).items() if any(x in stack.adapters for x in names)]
    for lname, layer, stack in todo:
        if not isinstance(layer, nn.Linear):
            raise UserError(f"cannot fuse a LoRA into {lname}: it is quantized ({layer.format}) and has no dense "
                            "weight to merge into; the LoRA already runs beside the quantized matmul unfused")
    return [(layer, stack) for _, layer, stack in todo]


def fuse_lora_(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Merge LoRAs (all, or ``names``) into the dense weights of the layers they adapt; their hooks
    then skip them. A LoRA on a quantized layer is a UserError, before anything changes."""
    names = _names(model, names)
    for layer, stack in check_fusable(model, names):
        _merge(layer, stack, names)
    return model


def unfuse_lora_(model: nn.Module) -> nn.Module:
    """Undo every fuse: each fused layer gets its original weight back exactly; its LoRAs run beside it again."""
    for layer, stack in lora_layers(model).values():
        if stack.fused:
            _restore(layer, stack)
    return model


def remove_lora_(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Remove LoRAs (all, or ``names``): fused ones are unfused first (the other fused LoRAs of those
    layers are merged again); a layer left without LoRAs loses its side module and hook."""
    names = _names(model, names)
    for layer, stack in lora_layers(model).values():
        if not any(n in stack.adapters for n in names):
            continue
        refuse = [n for n in stack.fused if n not in names]
        if stack.fused:
            _restore(layer, stack)
        for n in names:
            if n in stack.adapters:
                del stack.adapters[n]
                del stack.multipliers[n]
        if refuse:
            _merge(layer, stack, refuse)
        if not len(stack.adapters):
            for key, fn in list(layer._forward_hooks.items()):  # by identity: a deep copy's hooks are its own
                if fn is _hook:
                    del layer._forward_hooks[key]
            del layer._modules[ATTR]
    return model
