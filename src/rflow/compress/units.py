"""Naming of MLP units (block × stream), layer-range parsing, and the hook points that expose them."""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from ..models.flux import Flux, FluxConfig

STREAMS = ("img", "txt", "single")


def unit_names(config: FluxConfig) -> list[str]:
    names = []
    for i in range(config.depth):
        names += [f"double_blocks.{i}.img", f"double_blocks.{i}.txt"]
    names += [f"single_blocks.{i}" for i in range(config.depth_single)]
    return names


def unit_widths(config: FluxConfig) -> dict[str, int]:
    w = {}
    for i, (wi, wt) in enumerate(config.double_mlp):
        w[f"double_blocks.{i}.img"], w[f"double_blocks.{i}.txt"] = wi, wt
    for i, ws in enumerate(config.single_mlp):
        w[f"single_blocks.{i}"] = ws
    return w


def unit_layer(name: str, config: FluxConfig) -> int:
    """The unified layer index of a unit (double blocks first, then single blocks)."""
    kind, idx = name.split(".")[:2]
    return int(idx) if kind == "double_blocks" else config.depth + int(idx)


def unit_stream(name: str) -> str:
    return name.split(".")[2] if name.startswith("double_blocks.") else "single"


def activation_module(model: Flux, name: str) -> nn.Module:
    """The module whose output is the unit's post-GELU activation (hook it to observe the unit)."""
    kind, idx = name.split(".")[:2]
    if kind == "double_blocks":
        block = model.double_blocks[int(idx)]
        return (block.img_mlp if unit_stream(name) == "img" else block.txt_mlp)[1]
    return model.single_blocks[int(idx)].mlp_act


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'0-18,30-37' -> sorted layer indices; None or 'all' -> every layer."""
    from ..options import int_range

    if spec is None or spec.strip().lower() == "all":
        return list(range(n_layers))
    return int_range(spec, "layers", low=0, high=n_layers - 1)


def parse_streams(spec: str | None) -> tuple[str, ...]:
    if spec is None:
        return STREAMS
    streams = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [s for s in streams if s not in STREAMS]
    if bad or not streams:
        raise UserError(f"unknown stream {bad[0] if bad else spec!r}; choose from {', '.join(STREAMS)}")
    return streams


def select_units(config: FluxConfig, layers: str | None = None, streams: str | None = None) -> list[str]:
    n = config.depth + config.depth_single
    keep_layers, keep_streams = set(parse_layers(layers, n)), set(parse_streams(streams))
    return [u for u in unit_names(config) if unit_layer(u, config) in keep_layers and unit_stream(u) in keep_streams]
