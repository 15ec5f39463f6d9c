"""int8 and fp8 weight formats: symmetric, one scale per output channel (row), round to nearest.

* **int8** — ``scale = absmax(row) / 127``; ``q = clamp(round_half_even(w / scale), -127, 127)``; the
  weight is ``q · scale``. 8.0 bits per weight plus one float32 scale per row.
* **fp8** (``float8_e4m3fn``) — ``scale = absmax(row) / 448`` (448 is e4m3fn's largest finite value);
  ``q = float8(clamp(w / scale, ±448))`` (round to nearest even, as torch casts); the weight is ``q · scale``.
  Checkpoints that ship fp8 weights often carry one scale for the whole tensor: :func:`dequantize_fp8`
  takes a 0-d scale as well as a (rows,) one.

An all-zero row gets scale 0 and dequantizes to exactly 0. Quantization runs in float32 whatever the
input dtype; dequantization returns the dtype asked for (float32 by default).

Round-trip error (:data:`ROUND_TRIP_RMS`): the relative RMS error ``‖deq(q(w)) − w‖ / ‖w‖`` measured on
a seeded 3072×3072 standard Gaussian (``torch.manual_seed(0)``, float32); the bound is the measured
value rounded up, asserted by ``tests/test_quant_linear.py``:

========  ==========  =======
format    measured    bound
========  ==========  =======
int8      0.00852     0.0090
fp8       0.02646     0.0280
========  ==========  =======
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError

INT8_MAX = 127
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0

ROUND_TRIP_RMS = {"int8": 0.0090, "fp8": 0.0280}  # bounds on the relative RMS error (see the module docstring)
BITS_PER_WEIGHT = {"int8": 8.0, "fp8": 8.0}  # before the per-row float32 scales


def _rows(w: Tensor) -> Tensor:
    if w.ndim != 2:
        raise ValueError(f"expected a (rows, cols) weight, got shape {tuple(w.shape)}")
    return w.detach().float()


def _row_scale(w: Tensor, qmax: float) -> tuple[Tensor, Tensor]:
    """(scale (rows,), divisor (rows, 1)): absmax/qmax per row, and the same with zero rows set to 1."""
    scale = w.abs().amax(dim=1) / qmax
    return scale, torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w`` (rows, cols) -> (q int8 (rows, cols), scale float32 (rows,))."""
    w = _rows(w)
    scale, div = _row_scale(w, INT8_MAX)
    q = torch.round(w / div).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(rows, cols) weight ``q · scale`` in ``dtype`` (computed in float32)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def _need_fp8() -> torch.dtype:
    if FP8_DTYPE is None:
        raise RuntimeError("this torch build has no float8_e4m3fn dtype (fp8 needs torch >= 2.1)")
    return FP8_DTYPE


def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w`` (rows, cols) -> (q float8_e4m3fn (rows, cols), scale float32 (rows,))."""
    dt = _need_fp8()
    w = _rows(w)
    scale, div = _row_scale(w, FP8_MAX)
    q = (w / div).clamp_(-FP8_MAX, FP8_MAX).to(dt)
    return q, scale


def dequantize_fp8(q: Tensor, scale: Tensor | float, dtype: torch.dtype = torch.float32) -> Tensor:
    """(rows, cols) weight ``q · scale`` in ``dtype``; ``scale`` is per row (rows,) or per tensor (0-d or a
    single-element tensor, as fp8 checkpoints store it)."""
    s = torch.as_tensor(scale, device=q.device).float()
    if s.numel() == 1:
        s = s.reshape(())
    elif s.shape == (q.shape[0],):
        s = s[:, None]
    else:
        raise ValueError(f"fp8 scale of shape {tuple(s.shape)} for a weight of shape {tuple(q.shape)}")
    return (q.float() * s).to(dtype)


def packed_nbytes(shape: tuple[int, int], fmt: str) -> int:
    """Bytes of a (rows, cols) weight in ``fmt`` ("int8" or "fp8"): one byte a weight plus a float32 scale a row."""
    if fmt not in BITS_PER_WEIGHT:
        raise ValueError(f"unknown format {fmt!r}")
    rows, cols = shape
    return rows * cols + 4 * rows


def dequantize_stored(fmt: str, tensors: list[Tensor], shape: tuple[int, int],
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """A weight from the tensors rflow's quantized layout stores for it: ``[qweight, scale]`` for int8
    and fp8, ``[qweight]`` (packed GGUF blocks) for a GGUF type."""
    from . import gguf_codecs

    f = fmt.lower()
    if f in ("int8", "fp8"):
        q, scale = tensors
        w = dequantize_int8(q, scale, dtype) if f == "int8" else dequantize_fp8(q, scale, dtype)
        if tuple(w.shape) != tuple(shape):
            raise UserError(f"a {fmt} weight of shape {tuple(w.shape)} where {tuple(shape)} was recorded")
        return w
    return gguf_codecs.dequantize(tensors[0], fmt, tuple(shape), dtype)
