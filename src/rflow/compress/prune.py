"""Structured pruning of MLP hidden units: choose units from statistics, slice the weights for real.

Which weight entries belong to a unit comes from the family's layer list (:class:`LayerRef.slices`):
FLUX.1's double blocks lose rows of ``{img,txt}_mlp.0`` (weight and bias) and columns of
``{img,txt}_mlp.2``, its single blocks rows of ``linear1[3·hidden:]`` and columns of
``linear2[:, hidden:]``; SwiGLU MLPs (FLUX.2, Z-Image) lose rows of w1 and w3 and columns of w2.
Parameters are sliced in place, so every module keeps its class. The kept indices of every pruned unit
group are returned and saved with the model (``rflow.kept.<unit>``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import UserError
from .stats import ActivationStats
from .units import family_of, refs_by_name

KEPT_PREFIX = "rflow.kept."


def choose_kept(stats: ActivationStats, units: list[str], *, criterion: str = "frequency", fraction: float | None = None,
                count: int | None = None, threshold: float | None = None) -> dict[str, torch.Tensor]:
    """Kept unit indices (sorted int64) per unit group.

    ``fraction`` removes that share of each group's least important units; ``count`` removes units
    that fired at fewer than ``count`` positions; ``threshold`` removes units whose importance
    (firing frequency, or mean |activation| for ``criterion="magnitude"``) is below it. Ties are
    broken by unit index (lower index removed first), so the choice is deterministic. Every group
    keeps at least one unit.
    """
    if sum(v is not None for v in (fraction, count, threshold)) != 1:
        raise UserError("give exactly one of fraction, count or threshold")
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise UserError(f"fraction must be in [0, 1), got {fraction}")
    kept = {}
    for u in units:
        if u not in stats.count:
            raise UserError(f"statistics have no unit {u!r}")
        width = stats.count[u].numel()
        if count is not None:
            remove = torch.nonzero(stats.count[u] < count).flatten()
        elif threshold is not None:
            remove = torch.nonzero(stats.importance(u, criterion) < threshold).flatten()
        else:
            imp = stats.importance(u, criterion)
            order = torch.argsort(imp, stable=True)  # ties: lower index first
            remove = order[: int(round(fraction * width))]
        keep_mask = torch.ones(width, dtype=torch.bool)
        keep_mask[remove] = False
        if not keep_mask.any():  # keep the single most important unit
            keep_mask[int(torch.argsort(stats.importance(u, criterion), stable=True)[-1])] = True
        kept[u] = torch.nonzero(keep_mask).flatten().to(torch.int64)
    return kept


def _checked(model: nn.Module, kept: dict[str, torch.Tensor]) -> dict:
    refs = refs_by_name(model)
    for u, idx in kept.items():
        if u not in refs:
            raise UserError(f"model has no unit {u!r}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= refs[u].units):
            raise UserError(f"kept indices for {u} are outside its width {refs[u].units}")
    return refs


@torch.no_grad()
def prune_model(model: nn.Module, kept: dict[str, torch.Tensor]) -> nn.Module:
    """Slice ``model`` in place to keep only ``kept`` units; updates the config's per-block widths."""
    refs = _checked(model, kept)
    # Every entry of a parameter's axis is kept unless a unit block of a pruned group covers it; several
    # groups' blocks may share a parameter (a fused gate|up projection), so masks are built per axis first.
    masks: dict[tuple[str, int], torch.Tensor] = {}
    for u, idx in kept.items():
        ref = refs[u]
        for sl in ref.slices:
            p = model.get_parameter(sl.param)
            mask = masks.setdefault((sl.param, sl.axis), torch.ones(p.shape[sl.axis], dtype=torch.bool))
            block = torch.zeros(ref.units, dtype=torch.bool)
            block[idx] = True
            mask[sl.offset : sl.offset + ref.units] = block
    for (name, axis), mask in masks.items():
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        p = getattr(mod, leaf)
        rows = torch.nonzero(mask).flatten().to(p.device)
        setattr(mod, leaf, nn.Parameter(p.index_select(axis, rows).contiguous(), requires_grad=p.requires_grad))
        if isinstance(mod, nn.Linear) and leaf == "weight":
            mod.out_features, mod.in_features = mod.weight.shape
    for u, idx in kept.items():
        if refs[u].width_attr is not None:
            mod_name, attr = refs[u].width_attr
            setattr(model.get_submodule(mod_name), attr, int(idx.numel()))
    family_of(model.config).config_from_widths(model)
    return model


@torch.no_grad()
def zero_units(model: nn.Module, kept: dict[str, torch.Tensor]) -> nn.Module:
    """Silence every unit not in ``kept`` without changing shapes (the reference for slicing tests): its
    input-projection rows (and biases) become 0, so its activation — GELU(0) or silu(0)·0 — is exactly 0."""
    refs = _checked(model, kept)
    for u, idx in kept.items():
        ref = refs[u]
        drop = torch.ones(ref.units, dtype=torch.bool)
        drop[idx] = False
        for sl in ref.slices:
            if sl.axis != 0:
                continue
            p = model.get_parameter(sl.param)
            p[sl.offset : sl.offset + ref.units][drop.to(p.device)] = 0
    return model


def kept_tensors(kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{KEPT_PREFIX}{u}": idx.cpu() for u, idx in kept.items()}


def _structural_copy(module: nn.Module) -> nn.Module:
    """A new module object holding the same children and tensors as ``module`` (its child dict is a copy,
    so replacing a child of the copy leaves ``module`` alone)."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    return new


def pruned_copy(model: nn.Module, kept: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` pruned to ``kept`` without touching it and without copying it: the result shares every
    tensor with ``model`` except the residual blocks that hold a pruned unit group, which are sliced deep
    copies (:func:`prune_model` on them); its config is a copy with the new widths. Cheap enough to make
    one per candidate (the planner's pruning options), and what distillation needs: teacher and student
    side by side."""
    from .capture import residual_blocks

    refs = _checked(model, kept)
    blocks = residual_blocks(model)
    prefixes = sorted({blocks[refs[u].layer] for u in kept})
    root = _structural_copy(model)
    root.config = copy.deepcopy(model.config)
    for prefix in prefixes:
        owner, parts = root, prefix.split(".")
        for part in parts[:-1]:  # copy the containers on the path, so the new block goes into the copy only
            child = _structural_copy(owner._modules[part])
            owner._modules[part] = child
            owner = child
        owner._modules[parts[-1]] = copy.deepcopy(owner._modules[parts[-1]])
    return prune_model(root, kept)
