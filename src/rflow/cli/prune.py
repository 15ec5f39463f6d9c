"""CLI commands of the compression workbench: ``prune``, ``measure`` and ``sensitivity``; registered
on the main app by :mod:`rflow.cli`.

``rflow prune`` slices the MLP units that activation statistics say matter least and writes the
model like its source (:mod:`rflow.compress.save`); ``rflow measure`` compares a model with its
reference on the whole stack (:mod:`rflow.compress.measure`); ``rflow sensitivity`` prunes one layer
at a time to show which layers can lose units.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from ..compress.checkpoint_ops import (_check_criterion, _finite, check_stats_widths, load_stats_for,
                                      measure_against_capture, prune_checkpoint)
from ..errors import UserError
from ..paths import resolve_model
from .common import MODEL_HELP, force_option, progress



# ---------------------------------------------------------------------------------------------- helpers


def _workload(pipe, *, prompts: Path | None, shapes_n: int | None, sizes: str | None, steps: str, seed: int):
    from ..compress.workload import make_workload

    try:
        return make_workload(prompts_file=prompts, shapes_n=shapes_n, sizes=sizes, steps=steps, seed=seed,
                             default_size=tuple(pipe.default_size))
    except ModuleNotFoundError:  # no built-in calibration prompts in this build
        raise UserError("give --prompts FILE or --shapes N") from None


def _check_sampling_options(solver: str, batch: int, guidance: float, shapes_n: int | None, sizes: str | None,
                            steps: str | None) -> None:
    """What measure and sensitivity share, checked before any model loads."""
    from .. import options
    from ..compress.workload import parse_sizes, parse_steps
    from ..sampling import SOLVERS

    if solver not in SOLVERS:
        raise UserError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    options.integer(batch, "--batch", low=1, high=4096)
    options.guidance(guidance, "--guidance")
    if shapes_n is not None:
        options.integer(shapes_n, "--shapes", low=1, high=100_000)
    if sizes is not None:
        parse_sizes(sizes)
    if steps is not None:
        parse_steps(steps)


def _num(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


# ---------------------------------------------------------------------------------------------- commands


def prune(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    stats: Path = typer.Option(..., "--stats", help="activation statistics of this model (rflow analyze)"),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="remove this share of each group's least important units"),
    count: Optional[int] = typer.Option(None, "--count", help="remove units that fired at fewer than N positions"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="remove units whose importance is below T"),
    layers: Optional[str] = typer.Option(None, "--layers", help="layers to prune, e.g. 0-18,30-37 (double blocks first)"),
    streams: Optional[str] = typer.Option(None, "--streams", help="img,txt,single (default: all)"),
    criterion: str = typer.Option("frequency", "--criterion", help="frequency | magnitude"),
    output: Path = typer.Option(..., "-o", "--output", help="pruned model: a folder for rflow pipelines, else a .safetensors file"),
    force: bool = force_option(),
):
    """Remove MLP hidden units that the statistics say matter least; write the model like its source."""
    from ..options import layer_spec

    layer_spec(layers)
    r = prune_checkpoint(resolve_model(model), stats, output, fraction=fraction, count=count, threshold=threshold,
                         layers=layers, streams=streams, criterion=criterion, force=force)
    name_w = max(len(u) for u in r["groups"])
    print(f"{'group':<{name_w}}  {'width':>7}  {'kept':>7}  {'removed':>7}")
    for u, g in r["groups"].items():
        print(f"{u:<{name_w}}  {g['width']:>7}  {g['kept']:>7}  {g['removed']:>7}")
    total = r["units_total"]
    print(f"units removed: {r['units_removed']} of {total} ({100 * r['units_removed'] / max(1, total):.1f}%)")
    b, a = r["parameters_before"], r["parameters_after"]
    print(f"parameters: {b:,} -> {a:,} ({100 * (a - b) / max(1, b):+.1f}%)")
    if r["note"]:
        print(f"note: {r['note']}")
    print(r["output"])


def measure(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    reference: Path = typer.Option(..., "--reference", help="the model to compare with (e.g. the unpruned one)"),
    capture: Optional[Path] = typer.Option(None, "--capture", help="capture directory of the reference (rflow capture)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="prompt file, one per line"),
    shapes_n: Optional[int] = typer.Option(None, "--shapes", help="N prompts from the shapes world"),
    steps: str = typer.Option("20", "--steps", help="step counts: N, A-B or A,B,C"),
    sizes: Optional[str] = typer.Option(None, "--sizes", help="WxH[,WxH…] (default: the model's native size)"),
    seed: int = typer.Option(0, "--seed"),
    guidance: float | None = typer.Option(None, "--guidance", help="distilled guidance, default 3.5 (only models with a guidance embedder)"),
    solver: str = typer.Option("euler", "--solver"),
    batch: int = typer.Option(8, "--batch", help="prompts per forward pass"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    text_encoders: Optional[Path] = typer.Option(None, "--text-encoders", help="text encoders of --model, if not next to it"),
    vae: Optional[Path] = typer.Option(None, "--vae", help="VAE of --model, if not next to it"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16"),
):
    """Full-stack distance of a model from its reference (velocity MSE, final-latent MSE, adherence).

    Both transformers are run at the points of the reference's own sampling trajectories (same
    prompts, noise, schedule and solver, every step); both pipelines generate from the same noise for
    the final latents; shapes-world models (rflow-tiny, --shapes) are also scored for adherence. With
    --capture, the velocity MSE comes from a capture of the reference instead.
    """
    from .. import options
    from ..compress.measure import measure as run_measure
    from ..pipeline import load, parse_dtype

    given = [o for o, v in (("--capture", capture), ("--prompts", prompts), ("--shapes", shapes_n)) if v is not None]
    if len(given) > 1:
        raise UserError(f"give one of --capture, --prompts, --shapes (got {' and '.join(given)})")
    _check_sampling_options(solver, batch, guidance, shapes_n, sizes, steps)
    dev = options.device(device) if device is not None else None
    dt = parse_dtype(dtype) if dtype is not None else None
    model, reference = resolve_model(model), resolve_model(reference)
    if capture is not None:
        res = measure_against_capture(model, reference, capture, batch=batch, device=dev, dtype=dtype)
    else:
        pipe = load(model, text_encoders=text_encoders, vae=vae, device=dev, dtype=dt)
        ref = load(reference, device=pipe.device, dtype=pipe.transformer.dtype)
        work = _workload(ref, prompts=prompts, shapes_n=shapes_n, sizes=sizes, steps=steps, seed=seed)
        with progress("measuring", 2 * len(work.prompts)) as update:
            res = run_measure(pipe, ref, work, guidance=guidance, solver=solver, batch=batch,
                              progress=lambda done, total: update(done, total=total))
    if as_json:
        print(json.dumps(_finite(res)))
        return
    print(f"model:      {res['model']} ({res['model_fingerprint']})")
    print(f"reference:  {res['reference']} ({res['reference_fingerprint']})")
    if "capture" in res:
        print(f"capture:    {res['capture']} ({res['records']} records from {res['runs']} runs)")
    w = res.get("workload")
    if w:
        print(f"workload:   {w['prompts']} prompts ({w['source']}), sizes {','.join(w['sizes'])}, steps {w['steps']}, seed {w['seed']}")
    print(f"velocity MSE:     {_num(res['velocity_mse'])} (relative {_num(res['velocity_rel_mse'])}, "
          f"max {_num(res['velocity_mse_max'])}, {res['velocity_evaluations']} evaluations)")
    if "latent_mse" in res:
        print(f"final latent MSE: {_num(res['latent_mse'])} (max {_num(res['latent_mse_max'])})")
    if "adherence_model" in res:
        print(f"adherence:        model {res['adherence_model']:.3f}, reference {res['adherence_reference']:.3f} "
              f"({res['adherence_delta']:+.3f})")


def sensitivity(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    stats: Path = typer.Option(..., "--stats", help="activation statistics of this model (rflow analyze)"),
    level: float = typer.Option(..., "--level", help="share of each layer's units to zero, e.g. 0.3"),
    shapes_n: Optional[int] = typer.Option(None, "--shapes", help="N prompts from the shapes world"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="prompt file, one per line"),
    steps: str = typer.Option("20", "--steps", help="step counts: N, A-B or A,B,C"),
    sizes: Optional[str] = typer.Option(None, "--sizes", help="WxH[,WxH…] (default: the model's native size)"),
    seed: int = typer.Option(0, "--seed"),
    guidance: float | None = typer.Option(None, "--guidance", help="distilled guidance, default 3.5 (only models with a guidance embedder)"),
    solver: str = typer.Option("euler", "--solver"),
    criterion: str = typer.Option("frequency", "--criterion", help="frequency | magnitude"),
    streams: Optional[str] = typer.Option(None, "--streams", help="img,txt,single (default: all)"),
    batch: int = typer.Option(8, "--batch", help="prompts per forward pass"),
    png: Path = typer.Option(Path("sensitivity.png"), "--png", help="bar chart of the error per layer"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the table as JSON here"),
    force: bool = force_option(),
    text_encoders: Optional[Path] = typer.Option(None, "--text-encoders"),
    vae: Optional[Path] = typer.Option(None, "--vae"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16"),
):
    """Prune one layer at a time and measure the velocity MSE against the unpruned model.

    Each layer's --level share of least important units (each of its unit groups) is zeroed —
    equivalent to slicing them out — and restored afterwards; prints a table per layer and writes a
    bar chart (--png) and optionally JSON.
    """
    from .. import options
    from ..compress.measure import sensitivity as run_sensitivity
    from ..compress.measure import sensitivity_png
    from ..compress.units import check_streams_spec, n_layers as count_layers
    from ..outputs import check_output, replacing_all
    from ..pipeline import load, parse_dtype

    options.number(level, "--level", low=0, high=1, low_open=True, high_open=True)
    _check_criterion(criterion)
    check_streams_spec(streams)
    _check_sampling_options(solver, batch, guidance, shapes_n, sizes, steps)
    outputs = [check_output(png, suffixes=(".png",), force=force, what="the plot")]
    if json_out is not None:
        outputs.append(check_output(json_out, suffixes=(".json",), force=force, what="the table"))
    dev = options.device(device) if device is not None else None
    dt = parse_dtype(dtype) if dtype is not None else None
    model = resolve_model(model)
    st, _ = load_stats_for(stats, model)
    pipe = load(model, text_encoders=text_encoders, vae=vae, device=dev, dtype=dt)
    check_stats_widths(st, pipe.transformer.config)
    work = _workload(pipe, prompts=prompts, shapes_n=shapes_n, sizes=sizes, steps=steps, seed=seed)
    with progress("sensitivity", count_layers(pipe.transformer.config)) as update:
        res = run_sensitivity(pipe, st, work, level=level, criterion=criterion, streams=streams, guidance=guidance,
                              solver=solver, batch=batch, progress=lambda row: update(row["layer"] + 1))
    with replacing_all(outputs) as tmps:
        tmps[0].write_bytes(sensitivity_png(res))
        if json_out is not None:
            tmps[1].write_text(json.dumps(_finite(res), indent=1))
    print(f"{'layer':>5}  {'kind':<6}  {'zeroed':>13}  {'velocity MSE':>12}  {'relative':>9}")
    for r in res["layers"]:
        print(f"{r['layer']:>5}  {r['kind']:<6}  {r['zeroed']:>6}/{r['units']:<6}  {_num(r['velocity_mse']):>12}  "
              f"{_num(r['velocity_rel_mse']):>9}")
    print(f"plot: {png}")
    if json_out is not None:
        print(f"json: {json_out}")


def register(app) -> None:
    app.command("prune")(prune)
    app.command("measure")(measure)
    app.command("sensitivity")(sensitivity)
