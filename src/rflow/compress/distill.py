"""Block-wise distillation: retrain a pruned student's blocks to reproduce the teacher's blocks.

For every selected layer whose student block differs from the teacher's (a pruned block has other
shapes; any changed weight counts too), a float32 copy of the student block is trained on captured
TEACHER block inputs (the block's own inputs, ``vec`` and RoPE recomputed from the ids) to produce the
captured TEACHER block outputs: mean squared error over all output tokens and channels (double blocks:
image and text streams together), AdamW, linear warm-up then cosine decay, records split into train
and held-out sets by :meth:`CaptureReader.split` (whole runs held out when there are several).

What is trained (``train``):

* ``"mlp"`` — double blocks: ``img_mlp.0``, ``img_mlp.2``, ``txt_mlp.0``, ``txt_mlp.2`` (weights and
  biases); single blocks: the MLP part of the fused linears, i.e. rows ``3·hidden:`` of ``linear1``
  (weight and bias), columns ``hidden:`` of ``linear2.weight`` and ``linear2.bias``. The single block's
  ``linear1``/``linear2`` are trained whole but masked: after every optimizer step the attention rows
  of ``linear1`` and attention columns of ``linear2.weight`` are put back exactly, so they never change
  (weight decay included). Patches still hold the whole tensors.
* ``"block"`` — every ``nn.Linear`` weight and bias of the block (modulation, qkv, projections, MLPs).

Nothing of ``student`` is modified: the result is ``patches`` — per layer, the trained tensors under
their BFL keys (``double_blocks.3.img_mlp.0.weight``), in the student's dtype — and a report with, per
layer, the held-out MSE before (the pruned student) and after training and the final training loss.
Everything random is drawn from generators seeded by (seed, layer), so a run is deterministic.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import NonFiniteError, UserError
from ..models.flux import Flux
from .capture import CaptureReader, Record, block_name, get_block, layer_io_names, layer_kind, resolve_layers

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


def trainable(block: nn.Module, kind: str, mode: str) -> dict[str, tuple[nn.Parameter, Tensor | None]]:
    """Parameter name (within the block) -> (parameter, mask of entries that stay fixed or None)."""
    if mode not in TRAIN_MODES:
        raise UserError(f"unknown train mode {mode!r}; choose mlp or block")
    params = dict(block.named_parameters())
    if mode == "block":
        names = [f"{n}.{p}" for n, m in block.named_modules() if isinstance(m, nn.Linear) for p in ("weight", "bias")
                 if getattr(m, p, None) is not None]
        return {n: (params[n], None) for n in names}
    if kind == "double":
        return {f"{s}_mlp.{i}.{p}": (params[f"{s}_mlp.{i}.{p}"], None)
                for s in ("img", "txt") for i in (0, 2) for p in ("weight", "bias")}
    h = block.hidden_size
    w1, b1, w2, b2 = (params[n] for n in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"))
    m1 = torch.zeros(w1.shape, dtype=torch.bool, device=w1.device)
    m1[: 3 * h] = True
    mb1 = torch.zeros(b1.shape, dtype=torch.bool, device=b1.device)
    mb1[: 3 * h] = True
    m2 = torch.zeros(w2.shape, dtype=torch.bool, device=w2.device)
    m2[:, :h] = True
    return {"linear1.weight": (w1, m1), "linear1.bias": (b1, mb1), "linear2.weight": (w2, m2), "linear2.bias": (b2, None)}


class _Data:
    """A layer's captured (inputs, vec, pe, outputs) per record, cached in memory when small enough."""

    def __init__(self, reader: CaptureReader, layer: int, embedder: nn.Module, records: list[Record], cache: bool):
        self.reader, self.layer, self.embedder = reader, layer, embedder
        self.ins, self.outs = layer_io_names(reader.config, layer)
        self.cache: dict[int, tuple] | None = {} if cache else None

    def get(self, rec: Record) -> tuple:
        if self.cache is not None and rec.index in self.cache:
            return self.cache[rec.index]
        d = self.reader.layer_tensors(rec, self.layer)
        item = (tuple(d[n] for n in self.ins), d["vec"], self.reader.pe(rec, self.embedder), tuple(d[n] for n in self.outs))
        if self.cache is not None:
            self.cache[rec.index] = item
        return item

    def batches(self, recs: list[Record], device) -> list[tuple[tuple, Tensor, Tensor, tuple]]:
        """Records grouped by token layout and stacked: [(inputs, vec, pe, outputs)] in float32 on ``device``."""
        groups: dict[tuple, list[tuple]] = {}
        for r in recs:
            item = self.get(r)
            key = (tuple(t.shape for t in item[0]), tuple(item[2].shape), item[2].data_ptr())
            groups.setdefault(key, []).append(item)
        out = []
        for items in groups.values():
            def stack(ts):
                return torch.stack(list(ts)).to(device=device, dtype=torch.float32)

            ins = tuple(stack(i[0][j] for i in items) for j in range(len(self.ins)))
            outs = tuple(stack(i[3][j] for i in items) for j in range(len(self.outs)))
            out.append((ins, stack(i[1] for i in items), items[0][2].to(device), outs))
        return out


def _sq_err(block: nn.Module, batch) -> tuple[Tensor, int]:
    ins, vec, pe, outs = batch
    got = block(*ins, vec, pe)
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


def distill(teacher: Flux, student: Flux, reader: CaptureReader, *, layers=None, train: str = "mlp", steps: int = 200,
            lr: float = 1e-3, batch: int = 8, holdout: float = 0.2, seed: int = 0, weight_decay: float = 0.0,
            warmup: int | None = None, grad_clip: float = 1.0, device=None, cache_bytes: int = CACHE_BYTES,
            progress: Callable[[dict], None] | None = None) -> tuple[dict[int, dict[str, Tensor]], list[dict]]:
    """Train the student's differing blocks on the capture; returns ``(patches, report)``.

    ``patches``: layer -> {BFL key: trained tensor (student dtype, CPU)}. ``report``: one dict per
    trained layer with ``initial_heldout_mse`` (pruned student), ``final_heldout_mse``,
    ``final_train_loss`` (mean of the last tenth of steps), ``initial_train_mse``, widths and counts.
    ``layers``: restrict to these (list or "0-3,7"; default every captured layer). ``progress(dict)``
    is called after every step with layer, step, steps, loss, lr.
    """
    if train not in TRAIN_MODES:
        raise UserError(f"unknown train mode {train!r}; choose mlp or block")
    if steps < 1 or batch < 1 or lr <= 0:
        raise UserError("steps and batch must be ≥ 1 and lr > 0")
    if not 0.0 < holdout < 1.0:
        raise UserError(f"holdout must be in (0, 1), got {holdout}")
    tc, sc = teacher.config, student.config
    if tc.to_dict() != reader.config.to_dict():
        raise UserError(f"{reader.path}: the capture was made with another model than this teacher "
                        "(configs differ)")
    if (sc.hidden_size, sc.num_heads, sc.depth, sc.depth_single, sc.guidance_embed) != (
            tc.hidden_size, tc.num_heads, tc.depth, tc.depth_single, tc.guidance_embed):
        raise UserError("the student is not a pruned teacher: hidden size, heads or depths differ")
    if reader.in_out_only:
        raise UserError(f"{reader.path}: capture holds model inputs/outputs only; capture per-layer tensors to distill")
    wanted = resolve_layers(tc, layers)
    missing = [L for L in wanted if L not in reader.layers] if layers is not None else []
    if missing:
        raise UserError(f"{reader.path}: layer {missing[0]} was not captured")
    todo = [L for L in wanted if L in reader.layers and block_differs(get_block(teacher, L), get_block(student, L))]
    if not todo:
        raise UserError("no selected layer of the student differs from the teacher: nothing to distill")
    train_recs, held_recs = reader.split(holdout, seed)
    if not held_recs or not train_recs:
        raise UserError(f"{reader.path}: {len(reader)} record(s) are too few for a train/held-out split")
    device = torch.device(device) if device is not None else student.device
    warmup = min(max(1, steps // 20), 100) if warmup is None else warmup

    patches: dict[int, dict[str, Tensor]] = {}
    report: list[dict] = []
    for L in todo:
        t0 = time.perf_counter()
        kind = layer_kind(tc, L)
        src = get_block(student, L)
        block = copy.deepcopy(src).to(device=device, dtype=torch.float32)
        block.requires_grad_(False)
        params = trainable(block, kind, train)
        fixed = {n: p.detach()[m].clone() for n, (p, m) in params.items() if m is not None}
        for p, m in params.values():
            p.requires_grad_(True)
            if m is not None:  # fixed entries get no gradient: Adam moments and clipping see only the MLP part
                p.register_hook(lambda grad, m=m: grad.masked_fill(m, 0.0))
        per_record = _record_bytes(reader, train_recs[0], L)
        data = _Data(reader, L, teacher.pe_embedder, train_recs + held_recs,
                     cache=per_record * len(reader) <= cache_bytes)
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
        prefix = block_name(tc, L)
        patches[L] = {f"{prefix}.{n}": p.detach().to("cpu", student.dtype).clone() for n, (p, _) in params.items()}
        tail = losses[-max(1, steps // 10):]
        report.append({
            "layer": L, "block": prefix, "kind": kind, "train": train,
            "teacher_mlp": _widths(tc, L), "student_mlp": _widths(sc, L),
            "params": int(sum(p.numel() for p, _ in params.values())), "steps": steps, "lr": lr, "batch": batch,
            "train_records": len(train_recs), "heldout_records": len(held_recs),
            "initial_heldout_mse": initial_held, "final_heldout_mse": final_held,
            "initial_train_mse": initial_train, "final_train_loss": sum(tail) / len(tail),
            "seconds": round(time.perf_counter() - t0, 3),
        })
        del data, opt, block
    return patches, report


def _widths(config, layer: int):
    if layer_kind(config, layer) == "double":
        return list(config.double_mlp[layer])
    return config.single_mlp[layer - config.depth]


def _record_bytes(reader: CaptureReader, rec: Record, layer: int) -> int:
    d = reader.layer_tensors(rec, layer)
    return sum(t.numel() * t.element_size() for t in d.values()) * 2  # stored tensors, and float32 copies
