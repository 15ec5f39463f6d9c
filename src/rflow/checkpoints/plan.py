"""Key plans: how each tensor of a model (under its own, original key names) is built from a checkpoint.

A :data:`Plan` maps every model key to ``(source keys, combine)``; ``combine`` turns the source tensors
into the model's tensor (``one``: as is; ``cat``: concatenated along rows, e.g. diffusers' separate
q, k, v into a fused qkv; ``swap_halves``: diffusers' (scale, shift) order into BFL's (shift, scale)).
Plans are built from key names alone, so shapes (:func:`plan_shapes`) and the config follow from the
safetensors headers before any tensor is read.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError

Plan = dict[str, tuple[list[str], Callable[[list[torch.Tensor]], torch.Tensor]]]


def one(ts):
    return ts[0]


def cat(ts):
    return torch.cat(ts, dim=0)


def swap_halves(ts):
    scale, shift = ts[0].chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def block_indices(keys, prefix: str) -> list[int]:
    """The block numbers N of keys ``{prefix}N.…``, checked to run 0, 1, …, n − 1."""
    idx = set()
    for k in keys:
        if k.startswith(prefix):
            n = k[len(prefix) :].split(".", 1)[0]
            if not (n.isascii() and n.isdigit()):
                raise UserError(f"unexpected tensor {k!r}: blocks are numbered {prefix}0, {prefix}1, ...")
            idx.add(int(n))
    if idx and sorted(idx) != list(range(len(idx))):
        raise UserError(f"checkpoint blocks {prefix}N are not numbered 0..{len(idx) - 1}")
    return sorted(idx)


def identity_plan(keys: list[str], prefix: str = "") -> Plan:
    """Keys as they are, ``prefix`` removed; rflow's own bookkeeping tensors (``rflow.*``) are skipped."""
    return {k[len(prefix) :]: ([k], one) for k in keys if k.startswith(prefix) and not k[len(prefix):].startswith("rflow.")}


def plan_shapes(plan: Plan, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a plan produces, from source shapes alone (no tensor is read).

    Concatenated sources of the wrong rank count as zero rows here; config inference names them."""
    out = {}
    for dst, (srcs, fn) in plan.items():
        if fn is cat:
            parts = [tuple(shapes[s]) for s in srcs if len(shapes[s]) >= 1]
            out[dst] = (sum(s[0] for s in parts),) + (parts[0][1:] if parts else ())
        else:
            out[dst] = tuple(shapes[srcs[0]])
    return out


def check_plan_sources(plan: Plan, keys, what: str) -> None:
    """Every source key a plan reads exists."""
    keyset = set(keys)
    missing = [s for srcs, _ in plan.values() for s in srcs if s not in keyset]
    if missing:
        raise UserError(f"{what} checkpoint is missing {missing[0]!r}")
