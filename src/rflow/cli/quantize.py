"""``rflow quantize``: write a transformer with its linear layers quantized (rflow.quant); registered on
the main app by :mod:`rflow.cli`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import MODEL_HELP, force_option


def quantize(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    to: Optional[str] = typer.Option(None, "--to", help="format: int8, fp8, Q8_0, Q6_K, Q5_1, Q5_0, Q5_K, Q4_1, Q4_0, "
                                                        "Q4_K, Q3_K, Q2_K"),
    layers: Optional[str] = typer.Option(None, "--layers", help="which linear layers get --to: globs over their names, "
                                                                "comma-separated (default: every eligible one)"),
    plan: Optional[Path] = typer.Option(None, "--plan", help="PLAN.json: {layer glob: format}, first match wins"),
    output: Path = typer.Option(..., "-o", "--output", help=".safetensors (rflow's layout) or .gguf (ComfyUI-GGUF's)"),
    fallback: bool = typer.Option(False, "--fallback", help="K-quants take llama.cpp's fallback type on layers whose "
                                                            "input width 256 does not divide (Q6_K→Q8_0, Q5_K→Q5_1, "
                                                            "Q4_K→Q5_0, Q3_K/Q2_K→Q4_0)"),
    capture: Optional[Path] = typer.Option(None, "--capture", help="capture of --model (rflow capture) to distil the "
                                                                   "blocks a --plan prunes on, when the plan was distilled"),
    as_json: bool = typer.Option(False, "--json", help="print the per-layer summary as JSON"),
    force: bool = force_option(),
):
    """Quantize a transformer's linear layers (embedders and output layer stay high precision) and write it."""
    from ..memory import format_bytes
    from ..outputs import check_output
    from ..paths import resolve_model
    from ..quant.checkpoint import quantize_checkpoint, read_plan

    if (to is None) == (plan is None):
        raise UserError("give --to FORMAT (with --layers) or --plan PLAN.json")
    if plan is not None and layers is not None:
        raise UserError("--layers goes with --to; a --plan names its layers itself")
    if capture is not None and plan is None:
        raise UserError("--capture goes with --plan (it distils the blocks a plan prunes)")
    check_output(output, suffixes=(".safetensors", ".gguf"), force=force, what="the quantized model")
    if plan is not None:
        chosen = read_plan(plan)
    else:
        patterns = [p.strip() for p in (layers or "*").split(",") if p.strip()]
        if not patterns:
            raise UserError("--layers names no layer pattern")
        chosen = {p: to for p in patterns}
    res = quantize_checkpoint(resolve_model(model), output, chosen, force=force, fallback=fallback, capture=capture)
    if as_json:
        print(json.dumps(res))
        return
    formats: dict[str, int] = {}
    for v in res["layers"].values():
        formats[v["format"]] = formats.get(v["format"], 0) + 1
    print(f"{res['family']}: {len(res['layers'])} linear layers ({', '.join(f'{n} {f}' for f, n in formats.items())})")
    print(f"weights of those layers: {format_bytes(res['bytes'])} ({100 * res['ratio']:.1f}% of bf16, "
          f"{res['bits_per_weight']:.2f} bits per weight)")
    print(res["output"])


def register(app) -> None:
    app.command()(quantize)
