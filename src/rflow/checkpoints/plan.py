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


class Dequant:
    """Combine for a layer stored quantized in rflow's own layout (``X.qweight`` [+ ``X.scale``]):
    dequantizes to the logical weight, whose shape it knows without reading (``out_shape``)."""

    def __init__(self, format: str, out_shape: tuple[int, int]):
        self.format, self.out_shape = format, tuple(int(d) for d in out_shape)

    def __call__(self, ts):
        from ..quant.formats import dequantize_stored

        return dequantize_stored(self.format, ts, self.out_shape)


QUANT_METADATA_KEY = "rflow.quant"  # {"version": 1, "layers": {layer: {"format": F, "shape": [out, in]}}}
QUANT_VERSION = 1


def quantized_layers(metadata: dict[str, str], where) -> dict[str, tuple[str, tuple[int, int]]]:
    """layer -> (format, (out, in)) from rflow's quantization metadata ({} if the file has none)."""
    import json

    if QUANT_METADATA_KEY not in metadata:
        return {}
    try:
        meta = json.loads(metadata[QUANT_METADATA_KEY])
        if meta.get("version") != QUANT_VERSION:
            raise UserError(f"{where}: quantization format version {meta.get('version')} is not {QUANT_VERSION}")
        return {str(k): (str(v["format"]), (int(v["shape"][0]), int(v["shape"][1]))) for k, v in meta["layers"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise UserError(f"{where}: invalid {QUANT_METADATA_KEY} metadata") from None


def with_quantized_layers(plan: Plan, layers: dict[str, tuple[str, tuple[int, int]]]) -> Plan:
    """A plan whose quantized layers (``X.qweight`` [+ ``X.scale``]) build the logical ``X.weight``."""
    out = dict(plan)
    for layer, (fmt, shape) in layers.items():
        q = out.pop(f"{layer}.qweight", None)
        if q is None:
            raise UserError(f"quantization metadata names {layer!r}, but {layer}.qweight is not in the file")
        srcs = list(q[0])
        scale = out.pop(f"{layer}.scale", None)
        if scale is not None:
            srcs += scale[0]
        out[f"{layer}.weight"] = (srcs, Dequant(fmt, shape))
    return out


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


def scaled(ts):
    """ComfyUI's scaled fp8: the stored fp8 weight times its ``scale_weight`` (one per layer, or one per
    output row), in float32."""
    w, scale = ts[0].float(), ts[1].float()
    if scale.numel() == 1:
        return w * scale.reshape(())
    if w.ndim >= 1 and scale.numel() == w.shape[0]:
        return w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    raise UserError(f"a scale_weight of shape {tuple(scale.shape)} does not fit a weight of shape {tuple(w.shape)}")


SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's marker tensor of a scaled-fp8 checkpoint
_SCALE_KEYS = (".scale_weight", ".scale_input")


def identity_plan(keys: list[str], prefix: str = "") -> Plan:
    """Keys as they are, ``prefix`` removed; rflow's own bookkeeping tensors (``rflow.*``) are skipped.

    ComfyUI's scaled-fp8 files (a ``scaled_fp8`` marker tensor, ``X.scale_weight`` beside ``X.weight``)
    are read with the scale applied — ``X.weight`` is built from both — never as the bare fp8 values;
    ``X.scale_input`` (activation scales for fp8 matmuls) is not needed to compute the layer."""
    keyset = set(keys)
    plan: Plan = {}
    for k in keys:
        if not k.startswith(prefix):
            continue
        own = k[len(prefix):]
        if own.startswith("rflow.") or own == SCALED_FP8_MARKER or own.endswith(_SCALE_KEYS):
            continue
        scale = k[: -len(".weight")] + ".scale_weight" if k.endswith(".weight") else None
        plan[own] = ([k, scale], scaled) if scale in keyset else ([k], one)
    return plan


def plan_shapes(plan: Plan, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a plan produces, from source shapes alone (no tensor is read).

    Concatenated sources of the wrong rank count as zero rows here; config inference names them."""
    out = {}
    for dst, (srcs, fn) in plan.items():
        if isinstance(fn, Dequant):
            out[dst] = fn.out_shape
        elif fn is cat:
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


def check_against_model(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], plan: Plan,
                        source_shapes: dict[str, tuple[int, ...]], *, title: str, model: str,
                        why: Callable[[str], str], part_rows: Callable[[str, tuple[int, ...], int], list[int]] | None = None,
                        label: Callable[[str], str] | None = None, missing_name: Callable[[str], str] | None = None) -> None:
    """Every tensor of a model built from the inferred config (``expected``: its keys and shapes) is in the
    checkpoint with exactly that shape, and the checkpoint has no other: else one UserError naming the
    checkpoint's own tensor.

    ``title``: the family ("FLUX.1"); ``model``: what the config describes ("a FLUX.1 transformer with 19
    double and 38 single blocks"); ``why(key)``: what a shape follows from ("for hidden size 3072");
    ``part_rows(key, shape, n)``: the rows of each of the n sources a mapped key concatenates (default:
    equal parts); ``label(key)`` / ``missing_name(key)``: how to name a model key in messages."""
    from .io import tensor_kind

    label = label or (lambda k: k)
    missing = [k for k in expected if k not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{title} checkpoint is missing {(missing_name or label)(missing[0])!r}{more}")
    extra = [k for k in shapes if k not in expected]
    if extra:
        raise UserError(f"unexpected tensor {label(extra[0])!r} for {model}")
    for k, want in expected.items():
        srcs, combine = plan[k]
        if isinstance(combine, Dequant):  # packed: the logical shape is the metadata's
            if combine.out_shape != tuple(want):
                raise UserError(f"{srcs[0]} holds a {combine.out_shape} weight, expected {tuple(want)} {why(k)}")
            continue
        if combine is not cat:  # one tensor (a scaled-fp8 weight's second source is its scale)
            parts = [(srcs[0], want)]
        else:
            rows = part_rows(k, want, len(srcs)) if part_rows else [want[0] // len(srcs)] * len(srcs)
            parts = [(s, (r,) + tuple(want[1:])) for s, r in zip(srcs, rows)]
        for s, w in parts:
            got = tuple(source_shapes[s])
            if got != w:
                what = f"expected a {len(w)}-D {tensor_kind(k)}" if len(got) != len(w) else f"expected {w} {why(k)}"
                raise UserError(f"{s} has shape {got}, {what}")
