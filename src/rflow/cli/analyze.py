"""CLI commands of the compression workbench (analyze); registered on the main app by rflow.cli.

``rflow analyze`` counts how often every MLP unit fires over a workload and writes the statistics;
``rflow stats merge`` sums statistics files exactly; ``rflow stats show`` prints the per-layer summary
and can draw the firing-frequency heatmap. ``rflow analyze`` runs under ``torchrun``: with
``WORLD_SIZE`` > 1 it joins a process group (NCCL on CUDA, else gloo), each rank samples its share
of the workload, and rank 0 writes the merged file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import UserError
from .common import MODEL_HELP, console, force_option, out, progress

stats_app = typer.Typer(no_args_is_help=True, help="Activation statistics files: merge them, show what they say.")


def register(app) -> None:
    app.command("analyze")(analyze_command)
    app.add_typer(stats_app, name="stats")


def analyze_command(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="prompt file, one per line (# starts a comment)"),
    shapes: Optional[int] = typer.Option(None, "--shapes", help="N prompts of the captioned-shapes world"),
    calibration: Optional[int] = typer.Option(None, "--calibration", help="N built-in calibration prompts (the default source; 64)"),
    steps: Optional[str] = typer.Option(None, "--steps", help="step counts: 20, a range 15-30 or a list 10,20,28 (default 20)"),
    sizes: Optional[str] = typer.Option(None, "--sizes", help="WxH,... drawn per prompt (default: the model's native size)"),
    seed: int = typer.Option(0, "--seed", help="prompt, size, step-count and noise seed"),
    guidance: float | None = typer.Option(None, "--guidance", help="distilled guidance, default 3.5 (only models with a guidance embedder)"),
    cfg: float = typer.Option(1.0, "--cfg", help="true CFG scale; > 1 also runs (and counts) the negative pass"),
    layers: Optional[str] = typer.Option(None, "--layers", help="layer ranges, e.g. 0-18,30-37 (default: all)"),
    streams: Optional[str] = typer.Option(None, "--streams", help="img,txt,single (default: all)"),
    output: Path = typer.Option(..., "-o", "--output", help="statistics file to write (.safetensors)"),
    append: bool = typer.Option(False, "--append", help="add to the statistics already in OUTPUT"),
    force: bool = force_option(),
    text_encoders: Optional[Path] = typer.Option(None, "--text-encoders", help="folder with text_encoder/ tokenizer/ text_encoder_2/ tokenizer_2/"),
    vae: Optional[Path] = typer.Option(None, "--vae", help="ae.safetensors or a diffusers vae/ folder"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16"),
):
    """Count how often each MLP unit fires (activation > 0) while the model samples a workload."""
    from .. import distributed, options
    from ..compress.stats import ActivationStats
    from ..compress.units import check_streams_spec, select_units
    from ..compress.workload import make_workload, parse_sizes, parse_steps
    from ..outputs import check_output
    from ..paths import resolve_model
    from ..pipeline import load, parse_dtype

    # Everything a user can get wrong is checked before the model loads (minutes for FLUX.1-dev).
    if calibration is not None and (prompts is not None or shapes is not None):
        raise UserError("--calibration picks the built-in prompts: give it, --prompts FILE or --shapes N, not several")
    if prompts is not None and shapes is not None:
        raise UserError("give --prompts FILE or --shapes N, not both")
    for n, name in ((calibration, "--calibration"), (shapes, "--shapes")):
        if n is not None:
            options.integer(n, name, low=1, high=100_000)
    options.guidance(guidance, "--guidance")
    options.number(cfg, "--cfg", low=1)
    if steps is not None:
        parse_steps(steps)
    if sizes is not None:
        parse_sizes(sizes)
    check_streams_spec(streams)
    options.layer_spec(layers)
    if append and force:
        raise UserError("give --append (add to OUTPUT) or --force (replace it), not both")
    output = check_output(output, suffixes=(".safetensors",), force=force, append=append, can_append=True,
                          what="the statistics file")
    existing = ActivationStats.load(output) if append else None
    if existing is not None:
        existing.check_usable(output)
    dev = options.device(device) if device is not None else None
    dt = parse_dtype(dtype) if dtype is not None else None

    with distributed.group(dev) as (rank, world, dev):
        pipe = load(resolve_model(model), text_encoders=text_encoders, vae=vae, device=dev, dtype=dt)
        cfg_m = pipe.transformer.config
        if existing is not None and layers is None and streams is None:
            units = list(existing.units)
        else:
            units = select_units(cfg_m, layers, streams)
        if not units:
            raise UserError("--layers/--streams select no unit group")
        workload = make_workload(prompts_file=prompts, shapes_n=shapes, calibration_n=calibration or 64, sizes=sizes,
                                 steps=steps, seed=seed, default_size=pipe.default_size, default_steps=20)
        result = _run(pipe, workload, units, guidance, cfg, existing, rank, world)
        if rank == 0:
            result.check_usable(output)
            result.save(output)
            n = sum(result.count[u].numel() for u in units)
            console.print(f"analyzed {len(workload.prompts)} prompts on {world} process(es): {len(units)} unit groups, "
                          f"{n:,} units; {output} now covers {result.meta.get('prompts', 0)} prompts",
                          highlight=False, soft_wrap=True)
            print(output)


def _run(pipe, workload, units, guidance, cfg, existing, rank, world):
    from ..compress.analyze import analyze_distributed

    n_runs = len(workload.prompts)
    if rank != 0:
        return analyze_distributed(pipe, workload, units=units, guidance=guidance, cfg=cfg, stats=existing)
    with progress("analyzing" + (f" (rank 0 of {world})" if world > 1 else ""), n_runs) as update:
        return analyze_distributed(pipe, workload, units=units, guidance=guidance, cfg=cfg, stats=existing,
                                   progress=lambda done, total, _run: update(done, total=total))


@stats_app.command("merge")
def merge_command(
    inputs: list[Path] = typer.Argument(..., help="statistics files of the same model"),
    output: Path = typer.Option(..., "-o", "--output", help="merged statistics file"),
    force: bool = force_option(),
):
    """Sum statistics files exactly (counts, Σ|a|, Σa², positions); they must come from the same model."""
    from ..compress.analyze import accumulate
    from ..compress.stats import ActivationStats
    from ..outputs import check_output

    if len(inputs) < 2:
        raise UserError("give at least two statistics files to merge")
    resolved = [p.resolve() for p in inputs]
    dup = next((p for i, p in enumerate(inputs) if resolved[i] in resolved[:i]), None)
    if dup is not None:
        raise UserError(f"{dup} is listed twice: its positions would count twice")
    output = check_output(output, suffixes=(".safetensors",), force=force, what="the statistics file")
    total = ActivationStats.load(inputs[0])
    for p in inputs[1:]:
        other = ActivationStats.load(p)
        try:
            accumulate(total, other)
        except UserError as e:
            raise UserError(f"{p}: cannot merge into {inputs[0]}: {e}") from None
    total.save(output)
    console.print(f"{len(inputs)} files, {total.meta.get('prompts', 0)} prompts, "
                  f"{sum(total.positions.values()):,} positions in all groups", highlight=False, soft_wrap=True)
    print(output)


@stats_app.command("show")
def show_command(
    path: Path = typer.Argument(..., help="statistics file"),
    heatmap: Optional[Path] = typer.Option(None, "--heatmap", help="also draw the firing-frequency heatmap to this PNG"),
    force: bool = force_option(),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
):
    """Per-layer summary: width, positions, units that never fired, firing-frequency quantiles."""
    from ..compress import report
    from ..compress.stats import ActivationStats

    from ..outputs import check_output

    if heatmap is not None:
        heatmap = check_output(heatmap, suffixes=(".png",), force=force, what="the heatmap")
    stats = ActivationStats.load(path)
    rows = report.summary(stats)
    t = report.totals(stats)
    meta = {k: v for k, v in stats.meta.items() if k != "history"}
    if as_json:
        clean = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]
        out.print_json(json.dumps({"path": str(path), "fingerprint": stats.fingerprint, "meta": meta, "totals": t,
                                   "groups": clean}))
    else:
        con = out if out.is_terminal else Console(width=160)
        con.print(f"{path}: {meta.get('model', '?')} ({stats.fingerprint or 'no fingerprint'}), "
                  f"{meta.get('prompts', '?')} prompts, steps {_short_list(meta.get('steps'))}, "
                  f"sizes {_short_list(meta.get('sizes'))}", highlight=False)
        con.print(report.table(stats))
        con.print(f"{t['units']:,} units in {t['unit_groups']} groups; {t['never']:,} never fired "
                  f"({100 * t['never_share']:.2f}%)", highlight=False)
    if heatmap is not None:
        report.write_heatmap(stats, heatmap)
        console.print(f"heatmap: {heatmap}", highlight=False, soft_wrap=True)


def _short_list(v) -> str:
    if not v:
        return "-"
    v = [str(x) if not isinstance(x, (list, tuple)) else "x".join(map(str, x)) for x in v]
    return ", ".join(v) if len(v) <= 6 else f"{', '.join(v[:3])}, … {v[-1]} ({len(v)})"
