"""``quantize_(model, plan)``: replace a transformer's linear layers by quantized ones, in place.

A plan maps qualified layer names or ``fnmatch`` globs to a format::

    quantize_(model, {"double_blocks.*.img_mlp.0": "Q4_K", "single_blocks.0.*": "keep", "*": "int8"})

The first pattern that matches a layer decides its format (a dict keeps its order); layers no pattern
matches stay as they are. Formats: ``"int8"``, ``"fp8"`` (:mod:`.formats`), a GGUF type (``"Q8_0"``,
``"Q4_K"``, … :mod:`.gguf_codecs`; any case; its raw F16/F32 types too), or ``"keep"`` / ``"bf16"`` for
none (the layer keeps its dtype, whatever it is). A plain string is short for ``{"*": format}``.

Eligible layers (:func:`linear_layers`): every ``nn.Linear`` of the model but the ones its family keeps
in high precision — the family module's ``UNQUANTIZED`` globs (FLUX.1/FLUX.2: the input embedders and
the final layer; Z-Image: the embedders and the final layer); a model of no known family uses
:data:`DEFAULT_UNQUANTIZED`. Widths may be anything (pruned models quantize like any other), except
that a GGUF type needs an input width that is a multiple of its block size. With ``fallback=True`` a
K-quant (block 256) layer whose input width 256 does not divide takes llama.cpp's fallback type instead
(:data:`FALLBACK`: Q6_K→Q8_0, Q5_K→Q5_1, Q4_K→Q5_0, Q3_K and Q2_K→Q4_0, block 32 — llama.cpp's IQ4_NL
for the last two is not an rflow type; Q4_0 has its 4.5 bits per weight), as ``llama-quantize`` does.

Nothing changes unless the whole plan is valid: a pattern that matches no eligible layer (a typo, or a
layer the family keeps unquantized), an unknown format, or a GGUF block size that does not divide a
layer's input width is a one-line :class:`~rflow.errors.UserError`.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ..errors import UserError
from .linear import (COMPUTE_MODES, FP8_MIN_CAPABILITY, QuantLinear, _capability, canonical_format, gguf_qtypes,
                     module_class, set_compute)

KEEP = ("keep", "bf16")
# every family's high-precision layers, for a model whose family module has no UNQUANTIZED
DEFAULT_UNQUANTIZED = ("img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.*",
                       "x_embedder", "cap_embedder.*", "t_embedder.*")

# llama.cpp's substitutes for a K-quant on a tensor whose row length is not a multiple of 256
FALLBACK = {"Q6_K": "Q8_0", "Q5_K": "Q5_1", "Q4_K": "Q5_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0"}

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _family(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    from ..compress.units import family_of

    try:
        return family_of(config)
    except UserError:
        return None


def unquantized_patterns(model: nn.Module) -> tuple[str, ...]:
    """The globs of the layers ``model``'s family keeps in high precision."""
    fam = _family(model)
    return tuple(getattr(fam, "UNQUANTIZED", DEFAULT_UNQUANTIZED)) if fam is not None else DEFAULT_UNQUANTIZED


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _layers(model: nn.Module, kind) -> list[str]:
    keep = unquantized_patterns(model)
    return [n for n, m in model.named_modules() if isinstance(m, kind) and not _matches(n, keep)]


def linear_layers(model: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers ``quantize_`` may replace, in model order."""
    return _layers(model, nn.Linear)


def normalize_format(fmt: str) -> str:
    """A plan's format as rflow names it ("int8", "fp8", "keep", or a GGUF type in upper case)."""
    if not isinstance(fmt, str):
        raise UserError(f"a quantization format is a string, not {fmt!r}")
    if fmt.strip().lower() in KEEP:
        return "keep"
    try:
        module_class(fmt)
    except UserError:
        raise UserError(f"unknown quantization format {fmt!r}; choose int8, fp8, keep or a GGUF type "
                        f"({', '.join(q for q in gguf_qtypes() if q.lower() not in KEEP) or 'unavailable'})") from None
    return canonical_format(fmt)


def effective_format(fmt: str, in_features: int, *, fallback: bool = False) -> str | None:
    """The format a layer of input width ``in_features`` gets for ``fmt`` (a normalized format): ``fmt``
    itself, its :data:`FALLBACK` when ``fallback`` and the K-quant's block does not divide the width, or
    None when the format cannot hold the layer."""
    qt = gguf_qtypes().get(fmt)
    if qt is None or in_features % qt.block_size == 0:
        return fmt
    sub = FALLBACK.get(fmt) if fallback else None
    if sub is not None and in_features % gguf_qtypes()[sub].block_size == 0:
        return sub
    return None


def resolve_plan(model: nn.Module, plan: dict[str, str] | str, *, fallback: bool = False) -> dict[str, str]:
    """{layer: format} for every eligible layer a pattern of ``plan`` matches ("keep" included), checked
    as :func:`quantize_` checks it; nothing is changed. ``fallback``: see the module docstring; the
    result names the format each layer actually gets."""
    if isinstance(plan, str):
        plan = {"*": plan}
    if not isinstance(plan, dict) or not plan:
        raise UserError("a quantization plan is a non-empty {pattern: format} mapping")
    fmts = {}
    for pattern, fmt in plan.items():
        if not isinstance(pattern, str) or not pattern:
            raise UserError(f"a quantization pattern is a non-empty string, not {pattern!r}")
        try:
            fmts[pattern] = normalize_format(fmt)
        except UserError as e:
            raise UserError(f"pattern {pattern!r}: {e}") from None

    eligible = linear_layers(model)
    for pattern, fmt in fmts.items():
        if any(fnmatch.fnmatchcase(n, pattern) for n in eligible):
            continue
        done = [n for n in _layers(model, QuantLinear) if fnmatch.fnmatchcase(n, pattern)]
        held = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and fnmatch.fnmatchcase(n, pattern)]
        if done:
            raise UserError(f"pattern {pattern!r} matches only layers that are already quantized ({done[0]})")
        if held:
            if fmt == "keep":
                continue
            raise UserError(f"pattern {pattern!r} matches only layers this model keeps in high precision ({held[0]})")
        example = eligible[0] if eligible else "none"
        raise UserError(f"pattern {pattern!r} matches no linear layer of this model (eligible layers look like {example!r})")

    out: dict[str, str] = {}
    qtypes = gguf_qtypes()
    for name in eligible:
        fmt = next((f for p, f in fmts.items() if fnmatch.fnmatchcase(name, p)), None)
        if fmt is None:
            continue
        if fmt in qtypes:
            width = model.get_submodule(name).in_features
            got = effective_format(fmt, width, fallback=fallback)
            if got is None:
                hint = (f"; allow llama.cpp's fallback type {FALLBACK[fmt]} (fallback=True, rflow quantize --fallback)"
                        if fmt in FALLBACK and not fallback else "")
                raise UserError(f"{name}: {fmt} needs an input width that is a multiple of {qtypes[fmt].block_size}, "
                                f"and this layer's is {width}{hint}")
            fmt = got
        out[name] = fmt
    return out


def _check_compute(model: nn.Module, chosen: dict[str, str], compute: str) -> None:
    if compute not in ("auto", *COMPUTE_MODES):
        raise UserError(f"unknown compute mode {compute!r}; choose auto, {', '.join(COMPUTE_MODES)}")
    if compute not in ("int8", "fp8"):
        return
    present = set(chosen.values()) | {m.format for m in model.modules() if isinstance(m, QuantLinear)}
    if compute not in present:
        raise UserError(f"compute={compute!r} needs {compute} layers, and the plan makes none")
    if compute == "fp8":
        for name, fmt in chosen.items():
            if fmt != "fp8":
                continue
            cap = _capability(model.get_submodule(name).weight.device)
            if cap is None or cap < FP8_MIN_CAPABILITY:
                raise UserError(f"compute='fp8' needs a CUDA GPU of compute capability ≥ 8.9, and {name} is not on one; "
                                "use compute='dequant' or 'auto'")


@torch.no_grad()
def quantize_(model: nn.Module, plan: dict[str, str] | str, *, compute: str = "dequant",
              fallback: bool = False) -> nn.Module:
    """Replace, in place, each eligible ``nn.Linear`` a pattern of ``plan`` matches by the
    :class:`~rflow.quant.linear.QuantLinear` of its format, quantized on the layer's device (the dense
    weight is dropped; the bias is kept). ``compute``: the layers' compute mode afterwards
    (:func:`~rflow.quant.linear.set_compute`: "dequant", "int8", "fp8" or "auto"). ``fallback``: K-quants
    take llama.cpp's fallback type on layers their block does not fit (module docstring). Returns ``model``."""
    chosen = resolve_plan(model, plan, fallback=fallback)
    _check_compute(model, chosen, compute)
    for name, fmt in chosen.items():
        if fmt == "keep":
            continue
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, leaf)
        setattr(owner, leaf, QuantLinear.from_linear(linear, fmt))
        del linear
    set_compute(model, compute)
    return model


def plan_summary(model: nn.Module) -> dict:
    """What the weights of ``model``'s eligible layers take: per layer {"format", "bytes" (packed weight
    bytes; dense layers: their weight's bytes and dtype name as the format), "bf16_bytes"}, and totals:
    ``bytes`` / ``bf16_bytes`` / ``ratio`` over those layers, ``bits_per_weight``, and the whole model's
    resident bytes (``model_bytes``: parameters and buffers) against all of it in bf16 (``model_bf16_bytes``)."""
    keep = unquantized_patterns(model)
    layers: dict[str, dict] = {}
    weights = 0
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, QuantLinear)) or _matches(name, keep):
            continue
        n = m.in_features * m.out_features
        weights += n
        if isinstance(m, QuantLinear):
            layers[name] = {"format": m.format, "bytes": m.weight_nbytes(), "bf16_bytes": 2 * n}
        else:
            w = m.weight
            layers[name] = {"format": _DTYPE_NAMES.get(w.dtype, str(w.dtype).removeprefix("torch.")),
                            "bytes": w.numel() * w.element_size(), "bf16_bytes": 2 * n}
    total = sum(v["bytes"] for v in layers.values())
    bf16 = sum(v["bf16_bytes"] for v in layers.values())
    resident = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    dense = sum(p.numel() for p in model.parameters()) + sum(m.in_features * m.out_features for m in model.modules()
                                                             if isinstance(m, QuantLinear))
    return {"layers": layers, "bytes": total, "bf16_bytes": bf16, "ratio": total / bf16 if bf16 else 1.0,
            "bits_per_weight": 8 * total / weights if weights else 0.0,
            "model_bytes": resident, "model_bf16_bytes": 2 * dense}
