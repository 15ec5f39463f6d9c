"""The memory-budget planner behind ``rflow plan``: one quantization format per unit of a transformer,
chosen to minimise the predicted full-stack error within a byte budget.

1. **Units.** The eligible linear layers (:func:`rflow.quant.api.linear_layers`) are grouped by
   :func:`group_units` — per transformer block by default (:func:`block_of`: every layer under
   ``double_blocks.{i}.``, ``single_blocks.{i}.``, ``layers.{i}.`` … is one unit), or one unit per layer.
2. **Measurements.** The reference's sampling trajectories are recorded once
   (:func:`rflow.compress.measure.reference_trajectories`); then, for every (unit, option), only that
   unit's layers are quantized to that option (:func:`quantized`: the layers are swapped for quantized
   copies and put back afterwards, the original modules untouched) and the transformer is run on every
   trajectory point (:func:`rflow.compress.measure.velocity_errors`). The unit's *error* for the option is
   that velocity MSE against the unquantized model; its *bytes* are the packed weight bytes of its
   layers (:func:`option_bytes`; "bf16" — keep — counts 2 bytes a weight and has error 0 by definition).
   An option whose block size does not divide one of the unit's input widths (GGUF types: 32 or 256) is
   infeasible for that unit and left out (the result says so, per unit).
3. **Additivity assumption.** The error of a plan is predicted as the *sum* of its units' errors. That
   is exact to first order for independent, uncorrelated perturbations of the velocity (the squared
   errors add; the cross terms average out) and is only a model beyond that: the actual error of the
   planned model is measured too and reported next to the prediction.
4. **Choice** (:func:`solve`): a multiple-choice knapsack — one option per unit, Σ bytes ≤ budget,
   minimise Σ error — solved by dynamic programming over bytes. Each unit's bytes are counted above
   its cheapest option (offsets ``o = bytes − min bytes``), in cells of ``g`` bytes, each offset rounded
   *up* to whole cells; the capacity is ``⌊(budget − Σ min bytes) / g⌋`` cells.

   *Exactness.* ``g`` is the gcd of all offsets when that keeps the table within ``max_cells`` cells —
   then no rounding happens and the plan is an exact optimum: no selection of bytes ≤ budget has a
   smaller predicted error. Otherwise ``g = ⌈Σ max offset / max_cells⌉``; the plan still has bytes ≤
   budget (offsets are rounded up), and its predicted error is at most that of the best selection of
   bytes ≤ budget − n·(g − 1) (n units), reported as ``slack_bytes``. ``g`` depends only on the options,
   never on the budget, so a larger budget never gives a higher predicted error. Ties go to the
   cheaper option.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import reduce
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import NonFiniteError, UserError
from .plan_options import (KEEP_LABEL, infeasible_reason, normalize_option, option_bytes, option_entry,  # noqa: F401 (re-exported)
                           planned_model, quantized, split_option)

DEFAULT_OPTIONS = "bf16,fp8,int8,Q8_0,Q6_K,Q5_1,Q4_1,Q4_K,Q3_K"
PLAN_VERSION = 1
ERROR_METRIC = "velocity_mse"


# ---------------------------------------------------------------------------------------------- inputs


def parse_options(spec: str) -> list[str]:
    """``"bf16,fp8,Q8_0,prune25,prune50+Q8_0"`` -> the options as the planner names them ("bf16" = keep;
    :func:`rflow.quant.plan_options.normalize_option`), duplicates dropped."""
    out: list[str] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        label = normalize_option(part)
        if label not in out:
            out.append(label)
    if not out:
        raise UserError("--options names no format; e.g. bf16,int8,Q8_0,Q4_K")
    return out


def check_budget_spec(text: str) -> None:
    """Check a ``--budget`` (a size such as ``12GiB`` / ``500MB``, or a share such as ``40%``) before any work."""
    parse_budget(text, 1)


def parse_budget(text: str, bf16_bytes: int) -> int:
    """``--budget`` in bytes: a size (``12GiB``, ``500MB``, ``4096``), or a percentage of ``bf16_bytes`` (the
    eligible layers' weights in bf16)."""
    from ..compress.capture import parse_bytes

    s = str(text).strip()
    if s.endswith("%"):
        try:
            share = float(s[:-1])
        except ValueError:
            raise UserError(f"bad budget {text!r}: use a size such as 12GiB or 500MB, or a share such as 40%") from None
        if not math.isfinite(share) or share <= 0:
            raise UserError(f"bad budget {text!r}: a share must be a positive percentage")
        return max(1, int(bf16_bytes * share / 100))
    try:
        return parse_bytes(s)
    except UserError:
        raise UserError(f"bad budget {text!r}: use a size such as 12GiB or 500MB, or a share such as 40%") from None


# ---------------------------------------------------------------------------------------------- units


_BLOCK = re.compile(r"^((?:[^.]+\.)*?[^.]+\.\d+)\.")


def block_of(layer: str) -> str:
    """The transformer block a layer belongs to: the shortest prefix of its name that ends in an index
    (``double_blocks.3.img_attn.qkv`` -> ``double_blocks.3``, ``layers.7.feed_forward.w1`` -> ``layers.7``);
    a layer under no indexed container is its own block."""
    m = _BLOCK.match(layer)
    return m.group(1) if m else layer


def group_units(layers: list[str], by: str = "block") -> dict[str, list[str]]:
    """Units of the planner: ``by="block"`` groups the layers by :func:`block_of` (model order kept),
    ``by="layer"`` makes every layer its own unit."""
    if by not in ("block", "layer"):
        raise UserError(f"unknown unit grouping {by!r}; choose block or layer")
    units: dict[str, list[str]] = {}
    for name in layers:
        units.setdefault(block_of(name) if by == "block" else name, []).append(name)
    return units


# ---------------------------------------------------------------------------------------------- solver


@dataclass
class Solution:
    choice: list[int]  # per unit, the index of its chosen option
    error: float  # Σ chosen errors (the predicted error)
    bytes: int  # Σ chosen bytes (true, not rounded)
    granularity: int  # g: bytes per DP cell
    exact: bool  # no rounding happened: an exact optimum
    slack_bytes: int  # optimal at least for the budget minus this (0 when exact)
    min_bytes: int  # the smallest plan's bytes


def default_max_cells(n_units: int) -> int:
    return int(min(4_000_000, max(10_000, 60_000_000 // max(1, n_units))))


def solve(costs: list[list[int]], errors: list[list[float]], budget: int, *, max_cells: int | None = None) -> Solution:
    """One option per unit (``costs[i][j]`` bytes, ``errors[i][j]`` error of unit i's option j) with
    Σ bytes ≤ ``budget`` and the least Σ error: the DP of the module docstring, with its exactness
    statement. A budget below the smallest plan is a :class:`~rflow.errors.UserError` naming it."""
    from ..memory import format_bytes

    n = len(costs)
    if n != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("every unit needs as many errors as costs, and at least one option")
    mins = [min(c) for c in costs]
    base = sum(mins)
    if budget < base:
        raise UserError(f"budget {format_bytes(budget)} ({budget} bytes) is below the smallest plan these options "
                        f"allow: {format_bytes(base)} ({base} bytes)")
    offs = [[int(c) - m for c in cs] for cs, m in zip(costs, mins)]
    span = sum(max(o) for o in offs)
    cells_max = max_cells or default_max_cells(n)
    gcd = reduce(math.gcd, (o for os_ in offs for o in os_), 0)
    if span == 0:
        g = 1
    elif span // gcd <= cells_max:
        g = gcd
    else:
        g = -(-span // cells_max)
    exact = all(o % g == 0 for os_ in offs for o in os_)
    w = [[-(-o // g) for o in os_] for os_ in offs]
    K = min((budget - base) // g, sum(max(x) for x in w))
    dp = np.zeros(K + 1)  # dp[k]: least error of the units so far within k cells
    choice = np.zeros((n, K + 1), dtype=np.int16 if max(len(c) for c in costs) < 2**15 else np.int32)
    for i in range(n):
        order = sorted(range(len(costs[i])), key=lambda j: (costs[i][j], errors[i][j]))  # ties -> cheaper
        new = np.full(K + 1, np.inf)
        arg = np.zeros(K + 1, dtype=choice.dtype)
        for j in order:
            wj = w[i][j]
            if wj > K:
                continue
            cand = np.full(K + 1, np.inf)
            cand[wj:] = dp[: K + 1 - wj] + float(errors[i][j])
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        choice[i] = arg
    picked, k = [0] * n, K
    for i in range(n - 1, -1, -1):
        j = int(choice[i, k])
        picked[i] = j
        k -= w[i][j]
    err = float(sum(errors[i][j] for i, j in enumerate(picked)))
    nbytes = int(sum(costs[i][j] for i, j in enumerate(picked)))
    return Solution(picked, err, nbytes, g, exact, 0 if exact else n * (g - 1), base)


# ---------------------------------------------------------------------------------------------- planning


def unit_table(model: nn.Module, options: list[str], by: str = "block") -> list[dict]:
    """Per unit: its layers, weights, and for each option its bytes and the formats it puts on the layers
    (errors not yet measured), or why it is infeasible. No model call."""
    from .api import linear_layers

    rows = []
    for unit, layers in group_units(linear_layers(model), by).items():
        shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in layers}
        opts, bad = [], []
        for opt in options:
            entry = option_entry(model, unit, layers, opt, by)
            (bad if "reason" in entry else opts).append(entry)
        rows.append({"unit": unit, "layers": layers, "weights": sum(a * b for a, b in shapes.values()),
                     "bf16_bytes": sum(option_bytes(s, KEEP_LABEL) for s in shapes.values()),
                     "options": opts, "infeasible": bad})
    if not rows:
        raise UserError("this model has no linear layer that can be quantized")
    empty = next((r for r in rows if not r["options"]), None)
    if empty is not None:
        raise UserError(f"unit {empty['unit']}: none of the options fits it ({empty['infeasible'][0]['reason']}); "
                        "add bf16, int8 or fp8 to --options")
    return rows


def layer_formats(rows: list[dict], chosen: dict[str, str], model: nn.Module) -> dict[str, str]:
    """{layer: format it gets} for ``chosen`` ({unit: option}): a pruning option's format, K-quants'
    fallbacks resolved at the layer's (pruned) input width."""
    from .plan_options import block_groups, layer_format, pruned_shapes

    out: dict[str, str] = {}
    for r in rows:
        fraction, fmt = split_option(chosen[r["unit"]])
        widths = ({n: model.get_submodule(n).in_features for n in r["layers"]} if fraction is None else
                  {n: s[1] for n, s in pruned_shapes(model, r["layers"], block_groups(model, r["unit"]), fraction).items()})
        out.update({n: layer_format(fmt, w) for n, w in widths.items()})
    return out


def prune_fractions(rows: list[dict], chosen: dict[str, str]) -> dict[str, float]:
    return {r["unit"]: f for r in rows if (f := split_option(chosen[r["unit"]])[0]) is not None}


def candidate(model: nn.Module, rows: list[dict], chosen: dict[str, str], stats=None, reader=None,
              distill_settings: dict | None = None):
    """The model of ``chosen`` ({unit: option}; units not named stay as they are) as a context manager
    yielding (model, distillation report): :func:`rflow.quant.plan_options.planned_model` with the kept
    units chosen from ``stats``."""
    from .plan_options import choose_pruned

    rows = [r for r in rows if r["unit"] in chosen]
    fractions = prune_fractions(rows, chosen)
    if fractions and stats is None:
        raise ValueError("pruning options need activation statistics")
    kept = choose_pruned(model, stats, fractions) if fractions else None
    return planned_model(model, layer_formats(rows, chosen, model), kept, reader, distill_settings)


def plan_error(pipe, trajectories, layers: dict[str, str]) -> dict:
    """Velocity errors (:meth:`~rflow.compress.measure.VelocityErrors.summary`) of ``pipe`` with ``layers``
    quantized, at the points of ``trajectories``; the model is restored afterwards."""
    from .plan_measure import TrajectoryErrors

    with quantized(pipe.transformer, layers):
        return TrajectoryErrors(pipe, trajectories).error(pipe.transformer)


def measure_units(source, rows: list[dict], *, stats=None, reader=None, distill_settings: dict | None = None,
                  progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Fill in each (unit, option)'s error (:data:`ERROR_METRIC`) and relative error in ``rows``, in place,
    from ``source`` (:mod:`rflow.quant.plan_measure`; pipe-and-trajectories pairs are accepted too); a
    pruning option's distillation report goes into its entry. Options whose candidate produces NaN/inf
    become infeasible. Returns ``rows``."""
    from .plan_measure import TrajectoryErrors

    if isinstance(source, tuple):
        source = TrajectoryErrors(*source)
    model = source.pipe.transformer
    total = sum(len(r["options"]) for r in rows)
    done = 0
    for r in rows:
        kept = []
        for o in r["options"]:
            if o["option"] == KEEP_LABEL:
                o.update(error=0.0, rel_error=0.0)
                kept.append(o)
            else:
                try:
                    with candidate(model, rows, {r["unit"]: o["option"]}, stats, reader, distill_settings) as (m, rep):
                        s = source.error(m)
                except NonFiniteError as e:
                    r["infeasible"].append({"option": o["option"], "reason": f"non-finite output ({e})"})
                else:
                    o.update(error=s[ERROR_METRIC], rel_error=s["velocity_rel_mse"])
                    if rep:
                        o["distillation"] = [{k: d[k] for k in ("layer", "initial_heldout_mse", "final_heldout_mse")}
                                             for d in rep]
                    kept.append(o)
            done += 1
            if progress is not None:
                progress(done, total)
        r["options"] = kept
        if not kept:
            raise UserError(f"unit {r['unit']}: every option made the model produce NaN/inf; add bf16 to --options")
    return rows


def choose(rows: list[dict], budget: int, *, max_cells: int | None = None, model: nn.Module | None = None) -> dict:
    """The plan for ``budget`` bytes from measured ``rows`` (:func:`measure_units`): {"layers", "units" (rows
    with "chosen"), "chosen" ({unit: option}), "predicted_error", "bytes", "bf16_bytes", "budget_bytes",
    "solver"}. ``layers`` names each layer's format (``model`` resolves K-quant fallbacks and pruned
    widths; without it a layer gets its unit's option's format)."""
    sol = solve([[o["bytes"] for o in r["options"]] for r in rows], [[o["error"] for o in r["options"]] for r in rows],
                budget, max_cells=max_cells)
    units, chosen = [], {}
    for r, j in zip(rows, sol.choice):
        opt = r["options"][j]["option"]
        units.append({**r, "chosen": opt})
        chosen[r["unit"]] = opt
    if model is not None:
        layers = layer_formats(rows, chosen, model)
    else:
        layers = {n: split_option(chosen[r["unit"]])[1] for r in rows for n in r["layers"]}
    return {"budget_bytes": int(budget), "layers": layers, "units": units, "chosen": chosen,
            "predicted_error": sol.error, "bytes": sol.bytes, "bf16_bytes": sum(r["bf16_bytes"] for r in rows),
            "solver": {"method": "multiple-choice knapsack, dynamic programming over bytes",
                       "granularity_bytes": sol.granularity, "exact": sol.exact, "slack_bytes": sol.slack_bytes,
                       "min_bytes": sol.min_bytes}}


DISTILL_DEFAULTS = {"steps": 200, "lr": 1e-3, "batch": 8, "seed": 0}


@torch.no_grad()
def plan(pipe, workload=None, budget: str | int = "50%", *, options: list[str] | str = DEFAULT_OPTIONS,
         by: str = "block", guidance: float | None = None, solver: str = "euler", batch: int = 8,
         adherence: bool | None = None, max_cells: int | None = None, capture=None,
         distill_settings: dict | None = None, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """``rflow plan`` as a function: measure every (unit, option) of ``pipe``'s transformer — on the
    reference trajectories of ``workload``, or on the records of ``capture`` (a
    :class:`~rflow.compress.capture.CaptureReader` of this model; pruning options are then distilled on
    it with ``distill_settings``, :data:`DISTILL_DEFAULTS`) — choose the least-error plan within
    ``budget`` (bytes, or a size / percentage string for :func:`parse_budget`), then build and measure
    the planned model (velocity error at the same points; for a shapes-world workload also final
    latents and adherence via :func:`rflow.compress.measure.measure`). ``pipe`` is left as it was.
    Returns the JSON-ready plan (``rflow quantize --plan`` reads ``layers``, ``prune`` and ``distill``)."""
    from ..compress.measure import _adherence_wanted, measure, reference_trajectories
    from .plan_measure import CaptureErrors, TrajectoryErrors

    if (workload is None) == (capture is None):
        raise UserError("give a workload (prompts) or a capture to measure on, not both")
    opts = parse_options(options) if isinstance(options, str) else list(options)
    model = pipe.transformer
    rows = unit_table(model, opts, by)
    bf16 = sum(r["bf16_bytes"] for r in rows)
    budget_bytes = parse_budget(budget, bf16) if isinstance(budget, str) else int(budget)
    solve([[o["bytes"] for o in r["options"]] for r in rows], [[0.0] * len(r["options"]) for r in rows],
          budget_bytes, max_cells=max_cells)  # an infeasible budget fails here, before any model call
    pruning = any(split_option(o["option"])[0] is not None for r in rows for o in r["options"])
    settings = {**DISTILL_DEFAULTS, **(distill_settings or {})} if capture is not None and pruning else None
    if settings is not None and capture.in_out_only:
        raise UserError(f"{capture.path}: pruning options distil each pruned block on the capture, and this one "
                        "holds model inputs/outputs only; capture the blocks too (no --in-out-only)")
    guidance = pipe.resolve_guidance(guidance)
    trajs = None
    if capture is not None:
        source = CaptureErrors(pipe, capture, batch)
    else:
        trajs = reference_trajectories(pipe, workload, guidance=guidance, solver=solver, batch=batch,
                                       progress=(lambda d: progress("reference", d, len(workload.prompts))) if progress else None)
        source = TrajectoryErrors(pipe, trajs)
    stats = source.activation_stats() if pruning else None
    measure_units(source, rows, stats=stats, reader=capture if settings else None, distill_settings=settings,
                  progress=(lambda d, t: progress("measuring", d, t)) if progress else None)
    res = choose(rows, budget_bytes, max_cells=max_cells, model=model)
    fractions = prune_fractions(rows, res["chosen"])
    extra: dict = {}
    with candidate(model, rows, res["chosen"], stats, capture if settings else None, settings) as (planned, report):
        actual = source.error(planned)
        if fractions:
            from .plan_options import choose_pruned

            extra["prune"] = {u: idx.tolist() for u, idx in choose_pruned(model, stats, fractions).items()}
            extra["distill"] = ({**settings, "layers": [{k: d[k] for k in ("layer", "initial_heldout_mse", "final_heldout_mse")}
                                                        for d in report]} if settings else None)
        if workload is not None and _adherence_wanted(pipe, workload, adherence):
            from .plan_measure import with_transformer

            m = measure(with_transformer(pipe, planned), pipe, workload, guidance=guidance, solver=solver, batch=batch,
                        final=True, adherence=True, trajectories=trajs)
            extra.update({k: m[k] for k in ("latent_mse", "adherence_model", "adherence_reference", "adherence_delta")
                          if k in m})
    return {"version": PLAN_VERSION, "model": pipe.name, "model_fingerprint": pipe.fingerprint,
            "budget_bytes": res["budget_bytes"], "layers": res["layers"], "units": res["units"],
            "error_metric": ERROR_METRIC, "predicted_error": res["predicted_error"],
            "actual_error": actual[ERROR_METRIC], "actual_rel_error": actual["velocity_rel_mse"], **extra,
            "bytes": res["bytes"], "bf16_bytes": res["bf16_bytes"], "options": opts, "units_by": by,
            "solver": res["solver"], "sampling": {"solver": solver, "guidance": guidance},
            "measured_on": source.describe(), **({"workload": workload.describe()} if workload is not None else {})}
