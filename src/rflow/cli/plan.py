"""``rflow plan``: choose one quantization format per block (or layer) within a memory budget, from
measured full-stack errors (:mod:`rflow.quant.planner`); registered on the main app by :mod:`rflow.cli`.
The plan it writes is read by ``rflow quantize --plan``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import MODEL_HELP, force_option, progress


def plan(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    budget: str = typer.Option(..., "--budget", help="weight bytes of the quantizable layers: a size (12GiB, 500MB) "
                                                     "or a share of their bf16 size (40%)"),
    options: str = typer.Option("bf16,fp8,int8,Q8_0,Q6_K,Q5_1,Q4_1,Q4_K,Q3_K", "--options",
                                help="options to choose from, comma-separated: formats (bf16 = keep), pruneP (prune P% of "
                                     "a block's MLP units) and pruneP+FORMAT"),
    units: str = typer.Option("block", "--units", help="block (all linear layers of a transformer block) | layer"),
    capture: Optional[Path] = typer.Option(None, "--capture", help="measure on a capture of --model (rflow capture); "
                                                                   "pruning options are then distilled on it"),
    distill_steps: int = typer.Option(200, "--distill-steps", help="distillation steps per pruned block (with --capture)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="prompt file, one per line"),
    shapes_n: Optional[int] = typer.Option(None, "--shapes", help="N prompts from the shapes world"),
    steps: str = typer.Option("20", "--steps", help="step counts: N, A-B or A,B,C"),
    sizes: Optional[str] = typer.Option(None, "--sizes", help="WxH[,WxH…] (default: the model's native size)"),
    seed: int = typer.Option(0, "--seed"),
    guidance: float | None = typer.Option(None, "--guidance", help="distilled guidance, default 3.5 (only models with a guidance embedder)"),
    solver: str = typer.Option("euler", "--solver", help="sampling solver of the measurement trajectories"),
    batch: int = typer.Option(8, "--batch", help="prompts per forward pass"),
    output: Path = typer.Option(..., "-o", "--output", help="PLAN.json"),
    force: bool = force_option(),
    text_encoders: Optional[Path] = typer.Option(None, "--text-encoders", help="text encoders of --model, if not next to it"),
    vae: Optional[Path] = typer.Option(None, "--vae", help="VAE of --model, if not next to it"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16"),
):
    """Choose a quantization format (or pruning) per block within a memory budget, least predicted error first.

    Every (block, option) is measured alone — velocity MSE against the unmodified model along the
    reference's own sampling trajectories, or on the records of --capture — then an exact knapsack
    picks one option per block with the least summed error whose packed weights fit --budget; the
    planned model is built and measured too. Writes PLAN.json for ``rflow quantize --plan``.
    """
    from .. import options as opts
    from ..compress.checkpoint_ops import _finite
    from ..memory import format_bytes
    from ..outputs import atomic_write_bytes, check_output
    from ..paths import resolve_model
    from ..pipeline import load, parse_dtype
    from ..quant import planner
    from .prune import _check_sampling_options, _num, _workload

    given = [o for o, v in (("--capture", capture), ("--prompts", prompts), ("--shapes", shapes_n)) if v is not None]
    if len(given) != 1:
        raise UserError("give one of --capture DIR, --prompts FILE or --shapes N" if not given
                        else f"give one of {' or '.join(given)}, not several")
    if distill_steps < 1:
        raise UserError(f"--distill-steps must be ≥ 1, got {distill_steps}")
    option_list = planner.parse_options(options)
    planner.check_budget_spec(budget)
    planner.group_units([], units)
    _check_sampling_options(solver, batch, guidance, shapes_n, sizes, steps)
    reader = None
    if capture is not None:
        from ..compress.capture import CaptureReader

        reader = CaptureReader(capture)
    out = check_output(output, suffixes=(".json",), force=force, what="the plan")
    dev = opts.device(device) if device is not None else None
    dt = parse_dtype(dtype) if dtype is not None else None
    pipe = load(resolve_model(model), text_encoders=text_encoders, vae=vae, device=dev, dtype=dt)
    work = None if reader is not None else _workload(pipe, prompts=prompts, shapes_n=shapes_n, sizes=sizes, steps=steps,
                                                     seed=seed)
    with progress("planning", len(work.prompts) if work is not None else len(reader)) as update:
        res = planner.plan(pipe, work, budget, options=option_list, by=units, guidance=guidance, solver=solver,
                           batch=batch, capture=reader, distill_settings={"steps": distill_steps},
                           progress=lambda what, done, total: update(done, total=total, description=what))
    atomic_write_bytes(out, (json.dumps(_finite(res), indent=1) + "\n").encode())
    name_w = max(len(u["unit"]) for u in res["units"])
    opt_w = max(6, *(len(u["chosen"]) for u in res["units"]))
    print(f"{'unit':<{name_w}}  {'option':<{opt_w}}  {'bytes':>10}  {'error':>10}  infeasible")
    for u in res["units"]:
        o = next(o for o in u["options"] if o["option"] == u["chosen"])
        bad = ",".join(i["option"] for i in u["infeasible"]) or "-"
        print(f"{u['unit']:<{name_w}}  {u['chosen']:<{opt_w}}  {format_bytes(o['bytes']):>10}  {_num(o['error']):>10}  {bad}")
    s = res["solver"]
    print(f"bytes: {format_bytes(res['bytes'])} of budget {format_bytes(res['budget_bytes'])} "
          f"({100 * res['bytes'] / max(1, res['bf16_bytes']):.1f}% of bf16 {format_bytes(res['bf16_bytes'])})")
    print(f"velocity MSE: predicted {_num(res['predicted_error'])} (sum over units), actual {_num(res['actual_error'])}")
    if "adherence_model" in res:
        print(f"adherence: planned {res['adherence_model']:.3f}, reference {res['adherence_reference']:.3f}")
    print(f"solver: {'exact' if s['exact'] else 'optimal within ' + format_bytes(s['slack_bytes']) + ' of the budget'}"
          f" (cells of {s['granularity_bytes']} bytes)")
    if "prune" in res:
        print(f"pruned: {sum(len(v) for v in res['prune'].values())} units kept in {len(res['prune'])} unit groups"
              + ("; distilled on the capture" if res.get("distill") else ""))
    print(out)


def register(app) -> None:
    app.command("plan")(plan)
