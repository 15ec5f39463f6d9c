"""Capture what a model computes while it samples: the transformer's inputs and output, and the inputs and
outputs of its residual blocks, for any family.

``capture(pipe, workload, out_dir, ...)`` runs the pipeline on every run of a
:class:`~rflow.compress.workload.Workload` with forward hooks on the transformer and on the selected
blocks, and for every ``every``-th sampling step writes one **record** per model call (with true CFG,
``cfg > 1``, the model runs twice per step and each call is its own record, ``branch`` "cond" or
"uncond").

**Blocks.** A layer's block is the element of the model's outermost ``nn.ModuleList`` that holds its
unit groups' activation modules (:func:`residual_blocks`; FLUX: ``double_blocks.{i}`` /
``single_blocks.{i}``, Z-Image: ``layers.{i}``, ``noise_refiner.{i}``, ``context_refiner.{i}``). A
block's first arguments are the token **streams** it updates and returns in the same order (FLUX
double blocks: ``img, txt``; the others: ``x``); every other argument is **context** (FLUX.1's ``vec``,
RoPE ``pe``, FLUX.2's shared modulations, Z-Image's ``mask`` and ``adaln``).

**A record** (tensor names inside a shard are ``<record key>.<name>``, e.g. ``r000012.L3.img_in``):

* the transformer's arguments under their parameter names (``timesteps`` is stored as ``t``),
  sequence elements as ``<name>.<i>``, and its output as ``velocity`` (the raw output: x0 for rflow-tiny,
  Z-Image's negated velocity);
* per captured layer ``L``: ``L{L}.{stream}_in`` and ``L{L}.{stream}_out``;
* every context tensor once per record, under its parameter name (``vec``, ``pe``; a second distinct
  tensor of the same name is ``pe~2``). A context tensor equal to one stored with an earlier record
  (RoPE tables of the same size, masks) is not stored again: the record's ``refs`` maps the name to
  that tensor's key.

A leading axis of size 1 (the batch of one) is removed from every stored tensor except list elements
(per-sample lists such as Z-Image's captions keep their shape); how to rebuild each call — which tensor
goes where, which had its axis removed — is the record's **call structure** in the index
(:mod:`rflow.compress.capture_format`). In FLUX.2 and Z-Image captures a block input that is the
previous block's output is stored once (the structure names ``L{L-1}.x_out``): close to half the bytes.

**Dtypes.** Streams and the output are stored in ``store_dtype`` (default: the model's dtype, which
makes every replay exact); so are context tensors in the model's dtype, while other context (float32
RoPE tables, boolean masks) keeps its dtype; transformer inputs are stored in ``store_dtype`` except
per-sample scalars (``t``, ``guidance``) and integer-valued positions (ids), which keep their dtype:
the model reads them in float32.

**Folder.** ``index.json`` (schema ``rflow.capture``) and shards ``shard-00000.safetensors``, … of at
most ~``shard_bytes`` each. Every shard is written atomically and the index is rewritten atomically
after it, so the index always lists exactly the complete shards on disk. Capture stops cleanly before
the folder (shards + index) would grow past ``budget_bytes``; a failed, interrupted or empty capture
leaves an earlier one as it was (rflow.outputs).

**Version.** 2 for FLUX.2 and Z-Image. FLUX.1 captures keep every tensor of the version-1 layout under
its version-1 name (model inputs ``img, img_ids, txt, txt_ids, y, t, guidance``, ``vec`` in every record,
each block's streams stored in full) and the record fields ``img_len`` / ``txt_len``, so they are marked
version 1 and an older rflow reads them; the additions (``pe``, call structures) are ignored there.
"""

from __future__ import annotations

import inspect
import os
import re
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import UserError
from ..outputs import check_output, replacing
from .capture_format import INDEX, SCHEMA, VERSION, Record, _BudgetReached, _Writer, is_capture_dir
from .capture_reader import CaptureReader, digest
from .units import family_of, layer_refs, n_layers, parse_layers

__all__ = ["INDEX", "SCHEMA", "SHARD_BYTES", "VERSION", "CaptureReader", "Record", "capture", "format_bytes", "get_block",
           "is_capture_dir", "layer_kind", "parse_bytes", "residual_blocks", "resolve_layers"]

SHARD_BYTES = 256 * 1024 * 1024
V1_FAMILY = "flux1"  # the family whose captures stay readable as version 1
V1_ALWAYS_STORED = ("vec",)  # context a version-1 reader reads from every record


# ---------------------------------------------------------------------------------------------- layers


def residual_blocks(model: nn.Module) -> dict[int, str]:
    """Layer index (what ``--layers`` selects) -> qualified name of its residual block: the element of
    the model's outermost ``nn.ModuleList`` that contains the layer's activation modules."""
    candidates: list[tuple[str, nn.Module]] = []

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            if isinstance(child, nn.ModuleList):
                candidates.extend((f"{prefix}{name}.{i}", m) for i, m in enumerate(child))
            else:
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    owner = {id(m): qn for qn, block in candidates for m in block.modules()}
    out: dict[int, str] = {}
    for ref in layer_refs(model):
        qn = owner.get(id(model.get_submodule(ref.act)))
        if qn is None:
            raise UserError(f"unit group {ref.name} is not inside a block of the model (no nn.ModuleList holds it)")
        if out.setdefault(ref.layer, qn) != qn:
            raise UserError(f"layer {ref.layer} spans two blocks ({out[ref.layer]}, {qn})")
    return dict(sorted(out.items()))


def get_block(model: nn.Module, layer: int) -> nn.Module:
    blocks = residual_blocks(model)
    if layer not in blocks:
        raise UserError(f"layer {layer} is outside 0-{n_layers(model.config) - 1}")
    return model.get_submodule(blocks[layer])


def resolve_layers(config, layers) -> list[int]:
    """``None``/"all" -> every layer; a range string ("0-3,7") or an iterable of ints -> sorted, checked."""
    n = n_layers(config)
    if layers is None or isinstance(layers, str):
        return parse_layers(layers, n)
    out = sorted({int(v) for v in layers})
    bad = [v for v in out if not 0 <= v < n]
    if bad:
        raise UserError(f"layer {bad[0]} is outside 0-{n - 1}")
    return out


def layer_kind(config, layer: int) -> str:
    """What a layer is: FLUX's "double" / "single" blocks, else its stream ("main", "noise_refiner", …)."""
    from .measure import layer_kind as kind

    return kind(layer_refs(config), layer)


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


# ---------------------------------------------------------------------------------------------- hooks


def _integer_valued(t: Tensor) -> bool:
    return t.numel() > 0 and bool(torch.equal(t, t.round()))


class _Call:
    """What one model call stores: tensors by name, the nodes that rebuild its arguments, and an identity
    map so that a tensor passed to many blocks (or a block's output that is the next block's input) is
    copied once."""

    def __init__(self, rec: "_Recorder"):
        self.rec = rec
        self.tensors: dict[str, Tensor] = {}
        self.refs: dict[str, str] = {}  # name -> key of an equal tensor stored with an earlier record
        self.digests: dict[str, str] = {}  # digest -> key, of this record's context tensors
        self.seen: dict[int, tuple] = {}  # id(tensor) -> (weakref, version, name, batched)
        self.inputs: list = []
        self.blocks: dict[str, dict] = {}
        self.pending: dict[int, tuple] = {}  # layer -> (bound arguments, versions) between pre- and post-hook

    def _taken(self, name: str) -> bool:
        return name in self.tensors or name in self.refs

    def _name(self, base: str) -> str:
        name, n = base, 1
        while self._taken(name):
            n += 1
            name = f"{base}~{n}"
        return name

    def base(self, param: str) -> str:
        """A name for a context argument that no earlier one uses (``pe``, then ``pe~2``; a sequence's
        elements are ``pe~2.0`` …). A tensor already stored keeps its name (the identity map)."""
        names = (*self.tensors, *self.refs)
        name, n = param, 1
        while any(k == name or k.startswith(f"{name}.") for k in names):
            n += 1
            name = f"{param}~{n}"
        return name

    def node(self, value, base: str, kind: str, in_list: bool = False):
        """The structure node of an argument, storing its tensors (``kind``: input | stream | context | output)."""
        if value is None:
            return None
        if isinstance(value, Tensor):
            return self.tensor(value, base, kind, strip=not in_list)
        if isinstance(value, (tuple, list)):
            tag = "tuple" if isinstance(value, tuple) else "list"
            return {tag: [self.node(v, f"{base}.{i}", kind, in_list=tag == "list") for i, v in enumerate(value)]}
        if isinstance(value, (bool, int, float, str)):
            return {"v": value}
        raise UserError(f"capture: argument {base} is a {type(value).__name__}, which a capture cannot store")

    def tensor(self, t: Tensor, base: str, kind: str, strip: bool) -> dict:
        hit = self.seen.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            name, batched = hit[2], hit[3]
            if kind == "stream" and not self.rec.share_streams and name in self.tensors:
                own = self._name(base)  # version 1: every block's streams under their own names
                self.tensors[own] = self.tensors[name].clone()
                return {"t": own, "b": batched}
            return {"t": name, "b": batched}
        c = t.detach()
        batched = strip and c.ndim > 0 and c.shape[0] == 1
        if batched:
            c = c[0]
        if c.is_floating_point():
            model_dtype = self.rec.model_dtype
            if kind in ("stream", "output"):
                c = c.to(self.rec.dtype)
            elif kind == "context" and c.dtype == model_dtype:
                c = c.to(self.rec.dtype)
            elif kind == "input" and c.ndim > 0 and not _integer_valued(c):
                c = c.to(self.rec.dtype)
        c = c.to("cpu", copy=True)
        name = self._name(base)
        self.seen[id(t)] = (weakref.ref(t), t._version, name, batched)
        if kind == "context" and base not in self.rec.always_stored:
            d = digest(c)
            key = self.rec.writer.known.get(d) or self.digests.get(d)
            if key is not None:
                self.refs[name] = key
                return {"t": name, "b": batched}
            self.digests[d] = f"{self.rec.key()}.{name}"
        self.tensors[name] = c
        return {"t": name, "b": batched}


class _Recorder:
    """Forward hooks that turn model calls into records for a :class:`_Writer`."""

    def __init__(self, model: nn.Module, blocks: dict[int, str], in_out_only: bool, every: int,
                 store_dtype: torch.dtype, writer: _Writer, latent_hw: Callable[[int, int], tuple[int, int]],
                 v1: bool):
        self.model, self.blocks, self.in_out_only, self.every = model, blocks, in_out_only, every
        self.latent_hw = latent_hw
        self.dtype, self.writer = store_dtype, writer
        self.model_dtype = next(model.parameters()).dtype
        self.v1 = v1
        self.share_streams = not v1
        self.always_stored = V1_ALWAYS_STORED if v1 else ()
        self.handles: list = []
        self.run = None
        self.prompts: list[str] = []
        self.neg_prompts: list[str] = []
        self.step = 0
        self.branch = 0
        self.active = False
        self.call: _Call | None = None
        self.n = 0
        self._model_sig = inspect.signature(model.forward)

    def key(self) -> str:
        return f"r{self.n:06d}"

    def attach(self) -> None:
        m = self.model
        self.handles.append(m.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self.handles.append(m.register_forward_hook(self._model_post, with_kwargs=True))
        if self.in_out_only:
            return
        for L, name in self.blocks.items():
            block = m.get_submodule(name)
            sig = inspect.signature(block.forward)
            if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
                raise UserError(f"capture: block {name} takes *args/**kwargs; its calls cannot be recorded")
            self.handles.append(block.register_forward_pre_hook(self._block_pre(L, sig), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._block_post(L)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def start_run(self, run, prompts: list[str], neg_prompts: list[str]) -> None:
        self.run, self.prompts, self.neg_prompts = run, prompts, neg_prompts
        self.step, self.branch, self.active = 0, 0, False

    def on_step(self, i: int, n: int, _x) -> None:
        self.step, self.branch = i + 1, 0

    # -- hooks
    def _model_pre(self, module, args, kwargs):
        self.active = self.run is not None and self.step % self.every == 0
        self.call = None
        if not self.active:
            return
        b = self._model_sig.bind(*args, **kwargs)
        b.apply_defaults()
        call = self.call = _Call(self)
        call.inputs = [[p, call.node(v, "t" if p == "timesteps" else p, "input")] for p, v in b.arguments.items()]

    def _block_pre(self, L: int, sig):
        def hook(module, args, kwargs):
            if self.active and self.call is not None:
                b = sig.bind(*args, **kwargs)
                b.apply_defaults()
                versions = {id(v): v._version for v in b.arguments.values() if isinstance(v, Tensor)}
                self.call.pending[L] = (b.arguments, versions)
        return hook

    def _block_post(self, L: int):
        def hook(module, args, output):
            call = self.call
            if not (self.active and call is not None and L in call.pending):
                return
            arguments, versions = call.pending.pop(L)
            if any(isinstance(v, Tensor) and v._version != versions[id(v)] for v in arguments.values()):
                raise UserError(f"capture: block {self.blocks[L]} changed one of its inputs in place; "
                                "its call cannot be recorded")
            outs = output if isinstance(output, tuple) else (output,)
            params = list(arguments)
            k = len(outs)
            if k > len(params) or not all(isinstance(o, Tensor) for o in outs):
                raise UserError(f"capture: block {self.blocks[L]} does not return its token streams")
            streams = params[:k]
            nodes = [[p, call.node(arguments[p], f"L{L}.{p}_in", "stream") if i < k
                      else call.node(arguments[p], call.base(p), "context")] for i, p in enumerate(params)]
            out_nodes = [call.node(o, f"L{L}.{s}_out", "stream") for s, o in zip(streams, outs)]
            call.blocks[str(L)] = {"args": nodes, "streams": streams, "outputs": out_nodes}
        return hook

    def _model_post(self, module, args, kwargs, output):
        call = self.call
        if not self.active or call is None:
            self.branch += 1
            return
        self.active, self.call = False, None
        out_node = call.node(output, "velocity", "output")
        structure = {"inputs": call.inputs, "output": out_node, "blocks": call.blocks}
        index, new_call = self.writer.call_index(structure)
        cond = self.branch == 0
        run = self.run
        lh, lw = self.latent_hw(run.height, run.width)
        t = call.tensors.get("t")
        rec = {
            "key": self.key(), "shard": None, "prompt": (self.prompts if cond else self.neg_prompts)[0], "run": run.index,
            "sample": 0, "step": self.step, "branch": "cond" if cond else "uncond",
            "t": float(t) if t is not None and t.numel() == 1 else None,
            "seed": run.seed, "width": run.width, "height": run.height, "latent_h": lh, "latent_w": lw, "call": index,
        }
        if self.v1:  # what a version-1 reader reads from every FLUX.1 record
            rec["img_len"], rec["txt_len"] = int(call.tensors["img"].shape[0]), int(call.tensors["txt"].shape[0])
        if call.refs:
            rec["refs"] = dict(call.refs)
        self.writer.add(rec, call.tensors, call.digests, new_call)  # may raise _BudgetReached
        self.n += 1
        self.branch += 1


# ---------------------------------------------------------------------------------------------- capture


def capture(pipe, workload, out_dir: str | os.PathLike, *, layers=None, every: int = 1, in_out_only: bool = False,
            budget_bytes: int, guidance: float | None = None, cfg: float = 1.0, solver: str = "euler",
            store_dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES, force: bool = False,
            progress: Callable[[dict], None] | None = None) -> dict:
    """Run ``workload`` through ``pipe`` (any family) and save captured tensors to ``out_dir`` (see the module doc).

    ``layers``: layer indices as ``--layers`` counts them (list, or a range string "0-3,7"; default all;
    not with ``in_out_only``). ``every``: keep steps 0, every, 2·every, … of each run. ``budget_bytes``:
    the most the folder may hold. The capture is written into a temporary sibling and swapped in when
    complete; an existing ``out_dir`` is replaced only with ``force``, and a failed, interrupted or empty
    capture leaves it as it was.

    Returns ``{"dir", "records", "shards", "bytes", "runs_done", "runs", "stopped"}``; ``stopped`` is
    "budget" when the budget ended the capture early, else None.
    """
    model = pipe.transformer
    cfgm = model.config
    fam = family_of(cfgm)
    if every < 1:
        raise UserError(f"every must be ≥ 1, got {every}")
    if budget_bytes <= 0:
        raise UserError(f"budget must be positive, got {budget_bytes}")
    if shard_bytes <= 0:
        raise UserError(f"shard size must be positive, got {shard_bytes}")
    if in_out_only and layers is not None:
        raise UserError("give layers or in_out_only, not both")
    sel = [] if in_out_only else resolve_layers(cfgm, layers)
    blocks = residual_blocks(model)
    missing = [L for L in sel if L not in blocks]
    if missing:
        raise UserError(f"layer {missing[0]} has no block to capture")
    store_dtype = store_dtype or next(model.parameters()).dtype
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
    v1 = fam.NAME == V1_FAMILY
    header = {
        "schema": SCHEMA, "version": 1 if v1 else VERSION, "rflow": __version__, "family": fam.NAME,
        "model": {"name": pipe.name, "fingerprint": pipe.fingerprint, "config": cfgm.to_dict()},
        "layers": sel, "blocks": {str(L): blocks[L] for L in sel},
        "layer_kinds": {str(L): layer_kind(cfgm, L) for L in sel}, "in_out_only": bool(in_out_only),
        "every": every, "dtype": str(store_dtype).removeprefix("torch."),
        "sampling": {"guidance": guidance, "cfg": cfg, "solver": solver}, "workload": workload.describe(),
        "budget_bytes": int(budget_bytes), "calls": [],
    }
    with replacing(out, "dir") as tmp:
        res = _capture_into(tmp, pipe, runs, header, {L: blocks[L] for L in sel}, in_out_only, every, store_dtype,
                            int(budget_bytes), int(shard_bytes), guidance, cfg, solver, progress, v1)
        if res["records"] == 0:
            raise UserError(f"the budget ({format_bytes(budget_bytes)}) is too small for even one record; "
                            "nothing was captured")
    return {"dir": str(out), **res}


def _capture_into(out: Path, pipe, runs, header, blocks, in_out_only, every, store_dtype, budget_bytes, shard_bytes,
                  guidance, cfg, solver, progress, v1) -> dict:
    model = pipe.transformer
    writer = _Writer(out, header, budget_bytes, shard_bytes)
    writer.write_index()

    def latent_hw(h: int, w: int) -> tuple[int, int]:
        shape = pipe.latent_shape(h, w, 1)
        return int(shape[-2]), int(shape[-1])

    rec = _Recorder(model, blocks, in_out_only, every, store_dtype, writer, latent_hw, v1)
    rec.attach()
    done = 0
    try:
        for r in runs:
            rec.start_run(r, [r.prompt], [""])
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
