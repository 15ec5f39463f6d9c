"""FLUX.1 transformer checkpoints: :class:`FluxCheckpoint` and :func:`load_flux` are the generic
:mod:`rflow.checkpoints.loader` held to the FLUX.1 family (for tools that only handle FLUX.1-shaped
models). The layouts, key plans and config inference live in :mod:`rflow.families.flux1`."""

from __future__ import annotations

import os

import torch

from ..families.flux1_keys import (CONFIG_METADATA_KEY, PREFIXES, default_axes_dim, detect_format,  # noqa: F401
                              diffusers_plan, expected_shapes, family_of, infer_config)
from ..models.flux import Flux
from .loader import Checkpoint, CheckpointInfo, LoadPlan, load_transformer

__all__ = ["CONFIG_METADATA_KEY", "PREFIXES", "CheckpointInfo", "FluxCheckpoint", "LoadPlan", "default_axes_dim",
           "detect_format", "diffusers_plan", "expected_shapes", "family_of", "infer_config", "load_flux"]


class FluxCheckpoint(Checkpoint):
    """An opened FLUX.1 transformer checkpoint: lazy weights + BFL key plan + inferred config."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, family="flux1")


def load_flux(path: str | os.PathLike, *, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None, plan: LoadPlan | None = None) -> tuple[Flux, CheckpointInfo]:
    """A FLUX.1-shaped transformer built on the meta device and loaded with ``assign=True``.

    ``dtype`` defaults to the checkpoint's floating dtype (float8 is upcast to bfloat16)."""
    return load_transformer(path, device=device, dtype=dtype, plan=plan, family="flux1")
