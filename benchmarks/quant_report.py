"""Measured quantization on rflow-tiny for docs/compression.md: bytes vs full-stack error vs adherence,
uniform formats against the memory-budget planner (per block, per block with pruning, per layer).

    python benchmarks/quant_report.py [--model DIR] [--out docs] [--plan-prompts 16] [--layer-prompts 8]
                                      [--layer-steps 10] [--measure 48] [--steps 20] [--threads 1]

1. **Uniform formats.** Every eligible linear layer (:func:`rflow.quant.api.linear_layers`) in one
   format: int8, fp8 and every GGUF type. The K-quants (block 256) take llama.cpp's fallback type on
   the layers 256 does not divide (:data:`rflow.quant.api.FALLBACK`, as ``rflow quantize --fallback``
   and ``llama-quantize`` do); the JSON lists which layers got which type.
2. **Planner**, in three variants, :func:`rflow.quant.planner.plan`'s steps split so each variant's
   per-(unit, option) errors are measured once and reused for every budget
   (:func:`~rflow.quant.planner.unit_table`, :func:`~rflow.quant.planner.measure_units`,
   :func:`~rflow.quant.planner.choose`; the *predicted* error of a plan is the sum of its units'
   errors, its *actual* error the planned model's velocity MSE on the same trajectories):
   * ``block``: one format per transformer block, the formats only, on ``--plan-prompts`` prompts;
   * ``block+prune``: the same with the pruning options of :data:`PRUNE_OPTIONS` added (units chosen
     by firing frequency at the planning points; no distillation — that needs a capture);
   * ``layer``: one format per linear layer, on ``--layer-prompts`` prompts × ``--layer-steps`` steps
     (8× the units: a smaller workload keeps the run short; the full stack below is the judge).
   Budgets: 25, 30, 40, 50, 60 % of the eligible layers' bf16 bytes, and each uniform format's bytes.
3. **Full stack.** Every uniform model and every distinct plan is measured against the unquantized
   model with :func:`rflow.compress.measure.measure` on ``--measure`` held-out shapes prompts (another
   seed): velocity MSE along the reference's trajectories, final-latent MSE, adherence.

The issue's target: the planner at format F's size reaches ≤ 0.5× F's full-stack velocity MSE,
reported per format and planner variant. Writes quant-results.json and quant-pareto.png into
``--out``. ``--threads 1`` by default: on a small shared CPU, torch's intra-op threads oversubscribe it.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import rflow  # noqa: E402
from rflow.compress.measure import measure, reference_trajectories  # noqa: E402
from rflow.compress.workload import make_workload  # noqa: E402
from rflow.errors import UserError  # noqa: E402
from rflow.outputs import atomic_write_bytes  # noqa: E402
from rflow.quant import planner as P  # noqa: E402
from rflow.quant.api import linear_layers  # noqa: E402
from rflow.quant.plan_measure import TrajectoryErrors, with_transformer  # noqa: E402

UNIFORM = ("int8", "fp8", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K")
FORMATS = ("bf16", "fp8", "int8", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K")
PRUNE_OPTIONS = ("prune25", "prune50", "prune25+Q8_0", "prune50+Q8_0", "prune25+Q4_0", "prune50+Q4_0")
SHARES = (25, 30, 40, 50, 60)
TARGET = 0.5
STYLE = {"block": ("o", "#d9822b"), "block+prune": ("^", "#2b9d5a"), "layer": ("D", "#8a3ec4")}


def full_stack(pipe, model, meas_wl, meas_trajs) -> dict:
    """measure() of ``model`` (a candidate transformer of ``pipe``) against the unmodified ``pipe``."""
    m = measure(with_transformer(pipe, model), pipe, meas_wl, trajectories=meas_trajs, adherence=True)
    return {k: m[k] for k in ("velocity_mse", "velocity_rel_mse", "latent_mse", "adherence_model",
                              "adherence_reference", "accuracy_model", "accuracy_reference")}


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both bytes and full-stack velocity MSE, by bytes."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p["bytes"], p["full_stack"]["velocity_mse"])):
        if p["full_stack"]["velocity_mse"] < best:
            front.append(p)
            best = p["full_stack"]["velocity_mse"]
    return front


def plot(res: dict) -> bytes:
    bf16 = res["bf16_bytes"]
    fig, ax = plt.subplots(figsize=(8, 5))
    u = res["uniform"]
    ax.scatter([100 * r["bytes"] / bf16 for r in u], [r["full_stack"]["velocity_mse"] for r in u], marker="s",
               s=40, color="#3b6fb6", label="uniform format", zorder=3)
    for r in u:
        ax.annotate(r["format"], (100 * r["bytes"] / bf16, r["full_stack"]["velocity_mse"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    for name, variant in res["planners"].items():
        plans = [p for p in variant["plans"] if p.get("full_stack") and "same_plan_as" not in p]
        marker, color = STYLE[name]
        ax.scatter([100 * p["bytes"] / bf16 for p in plans], [p["full_stack"]["velocity_mse"] for p in plans],
                   marker=marker, s=36, facecolors="none", edgecolors=color, linewidths=1.5,
                   label=f"planner ({name})", zorder=4)
    front = res["pareto"]
    ax.plot([100 * p["bytes"] / bf16 for p in front], [p["full_stack"]["velocity_mse"] for p in front], "-",
            color="gray", alpha=0.7, label="Pareto front", zorder=2)
    ax.set_yscale("log")
    ax.set_xlabel("bytes of the eligible linear layers (% of bf16)")
    ax.set_ylabel("full-stack velocity MSE vs unquantized")
    ax.set_title(f"rflow-tiny ({res['model_hash']}): {res['workload_measure']['prompts']} held-out shapes prompts, "
                 f"{res['args']['steps']} steps", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def counts(chosen: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in chosen.values():
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class Evaluator:
    """Full-stack (held-out) and planning-point errors of candidates, each distinct model measured once."""

    def __init__(self, pipe, meas_wl, meas_trajs):
        self.pipe, self.meas_wl, self.meas_trajs = pipe, meas_wl, meas_trajs
        self.seen: dict = {}

    def __call__(self, rows, chosen, stats, source) -> tuple[dict, dict]:
        model = self.pipe.transformer
        layers = P.layer_formats(rows, chosen, model)
        key = (tuple(sorted(layers.items())), tuple(sorted((u, o) for u, o in chosen.items() if o.startswith("prune"))),
               id(source))
        if key not in self.seen:
            with P.candidate(model, rows, chosen, stats) as (m, _):
                self.seen[key] = (source.error(m), full_stack(self.pipe, m, self.meas_wl, self.meas_trajs))
        return self.seen[key]


def run_planner(name, rows, source, stats, budgets, uniform, evaluate, bf16) -> dict:
    plans = []
    first_budget: dict = {}
    for b in budgets:
        entry = dict(b, share_of_bf16=b["budget_bytes"] / bf16)
        try:
            c = P.choose(rows, b["budget_bytes"], model=source.pipe.transformer)
        except UserError as e:
            entry["infeasible"] = str(e)
            plans.append(entry)
            print(name, json.dumps(entry), flush=True)
            continue
        key = tuple(sorted(c["chosen"].items()))
        actual, fs = evaluate(rows, c["chosen"], stats, source)
        entry.update(bytes=c["bytes"], bytes_share_of_bf16=c["bytes"] / bf16, predicted_error=c["predicted_error"],
                     actual_error=actual["velocity_mse"], actual_rel_error=actual["velocity_rel_mse"], full_stack=fs,
                     solver=c["solver"], chosen=c["chosen"], chosen_counts=counts(c["chosen"]),
                     layer_counts=counts(c["layers"]))
        if key in first_budget:
            entry["same_plan_as"] = first_budget[key]
        else:
            first_budget[key] = b["budget"]
        if b["kind"] == "uniform":
            u = next(x for x in uniform if x["format"] == b["format"])
            entry["ratio_to_uniform"] = fs["velocity_mse"] / u["full_stack"]["velocity_mse"]
            entry["ratio_to_uniform_latent"] = fs["latent_mse"] / u["full_stack"]["latent_mse"]
            entry["meets_target"] = entry["ratio_to_uniform"] <= TARGET
        plans.append(entry)
        print(name, json.dumps({k: v for k, v in entry.items() if k not in ("solver", "chosen")}), flush=True)
    return {"plans": plans}


def read_log(path: str) -> dict:
    """Uniform rows and planner entries printed by an earlier run (one JSON object per line)."""
    uniform, plans = [], {}
    for line in Path(path).read_text().splitlines():
        if line.startswith('{"format"'):
            uniform.append(json.loads(line))
            continue
        name, _, rest = line.partition(" ")
        if name in STYLE and rest.startswith("{"):
            plans.setdefault(name, []).append(json.loads(rest))
    return {"uniform": uniform, "plans": plans, "path": path}


def unit_summary(rows) -> list[dict]:
    return [{"unit": r["unit"], "layers": len(r["layers"]), "bf16_bytes": r["bf16_bytes"], "options": r["options"],
             "infeasible": r["infeasible"]} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--plan-prompts", type=int, default=16)
    ap.add_argument("--layer-prompts", type=int, default=8)
    ap.add_argument("--layer-steps", type=int, default=10)
    ap.add_argument("--measure", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="block,block+prune,layer", help="planner variants to measure")
    ap.add_argument("--prune-budgets", default="shares", help="shares | all: budgets of the block+prune variant")
    ap.add_argument("--from-log", default=None, help="stdout of an earlier run with the same settings: its uniform "
                                                     "rows and the plans of variants not in --variants are reused")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    previous = read_log(args.from_log) if args.from_log else None
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    timing = {}
    pipe = rflow.load(args.model, device="cpu", dtype=torch.float32)
    model = pipe.transformer
    layers = linear_layers(model)
    size = tuple(pipe.default_size)
    plan_wl = make_workload(shapes_n=args.plan_prompts, steps=str(args.steps), seed=0, default_size=size)
    layer_wl = make_workload(shapes_n=args.layer_prompts, steps=str(args.layer_steps), seed=0, default_size=size)
    meas_wl = make_workload(shapes_n=args.measure, steps=str(args.steps), seed=50_000, default_size=size)
    plan_src = TrajectoryErrors(pipe, reference_trajectories(pipe, plan_wl))
    layer_src = TrajectoryErrors(pipe, reference_trajectories(pipe, layer_wl))
    meas_trajs = reference_trajectories(pipe, meas_wl)
    evaluate = Evaluator(pipe, meas_wl, meas_trajs)
    timing["reference"] = time.perf_counter() - t0

    block_rows = P.unit_table(model, list(FORMATS), "block")
    bf16 = sum(r["bf16_bytes"] for r in block_rows)
    weights = sum(r["weights"] for r in block_rows)
    res = {"date": datetime.date.today().isoformat(), "command": shlex.join([Path(sys.executable).name, *sys.argv]),
           "device": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s) "
                     f"({os.cpu_count()} cores visible)",
           "torch": torch.__version__, "python": platform.python_version(), "model": pipe.name,
           "model_hash": pipe.model_hash, "model_fingerprint": pipe.fingerprint, "args": vars(args),
           "workload_plan": plan_wl.describe(), "workload_layer": layer_wl.describe(),
           "workload_measure": meas_wl.describe(), "eligible_layers": len(layers), "weights": weights,
           "bf16_bytes": bf16, "input_widths": sorted({model.get_submodule(n).in_features for n in layers}),
           "formats": list(FORMATS), "prune_options": list(PRUNE_OPTIONS)}

    # 1. uniform formats, full stack on the held-out prompts
    res["uniform"] = []
    t = time.perf_counter()
    if previous is not None:
        res["uniform"] = previous["uniform"]
        res["reused_from_log"] = {"path": previous["path"], "uniform": True,
                                  "variants": [v for v in previous["plans"] if v not in variants]}
    for fmt in UNIFORM if previous is None else ():
        rows1 = [{"unit": "all", "layers": layers, "options": [P.option_entry(model, "all", layers, fmt, "layer")]}]
        entry = rows1[0]["options"][0]
        actual, fs = evaluate(rows1, {"all": fmt}, None, plan_src)
        row = {"format": fmt, "bytes": entry["bytes"], "share_of_bf16": entry["bytes"] / bf16,
               "bits_per_weight": 8 * entry["bytes"] / weights, "layer_formats": entry["formats"],
               "plan_velocity_mse": actual["velocity_mse"], "full_stack": fs}
        res["uniform"].append(row)
        print(json.dumps(row), flush=True)
    res["adherence_unquantized"] = res["uniform"][0]["full_stack"]["adherence_reference"]
    timing["uniform"] = time.perf_counter() - t

    budgets = [{"budget": f"{s}%", "kind": "share", "budget_bytes": P.parse_budget(f"{s}%", bf16)} for s in SHARES]
    budgets += [{"budget": f"{u['format']} size", "kind": "uniform", "format": u["format"], "budget_bytes": u["bytes"]}
                for u in res["uniform"]]
    res["planners"] = {}

    for name, plans in (previous or {}).get("plans", {}).items():
        if name not in variants:
            res["planners"][name] = {"plans": plans, "reused_from_log": previous["path"]}

    # 2a. per block, formats only (its errors are also the block+prune variant's format errors)
    t = time.perf_counter()
    if "block" in variants or "block+prune" in variants:
        P.measure_units(plan_src, block_rows)
    for u in res["uniform"] if "block" in variants or "block+prune" in variants else ():  # additivity: Σ blocks vs whole
        u["predicted_velocity_mse"] = sum(next(o["error"] for o in r["options"] if o["option"] == u["format"])
                                          for r in block_rows)
    timing["units_block"] = time.perf_counter() - t
    t = time.perf_counter()
    if "block" in variants:
        res["planners"]["block"] = {"units": unit_summary(block_rows), "measured_on": plan_src.describe(),
                                    **run_planner("block", block_rows, plan_src, None, budgets, res["uniform"], evaluate,
                                                  bf16)}
    timing["plans_block"] = time.perf_counter() - t
    if "block+prune" in variants:
        prune_variant(res, model, block_rows, plan_src, budgets, evaluate, bf16, timing, args.prune_budgets)
    if "layer" in variants:
        layer_variant(res, model, layer_src, budgets, evaluate, bf16, timing)
    finish(res, out, timing, t0)


def prune_variant(res, model, block_rows, plan_src, budgets, evaluate, bf16, timing, which) -> None:
    """2b. per block, with the pruning options."""
    t = time.perf_counter()
    stats = plan_src.activation_stats()
    prune_rows = P.unit_table(model, list(FORMATS) + list(PRUNE_OPTIONS), "block")
    known = {(r["unit"], o["option"]): o for r in block_rows for o in r["options"]}
    for r in prune_rows:  # the formats' errors are the block variant's: measure only the pruning options
        r["options"] = [known.get((r["unit"], o["option"]), o) for o in r["options"]]
    P.measure_units(plan_src, [{**r, "options": [o for o in r["options"] if o["option"].startswith("prune")]}
                               for r in prune_rows], stats=stats)
    for r in prune_rows:  # (an option whose candidate went non-finite has no error and is left out)
        r["options"] = [o for o in r["options"] if "error" in o]
    timing["units_prune"] = time.perf_counter() - t
    t = time.perf_counter()
    chosen_budgets = budgets if which == "all" else [b for b in budgets if b["kind"] == "share"]
    res["planners"]["block+prune"] = {"units": unit_summary(prune_rows), "measured_on": plan_src.describe(),
                                      **run_planner("block+prune", prune_rows, plan_src, stats, chosen_budgets,
                                                    res["uniform"], evaluate, bf16)}
    timing["plans_prune"] = time.perf_counter() - t


def layer_variant(res, model, layer_src, budgets, evaluate, bf16, timing) -> None:
    """2c. per layer, formats only, on the smaller workload."""
    t = time.perf_counter()
    layer_rows = P.unit_table(model, list(FORMATS), "layer")
    P.measure_units(layer_src, layer_rows)
    timing["units_layer"] = time.perf_counter() - t
    t = time.perf_counter()
    res["planners"]["layer"] = {"units": unit_summary(layer_rows), "measured_on": layer_src.describe(),
                                **run_planner("layer", layer_rows, layer_src, None, budgets, res["uniform"], evaluate, bf16)}
    timing["plans_layer"] = time.perf_counter() - t


def finish(res, out, timing, t0) -> None:
    points = [dict(u, label=u["format"]) for u in res["uniform"]]
    for name, v in res["planners"].items():
        points += [dict(p, label=f"{name} {p['budget']}") for p in v["plans"] if p.get("full_stack")
                   and "same_plan_as" not in p]
    res["pareto"] = [{"label": p["label"], "bytes": p["bytes"], "full_stack": p["full_stack"]} for p in pareto(points)]
    res["target"] = TARGET
    timing["total"] = time.perf_counter() - t0
    res["seconds"] = {k: round(v, 1) for k, v in timing.items()}
    atomic_write_bytes(out / "quant-pareto.png", plot(res))
    atomic_write_bytes(out / "quant-results.json", json.dumps(res, indent=1, default=str).encode())
    print(json.dumps(res["seconds"]), flush=True)


if __name__ == "__main__":
    main()
