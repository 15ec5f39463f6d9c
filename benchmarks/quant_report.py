"""Measured quantization on rflow-tiny for docs/compression.md: bytes vs full-stack error vs adherence,
uniform formats against the memory-budget planner.

    python benchmarks/quant_report.py [--model DIR] [--out docs] [--plan-prompts 16] [--measure 48]
                                      [--steps 20] [--threads 1]

1. **Uniform formats.** Every eligible linear layer (:func:`rflow.quant.api.linear_layers`) in one
   format, for each format feasible on all of them (int8, fp8 and the GGUF types whose block size, 32,
   divides every input width: Q8_0, Q5_1, Q5_0, Q4_1, Q4_0). The GGUF K-quants (block 256: Q2_K…Q6_K)
   are listed with the layers they cannot quantize and not measured.
2. **Planner.** :func:`rflow.quant.planner.plan`'s steps, split so the per-(block, option) errors are
   measured once and reused for every budget: :func:`~rflow.quant.planner.unit_table` +
   :func:`~rflow.quant.planner.measure_units` on the planning prompts' reference trajectories (the
   planner's *predicted* error is the sum of its blocks' errors there), then
   :func:`~rflow.quant.planner.choose` per budget — 25, 30, 40, 50, 60 % of the eligible layers'
   bf16 bytes, and each uniform format's own bytes. Each plan's *actual* velocity MSE is measured on
   the planning trajectories too (what ``plan()`` reports as ``actual_error``).
3. **Full stack.** Every uniform model and every plan is measured against the unquantized model with
   :func:`rflow.compress.measure.measure` on ``--measure`` held-out shapes prompts (another seed):
   velocity MSE along the reference's trajectories, final-latent MSE, adherence.

The issue's target: the planner at format F's size reaches ≤ 0.5× F's full-stack velocity MSE; the
ratio is reported per format. Writes quant-results.json and quant-pareto.png into ``--out``.
``--threads 1`` by default: on a small shared CPU, torch's intra-op threads oversubscribe it (on the
2-core machine of the report, one thread ran rflow-tiny ~10× faster than two).
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

UNIFORM = ("int8", "fp8", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
K_QUANTS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
OPTIONS = ("bf16", "fp8", "int8", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
SHARES = (25, 30, 40, 50, 60)
TARGET = 0.5


def full_stack(pipe, layers: dict[str, str], workload, trajs) -> dict:
    """measure() of ``pipe`` with ``layers`` quantized against the unquantized ``pipe``."""
    with P.quantized(pipe.transformer, layers):
        m = measure(pipe, pipe, workload, trajectories=trajs, adherence=True)
    return {k: m[k] for k in ("velocity_mse", "velocity_rel_mse", "latent_mse", "adherence_model",
                              "adherence_reference", "accuracy_model", "accuracy_reference")}


def k_quant_feasibility(model, layers: list[str]) -> dict:
    out = {}
    for fmt in K_QUANTS:
        bad = [n for n in layers if P.infeasible_reason(model, [n], fmt)]
        out[fmt] = {"feasible_layers": len(layers) - len(bad), "layers": len(layers),
                    "feasible": [n for n in layers if n not in bad],
                    "first_reason": P.infeasible_reason(model, bad[:1], fmt) if bad else None}
    return out


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
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    u = res["uniform"]
    ax.scatter([100 * r["bytes"] / bf16 for r in u], [r["full_stack"]["velocity_mse"] for r in u], marker="s",
               s=40, color="#3b6fb6", label="uniform format", zorder=3)
    for r in u:
        ax.annotate(r["format"], (100 * r["bytes"] / bf16, r["full_stack"]["velocity_mse"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    plans = [p for p in res["planner"] if p.get("full_stack")]
    ax.scatter([100 * p["bytes"] / bf16 for p in plans], [p["full_stack"]["velocity_mse"] for p in plans],
               marker="o", s=36, facecolors="none", edgecolors="#d9822b", linewidths=1.5,
               label="planner (per block)", zorder=4)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--plan-prompts", type=int, default=16)
    ap.add_argument("--measure", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    timing = {}
    pipe = rflow.load(args.model, device="cpu", dtype=torch.float32)
    model = pipe.transformer
    layers = linear_layers(model)
    size = tuple(pipe.default_size)
    steps = str(args.steps)
    plan_wl = make_workload(shapes_n=args.plan_prompts, steps=steps, seed=0, default_size=size)
    meas_wl = make_workload(shapes_n=args.measure, steps=steps, seed=50_000, default_size=size)
    plan_trajs = reference_trajectories(pipe, plan_wl)
    meas_trajs = reference_trajectories(pipe, meas_wl)
    timing["reference"] = time.perf_counter() - t0

    rows = P.unit_table(model, list(OPTIONS), "block")
    bf16 = sum(r["bf16_bytes"] for r in rows)
    res = {"date": datetime.date.today().isoformat(), "command": shlex.join([Path(sys.executable).name, *sys.argv]),
           "device": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s) "
                     f"({os.cpu_count()} cores visible)",
           "torch": torch.__version__, "python": platform.python_version(), "model": pipe.name,
           "model_hash": pipe.model_hash, "model_fingerprint": pipe.fingerprint, "args": vars(args),
           "workload_plan": plan_wl.describe(), "workload_measure": meas_wl.describe(),
           "eligible_layers": len(layers), "weights": sum(r["weights"] for r in rows), "bf16_bytes": bf16,
           "input_widths": sorted({model.get_submodule(n).in_features for n in layers}),
           "k_quants": k_quant_feasibility(model, layers), "options": list(OPTIONS), "units_by": "block"}

    # 1. uniform formats, full stack on the held-out prompts
    res["uniform"] = []
    t = time.perf_counter()
    for fmt in UNIFORM:
        plan = {n: fmt for n in layers}
        nbytes = sum(P.option_bytes((model.get_submodule(n).out_features, model.get_submodule(n).in_features), fmt)
                     for n in layers)
        row = {"format": fmt, "bytes": nbytes, "share_of_bf16": nbytes / bf16,
               "bits_per_weight": 8 * nbytes / res["weights"],
               "plan_velocity_mse": P.plan_error(pipe, plan_trajs, plan)["velocity_mse"],
               "full_stack": full_stack(pipe, plan, meas_wl, meas_trajs)}
        res["uniform"].append(row)
        print(json.dumps(row), flush=True)
    res["adherence_unquantized"] = res["uniform"][0]["full_stack"]["adherence_reference"]
    timing["uniform"] = time.perf_counter() - t

    # 2. per-(block, option) errors on the planning trajectories, once
    t = time.perf_counter()
    P.measure_units(pipe, plan_trajs, rows)
    timing["units"] = time.perf_counter() - t
    res["units"] = [{"unit": r["unit"], "layers": len(r["layers"]), "bf16_bytes": r["bf16_bytes"],
                     "options": r["options"], "infeasible": r["infeasible"]} for r in rows]
    for u in res["uniform"]:  # the additivity check: Σ of the blocks' errors vs the uniform model's measured one
        u["predicted_velocity_mse"] = sum(next(o["error"] for o in r["options"] if o["option"] == u["format"])
                                          for r in rows)

    # 3. the planner at each budget: predicted, actual (planning prompts), full stack (held-out prompts)
    budgets = [{"budget": f"{s}%", "kind": "share", "budget_bytes": P.parse_budget(f"{s}%", bf16)} for s in SHARES]
    for u in res["uniform"]:
        budgets.append({"budget": f"{u['format']} size", "kind": "uniform", "format": u["format"],
                        "budget_bytes": u["bytes"]})
    t = time.perf_counter()
    seen: dict = {}
    res["planner"] = []
    for b in budgets:
        entry = dict(b, share_of_bf16=b["budget_bytes"] / bf16)
        try:
            c = P.choose(rows, b["budget_bytes"])
        except UserError as e:
            entry["infeasible"] = str(e)
            res["planner"].append(entry)
            print(json.dumps(entry), flush=True)
            continue
        key = tuple(sorted(c["layers"].items()))
        counts = {}
        for un in c["units"]:
            counts[un["chosen"]] = counts.get(un["chosen"], 0) + 1
        entry.update(bytes=c["bytes"], bytes_share_of_bf16=c["bytes"] / bf16, predicted_error=c["predicted_error"],
                     solver=c["solver"], chosen={un["unit"]: un["chosen"] for un in c["units"]}, chosen_counts=counts)
        if key in seen:  # the same plan as an earlier budget: same measurements
            prev = seen[key]
            entry.update(actual_error=prev["actual_error"], actual_rel_error=prev["actual_rel_error"],
                         full_stack=prev["full_stack"], same_plan_as=prev["budget"])
        else:
            a = P.plan_error(pipe, plan_trajs, c["layers"])
            entry.update(actual_error=a["velocity_mse"], actual_rel_error=a["velocity_rel_mse"],
                         full_stack=full_stack(pipe, c["layers"], meas_wl, meas_trajs))
            seen[key] = entry
        if b["kind"] == "uniform":
            u = next(x for x in res["uniform"] if x["format"] == b["format"])
            entry["ratio_to_uniform"] = entry["full_stack"]["velocity_mse"] / u["full_stack"]["velocity_mse"]
            entry["ratio_to_uniform_plan_prompts"] = entry["actual_error"] / u["plan_velocity_mse"]
            entry["ratio_to_uniform_latent"] = entry["full_stack"]["latent_mse"] / u["full_stack"]["latent_mse"]
            entry["meets_target"] = entry["ratio_to_uniform"] <= TARGET
        res["planner"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k not in ("solver", "chosen")}), flush=True)
    timing["planner"] = time.perf_counter() - t

    points = [dict(u, label=u["format"]) for u in res["uniform"]] + \
             [dict(p, label=f"plan {p['budget']}") for p in res["planner"] if p.get("full_stack") and "same_plan_as" not in p]
    res["pareto"] = [{"label": p["label"], "bytes": p["bytes"], "full_stack": p["full_stack"]} for p in pareto(points)]
    res["target"] = TARGET
    timing["total"] = time.perf_counter() - t0
    res["seconds"] = {k: round(v, 1) for k, v in timing.items()}
    atomic_write_bytes(out / "quant-pareto.png", plot(res))
    atomic_write_bytes(out / "quant-results.json", json.dumps(res, indent=1, default=str).encode())
    print(json.dumps(res["seconds"]), flush=True)


if __name__ == "__main__":
    main()
