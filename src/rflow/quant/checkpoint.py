"""``rflow quantize`` as functions: read a plan file and apply it to a checkpoint.

A plan file is what ``rflow plan`` writes (:func:`rflow.quant.planner.plan`) or a bare JSON object of
layer globs -> formats. A planner's file may also prune: ``prune`` holds the kept hidden units of every
pruned MLP unit group (chosen from the activation counts the planner measured), and ``distill``, when
the planner distilled the pruned blocks on a capture, its settings — applying such a plan distils them
again on that capture (the same seed: the same student, up to the device's arithmetic) before the
layers are quantized.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError


@dataclass
class PlanFile:
    layers: dict[str, str]  # layer glob -> format (first match wins)
    prune: dict[str, list[int]] | None = None  # unit group -> kept hidden units
    distill: dict | None = None  # the planner's distillation settings (steps, lr, batch, seed), if it distilled
    model_fingerprint: str | None = None  # the model the plan was measured on


def read_plan(plan: str | os.PathLike) -> PlanFile:
    """A plan file: a JSON object of layer globs -> formats, or a planner's file holding it under "layers"."""
    from ..checkpoints.io import read_json

    path = Path(plan).expanduser()
    data = read_json(path)
    prune = distill = fingerprint = None
    if isinstance(data, dict) and isinstance(data.get("layers"), dict):
        prune, distill, fingerprint = data.get("prune"), data.get("distill"), data.get("model_fingerprint")
        data = data["layers"]
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise UserError(f"{plan}: a plan is a JSON object of layer patterns and formats, e.g. {{\"*\": \"Q8_0\"}}")
    if prune is not None and not (isinstance(prune, dict) and all(
            isinstance(k, str) and isinstance(v, list) and v and all(isinstance(i, int) and i >= 0 for i in v)
            for k, v in prune.items())):
        raise UserError(f"{plan}: \"prune\" must map unit groups to non-empty lists of kept unit indices")
    if distill is not None and not (isinstance(distill, dict) and all(k in distill for k in ("steps", "lr", "batch", "seed"))):
        raise UserError(f"{plan}: \"distill\" must hold the settings steps, lr, batch and seed")
    return PlanFile(data, prune or None, distill, fingerprint if isinstance(fingerprint, str) else None)


def quantize_checkpoint(model_path: str | os.PathLike, out_path: str | os.PathLike, plan: dict[str, str] | PlanFile, *,
                        force: bool = False, fallback: bool = False, capture: str | os.PathLike | None = None) -> dict:
    """Load the transformer (expanded), prune it when the plan prunes (distilling the pruned blocks on
    ``capture`` when the plan was distilled), quantize it by the plan's layers (``fallback``: K-quants
    take llama.cpp's fallback type where they do not fit), and write it (``.safetensors`` or ``.gguf``);
    returns the per-layer summary with the output path. Everything is checked before any work."""
    from ..checkpoints.loader import load_transformer
    from ..compress.save import model_fingerprint
    from ..outputs import check_output
    from ..paths import resolve_model, transformer_path
    from .api import plan_summary, quantize_, resolve_plan
    from .save import save_quantized

    pf = plan if isinstance(plan, PlanFile) else PlanFile(plan)
    out = check_output(out_path, suffixes=(".safetensors", ".gguf"), force=force, what="the quantized model")
    root = resolve_model(model_path)
    src = transformer_path(root)
    if out.resolve() == Path(src).resolve():
        raise UserError(f"{out}: refusing to write over the source model")
    if capture is not None and pf.distill is None:
        raise UserError("--capture distils the blocks a plan prunes, and this plan was made without distillation")
    if pf.distill is not None and capture is None:
        raise UserError("this plan's pruned blocks were distilled on a capture when it was made: give that capture "
                        "with --capture DIR")
    reader = None
    if pf.prune:
        fp = model_fingerprint(root)
        if pf.model_fingerprint and fp != pf.model_fingerprint:
            raise UserError(f"this plan prunes units chosen on model {pf.model_fingerprint}, and this model is {fp}")
        if capture is not None:
            from ..compress.capture import CaptureReader

            reader = CaptureReader(capture)
            if reader.fingerprint and reader.fingerprint != fp:
                raise UserError(f"{reader.path}: captured from model {reader.fingerprint}, not from this one ({fp})")
    model, info = load_transformer(src, device="cpu")
    if pf.prune:
        model = _pruned(model, pf, reader)
    chosen = resolve_plan(model, pf.layers, fallback=fallback)  # the whole plan is checked before any layer changes
    if out.suffix.lower() == ".gguf":
        from .linear import canonical_format

        bad = [(n, f) for n, f in chosen.items() if canonical_format(f) in ("int8", "fp8")]
        if bad:
            raise UserError(f"{bad[0][0]}: {bad[0][1]} has no GGUF type; use GGUF types for a .gguf output, "
                            "or write .safetensors")
    quantize_(model, pf.layers, fallback=fallback)
    summary = plan_summary(model)
    provenance = {"model": str(model_path), "family": info.family, "plan": pf.layers}
    if pf.prune:
        provenance["pruned_units"] = {u: len(v) for u, v in pf.prune.items()}
        provenance["distilled"] = pf.distill is not None
    save_quantized(model, out, metadata={"rflow.quantized_from": provenance})
    return {**summary, "output": str(out), "family": info.family}


def _pruned(model, pf: PlanFile, reader):
    from ..compress.prune import pruned_copy
    from ..compress.units import refs_by_name
    from .plan_options import distilled

    refs = refs_by_name(model)
    unknown = next((u for u in pf.prune if u not in refs), None)
    if unknown is not None:
        raise UserError(f"the plan prunes unit group {unknown!r}, which this model does not have")
    kept = {u: torch.tensor(sorted(set(v)), dtype=torch.int64) for u, v in pf.prune.items()}
    student = pruned_copy(model, kept)
    if reader is not None:
        settings = {k: pf.distill[k] for k in ("steps", "lr", "batch", "seed")}
        distilled(model, student, reader, sorted({refs[u].layer for u in kept}), settings)
    return student
