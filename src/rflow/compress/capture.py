"""Capture what a model computes while it samples: model inputs/outputs and per-block inputs/outputs.

``capture(pipe, workload, out_dir, ...)`` runs the pipeline on every run of a
:class:`~rflow.compress.workload.Workload` with forward hooks on the model, on the selected blocks and
on ``final_layer`` (which receives the conditioning vector ``vec``), and for every ``every``-th
sampling step writes one **record** per sample and model call.

A record holds (tensor names inside a shard are ``<record key>.<name>``, e.g. ``r000012.L3.img_in``):

* model level — ``img`` (packed image tokens, L×C·4), ``img_ids`` (L×3), ``txt`` (S×context_in_dim),
  ``txt_ids`` (S×3), ``y`` (vec_in_dim), ``t`` (0-dim, float32), ``guidance`` (0-dim, float32; only
  for models with a guidance embedder) and ``velocity`` (the model output, L×C·4);
* ``vec`` — the conditioning vector every block gets (hidden), unless ``in_out_only``;
* per selected layer ``L`` (unified index: double blocks first, then single blocks) — double blocks
  ``L{L}.img_in``, ``L{L}.txt_in``, ``L{L}.img_out``, ``L{L}.txt_out``; single blocks ``L{L}.x_in``,
  ``L{L}.x_out`` (x = [txt; img] tokens).

RoPE ``pe`` is not stored: :meth:`CaptureReader.pe` recomputes it from the ids with the model's
``pe_embedder``, exactly as the model does. Float tensors are stored in the model's dtype unless
``store_dtype`` says otherwise (``t``, ``guidance`` and the ids are always float32: the model reads
them in float32). With true CFG (``cfg > 1``) the model runs twice per step; each call is its own
record (``branch`` "cond" or "uncond").

Folder layout: ``index.json`` (schema ``rflow.capture``, version 1) and shards
``shard-00000.safetensors``, ``shard-00001.safetensors`` … of at most ~``shard_bytes`` each. Every
shard is written atomically and the index is rewritten atomically after it, so the index always lists
exactly the complete shards on disk. Capture stops cleanly before the folder (shards + index) would
grow past ``budget_bytes``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .. import __version__
from ..checkpoints.io import SafetensorsFiles, read_json, save_safetensors
from ..errors import UserError
from ..outputs import atomic_write_bytes, check_output, replacing
from ..models.flux import Flux, FluxConfig
from .units import parse_layers

SCHEMA = "rflow.capture"
VERSION = 1
INDEX = "index.json"
SHARD_BYTES = 256 * 1024 * 1024
_SHARD_RE = re.compile(r"^shard-\d{5}\.safetensors$")
MODEL_INPUTS = ("img", "img_ids", "txt", "txt_ids", "y", "t", "guidance")


# ---------------------------------------------------------------------------------------------- layers


def n_layers(config: FluxConfig) -> int:
    return config.depth + config.depth_single


def layer_kind(config: FluxConfig, layer: int) -> str:
    """"double" or "single" for a unified layer index."""
    if not 0 <= layer < n_layers(config):
        raise UserError(f"layer {layer} is outside 0-{n_layers(config) - 1}")
    return "double" if layer < config.depth else "single"


def block_name(config: FluxConfig, layer: int) -> str:
    """BFL key prefix of a layer's block: ``double_blocks.3`` or ``single_blocks.0``."""
    return f"double_blocks.{layer}" if layer_kind(config, layer) == "double" else f"single_blocks.{layer - config.depth}"


def get_block(model: Flux, layer: int) -> torch.nn.Module:
    c = model.config
    return model.double_blocks[layer] if layer_kind(c, layer) == "double" else model.single_blocks[layer - c.depth]


def layer_io_names(config: FluxConfig, layer: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) stored for a layer, in the block's argument / return order."""
    if layer_kind(config, layer) == "double":
        return ("img_in", "txt_in"), ("img_out", "txt_out")
    return ("x_in",), ("x_out",)


def resolve_layers(config: FluxConfig, layers) -> list[int]:
    """``None``/"all" -> every layer; a range string ("0-3,7") or an iterable of ints -> sorted, checked."""
    n = n_layers(config)
    if layers is None or isinstance(layers, str):
        return parse_layers(layers, n)
    out = sorted({int(v) for v in layers})
    bad = [v for v in out if not 0 <= v < n]
    if bad:
        raise UserError(f"layer {bad[0]} is outside 0-{n - 1}")
    return out


# ---------------------------------------------------------------------------------------------- sizes


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'500MB' -> 500·10⁶, '1.5GiB' -> 1.5·2³⁰, '2G' -> 2·10⁹, '4096' -> 4096 bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UserError(f"bad size {text!r}: use e.g. 500MB, 2GB or 1.5GiB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise UserError(f"bad size {text!r}: must be positive")
    return n


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


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
    """Records -> shards + index, within a byte budget."""

    def __init__(self, out: Path, header: dict, budget: int, shard_bytes: int):
        self.out, self.header, self.budget, self.shard_bytes = out, header, budget, shard_bytes
        self.shards: list[dict] = []
        self.records: list[dict] = []  # records in written shards
        self.pending: dict[str, Tensor] = {}
        self.pending_records: list[dict] = []
        self.pending_bytes = 0  # estimated file size of the pending shard
        self.committed = 0  # bytes of shards on disk
        self.stopped: str | None = None
        self._index_base = len(self._index_json(complete=False)) + 256
        self._index_records = 0  # estimated index bytes for records and shards

    def _index_json(self, complete: bool) -> bytes:
        idx = dict(self.header, complete=complete, stopped=self.stopped, total_bytes=self.committed,
                   shards=self.shards, records=self.records)
        return json.dumps(idx, indent=1).encode()

    def write_index(self, complete: bool = False) -> None:
        atomic_write_bytes(self.out / INDEX, self._index_json(complete))

    def add(self, rec: dict, tensors: dict[str, Tensor]) -> None:
        """Queue one record; raises :class:`_BudgetReached` (after flushing) if it would not fit."""
        size = sum(_tensor_bytes(t) + _header_estimate(f"{rec['key']}.{n}", t) for n, t in tensors.items())
        rec_index = 2 * len(json.dumps(rec)) + 64
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

    def flush(self) -> None:
        if not self.pending:
            if self.stopped:
                self.write_index()
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        path = self.out / name
        meta = {SCHEMA: json.dumps({"schema": SCHEMA, "version": VERSION, "shard": len(self.shards),
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


# ---------------------------------------------------------------------------------------------- hooks


class _Recorder:
    """Forward hooks that turn model calls into records for a :class:`_Writer`."""

    def __init__(self, model: Flux, layers: list[int], in_out_only: bool, every: int, store_dtype: torch.dtype,
                 writer: _Writer, downscale: int):
        self.model, self.layers, self.in_out_only, self.every = model, layers, in_out_only, every
        self.downscale = downscale
        self.dtype, self.writer = store_dtype, writer
        self.handles: list = []
        self.run = None
        self.prompts: list[str] = []
        self.neg_prompts: list[str] = []
        self.step = 0
        self.branch = 0
        self.branches = 1
        self.active = False
        self.inputs: dict[str, Tensor | None] = {}
        self.buf: dict[str, Tensor] = {}
        self.n = 0
        self._model_sig = inspect.signature(model.forward)

    # -- helpers
    def _keep(self, t: Tensor, float_dtype: torch.dtype | None = None) -> Tensor:
        t = t.detach()
        if t.is_floating_point():
            t = t.to(float_dtype or self.dtype)
        return t.to("cpu", copy=True)

    def attach(self) -> None:
        m = self.model
        self.handles.append(m.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self.handles.append(m.register_forward_hook(self._model_post, with_kwargs=True))
        if self.in_out_only:
            return
        self.handles.append(m.final_layer.register_forward_pre_hook(self._vec_pre, with_kwargs=True))
        for L in self.layers:
            block = get_block(m, L)
            ins, outs = layer_io_names(m.config, L)
            sig = inspect.signature(block.forward)
            self.handles.append(block.register_forward_pre_hook(self._block_pre(L, ins, sig), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._block_post(L, outs)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def start_run(self, run, prompts: list[str], neg_prompts: list[str], branches: int) -> None:
        self.run, self.prompts, self.neg_prompts, self.branches = run, prompts, neg_prompts, branches
        self.step, self.branch, self.active = 0, 0, False

    def on_step(self, i: int, n: int, _x) -> None:
        self.step, self.branch = i + 1, 0

    # -- hooks
    def _model_pre(self, module, args, kwargs):
        self.active = self.run is not None and self.step % self.every == 0
        self.buf = {}
        if not self.active:
            return
        b = self._model_sig.bind(*args, **kwargs)
        b.apply_defaults()
        a = b.arguments
        self.inputs = {
            "img": self._keep(a["img"]), "img_ids": self._keep(a["img_ids"], torch.float32),
            "txt": self._keep(a["txt"]), "txt_ids": self._keep(a["txt_ids"], torch.float32),
            "y": self._keep(a["y"]), "t": self._keep(a["timesteps"], torch.float32),
            "guidance": (self._keep(a["guidance"], torch.float32)
                         if a["guidance"] is not None and module.config.guidance_embed else None),
        }

    def _vec_pre(self, module, args, kwargs):
        if self.active:
            vec = args[1] if len(args) > 1 else kwargs["vec"]
            self.buf["vec"] = self._keep(vec)

    def _block_pre(self, L: int, names: tuple[str, ...], sig):
        def hook(module, args, kwargs):
            if self.active:
                a = sig.bind(*args, **kwargs).arguments
                for n, arg in zip(names, ("img", "txt") if len(names) == 2 else ("x",)):
                    self.buf[f"L{L}.{n}"] = self._keep(a[arg])
        return hook

    def _block_post(self, L: int, names: tuple[str, ...]):
        def hook(module, args, output):
            if self.active:
                outs = output if isinstance(output, tuple) else (output,)
                for n, t in zip(names, outs):
                    self.buf[f"L{L}.{n}"] = self._keep(t)
        return hook

    def _model_post(self, module, args, kwargs, output):
        if not self.active:
            self.branch += 1
            return
        self.active = False
        velocity = self._keep(output)
        B = velocity.shape[0]
        cond = self.branch == 0
        prompts = self.prompts if cond else self.neg_prompts
        for s in range(B):
            def pick(t: Tensor) -> Tensor:
                return (t[s] if t.shape[0] == B else t[0]).clone()

            tensors = {k: pick(v) for k, v in self.inputs.items() if v is not None}
            tensors["velocity"] = pick(velocity)
            tensors.update({k: pick(v) for k, v in self.buf.items()})
            L_img, L_txt = tensors["img"].shape[0], tensors["txt"].shape[0]
            run = self.run
            rec = {
                "key": f"r{self.n:06d}", "shard": None, "prompt": prompts[s], "run": run.index, "sample": s,
                "step": self.step, "branch": "cond" if cond else "uncond", "t": float(tensors["t"]),
                "seed": run.seed, "width": run.width, "height": run.height,
                "latent_h": run.height // self.downscale, "latent_w": run.width // self.downscale,
                "img_len": L_img, "txt_len": L_txt,
            }
            self.writer.add(rec, tensors)  # may raise _BudgetReached
            self.n += 1
        self.buf = {}
        self.branch += 1


# ---------------------------------------------------------------------------------------------- capture


def capture(pipe, workload, out_dir: str | os.PathLike, *, layers=None, every: int = 1, in_out_only: bool = False,
            budget_bytes: int, guidance: float | None = None, cfg: float = 1.0, solver: str = "euler",
            store_dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES, force: bool = False,
            progress: Callable[[dict], None] | None = None) -> dict:
    """Run ``workload`` through ``pipe`` and save captured tensors to ``out_dir`` (see the module doc).

    ``layers``: unified layer indices (list, or a range string "0-3,7"; default all; not with
    ``in_out_only``). ``every``: keep steps 0, every, 2·every, … of each run. ``budget_bytes``: the most
    the folder may hold. The capture is written into a temporary sibling and swapped in when complete;
    an existing ``out_dir`` is replaced only with ``force``, and a failed, interrupted or empty capture
    leaves it as it was.

    Returns ``{"dir", "records", "shards", "bytes", "runs_done", "runs", "stopped"}``; ``stopped`` is
    "budget" when the budget ended the capture early, else None.
    """
    model: Flux = pipe.transformer
    cfgm = model.config
    if every < 1:
        raise UserError(f"every must be ≥ 1, got {every}")
    if budget_bytes <= 0:
        raise UserError(f"budget must be positive, got {budget_bytes}")
    if shard_bytes <= 0:
        raise UserError(f"shard size must be positive, got {shard_bytes}")
    if in_out_only and layers is not None:
        raise UserError("give layers or in_out_only, not both")
    sel = [] if in_out_only else resolve_layers(cfgm, layers)
    store_dtype = store_dtype or model.dtype
    if not store_dtype.is_floating_point:
        raise UserError(f"store dtype must be a float type, got {store_dtype}")
    runs = list(workload.runs())
    if not runs:
        raise UserError("the workload has no runs")
    m = pipe.size_multiple
    for r in runs:
        if r.width <= 0 or r.height <= 0 or r.width % m or r.height % m:
            raise UserError(f"size {r.width}x{r.height} is not a positive multiple of {m} for this model")

    out = check_output(out_dir, kind="dir", force=force, what="the capture folder")
    header = {
        "schema": SCHEMA, "version": VERSION, "rflow": __version__,
        "model": {"name": pipe.name, "fingerprint": pipe.fingerprint, "config": cfgm.to_dict()},
        "layers": sel, "layer_kinds": {str(L): layer_kind(cfgm, L) for L in sel}, "in_out_only": bool(in_out_only),
        "every": every, "dtype": str(store_dtype).removeprefix("torch."),
        "sampling": {"guidance": guidance, "cfg": cfg, "solver": solver}, "workload": workload.describe(),
        "budget_bytes": int(budget_bytes),
    }
    with replacing(out, "dir") as tmp:
        res = _capture_into(tmp, pipe, runs, header, sel, in_out_only, every, store_dtype, int(budget_bytes),
                            int(shard_bytes), guidance, cfg, solver, progress)
        if res["records"] == 0:
            raise UserError(f"the budget ({format_bytes(budget_bytes)}) is too small for even one record; "
                            "nothing was captured")
    return {"dir": str(out), **res}


def _capture_into(out: Path, pipe, runs, header, sel, in_out_only, every, store_dtype, budget_bytes, shard_bytes,
                  guidance, cfg, solver, progress) -> dict:
    model = pipe.transformer
    writer = _Writer(out, header, budget_bytes, shard_bytes)
    writer.write_index()
    rec = _Recorder(model, sel, in_out_only, every, store_dtype, writer, pipe.vae.downscale_factor)
    rec.attach()
    branches = 2 if cfg > 1.0 else 1
    done = 0
    try:
        for r in runs:
            rec.start_run(r, [r.prompt], [""], branches)
            try:
                pipe.generate(r.prompt, width=r.width, height=r.height, steps=r.steps, guidance=guidance, cfg=cfg,
                              seed=r.seed, solver=solver, output_type="latent", callback=rec.on_step)
            except _BudgetReached:
                break
            done += 1
            if progress is not None:
                progress({"run": done, "runs": len(runs), "records": rec.n, "bytes": writer.committed + writer.pending_bytes})
    finally:
        rec.detach()
    writer.flush()
    writer.write_index(complete=writer.stopped is None)
    return {"records": len(writer.records), "shards": len(writer.shards), "bytes": writer.committed,
            "runs_done": done, "runs": len(runs), "stopped": writer.stopped}


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Record:
    key: str
    shard: str
    prompt: str
    run: int
    sample: int
    step: int
    branch: str
    t: float
    latent_h: int
    latent_w: int
    img_len: int
    txt_len: int
    index: int  # position in the capture


class CaptureReader:
    """A validated capture folder: records, their tensors, RoPE recomputed from the stored ids.

    Every problem a user can cause (missing folder or index, corrupt or foreign index, missing or
    truncated shard) is a one-line :class:`UserError`.
    """

    def __init__(self, path: str | os.PathLike):
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
            raise UserError(f"{p / INDEX}: capture version {idx.get('version')!r} is not one this rflow reads (≤ {VERSION})")
        try:
            self.config = FluxConfig.from_dict(idx["model"]["config"])
            self.fingerprint = str(idx["model"].get("fingerprint", ""))
            self.layers = [int(v) for v in idx["layers"]]
            self.in_out_only = bool(idx["in_out_only"])
            shards = {s["file"]: int(s["bytes"]) for s in idx["shards"]}
            self.records = [Record(r["key"], r["shard"], r["prompt"], int(r["run"]), int(r.get("sample", 0)),
                                   int(r["step"]), r.get("branch", "cond"), float(r["t"]), int(r["latent_h"]),
                                   int(r["latent_w"]), int(r["img_len"]), int(r["txt_len"]), i)
                            for i, r in enumerate(idx["records"])]
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
        for r in self.records:
            if r.shard not in self._files or f"{r.key}.velocity" not in self._files[r.shard]:
                raise UserError(f"{p / INDEX}: record {r.key} is not in shard {r.shard}")
        self._pe_cache: dict[tuple, Tensor] = {}

    # -- basic access
    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    @property
    def total_bytes(self) -> int:
        return int(self.index.get("total_bytes", 0))

    def names(self, record: Record) -> list[str]:
        pre = f"{record.key}."
        return [k[len(pre):] for k in self._files[record.shard].keys() if k.startswith(pre)]

    def tensor(self, record: Record, name: str) -> Tensor:
        files = self._files[record.shard]
        key = f"{record.key}.{name}"
        if key not in files:
            raise UserError(f"{self.path}: record {record.key} has no tensor {name!r}")
        return files.get(key)

    def model_inputs(self, record: Record, device=None) -> dict[str, Tensor | None]:
        """Keyword arguments for ``Flux.forward`` (batch of 1) that reproduce the captured call."""
        g = self.tensor(record, "guidance").reshape(1) if f"{record.key}.guidance" in self._files[record.shard] else None
        out = {"img": self.tensor(record, "img")[None], "img_ids": self.tensor(record, "img_ids")[None],
               "txt": self.tensor(record, "txt")[None], "txt_ids": self.tensor(record, "txt_ids")[None],
               "timesteps": self.tensor(record, "t").reshape(1), "y": self.tensor(record, "y")[None], "guidance": g}
        return {k: (v.to(device) if v is not None and device is not None else v) for k, v in out.items()}

    def model_output(self, record: Record) -> Tensor:
        return self.tensor(record, "velocity")[None]

    def _check_layer(self, layer: int) -> None:
        if self.in_out_only:
            raise UserError(f"{self.path}: this capture holds model inputs/outputs only (--in-out-only), no layers")
        if layer not in self.layers:
            raise UserError(f"{self.path}: layer {layer} was not captured (captured: {_ranges(self.layers)})")

    def layer_tensors(self, record: Record, layer: int) -> dict[str, Tensor]:
        """The stored (unbatched) inputs and outputs of a layer, plus ``vec``."""
        self._check_layer(layer)
        ins, outs = layer_io_names(self.config, layer)
        d = {n: self.tensor(record, f"L{layer}.{n}") for n in ins + outs}
        d["vec"] = self.tensor(record, "vec")
        return d

    def ids(self, record: Record) -> Tensor:
        """RoPE positions (1, S+L, 3) as the model builds them: text first, then image."""
        return torch.cat([self.tensor(record, "txt_ids"), self.tensor(record, "img_ids")], 0)[None]

    def pe(self, record: Record, embedder: torch.nn.Module) -> Tensor:
        """RoPE rotations for a record, from its stored ids (cached by ids)."""
        ids = self.ids(record)
        key = (tuple(getattr(embedder, "axes_dim", ())), getattr(embedder, "theta", None), tuple(ids.shape),
               ids.numpy().tobytes())
        pe = self._pe_cache.get(key)
        if pe is None:
            if len(self._pe_cache) > 64:
                self._pe_cache.clear()
            pe = self._pe_cache[key] = embedder(ids)
        return pe

    def block_io(self, record: Record, layer: int, embedder: torch.nn.Module, *, device=None,
                 dtype: torch.dtype | None = None) -> tuple[tuple, tuple]:
        """(arguments for the block's forward, expected outputs), each batched to 1.

        ``block(*args)`` of the captured model's block reproduces ``outputs``."""
        d = self.layer_tensors(record, layer)
        ins, outs = layer_io_names(self.config, layer)

        def cv(t: Tensor) -> Tensor:
            return t[None].to(device=device, dtype=dtype or t.dtype)

        pe = self.pe(record, embedder).to(device)
        args = tuple(cv(d[n]) for n in ins) + (cv(d["vec"]), pe)
        return args, tuple(cv(d[n]) for n in outs)

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
        return {"records": len(self.records), "shards": len(self._files), "bytes": self.total_bytes,
                "layers": self.layers, "in_out_only": self.in_out_only, "fingerprint": self.fingerprint,
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
