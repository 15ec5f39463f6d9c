"""Reading a capture folder (``rflow capture``): records, their tensors and the calls they replay.
The folder's layout and call structures are described in :mod:`rflow.compress.capture_format`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checkpoints.io import SafetensorsFiles, read_json
from ..errors import UserError

from .capture_format import _SHARD_RE, INDEX, SCHEMA, VERSION, Record

# ---------------------------------------------------------------------------------------------- reading


class _Leaf:
    """A stored tensor in a resolved structure: the tensor (batch axis removed when ``batched``) and a key
    that is equal for equal tensors (used to group records whose un-batched tensors coincide)."""

    __slots__ = ("tensor", "batched", "key")

    def __init__(self, tensor: Tensor, batched: bool, key):
        self.tensor, self.batched, self.key = tensor, batched, key


def signature(tree):
    """What records must share to be stacked into one batch: shapes of batched tensors, identity of the rest."""
    if isinstance(tree, _Leaf):
        return ("b", tuple(tree.tensor.shape), tree.tensor.dtype) if tree.batched else ("k", tree.key)
    if isinstance(tree, (list, tuple)):
        return (type(tree).__name__, tuple(signature(t) for t in tree))
    return ("v", repr(tree))


def collate(trees: list, device=None, dtype: torch.dtype | None = None):
    """Records' resolved structures (same :func:`signature`) as one batched argument: batched tensors
    stacked on a new first axis, shared ones passed once; floating tensors cast to ``dtype`` if given."""
    first = trees[0]
    if isinstance(first, _Leaf):
        t = torch.stack([x.tensor for x in trees]) if first.batched else first.tensor
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device) if device is not None else t
    if isinstance(first, (list, tuple)):
        return type(first)(collate([t[i] for t in trees], device, dtype) for i in range(len(first)))
    return first


def group_batches(items: list, batch: int, key=lambda item: item) -> list[list]:
    """``items`` grouped by the :func:`signature` of ``key(item)`` (in first-seen order), each group cut
    into chunks of at most ``batch``."""
    groups: dict = {}
    for it in items:
        groups.setdefault(signature(key(it)), []).append(it)
    return [g[i : i + batch] for g in groups.values() for i in range(0, len(g), batch)]


def leaves(tree, label: str):
    """(label, tensor) of every stored tensor of a resolved structure; sequence elements get ``.i``."""
    if isinstance(tree, _Leaf):
        yield label, tree.tensor
    elif isinstance(tree, (list, tuple)):
        for i, t in enumerate(tree):
            yield from leaves(t, f"{label}.{i}")


def digest(t: Tensor) -> str:
    """A content hash of a (CPU) tensor: dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def _legacy_call(config, layers: list[int]) -> dict:
    """The call structure of a version-1 (FLUX.1) capture, which stored none."""
    def t(name):
        return {"t": name, "b": 1}

    inputs = [["img", t("img")], ["img_ids", t("img_ids")], ["txt", t("txt")], ["txt_ids", t("txt_ids")],
              ["timesteps", t("t")], ["y", t("y")], ["guidance", t("guidance") if config.guidance_embed else None]]
    blocks = {}
    for L in layers:
        streams = ["img", "txt"] if L < config.depth else ["x"]
        args = [[s, t(f"L{L}.{s}_in")] for s in streams] + [["vec", t("vec")], ["pe", {"pe": 1}]]
        blocks[str(L)] = {"args": args, "streams": streams, "outputs": [t(f"L{L}.{s}_out") for s in streams]}
    return {"inputs": inputs, "output": t("velocity"), "blocks": blocks}


def _names(node) -> list[str]:
    if not isinstance(node, dict):
        return []
    if "t" in node:
        return [node["t"]]
    return [n for child in node.get("tuple", node.get("list", [])) for n in _names(child)]


class CaptureReader:
    """A validated capture folder: records, their tensors, the block and model calls they replay.

    Every problem a user can cause (missing folder or index, corrupt or foreign index, missing or
    truncated shard) is a one-line :class:`UserError`.
    """

    def __init__(self, path: str | os.PathLike):
        from ..checkpoints.loader import family_module

        p = Path(path).expanduser()
        self.path = p
        if not p.is_dir():
            raise UserError(f"{p}: no such capture folder")
        if not (p / INDEX).is_file():
            raise UserError(f"{p}: not an rflow capture (no {INDEX})")
        idx = read_json(p / INDEX)
        if not isinstance(idx, dict) or idx.get("schema") != SCHEMA:
            raise UserError(f"{p / INDEX}: not an rflow capture index (schema {idx.get('schema') if isinstance(idx, dict) else None!r})")
        if not isinstance(idx.get("version"), int) or idx["version"] > VERSION:
            raise UserError(f"{p / INDEX}: capture version {idx.get('version')!r} is not one this rflow reads (≤ {VERSION}); "
                            "capture again with this rflow")
        try:
            self.family = str(idx.get("family", "flux1"))
            self.family_module = family_module(self.family)
            self.config = self.family_module.CONFIG_CLASS.from_dict(idx["model"]["config"])
            self.fingerprint = str(idx["model"].get("fingerprint", ""))
            self.layers = [int(v) for v in idx["layers"]]
            self.in_out_only = bool(idx["in_out_only"])
            shards = {s["file"]: int(s["bytes"]) for s in idx["shards"]}
            self.legacy = "calls" not in idx
            self.calls = [_legacy_call(self.config, self.layers)] if self.legacy else list(idx["calls"])
            self.records = [Record(r["key"], r["shard"], r["prompt"], int(r["run"]), int(r.get("sample", 0)),
                                   int(r["step"]), r.get("branch", "cond"), None if r.get("t") is None else float(r["t"]),
                                   int(r["latent_h"]), int(r["latent_w"]), int(r.get("img_len", 0)),
                                   int(r.get("txt_len", 0)), i, int(r.get("call", 0)),
                                   tuple(sorted((str(k), str(v)) for k, v in r.get("refs", {}).items())))
                            for i, r in enumerate(idx["records"])]
        except UserError as e:
            raise UserError(f"{p / INDEX}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{p / INDEX}: corrupt capture index ({type(e).__name__}: {e})") from None
        self.index = idx
        for name, size in shards.items():
            if not _SHARD_RE.match(name):
                raise UserError(f"{p / INDEX}: corrupt capture index (bad shard name {name!r})")
            f = p / name
            if not f.is_file():
                raise UserError(f"{f}: shard listed in the capture index is missing")
            if f.stat().st_size != size:
                raise UserError(f"{f}: truncated or modified shard ({f.stat().st_size} bytes, the index says {size})")
        self._files: dict[str, SafetensorsFiles] = {name: SafetensorsFiles([p / name]) for name in shards}
        self._shard_of = {r.key: r.shard for r in self.records}
        self._check_records()
        self._pe_cache: dict[str, Tensor] = {}
        self._ref_cache: dict[str, Tensor] = {}

    def _check_records(self) -> None:
        """Every tensor each record's call structure names is on disk (a one-line error otherwise)."""
        where = self.path / INDEX
        needed: list[set[str]] = []
        for call in self.calls:
            try:
                names = {n for _, node in call["inputs"] for n in _names(node)} | set(_names(call["output"]))
                if not self.in_out_only:
                    for b in call["blocks"].values():
                        names |= {n for _, node in b["args"] for n in _names(node)}
                        names |= {n for node in b["outputs"] for n in _names(node)}
            except (KeyError, TypeError, AttributeError, ValueError):
                raise UserError(f"{where}: corrupt capture index (bad call structure)") from None
            needed.append(names)
        for r in self.records:
            if r.shard not in self._files or not 0 <= r.call < len(self.calls):
                raise UserError(f"{where}: record {r.key} is not in shard {r.shard}")
            refs = dict(r.refs)
            for name in needed[r.call]:
                key = refs.get(name, f"{r.key}.{name}")
                shard = self._shard_of.get(key.split(".", 1)[0])
                if shard not in self._files or key not in self._files[shard]:
                    raise UserError(f"{where}: record {r.key} is not in shard {r.shard} (no tensor {key!r})")

    # -- basic access
    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    @property
    def total_bytes(self) -> int:
        return int(self.index.get("total_bytes", 0))

    @property
    def blocks(self) -> dict[int, str]:
        """Captured layer -> qualified name of its block (in the captured model)."""
        return {int(k): v for k, v in self.index.get("blocks", {}).items()}

    def call(self, record: Record) -> dict:
        return self.calls[record.call]

    def names(self, record: Record) -> list[str]:
        """The record's tensor names: its own, then those stored once with an earlier record."""
        pre = f"{record.key}."
        own = [k[len(pre):] for k in self._files[record.shard].keys() if k.startswith(pre)]
        return own + [n for n, _ in record.refs if n not in own]

    def _key(self, record: Record, name: str) -> str:
        return dict(record.refs).get(name, f"{record.key}.{name}")

    def tensor(self, record: Record, name: str) -> Tensor:
        key = self._key(record, name)
        shard = self._shard_of.get(key.split(".", 1)[0])
        files = self._files.get(shard)
        if files is None or key not in files:
            raise UserError(f"{self.path}: record {record.key} has no tensor {name!r}")
        if key.startswith(f"{record.key}."):
            return files.get(key)
        t = self._ref_cache.get(key)  # stored once for many records (RoPE tables): read once
        if t is None:
            if len(self._ref_cache) > 64:
                self._ref_cache.clear()
            t = self._ref_cache[key] = files.get(key)
        return t

    # -- structures
    def _resolve(self, node, record: Record, embedder=None):
        if node is None:
            return None
        if "t" in node:
            return _Leaf(self.tensor(record, node["t"]), bool(node["b"]), self._key(record, node["t"]))
        if "tuple" in node:
            return tuple(self._resolve(n, record, embedder) for n in node["tuple"])
        if "list" in node:
            return [self._resolve(n, record, embedder) for n in node["list"]]
        if "v" in node:
            return node["v"]
        if "pe" in node:
            return self._legacy_pe(record, embedder)
        raise UserError(f"{self.path / INDEX}: corrupt capture index (unknown node {sorted(node)})")

    def _legacy_pe(self, record: Record, embedder) -> _Leaf:
        """RoPE of a version-1 record, recomputed from its ids as FLUX.1 does (text first, then image)."""
        if embedder is None:
            raise UserError(f"{self.path}: a version-1 capture stores no RoPE tables; pass the model's pe_embedder "
                            "(or capture again with this rflow)")
        ids = torch.cat([self.tensor(record, "txt_ids"), self.tensor(record, "img_ids")], 0)[None]
        key = ("pe", digest(ids), tuple(getattr(embedder, "axes_dim", ())), getattr(embedder, "theta", None))
        pe = self._pe_cache.get(key)
        if pe is None:
            if len(self._pe_cache) > 64:
                self._pe_cache.clear()
            pe = self._pe_cache[key] = embedder(ids)
        return _Leaf(pe, False, key)

    def model_tree(self, record: Record) -> tuple[dict, object]:
        """(transformer argument -> resolved structure, resolved output) of a record."""
        c = self.call(record)
        return {p: self._resolve(n, record) for p, n in c["inputs"]}, self._resolve(c["output"], record)

    def model_inputs(self, record: Record, device=None) -> dict:
        """Keyword arguments for the transformer's forward (batch of 1) that reproduce the captured call."""
        return {p: collate([t], device) for p, t in self.model_tree(record)[0].items()}

    def model_output(self, record: Record) -> Tensor:
        return collate([self.model_tree(record)[1]])

    def model_batches(self, records: list[Record], batch: int, device=None) -> list[tuple[dict, Tensor, list[Record]]]:
        """Records as batched transformer calls: [(keyword arguments, stored outputs, records)]; records
        are stacked where their structures allow (tensors without a batch axis must coincide)."""
        items = [(r, *self.model_tree(r)) for r in records]
        out = []
        for group in group_batches(items, batch, key=lambda it: list(it[1].values())):
            kw = {p: collate([it[1][p] for it in group], device) for p in group[0][1]}
            out.append((kw, collate([it[2] for it in group], device), [it[0] for it in group]))
        return out

    def _check_layer(self, layer: int) -> None:
        if self.in_out_only:
            raise UserError(f"{self.path}: this capture holds model inputs/outputs only (--in-out-only), no layers")
        if layer not in self.layers:
            raise UserError(f"{self.path}: layer {layer} was not captured (captured: {_ranges(self.layers)})")

    def block_tree(self, record: Record, layer: int, embedder=None) -> tuple[list, list]:
        """(resolved arguments in call order, resolved outputs) of a captured block; ``embedder`` only for
        version-1 captures."""
        self._check_layer(layer)
        b = self.call(record)["blocks"].get(str(layer))
        if b is None:
            raise UserError(f"{self.path}: record {record.key} holds no call of layer {layer}")
        return ([self._resolve(n, record, embedder) for _, n in b["args"]],
                [self._resolve(n, record, embedder) for n in b["outputs"]])

    def layer_tensors(self, record: Record, layer: int) -> dict[str, Tensor]:
        """A layer's stored (un-batched) tensors: ``{stream}_in`` and ``{stream}_out`` for the token streams
        it updates, and every other argument under its parameter name (``vec``, ``pe``, ``mod_img.0`` …)."""
        self._check_layer(layer)
        b = self.call(record)["blocks"].get(str(layer))
        if b is None:
            raise UserError(f"{self.path}: record {record.key} holds no call of layer {layer}")
        streams = b["streams"]
        out = {}
        for i, (param, node) in enumerate(b["args"]):
            if "pe" in (node or {}):
                continue  # version 1: recomputed, not stored
            label = f"{streams[i]}_in" if i < len(streams) else param
            out.update(leaves(self._resolve(node, record), label))
        for s, node in zip(streams, b["outputs"]):
            out.update(leaves(self._resolve(node, record), f"{s}_out"))
        return out

    def block_io(self, record: Record, layer: int, embedder=None, *, device=None,
                 dtype: torch.dtype | None = None) -> tuple[tuple, tuple]:
        """(arguments for the block's forward, expected outputs), each batched to 1: ``block(*args)`` of
        the captured model's block reproduces ``outputs``. ``embedder``: the model's ``pe_embedder``,
        needed for version-1 captures only."""
        args, outs = self.block_tree(record, layer, embedder)
        return (tuple(collate([a], device, dtype) for a in args), tuple(collate([o], device, dtype) for o in outs))

    # -- splitting
    def split(self, holdout_fraction: float, seed: int = 0, *, by: str = "run") -> tuple[list[Record], list[Record]]:
        """Deterministic (train, held-out) record lists.

        ``by="run"`` (default) holds out whole workload runs — every record of a held-out prompt is
        unseen in training — when the capture has at least two runs; otherwise, and for
        ``by="record"``, single records are held out. At least one record lands on each side when
        there are two or more records."""
        if not 0.0 <= holdout_fraction < 1.0:
            raise UserError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
        if by not in ("run", "record"):
            raise UserError(f"split by 'run' or 'record', not {by!r}")
        rng = np.random.default_rng(seed)
        groups: dict[int, list[Record]] = {}
        runs = sorted({r.run for r in self.records})
        if by == "run" and len(runs) >= 2:
            for r in self.records:
                groups.setdefault(r.run, []).append(r)
        else:
            groups = {r.index: [r] for r in self.records}
        keys = sorted(groups)
        if holdout_fraction == 0.0 or len(keys) < 2:
            return list(self.records), []
        n_hold = min(len(keys) - 1, max(1, int(round(holdout_fraction * len(keys)))))
        order = rng.permutation(len(keys))
        hold = {keys[i] for i in order[:n_hold]}
        train = [r for k in keys if k not in hold for r in groups[k]]
        held = [r for k in keys if k in hold for r in groups[k]]
        return sorted(train, key=lambda r: r.index), sorted(held, key=lambda r: r.index)

    def describe(self) -> dict:
        return {"family": self.family, "version": self.index.get("version"), "records": len(self.records),
                "shards": len(self._files), "bytes": self.total_bytes, "layers": self.layers,
                "in_out_only": self.in_out_only, "fingerprint": self.fingerprint,
                "complete": bool(self.index.get("complete")), "stopped": self.index.get("stopped")}


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if v is not None:
            start = prev = v
    return ",".join(parts)
