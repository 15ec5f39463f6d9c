"""``load_lora_(target, path, scale=1.0, name=None) -> name``: read a LoRA file, map it onto a pipeline
(transformer and text encoders) or a bare transformer, and add it beside the layers it adapts."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..errors import UserError, flag
from .layer import add_lora_, check_fusable, check_name, fuse_lora_, lora_names, remove_lora_, unfuse_lora_
from .read import LoRAFile, read_lora
from .targets import component_models, lora_weights


@dataclass
class LoadedLoRA:
    """What a pipeline records about a LoRA it carries (and a PNG's metadata repeats)."""

    name: str
    path: str
    scale: float
    dialect: str
    hash: str  # sha256 of the file, 10 hex digits (as a "Model hash")
    layers: int  # layers adapted
    components: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return asdict(self)


def parse_spec(text: str) -> tuple[Path, float]:
    """``FILE[:SCALE]`` (``rflow generate --lora``): the scale is what follows the last ``:`` when that
    is a number (default 1), so ``C:\\x.safetensors`` and ``a:b.safetensors`` stay paths."""
    path, sep, tail = str(text).rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return Path(text), 1.0
        if not math.isfinite(scale):
            raise UserError(f"{flag('lora', text)}: the scale must be a finite number")
        return Path(path), scale
    if not text:
        raise UserError(f"{flag('lora')} needs a file: FILE[:SCALE]")
    return Path(text), 1.0


def _models(target) -> list[nn.Module]:
    return list(component_models(target)[0].values())


def default_name(path: Path, taken) -> str:
    """The file's stem with other characters as ``_``, numbered ``-2``, ``-3`` … when taken."""
    base = re.sub(r"[^A-Za-z0-9_\-]", "_", path.stem) or "lora"
    if hasattr(nn.ModuleDict, base):
        base = f"lora_{base}"
    taken, name, i = set(taken), base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def loaded_names(target) -> list[str]:
    names: dict[str, None] = {}
    for m in _models(target):
        names.update(dict.fromkeys(lora_names(m)))
    return list(names)


def load_lora_(target, source, *, scale: float = 1.0, name: str | None = None) -> str:
    """Add the LoRA in ``source`` (a path, or a :class:`LoRAFile` already read) to ``target`` (a Pipeline:
    transformer, CLIP and T5; or a transformer) times ``scale``; returns its name (``name``, or one made
    from the file name). Every key is mapped and checked before any layer changes."""
    from ..pipeline import Pipeline

    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UserError(f"LoRA scale must be a finite number, not {scale!r}")
    lora = source if isinstance(source, LoRAFile) else read_lora(source)
    mapped = lora_weights(lora, target)
    taken = loaded_names(target) + (list(target.loras) if isinstance(target, Pipeline) else [])
    name = check_name(name, taken) if name is not None else default_name(lora.path, taken)
    if isinstance(target, Pipeline):
        from ..checkpoints.hashing import model_hash

        record = LoadedLoRA(name, str(lora.path), float(scale), lora.dialect, model_hash([lora.path]),
                            sum(len({w.layer for w in ws}) for _, ws in mapped.values()), list(mapped))
    done = []
    try:
        for model, weights in mapped.values():
            add_lora_(model, weights, name=name, scale=float(scale))
            done.append(model)
    except BaseException:
        for model in done:
            remove_lora_(model, name)
        raise
    if isinstance(target, Pipeline):
        target.loras[name] = record
    return name


def fuse_(target, names=None):
    """``fuse_lora_`` on every model of ``target`` that carries LoRAs (all, or ``names``); a LoRA on a
    quantized layer anywhere is a UserError before any layer merges."""
    names = [names] if isinstance(names, str) else names
    known = loaded_names(target)
    for n in names or ():
        if n not in known:
            raise UserError(f"no LoRA named {n!r} is loaded (loaded: {', '.join(known) or 'none'})")
    todo = []
    for m in _models(target):
        here = [n for n in (names or known) if n in lora_names(m)]
        if here:
            check_fusable(m, here)
            todo.append((m, here))
    for m, here in todo:
        fuse_lora_(m, here)
    return target


def unfuse_(target):
    """``unfuse_lora_`` on every model of ``target``."""
    for m in _models(target):
        unfuse_lora_(m)
    return target


def remove_(target, names=None):
    """``remove_lora_`` on every model of ``target`` (all LoRAs, or ``names``); a Pipeline forgets them."""
    from ..pipeline import Pipeline

    names = [names] if isinstance(names, str) else (list(names) if names is not None else loaded_names(target))
    known = loaded_names(target)
    for n in names:
        if n not in known:
            raise UserError(f"no LoRA named {n!r} is loaded (loaded: {', '.join(known) or 'none'})")
    for m in _models(target):
        here = [n for n in names if n in lora_names(m)]
        if here:
            remove_lora_(m, here)
    if isinstance(target, Pipeline):
        for n in names:
            target.loras.pop(n, None)
    return target
