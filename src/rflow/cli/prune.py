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
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError

MODEL_HELP = ("model: rflow pipeline folder, BFL/ComfyUI .safetensors, diffusers transformer/ or pipeline folder "
              "(default: the embedded rflow-tiny)")


# ---------------------------------------------------------------------------------------------- helpers


def default_model(model: Path | None) -> Path:
    if model is not None:
        return model
    from ..tiny import embedded_model_dir

    return embedded_model_dir()


def load_stats_for(stats_path: Path, model_path: Path):
    """Statistics file checked against the model: same fingerprint, same unit widths."""
    from .save import model_fingerprint
    from .stats import ActivationStats

    stats = ActivationStats.load(stats_path)
    fp = model_fingerprint(model_path)
    if stats.fingerprint != fp:
        raise UserError(f"{stats_path}: statistics were collected on model {stats.fingerprint or '?'}, "
                        f"not on {model_path} ({fp}); run rflow analyze on this model")
    return stats, fp


def check_stats_widths(stats, config) -> None:
    from .units import unit_widths

    for u, w in unit_widths(config).items():
        if u not in stats.count:
            raise UserError(f"statistics have no unit {u!r}")
        if stats.count[u].numel() != w:
            raise UserError(f"statistics give {u} {stats.count[u].numel()} units, the model has {w}")


def _mode(fraction, count, threshold) -> tuple[str, float | int]:
    given = [(n, v) for n, v in (("fraction", fraction), ("count", count), ("threshold", threshold)) if v is not None]
    if len(given) != 1:
        raise UserError("give exactly one of --fraction, --count or --threshold")
    return given[0]


def _check_criterion(criterion: str) -> None:
    if criterion not in ("frequency", "magnitude"):
        raise UserError(f"unknown criterion {criterion!r}; choose frequency or magnitude")


def _finite(obj):
    """JSON-safe: NaN/inf become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _workload(pipe, *, prompts: Path | None, shapes_n: int | None, sizes: str | None, steps: str, seed: int):
    from .workload import make_workload

    try:
        return make_workload(prompts_file=prompts, shapes_n=shapes_n, sizes=sizes, steps=steps, seed=seed,
                             default_size=tuple(pipe.default_size))
    except ModuleNotFoundError:  # no built-in calibration prompts in this build
        raise UserError("give --prompts FILE or --shapes N") from None


def _num(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- library


def prune_checkpoint(model_path: str | Path, stats_path: str | Path, out_path: str | Path, *,
                     fraction: float | None = None, count: int | None = None, threshold: float | None = None,
                     layers: str | None = None, streams: str | None = None, criterion: str = "frequency") -> dict:
    """``rflow prune`` as a function: returns the pruning record (also stored as ``rflow.pruning``)
    with ``output``, ``layout`` and ``note`` added."""
    from ..checkpoints.flux import FluxCheckpoint, load_flux
    from .prune import choose_kept, kept_tensors, prune_model
    from .save import check_output, save_transformer_like, transformer_path
    from .units import parse_layers, parse_streams, select_units, unit_widths

    mode, value = _mode(fraction, count, threshold)
    _check_criterion(criterion)
    model_path, out_path = Path(model_path), Path(out_path)
    check_output(model_path, out_path)
    stats, fp = load_stats_for(Path(stats_path), model_path)
    tpath = transformer_path(model_path)
    with FluxCheckpoint(tpath) as ck:
        config, previous = ck.config, ck.files.metadata.get("rflow.pruning")
    check_stats_widths(stats, config)
    n_layers = config.depth + config.depth_single
    layer_list, stream_list = parse_layers(layers, n_layers), parse_streams(streams)
    units = select_units(config, layers, streams)
    if not units:
        raise UserError("--layers and --streams select no unit group")
    kept = choose_kept(stats, units, criterion=criterion, fraction=fraction, count=count, threshold=threshold)

    model, _ = load_flux(tpath, device="cpu")
    widths = unit_widths(model.config)
    before = n_params(model)
    prune_model(model, kept)
    after = n_params(model)
    groups = {u: {"width": widths[u], "kept": int(kept[u].numel()), "removed": widths[u] - int(kept[u].numel())}
              for u in units}
    removed = sum(g["removed"] for g in groups.values())
    record = {
        "stats_fingerprint": stats.fingerprint, "model_fingerprint": fp, "stats_file": Path(stats_path).name,
        "stats_positions": sum(stats.positions.values()), "criterion": criterion, "mode": mode, "value": value,
        "layers": layers or "all", "layer_indices": layer_list, "streams": list(stream_list), "groups": groups,
        "units_removed": removed, "units_kept": sum(widths.values()) - removed, "units_total": sum(widths.values()),
        "parameters_before": before, "parameters_after": after, "source": model_path.name,
    }
    if previous:
        try:
            record["previous"] = json.loads(previous)
        except json.JSONDecodeError:
            record["previous"] = previous
    saved = save_transformer_like(model_path, model, out_path, extra_tensors=kept_tensors(kept),
                                  metadata={"rflow.pruning": record})
    return {**record, "output": str(saved.path), "layout": saved.layout, "note": saved.note}


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
):
    """Remove MLP hidden units that the statistics say matter least; write the model like its source."""
    model = default_model(model)
    r = prune_checkpoint(model, stats, output, fraction=fraction, count=count, threshold=threshold, layers=layers,
                         streams=streams, criterion=criterion)
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
    guidance: float = typer.Option(3.5, "--guidance"),
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
    from ..pipeline import load
    from ..sampling import SOLVERS
    from .measure import measure as run_measure

    given = [o for o, v in (("--capture", capture), ("--prompts", prompts), ("--shapes", shapes_n)) if v is not None]
    if len(given) > 1:
        raise UserError(f"give one of --capture, --prompts, --shapes (got {' and '.join(given)})")
    if solver not in SOLVERS:
        raise UserError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if batch < 1:
        raise UserError(f"--batch must be ≥ 1, got {batch}")
    model = default_model(model)
    if capture is not None:
        res = _measure_capture(model, reference, capture, batch=batch, device=device, dtype=dtype)
    else:
        pipe = load(model, text_encoders=text_encoders, vae=vae, device=device, dtype=dtype)
        ref = load(reference, device=pipe.device, dtype=pipe.transformer.dtype)
        work = _workload(ref, prompts=prompts, shapes_n=shapes_n, sizes=sizes, steps=steps, seed=seed)
        res = run_measure(pipe, ref, work, guidance=guidance, solver=solver, batch=batch)
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
    guidance: float = typer.Option(3.5, "--guidance"),
    solver: str = typer.Option("euler", "--solver"),
    criterion: str = typer.Option("frequency", "--criterion", help="frequency | magnitude"),
    streams: Optional[str] = typer.Option(None, "--streams", help="img,txt,single (default: all)"),
    batch: int = typer.Option(8, "--batch", help="prompts per forward pass"),
    png: Path = typer.Option(Path("sensitivity.png"), "--png", help="bar chart of the error per layer"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the table as JSON here"),
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
    from ..checkpoints.io import atomic_write_bytes
    from ..pipeline import load
    from ..sampling import SOLVERS
    from .measure import sensitivity as run_sensitivity
    from .measure import sensitivity_png
    from .units import parse_streams

    if not 0.0 < level < 1.0:
        raise UserError(f"--level must be in (0, 1), got {level}")
    _check_criterion(criterion)
    parse_streams(streams)
    if solver not in SOLVERS:
        raise UserError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if batch < 1:
        raise UserError(f"--batch must be ≥ 1, got {batch}")
    for path, suffix in ((png, ".png"), (json_out, ".json")):
        if path is not None and (path.suffix.lower() != suffix or not path.parent.is_dir()):
            raise UserError(f"{path}: must be a {suffix} file in an existing directory")
    model = default_model(model)
    st, _ = load_stats_for(stats, model)
    pipe = load(model, text_encoders=text_encoders, vae=vae, device=device, dtype=dtype)
    check_stats_widths(st, pipe.transformer.config)
    work = _workload(pipe, prompts=prompts, shapes_n=shapes_n, sizes=sizes, steps=steps, seed=seed)
    live = sys.stderr.isatty()

    def progress(row):
        if live:
            print(f"layer {row['layer']}: velocity MSE {_num(row['velocity_mse'])}", file=sys.stderr)

    res = run_sensitivity(pipe, st, work, level=level, criterion=criterion, streams=streams, guidance=guidance,
                          solver=solver, batch=batch, progress=progress)
    atomic_write_bytes(png, sensitivity_png(res))
    if json_out is not None:
        atomic_write_bytes(json_out, json.dumps(_finite(res), indent=1).encode())
    print(f"{'layer':>5}  {'kind':<6}  {'zeroed':>13}  {'velocity MSE':>12}  {'relative':>9}")
    for r in res["layers"]:
        print(f"{r['layer']:>5}  {r['kind']:<6}  {r['zeroed']:>6}/{r['units']:<6}  {_num(r['velocity_mse']):>12}  "
              f"{_num(r['velocity_rel_mse']):>9}")
    print(f"plot: {png}")
    if json_out is not None:
        print(f"json: {json_out}")


# ---------------------------------------------------------------------------------------------- capture


def _manifest(path: Path) -> dict:
    """The rflow pipeline manifest of a model path ({} for other layouts)."""
    from ..checkpoints.io import read_json
    from .save import MANIFEST

    return read_json(path / MANIFEST) if (path / MANIFEST).exists() else {}


def _prediction(manifest: dict) -> str:
    kind = manifest.get("prediction", "velocity")
    if kind not in ("velocity", "data"):
        raise UserError(f"unknown model prediction type {kind!r} (velocity or data)")
    return kind


def _measure_capture(model: Path, reference: Path, capture: Path, *, batch: int, device, dtype) -> dict:
    """``measure --capture``: only the model's transformer is loaded; the capture stands in for the reference."""
    import torch

    from ..checkpoints.flux import load_flux
    from ..pipeline import Pipeline, default_device, default_dtype, parse_dtype
    from .capture import CaptureReader
    from .measure import measure_capture
    from .save import model_fingerprint, transformer_path

    reader = CaptureReader(capture)
    ref_fp = model_fingerprint(reference)
    dev = torch.device(device) if device is not None else default_device()
    dt = parse_dtype(dtype) if dtype else default_dtype(dev)
    net, info = load_flux(transformer_path(model), device=dev, dtype=dt)
    m, r = _manifest(Path(model)), _manifest(Path(reference))
    pipe = Pipeline(net, None, None, name=m.get("name", info.family), fingerprint=model_fingerprint(model),
                    prediction=_prediction(m))
    res = measure_capture(pipe, reader, reference_fingerprint=ref_fp, batch=batch,
                          reference_prediction=_prediction(r))
    return {"model": pipe.name, "model_fingerprint": pipe.fingerprint,
            "reference": reader.index.get("model", {}).get("name", "?"), **res}


def register(app) -> None:
    app.command("prune")(prune)
    app.command("measure")(measure)
    app.command("sensitivity")(sensitivity)
