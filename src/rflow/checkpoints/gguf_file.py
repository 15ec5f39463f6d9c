"""GGUF files read like safetensors: keys, shapes, dtypes, tensors — quantized tensors kept packed on request.

:class:`GGUFFile` gives the interface of :class:`~rflow.checkpoints.io.SafetensorsFiles`, so format
detection, key plans and config inference work on GGUF files unchanged (city96's FLUX files use BFL
key names). Shapes are logical (rows, cols) — GGUF stores dimensions innermost first, they are
reversed here. ``get(key)`` dequantizes (the ``gguf`` package's reference dequantizer) to a float
tensor; ``get_stored(key)`` returns a quantized tensor as its packed bytes, (rows, bytes per row)
uint8, for layers that compute from the packed form; ``qtype(key)`` names its GGML type. Reading uses
the ``gguf`` package (llama.cpp's own); a file it cannot parse is one :class:`UserError`.

The file is memory-mapped copy-on-write, as safetensors maps its files: ``get_stored`` returns views
of the map, not copies, so a model loaded packed holds the file's pages once (peak host memory near
the file size) and writing into a tensor never reaches the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .io import WeightFiles

MAGIC = b"GGUF"
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
QUANTIZED_COMPUTE_DTYPE = torch.bfloat16  # what a quantized tensor reports as its dtype (it dequantizes to it)


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text[:200] if text else type(e).__name__


class GGUFFile(WeightFiles):
    """One GGUF file as a lazy mapping ``key -> tensor`` (see the module docstring)."""

    def __init__(self, path: str | Path):
        import gguf

        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"{p}: no such file or directory")
        self.paths = [p]
        try:
            self._reader = gguf.GGUFReader(str(p), mode="c")  # copy-on-write: views are writable, the file never is
            tensors = list(self._reader.tensors)
        except Exception as e:  # gguf raises ValueError, struct.error, IndexError … on bad files
            raise UserError(f"{p}: corrupt or truncated GGUF file ({_short(e)})") from None
        self._tensors = {t.name: t for t in tensors}
        self._shapes = {t.name: tuple(int(d) for d in reversed(list(t.shape))) for t in tensors}
        self._qtypes = {t.name: t.tensor_type.name for t in tensors}
        self._dtypes = {k: FLOAT_TYPES.get(q, QUANTIZED_COMPUTE_DTYPE) for k, q in self._qtypes.items()}
        self.metadata = self._string_fields()
        for k, q in self._qtypes.items():
            if q not in FLOAT_TYPES and not hasattr(gguf.GGMLQuantizationType, q):
                raise UserError(f"{p}: tensor {k!r} has GGML type {q}, which this rflow cannot read")

    def _string_fields(self) -> dict[str, str]:
        """The file's key-value metadata that holds strings or numbers, as strings."""
        import gguf

        out = {}
        for name, field in self._reader.fields.items():
            if name.startswith("GGUF.") or not field.types:
                continue
            kind = field.types[0]
            try:
                if kind == gguf.GGUFValueType.STRING:
                    out[name] = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
                elif kind != gguf.GGUFValueType.ARRAY and len(field.data) == 1:
                    out[name] = str(field.parts[field.data[0]].tolist()[0])
            except (IndexError, ValueError):
                continue
        return out

    def qtype(self, key: str) -> str:
        """The GGML type of a tensor: "F32", "F16", "BF16", "Q8_0", "Q4_K", …"""
        return self._qtypes[key]

    def nbytes(self, key: str) -> int:
        """Bytes a tensor takes in the file (packed blocks for quantized types)."""
        return int(self._tensors[key].n_bytes)

    def kind(self, key: str) -> str:
        """How a tensor is stored: its GGML type ("Q8_0", "F16", …)."""
        return self._qtypes[key]

    def is_quantized(self, key: str) -> bool:
        return self._qtypes[key] not in FLOAT_TYPES

    def get_stored(self, key: str) -> torch.Tensor:
        """The tensor as stored: float types as such, quantized ones as (rows, bytes per row) uint8."""
        t = self._tensors[key]
        q = self._qtypes[key]
        data = t.data  # a view of the memory map: its pages are read when first touched, and only once
        if q == "BF16":
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).reshape(self._shapes[key])
        if q in FLOAT_TYPES:
            return torch.from_numpy(data).reshape(self._shapes[key])
        return torch.from_numpy(data.view(np.uint8).reshape(self._shapes[key][0] if len(self._shapes[key]) > 1 else 1, -1))

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as floats: quantized ones dequantized (to ``dtype``, else bfloat16)."""
        if not self.is_quantized(key):
            t = self.get_stored(key)
            return t.to(dtype) if dtype is not None else t
        import gguf
        import gguf.quants

        raw = self._tensors[key]
        try:
            values = gguf.quants.dequantize(np.asarray(raw.data), raw.tensor_type)
        except Exception as e:
            raise UserError(f"{self.paths[0]}: cannot dequantize tensor {key!r} ({_short(e)})") from None
        return torch.from_numpy(np.ascontiguousarray(values).reshape(self._shapes[key])).to(dtype or QUANTIZED_COMPUTE_DTYPE)

    def tensor_digests(self):
        """(dtype name, shape, sha256 of the stored bytes) per tensor, for content fingerprints."""
        import hashlib

        out = {}
        for k, t in self._tensors.items():
            out[k] = (self._qtypes[k], self._shapes[k], hashlib.sha256(memoryview(np.ascontiguousarray(t.data)).cast("B")).hexdigest())
        return out
