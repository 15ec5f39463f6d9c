"""MLP unit groups of any family, from its layer list: names, widths, hook points, ``--layers``/``--streams``.

Every tool addresses units through the family's :class:`~rflow.families.base.LayerRef` list
(:func:`layer_refs`), never by parsing names: FLUX.1's groups are ``double_blocks.{i}.img|txt`` and
``single_blocks.{i}``, FLUX.2's the same with SwiGLU MLPs, Z-Image's ``layers.{i}`` and its refiners.
"""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from ..families.base import LayerRef

STREAMS = ("img", "txt", "single")  # FLUX.1's streams (the default of messages and CLI help)


def family_of(config):
    """The family module of a transformer config (FluxConfig, Flux2Config, ZImageConfig)."""
    from ..checkpoints.loader import families

    for fam in families():
        if isinstance(config, getattr(fam, "CONFIG_CLASS", ())):
            return fam
    raise UserError(f"no model family for a {type(config).__name__}")


def _config(config_or_model):
    return config_or_model.config if isinstance(config_or_model, nn.Module) else config_or_model


def layer_refs(config_or_model) -> list[LayerRef]:
    cfg = _config(config_or_model)
    return family_of(cfg).layers(cfg)


def refs_by_name(config_or_model) -> dict[str, LayerRef]:
    return {r.name: r for r in layer_refs(config_or_model)}


def unit_names(config) -> list[str]:
    return [r.name for r in layer_refs(config)]


def unit_widths(config) -> dict[str, int]:
    return {r.name: r.units for r in layer_refs(config)}


def n_layers(config) -> int:
    """How many indices ``--layers`` ranges over."""
    return 1 + max((r.layer for r in layer_refs(config)), default=-1)


def streams_of(config) -> tuple[str, ...]:
    return tuple(dict.fromkeys(r.stream for r in layer_refs(config)))


def unit_layer(name: str, config) -> int:
    """The unified layer index of a unit group (FLUX.1: double blocks first, then single blocks)."""
    return refs_by_name(config)[name].layer


def unit_stream(name: str, config=None) -> str:
    if config is not None:
        return refs_by_name(config)[name].stream
    return name.split(".")[2] if name.startswith("double_blocks.") else "single"


def activation_module(model: nn.Module, name: str) -> nn.Module:
    """The module whose output is the unit group's hidden activation (hook it to observe the units)."""
    ref = refs_by_name(model).get(name)
    if ref is None:
        raise UserError(f"this model has no unit group {name!r}")
    return model.get_submodule(ref.act)


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'0-18,30-37' -> sorted layer indices; None or 'all' -> every layer."""
    from ..options import int_range

    if spec is None or spec.strip().lower() == "all":
        return list(range(n_layers))
    return int_range(spec, "layers", low=0, high=n_layers - 1)


def parse_streams(spec: str | None, known: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
    """'img,txt' -> ("img", "txt"); None -> None (every stream). ``known``: the model's streams
    (FLUX.1's when not given, for checks before a model is loaded)."""
    if spec is None:
        return None
    known = known or STREAMS
    streams = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [s for s in streams if s not in known]
    if bad or not streams:
        raise UserError(f"unknown stream {bad[0] if bad else spec!r}; choose from {', '.join(known)}")
    return streams


def check_streams_spec(spec: str | None) -> None:
    """Early, model-free check of ``--streams``: names only (each model's own streams are checked later)."""
    from ..checkpoints.loader import families

    known = tuple(dict.fromkeys(s for fam in families() for s in fam.STREAMS))
    parse_streams(spec, known)


def select_units(config, layers: str | None = None, streams: str | None = None) -> list[str]:
    refs = layer_refs(config)
    keep_layers = set(parse_layers(layers, n_layers(config)))
    keep_streams = parse_streams(streams, streams_of(config))
    return [r.name for r in refs if r.layer in keep_layers and (keep_streams is None or r.stream in keep_streams)]
