"""The options of the memory-budget planner (:mod:`rflow.quant.planner`): what one unit can become, what
that costs in bytes, and the candidate model that measures its error.

An option is a quantization format, ``"bf16"`` (keep), or a pruning option ``pruneP`` / ``pruneP+FORMAT``:
remove the P % least often firing hidden units of every MLP unit group of the block
(:func:`rflow.compress.prune.choose_kept`, criterion "frequency"), slice the weights for real
(:func:`rflow.compress.prune.pruned_copy`), retrain the block's MLP against a capture of the unpruned
model when one is given (:func:`rflow.compress.distill.distill`), and quantize the block's linear
layers to FORMAT (none for plain ``pruneP``). Pruning options apply to whole blocks
(``units="block"``).

K-quants (block 256) take llama.cpp's fallback type on the layers they do not fit
(:data:`rflow.quant.api.FALLBACK`), so every format is an option for every block; the unit table records
which formats an option really puts on the unit's layers.
"""

from __future__ import annotations

import contextlib
import copy
import re

import torch
from torch import nn

from ..errors import UserError

KEEP_LABEL = "bf16"
_PRUNE = re.compile(r"^prune(\d+)(?:\+(.+))?$", re.IGNORECASE)


def normalize_option(part: str) -> str:
    """One ``--options`` entry as the planner names it: ``"bf16"``, a format (``"Q8_0"``), ``"prune25"``
    or ``"prune25+Q8_0"``."""
    from .api import normalize_format

    m = _PRUNE.match(part.strip())
    if m is None:
        fmt = normalize_format(part)
        return KEEP_LABEL if fmt == "keep" else fmt
    share = int(m.group(1))
    if not 0 < share < 100:
        raise UserError(f"bad option {part!r}: a pruning share is a whole percentage between 1 and 99")
    if m.group(2) is None:
        return f"prune{share}"
    fmt = normalize_format(m.group(2))
    return f"prune{share}" if fmt == "keep" else f"prune{share}+{fmt}"


def split_option(option: str) -> tuple[float | None, str]:
    """``"prune25+Q8_0"`` -> (0.25, "Q8_0"); ``"prune50"`` -> (0.5, "bf16"); ``"int8"`` -> (None, "int8")."""
    m = _PRUNE.match(option)
    if m is None:
        return None, option
    return int(m.group(1)) / 100, m.group(2) or KEEP_LABEL


def layer_format(fmt: str, in_features: int) -> str | None:
    """The format a layer of input width ``in_features`` gets for the planner's ``fmt`` (K-quants fall back,
    see the module docstring), or None when ``fmt`` cannot hold it."""
    from .api import effective_format

    return KEEP_LABEL if fmt == KEEP_LABEL else effective_format(fmt, in_features, fallback=True)


def option_bytes(shape: tuple[int, int], option: str) -> int:
    """Packed weight bytes of a (out, in) weight in format ``option`` ("bf16": 2 bytes a weight; a
    K-quant its fallback's where it does not fit)."""
    rows, cols = shape
    fmt = layer_format(option, cols) or option
    if fmt == KEEP_LABEL:
        return 2 * rows * cols
    if fmt in ("int8", "fp8"):
        from .formats import packed_nbytes

        return packed_nbytes((rows, cols), fmt)
    from .linear import gguf_codecs

    return gguf_codecs().packed_nbytes((rows, cols), fmt)


def infeasible_reason(model: nn.Module, layers: list[str], option: str) -> str | None:
    """Why format ``option`` cannot quantize all of ``layers`` (a block size that does not divide an input
    width, fallback included), or None."""
    from .linear import gguf_qtypes

    for name in layers:
        width = model.get_submodule(name).in_features
        if layer_format(option, width) is None:
            return f"{name}: input width {width} is not a multiple of the {option} block size {gguf_qtypes()[option].block_size}"
    return None


# ---------------------------------------------------------------------------------------------- pruning


def block_groups(model: nn.Module, unit: str) -> list:
    """The MLP unit groups (:class:`~rflow.families.base.LayerRef`) of the residual block named ``unit``."""
    from ..compress.capture import residual_blocks
    from ..compress.units import layer_refs

    blocks = residual_blocks(model)
    return [r for r in layer_refs(model) if blocks.get(r.layer) == unit]


def kept_count(width: int, fraction: float) -> int:
    """How many of ``width`` units :func:`~rflow.compress.prune.choose_kept` keeps at ``fraction``."""
    return max(1, width - int(round(fraction * width)))


def pruned_shapes(model: nn.Module, layers: list[str], groups: list, fraction: float) -> dict[str, tuple[int, int]]:
    """(out, in) of each of ``layers`` once ``groups`` lose ``fraction`` of their units — the axes the
    groups' weight slices run along shrink by the units removed (no model call, no copy)."""
    shapes = {n: [model.get_submodule(n).out_features, model.get_submodule(n).in_features] for n in layers}
    for ref in groups:
        removed = ref.units - kept_count(ref.units, fraction)
        for sl in ref.slices:
            layer, _, leaf = sl.param.rpartition(".")
            if leaf == "weight" and layer in shapes:
                shapes[layer][sl.axis] -= removed
    return {n: (a, b) for n, (a, b) in shapes.items()}


def option_entry(model: nn.Module, unit: str, layers: list[str], option: str, by: str) -> dict:
    """{"option", "bytes", "formats"} of ``option`` for a unit, or {"option", "reason"} when it is infeasible."""
    fraction, fmt = split_option(option)
    if fraction is None:
        shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in layers}
    else:
        if by != "block":
            return {"option": option, "reason": "pruning options apply to whole blocks (units=block)"}
        groups = block_groups(model, unit)
        if not groups:
            return {"option": option, "reason": f"{unit} holds no MLP unit group to prune"}
        shapes = pruned_shapes(model, layers, groups, fraction)
    formats: dict[str, int] = {}
    for n, (_, cols) in shapes.items():
        got = layer_format(fmt, cols)
        if got is None:
            from .linear import gguf_qtypes

            return {"option": option, "reason": f"{n}: input width {cols} is not a multiple of the {fmt} block size "
                                                 f"{gguf_qtypes()[fmt].block_size}"}
        formats[got] = formats.get(got, 0) + 1
    return {"option": option, "bytes": sum(option_bytes(s, fmt) for s in shapes.values()), "formats": formats}


# ---------------------------------------------------------------------------------------------- candidates


@contextlib.contextmanager
def quantized(model: nn.Module, layers: dict[str, str]):
    """``model`` with ``layers`` ({layer: planner format}) quantized for the duration of the block: each
    layer is swapped for a quantized copy (:func:`rflow.quant.api.quantize_` on a deep copy of just that
    layer; K-quants with their fallback), and the original modules are put back afterwards, untouched."""
    from .api import quantize_

    saved = []
    try:
        for name, option in layers.items():
            if option == KEEP_LABEL:
                continue
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            original = getattr(owner, leaf)
            holder = nn.Module()
            holder.layer = copy.deepcopy(original)
            quantize_(holder, {"layer": option}, fallback=True)
            setattr(owner, leaf, holder.layer)
            saved.append((owner, leaf, original))
        yield model
    finally:
        for owner, leaf, original in reversed(saved):
            setattr(owner, leaf, original)


def choose_pruned(model: nn.Module, stats, units: dict[str, float]) -> dict[str, torch.Tensor]:
    """Kept unit indices for pruning each block of ``units`` ({block: fraction}) by firing frequency."""
    from ..compress.prune import choose_kept

    kept: dict[str, torch.Tensor] = {}
    for unit, fraction in units.items():
        names = [r.name for r in block_groups(model, unit)]
        kept.update(choose_kept(stats, names, criterion="frequency", fraction=fraction))
    return kept


def distilled(teacher: nn.Module, student: nn.Module, reader, layers: list[int], settings: dict) -> list[dict]:
    """Retrain ``student``'s blocks ``layers`` on the capture (:func:`rflow.compress.distill.distill` with
    ``settings``: steps, lr, batch, seed) and write the trained tensors into it; returns the distillation
    report (one row per layer)."""
    from ..compress.distill import distill

    with torch.enable_grad():  # the planner measures under no_grad; training needs gradients
        patches, report = distill(teacher, student, reader, layers=layers, **settings)
    with torch.no_grad():
        for tensors in patches.values():
            for key, value in tensors.items():
                p = student.get_parameter(key)
                p.copy_(value.to(p.device, p.dtype))
    return report


@contextlib.contextmanager
def planned_model(model: nn.Module, layers: dict[str, str], kept: dict[str, torch.Tensor] | None = None,
                  reader=None, distill_settings: dict | None = None):
    """``model`` as a plan makes it, for the duration of the block: the pruned blocks (``kept``) as sliced
    copies (distilled on ``reader`` when given), then ``layers`` ({layer: planner format}) quantized.
    ``model`` itself is left as it was. Yields (candidate model, distillation report)."""
    from ..compress.capture import residual_blocks
    from ..compress.prune import pruned_copy
    from ..compress.units import refs_by_name

    report: list[dict] = []
    target = model
    if kept:
        target = pruned_copy(model, kept)
        if reader is not None:
            refs = refs_by_name(model)
            blocks = residual_blocks(model)
            todo = sorted({refs[u].layer for u in kept})
            missing = [blocks[L] for L in todo if L not in reader.layers]
            if missing:
                raise UserError(f"{reader.path}: block {missing[0]} was not captured; capture every block to distill")
            report = distilled(model, target, reader, todo, distill_settings or {})
    with quantized(target, layers):
        yield target, report
