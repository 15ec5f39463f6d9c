"""Figures and numbers for docs/tiny.md: adherence vs steps per solver, a sample grid, the training curve.

    python benchmarks/tiny_report.py [--model DIR] [--state RUN/train_state.safetensors] [--prompts 200] [--out docs]

Runs on the CPU in a few minutes. Writes tiny-adherence.png, tiny-samples.png, tiny-training.png and
tiny-results.json into --out.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import rflow  # noqa: E402
from rflow.world import shapes  # noqa: E402
from rflow.checkpoints.io import open_weights  # noqa: E402
from rflow.outputs import atomic_write_bytes  # noqa: E402
from rflow.world.evaluate import evaluate  # noqa: E402
from rflow.sampling import SOLVERS  # noqa: E402


def save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--state", default=None, help="train_state.safetensors with the loss log")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--steps", default="4,8,12,20,28")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    pipe = rflow.load(args.model, device="cpu")
    steps = [int(s) for s in args.steps.split(",")]
    res = {"date": datetime.date.today().isoformat(), "host": platform.processor() or platform.machine(),
           "torch": torch.__version__, "model_hash": pipe.model_hash, "prompts": args.prompts, "curves": {}}
    for solver in SOLVERS:
        for n in steps:
            t0 = time.perf_counter()
            r = evaluate(pipe, n=args.prompts, heldout=args.heldout, steps=n, solver=solver)
            row = {**r.summary(), "seconds": round(time.perf_counter() - t0, 1)}
            res["curves"].setdefault(solver, []).append({"steps": n, **row})
            print(solver, n, json.dumps(row), flush=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for solver, rows in res["curves"].items():
        ax.plot([r["steps"] for r in rows], [r["adherence"] for r in rows], marker="o", label=solver)
        ax.plot([r["steps"] for r in rows], [r["heldout_adherence"] for r in rows], ls="--", alpha=0.6,
                label=f"{solver}, held-out pairs")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("adherence")
    ax.set_title(f"rflow-tiny adherence ({args.prompts} grammar prompts, {args.heldout} held-out-pair prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_fig(fig, out / "tiny-adherence.png")

    prompts = shapes.prompts(24, seed=7, split="train") + shapes.prompts(8, seed=7, split="heldout")
    images = pipe.generate(prompts, steps=20, seed=0)
    buf = io.BytesIO()
    shapes.grid(images, prompts, cols=8).save(buf, format="PNG")
    atomic_write_bytes(out / "tiny-samples.png", buf.getvalue())
    res["samples_score"] = shapes.score(images, prompts).adherence

    if args.state:
        with open_weights(args.state) as f:
            log = json.loads(f.metadata["rflow.train_state"])["log"]
        k = 50
        xs = [r["step"] for r in log][k - 1 :]
        ys = [sum(r["loss"] for r in log[i - k + 1 : i + 1]) / k for i in range(k - 1, len(log))]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, ys)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"flow-matching loss ({k}-step mean)")
        ax.grid(alpha=0.3)
        save_fig(fig, out / "tiny-training.png")
        res["final_loss"] = ys[-1]
    atomic_write_bytes(out / "tiny-results.json", json.dumps(res, indent=1).encode())


if __name__ == "__main__":
    main()
