"""Distillation patches: trained block tensors for a pruned student, applied at load time or baked in.

A patch file is a safetensors file holding the trained tensors under their qualified names — the
family's original checkpoint keys (``double_blocks.3.img_mlp.0.weight``, ``single_blocks.0.linear1.weight``,
``layers.7.feed_forward.w1.weight`` …) — with JSON metadata under ``rflow.patches``: ``{"schema":
"rflow.patches", "version": 2, "family", "teacher_fingerprint", "student_fingerprint", "layers", "train",
"report"}``.

* :func:`apply_patches` copies them into a loaded transformer of any family (every key and shape
  checked first, so a mismatch changes nothing);
* :func:`load_with_patches` is :func:`rflow.load` followed by :func:`apply_patches`;
* :func:`write_patched` writes a patched model of the same kind as the student: an rflow pipeline
  folder becomes a new folder (everything copied, ``transformer.safetensors`` rewritten with every
  other tensor — ``rflow.kept.*`` pruning indices included — and the file metadata kept), a single
  file (BFL, ComfyUI, Z-Image's original layout) a new single file in the same layout; a diffusers
  ``transformer/`` folder (or a sharded one) is loaded, patched and written as
  :func:`~rflow.compress.save.save_transformer_like` writes it (one file in the family's own keys).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import __version__
from ..checkpoints.io import open_weights, read_json, save_safetensors
from ..errors import NonFiniteError, UserError, flag
from ..paths import MANIFEST, resolve_model
from .save import model_fingerprint, transformer_path

SCHEMA = "rflow.patches"
VERSION = 2  # 2: teacher/student fingerprints are content fingerprints of the tensors (1: of the file header)
METADATA_KEY = "rflow.patches"
PATCHED_KEY = "rflow.patched"


# ---------------------------------------------------------------------------------------------- models


def load_transformer(path: str | os.PathLike | None, *, device=None, dtype: torch.dtype | None = None) -> tuple[nn.Module, str]:
    """Only the transformer of a model of any family (no text encoders or VAE) and its fingerprint;
    ``None`` is the embedded rflow-tiny model."""
    from ..checkpoints.loader import load_transformer as load

    tp = transformer_path(resolve_model(path))
    fingerprint = model_fingerprint(tp)
    model, _ = load(tp, device=device, dtype=dtype)
    return model, fingerprint


# ---------------------------------------------------------------------------------------------- files


def patch_tensors(patches: dict[int, dict[str, Tensor]], *, train: str, report: list[dict],
                  teacher_fingerprint: str = "", student_fingerprint: str = "",
                  family: str = "") -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of a patch file for ``patches`` (layer -> {qualified key:
    tensor}, as :func:`~rflow.compress.distill.distill` returns); ``family``: the student's (``flux1``,
    ``flux2``, ``zimage``), checked when the patches are applied."""
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
    meta = {"schema": SCHEMA, "version": VERSION, "rflow": __version__, "family": family,
            "teacher_fingerprint": teacher_fingerprint, "student_fingerprint": student_fingerprint,
            "layers": sorted(int(L) for L in patches), "train": train, "report": report}
    return tensors, {METADATA_KEY: json.dumps(meta)}


def save_patches(path: str | os.PathLike, patches: dict[int, dict[str, Tensor]], *, train: str, report: list[dict],
                 teacher_fingerprint: str = "", student_fingerprint: str = "", family: str = "") -> Path:
    """Write ``patches`` as a patch file (through a temporary sibling)."""
    tensors, meta = patch_tensors(patches, train=train, report=report, teacher_fingerprint=teacher_fingerprint,
                                  student_fingerprint=student_fingerprint, family=family)
    p = Path(path).expanduser()
    save_safetensors(tensors, p, meta)
    return p


def read_patches(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(qualified key -> tensor, metadata) of a patch file; one-line UserError for anything else."""
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


def _check(tensors: dict[str, Tensor], shapes: dict[str, tuple], where) -> None:
    for k, t in tensors.items():
        if k not in shapes:
            raise UserError(f"{where}: patch tensor {k!r} is not in this model (patches for another kind of model?)")
        want = tuple(shapes[k])
        if tuple(t.shape) != want:
            raise UserError(f"{where}: patch {k} has shape {tuple(t.shape)}, the model has {want} "
                            "(patches for another student?)")


def _check_family(meta: dict, family: str, where) -> None:
    from ..checkpoints.loader import family_module

    want = meta.get("family") or ""
    if want and want != family:
        raise UserError(f"{where}: patches for a {family_module(want).TITLE} model, this is a "
                        f"{family_module(family).TITLE} model")


def _check_fingerprint(meta: dict, fingerprint: str | None, patches: Path, any_student: bool) -> None:
    want = meta.get("student_fingerprint") or ""
    if not any_student and fingerprint and want and want != fingerprint:
        raise UserError(f"{patches}: patches were trained for student {want}, this model is {fingerprint} "
                        f"({flag('any_student', switch=True)} applies them anyway)")


# ---------------------------------------------------------------------------------------------- applying


def apply_patches(model: nn.Module, path: str | os.PathLike, *, fingerprint: str | None = None,
                  any_student: bool = False) -> dict:
    """Copy a patch file's tensors into ``model`` (a transformer of any family) in place; returns the
    patch metadata.

    Every key and shape is checked before anything changes. If ``fingerprint`` (the model's) is given
    and the patches name another student, that is an error unless ``any_student``."""
    p = Path(path).expanduser()
    tensors, meta = read_patches(p)
    _apply(model, tensors, meta, p, fingerprint, any_student)
    return meta


def _apply(model: nn.Module, tensors: dict[str, Tensor], meta: dict, where: Path, fingerprint: str | None,
           any_student: bool) -> None:
    from .units import family_of

    _check_family(meta, family_of(model.config).NAME, where)
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
    """Write ``model`` with ``patches`` baked in as a new model of the same kind at ``out``; returns its
    path (:func:`write_patched_model` also says how to load it)."""
    return write_patched_model(model, patches, out, force=force, any_student=any_student).path


def write_patched_model(model: str | os.PathLike, patches: str | os.PathLike, out: str | os.PathLike, *,
                        force: bool = False, any_student: bool = False):
    """Write ``model`` with ``patches`` baked in as a new model of the same kind at ``out``; returns a
    :class:`~rflow.compress.save.SavedModel` (its ``note`` says how to load a lone transformer file).

    rflow pipeline folder -> new folder (all files copied, ``transformer.safetensors`` rewritten, the
    manifest gains a ``patched`` entry); single ``.safetensors`` (any family, any layout whose patched
    tensors are stored one to one) -> new single file in the same layout. Every tensor not patched
    (``rflow.kept.*`` included) is kept as is, in its stored dtype, and so is the file metadata. Other
    sources (a diffusers ``transformer/`` folder, sharded folders) are loaded, patched and written by
    :func:`~rflow.compress.save.save_transformer_like`. An existing ``out`` is replaced only with
    ``force`` (rflow.outputs); ``any_student`` applies patches trained for another student fingerprint
    (shapes must still match).
    """
    from safetensors import safe_open

    from ..checkpoints.loader import Checkpoint
    from ..checkpoints.plan import one, plan_shapes
    from ..outputs import replacing
    from .save import RFLOW_PIPELINE, SINGLE_FILE, SavedModel, check_output, save_transformer_like

    src = resolve_model(model)
    dst = Path(out).expanduser()
    pp = Path(patches).expanduser()
    layout = check_output(src, dst, force=force)
    tensors, meta = read_patches(pp)
    tfile = transformer_path(src)
    with Checkpoint(tfile) as ck:
        _check_family(meta, ck.family.NAME, pp)
        _check_fingerprint(meta, ck.fingerprint(), pp, any_student)
        _check(tensors, plan_shapes(ck.plan, ck.files.shapes), pp)
        direct = tfile.is_file() and all(len(ck.plan[k][0]) == 1 and ck.plan[k][1] is one for k in tensors)
        source_key = {k: ck.plan[k][0][0] for k in tensors} if direct else {}
        file_meta = dict(ck.files.metadata)
        bookkeeping = {} if direct else {k: ck.files.get_stored(k) for k in ck.files.keys() if k.startswith("rflow.")}
    info = {"patches": pp.name, "patches_hash": patches_hash(pp), "layers": meta.get("layers"),
            "train": meta.get("train"), "teacher_fingerprint": meta.get("teacher_fingerprint"),
            "student_fingerprint": meta.get("student_fingerprint")}
    file_meta[PATCHED_KEY] = json.dumps(info)
    if not direct:  # a mapped or sharded layout: through the model, written like its source
        net, _ = load_transformer(src)
        _apply(net, tensors, meta, pp, None, True)
        return save_transformer_like(src, net, dst, extra_tensors=bookkeeping, metadata=file_meta, force=force)

    new: dict[str, Tensor] = {}
    try:
        with safe_open(str(tfile), framework="pt", device="cpu") as f:
            for k in f.keys():
                new[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types
        raise UserError(f"{tfile}: cannot read the model ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    for k, t in tensors.items():
        new[source_key[k]] = t.to(new[source_key[k]].dtype)
    if layout != RFLOW_PIPELINE:
        save_safetensors(new, dst, file_meta)
        note = None
        if dst.resolve().parent != src.resolve().parent:  # where rflow.load looks for the VAE and text encoders
            note = (f"{dst} holds only the transformer: pass --vae / --text-encoders pointing at the ones used "
                    f"with {src} (or write it next to the source)")
        return SavedModel(dst, SINGLE_FILE, layout, note)
    with replacing(dst, "dir") as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True,
                        ignore=lambda d, names: ["transformer.safetensors"] if Path(d) == src else [])
        save_safetensors(new, tmp / "transformer.safetensors", file_meta)
        manifest = read_json(src / MANIFEST)
        manifest["patched"] = info
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return SavedModel(dst, RFLOW_PIPELINE, layout)
