"""GGUF's legacy 32-value block formats Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, in torch.

Every encoder takes ``x`` (n_blocks, 32) float32 and returns (n_blocks, type_size) uint8 in GGUF's
byte order; every decoder is the inverse, (n_blocks, type_size) uint8 -> (n_blocks, 32) float32. Use
them through :mod:`rflow.quant.gguf_codecs`, which checks shapes.

The arithmetic is float32, step by step as ``gguf.quants`` (llama.cpp's Python package) does it, so the
bytes and the decoded values are bit-identical to it. Block layouts (``d``/``m`` are float16 scales;
nibble ``j`` of ``qs`` holds value ``j`` in its low half and value ``j + 16`` in its high half; ``qh`` is
a little-endian 32-bit mask holding bit 4 of value ``j`` at bit ``j``):

* Q8_0 (34 bytes): ``d``, 32 int8 ``q``; value = ``q·d``, ``d = absmax/127``.
* Q4_0 (18 bytes): ``d``, 16 ``qs``; value = ``(q − 8)·d``, ``d = −max/8`` (``max``: the value of largest
  magnitude, sign kept).
* Q4_1 (20 bytes): ``d``, ``m``, 16 ``qs``; value = ``q·d + m``, ``d = (max − min)/15``, ``m = min``.
* Q5_0 (22 bytes): ``d``, ``qh``, 16 ``qs``; value = ``(q − 16)·d``, ``d = −max/16``.
* Q5_1 (24 bytes): ``d``, ``m``, ``qh``, 16 ``qs``; value = ``q·d + m``, ``d = (max − min)/31``.
"""

from __future__ import annotations

import torch
from torch import Tensor

HALF = 16  # a legacy block holds 32 values; byte j packs values j and j + 16


def half_bytes(v: Tensor) -> Tensor:
    """(n, 1) float32 -> (n, 2) uint8: the float16 (round to nearest even) in little-endian bytes."""
    return v.to(torch.float16).view(torch.uint8)


def read_half(b: Tensor, at: int) -> Tensor:
    """The float16 at byte ``at`` of every block of ``b`` (n, type_size) uint8, as (n, 1) float32."""
    return b[:, at : at + 2].contiguous().view(torch.float16).to(torch.float32)


def over(t: Tensor, c: float) -> Tensor:
    """``t / c`` in float32 with one rounding on every device (CUDA divides by a Python scalar as a
    multiplication by its reciprocal)."""
    return t / torch.full_like(t, c)


def nibbles(qs: Tensor) -> Tensor:
    """(n, 16) packed bytes -> (n, 32) uint8 values: low nibbles first, then high nibbles."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _inverse(d: Tensor) -> Tensor:
    """1/d, and 0 where d is 0 (``id = d ? 1/d : 0``)."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / safe)


def _signed_absmax(x: Tensor) -> Tensor:
    """The first value of largest magnitude in each block, sign kept: (n, 1)."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))


def _pack_nibbles(q: Tensor) -> Tensor:
    return (q[:, :HALF] & 15) | ((q[:, HALF:] & 15) << 4)


def _pack_high_bits(q: Tensor) -> Tensor:
    """Bit 4 of each of the 32 values -> 4 bytes, value j at bit j of the little-endian word."""
    bits = (q >> 4).reshape(q.shape[0], 4, 8)
    out = bits[..., 0]
    for k in range(1, 8):
        out = out | (bits[..., k] << k)
    return out


def _high_bits(qh: Tensor) -> Tensor:
    """(n, 4) bytes -> (n, 32) uint8 holding 16 where bit j of the word is set, else 0."""
    return torch.stack([(qh >> k) & 1 for k in range(8)], dim=-1).reshape(qh.shape[0], 32) << 4


def _levels(v: Tensor, top: int) -> Tensor:
    """trunc(v) clamped to [0, top] as uint8 (the C ``(int8_t)(v)`` then MIN, for v >= 0)."""
    return torch.trunc(v).clamp_(0, top).to(torch.uint8)


def encode_q8_0(x: Tensor) -> Tensor:
    d = over(x.abs().amax(dim=-1, keepdim=True), 127)
    v = x * _inverse(d)
    a = v.abs()
    whole = a.floor()
    q = (whole + (2 * (a - whole)).floor()) * v.sign()  # round half away from zero, as C roundf
    return torch.cat([half_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=-1)


def decode_q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].view(torch.int8).to(torch.float32) * read_half(b, 0)


def encode_q4_0(x: Tensor) -> Tensor:
    d = over(_signed_absmax(x), -8)
    q = _levels(x * _inverse(d) + 8.5, 15)
    return torch.cat([half_bytes(d), _pack_nibbles(q)], dim=-1)


def decode_q4_0(b: Tensor) -> Tensor:
    q = nibbles(b[:, 2:]).to(torch.int8) - 8
    return read_half(b, 0) * q.to(torch.float32)


def encode_q4_1(x: Tensor) -> Tensor:
    hi = x.amax(dim=-1, keepdim=True)
    lo = x.amin(dim=-1, keepdim=True)
    d = over(hi - lo, 15)
    q = _levels((x - lo) * _inverse(d) + 0.5, 15)
    return torch.cat([half_bytes(d), half_bytes(lo), _pack_nibbles(q)], dim=-1)


def decode_q4_1(b: Tensor) -> Tensor:
    q = nibbles(b[:, 4:]).to(torch.float32)
    return read_half(b, 0) * q + read_half(b, 2)


def encode_q5_0(x: Tensor) -> Tensor:
    d = over(_signed_absmax(x), -16)
    q = _levels(x * _inverse(d) + 16.5, 31)
    return torch.cat([half_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], dim=-1)


def decode_q5_0(b: Tensor) -> Tensor:
    q = (nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])).to(torch.int8) - 16
    return read_half(b, 0) * q.to(torch.float32)


def encode_q5_1(x: Tensor) -> Tensor:
    hi = x.amax(dim=-1, keepdim=True)
    lo = x.amin(dim=-1, keepdim=True)
    d = over(hi - lo, 31)
    q = _levels((x - lo) * _inverse(d) + 0.5, 31)
    return torch.cat([half_bytes(d), half_bytes(lo), _pack_high_bits(q), _pack_nibbles(q)], dim=-1)


def decode_q5_1(b: Tensor) -> Tensor:
    q = (nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])).to(torch.float32)
    return read_half(b, 0) * q + read_half(b, 2)


ENCODERS = {"Q8_0": encode_q8_0, "Q5_1": encode_q5_1, "Q5_0": encode_q5_0, "Q4_1": encode_q4_1, "Q4_0": encode_q4_0}
DECODERS = {"Q8_0": decode_q8_0, "Q5_1": decode_q5_1, "Q5_0": decode_q5_0, "Q4_1": decode_q4_1, "Q4_0": decode_q4_0}
