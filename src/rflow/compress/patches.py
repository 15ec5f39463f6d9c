"""Distillation patches: trained block tensors for a pruned student, applied at load time or baked in.

A patch file is a safetensors file holding the trained tensors under their BFL keys
(``double_blocks.3.img_mlp.0.weight``, ``single_blocks.0.linear1.weight`` …) with JSON metadata under
``rflow.patches``: ``{"schema": "rflow.patches", "version": 2, "teacher_fingerprint",
"student_fingerprint", "layers", "train", "report"}``.

* :func:`apply_patches` copies them into a loaded :class:`~rflow.models.flux.Flux` (every key and
  shape checked first, so a mismatch changes nothing);
* :func:`load_with_patches` is :func:`rflow.load` followed by :func:`apply_patches`;
* :func:`write_patched` writes a patched model of the same kind as the student: an rflow pipeline
  folder becomes a new folder (everything copied, ``transformer.safetensors`` rewritten with every
  other tensor — ``rflow.kept.*`` pruning indices included — and the file metadata kept), a single
  BFL/ComfyUI file becomes a new single file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from .. import __version__
from ..checkpoints.flux import FluxCheckpoint, load_flux
from ..checkpoints.io import open_weights, read_json, save_safetensors
from ..errors import NonFiniteError, UserError, flag
from ..models.flux import Flux
from ..paths import MANIFEST, resolve_model
from .save import model_fingerprint, transformer_path

SCHEMA = "rflow.patches"
VERSION = 2  # 2: teacher/student fingerprints are content fingerprints of the tensors (1: of the file header)
METADATA_KEY = "rflow.patches"
PATCHED_KEY = "rflow.patched"


# ---------------------------------------------------------------------------------------------- models


def load_transformer(path: str | os.PathLike | None, *, device=None, dtype: torch.dtype | None = None) -> tuple[Flux, str]:
    """Only the transformer of a model (no text encoders or VAE) and its fingerprint; ``None`` is the
    embedded rflow-tiny model."""
    tp = transformer_path(resolve_model(path))
    fingerprint = model_fingerprint(tp)
    model, _ = load_flux(tp, device=device, dtype=dtype)
    return model, fingerprint


# ---------------------------------------------------------------------------------------------- files


def patch_tensors(patches: dict[int, dict[str, Tensor]], *, train: str, report: list[dict],
                  teacher_fingerprint: str = "", student_fingerprint: str = "") -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of a patch file for ``patches`` (layer -> {BFL key: tensor},
    as :func:`~rflow.compress.distill.distill` returns)."""
    tensors: dict[str, Tensor] = {}
    for L in sorted(patches):
        for k, t in patches[L].items():
            if k in tensors:
                raise UserError(f"patch key {k!r} appears in two layers")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"patch {k} holds NaN/inf; not saved")
            tensors[k] = t.detach().cpu()
    if not tensors:
        raise UserError("no patches to save")
    meta = {"schema": SCHEMA, "version": VERSION, "rflow": __version__, "teacher_fingerprint": teacher_fingerprint,
            "student_fingerprint": student_fingerprint, "layers": sorted(int(L) for L in patches), "train": train,
            "report": report}
    return tensors, {METADATA_KEY: json.dumps(meta)}


def save_patches(path: str | os.PathLike, patches: dict[int, dict[str, Tensor]], *, train: str, report: list[dict],
                 teacher_fingerprint: str = "", student_fingerprint: str = "") -> Path:
    """Write ``patches`` as a patch file (through a temporary sibling)."""
    tensors, meta = patch_tensors(patches, train=train, report=report, teacher_fingerprint=teacher_fingerprint,
                                  student_fingerprint=student_fingerprint)
    p = Path(path).expanduser()
    save_safetensors(tensors, p, meta)
    return p


def read_patches(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(BFL key -> tensor, metadata) of a patch file; one-line UserError for anything else."""
    p = Path(path).expanduser()
    with open_weights(p) as f:
        raw = f.metadata.get(METADATA_KEY)
        if raw is None:
            raise UserError(f"{p}: not an rflow patch file (no {METADATA_KEY} metadata)")
        try:
            meta = json.loads(raw)
            if not isinstance(meta, dict):
                raise ValueError
        except ValueError:
            raise UserError(f"{p}: corrupt patch metadata") from None
        if meta.get("schema") == SCHEMA and meta.get("version") == 1:
            raise UserError(f"{p}: patches from an older rflow, which identified models by file header; "
                            "run rflow distill again")
        if meta.get("schema") != SCHEMA or not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
            raise UserError(f"{p}: patch schema {meta.get('schema')!r} v{meta.get('version')} is not {SCHEMA} ≤ v{VERSION}")
        tensors = {k: f.get(k) for k in f.keys()}
    if not tensors:
        raise UserError(f"{p}: patch file holds no tensors")
    return tensors, meta


def patches_hash(path: str | os.PathLike) -> str:
    """The sha256 of a patch file, first 10 hex digits (as a model hash)."""
    from ..checkpoints.hashing import model_hash

    return model_hash([Path(path).expanduser()])


def _check(tensors: dict[str, Tensor], shapes: dict[str, tuple], where, prefix: str = "") -> None:
    for k, t in tensors.items():
        if f"{prefix}{k}" not in shapes:
            raise UserError(f"{where}: patch tensor {k!r} is not in this model (patches for another kind of model?)")
        want = tuple(shapes[f"{prefix}{k}"])
        if tuple(t.shape) != want:
            raise UserError(f"{where}: patch {k} has shape {tuple(t.shape)}, the model has {want} "
                            "(patches for another student?)")


def _check_fingerprint(meta: dict, fingerprint: str | None, patches: Path, any_student: bool) -> None:
    want = meta.get("student_fingerprint") or ""
    if not any_student and fingerprint and want and want != fingerprint:
        raise UserError(f"{patches}: patches were trained for student {want}, this model is {fingerprint} "
                        f"({flag('any_student', switch=True)} applies them anyway)")


# ---------------------------------------------------------------------------------------------- applying


def apply_patches(model: Flux, path: str | os.PathLike, *, fingerprint: str | None = None,
                  any_student: bool = False) -> dict:
    """Copy a patch file's tensors into ``model`` in place; returns the patch metadata.

    Every key and shape is checked before anything changes. If ``fingerprint`` (the model's) is given
    and the patches name another student, that is an error unless ``any_student``."""
    p = Path(path).expanduser()
    tensors, meta = read_patches(p)
    _apply(model, tensors, meta, p, fingerprint, any_student)
    return meta


def _apply(model: Flux, tensors: dict[str, Tensor], meta: dict, where: Path, fingerprint: str | None,
           any_student: bool) -> None:
    _check_fingerprint(meta, fingerprint, where, any_student)
    sd = model.state_dict()
    _check(tensors, {k: v.shape for k, v in sd.items()}, where)
    with torch.no_grad():
        for k, t in tensors.items():
            sd[k].copy_(t.to(sd[k].dtype))


def load_with_patches(path, patches: str | os.PathLike, *, any_student: bool = False, **load_kw):
    """:func:`rflow.load` ``(path, **load_kw)`` with ``patches`` applied to its transformer.

    The patch file is validated before the model is loaded. The pipeline's fingerprint becomes
    ``<model>+<patches>``, so images record what made them."""
    from ..pipeline import load

    pp = Path(patches).expanduser()
    tensors, meta = read_patches(pp)
    pipe = load(path, **load_kw)
    _apply(pipe.transformer, tensors, meta, pp, pipe.fingerprint, any_student)
    pipe.patches_hash = patches_hash(pp)
    pipe.fingerprint = f"{pipe.fingerprint}+{pipe.patches_hash}"
    return pipe


def write_patched(model: str | os.PathLike, patches: str | os.PathLike, out: str | os.PathLike, *,
                  force: bool = False, any_student: bool = False) -> Path:
    """Write ``model`` with ``patches`` baked in as a new model of the same kind at ``out``.

    rflow pipeline folder -> new folder (all files copied, ``transformer.safetensors`` rewritten, the
    manifest gains a ``patched`` entry); single BFL/ComfyUI ``.safetensors`` -> new single file. Every
    tensor not patched (``rflow.kept.*`` included) is kept as is, in its stored dtype. An existing
    ``out`` is replaced only with ``force`` (rflow.outputs); ``any_student`` applies patches trained
    for another student fingerprint (shapes must still match).
    """
    from safetensors import safe_open

    from ..outputs import replacing
    from .save import RFLOW_PIPELINE, SINGLE_FILE, check_output, source_layout

    src = resolve_model(model)
    dst = Path(out).expanduser()
    pp = Path(patches).expanduser()
    layout = source_layout(src)
    if layout not in (RFLOW_PIPELINE, SINGLE_FILE):
        raise UserError(f"{src}: patched models are written for rflow pipeline folders and single-file "
                        "(BFL/ComfyUI) checkpoints only")
    check_output(src, dst, force=force)
    folder = layout == RFLOW_PIPELINE
    tensors, meta = read_patches(pp)
    tfile = src / "transformer.safetensors" if folder else src
    with FluxCheckpoint(tfile) as ck:
        if ck.format == "diffusers":
            raise UserError(f"{src}: diffusers-layout checkpoints cannot be patched in place; patch an rflow "
                            "pipeline folder or a BFL file")
        prefix = next((k[: -len("img_in.weight")] for k in ck.files.keys() if k.endswith("img_in.weight")), "")
        _check_fingerprint(meta, ck.fingerprint(), pp, any_student)
        _check(tensors, ck.files.shapes, pp, prefix)
        file_meta = dict(ck.files.metadata)
    new: dict[str, Tensor] = {}
    try:
        with safe_open(str(tfile), framework="pt", device="cpu") as f:
            for k in f.keys():
                new[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types
        raise UserError(f"{tfile}: cannot read the model ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    for k, t in tensors.items():
        new[f"{prefix}{k}"] = t.to(new[f"{prefix}{k}"].dtype)
    info = {"patches": pp.name, "patches_hash": patches_hash(pp), "layers": meta.get("layers"),
            "train": meta.get("train"), "teacher_fingerprint": meta.get("teacher_fingerprint"),
            "student_fingerprint": meta.get("student_fingerprint")}
    file_meta[PATCHED_KEY] = json.dumps(info)
    if not folder:
        save_safetensors(new, dst, file_meta)
        return dst
    with replacing(dst, "dir") as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True,
                        ignore=lambda d, names: ["transformer.safetensors"] if Path(d) == src else [])
        save_safetensors(new, tmp / "transformer.safetensors", file_meta)
        manifest = read_json(src / MANIFEST)
        manifest["patched"] = info
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return dst
