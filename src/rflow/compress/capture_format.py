"""The capture folder (``rflow capture``): its layout, and writing shards and index within a budget
(reading: :mod:`rflow.compress.capture_reader`).

What a record holds is described in :mod:`rflow.compress.capture`, which records the model calls.
Every record names a **call structure** (``index.json`` ``calls[record.call]``): how to rebuild the
transformer's arguments and each captured block's arguments and outputs from the record's tensors. A
structure is a tree of nodes — ``null`` (None), ``{"t": name, "b": 0|1}`` (a tensor; ``b``: its batch
axis of size 1 was removed when stored), ``{"tuple": [...]}``, ``{"list": [...]}``, ``{"v": value}``
(a plain number or string) — so the reader needs no knowledge of any family:
:meth:`CaptureReader.block_io` gives a block's arguments in call order and
:meth:`CaptureReader.model_inputs` the transformer's. Records are stacked into batches where their
structures allow (:func:`group_batches`, :func:`collate`): batched tensors of equal shapes are stacked,
tensors without a batch axis must be the same stored tensor.

Version-1 captures (FLUX.1, rflow before the per-family capture) have no structures: the reader
rebuilds FLUX.1's (``img, txt, vec, pe`` / ``x, vec, pe``) and recomputes RoPE ``pe`` from the stored
ids with the model's ``pe_embedder`` (pass it as ``embedder``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..checkpoints.io import save_safetensors
from ..outputs import atomic_write_bytes

SCHEMA = "rflow.capture"
VERSION = 2  # 2: any family, call structures in the index (1: FLUX.1 only; still read, and still written for FLUX.1)
INDEX = "index.json"
_SHARD_RE = re.compile(r"^shard-\d{5}\.safetensors$")


@dataclass(frozen=True)
class Record:
    key: str
    shard: str
    prompt: str
    run: int
    sample: int
    step: int
    branch: str
    t: float | None  # the model's own time input (FLUX: sigma; Z-Image: 1 − sigma)
    latent_h: int
    latent_w: int
    img_len: int  # FLUX-shaped models: image / text tokens (0 for other families)
    txt_len: int
    index: int  # position in the capture
    call: int = 0  # index of its call structure
    refs: tuple[tuple[str, str], ...] = ()  # (name, tensor key of an earlier record) for tensors stored once


# ---------------------------------------------------------------------------------------------- writing


class _BudgetReached(Exception):
    pass


def _tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _header_estimate(name: str, t: Tensor) -> int:
    """Upper bound of a tensor's entry in a safetensors JSON header."""
    return 64 + len(name) + 22 * max(1, t.ndim) + 2 * 22


def is_capture_dir(path: Path) -> bool:
    p = Path(path) / INDEX
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


class _Writer:
    """Records -> shards + index, within a byte budget; tensors stored once by content (``known``) and
    call structures listed once in the index (``calls``)."""

    def __init__(self, out: Path, header: dict, budget: int, shard_bytes: int):
        self.out, self.header, self.budget, self.shard_bytes = out, header, budget, shard_bytes
        self.header.setdefault("calls", [])
        self.shards: list[dict] = []
        self.records: list[dict] = []  # records in written shards
        self.pending: dict[str, Tensor] = {}
        self.pending_records: list[dict] = []
        self.pending_bytes = 0  # estimated file size of the pending shard
        self.committed = 0  # bytes of shards on disk
        self.stopped: str | None = None
        self.known: dict[str, str] = {}  # content digest -> tensor key, of accepted records
        self._calls = {json.dumps(c, sort_keys=True): i for i, c in enumerate(self.header["calls"])}
        self._index_base = len(self._index_json(complete=False)) + 256
        self._index_records = 0  # estimated index bytes for records, shards and call structures

    def _index_json(self, complete: bool) -> bytes:
        idx = dict(self.header, complete=complete, stopped=self.stopped, total_bytes=self.committed,
                   shards=self.shards, records=self.records)
        return json.dumps(idx, indent=1).encode()

    def write_index(self, complete: bool = False) -> None:
        atomic_write_bytes(self.out / INDEX, self._index_json(complete))

    def call_index(self, call: dict) -> tuple[int, str | None]:
        """(index of ``call`` among the structures, its JSON if it is new and not yet listed)."""
        text = json.dumps(call, sort_keys=True)
        i = self._calls.get(text)
        return (i, None) if i is not None else (len(self.header["calls"]), text)

    def add(self, rec: dict, tensors: dict[str, Tensor], digests: dict[str, str] | None = None,
            new_call: str | None = None) -> None:
        """Queue one record; raises :class:`_BudgetReached` (after flushing) if it would not fit.
        ``digests``: content digest -> key of the record's tensors others may refer to; ``new_call``:
        the JSON of a call structure the record is the first to use."""
        size = sum(_tensor_bytes(t) + _header_estimate(f"{rec['key']}.{n}", t) for n, t in tensors.items())
        rec_index = 2 * len(json.dumps(rec)) + 64 + (2 * len(new_call) if new_call else 0)
        new_shard = not self.pending or self.pending_bytes + size > self.shard_bytes
        shard_overhead = 8 + 512 + 160 if new_shard else 0  # length prefix, metadata, index entry
        total = (self.committed + self.pending_bytes + size + shard_overhead + self._index_base
                 + self._index_records + rec_index)
        if total > self.budget:
            self.stopped = "budget"
            self.flush()
            raise _BudgetReached
        if self.pending and new_shard:
            self.flush()
        if not self.pending:
            self.pending_bytes = 8 + 512
            self._index_records += 160
        for n, t in tensors.items():
            self.pending[f"{rec['key']}.{n}"] = t
        self.pending_bytes += size
        self._index_records += rec_index
        self.pending_records.append(rec)
        self.known.update(digests or {})
        if new_call is not None:
            self._calls[new_call] = len(self.header["calls"])
            self.header["calls"].append(json.loads(new_call))

    def flush(self) -> None:
        if not self.pending:
            if self.stopped:
                self.write_index()
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        path = self.out / name
        meta = {SCHEMA: json.dumps({"schema": SCHEMA, "version": self.header["version"], "shard": len(self.shards),
                                    "records": len(self.pending_records)})}
        save_safetensors(self.pending, path, meta)
        size = path.stat().st_size
        for r in self.pending_records:
            r["shard"] = name
        self.shards.append({"file": name, "bytes": size, "records": len(self.pending_records)})
        self.records.extend(self.pending_records)
        self.committed += size
        self.pending, self.pending_records, self.pending_bytes = {}, [], 0
        self.write_index()
