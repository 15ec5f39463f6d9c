"""Fused projections: sibling linear layers that read the same input become one wider linear.

::

    fuse_projections_(model) -> {"fused": [names], "skipped": {name: reason}}
    unfuse_projections_(model) -> int

Which projections a layer can fuse is declared by its module class: ``FUSABLE = {fused: (part, …)}``
(Z-Image's ``FeedForward``: ``w13`` from ``w1`` and ``w3``, the SwiGLU gate and up projections), and the
class's ``forward`` uses the fused linear when it is present — so module classes and forward semantics
stay, and one matmul of stacked rows replaces several (the input is read once, one kernel launch).
Attention q/k/v need nothing here: every rflow model holds them fused already (``qkv``, FLUX's single
blocks ``linear1``), and diffusers' separate ``to_q``/``to_k``/``to_v`` are stacked when a checkpoint is
loaded.

Fusing is for running a loaded model. ``state_dict`` keys do not change: the state dict of a fused
layer holds its parts under their own names (views of the fused weight, in the original order) and
``load_state_dict`` of an unfused state dict stacks the parts into the fused weight. Code that reaches
for the parts as modules (pruning, analysis hooks on ``w1``) needs :func:`unfuse_projections_` first,
which puts the parts back as plain ``nn.Linear`` layers.

Not fused, and reported in ``skipped``: parts that are not plain ``nn.Linear`` (quantized
``QuantLinear`` layers keep their packed weights; quantize after unfusing, or skip fusing), parts with
hooks (they would be lost), parts that differ in input width, dtype, device, bias or ``requires_grad``.
A model whose blocks stream from host memory (:mod:`.offload`) cannot be fused (its blocks' tensors
belong to the streaming plan): fuse first, then offload.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

_ATTR = "_rflow_fused"  # owner.__dict__[_ATTR] = {fused_name: _Fused}


class _Fused:
    """What one fusion replaced: part names, their output widths, the owner's module order, the hooks."""

    def __init__(self, parts: tuple[str, ...], sizes: list[int], order: list[str], bias: bool):
        self.parts, self.sizes, self.order, self.bias = parts, sizes, order, bias
        self.handles: list = []


def _why_not(parts: list[nn.Module | None]) -> str | None:
    if any(p is None for p in parts):
        return "a part is missing"
    if any(type(p) is not nn.Linear for p in parts):
        kinds = ", ".join(sorted({type(p).__name__ for p in parts if type(p) is not nn.Linear}))
        return f"not plain nn.Linear ({kinds})"
    if any(p._forward_hooks or p._forward_pre_hooks or p._backward_hooks for p in parts):
        return "a part has hooks"
    first = parts[0]
    for p in parts[1:]:
        if p.in_features != first.in_features:
            return "input widths differ"
        if (p.weight.dtype, p.weight.device) != (first.weight.dtype, first.weight.device):
            return "dtypes or devices differ"
        if (p.bias is None) != (first.bias is None):
            return "some parts have a bias, some not"
        if p.weight.requires_grad != first.weight.requires_grad:
            return "requires_grad differs"
    return None


def _check_not_offloaded(model: nn.Module) -> None:
    from .offload import streamer

    if streamer(model) is not None:
        raise UserError("this model's blocks stream from host memory: fuse projections before offloading")


def fuse_projections_(model: nn.Module) -> dict:
    """Fuse every declared group of sibling projections in ``model`` in place (see the module docstring).
    Returns ``{"fused": [qualified fused names], "skipped": {qualified fused name: reason}}``."""
    _check_not_offloaded(model)
    fused, skipped = [], {}
    for name, owner in list(model.named_modules()):
        for fname, part_names in getattr(type(owner), "FUSABLE", {}).items():
            qual = f"{name}.{fname}" if name else fname
            if fname in owner._modules:
                continue  # fused already
            parts = [owner._modules.get(p) for p in part_names]
            reason = _why_not(parts)
            if reason is not None:
                skipped[qual] = reason
                continue
            _fuse(owner, fname, tuple(part_names), parts)
            fused.append(qual)
    return {"fused": fused, "skipped": skipped}


@torch.no_grad()
def _fuse(owner: nn.Module, fname: str, part_names: tuple[str, ...], parts: list[nn.Linear]) -> None:
    first = parts[0]
    rg = first.weight.requires_grad
    lin = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                    device="meta")
    lin.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=rg)
    if first.bias is not None:
        lin.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=rg)
    lin.train(first.training)
    info = _Fused(part_names, [p.out_features for p in parts], list(owner._modules), first.bias is not None)
    for p in part_names:
        del owner._modules[p]
    owner._modules[fname] = lin
    info.handles = [owner.register_state_dict_post_hook(_splitter(fname, info)),
                    owner.register_load_state_dict_pre_hook(_stacker(fname, info))]
    owner.__dict__.setdefault(_ATTR, {})[fname] = info


def _params(info: _Fused) -> tuple[str, ...]:
    return ("weight", "bias") if info.bias else ("weight",)


def _splitter(fname: str, info: _Fused):
    """state_dict post-hook: the fused tensors as their parts, every key of the owner in its old order."""

    def hook(module, state_dict, prefix, local_metadata):
        if not all(f"{prefix}{fname}.{t}" in state_dict for t in _params(info)):
            return  # not a dense fused linear any more (quantized after fusing): keys stay as they are
        for t in _params(info):
            pieces = state_dict.pop(f"{prefix}{fname}.{t}").split(info.sizes)
            for part, piece in zip(info.parts, pieces):
                state_dict[f"{prefix}{part}.{t}"] = piece
        rank = {n: i for i, n in enumerate(info.order)}
        mine = [k for k in state_dict if k.startswith(prefix)]
        tail = [(k, state_dict.pop(k)) for k in mine]
        tail.sort(key=lambda kv: rank.get(kv[0][len(prefix):].split(".", 1)[0], -1))
        state_dict.update(tail)

    return hook


def _stacker(fname: str, info: _Fused):
    """load_state_dict pre-hook: the parts of an unfused state dict stacked into the fused tensors."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for t in _params(info):
            keys = [f"{prefix}{p}.{t}" for p in info.parts]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{fname}.{t}"] = torch.cat([state_dict.pop(k) for k in keys])

    return hook


@torch.no_grad()
def unfuse_projections_(model: nn.Module) -> int:
    """Put back the parts of every fused group in ``model`` (plain ``nn.Linear`` in their old places);
    returns how many groups were unfused."""
    _check_not_offloaded(model)
    n = 0
    for owner in list(model.modules()):
        for fname, info in list(owner.__dict__.get(_ATTR, {}).items()):
            lin = owner._modules.pop(fname)
            if not isinstance(lin, nn.Linear):
                owner._modules[fname] = lin
                raise UserError(f"{fname} was replaced by a {type(lin).__name__} after fusing; it cannot be split")
            rg = lin.weight.requires_grad
            ws = lin.weight.split(info.sizes)
            bs = lin.bias.split(info.sizes) if lin.bias is not None else [None] * len(ws)
            parts = {}
            for part, w, b in zip(info.parts, ws, bs):
                p = nn.Linear(lin.in_features, w.shape[0], bias=b is not None, device="meta")
                p.weight = nn.Parameter(w.clone(), requires_grad=rg)
                if b is not None:
                    p.bias = nn.Parameter(b.clone(), requires_grad=rg)
                p.train(lin.training)
                parts[part] = p
            rest = dict(owner._modules)
            owner._modules.clear()
            for k in info.order:
                if k in parts:
                    owner._modules[k] = parts[k]
                elif k in rest:
                    owner._modules[k] = rest.pop(k)
            owner._modules.update(rest)
            for h in info.handles:
                h.remove()
            del owner.__dict__[_ATTR][fname]
            n += 1
    return n
