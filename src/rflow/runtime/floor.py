"""The op floor of a transformer step: what its matmuls and attentions cost when each runs alone at
the best speed this device offers.

:func:`capture` runs the step once and records every linear layer's product (M rows, K in, N out,
bias, and the kernel its compute mode uses: dense ``F.linear`` at the activation dtype, ``torch._int_mm``
for W8A8 int8 layers, rowwise ``torch._scaled_mm`` for fp8 layers; dequantizing layers count as dense)
and every ``scaled_dot_product_attention`` call (shapes, mask, dtype). :func:`measure` times each
distinct shape alone on random operands — attention under every SDPA backend (cuDNN, flash, memory
efficient, math), keeping the fastest — and sums them with their counts. The floor leaves out
everything else a step does (norms, RoPE, modulation, activations, copies), so a step's time over its
floor says how much of it is not matmul or attention.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .timing import time_op

BACKENDS = ("cudnn", "flash", "efficient", "math")


@dataclass(frozen=True)
class Matmul:
    M: int
    K: int
    N: int
    bias: bool
    kernel: str  # "dense" | "int8" | "fp8"
    dtype: torch.dtype


@dataclass(frozen=True)
class Attention:
    q: tuple[int, ...]
    k: tuple[int, ...]
    v: tuple[int, ...]
    mask: tuple[int, ...] | None
    dtype: torch.dtype


@dataclass
class StepOps:
    matmuls: Counter = field(default_factory=Counter)
    attention: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # Matmul -> the first layer name with that shape


class _SDPA(TorchFunctionMode):
    def __init__(self, ops: StepOps):
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.ops.attention[Attention(tuple(q.shape), tuple(k.shape), tuple(v.shape),
                                         None if mask is None else tuple(mask.shape), q.dtype)] += 1
        return func(*args, **kwargs)


def _kernel(module: nn.Module) -> str:
    from ..quant.linear import QuantLinear

    if isinstance(module, QuantLinear) and module.compute in ("int8", "fp8"):
        return module.compute
    return "dense"


def capture(fn: Callable[[], object], model: nn.Module):
    """Run ``fn()`` (one step of ``model``) once, recording its matmuls and attentions; returns
    (the step's output, :class:`StepOps`)."""
    from ..quant.linear import QuantLinear

    ops = StepOps()

    def hook(name):
        def pre(module, inputs):
            x = inputs[0]
            K = module.in_features
            op = Matmul(x.numel() // K, K, module.out_features, module.bias is not None, _kernel(module), x.dtype)
            ops.matmuls[op] += 1
            ops.examples.setdefault(op, name)
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, QuantLinear))]
    try:
        with torch.inference_mode(), _SDPA(ops):
            out = fn()
    finally:
        for h in handles:
            h.remove()
    return out, ops


# ---------------------------------------------------------------------------------------------- timing


def _matmul_fn(op: Matmul, device: torch.device, g: torch.Generator):
    """A call of the bare kernel for ``op`` on random operands."""
    from ..quant import linear as ql

    x = torch.randn(op.M, op.K, device=device, generator=g).to(op.dtype)
    w = torch.randn(op.N, op.K, device=device, generator=g).to(op.dtype) * op.K**-0.5
    b = torch.randn(op.N, device=device, generator=g).to(op.dtype) if op.bias else None
    if op.kernel == "int8":
        xq, wq = ql.quantize_rows_int8(x)[0], ql.quantize_rows_int8(w)[0]
        return lambda: ql.int_matmul(xq, wq)
    if op.kernel == "fp8":
        xq, xs = ql.quantize_rows_fp8(x)
        wq, ws = ql.quantize_rows_fp8(w)
        xq, wq = ql._pad_to(xq, 1, 16), ql._pad_to(ql._pad_to(wq, 1, 16), 0, 16)
        ws = F.pad(ws.reshape(-1), (0, wq.shape[0] - op.N), value=1.0)[None].contiguous()
        return lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs.contiguous(), scale_b=ws, out_dtype=torch.bfloat16)
    return lambda: F.linear(x, w, b)


def _attention_fn(op: Attention, device: torch.device, g: torch.Generator):
    q, k, v = (torch.randn(s, device=device, generator=g).to(op.dtype) for s in (op.q, op.k, op.v))
    mask = None if op.mask is None else torch.ones(op.mask, dtype=torch.bool, device=device)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def time_attention(op: Attention, device: torch.device, g: torch.Generator, *, reps: int, samples: int,
                   warmup: int) -> dict[str, float | str]:
    """ms of ``op`` under each SDPA backend, or why the backend cannot run it."""
    from torch.nn.attention import sdpa_kernel

    fn = _attention_fn(op, device, g)
    out: dict[str, float | str] = {}
    for name in BACKENDS:
        try:
            with warnings.catch_warnings(), sdpa_kernel(_backend(name)):
                warnings.simplefilter("ignore")
                out[name] = time_op(fn, device, reps=reps, samples=samples, warmup=warmup)
        except (RuntimeError, NotImplementedError, ValueError) as e:  # no kernel of that backend for this case
            out[name] = "unavailable: " + " ".join(str(e).split())[:120]
    return out


def tflops(flops: float, ms: float) -> float | None:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else None


def measure(ops: StepOps, device: torch.device, *, reps: int = 10, samples: int = 5, warmup: int = 3,
            seed: int = 0) -> dict:
    """Time every distinct matmul and attention of ``ops`` alone; the floor is their sum over counts.

    Returns ``{"ms", "matmul_ms", "attention_ms", "matmuls": [...], "attention": [...]}``: per matmul
    M, K, N, bias, kernel, dtype, count, ms (one call), TFLOP/s and a layer it stands for; per attention
    the shapes, count, each backend's ms (or why it is unavailable), the best backend and its ms."""
    g = torch.Generator(device=device).manual_seed(seed)
    rows, mm_total = [], 0.0
    for op, n in sorted(ops.matmuls.items(), key=lambda kv: -kv[0].M * kv[0].K * kv[0].N * kv[1]):
        ms = time_op(_matmul_fn(op, device, g), device, reps=reps, samples=samples, warmup=warmup)
        mm_total += n * ms
        rows.append({"M": op.M, "K": op.K, "N": op.N, "bias": op.bias, "kernel": op.kernel,
                     "dtype": str(op.dtype).removeprefix("torch."), "count": n, "ms": ms,
                     "tflops": tflops(2 * op.M * op.K * op.N, ms), "layer": ops.examples.get(op)})
    att_rows, att_total = [], 0.0
    for op, n in ops.attention.items():
        times = time_attention(op, device, g, reps=reps, samples=samples, warmup=warmup)
        ok = {k: v for k, v in times.items() if isinstance(v, float)}
        best = min(ok, key=ok.get)
        att_total += n * ok[best]
        B, H, L, D = op.q
        S = op.k[-2]
        att_rows.append({"q": list(op.q), "k": list(op.k), "v": list(op.v), "mask": None if op.mask is None else list(op.mask),
                         "dtype": str(op.dtype).removeprefix("torch."), "count": n, "backends": times, "best": best,
                         "ms": ok[best], "tflops": tflops(4 * B * H * L * S * D, ok[best])})
    return {"ms": mm_total + att_total, "matmul_ms": mm_total, "attention_ms": att_total, "matmuls": rows,
            "attention": att_rows}
