"""One loader for every family: path -> layout -> family -> meta model -> weights.

:class:`Checkpoint` opens a transformer checkpoint (one file, a folder, sharded), asks each family in
:data:`FAMILIES` whether the keys are its own, builds that family's key plan and infers its config
from the shapes — no tensor is read until :func:`load_transformer` asks for them, one at a time.

:class:`LoadPlan` says how the weights land: the device and dtype (``None`` keeps the stored dtype;
float8 computes in bfloat16), per-tensor exceptions (``tensor_placement``: a key -> (device, dtype)
override, e.g. offloaded blocks on the CPU or weights kept in their stored float8), and a
``build_layer`` hook that may replace any ``nn.Linear`` by another module built from its tensors
(quantized layers). Families never see the plan; quantization and offload plug in here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from .io import SafetensorsFiles, open_weights, read_json
from .plan import Dequant, plan_shapes, quantized_layers, with_quantized_layers


def families() -> tuple[ModuleType, ...]:
    """The families, most specific first: FLUX.2 and Z-Image share key names with FLUX.1
    (``img_in``, diffusers' ``x_embedder``), so FLUX.1 is asked last."""
    from ..families import flux1, flux2, zimage

    return (flux2, zimage, flux1)


def family_module(name: str) -> ModuleType:
    for fam in families():
        if fam.NAME == name:
            return fam
    raise UserError(f"unknown model family {name!r}; known: {', '.join(f.NAME for f in families())}")


def detect_family(keys: list[str]) -> tuple[ModuleType, str, str]:
    """(family module, layout, prefix) for a checkpoint's keys, or the most telling UserError."""
    from ..families import flux1

    for fam in families():
        hit = fam.detect(keys)
        if hit is not None:
            return fam, hit[0], hit[1]
    flux1.detect_format(keys)  # raises FLUX.1's own message (incomplete checkpoint, first key, ...)
    raise UserError("not a transformer checkpoint rflow knows")  # pragma: no cover


@dataclass
class CheckpointInfo:
    path: str
    format: str  # the layout: "bfl" | "comfyui" | "diffusers" | "original"
    family: str  # "flux1-dev" | "flux2-klein-4b" | "z-image" | ... | "<family>-custom"
    config: object
    num_params: int
    dtypes: dict[str, int]  # storage kind (dtype name, or GGML type for GGUF) -> tensor count
    metadata: dict[str, str]
    family_kind: str = "flux1"  # the family module: "flux1" | "flux2" | "zimage"
    weight_bytes: int = 0  # bytes of the model's tensors as stored (packed for quantized ones)

    def summary(self) -> dict:
        return {"path": self.path, "family": self.family, "format": self.format, "parameters": self.num_params,
                "weight_bytes": self.weight_bytes, "dtypes": self.dtypes,
                **family_module(self.family_kind).summary(self.config)}


def _diffusers_config(p: Path) -> dict | None:
    if p.is_dir() and (p / "config.json").exists():
        c = read_json(p / "config.json")
        return c if isinstance(c, dict) else None
    return None


class Checkpoint:
    """An opened transformer checkpoint: lazy weights, the family, its key plan and inferred config."""

    def __init__(self, path: str | os.PathLike, family: str | None = None):
        p = Path(path).expanduser()
        if p.is_dir() and (p / "transformer").is_dir() and not list(p.glob("*.safetensors")):
            p = p / "transformer"  # a diffusers pipeline root
        self.path = p
        self.files: SafetensorsFiles = open_weights(p)
        keys = self.files.keys()
        try:
            if family is None:
                self.family, self.format, prefix = detect_family(keys)
            else:
                self.family = family_module(family)
                hit = self.family.detect(keys)
                if hit is None and self.family.NAME == "flux1":
                    hit = self.family.detect_format(keys)  # FLUX.1's own message
                if hit is None:
                    raise UserError(f"not a {self.family.TITLE} transformer checkpoint")
                self.format, prefix = hit
            self.plan = self.family.plan(keys, self.format, prefix)
            quantized = quantized_layers(self.files.metadata, p)
            if quantized:
                self.plan = with_quantized_layers(self.plan, quantized)
        except UserError as e:
            raise UserError(f"{p}: {e}") from None
        try:
            overrides = self.family.overrides(self.files.metadata, _diffusers_config(p) if self.format == "diffusers" else None)
            self.config = self.family.infer_config(plan_shapes(self.plan, self.files.shapes), overrides,
                                                   plan=self.plan, source_shapes=self.files.shapes)
            self._check_sources(keys)
        except UserError as e:
            raise UserError(f"{p}: {e}") from None

    def _check_sources(self, keys: list[str]) -> None:
        """No tensor of a mapped layout is left out of the plan, and every one the plan reads is floating-point."""
        used = [s for srcs, _ in self.plan.values() for s in srcs]
        if self.format == "diffusers":
            unused = set(keys) - set(used)
            extra = [k for k in keys if k in unused and not k.startswith("rflow.")]
            if extra:
                raise UserError(f"unexpected tensor {extra[0]!r} in a diffusers {self.family.TITLE} transformer")
        packed = {s for srcs, fn in self.plan.values() if isinstance(fn, Dequant) for s in srcs}
        for s in used:
            if s in packed:
                continue
            dt = self.files.dtypes[s]
            if not dt.is_floating_point:
                raise UserError(f"{s} has dtype {str(dt).removeprefix('torch.')}, expected a floating-point tensor")

    def close(self):
        self.files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def info(self) -> CheckpointInfo:
        srcs = [s for ss, _ in self.plan.values() for s in ss]
        n = sum(int(torch.Size(self.files.shapes[s]).numel()) for s in srcs)
        dtypes: dict[str, int] = {}
        for s in srcs:
            name = self.files.kind(s)
            dtypes[name] = dtypes.get(name, 0) + 1
        return CheckpointInfo(str(self.path), self.format, self.family.family_name(self.config), self.config, n, dtypes,
                              dict(self.files.metadata), family_kind=self.family.NAME,
                              weight_bytes=sum(self.files.nbytes(s) for s in srcs))

    def stored_dtype(self) -> torch.dtype:
        """The floating dtype holding most parameters; float8 (and anything else narrow) computes in
        bfloat16. Packed quantized weights (integer storage) do not count: a quantized file's dense
        tensors keep the precision they were written in."""
        by_numel: dict[torch.dtype, int] = {}
        for srcs, _ in self.plan.values():
            for s in srcs:
                dt = self.files.dtypes[s]
                if not dt.is_floating_point:
                    continue
                by_numel[dt] = by_numel.get(dt, 0) + int(torch.Size(self.files.shapes[s]).numel())
        if not by_numel:
            return torch.bfloat16
        stored = max(by_numel, key=by_numel.get)
        return stored if stored in (torch.float32, torch.float16) else torch.bfloat16

    def stored_dtype_of(self, key: str) -> torch.dtype:
        """The dtype a model key is stored in (the first source's)."""
        return self.files.dtypes[self.plan[key][0][0]]

    def tensors(self, dtype: torch.dtype | None = None):
        """Yield (model key, tensor) one at a time, so peak host memory stays near one copy."""
        for dst, (srcs, fn) in self.plan.items():
            yield dst, fn([self.files.get(s, dtype) for s in srcs])

    def raw_tensor(self, key: str) -> torch.Tensor:
        """A model key's tensor in its stored dtype (float8 stays float8)."""
        srcs, fn = self.plan[key]
        return fn([self.files.get_stored(s) for s in srcs])

    def fingerprint(self) -> str:
        """Content fingerprint of the tensors under the family's own names (16 hex digits): a renamed or
        re-prefixed copy matches, other weights of the same shapes do not (rflow.checkpoints.hashing)."""
        from .hashing import content_fingerprint

        return content_fingerprint(self.files.paths, {dst: list(srcs) for dst, (srcs, _) in self.plan.items()})

    def model_hash(self) -> str:
        """The "Model hash" of A1111/ComfyUI/Civitai: sha256 of the weights file(s), 10 hex digits."""
        from .hashing import model_hash

        return model_hash(self.files.paths)


Placement = tuple[torch.device | str | None, torch.dtype | None]


@dataclass
class LoadPlan:
    """How a transformer's weights land (see the module docstring).

    ``dtype=None`` keeps the checkpoint's dtype (float8 -> bfloat16). ``tensor_placement(key)`` may
    return (device, dtype) for one tensor, either None to keep the default; dtype ``"stored"`` keeps
    that tensor exactly as stored (float8 included), ``"skip"`` leaves it unread for ``build_layer`` to
    provide. ``build_layer(name, linear, tensors)`` is called for
    every ``nn.Linear`` with its tensors ({"weight": …, "bias": …}, after placement) and may return a
    module to put in its place (it must compute the same function of its input), or None."""

    device: torch.device | str = "cpu"
    dtype: torch.dtype | None = None
    tensor_placement: Callable[[str], Placement | None] | None = None
    build_layer: Callable[[str, nn.Linear, dict[str, torch.Tensor]], nn.Module | None] | None = None
    extra: dict = field(default_factory=dict)


def load_transformer(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
                     plan: LoadPlan | None = None, family: str | None = None):
    """Build the family's model on the meta device from a checkpoint's shapes and load it with
    ``assign=True``; returns (model, CheckpointInfo). ``device``/``dtype`` are shorthands for a plan."""
    if plan is None:
        plan = LoadPlan(device=device if device is not None else "cpu", dtype=dtype)
    with Checkpoint(path, family) as ck:
        info = ck.info()
        base_dtype = plan.dtype or ck.stored_dtype()
        with torch.device("meta"):
            model = ck.family.build(ck.config)
        sd, stored = {}, set()
        for k in ck.plan:
            where = plan.tensor_placement(k) if plan.tensor_placement else None
            dev, dt = (where or (None, None))
            dev = dev if dev is not None else plan.device
            if dt == "skip":  # not read here: the plan's build_layer provides the module that owns it
                stored.add(k)
            elif dt == "stored":
                sd[k] = ck.raw_tensor(k).to(dev)
                stored.add(k)
            else:
                dt = dt or base_dtype
                srcs, fn = ck.plan[k]
                sd[k] = fn([ck.files.get(s, dt) for s in srcs]).to(device=dev, dtype=dt)
    expected = model.state_dict()
    unexpected = sorted(set(sd) - set(expected))
    missing = sorted(set(expected) - set(sd) - stored)
    if unexpected or missing:
        what = f"unexpected key {unexpected[0]!r}" if unexpected else f"missing key {missing[0]!r}"
        raise UserError(f"{path}: not a {ck.family.TITLE} transformer this build understands ({what})")
    for k, t in expected.items():  # tensors kept as stored (packed) are checked by the layer built from them
        if k not in stored and k in sd and tuple(sd[k].shape) != tuple(t.shape):
            raise UserError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(t.shape)}")
    if plan.build_layer is not None:
        try:
            _replace_layers(model, sd, plan.build_layer)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"{path}: {' '.join(str(e).split())}") from None
    for k, t in model.state_dict().items():
        if k in stored and k in sd and tuple(sd[k].shape) != tuple(t.shape):
            raise UserError(f"{path}: {k} is stored as {tuple(sd[k].shape)} {sd[k].dtype}, which no layer here reads")
    model.load_state_dict(sd, assign=True, strict=True)
    model.info = info  # type: ignore[attr-defined]
    return model.eval().requires_grad_(False), info


def _replace_layers(model: nn.Module, sd: dict, build_layer) -> None:
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        tensors = {p: sd[f"{name}.{p}"] for p in ("weight", "bias") if f"{name}.{p}" in sd}
        try:
            new = build_layer(name, mod, tensors)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{name}: {e}") from None
        if new is None:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        for p in tensors:
            del sd[f"{name}.{p}"]
        for k, v in new.state_dict().items():  # the new module's own tensors load with the rest
            sd[f"{name}.{k}"] = v


def metadata_overrides(metadata: dict[str, str], key: str) -> dict:
    """The JSON object stored under ``key`` in safetensors metadata ({} if absent)."""
    if key not in metadata:
        return {}
    try:
        v = json.loads(metadata[key])
    except json.JSONDecodeError:
        raise UserError(f"invalid {key} metadata") from None
    if not isinstance(v, dict):
        raise UserError(f"invalid {key} metadata (expected a JSON object)")
    return v
