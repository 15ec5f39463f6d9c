"""Loading checkpoints that are already quantized, without expanding them: GGUF blocks stay GGUF blocks,
float8 weights stay float8 — a :class:`~rflow.checkpoints.loader.LoadPlan` for the one loader.

:func:`keep_quantized_plan` marks every quantized ``nn.Linear`` weight of the checkpoint "stored" (read
as its packed bytes, never dequantized on the host) and builds the matching :class:`GGUFLinear` or
:class:`Fp8Linear` from it; everything else loads as usual. Peak host memory stays near the file
size. ComfyUI's scaled-fp8 weights (a per-layer scale) and fp8 tensors that are not linear weights are
expanded to the compute dtype as before.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoints.io import open_weights
from ..checkpoints.loader import Checkpoint, LoadPlan
from ..checkpoints.plan import Dequant, one

FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


def quantized_weights(ck: Checkpoint) -> dict[str, tuple[str, str | None, list[str]]]:
    """Model key -> (kind, format, source keys) for every linear weight stored quantized: "gguf" (a GGUF
    tensor), "fp8" (a float8 tensor) or "rflow" (rflow's own layout: ``qweight`` [+ ``scale``])."""
    with torch.device("meta"):
        model = ck.family.build(ck.config)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    files, out = ck.files, {}
    for k, (srcs, fn) in ck.plan.items():
        if k not in linears:
            continue
        if isinstance(fn, Dequant):
            out[k] = ("rflow", fn.format, list(srcs))
            continue
        if fn is not one:
            continue
        src = srcs[0]
        if getattr(files, "is_quantized", None) is not None and files.is_quantized(src):
            out[k] = ("gguf", files.qtype(src), [src])
        elif files.dtypes[src] in FLOAT8 and files.kind(src) == "float8_e4m3fn":
            out[k] = ("fp8", None, [src])
    return out


def keep_quantized_plan(path, *, device="cpu", dtype: torch.dtype | None = None, family: str | None = None) -> LoadPlan | None:
    """A LoadPlan that keeps the quantized linear weights of the checkpoint at ``path`` packed; None when
    it has none (load it as usual)."""
    from .linear import Fp8Linear, GGUFLinear, Int8Linear

    with Checkpoint(path, family) as ck:
        quantized = quantized_weights(ck)
        compute = dtype or ck.stored_dtype()
    if not quantized:
        return None

    files = []  # opened on the first layer built from rflow's own layout (its qweight and scale are read there)

    def placement(key: str):
        if key not in quantized:
            return None
        return (None, "skip") if quantized[key][0] == "rflow" else (None, "stored")

    def build(name: str, linear: nn.Linear, tensors: dict[str, torch.Tensor]):
        kind = quantized.get(f"{name}.weight")
        if kind is None:
            return None
        what, fmt, srcs = kind
        bias = tensors.get("bias")
        if what == "gguf":
            return GGUFLinear(tensors["weight"], fmt, linear.in_features, bias, compute)
        if what == "fp8":
            return Fp8Linear.from_fp8(tensors["weight"], None, bias, compute)
        if not files:
            files.append(open_weights(path))
        q, *scale = [files[0].get_stored(s).to(device) for s in srcs]
        if fmt == "int8":
            return Int8Linear(q, scale[0], bias, compute)
        if fmt == "fp8":
            return Fp8Linear(q, scale[0], bias, compute)
        return GGUFLinear(q, fmt, linear.in_features, bias, compute)

    return LoadPlan(device=device, dtype=dtype, tensor_placement=placement, build_layer=build)
