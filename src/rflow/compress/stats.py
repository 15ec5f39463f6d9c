"""Activation statistics per MLP hidden unit, and their versioned file format.

For every unit: ``count`` — positions (token × sampling step) where its post-GELU activation was
> 0; ``sum_abs`` and ``sum_sq`` — Σ|a| and Σa² for magnitude importance; and per unit group the
number of ``positions`` seen. File: safetensors (int64 counts, float64 sums) with JSON metadata
under ``rflow.stats``: schema, version, model fingerprint, prompt count, steps, sizes, positions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints.io import open_weights, save_safetensors
from ..errors import UserError
from ..models.flux import FluxConfig
from .units import unit_names, unit_widths

SCHEMA = "rflow.stats"
VERSION = 2  # 2: ``fingerprint`` is the content fingerprint of the model's tensors (1: of its file header)


@dataclass
class ActivationStats:
    fingerprint: str
    count: dict[str, torch.Tensor]  # unit -> int64 [width]
    sum_abs: dict[str, torch.Tensor]  # unit -> float64 [width]
    sum_sq: dict[str, torch.Tensor]  # unit -> float64 [width]
    positions: dict[str, int]  # unit -> positions seen
    meta: dict = field(default_factory=dict)  # prompts, steps, sizes, model name, ...

    @classmethod
    def empty(cls, config: FluxConfig, fingerprint: str, **meta) -> "ActivationStats":
        w = unit_widths(config)
        names = unit_names(config)
        return cls(fingerprint,
                   {u: torch.zeros(w[u], dtype=torch.int64) for u in names},
                   {u: torch.zeros(w[u], dtype=torch.float64) for u in names},
                   {u: torch.zeros(w[u], dtype=torch.float64) for u in names},
                   {u: 0 for u in names}, dict(meta))

    @property
    def units(self) -> list[str]:
        return list(self.count)

    def total_units(self) -> int:
        return sum(v.numel() for v in self.count.values())

    def frequency(self, unit: str) -> torch.Tensor:
        """Fraction of positions where each unit fired (activation > 0)."""
        return self.count[unit].double() / max(1, self.positions[unit])

    def mean_abs(self, unit: str) -> torch.Tensor:
        return self.sum_abs[unit] / max(1, self.positions[unit])

    def importance(self, unit: str, criterion: str) -> torch.Tensor:
        if criterion == "frequency":
            return self.frequency(unit)
        if criterion == "magnitude":
            return self.mean_abs(unit)
        raise UserError(f"unknown criterion {criterion!r}; choose frequency or magnitude")

    def add_(self, other: "ActivationStats") -> "ActivationStats":
        """Sum ``other`` into this (same model fingerprint and unit shapes required)."""
        if other.fingerprint != self.fingerprint:
            raise UserError(f"statistics are from different models ({self.fingerprint} vs {other.fingerprint})")
        if {u: v.shape for u, v in self.count.items()} != {u: v.shape for u, v in other.count.items()}:
            raise UserError("statistics cover different units or widths")
        for u in self.count:
            self.count[u] += other.count[u]
            self.sum_abs[u] += other.sum_abs[u]
            self.sum_sq[u] += other.sum_sq[u]
            self.positions[u] += other.positions[u]
        m, o = self.meta, other.meta
        m["prompts"] = m.get("prompts", 0) + o.get("prompts", 0)
        for k in ("steps", "sizes"):
            m[k] = sorted(set(map(_hashable, m.get(k, []))) | set(map(_hashable, o.get(k, []))))
        return self

    def check_usable(self, where) -> None:
        """Refuse statistics that cannot rank units: a group that saw no position, or non-finite sums."""
        for u in self.count:
            if self.positions[u] <= 0:
                raise UserError(f"{where}: unit group {u} saw no positions; these statistics cannot rank its units "
                                "(run rflow analyze over more prompts)")
            for name, t in (("Σ|a|", self.sum_abs[u]), ("Σa²", self.sum_sq[u])):
                if not bool(torch.isfinite(t).all()):
                    raise UserError(f"{where}: unit group {u} has non-finite {name} (the model produced NaN/inf "
                                    "while being analyzed); these statistics cannot be used")
            if bool((self.count[u] < 0).any()) or bool((self.count[u] > self.positions[u]).any()):
                raise UserError(f"{where}: unit group {u} has counts outside 0…{self.positions[u]}: corrupt statistics")

    def save(self, path: str | os.PathLike) -> None:
        tensors = {}
        for u in self.count:
            tensors[f"{u}.count"] = self.count[u]
            tensors[f"{u}.sum_abs"] = self.sum_abs[u]
            tensors[f"{u}.sum_sq"] = self.sum_sq[u]
            tensors[f"{u}.positions"] = torch.tensor([self.positions[u]], dtype=torch.int64)
        meta = {"schema": SCHEMA, "version": VERSION, "fingerprint": self.fingerprint, "units": self.units,
                "total_positions": sum(self.positions.values()), **self.meta}
        save_safetensors(tensors, path, {SCHEMA: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ActivationStats":
        p = Path(path)
        with open_weights(p) as f:
            raw = f.metadata.get(SCHEMA)
            if raw is None:
                raise UserError(f"{p}: not an rflow statistics file (no {SCHEMA} metadata)")
            try:
                meta = json.loads(raw)
                units = [str(u) for u in meta.pop("units")]
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                raise UserError(f"{p}: corrupt statistics metadata") from None
            if meta.get("schema") == SCHEMA and meta.get("version") == 1:
                raise UserError(f"{p}: statistics from an older rflow, which identified models by file header; "
                                "run rflow analyze again")
            if meta.get("schema") != SCHEMA or meta.get("version") != VERSION:
                raise UserError(f"{p}: statistics schema {meta.get('schema')} v{meta.get('version')} is not {SCHEMA} v{VERSION}")
            try:
                count = {u: f.get(f"{u}.count") for u in units}
                sum_abs = {u: f.get(f"{u}.sum_abs") for u in units}
                sum_sq = {u: f.get(f"{u}.sum_sq") for u in units}
                positions = {u: int(f.get(f"{u}.positions")[0]) for u in units}
            except KeyError as e:
                raise UserError(f"{p}: statistics file is missing {e.args[0]!r}") from None
        for u in units:
            if not (count[u].dtype == torch.int64 and count[u].shape == sum_abs[u].shape == sum_sq[u].shape):
                raise UserError(f"{p}: inconsistent tensors for unit {u}")
        fingerprint = str(meta.pop("fingerprint", ""))
        for k in ("schema", "version", "total_positions"):
            meta.pop(k, None)
        return cls(fingerprint, count, sum_abs, sum_sq, positions, meta)


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def merge(paths: list[str | os.PathLike]) -> ActivationStats:
    if not paths:
        raise UserError("nothing to merge")
    total = ActivationStats.load(paths[0])
    for p in paths[1:]:
        total.add_(ActivationStats.load(p))
    return total
