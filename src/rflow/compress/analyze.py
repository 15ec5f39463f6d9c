"""``rflow analyze``: how often each MLP hidden unit fires while the model samples a workload.

Forward hooks on every unit group's activation module (the post-GELU output, see
:func:`~rflow.compress.units.activation_module`) count, per hidden unit, the positions (token ×
sampling step) where the activation was > 0, and add up Σ|a| and Σa². Every token the MLP processes
counts: image tokens for ``double_blocks.{i}.img``, text tokens for ``double_blocks.{i}.txt``, text
and image tokens for ``single_blocks.{i}``; with true CFG (``cfg > 1``) the negative pass counts too.
Accumulators live on the model's device in int64 / float64 and are updated chunk by chunk, so no
intermediate larger than :data:`CHUNK_ELEMENTS` values is made (FLUX.1-dev at 1024² has 4096 image
tokens × 12288 units per layer).

Multi-process: under ``torchrun`` (``torch.distributed`` initialised) :func:`analyze_distributed`
gives each rank ``workload.shard(rank, world)`` and all-reduces the integer counts and positions
(exact) and the float64 sums; every rank returns the merged statistics, rank 0 writes them.

Exactness: counts and positions are integers, so ``--append``, ``rflow stats merge`` and multi-process
runs give exactly the single-run numbers. Σ|a| and Σa² are float64 sums of per-run sums (each run is
summed on its own, then added to the total), so they are bit-identical too whenever the additions
happen in the same order — two files merged vs. appended, or one run per rank vs. one process — and
otherwise agree to float64 rounding (relative 1e-16 per addition).
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import torch
from torch import Tensor

from ..errors import UserError
from ..models.flux import Flux
from .stats import ActivationStats
from .units import activation_module, layer_refs, unit_names, unit_widths
from .workload import Run, Workload

# At most this many activation values are converted to float64 at once (32 MiB).
CHUNK_ELEMENTS = 1 << 22
SOLVER = "euler"  # one model evaluation per step (two with true CFG)

Progress = Callable[[int, int, Run], None]


class ActivationCounter:
    """Forward hooks that accumulate firing counts, Σ|a| and Σa² per hidden unit of ``units``.

    A context manager: hooks are attached on entry and removed on exit, also when sampling fails::

        with ActivationCounter(model, units) as counter:
            pipe.generate(...)
        stats = counter.to_stats(pipe.fingerprint)
    """

    def __init__(self, model: Flux, units: list[str] | None = None):
        widths = unit_widths(model.config)
        self.model = model
        self.units = list(units) if units is not None else unit_names(model.config)
        unknown = [u for u in self.units if u not in widths]
        if unknown:
            raise UserError(f"this model has no unit group {unknown[0]!r}")
        if len(set(self.units)) != len(self.units):
            raise UserError("a unit group is listed twice")
        dev = model.device
        self.count = {u: torch.zeros(widths[u], dtype=torch.int64, device=dev) for u in self.units}
        self.sum_abs = {u: torch.zeros(widths[u], dtype=torch.float64, device=dev) for u in self.units}
        self.sum_sq = {u: torch.zeros(widths[u], dtype=torch.float64, device=dev) for u in self.units}
        # Σ|a| and Σa² of the current run, folded into the totals by end_run(): the totals are then sums of
        # per-run sums, so they do not depend on how runs are spread over processes when each has one.
        self._run_abs = {u: torch.zeros_like(t) for u, t in self.sum_abs.items()}
        self._run_sq = {u: torch.zeros_like(t) for u, t in self.sum_sq.items()}
        self.positions = {u: 0 for u in self.units}
        self.handles: list = []

    def __enter__(self) -> "ActivationCounter":
        try:
            for u in self.units:
                self.handles.append(activation_module(self.model, u).register_forward_hook(self._hook(u)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def _hook(self, unit: str):
        def hook(_module, _inputs, output):
            self.observe(unit, output)

        return hook

    @torch.no_grad()
    def observe(self, unit: str, activation: Tensor) -> None:
        """Add one activation tensor (…, tokens, width) of ``unit`` to the accumulators."""
        width = self.count[unit].numel()
        if activation.shape[-1] != width:
            raise RuntimeError(f"{unit}: activation width {activation.shape[-1]} is not the unit width {width}")
        a = activation.detach().reshape(-1, width)
        rows = max(1, CHUNK_ELEMENTS // width)
        count, sum_abs, sum_sq = self.count[unit], self._run_abs[unit], self._run_sq[unit]
        for start in range(0, a.shape[0], rows):
            chunk = a[start : start + rows]
            count += (chunk > 0).sum(0)
            c = chunk.to(torch.float64, copy=True).abs_()  # our own copy: safe to work on in place
            sum_abs += c.sum(0)
            sum_sq += c.square_().sum(0)
        self.positions[unit] += a.shape[0]

    @torch.no_grad()
    def end_run(self) -> None:
        """Fold the current run's sums into the totals (call after each generation)."""
        for u in self.units:
            self.sum_abs[u] += self._run_abs[u]
            self.sum_sq[u] += self._run_sq[u]
            self._run_abs[u].zero_()
            self._run_sq[u].zero_()

    def to_stats(self, fingerprint: str, **meta) -> ActivationStats:
        """The accumulated statistics (the current run included), on the CPU."""
        self.end_run()
        return ActivationStats(fingerprint, {u: t.cpu() for u, t in self.count.items()},
                               {u: t.cpu() for u, t in self.sum_abs.items()},
                               {u: t.cpu() for u, t in self.sum_sq.items()}, dict(self.positions), dict(meta))


def accumulate(total: ActivationStats, other: ActivationStats) -> ActivationStats:
    """``total += other`` (exact for counts and positions) keeping the analysis history of both."""
    history = list(total.meta.get("history", [])) + list(other.meta.get("history", []))
    total.add_(other)
    if history:
        total.meta["history"] = history
    return total


def check_compatible(pipe, stats: ActivationStats, units: list[str] | None) -> list[str]:
    """The unit groups to analyse for appending to ``stats`` (its own when ``units`` is None); raises a
    :class:`UserError` before any sampling when ``stats`` come from another model or other units."""
    if stats.fingerprint != pipe.fingerprint:
        raise UserError(f"statistics are from a different model (fingerprint {stats.fingerprint or '-'}, "
                        f"this model is {pipe.fingerprint or '-'})")
    units = list(stats.units) if units is None else list(units)
    if units != list(stats.units):
        raise UserError(f"statistics cover {len(stats.units)} unit groups, this analysis {len(units)}: "
                        "use the same --layers/--streams to append")
    widths = unit_widths(pipe.transformer.config)
    for u in units:
        if u not in widths or stats.count[u].numel() != widths[u]:
            raise UserError(f"statistics for {u} do not match this model's MLP widths")
    return units


def _check_workload(pipe, workload: Workload, cfg: float) -> None:
    if cfg < 1.0:
        raise UserError(f"cfg must be ≥ 1 (1 disables true CFG), got {cfg}")
    if not workload.prompts:
        raise UserError("the workload has no prompts")
    m = pipe.size_multiple
    for w, h in workload.sizes:
        if w <= 0 or h <= 0 or w % m or h % m:
            raise UserError(f"size {w}x{h} is not a positive multiple of {m} for this model")
    if not workload.steps or min(workload.steps) < 1:
        raise UserError("step counts must be ≥ 1")


def _history_entry(pipe, workload: Workload, guidance: float, cfg: float, n_units: int, world: int) -> dict:
    digest = hashlib.sha256(json.dumps(workload.prompts).encode()).hexdigest()[:16]
    return {"model": pipe.name, **workload.describe(), "prompts_sha256": digest, "guidance": guidance, "cfg": cfg,
            "solver": SOLVER, "unit_groups": n_units, "processes": world}


def _collect(pipe, workload: Workload, units: list[str], guidance: float, cfg: float,
             progress: Progress | None) -> tuple[ActivationCounter, list[Run]]:
    runs = list(workload.my_runs())
    with ActivationCounter(pipe.transformer, units) as counter:
        for k, run in enumerate(runs):
            pipe.generate(run.prompt, width=run.width, height=run.height, steps=run.steps, guidance=guidance,
                          cfg=cfg, seed=run.seed, solver=SOLVER, output_type="latent")
            counter.end_run()
            if progress is not None:
                progress(k + 1, len(runs), run)
    return counter, runs


def _meta(pipe, workload: Workload, runs: list[Run], guidance: float, cfg: float, history: dict) -> dict:
    c = pipe.transformer.config
    return {"model": pipe.name, "prompts": len(runs), "steps": sorted({r.steps for r in runs}),
            "sizes": sorted({f"{r.width}x{r.height}" for r in runs}), "guidance": guidance, "cfg": cfg,
            "source": workload.source, "seed": workload.seed,
        **({"depth": c.depth, "depth_single": c.depth_single} if hasattr(c, "depth_single") else {}),
        "unit_layers": {r.name: [r.layer, r.stream] for r in layer_refs(c)},
            "history": [history]}


def analyze(pipe, workload: Workload, *, units: list[str] | None = None, guidance: float | None = None, cfg: float = 1.0,
            progress: Progress | None = None, stats: ActivationStats | None = None) -> ActivationStats:
    """Sample every run of ``workload`` (this process's share: ``workload.my_runs()``) and count, per
    hidden unit of ``units`` (default: all unit groups, or those of ``stats``), the positions where
    it fired, with Σ|a| and Σa².

    ``stats``: existing statistics of the same model to add to (``--append``); they are checked before
    sampling and returned, summed. ``progress(done, total, run)`` is called after each run.
    """
    if stats is not None:
        units = check_compatible(pipe, stats, units)
    _check_workload(pipe, workload, cfg)
    units = list(units) if units is not None else unit_names(pipe.transformer.config)
    counter, runs = _collect(pipe, workload, units, guidance, cfg, progress)
    entry = _history_entry(pipe, workload, guidance, cfg, len(units), 1)
    result = counter.to_stats(pipe.fingerprint, **_meta(pipe, workload, runs, guidance, cfg, entry))
    return accumulate(stats, result) if stats is not None else result


def analyze_distributed(pipe, workload: Workload, *, units: list[str] | None = None, guidance: float | None = None,
                        cfg: float = 1.0, progress: Progress | None = None, stats: ActivationStats | None = None,
                        group=None) -> ActivationStats:
    """:func:`analyze` across the processes of an initialised ``torch.distributed`` group (falls back to
    :func:`analyze` without one): each rank samples ``workload.shard(rank, world)``, then counts, sums
    and positions are all-reduced (SUM). Every rank returns the merged statistics; let rank 0 save them.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return analyze(pipe, workload, units=units, guidance=guidance, cfg=cfg, progress=progress, stats=stats)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if stats is not None:
        units = check_compatible(pipe, stats, units)
    _check_workload(pipe, workload, cfg)
    units = list(units) if units is not None else unit_names(pipe.transformer.config)
    counter, runs = _collect(pipe, workload.shard(rank, world), units, guidance, cfg, progress)
    counter.end_run()

    # Two flat buffers: int64 (counts, then positions) and float64 (Σ|a|, then Σa²).
    dev = pipe.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    ints = torch.cat([counter.count[u].to(dev) for u in units]
                     + [torch.tensor([counter.positions[u] for u in units], dtype=torch.int64, device=dev)])
    floats = torch.cat([counter.sum_abs[u].to(dev) for u in units] + [counter.sum_sq[u].to(dev) for u in units])
    dist.all_reduce(ints, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(floats, op=dist.ReduceOp.SUM, group=group)
    seen = [None] * world
    dist.all_gather_object(seen, (len(runs), sorted({r.steps for r in runs}),
                                  sorted({f"{r.width}x{r.height}" for r in runs})), group=group)

    ints, floats = ints.cpu(), floats.cpu()
    widths = [counter.count[u].numel() for u in units]
    total = sum(widths)
    count = dict(zip(units, ints[:total].split(widths)))
    positions = {u: int(p) for u, p in zip(units, ints[total:].tolist())}
    sum_abs = dict(zip(units, floats[:total].split(widths)))
    sum_sq = dict(zip(units, floats[total:].split(widths)))
    entry = _history_entry(pipe, workload, guidance, cfg, len(units), world)
    meta = _meta(pipe, workload, [], guidance, cfg, entry)
    meta["prompts"] = sum(s[0] for s in seen)
    meta["steps"] = sorted({v for s in seen for v in s[1]})
    meta["sizes"] = sorted({v for s in seen for v in s[2]})
    result = ActivationStats(pipe.fingerprint, {u: t.clone() for u, t in count.items()},
                             {u: t.clone() for u, t in sum_abs.items()}, {u: t.clone() for u, t in sum_sq.items()},
                             positions, meta)
    return accumulate(stats, result) if stats is not None else result
