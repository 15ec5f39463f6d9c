"""Quantized linear layers: the weight stays packed in buffers, the bias stays in the model's dtype.

:class:`QuantLinear` is the base; one subclass per format family:

* :class:`Int8Linear` — ``qweight`` int8 (out, in) and ``scale`` float32 (out,) (:mod:`.formats`);
* :class:`Fp8Linear` — ``qweight`` float8_e4m3fn (out, in) and ``scale`` float32, per row (out,) when
  rflow quantized it, or one 0-d scale for a whole tensor as fp8 checkpoints ship it;
* :class:`GGUFLinear` — ``qweight`` uint8 (out, in / block_size · type_size) GGUF blocks and the
  ``qtype`` string (Q8_0, Q4_K, …; :mod:`.gguf_codecs`).

The packed tensors are buffers (not parameters), so ``state_dict`` holds them as they are and
``model.to(dtype)`` leaves them alone (only the bias follows the model's dtype); ``model.to(device)``
moves them.

How a layer computes is its ``compute`` attribute:

* ``"dequant"`` (every format, every device): the weight is dequantized to the input's dtype and
  multiplied with ``F.linear`` — the same numbers as a dense layer holding the dequantized weight.
* ``"int8"`` (:class:`Int8Linear`): W8A8 with dynamic per-token activation scales (absmax/127 per row
  of the input). On CUDA the int8 product runs in ``torch._int_mm`` (rows padded to at least 17 and
  the inner and output widths to multiples of 8, as it requires; the padding is zeros, so exact); on
  CPU a reference int32 matmul gives the same integers. The result is ``acc · x_scale · w_scale + bias``
  in float32, cast to the input's dtype.
* ``"fp8"`` (:class:`Fp8Linear`): rowwise ``torch._scaled_mm`` with per-token activation scales
  (absmax/448 per row), bf16 output; needs a CUDA GPU of compute capability ≥ 8.9 (Ada, Hopper or
  newer) and raises a UserError anywhere else. Inner and output widths are zero-padded to multiples of 16.

:func:`set_compute` sets the mode of every layer of a model; ``"auto"`` chooses per layer, from the
device its weight is on when called: ``Fp8Linear`` → "fp8" on CUDA capability ≥ 8.9; ``Int8Linear`` →
"int8" on CUDA capability ≥ 8.0; everything else (GGUF, CPU, older GPUs) → "dequant". A named mode is
applied to the layers whose format has it; the others compute "dequant".

Forward passes branch only on Python-side facts (mode, device type, static shapes), never on tensor
values, so ``torch.compile`` traces them without graph breaks of rflow's making.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from . import formats

COMPUTE_MODES = ("dequant", "int8", "fp8")
INT8_MIN_CAPABILITY = (8, 0)
FP8_MIN_CAPABILITY = (8, 9)


_codecs = None


def gguf_codecs():
    """The GGUF block codecs (imported on first use, then held: forward passes read a global)."""
    global _codecs
    if _codecs is None:
        try:
            from . import gguf_codecs as codecs
        except ImportError as e:  # pragma: no cover - only while the codecs are missing from a build
            raise UserError(f"GGUF formats are not available in this build ({e})") from None
        _codecs = codecs
    return _codecs


def gguf_qtypes() -> dict:
    """GGUF quant types by name ({} when the codecs are not available)."""
    try:
        return dict(gguf_codecs().QTYPES)
    except UserError:  # pragma: no cover
        return {}


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


# ---------------------------------------------------------------------------------------------- kernels


def _pad_to(t: Tensor, dim: int, multiple: int) -> Tensor:
    """Zero-pad ``t`` along ``dim`` (0 or 1 of a matrix) to a multiple of ``multiple`` (float8 through
    its bytes: byte 0 is +0.0)."""
    n = (-t.shape[dim]) % multiple
    if not n:
        return t
    pad = (0, n) if dim == 1 else (0, 0, 0, n)
    if t.dtype == formats.FP8_DTYPE:
        return F.pad(t.view(torch.uint8), pad).view(t.dtype)
    return F.pad(t, pad)


def int_matmul(a: Tensor, w: Tensor) -> Tensor:
    """``a`` int8 (M, K) times ``w``ᵀ for ``w`` int8 (N, K) -> int32 (M, N), exactly.

    CUDA: ``torch._int_mm`` (M > 16 and K, N multiples of 8, met by zero padding); elsewhere an int32
    matmul (the reference: products of two int8 summed in int32 cannot overflow below K = 133 000)."""
    if a.device.type != "cuda":
        return a.to(torch.int32) @ w.to(torch.int32).t()
    M, N = a.shape[0], w.shape[0]
    a, w = _pad_to(a, 1, 8), _pad_to(_pad_to(w, 1, 8), 0, 8)
    if M <= 16:
        a = F.pad(a, (0, 0, 0, 17 - M))
    out = torch._int_mm(a, w.t())
    return out[:M, :N]


def quantize_rows_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token (row) symmetric int8 of a (M, K) activation: (q int8, scale float32 (M, 1))."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True) / formats.INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(xf / scale).clamp_(-formats.INT8_MAX, formats.INT8_MAX).to(torch.int8), scale


def quantize_rows_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token (row) float8_e4m3fn of a (M, K) activation: (q, scale float32 (M, 1))."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True) / formats.FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (xf / scale).clamp_(-formats.FP8_MAX, formats.FP8_MAX).to(formats.FP8_DTYPE), scale


def int8_linear(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """W8A8: ``x`` (..., K) against int8 rows ``qweight`` (N, K) with per-row ``scale`` (N,)."""
    lead, K = x.shape[:-1], x.shape[-1]
    xq, xs = quantize_rows_int8(x.reshape(-1, K))
    y = int_matmul(xq, qweight).float() * xs * scale.float()[None]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, qweight.shape[0])


def fp8_linear(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Rowwise fp8 ``torch._scaled_mm``: ``x`` (..., K) quantized per token against ``qweight`` (N, K)
    with ``scale`` per row (N,) or per tensor (0-d)."""
    if x.device.type != "cuda":
        raise UserError(f"fp8 compute needs a CUDA GPU of compute capability ≥ 8.9, not {x.device.type}; "
                        "use compute='dequant'")
    lead, K = x.shape[:-1], x.shape[-1]
    N = qweight.shape[0]
    xq, xs = quantize_rows_fp8(x.reshape(-1, K))
    xq = _pad_to(xq, 1, 16)
    w = _pad_to(_pad_to(qweight, 1, 16), 0, 16)
    ws = scale.float().reshape(-1).expand(N)
    ws = F.pad(ws, (0, w.shape[0] - N), value=1.0)[None].contiguous()
    y = torch._scaled_mm(xq, w.t(), scale_a=xs.contiguous(), scale_b=ws, out_dtype=torch.bfloat16)[:, :N].float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, N)


# ---------------------------------------------------------------------------------------------- modules


def canonical_format(fmt: str) -> str:
    """"int8", "fp8" or a GGUF type in upper case, from any spelling's case; unknown names pass unchanged."""
    s = str(fmt).strip()
    if s.lower() in ("int8", "fp8"):
        return s.lower()
    return s.upper() if s.upper() in gguf_qtypes() else s


def module_class(fmt: str) -> type["QuantLinear"]:
    """The QuantLinear subclass for a format name ("int8", "fp8", or a GGUF type such as "Q8_0")."""
    fmt = canonical_format(fmt)
    if fmt == "int8":
        return Int8Linear
    if fmt == "fp8":
        return Fp8Linear
    if fmt in gguf_qtypes():
        return GGUFLinear
    raise UserError(f"unknown quantization format {fmt!r}; choose int8, fp8 or a GGUF type "
                    f"({', '.join(gguf_qtypes()) or 'unavailable'})")


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored packed. ``in_features``, ``out_features``, ``bias`` (a
    parameter in the model's dtype, or None), ``format`` (str), ``compute`` (see the module docstring)."""

    format: str = ""
    COMPUTES: tuple[str, ...] = ("dequant",)

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias
        # the dense weight's dtype: what dequantize_weight() returns by default
        self.weight_dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        self._compute = "dequant"

    # -- construction

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str) -> "QuantLinear":
        """Quantize ``linear``'s weight to ``format`` (on the weight's device); the bias is shared."""
        sub, fmt = module_class(format), canonical_format(format)
        if not issubclass(sub, cls):
            raise UserError(f"{cls.__name__} cannot hold format {format!r}")
        return sub._from_weight(linear.weight.detach(), linear.bias, fmt)

    @classmethod
    def _from_weight(cls, weight: Tensor, bias: Tensor | None, fmt: str) -> "QuantLinear":
        raise NotImplementedError

    @classmethod
    def empty(cls, format: str, in_features: int, out_features: int, *, bias: bool = True,
              dtype: torch.dtype = torch.bfloat16, device=None) -> "QuantLinear":
        """A zero layer of that format and shape, to ``load_state_dict`` a saved quantized layer into."""
        sub = module_class(format)
        w = torch.zeros(out_features, in_features, dtype=dtype, device=device)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        return sub._from_weight(w, b, canonical_format(format))

    # -- what every format gives

    @property
    def compute(self) -> str:
        return self._compute

    @compute.setter
    def compute(self, mode: str) -> None:
        if mode not in self.COMPUTES:
            raise UserError(f"{type(self).__name__} ({self.format}) cannot compute {mode!r}; "
                            f"choose {' or '.join(self.COMPUTES)}")
        self._compute = mode

    def packed(self) -> dict[str, Tensor]:
        """The tensors that hold the weight (buffers)."""
        return {k: b for k, b in self._buffers.items() if b is not None}

    def weight_nbytes(self) -> int:
        """Bytes of the packed weight (codes and scales; the bias is not counted)."""
        return sum(b.numel() * b.element_size() for b in self.packed().values())

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out, in) weight this layer computes with, in ``dtype`` (the dense weight's by default)."""
        raise NotImplementedError

    def _quantized_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self._compute == "dequant":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantize_weight(x.dtype), bias)
        return self._quantized_forward(x)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``/``.half()`` must not cast the packed codes or scales: they keep their dtypes
        and follow only the device."""
        before = self.packed()
        super()._apply(fn, recurse)
        for k, old in before.items():
            new = self._buffers[k]
            if new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        if self.bias is not None:
            self.weight_dtype = self.bias.dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}, compute={self._compute}")


class Int8Linear(QuantLinear):
    """int8 weight, one float32 scale per output row (:func:`rflow.quant.formats.quantize_int8`)."""

    format = "int8"
    COMPUTES = ("dequant", "int8")

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None = None, dtype: torch.dtype | None = None):
        if qweight.dtype != torch.int8 or qweight.ndim != 2 or scale.shape != (qweight.shape[0],):
            raise ValueError(f"int8 weight {tuple(qweight.shape)} {qweight.dtype} with scale {tuple(scale.shape)}")
        super().__init__(qweight.shape[1], qweight.shape[0], bias, dtype)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float())

    @classmethod
    def _from_weight(cls, weight, bias, fmt):
        q, s = formats.quantize_int8(weight)
        return cls(q, s, bias, weight.dtype)

    def dequantize_weight(self, dtype=None):
        return formats.dequantize_int8(self.qweight, self.scale, dtype or self.weight_dtype)

    def _quantized_forward(self, x):
        return int8_linear(x, self.qweight, self.scale, self.bias)


class Fp8Linear(QuantLinear):
    """float8_e4m3fn weight with a float32 scale per output row (rflow's quantization) or one 0-d scale
    for the whole tensor (:meth:`from_fp8`, for fp8 checkpoints)."""

    format = "fp8"
    COMPUTES = ("dequant", "fp8")

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None = None, dtype: torch.dtype | None = None):
        scale = torch.as_tensor(scale, device=qweight.device).float()
        scale = scale.reshape(()) if scale.numel() == 1 and qweight.shape[0] != 1 else scale
        if qweight.dtype != formats.FP8_DTYPE or qweight.ndim != 2 or scale.shape not in ((), (qweight.shape[0],)):
            raise ValueError(f"fp8 weight {tuple(qweight.shape)} {qweight.dtype} with scale {tuple(scale.shape)}")
        super().__init__(qweight.shape[1], qweight.shape[0], bias, dtype)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def _from_weight(cls, weight, bias, fmt):
        q, s = formats.quantize_fp8(weight)
        return cls(q, s, bias, weight.dtype)

    @classmethod
    def from_fp8(cls, qweight: Tensor, scale: Tensor | float | None = None, bias: Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> "Fp8Linear":
        """A layer over a stored float8_e4m3fn weight and its scale (per tensor or per row; 1 if None)."""
        return cls(qweight, 1.0 if scale is None else scale, bias, dtype)

    @property
    def per_tensor(self) -> bool:
        return self.scale.ndim == 0

    def dequantize_weight(self, dtype=None):
        return formats.dequantize_fp8(self.qweight, self.scale, dtype or self.weight_dtype)

    def _quantized_forward(self, x):
        return fp8_linear(x, self.qweight, self.scale, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a per-tensor and a per-row scale are both valid: take the shape the state dict holds
        s = state_dict.get(prefix + "scale")
        if isinstance(s, Tensor) and s.shape != self.scale.shape and s.shape in ((), (self.out_features,)):
            self.scale = torch.empty(s.shape, dtype=torch.float32, device=self.scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GGUFLinear(QuantLinear):
    """GGUF blocks (``qtype`` such as Q8_0, Q4_K): ``qweight`` uint8 (out, in / block_size · type_size),
    dequantized with :func:`rflow.quant.gguf_codecs.dequantize` at every forward pass."""

    COMPUTES = ("dequant",)

    def __init__(self, qweight: Tensor, qtype: str, in_features: int, bias: Tensor | None = None,
                 dtype: torch.dtype | None = None):
        qt = gguf_codecs().QTYPES[qtype]
        rows = qweight.shape[0]
        if qweight.dtype != torch.uint8 or qweight.ndim != 2 or in_features % qt.block_size \
                or qweight.shape[1] != in_features // qt.block_size * qt.type_size:
            raise ValueError(f"{qtype} blocks {tuple(qweight.shape)} {qweight.dtype} for {rows}×{in_features}")
        super().__init__(in_features, rows, bias, dtype)
        self.qtype = qtype
        self.register_buffer("qweight", qweight)

    @property
    def format(self) -> str:  # type: ignore[override]
        return self.qtype

    @classmethod
    def _from_weight(cls, weight, bias, fmt):
        rows, cols = weight.shape
        bs = gguf_codecs().QTYPES[fmt].block_size
        if cols % bs:
            raise UserError(f"{fmt} needs an input width that is a multiple of {bs}, not {cols}")
        blocks = gguf_codecs().quantize(weight, fmt)
        return cls(blocks.to(weight.device), fmt, cols, bias, weight.dtype)

    def dequantize_weight(self, dtype=None):
        return gguf_codecs().dequantize(self.qweight, self.qtype, (self.out_features, self.in_features),
                                        dtype or self.weight_dtype)


# ---------------------------------------------------------------------------------------------- compute modes


def auto_compute(layer: QuantLinear, device: torch.device | None = None) -> str:
    """The mode ``set_compute(model, "auto")`` gives ``layer`` on ``device`` (default: where its weight is)."""
    cap = _capability(device if device is not None else layer.qweight.device)
    if isinstance(layer, Fp8Linear) and cap is not None and cap >= FP8_MIN_CAPABILITY:
        return "fp8"
    if isinstance(layer, Int8Linear) and cap is not None and cap >= INT8_MIN_CAPABILITY:
        return "int8"
    return "dequant"


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear of ``model`` by qualified name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_compute(model: nn.Module, mode: str, device: torch.device | None = None) -> nn.Module:
    """Set how every QuantLinear of ``model`` computes: "auto" | "dequant" | "int8" | "fp8" (see the module
    docstring). "int8"/"fp8" apply to the layers of that format, the others compute "dequant"; "fp8" on a
    device without fp8 matmuls is a UserError. ``device``: where the layers compute, when that is not where
    their weights are (blocks streamed from host memory, :mod:`rflow.runtime.offload`). Returns ``model``."""
    if mode not in ("auto", *COMPUTE_MODES):
        raise UserError(f"unknown compute mode {mode!r}; choose auto, {', '.join(COMPUTE_MODES)}")
    layers = quant_layers(model)
    if mode in ("int8", "fp8") and not any(mode in m.COMPUTES for m in layers.values()):
        raise UserError(f"compute {mode!r} needs {mode} layers; this model has "
                        f"{', '.join(sorted({m.format for m in layers.values()})) or 'no quantized layers'}")
    for name, layer in layers.items():
        if mode == "fp8" and isinstance(layer, Fp8Linear):
            dev = device if device is not None else layer.qweight.device
            cap = _capability(dev)
            if cap is None or cap < FP8_MIN_CAPABILITY:
                where = dev.type if cap is None else f"a GPU of compute capability {cap[0]}.{cap[1]}"
                raise UserError(f"fp8 compute needs a CUDA GPU of compute capability ≥ 8.9, and {name} is on {where}; "
                                "use compute='dequant' or 'auto'")
        layer.compute = auto_compute(layer, device) if mode == "auto" else (mode if mode in layer.COMPUTES else "dequant")
    return model
