"""Structured pruning of MLP hidden units: choose units from statistics, slice the weights for real.

Double blocks lose rows of ``{img,txt}_mlp.0`` (weight and bias) and columns of ``{img,txt}_mlp.2``;
single blocks lose rows of ``linear1[3·hidden:]`` and columns of ``linear2[:, hidden:]``. The kept
indices of every pruned unit group are returned and saved with the model (``rflow.kept.<unit>``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..models.flux import Flux
from .stats import ActivationStats
from .units import unit_widths

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


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return lin


@torch.no_grad()
def prune_model(model: Flux, kept: dict[str, torch.Tensor]) -> Flux:
    """Slice ``model`` in place to keep only ``kept`` units; updates ``model.config`` widths."""
    widths = unit_widths(model.config)
    for u, idx in kept.items():
        if u not in widths:
            raise UserError(f"model has no unit {u!r}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= widths[u]):
            raise UserError(f"kept indices for {u} are outside its width {widths[u]}")
        idx = idx.to(model.device)
        kind, i = u.split(".")[:2]
        if kind == "double_blocks":
            mlp = getattr(model.double_blocks[int(i)], f"{u.split('.')[2]}_mlp")
            up, down = mlp[0], mlp[2]
            mlp[0] = _linear(up.weight[idx], up.bias[idx])
            mlp[2] = _linear(down.weight[:, idx], down.bias)
        else:
            b = model.single_blocks[int(i)]
            h = b.hidden_size
            rows = torch.cat([torch.arange(3 * h, device=idx.device), 3 * h + idx])
            cols = torch.cat([torch.arange(h, device=idx.device), h + idx])
            b.linear1 = _linear(b.linear1.weight[rows], b.linear1.bias[rows])
            b.linear2 = _linear(b.linear2.weight[:, cols], b.linear2.bias)
            b.mlp_width = int(idx.numel())
    cfg = model.config
    cfg.double_mlp = [(m.img_mlp[0].out_features, m.txt_mlp[0].out_features) for m in model.double_blocks]
    cfg.single_mlp = [b.mlp_width for b in model.single_blocks]
    return model


@torch.no_grad()
def zero_units(model: Flux, kept: dict[str, torch.Tensor]) -> Flux:
    """Silence every unit not in ``kept`` without changing shapes (the reference for slicing tests):
    its input row and bias become 0, so its GELU output is exactly 0."""
    widths = unit_widths(model.config)
    for u, idx in kept.items():
        drop = torch.ones(widths[u], dtype=torch.bool)
        drop[idx] = False
        drop = drop.to(model.device)
        kind, i = u.split(".")[:2]
        if kind == "double_blocks":
            up = getattr(model.double_blocks[int(i)], f"{u.split('.')[2]}_mlp")[0]
            up.weight[drop] = 0
            up.bias[drop] = 0
        else:
            b = model.single_blocks[int(i)]
            h = b.hidden_size
            b.linear1.weight[3 * h :][drop] = 0
            b.linear1.bias[3 * h :][drop] = 0
    return model


def kept_tensors(kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{KEPT_PREFIX}{u}": idx.cpu() for u, idx in kept.items()}
