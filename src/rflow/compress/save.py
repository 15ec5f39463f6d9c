"""Write a modified transformer (pruned, later distilled or quantized) as the same kind of model as its source.

=====================================  ==========================================================
source                                 what is written
=====================================  ==========================================================
rflow pipeline folder                  a new rflow pipeline folder: everything copied, with
                                       ``transformer.safetensors`` replaced
BFL / ComfyUI single file              one BFL safetensors file
diffusers ``transformer/`` folder      one BFL safetensors file
diffusers pipeline root                one BFL safetensors file; its VAE and text encoders stay in
                                       the original folder (``--vae`` / ``--text-encoders``)
=====================================  ==========================================================

Every transformer written here has its family's own (original) keys — BFL's for FLUX.1 and FLUX.2,
Z-Image's original names — and the family's config metadata (RoPE axes, theta: what shapes cannot
tell), so :func:`rflow.load` infers every block's width from the shapes and needs no flags.
Bookkeeping tensors (``rflow.kept.<unit>``) ride along in the same file; the checkpoint loader
skips keys that start with ``rflow.``. Writes follow rflow.outputs (a temporary sibling swapped in on
success; an existing output only with
``force``) and the source is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints.loader import Checkpoint
from ..errors import UserError
from ..paths import (DIFFUSERS_PIPELINE, MANIFEST, RFLOW_PIPELINE, SINGLE_FILE, TRANSFORMER_FILE,  # noqa: F401
                     TRANSFORMER_FOLDER, source_layout, transformer_path)


def model_fingerprint(path: str | os.PathLike) -> str:
    """Equal to ``rflow.load(path).fingerprint`` without loading any weight."""
    with Checkpoint(transformer_path(path)) as ck:
        return ck.fingerprint()


@dataclass
class SavedModel:
    path: Path
    layout: str  # what was written: "rflow-pipeline" | "single-file"
    source_layout: str
    note: str | None = None  # how to load it when the VAE / text encoders are not next to it


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies under it."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_output(source_path: str | os.PathLike, out_path: str | os.PathLike, *, force: bool = False) -> str:
    """Raise a :class:`UserError` if ``out_path`` cannot receive a model saved like ``source_path``
    (call it before long work); returns the source layout. An existing output is replaced only with
    ``force``; the source itself never."""
    from ..outputs import check_output as check_path

    src, dst = Path(source_path).expanduser(), Path(out_path).expanduser()
    layout = source_layout(src)
    s, d = src.resolve(), dst.resolve()
    if s == d or (src.is_dir() and _inside(d, s)) or _inside(s, d):
        raise UserError(f"{dst}: refusing to write over or inside the source model {src}")
    if layout == RFLOW_PIPELINE:
        if dst.suffix.lower() == ".safetensors":
            raise UserError(f"{dst}: the source is an rflow pipeline folder, so the output is a folder too: give a folder name")
        check_path(dst, kind="dir", force=force, what="the output model")
    else:
        check_path(dst, suffixes=(".safetensors",), force=force, what="the output (a single BFL transformer file)")
    return layout


def _metadata(model: torch.nn.Module, metadata: dict | None) -> dict[str, str]:
    from .units import family_of

    meta = dict(family_of(model.config).config_metadata(model.config))
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return meta


def _tensors(model: torch.nn.Module, dtype: torch.dtype, extra: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    for k, v in (extra or {}).items():
        if not k.startswith("rflow."):
            raise UserError(f"extra tensor {k!r}: bookkeeping keys must start with 'rflow.'")
        sd[k] = v.detach().cpu().contiguous()
    return sd


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors written straight to ``path`` (no second in-memory copy of a 24 GB transformer);
    callers write into a temporary sibling (rflow.outputs)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def save_transformer_like(source_path: str | os.PathLike, model: torch.nn.Module, out_path: str | os.PathLike, *,
                          extra_tensors: dict[str, torch.Tensor] | None = None, metadata: dict | None = None,
                          dtype: torch.dtype | None = None, force: bool = False) -> SavedModel:
    """Write ``model`` as the same kind of model as ``source_path`` (see the module docstring).

    ``extra_tensors``: ``rflow.*`` tensors stored beside the weights (e.g. :func:`~rflow.compress.prune.kept_tensors`).
    ``metadata``: extra safetensors metadata; non-string values are stored as JSON.
    ``dtype``: of the weights; defaults to the source's stored dtype (float8 sources are written as bfloat16).
    """
    from ..outputs import replacing

    src, dst = Path(source_path).expanduser(), Path(out_path).expanduser()
    layout = check_output(src, dst, force=force)
    if dtype is None:
        with Checkpoint(transformer_path(src)) as ck:
            dtype = ck.stored_dtype()
    tensors = _tensors(model, dtype, extra_tensors)
    meta = _metadata(model, metadata)

    if layout == RFLOW_PIPELINE:
        with replacing(dst, "dir") as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True,
                            ignore=lambda d, names: [TRANSFORMER_FILE] if Path(d) == src else [])
            _save_file(tensors, tmp / TRANSFORMER_FILE, meta)
        return SavedModel(dst, RFLOW_PIPELINE, layout)

    with replacing(dst) as tmp:
        _save_file(tensors, tmp, meta)
    note = None
    if layout == DIFFUSERS_PIPELINE:
        note = (f"{dst} holds only the transformer: load it with --vae {src / 'vae'} --text-encoders {src} "
                f"(vae=…, text_encoders=… in rflow.load)")
    else:
        root = src.parent  # where rflow.load looks for the VAE and text encoders of the source
        if dst.resolve().parent != root.resolve():
            note = (f"{dst} holds only the transformer: pass --vae / --text-encoders pointing at the ones used "
                    f"with {src} (or write it next to the source)")
    return SavedModel(dst, SINGLE_FILE, layout, note)
