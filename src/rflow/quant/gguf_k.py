"""GGUF's K-quant formats Q6_K, Q5_K, Q4_K, Q3_K, Q2_K (256-value super-blocks), in torch.

Every encoder takes ``x`` (n_blocks, 256) float32 and returns (n_blocks, type_size) uint8 in GGUF's
byte order; every decoder is the inverse. Use them through :mod:`rflow.quant.gguf_codecs`.

Decoding follows ``gguf.quants`` operation for operation (bit-identical to it). Encoding follows
ggml's reference quantizers (``quantize_row_qN_K_ref`` with ``make_qx_quants``, ``make_q3_quants`` and
``make_qkx2_quants`` in ggml-quants.c, no importance matrix), vectorised over blocks: each sub-block's
scale search is run on all sub-blocks at once, and every sum is accumulated element by element in the
C loop's order, so the bytes equal the C reference's when it is compiled without FMA contraction.
Rounding is ``nearest_int`` (half to even), as in C.

Super-block layouts (``d``/``dmin`` float16; sub-block scales as listed):

* Q6_K (210 bytes): ``ql`` 128, ``qh`` 64, 16 int8 scales, ``d``; 16 sub-blocks of 16,
  value = ``d·scale·(q − 32)``, q 6 bits.
* Q5_K (176): ``d``, ``dmin``, 12 bytes of 8 six-bit scales and mins, ``qh`` 32, ``qs`` 128;
  8 sub-blocks of 32, value = ``d·sc·q − dmin·m``, q 5 bits.
* Q4_K (144): ``d``, ``dmin``, 12 scale bytes, ``qs`` 128; as Q5_K with 4-bit q.
* Q3_K (110): ``hmask`` 32, ``qs`` 64, 12 bytes of 16 six-bit scales, ``d``; 16 sub-blocks of 16,
  value = ``d·(sc − 32)·(q − 4)``, q 3 bits (the high bit in ``hmask``).
* Q2_K (84): 16 scale bytes (low nibble scale, high nibble min), ``qs`` 64, ``d``, ``dmin``;
  value = ``d·sc·q − dmin·m``, q 2 bits.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from .gguf_legacy import over, read_half

QK = 256
EPS = 1e-15  # ggml's GROUP_MAX_EPS: a sub-block whose largest magnitude is below it is all zero


def _f32(v: float) -> float:
    """``v`` rounded to float32 (to evaluate C float constant expressions exactly)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _div(c: float, t: Tensor) -> Tensor:
    """``c / t`` in float32, one rounding (``c / t`` on a tensor would round twice: ``t.reciprocal() * c``)."""
    return torch.full_like(t, c) / t


def _seq(t: Tensor) -> Tensor:
    """Sum over dim 0 one term at a time, in order, as a C ``for`` loop accumulates."""
    acc = t[0]
    for i in range(1, t.shape[0]):
        acc = acc + t[i]
    return acc


def _nearest(v: Tensor) -> Tensor:
    """``nearest_int`` (round half to even); non-finite values give 0, as its float trick does."""
    return torch.round(torch.where(torch.isfinite(v), v, torch.zeros_like(v)))


def _signed_absmax(x: Tensor, dim: int) -> Tensor:
    """The first value of largest magnitude along ``dim``, sign kept (the dim is removed)."""
    return x.gather(dim, x.abs().argmax(dim=dim, keepdim=True)).squeeze(dim)


def _positive_max(v: Tensor) -> Tensor:
    """max(0, max of each row) as (nb, 1), +0 when nothing is positive (the C loop from ``max = 0``)."""
    top = v.amax(dim=1, keepdim=True)
    return torch.where(top > 0, top, torch.zeros_like(top))


def _columns(x: Tensor, n: int) -> Tensor:
    """(n_blocks, 256) -> (n, n_sub): sub-blocks of ``n`` values as columns, so ``x[i]`` is value i of each."""
    return x.reshape(-1, n).T.contiguous()


# --------------------------------------------------------------------------- scale searches


def _make_qx_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` on columns ``x`` (n, M): weights x², the
    symmetric scale tried at nmax + 0.1·k (k = -9..9), the best weighted least-squares fit kept.
    Returns (scale (M,), L (n, M) in [0, 2·nmax))."""
    top = _signed_absmax(x, 0)
    zero = top.abs() < EPS
    top = torch.where(zero, torch.ones_like(top), top)
    w = x * x
    wx = w * x

    def trial(c: float) -> tuple[Tensor, Tensor, Tensor]:
        q = _nearest(_div(c, top) * x).clamp_(-nmax, nmax - 1)
        return q, _seq(wx * q), _seq(w * q * q)

    q, sumlx, suml2 = trial(_f32(-nmax))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(suml2))
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        q2, slx, sl2 = trial(-_f32(nmax + _f32(_f32(0.1) * k)))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        new_scale = slx / sl2
        q = torch.where(better, q2, q)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * slx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, q + nmax)


def _make_q3_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on columns ``x`` (n, M): the symmetric scale
    -max/nmax, then up to 5 passes moving one level at a time while the x²-weighted fit improves.
    Returns (scale (M,), L (n, M) in [0, 2·nmax))."""
    top = _signed_absmax(x, 0)
    zero = top.abs() < EPS
    top = torch.where(zero, torch.ones_like(top), top)
    q = _nearest(_div(_f32(-nmax), top) * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _seq(wx * q)
    suml2 = _seq(w * q * q)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            li = q[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            positive = slx > 0
            new = _nearest(x[i] * sl2 / torch.where(positive, slx, torch.ones_like(slx))).clamp_(-nmax, nmax - 1)
            slx = slx + wx[i] * new
            sl2 = sl2 + w[i] * new * new
            take = positive & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            q[i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        if not bool(changed.any()):  # a pass with no change leaves every later pass unchanged too
            break
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, q + nmax)


def _make_qkx2_quants(
    x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``make_qkx2_quants`` on columns ``x`` (n, M) with weights ``w``: an affine fit value ≈ scale·L −
    the_min (L in [0, nmax], the_min >= 0), trying scales (nmax + rmin + rdelta·k)/(max − min) for k =
    0..nstep and refitting scale and min by weighted least squares, keeping the lowest weighted squared
    (or absolute, ``use_mad``) error. Returns (scale (M,), the_min (M,), L (n, M))."""
    lo0 = x.amin(dim=0).clamp(max=0)
    hi = x.amax(dim=0)
    flat = hi == lo0
    sum_w = _seq(w)
    sum_x = _seq(w * x)

    def error(scale: Tensor, lo: Tensor, q: Tensor) -> Tensor:
        diff = scale * q + lo - x
        return _seq(w * (diff.abs() if use_mad else diff * diff))

    span = torch.where(flat, torch.ones_like(hi), hi - lo0)
    iscale = _div(_f32(nmax), span)
    scale = _div(1.0, iscale)
    lo = lo0
    q = _nearest(iscale * (x - lo)).clamp_(0, nmax)
    best = error(scale, lo, q)
    for k in range(nstep + 1):
        c = _f32(_f32(_f32(rmin) + _f32(_f32(rdelta) * k)) + nmax)
        q2 = _nearest(_div(c, hi - lo) * (x - lo)).clamp_(0, nmax)
        wq = w * q2
        sum_l, sum_l2, sum_xl = _seq(wq), _seq(wq * q2), _seq(wq * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, 0.0, this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, q2)
        better = (det > 0) & (cur < best)
        q = torch.where(better, q2, q)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    return torch.where(flat, 0.0, scale), torch.where(flat, -lo0, -lo), torch.where(flat, 0.0, q)


# --------------------------------------------------------------------------- bit packing


def _pack_crumbs(q: Tensor) -> Tensor:
    """(nb, 256) values in [0, 3] -> (nb, 64): byte 32h + l holds value 128h + 32k + l at bits 2k."""
    q = q.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _crumbs(qs: Tensor) -> Tensor:
    """Inverse of :func:`_pack_crumbs`, as (nb, 16, 16) sub-blocks."""
    q = qs.reshape(-1, 2, 1, 32)
    return torch.cat([(q >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(-1, 16, 16)


def _pack_scales_k4(sc: Tensor, mn: Tensor) -> Tensor:
    """Eight 6-bit scales and mins (nb, 8) -> the 12 bytes ``get_scale_min_k4`` reads."""
    a = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return torch.cat([a, b, c], dim=-1)


def _scales_k4(s: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`_pack_scales_k4` (as ``gguf.quants.Q4_K.get_scale_min``)."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 2) & 48)], dim=-1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 2) & 48)], dim=-1)
    return sc, mn


def _u8(t: Tensor) -> Tensor:
    return t.to(torch.uint8)


# --------------------------------------------------------------------------- Q6_K


def encode_q6_k(x: Tensor) -> Tensor:
    nb = x.shape[0]
    scales, q = _make_qx_quants(_columns(x, 16), 32)
    scales = scales.reshape(nb, 16)
    q = q.T.reshape(nb, 16, 16)
    top = _signed_absmax(scales, 1)[:, None]
    zero = top.abs() < EPS
    iscale = _div(-128.0, torch.where(zero, torch.ones_like(top), top))
    d16 = _div(1.0, iscale).to(torch.float16)
    sc = _nearest(iscale * scales).clamp_(max=127)
    d = (d16.to(torch.float32) * sc)[..., None]
    requant = _nearest(x.reshape(nb, 16, 16) / torch.where(d != 0, d, torch.ones_like(d))).clamp_(-32, 31) + 32
    q = torch.where(d != 0, requant, q).to(torch.int32).reshape(nb, 2, 4, 32)
    ql = (q[:, :, 0:2] & 15) | ((q[:, :, 2:4] & 15) << 4)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    out = torch.cat(
        [_u8(ql.reshape(nb, 128)), _u8(qh.reshape(nb, 64)), sc.to(torch.int8).view(torch.uint8), d16.view(torch.uint8)],
        dim=-1,
    )
    return torch.where(zero, torch.zeros_like(out), out)


def decode_q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = (read_half(b, 208) * b[:, 192:208].view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    ql = b[:, :128].reshape(n, 2, 1, 64)
    ql = torch.cat([ql & 15, ql >> 4], dim=2).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    qh = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return (d * q).reshape(n, QK)


# --------------------------------------------------------------------------- Q5_K and Q4_K


def _encode_k4(x: Tensor, nmax: int, rmin: float, nstep: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The shared part of Q4_K and Q5_K: (d16 (nb,1), dmin16 (nb,1), packed scales (nb, 12), L (nb, 256))."""
    nb = x.shape[0]
    cols = _columns(x, 32)
    av = torch.sqrt(over(_seq(cols * cols), 32).double()).float()  # sqrtf (torch's float sqrt is not exact)
    scales, mins, q = _make_qkx2_quants(cols, av + cols.abs(), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    q = q.T.reshape(nb, 8, 32)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)

    def six_bits(v: Tensor, top: Tensor) -> Tensor:
        inv = torch.where(top > 0, _div(63.0, torch.where(top > 0, top, torch.ones_like(top))), 0.0)
        return (_nearest(inv * v).to(torch.int32) & 255).clamp_(max=63)  # uint8_t, then MIN(63, .)

    ls, lm = six_bits(scales, max_scale), six_bits(mins, max_min)
    d16, m16 = over(max_scale, 63).to(torch.float16), over(max_min, 63).to(torch.float16)
    d = (d16.to(torch.float32) * ls)[..., None]
    dm = (m16.to(torch.float32) * lm)[..., None]
    requant = _nearest((x.reshape(nb, 8, 32) + dm) / torch.where(d != 0, d, torch.ones_like(d))).clamp_(0, nmax)
    q = torch.where(d != 0, requant, q).to(torch.int32).reshape(nb, 4, 2, 32)
    return d16, m16, _u8(_pack_scales_k4(ls, lm)), q


def encode_q5_k(x: Tensor) -> Tensor:
    d16, m16, scales, q = _encode_k4(x, 31, -0.5, 15)
    high = q >> 4
    qh = torch.zeros_like(high[:, 0, 0])
    for k in range(4):
        qh = qh | (high[:, k, 0] << (2 * k)) | (high[:, k, 1] << (2 * k + 1))
    lo = q & 15
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([d16.view(torch.uint8), m16.view(torch.uint8), scales, _u8(qh), _u8(qs)], dim=-1)


def encode_q4_k(x: Tensor) -> Tensor:
    d16, m16, scales, q = _encode_k4(x, 15, -1.0, 20)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([d16.view(torch.uint8), m16.view(torch.uint8), scales, _u8(qs)], dim=-1)


def _decode_k4(b: Tensor, q: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _scales_k4(b[:, 4:16])
    d = (read_half(b, 0) * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (read_half(b, 2) * mn.to(torch.float32)).reshape(n, 8, 1)
    return (d * q.to(torch.float32) - dm).reshape(n, QK)


def _low_high(qs: Tensor) -> Tensor:
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat([q & 15, q >> 4], dim=2).reshape(-1, 8, 32)


def decode_q4_k(b: Tensor) -> Tensor:
    return _decode_k4(b, _low_high(b[:, 16:144]))


def decode_q5_k(b: Tensor) -> Tensor:
    qh = b[:, 16:48].reshape(-1, 1, 32)
    qh = torch.cat([(qh >> s) & 1 for s in range(8)], dim=1)
    return _decode_k4(b, _low_high(b[:, 48:176]) | (qh << 4))


# --------------------------------------------------------------------------- Q3_K


def encode_q3_k(x: Tensor) -> Tensor:
    nb = x.shape[0]
    scales, q = _make_q3_quants(_columns(x, 16), 4)
    scales = scales.reshape(nb, 16)
    q = q.T.reshape(nb, 16, 16)
    top = _signed_absmax(scales, 1)[:, None]
    some = top != 0
    iscale = _div(-32.0, torch.where(some, top, torch.ones_like(top)))
    ls = torch.where(some, _nearest(iscale * scales).clamp_(-32, 31) + 32, 0.0).to(torch.int32)
    d16 = torch.where(some, _div(1.0, iscale), 0.0).to(torch.float16)
    d = (d16.to(torch.float32) * (ls - 32))[..., None]
    requant = _nearest(x.reshape(nb, 16, 16) / torch.where(d != 0, d, torch.ones_like(d))).clamp_(-4, 3) + 4
    q = torch.where(d != 0, requant, q).to(torch.int32).reshape(nb, 8, 32)
    high = q >> 2
    hmask = high[:, 0]
    for k in range(1, 8):
        hmask = hmask | (high[:, k] << k)
    packed = torch.cat(
        [(ls[:, :8] & 15) | ((ls[:, 8:] & 15) << 4), _four_pairs(ls.reshape(nb, 4, 4) >> 4)], dim=-1
    )
    qs = _pack_crumbs((q & 3).reshape(nb, QK))
    return torch.cat([_u8(hmask), _u8(qs), _u8(packed), d16.view(torch.uint8)], dim=-1)


def _four_pairs(h: Tensor) -> Tensor:
    """(nb, 4 groups, 4) two-bit values -> (nb, 4) bytes, group g at bits 2g."""
    return h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)


def decode_q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    s = b[:, 96:108]
    low = torch.cat([s[:, :8] & 15, s[:, :8] >> 4], dim=-1)
    high = torch.cat([(s[:, 8:12] >> k) & 3 for k in (0, 2, 4, 6)], dim=-1)
    sc = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (read_half(b, 108) * sc).reshape(n, 16, 1)
    hm = b[:, :32].reshape(n, 1, 32)
    hm = torch.cat([(hm >> k) & 1 for k in range(8)], dim=1).reshape(n, 16, 16) ^ 1
    q = (_crumbs(b[:, 32:96]).to(torch.int8) - (hm << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK)


# --------------------------------------------------------------------------- Q2_K


def encode_q2_k(x: Tensor) -> Tensor:
    nb = x.shape[0]
    cols = _columns(x, 16)
    scales, mins, q = _make_qkx2_quants(cols, cols.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    q = q.T.reshape(nb, 16, 16)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)

    def four_bits(v: Tensor, top: Tensor) -> Tensor:
        inv = _div(15.0, torch.where(top > 0, top, torch.ones_like(top)))
        return torch.where(top > 0, _nearest(inv * v), 0.0).to(torch.int32)

    byte = (four_bits(scales, max_scale) & 255) | ((four_bits(mins, max_min) << 4) & 255)
    d16 = torch.where(max_scale > 0, over(max_scale, 15), 0.0).to(torch.float16)
    m16 = torch.where(max_min > 0, over(max_min, 15), 0.0).to(torch.float16)
    d = (d16.to(torch.float32) * (byte & 15))[..., None]
    dm = (m16.to(torch.float32) * (byte >> 4))[..., None]
    requant = _nearest((x.reshape(nb, 16, 16) + dm) / torch.where(d != 0, d, torch.ones_like(d))).clamp_(0, 3)
    q = torch.where(d != 0, requant, q).to(torch.int32).reshape(nb, QK)
    return torch.cat([_u8(byte), _u8(_pack_crumbs(q)), d16.view(torch.uint8), m16.view(torch.uint8)], dim=-1)


def decode_q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    s = b[:, :16]
    dl = (read_half(b, 80) * (s & 15).to(torch.float32)).reshape(n, 16, 1)
    ml = (read_half(b, 82) * (s >> 4).to(torch.float32)).reshape(n, 16, 1)
    return (dl * _crumbs(b[:, 16:80]).to(torch.float32) - ml).reshape(n, QK)


ENCODERS = {"Q6_K": encode_q6_k, "Q5_K": encode_q5_k, "Q4_K": encode_q4_k, "Q3_K": encode_q3_k, "Q2_K": encode_q2_k}
DECODERS = {"Q6_K": decode_q6_k, "Q5_K": decode_q5_k, "Q4_K": decode_q4_k, "Q3_K": decode_q3_k, "Q2_K": decode_q2_k}
