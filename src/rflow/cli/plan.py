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
                                help="formats to choose from, comma-separated (bf16 = keep)"),
    units: str = typer.Option("block", "--units", help="block (all linear layers of a transformer block) | layer"),
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
    """Choose a quantization format per block within a memory budget, least predicted error first.

    Every (block, format) is measured alone — velocity MSE against the unquantized model along the
    reference's own sampling trajectories — then an exact knapsack picks one format per block with the
    least summed error whose packed weights fit --budget; the planned model is measured too. Writes
    PLAN.json for ``rflow quantize --plan``.
    """
    from .. import options as opts
    from ..compress.checkpoint_ops import _finite
    from ..memory import format_bytes
    from ..outputs import atomic_write_bytes, check_output
    from ..paths import resolve_model
    from ..pipeline import load, parse_dtype
    from ..quant import planner
    from .prune import _check_sampling_options, _num, _workload

    given = [o for o, v in (("--prompts", prompts), ("--shapes", shapes_n)) if v is not None]
    if len(given) != 1:
        raise UserError("give one of --prompts FILE or --shapes N" if not given else "give --prompts or --shapes, not both")
    option_list = planner.parse_options(options)
    planner.check_budget_spec(budget)
    planner.group_units([], units)
    _check_sampling_options(solver, batch, guidance, shapes_n, sizes, steps)
    out = check_output(output, suffixes=(".json",), force=force, what="the plan")
    dev = opts.device(device) if device is not None else None
    dt = parse_dtype(dtype) if dtype is not None else None
    pipe = load(resolve_model(model), text_encoders=text_encoders, vae=vae, device=dev, dtype=dt)
    work = _workload(pipe, prompts=prompts, shapes_n=shapes_n, sizes=sizes, steps=steps, seed=seed)
    with progress("planning", len(work.prompts)) as update:
        res = planner.plan(pipe, work, budget, options=option_list, by=units, guidance=guidance, solver=solver,
                           batch=batch, progress=lambda what, done, total: update(done, total=total, description=what))
    atomic_write_bytes(out, (json.dumps(_finite(res), indent=1) + "\n").encode())
    name_w = max(len(u["unit"]) for u in res["units"])
    print(f"{'unit':<{name_w}}  {'format':<6}  {'bytes':>10}  {'error':>10}  infeasible")
    for u in res["units"]:
        o = next(o for o in u["options"] if o["option"] == u["chosen"])
        bad = ",".join(i["option"] for i in u["infeasible"]) or "-"
        print(f"{u['unit']:<{name_w}}  {u['chosen']:<6}  {format_bytes(o['bytes']):>10}  {_num(o['error']):>10}  {bad}")
    s = res["solver"]
    print(f"bytes: {format_bytes(res['bytes'])} of budget {format_bytes(res['budget_bytes'])} "
          f"({100 * res['bytes'] / max(1, res['bf16_bytes']):.1f}% of bf16 {format_bytes(res['bf16_bytes'])})")
    print(f"velocity MSE: predicted {_num(res['predicted_error'])} (sum over units), actual {_num(res['actual_error'])}")
    if "adherence_model" in res:
        print(f"adherence: planned {res['adherence_model']:.3f}, reference {res['adherence_reference']:.3f}")
    print(f"solver: {'exact' if s['exact'] else 'optimal within ' + format_bytes(s['slack_bytes']) + ' of the budget'}"
          f" (cells of {s['granularity_bytes']} bytes)")
    print(out)


def register(app) -> None:
    app.command("plan")(plan)
