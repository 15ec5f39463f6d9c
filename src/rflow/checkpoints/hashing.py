"""Hashes that identify checkpoints: the familiar "Model hash" and a layout-independent content fingerprint.

* :func:`model_hash` is the hash A1111, ComfyUI and Civitai show: the sha256 of the weights file,
  first 10 hex digits (for sharded checkpoints, the sha256 of the shards' sha256s).
* :func:`content_fingerprint` hashes the tensors themselves (dtype, shape, raw bytes) under their
  canonical names, so a renamed or re-prefixed copy of a model matches and a different model with the
  same shapes does not; metadata and tensors outside the plan never change it.

Both come from :func:`file_digests`, which reads each file once, sequentially, feeding every chunk to
the whole-file hasher and the overlapping byte ranges to one hasher per tensor. Results are cached by
(resolved path, size, mtime_ns), in memory and in ``cache_dir()/hashes.json``, so a second call reads
nothing from the weights file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import UserError

CHUNK = 8 << 20  # bytes read per step of the sequential pass
MAX_ENTRIES = 512  # entries kept in hashes.json; the oldest (by insertion) are dropped first
MAX_HEADER = 100_000_000  # same bound on the JSON header as rflow.checkpoints.io
CACHE_VERSION = 1
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

Progress = Callable[[int, int], None]
TensorDigest = tuple[str, tuple[int, ...], str]  # (dtype name, shape, sha256 of the raw bytes)


@dataclass(frozen=True)
class FileDigests:
    """The sha256 of a whole safetensors file and of each of its tensors (treat as read-only)."""

    sha256: str
    tensors: dict[str, TensorDigest]


@dataclass(frozen=True)
class _Span:
    key: str
    begin: int  # absolute file offsets
    end: int


_memory: dict[str, tuple[int, int, FileDigests]] = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    """``$RFLOW_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/rflow``, else ``~/.cache/rflow``."""
    if os.environ.get("RFLOW_CACHE_DIR"):
        return Path(os.environ["RFLOW_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "rflow"
    return Path.home() / ".cache" / "rflow"


def clear_memory_cache() -> None:
    """Forget the in-process cache (``hashes.json`` is kept)."""
    with _lock:
        _memory.clear()


# ---------------------------------------------------------------------------------------------------
# Digests of one file


def file_digests(path: str | os.PathLike, progress: Progress | None = None) -> FileDigests:
    """The sha256 of the file and of every tensor in it, from one sequential read (or from the cache).

    ``progress(done_bytes, total_bytes)`` is called after every chunk when the file is actually read.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected a .safetensors file")
    key = str(p.resolve())
    st = p.stat()
    hit = _lookup(key, st.st_size, st.st_mtime_ns)
    if hit is not None:
        return hit
    from .gguf_file import MAGIC

    with open(p, "rb") as f:
        before = os.fstat(f.fileno())
        gguf = f.read(len(MAGIC)) == MAGIC
        f.seek(0)
        digests = (_gguf_digests if gguf else _read_digests)(f, p, before.st_size, progress)
        after = os.fstat(f.fileno())
    if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
        _store(key, before.st_size, before.st_mtime_ns, digests)
    return digests


def _gguf_digests(f: BinaryIO, path: Path, size: int, progress: Progress | None) -> FileDigests:
    """A GGUF file: the whole-file sha256 from one sequential read, each tensor's from the gguf reader."""
    from .gguf_file import GGUFFile

    whole = hashlib.sha256()
    done = 0
    while done < size:
        chunk = f.read(min(CHUNK, size - done))
        if not chunk:
            raise UserError(f"{path}: file shrank while being read")
        whole.update(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, size)
    return FileDigests(whole.hexdigest(), GGUFFile(path).tensor_digests())


def _read_digests(f: BinaryIO, path: Path, size: int, progress: Progress | None) -> FileDigests:
    whole = hashlib.sha256()
    head = _read_exact(f, 8, path)
    header_len = int.from_bytes(head, "little")
    if header_len <= 0 or header_len > min(size - 8, MAX_HEADER):
        raise UserError(f"{path}: not a safetensors file (bad header)")
    header_bytes = _read_exact(f, header_len, path)
    whole.update(head)
    whole.update(header_bytes)
    data_start = 8 + header_len
    meta, spans = _parse_header(header_bytes, path, data_start, size)
    done = data_start
    if progress is not None:
        progress(done, size)
    hashers = {s.key: hashlib.sha256() for s in spans}
    # The whole-file hash runs on a helper thread (hashlib releases the GIL), in chunk order.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque[Future] = deque()
        active: list[_Span] = []
        nxt = 0
        while done < size:
            chunk = f.read(min(CHUNK, size - done))
            if not chunk:
                raise UserError(f"{path}: file shrank while being read")
            pending.append(pool.submit(whole.update, chunk))
            lo, hi = done, done + len(chunk)
            while nxt < len(spans) and spans[nxt].begin < hi:
                active.append(spans[nxt])
                nxt += 1
            view = memoryview(chunk)
            for s in active:
                a, b = max(s.begin, lo), min(s.end, hi)
                if a < b:
                    hashers[s.key].update(view[a - lo : b - lo])
            active = [s for s in active if s.end > hi]
            done = hi
            while len(pending) > 2:
                pending.popleft().result()
            if progress is not None:
                progress(done, size)
        for fut in pending:
            fut.result()
    tensors = {k: (dt, shape, hashers[k].hexdigest() if k in hashers else EMPTY_SHA256) for k, (dt, shape) in meta.items()}
    return FileDigests(sha256=whole.hexdigest(), tensors=tensors)


def _read_exact(f: BinaryIO, n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise UserError(f"{path}: not a safetensors file (too short)")
    return data


def _parse_header(raw: bytes, path: Path, data_start: int, size: int) -> tuple[dict[str, tuple[str, tuple[int, ...]]], list[_Span]]:
    """``key -> (dtype, shape)`` for every tensor, and the non-empty byte spans sorted by offset."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (bad header)")
    meta: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[_Span] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, begin, end = _tensor_entry(info, path, key)
        if data_start + end > size:
            raise UserError(f"{path}: truncated safetensors file (tensor {key!r} ends past the end of the file)")
        meta[key] = (dtype, shape)
        if end > begin:
            spans.append(_Span(key, data_start + begin, data_start + end))
    spans.sort(key=lambda s: (s.begin, s.end))
    return meta, spans


def _tensor_entry(info: object, path: Path, key: str) -> tuple[str, tuple[int, ...], int, int]:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
        ok = (
            isinstance(dtype, str)
            and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and type(begin) is int
            and type(end) is int
            and 0 <= begin <= end
        )
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{path}: not a safetensors file (bad header entry for {key!r})")
    return dtype, tuple(shape), begin, end


# ---------------------------------------------------------------------------------------------------
# Cache: an in-process dict in front of cache_dir()/hashes.json


def _cache_file() -> Path:
    return cache_dir() / "hashes.json"


def _lookup(key: str, size: int, mtime_ns: int) -> FileDigests | None:
    with _lock:
        hit = _memory.get(key)
    if hit is not None and hit[:2] == (size, mtime_ns):
        return hit[2]
    entry = _load_cache().get(key)
    digests = _entry_digests(entry, size, mtime_ns) if entry is not None else None
    if digests is not None:
        with _lock:
            _memory[key] = (size, mtime_ns, digests)
    return digests


def _store(key: str, size: int, mtime_ns: int, digests: FileDigests) -> None:
    with _lock:
        _memory[key] = (size, mtime_ns, digests)
    entries = _load_cache()  # re-read just before writing, to keep what other processes added
    entries.pop(key, None)
    entries[key] = {
        "size": size,
        "mtime_ns": mtime_ns,
        "sha256": digests.sha256,
        "tensors": {k: [dt, list(shape), sha] for k, (dt, shape, sha) in digests.tensors.items()},
    }
    while len(entries) > MAX_ENTRIES:
        del entries[next(iter(entries))]
    _write_cache(entries)


def _load_cache() -> dict[str, dict]:
    """The entries of ``hashes.json``; a missing, unreadable or corrupt file counts as empty."""
    try:
        with open(_cache_file(), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _entry_digests(entry: object, size: int, mtime_ns: int) -> FileDigests | None:
    """The digests an entry holds if it is well formed and matches ``size`` and ``mtime_ns``."""
    try:
        if entry["size"] != size or entry["mtime_ns"] != mtime_ns:  # type: ignore[index]
            return None
        sha = entry["sha256"]  # type: ignore[index]
        tensors = {
            str(k): (str(dt), tuple(int(d) for d in shape), str(tsha))
            for k, (dt, shape, tsha) in entry["tensors"].items()  # type: ignore[index]
        }
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    return FileDigests(sha256=sha, tensors=tensors) if isinstance(sha, str) else None


def _write_cache(entries: dict[str, dict]) -> None:
    """Write ``hashes.json`` atomically (unique temp file + ``os.replace``); any failure is ignored."""
    target = _cache_file()
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".hashes.", suffix=f".{os.getpid()}.tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "entries": entries}, f, separators=(",", ":"))
        os.replace(tmp, target)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------------
# Hashes of a model


def model_hash(paths: list[Path]) -> str:
    """The "Model hash" of A1111/ComfyUI/Civitai: sha256 of the file, first 10 hex digits.

    For several files (a sharded checkpoint) it is the sha256 of their sha256s joined by newlines,
    in the given order, first 10 hex digits.
    """
    if not paths:
        raise UserError("model hash: no weight files given")
    shas = [file_digests(p).sha256 for p in paths]
    if len(shas) == 1:
        return shas[0][:10]
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()[:10]


def content_fingerprint(files: list[Path], plan: dict[str, list[str]]) -> str:
    """A 16-hex-digit hash of the tensors that build each canonical key, independent of file layout.

    ``plan`` maps each canonical key to the source keys (in ``files``) it is built from. The result is
    the sha256 of the lines ``f"{dst}\\t{i}\\t{dtype}\\t{shape}\\t{tensor_sha}\\n"``, for every ``dst`` in
    sorted order and its ``i``-th source key; tensors not named in the plan and metadata are ignored.
    """
    where: dict[str, TensorDigest] = {}
    for p in files:
        where.update(file_digests(p).tensors)  # a key in several files: the last wins, as in io.SafetensorsFiles
    h = hashlib.sha256()
    for dst in sorted(plan):
        for i, src in enumerate(plan[dst]):
            if src not in where:
                raise UserError(f"{_describe(files)}: tensor {src!r} (needed for {dst!r}) not found")
            dtype, shape, sha = where[src]
            h.update(f"{dst}\t{i}\t{dtype}\t{shape}\t{sha}\n".encode())
    return h.hexdigest()[:16]


def _describe(files: list[Path]) -> str:
    if not files:
        return "no weight files"
    return str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"
