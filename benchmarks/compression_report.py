"""Measured pruning on rflow-tiny for docs/compression.md: units removed vs full-stack error vs adherence.

    python benchmarks/compression_report.py [--model DIR] [--out docs] [--analyze 64] [--measure 96]

1. analyze: firing statistics over ``--analyze`` shapes prompts × 20 steps;
2. for each criterion (frequency, magnitude) and fraction 10…50 % of every MLP's units: prune all
   layers, then measure against the unpruned model along its own sampling trajectories (velocity MSE
   at every step, final-latent MSE) and adherence on ``--measure`` held-out prompts;
3. frequency pruning again after per-layer distillation (capture → distill MLPs → patch);
4. per-layer sensitivity at 30 %.
Writes compression-results.json, compression.png and compression-sensitivity.png into --out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import io
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import rflow  # noqa: E402
from rflow.outputs import atomic_write_bytes  # noqa: E402
from rflow.compress.analyze import analyze  # noqa: E402
from rflow.compress.capture import CaptureReader, capture  # noqa: E402
from rflow.compress.distill import distill  # noqa: E402
from rflow.compress.measure import measure, reference_trajectories, sensitivity, sensitivity_png  # noqa: E402
from rflow.compress.prune import choose_kept, prune_model  # noqa: E402
from rflow.compress.units import unit_names  # noqa: E402
from rflow.compress.workload import make_workload  # noqa: E402

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)


def pruned_pipe(pipe, stats, criterion: str, fraction: float):
    model = copy.deepcopy(pipe.transformer)
    kept = choose_kept(stats, unit_names(model.config), criterion=criterion, fraction=fraction)
    prune_model(model, kept)
    return dataclasses.replace(pipe, transformer=model, fingerprint=f"{pipe.fingerprint}-{criterion}{fraction}")


def row(label, criterion, fraction, distilled, m, params):
    return {"label": label, "criterion": criterion, "fraction": fraction, "distilled": distilled,
            "velocity_mse": m["velocity_mse"], "velocity_rel_mse": m["velocity_rel_mse"],
            "latent_mse": m["latent_mse"], "adherence": m.get("adherence_model"),
            "adherence_reference": m.get("adherence_reference"), "parameters": params}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--analyze", type=int, default=64)
    ap.add_argument("--measure", type=int, default=96)
    ap.add_argument("--capture", type=int, default=48)
    ap.add_argument("--distill-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    ref = rflow.load(args.model, device="cpu", dtype=torch.float32)
    steps = str(args.steps)
    stats = analyze(ref, make_workload(shapes_n=args.analyze, steps=steps, seed=0, default_size=ref.default_size))
    freq = torch.cat([stats.frequency(u) for u in stats.units])
    res = {"date": datetime.date.today().isoformat(), "model_hash": ref.model_hash, "args": vars(args),
           "units_total": int(freq.numel()), "never_fire": int((freq == 0).sum()),
           "fire_quantiles": {q: float(freq.quantile(q)) for q in (0.01, 0.1, 0.5, 0.9)}, "rows": []}
    # measurement prompts: a seed far from the analysis prompts
    workload = make_workload(shapes_n=args.measure, steps=steps, seed=50_000, default_size=ref.default_size)
    traj = reference_trajectories(ref, workload)
    base_params = sum(p.numel() for p in ref.transformer.parameters())
    m = measure(ref, ref, workload, trajectories=traj, adherence=True)
    res["rows"].append(row("unpruned", None, 0.0, False, m, base_params))
    print(json.dumps(res["rows"][-1]), flush=True)
    students = {}
    for criterion in ("frequency", "magnitude"):
        for f in FRACTIONS:
            p = pruned_pipe(ref, stats, criterion, f)
            m = measure(p, ref, workload, trajectories=traj, adherence=True)
            res["rows"].append(row(f"{criterion} {int(f * 100)}%", criterion, f, False, m,
                                   sum(q.numel() for q in p.transformer.parameters())))
            print(json.dumps(res["rows"][-1]), flush=True)
            if criterion == "frequency":
                students[f] = p
    with tempfile.TemporaryDirectory() as tmp:
        cap_wl = make_workload(shapes_n=args.capture, steps=steps, seed=90_000, default_size=ref.default_size)
        capture(ref, cap_wl, Path(tmp) / "cap", every=2, budget_bytes=4 << 30)
        reader = CaptureReader(Path(tmp) / "cap")
        res["capture_records"] = len(reader.records)
        for f, p in students.items():
            patches, report = distill(ref.transformer, p.transformer, reader, train="mlp", steps=args.distill_steps,
                                      lr=1e-3, batch=16, seed=0)
            student = copy.deepcopy(p.transformer)
            student.load_state_dict({k: v for layer in patches.values() for k, v in layer.items()}, strict=False)
            q = dataclasses.replace(p, transformer=student, fingerprint=p.fingerprint + "-distilled")
            m = measure(q, ref, workload, trajectories=traj, adherence=True)
            r = row(f"frequency {int(f * 100)}% + distill", "frequency", f, True, m,
                    sum(x.numel() for x in student.parameters()))
            r["layers"] = [{k: lr[k] for k in ("layer", "initial_heldout_mse", "final_heldout_mse") if k in lr} for lr in report]
            res["rows"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "layers"}), flush=True)
    sens_wl = make_workload(shapes_n=32, steps=steps, seed=70_000, default_size=ref.default_size)
    sens = sensitivity(ref, stats, sens_wl, level=0.3)
    atomic_write_bytes(out / "compression-sensitivity.png", sensitivity_png(sens))
    res["sensitivity"] = sens
    res["seconds"] = round(time.perf_counter() - t_start)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, crit, dist, style in (("frequency", "frequency", False, "o-"), ("magnitude", "magnitude", False, "s-"),
                                     ("frequency + distill", "frequency", True, "^-")):
        rows = [r for r in res["rows"] if r["criterion"] == crit and r["distilled"] == dist]
        xs = [100 * r["fraction"] for r in rows]
        a1.plot(xs, [r["velocity_rel_mse"] for r in rows], style, label=label)
        a2.plot(xs, [r["adherence"] for r in rows], style, label=label)
    a2.axhline(res["rows"][0]["adherence"], color="gray", ls="--", label="unpruned")
    a1.set_yscale("log")
    a1.set_xlabel("MLP units removed (%)")
    a1.set_ylabel("relative velocity MSE vs unpruned")
    a2.set_xlabel("MLP units removed (%)")
    a2.set_ylabel("adherence")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(out / "compression.png", buf.getvalue())
    atomic_write_bytes(out / "compression-results.json", json.dumps(res, indent=1, default=str).encode())


if __name__ == "__main__":
    main()
