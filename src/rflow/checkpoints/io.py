"""Lazy, validated access to safetensors files and diffusers folders.

Everything reads through ``safetensors.safe_open`` so only the tensors asked for are materialised,
and every failure a user can cause (missing path, pickle file, truncated or corrupt file) becomes a
one-line :class:`~rflow.errors.UserError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ..errors import UserError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
# float8 tensors are upcast to this dtype on read unless the caller asks for another.
_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)}


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a .safetensors file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"{path}: pickle checkpoints ({path.suffix}) can run arbitrary code and are not loaded; "
            "convert it to .safetensors first"
        )
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise UserError(f"{path}: not a safetensors file (too short)")
    header_len = int.from_bytes(head, "little")
    size = path.stat().st_size
    if header_len <= 0 or header_len > min(size - 8, 100_000_000):
        raise UserError(f"{path}: not a safetensors file (bad header)")


class WeightFiles:
    """What every weight reader shares (safetensors, GGUF): a lazy mapping ``key -> tensor`` whose
    ``shapes`` and ``dtypes`` come from headers; subclasses fill ``_shapes``/``_dtypes`` and define
    ``get``, ``get_stored``, ``nbytes``, ``kind`` and ``close``."""

    _shapes: dict[str, tuple[int, ...]]
    _dtypes: dict[str, torch.dtype]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def __len__(self) -> int:
        return len(self._shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return self._dtypes

    def items(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._shapes:
            yield k, self.get(k, dtype)


class SafetensorsFiles(WeightFiles):
    """A set of safetensors files seen as one lazy mapping ``key -> tensor``.

    ``shapes`` and ``dtypes`` come from the headers alone; ``get(key)`` reads one tensor.
    Use as a context manager (or call ``close``) to release the file handles.
    """

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self._handles = []
        self._where: dict[str, int] = {}
        self.metadata: dict[str, str] = {}
        for i, p in enumerate(self.paths):
            _check_file(p)
            try:
                h = safe_open(str(p), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise UserError(f"{p}: corrupt or truncated safetensors file ({_short(e)})") from None
            self._handles.append(h)
            self.metadata.update(h.metadata() or {})
            for k in h.keys():
                self._where[k] = i
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for k, i in self._where.items():
            sl = self._handles[i].get_slice(k)
            self._shapes[k] = tuple(sl.get_shape())
            self._dtypes[k] = _dtype_from_name(sl.get_dtype())

    def close(self) -> None:
        self._handles.clear()

    def nbytes(self, key: str) -> int:
        """Bytes a tensor takes in the file."""
        return int(torch.Size(self._shapes[key]).numel()) * self._dtypes[key].itemsize

    def kind(self, key: str) -> str:
        """How a tensor is stored: its dtype name ("bfloat16", "float8_e4m3fn", …)."""
        return str(self._dtypes[key]).removeprefix("torch.")

    def get_stored(self, key: str) -> torch.Tensor:
        """Read one tensor exactly as stored (float8 stays float8)."""
        i = self._where[key]
        try:
            return self._handles[i].get_tensor(key)
        except Exception as e:
            raise UserError(f"{self.paths[i]}: cannot read tensor {key!r}: corrupt or truncated file ({_short(e)})") from None

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor; float8 is upcast (to ``dtype`` or bfloat16), other tensors cast to ``dtype`` if given."""
        t = self.get_stored(key)
        if t.dtype in _FLOAT8:
            t = t.to(dtype or torch.bfloat16)
        elif dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _n, _a in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _a):
        _DTYPES[_n] = getattr(torch, _a)


def _dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.upper()]
    except KeyError:
        raise UserError(f"unsupported tensor dtype {name!r} in checkpoint") from None


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def majority(values) -> int | None:
    """The most common value that is not None (the first of equally common ones); None if there is none.

    Most sizes are written in several tensors; taking the majority means a single corrupt tensor is
    the one reported as wrong, not the many that disagree with it."""
    counts: dict[int, int] = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    return max(counts, key=counts.get) if counts else None


def tensor_kind(key: str) -> str:
    return "weight" if key.endswith(".weight") else "tensor"


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers component folder: via ``*.safetensors.index.json`` if sharded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such directory")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = read_json(indexes[0])
        try:
            names = sorted(set(index["weight_map"].values()))
        except (KeyError, AttributeError):
            raise UserError(f"{indexes[0]}: not a safetensors index (no weight_map)") from None
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise UserError(f"{indexes[0]}: shard missing: {missing[0]}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        if bins:
            raise UserError(f"{folder}: only pickle weights ({bins[0].name}); convert them to .safetensors first")
        raise UserError(f"{folder}: no .safetensors weights found")
    return files


def open_weights(path: str | os.PathLike) -> SafetensorsFiles:
    """Open a single ``.safetensors`` file, a folder of (possibly sharded) safetensors weights, or a GGUF
    file (:class:`~rflow.checkpoints.gguf_file.GGUFFile`, the same interface)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    if p.is_file():
        from .gguf_file import GGUFFile, is_gguf

        if is_gguf(p):
            return GGUFFile(p)
    return SafetensorsFiles(weight_files(p) if p.is_dir() else [p])


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save`` written atomically (rflow.outputs)."""
    from safetensors.torch import save

    from ..outputs import atomic_write_bytes

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
