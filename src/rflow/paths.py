"""Where a model named by the user lives: the built-in model by name, and the transformer inside each layout.

``resolve_model`` turns ``None`` or the name ``rflow-tiny`` into the embedded model's folder (a real
path of that name wins); ``source_layout`` tells how a model path is laid out and
``transformer_path`` finds the transformer checkpoint inside it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

EMBEDDED = ("rflow-tiny",)
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "rflow-tiny"  # the shipped rflow-tiny pipeline folder
MANIFEST = "rflow_pipeline.json"
TRANSFORMER_FILE = "transformer.safetensors"

# source layouts
RFLOW_PIPELINE = "rflow-pipeline"
DIFFUSERS_PIPELINE = "diffusers-pipeline"
TRANSFORMER_FOLDER = "transformer-folder"
SINGLE_FILE = "single-file"


def embedded_model_dir() -> Path:
    """The shipped rflow-tiny pipeline folder (the default model everywhere)."""
    if not (DEFAULT_MODEL_DIR / MANIFEST).exists():
        raise UserError(f"the embedded rflow-tiny model is missing from this install ({DEFAULT_MODEL_DIR})")
    return DEFAULT_MODEL_DIR


def resolve_model(path: str | os.PathLike | None) -> Path:
    """A model path as given, ``~`` expanded; ``None`` or ``rflow-tiny`` (when no such file exists) is the
    embedded model."""
    if path is None or (str(path) in EMBEDDED and not Path(path).exists()):
        return embedded_model_dir()
    return Path(path).expanduser()


def model_name(path: str | os.PathLike | None) -> str:
    """How to show a model path in reports: the embedded model by its name."""
    p = resolve_model(path)
    return "rflow-tiny" if p.resolve() == DEFAULT_MODEL_DIR.resolve() else str(path)


def source_layout(path: str | os.PathLike | None) -> str:
    """How a model path is laid out: one of ``rflow-pipeline``, ``diffusers-pipeline``,
    ``transformer-folder`` (diffusers ``transformer/`` or sharded BFL) and ``single-file``."""
    p = resolve_model(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    if p.is_dir():
        if (p / MANIFEST).exists():
            return RFLOW_PIPELINE
        if (p / "model_index.json").exists() or ((p / "transformer").is_dir() and not list(p.glob("*.safetensors"))):
            return DIFFUSERS_PIPELINE
        return TRANSFORMER_FOLDER
    return SINGLE_FILE


def transformer_path(path: str | os.PathLike | None) -> Path:
    """The transformer checkpoint inside a model path (the one :func:`rflow.load` fingerprints)."""
    p = resolve_model(path)
    layout = source_layout(p)
    if layout == RFLOW_PIPELINE:
        return p / TRANSFORMER_FILE
    if layout == DIFFUSERS_PIPELINE:
        return p / "transformer"
    return p
