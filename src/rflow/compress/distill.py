"""Block-wise distillation: retrain a pruned student's blocks to reproduce the teacher's blocks, any family.

For every selected layer whose student block differs from the teacher's (a pruned block has other
shapes; any changed weight counts too), a float32 copy of the student block is trained on captured
TEACHER block inputs (the block's own streams and context, as the capture's call structure rebuilds
them) to produce the captured TEACHER block outputs: mean squared error over all output tokens and
channels (FLUX double blocks: image and text streams together), AdamW, linear warm-up then cosine
decay, records split into train and held-out sets by :meth:`CaptureReader.split` (whole runs held out
when there are several).

What is trained (``train``):

* ``"mlp"`` — the block's MLPs as the family's layer list describes their units
  (:class:`~rflow.families.base.LayerRef` ``slices``): every weight slice that follows a hidden unit
  (FLUX.1: ``img_mlp.0`` rows, ``img_mlp.2`` columns; FLUX.2 / Z-Image: the SwiGLU gate, up and down
  projections) plus the bias of each down projection (it adds to the MLP's output). Where a tensor is
  shared with other parts of the block — FLUX's single blocks fuse the attention into ``linear1`` /
  ``linear2`` — it is trained whole but masked: after every optimizer step the entries outside the
  unit slices are put back exactly, so they never change (weight decay included), and they get no
  gradient. Patches still hold the whole tensors.
* ``"block"`` — every ``nn.Linear`` weight and bias of the block (modulation, qkv, projections, MLPs).

Nothing of ``student`` is modified: the result is ``patches`` — per layer, the trained tensors under
their qualified names (the family's original checkpoint keys: ``double_blocks.3.img_mlp.0.weight``,
``layers.7.feed_forward.w1.weight``), in the student's dtype — and a report with, per layer, the
held-out MSE before (the pruned student) and after training and the final training loss. Everything
random is drawn from generators seeded by (seed, layer), so a run is deterministic.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import NonFiniteError, UserError
from .capture import CaptureReader, Record, layer_kind, residual_blocks, resolve_layers
from .capture_reader import collate, group_batches
from .units import family_of, layer_refs

TRAIN_MODES = ("mlp", "block")
CACHE_BYTES = 4 * 1024**3


def block_differs(teacher: nn.Module, student: nn.Module) -> bool:
    """True if the blocks differ in structure (pruned) or in any weight."""
    ts, ss = teacher.state_dict(), student.state_dict()
    if ts.keys() != ss.keys():
        return True
    for k, t in ts.items():
        s = ss[k]
        if t.shape != s.shape:
            return True
        if t.device.type != "meta" and s.device.type != "meta" and not torch.equal(t, s.to(t.device, t.dtype)):
            return True
    return False


def trainable(block: nn.Module, prefix: str, refs, mode: str) -> dict[str, tuple[nn.Parameter, Tensor | None]]:
    """Qualified parameter name -> (parameter of ``block``, mask of entries that stay fixed, or None).
    ``prefix``: the block's qualified name; ``refs``: the student's unit groups inside the block."""
    if mode not in TRAIN_MODES:
        raise UserError(f"unknown train mode {mode!r}; choose mlp or block")
    params = {f"{prefix}.{n}": p for n, p in block.named_parameters()}
    if mode == "block":
        names = [f"{prefix}.{n}.{p}" if n else f"{prefix}.{p}" for n, m in block.named_modules()
                 if isinstance(m, nn.Linear) for p in ("weight", "bias") if getattr(m, p, None) is not None]
        return {n: (params[n], None) for n in names}
    free: dict[str, Tensor] = {}  # trainable entries
    for ref in refs:
        for sl in ref.slices:
            p = params.get(sl.param)
            if p is None:
                raise UserError(f"unit group {ref.name}: {sl.param} is not a parameter of block {prefix}")
            mask = free.setdefault(sl.param, torch.zeros(p.shape, dtype=torch.bool, device=p.device))
            index = [slice(None)] * p.ndim
            index[sl.axis] = slice(sl.offset, sl.offset + ref.units)
            mask[tuple(index)] = True
            if sl.axis == 1:  # a down projection: its bias is part of the MLP's output
                owner, _, _ = sl.param.rpartition(".")
                if f"{owner}.bias" in params:
                    free.setdefault(f"{owner}.bias", torch.ones(params[f"{owner}.bias"].shape, dtype=torch.bool))
    return {n: (params[n], None if bool(m.all()) else ~m.to(params[n].device)) for n, m in free.items()}


class _Data:
    """A layer's captured (arguments, outputs) per record, cached in memory when small enough.
    ``embedder``: the model's ``pe_embedder``, needed for version-1 captures only."""

    def __init__(self, reader: CaptureReader, layer: int, embedder: nn.Module | None, records: list[Record], cache: bool):
        self.reader, self.layer, self.embedder = reader, layer, embedder
        self.cache: dict[int, tuple] | None = {} if cache else None

    def get(self, rec: Record) -> tuple:
        if self.cache is not None and rec.index in self.cache:
            return self.cache[rec.index]
        item = self.reader.block_tree(rec, self.layer, self.embedder)
        if self.cache is not None:
            self.cache[rec.index] = item
        return item

    def batches(self, recs: list[Record], device) -> list[tuple[tuple, tuple]]:
        """Records grouped by layout and stacked: [(arguments, outputs)] in float32 on ``device``."""
        out = []
        for group in group_batches([self.get(r) for r in recs], len(recs) or 1, key=lambda it: it[0]):
            args = tuple(collate([it[0][j] for it in group], device, torch.float32) for j in range(len(group[0][0])))
            outs = tuple(collate([it[1][j] for it in group], device, torch.float32) for j in range(len(group[0][1])))
            out.append((args, outs))
        return out


def _sq_err(block: nn.Module, batch) -> tuple[Tensor, int]:
    args, outs = batch
    got = block(*args)
    got = got if isinstance(got, tuple) else (got,)
    err = sum(((g.float() - o) ** 2).sum() for g, o in zip(got, outs))
    return err, sum(o.numel() for o in outs)


@torch.no_grad()
def _mse(block: nn.Module, data: _Data, recs: list[Record], batch: int, device) -> float:
    if not recs:
        return float("nan")
    total, n = 0.0, 0
    for i in range(0, len(recs), batch):
        for b in data.batches(recs[i : i + batch], device):
            e, k = _sq_err(block, b)
            total, n = total + float(e), n + k
    return total / n


def _lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _architecture(config) -> dict:
    """A config without its per-block MLP widths (every family keeps them in fields ending in ``_mlp``)."""
    return {k: v for k, v in config.to_dict().items() if not k.endswith("_mlp")}


def distill(teacher: nn.Module, student: nn.Module, reader: CaptureReader, *, layers=None, train: str = "mlp",
            steps: int = 200, lr: float = 1e-3, batch: int = 8, holdout: float = 0.2, seed: int = 0,
            weight_decay: float = 0.0, warmup: int | None = None, grad_clip: float = 1.0, device=None,
            cache_bytes: int = CACHE_BYTES, progress: Callable[[dict], None] | None = None,
            ) -> tuple[dict[int, dict[str, Tensor]], list[dict]]:
    """Train the student's differing blocks on the capture; returns ``(patches, report)``.

    ``teacher`` / ``student``: transformers of one family (the student a pruned teacher). ``patches``:
    layer -> {qualified key: trained tensor (student dtype, CPU)}. ``report``: one dict per trained layer
    with ``initial_heldout_mse`` (pruned student), ``final_heldout_mse``, ``final_train_loss`` (mean of
    the last tenth of steps), ``initial_train_mse``, widths and counts. ``layers``: restrict to these
    (list or "0-3,7"; default every captured layer). ``progress(dict)`` is called after every step with
    layer, step, steps, loss, lr.
    """
    if train not in TRAIN_MODES:
        raise UserError(f"unknown train mode {train!r}; choose mlp or block")
    if steps < 1 or batch < 1 or lr <= 0:
        raise UserError("steps and batch must be ≥ 1 and lr > 0")
    if not 0.0 < holdout < 1.0:
        raise UserError(f"holdout must be in (0, 1), got {holdout}")
    tc, sc = teacher.config, student.config
    tf, sf = family_of(tc), family_of(sc)
    if tf.NAME != reader.family or tc.to_dict() != reader.config.to_dict():
        raise UserError(f"{reader.path}: the capture was made with another model than this teacher "
                        "(configs differ)")
    if sf is not tf or _architecture(sc) != _architecture(tc):
        raise UserError("the student is not a pruned teacher: its family or architecture (beyond MLP widths) differs")
    if reader.in_out_only:
        raise UserError(f"{reader.path}: capture holds model inputs/outputs only; capture per-layer tensors to distill")
    wanted = resolve_layers(tc, layers)
    missing = [L for L in wanted if L not in reader.layers] if layers is not None else []
    if missing:
        raise UserError(f"{reader.path}: layer {missing[0]} was not captured")
    t_blocks, s_blocks = residual_blocks(teacher), residual_blocks(student)
    if t_blocks != s_blocks:
        raise UserError("the student is not a pruned teacher: its blocks differ")
    todo = [L for L in wanted if L in reader.layers and L in s_blocks
            and block_differs(teacher.get_submodule(t_blocks[L]), student.get_submodule(s_blocks[L]))]
    if not todo:
        raise UserError("no selected layer of the student differs from the teacher: nothing to distill")
    train_recs, held_recs = reader.split(holdout, seed)
    if not held_recs or not train_recs:
        raise UserError(f"{reader.path}: {len(reader)} record(s) are too few for a train/held-out split")
    device = torch.device(device) if device is not None else next(student.parameters()).device
    warmup = min(max(1, steps // 20), 100) if warmup is None else warmup
    embedder = getattr(teacher, "pe_embedder", None)  # version-1 captures recompute RoPE with it
    student_dtype = next(student.parameters()).dtype
    t_refs, s_refs = layer_refs(teacher), layer_refs(student)

    patches: dict[int, dict[str, Tensor]] = {}
    report: list[dict] = []
    for L in todo:
        t0 = time.perf_counter()
        prefix = s_blocks[L]
        refs = [r for r in s_refs if r.layer == L]
        block = copy.deepcopy(student.get_submodule(prefix)).to(device=device, dtype=torch.float32)
        block.requires_grad_(False)
        params = trainable(block, prefix, refs, train)
        fixed = {n: p.detach()[m].clone() for n, (p, m) in params.items() if m is not None}
        for p, m in params.values():
            p.requires_grad_(True)
            if m is not None:  # fixed entries get no gradient: Adam moments and clipping see only the MLP part
                p.register_hook(lambda grad, m=m: grad.masked_fill(m, 0.0))
        per_record = _record_bytes(reader, train_recs[0], L)
        data = _Data(reader, L, embedder, train_recs + held_recs, cache=per_record * len(reader) <= cache_bytes)
        initial_held = _mse(block, data, held_recs, batch, device)
        initial_train = _mse(block, data, train_recs, batch, device)
        if not (math.isfinite(initial_held) and math.isfinite(initial_train)):
            raise NonFiniteError(f"layer {L}: the student's block or the captured tensors give NaN/inf")
        opt = torch.optim.AdamW([p for p, _ in params.values()], lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
        g = torch.Generator().manual_seed((seed * 1_000_003 + L) % (2**63))
        order: list[int] = []
        losses = []
        block.train()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr(step, steps, lr, warmup)
            chosen = []
            while len(chosen) < min(batch, len(train_recs)):
                if not order:
                    order = torch.randperm(len(train_recs), generator=g).tolist()
                chosen.append(train_recs[order.pop()])
            opt.zero_grad(set_to_none=True)
            err, n = 0.0, 0
            for b in data.batches(chosen, device):
                e, k = _sq_err(block, b)
                err, n = err + e, n + k
            loss = err / n
            if not math.isfinite(loss.item()):
                raise NonFiniteError(f"layer {L}: the distillation loss became NaN/inf at step {step + 1}; "
                                     "nothing was written (try a lower --lr)")
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p, _ in params.values()], grad_clip)
            opt.step()
            with torch.no_grad():
                for name, (p, m) in params.items():
                    if m is not None:
                        p[m] = fixed[name]
            losses.append(loss.item())
            if progress is not None:
                progress({"layer": L, "step": step + 1, "steps": steps, "loss": losses[-1], "lr": opt.param_groups[0]["lr"]})
        block.eval()
        final_held = _mse(block, data, held_recs, batch, device)
        if not math.isfinite(final_held):
            raise NonFiniteError(f"layer {L}: the trained block gives NaN/inf on held-out records; nothing was written")
        patches[L] = {n: p.detach().to("cpu", student_dtype).clone() for n, (p, _) in params.items()}
        tail = losses[-max(1, steps // 10):]
        report.append({
            "layer": L, "block": prefix, "kind": layer_kind(sc, L), "train": train,
            "teacher_mlp": _widths(t_refs, L), "student_mlp": _widths(s_refs, L),
            "params": int(sum(p.numel() for p, _ in params.values())), "steps": steps, "lr": lr, "batch": batch,
            "train_records": len(train_recs), "heldout_records": len(held_recs),
            "initial_heldout_mse": initial_held, "final_heldout_mse": final_held,
            "initial_train_mse": initial_train, "final_train_loss": sum(tail) / len(tail),
            "seconds": round(time.perf_counter() - t0, 3),
        })
        del data, opt, block
    return patches, report


def _widths(refs, layer: int):
    """A layer's MLP widths: one int for one unit group, a list for several (FLUX double blocks: img, txt)."""
    w = [r.units for r in refs if r.layer == layer]
    return w[0] if len(w) == 1 else w


def _record_bytes(reader: CaptureReader, rec: Record, layer: int) -> int:
    d = reader.layer_tensors(rec, layer)
    return sum(t.numel() * t.element_size() for t in d.values()) * 2  # stored tensors, and float32 copies
