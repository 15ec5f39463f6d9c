"""GGUF (llama.cpp) weight formats as pure functions: a (rows, cols) weight to GGUF's packed blocks and back.

``quantize(w, "Q4_K")`` returns uint8 (rows, cols // block_size · type_size): each row's blocks in
order, exactly the bytes a GGUF file stores for that tensor. ``dequantize(blocks, "Q4_K", (rows, cols))``
is the inverse, in torch on any device (the QuantLinear modules dequantize on the GPU at every forward).

* Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 (32-value blocks, :mod:`rflow.quant.gguf_legacy`): quantize and
  dequantize are bit-identical to ``gguf.quants`` (llama.cpp's Python package, 0.19).
* Q6_K, Q5_K, Q4_K, Q3_K, Q2_K (256-value super-blocks, :mod:`rflow.quant.gguf_k`): dequantize is
  bit-identical to ``gguf.quants``; ``gguf.quants`` cannot quantize them, so quantize follows ggml's C
  reference quantizers (``quantize_row_qN_K_ref``, no importance matrix), giving the bytes they give
  when compiled without FMA contraction.
* F32, F16, BF16: the raw little-endian values (F16 and BF16 round to nearest even, as ``gguf.quants``).

Quantization is computed in float32 whatever the input dtype; dequantization returns the dtype asked for
(computed in float32). A weight holding NaN or infinity is refused.

Round-trip error: the relative RMS error ``‖W − deq(q(W))‖ / ‖W‖`` on a seeded 3072×3072 weight,
standard Gaussian and Student-t with 3 degrees of freedom (heavy-tailed), measured 2026-12-02 on this
CPU with torch 2.13 by ``python -m rflow.quant.gguf_codecs``. :data:`ERROR_BOUND` (asserted on a
1024×1024 Gaussian by tests/test_gguf_codecs.py) is the Gaussian value plus about 5%. On both weights
the errors are ordered Q8_0 < Q6_K < Q5_K ≈ Q5_1 < Q5_0 < Q4_K < Q4_1 < Q4_0 < Q3_K < Q2_K: at equal
bits the K-quants, with their finer sub-block scales, beat the legacy types (5.5-bit Q5_K even
matches 6-bit Q5_1):

======  ========  =========  ==========  =======
type    bits/w    Gaussian   Student-t   bound
======  ========  =========  ==========  =======
F32     32        0          0           0
F16     16        0.000208   0.000207    0.00022
BF16    16        0.001662   0.001661    0.00175
Q8_0    8.5       0.005353   0.008514    0.0057
Q6_K    6.5625    0.017727   0.025595    0.0186
Q5_1    6         0.037841   0.048709    0.0398
Q5_0    5.5       0.042694   0.065788    0.0449
Q5_K    5.5       0.036104   0.046913    0.0380
Q4_1    5         0.078215   0.100685    0.0822
Q4_0    4.5       0.085934   0.127300    0.0903
Q4_K    4.5       0.071350   0.092134    0.0750
Q3_K    3.4375    0.150813   0.188628    0.1585
Q2_K    2.625     0.296372   0.350475    0.3120
======  ========  =========  ==========  =======
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch
from torch import Tensor

from ..errors import UserError
from . import gguf_k, gguf_legacy


@dataclass(frozen=True)
class QType:
    """One GGUF tensor type: ``block_size`` values are stored in ``type_size`` bytes."""

    name: str
    block_size: int
    type_size: int
    bits_per_weight: float
    ggml_type: gguf.GGMLQuantizationType


def _qtype(name: str) -> QType:
    ggml_type = gguf.GGMLQuantizationType[name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    return QType(name, block_size, type_size, type_size * 8 / block_size, ggml_type)


# Most to fewest bits per weight.
QTYPES: dict[str, QType] = {
    n: _qtype(n)
    for n in ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_1", "Q5_0", "Q5_K", "Q4_1", "Q4_0", "Q4_K", "Q3_K", "Q2_K")
}

# Bounds on the round-trip relative RMS error of a standard Gaussian weight (see the module docstring).
ERROR_BOUND: dict[str, float] = {
    "F32": 0.0,
    "F16": 0.00022,
    "BF16": 0.00175,
    "Q8_0": 0.0057,
    "Q6_K": 0.0186,
    "Q5_1": 0.0398,
    "Q5_0": 0.0449,
    "Q5_K": 0.0380,
    "Q4_1": 0.0822,
    "Q4_0": 0.0903,
    "Q4_K": 0.0750,
    "Q3_K": 0.1585,
    "Q2_K": 0.3120,
}


def _passthrough(dtype: torch.dtype):
    def encode(x: Tensor) -> Tensor:
        return x.to(dtype).view(torch.uint8)

    def decode(b: Tensor) -> Tensor:
        return b.contiguous().view(dtype).to(torch.float32, copy=True)  # never an alias of the blocks

    return encode, decode


_PASS = {"F32": _passthrough(torch.float32), "F16": _passthrough(torch.float16), "BF16": _passthrough(torch.bfloat16)}
_ENCODERS = {**{k: v[0] for k, v in _PASS.items()}, **gguf_legacy.ENCODERS, **gguf_k.ENCODERS}
_DECODERS = {**{k: v[1] for k, v in _PASS.items()}, **gguf_legacy.DECODERS, **gguf_k.DECODERS}

_CHUNK = 1 << 20  # values quantized at a time (bounds the scale searches' temporaries)


def qtype_of(qtype: str | QType | gguf.GGMLQuantizationType) -> QType:
    """The :class:`QType` named ``qtype`` (case-insensitive; a QType or a ``gguf.GGMLQuantizationType``
    member also does); UserError if rflow has no codec for it."""
    if isinstance(qtype, (QType, gguf.GGMLQuantizationType)):
        qtype = qtype.name
    qt = QTYPES.get(str(qtype).upper())
    if qt is None:
        raise UserError(f"unknown GGUF weight type {qtype!r}; expected one of {', '.join(QTYPES)}")
    return qt


def _shape(shape, qt: QType, name: str) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise UserError(f"{name}: GGUF {qt.name} weights are (rows, cols), got shape {shape}")
    if shape[1] % qt.block_size:
        raise UserError(
            f"{name}: {shape[1]} columns is not a multiple of the {qt.name} block size {qt.block_size} (shape {shape})"
        )
    return shape


def packed_nbytes(shape, qtype: str) -> int:
    """Bytes of a (rows, cols) weight stored as ``qtype``."""
    qt = qtype_of(qtype)
    rows, cols = _shape(shape, qt, "weight")
    return rows * (cols // qt.block_size) * qt.type_size


def quantize(weight: Tensor, qtype: str, *, name: str = "weight") -> Tensor:
    """``weight`` (rows, cols), any float dtype -> uint8 (rows, cols // block_size · type_size) of packed
    ``qtype`` blocks, on the weight's device. ``name`` names the tensor in error messages."""
    qt = qtype_of(qtype)
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, Tensor) else type(weight).__name__
        raise UserError(f"{name}: GGUF {qt.name} quantization takes a float tensor, got {got}")
    rows, cols = _shape(weight.shape, qt, name)
    x = weight.detach().to(torch.float32).contiguous().reshape(rows * cols // qt.block_size, qt.block_size)
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"{name} holds NaN or infinite values; GGUF {qt.name} cannot store them")
    encode = _ENCODERS[qt.name]
    step = max(1, _CHUNK // qt.block_size)
    out = torch.empty(x.shape[0], qt.type_size, dtype=torch.uint8, device=x.device)
    for i in range(0, x.shape[0], step):
        out[i : i + step] = encode(x[i : i + step])
    return out.reshape(rows, cols // qt.block_size * qt.type_size)


def dequantize(
    blocks: Tensor, qtype: str, shape: tuple[int, int], dtype: torch.dtype = torch.float32, *, name: str = "weight"
) -> Tensor:
    """Packed ``qtype`` blocks (uint8, any shape holding :func:`packed_nbytes` bytes) -> the (rows, cols)
    weight in ``dtype``, on the blocks' device."""
    qt = qtype_of(qtype)
    rows, cols = _shape(shape, qt, name)
    nbytes = rows * (cols // qt.block_size) * qt.type_size
    if not isinstance(blocks, Tensor) or blocks.dtype != torch.uint8 or blocks.numel() != nbytes:
        got = type(blocks).__name__
        if isinstance(blocks, Tensor):
            got = f"{blocks.dtype} tensor of shape {tuple(blocks.shape)}"
        raise UserError(f"{name}: a {qt.name} weight of shape {(rows, cols)} is {nbytes} uint8 bytes, got {got}")
    if nbytes == 0:
        return torch.zeros(rows, cols, dtype=dtype, device=blocks.device)
    values = _DECODERS[qt.name](blocks.reshape(-1, qt.type_size))
    return values.reshape(rows, cols).to(dtype)


def round_trip_error(weight: Tensor, qtype: str) -> float:
    """‖W − deq(q(W))‖ / ‖W‖ in float64."""
    w = weight.to(torch.float32)
    back = dequantize(quantize(w, qtype), qtype, tuple(w.shape))
    return float((w.double() - back.double()).norm() / w.double().norm())


def measurement_weights(rows: int, cols: int, seed: int = 0) -> dict[str, Tensor]:
    """The measurement weights: standard Gaussian and Student-t (3 degrees of freedom), seeded."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(3, rows, cols, generator=g).square().sum(0)
    return {"gaussian": gauss, "student_t": torch.randn(rows, cols, generator=g) / (chi2 / 3).sqrt()}


def _main() -> None:
    weights = measurement_weights(3072, 3072)
    print("type    bits/w  gaussian   student_t")
    for qt in QTYPES.values():
        errs = [round_trip_error(w, qt.name) for w in weights.values()]
        print(f"{qt.name:6}  {qt.bits_per_weight:6.4g}  {errs[0]:.6f}  {errs[1]:.6f}", flush=True)


if __name__ == "__main__":
    _main()
