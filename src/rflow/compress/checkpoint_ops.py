"""Compression verbs over model paths: prune a checkpoint with its statistics, measure a model against a
capture of its reference. The CLI (``rflow prune``, ``rflow measure --capture``) is a thin layer over these."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError, flag
from ..paths import model_name, resolve_model


def load_stats_for(stats_path: Path, model_path: Path):
    """Statistics file checked against the model: same fingerprint, same unit widths."""
    from .save import model_fingerprint
    from .stats import ActivationStats

    stats = ActivationStats.load(stats_path)
    stats.check_usable(stats_path)
    fp = model_fingerprint(model_path)
    if stats.fingerprint != fp:
        raise UserError(f"{stats_path}: statistics were collected on model {stats.fingerprint or '?'}, "
                        f"not on {model_name(model_path)} ({fp}); run rflow analyze on this model")
    return stats, fp


def check_stats_widths(stats, config) -> None:
    from .units import unit_widths

    for u, w in unit_widths(config).items():
        if u not in stats.count:
            raise UserError(f"statistics have no unit {u!r}")
        if stats.count[u].numel() != w:
            raise UserError(f"statistics give {u} {stats.count[u].numel()} units, the model has {w}")


def _mode(fraction, count, threshold) -> tuple[str, float | int]:
    from .. import options

    given = [(n, v) for n, v in (("fraction", fraction), ("count", count), ("threshold", threshold)) if v is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one of {flag('fraction')}, {flag('count')} or {flag('threshold')}")
    name, value = given[0]
    if name == "fraction":
        options.number(value, "fraction", low=0, high=1, low_open=True, high_open=True)
    elif name == "count":
        options.integer(value, "count", low=1)
    else:
        options.number(value, "threshold", low=0, low_open=True)
    return name, value


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


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- library


def prune_checkpoint(model_path: str | Path, stats_path: str | Path, out_path: str | Path, *,
                     fraction: float | None = None, count: int | None = None, threshold: float | None = None,
                     layers: str | None = None, streams: str | None = None, criterion: str = "frequency",
                     force: bool = False) -> dict:
    """``rflow prune`` as a function: returns the pruning record (also stored as ``rflow.pruning``)
    with ``output``, ``layout`` and ``note`` added. An existing output is replaced only with ``force``;
    a choice that removes no unit is refused (nothing is written)."""
    from ..checkpoints.loader import Checkpoint, load_transformer
    from .prune import choose_kept, kept_tensors, prune_model
    from .save import check_output, save_transformer_like, transformer_path
    from .units import n_layers as count_layers, parse_layers, parse_streams, select_units, streams_of, unit_widths

    mode, value = _mode(fraction, count, threshold)
    _check_criterion(criterion)
    model_path, out_path = resolve_model(model_path), Path(out_path).expanduser()
    check_output(model_path, out_path, force=force)
    stats, fp = load_stats_for(Path(stats_path), model_path)
    tpath = transformer_path(model_path)
    with Checkpoint(tpath) as ck:
        config, previous = ck.config, ck.files.metadata.get("rflow.pruning")
    check_stats_widths(stats, config)
    layer_list = parse_layers(layers, count_layers(config))
    stream_list = parse_streams(streams, streams_of(config)) or streams_of(config)
    units = select_units(config, layers, streams)
    if not units:
        raise UserError("--layers and --streams select no unit group")
    kept = choose_kept(stats, units, criterion=criterion, fraction=fraction, count=count, threshold=threshold)
    if all(kept[u].numel() == stats.count[u].numel() for u in units):
        raise UserError(f"{flag(mode, str(value))} removes no unit of the selected groups; nothing was written")

    model, _ = load_transformer(tpath, device="cpu")
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
        "parameters_before": before, "parameters_after": after, "source": model_name(model_path),
    }
    if previous:
        try:
            record["previous"] = json.loads(previous)
        except json.JSONDecodeError:
            record["previous"] = previous
    saved = save_transformer_like(model_path, model, out_path, extra_tensors=kept_tensors(kept),
                                  metadata={"rflow.pruning": record}, force=force)
    return {**record, "output": str(saved.path), "layout": saved.layout, "note": saved.note}


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


def measure_against_capture(model: Path, reference: Path, capture: Path, *, batch: int, device, dtype) -> dict:
    """``measure --capture``: only the model's transformer is loaded; the capture stands in for the reference."""

    from ..checkpoints.loader import load_transformer
    from ..pipeline import Pipeline, default_device, default_dtype, parse_dtype
    from .capture import CaptureReader
    from .measure import measure_capture
    from .save import model_fingerprint, transformer_path

    from ..options import device as check_device

    model, reference = resolve_model(model), resolve_model(reference)
    reader = CaptureReader(capture)
    ref_fp = model_fingerprint(reference)
    dev = check_device(device) if device is not None else default_device()
    dt = parse_dtype(dtype) if dtype else default_dtype(dev)
    net, info = load_transformer(transformer_path(model), device=dev, dtype=dt)
    m, r = _manifest(Path(model)), _manifest(Path(reference))
    pred = _prediction(m)
    pipe = Pipeline(net, None, None, name=m.get("name", info.family), fingerprint=model_fingerprint(model),
                    family=info.family_kind, denoiser_options={} if pred == "velocity" else {"prediction": pred})
    res = measure_capture(pipe, reader, reference_fingerprint=ref_fp, batch=batch,
                          reference_prediction=_prediction(r))
    return {"model": pipe.name, "model_fingerprint": pipe.fingerprint,
            "reference": reader.index.get("model", {}).get("name", "?"), **res}
