"""FLUX.1 transformer checkpoints: format detection, key mapping to BFL names, config inference.

Formats (detected from keys, never from file names):

- ``bfl``: Black Forest Labs single file (``flux1-dev.safetensors``), keys like ``double_blocks.0.img_attn.qkv.weight``;
- ``comfyui``: the same keys behind ``model.diffusion_model.`` or ``diffusion_model.``;
- ``diffusers``: ``FluxTransformer2DModel`` keys (``transformer_blocks.0.attn.to_q.weight``), one file or a
  ``transformer/`` folder with ``config.json`` and (sharded) safetensors.

All formats are mapped to BFL names, the attribute names of :class:`rflow.models.flux.Flux`. The
config (depths, widths, heads, guidance embedder, each block's MLP width) is inferred from shapes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..models.flux import Flux, FluxConfig
from .io import SafetensorsFiles, majority, open_weights, read_json, tensor_kind
from .plan import Plan, block_indices, cat, identity_plan, one, plan_shapes, swap_halves

CONFIG_METADATA_KEY = "rflow.flux_config"
PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass
class CheckpointInfo:
    path: str
    format: str  # "bfl" | "comfyui" | "diffusers"
    family: str  # "flux1-dev" | "flux1-schnell" | "flex1-alpha" | "flux1-custom"
    config: FluxConfig
    num_params: int
    dtypes: dict[str, int]  # dtype name -> tensor count
    metadata: dict[str, str]

    def summary(self) -> dict:
        return {
            "path": self.path,
            "family": self.family,
            "format": self.format,
            "parameters": self.num_params,
            "dtypes": self.dtypes,
            "double_blocks": self.config.depth,
            "single_blocks": self.config.depth_single,
            "hidden_size": self.config.hidden_size,
            "heads": self.config.num_heads,
            "guidance_embed": self.config.guidance_embed,
            "double_mlp": self.config.double_mlp,
            "single_mlp": self.config.single_mlp,
        }


_one, _cat, _swap_halves = one, cat, swap_halves


def detect_format(keys: list[str]) -> tuple[str, str]:
    """(format, prefix) from the key names; raises UserError for anything that is not a FLUX.1 transformer."""
    keyset = set(keys)
    for prefix in ("",) + PREFIXES:
        if f"{prefix}img_in.weight" in keyset and f"{prefix}final_layer.linear.weight" in keyset:
            return ("bfl" if prefix == "" else "comfyui"), prefix
    if "x_embedder.weight" in keyset and "proj_out.weight" in keyset and "norm_out.linear.weight" in keyset:
        return "diffusers", ""
    if any(k.startswith(("transformer_blocks.", "double_blocks.")) for k in keyset):
        raise UserError("incomplete FLUX.1 transformer checkpoint (input or output layer missing)")
    hint = next(iter(sorted(keyset)), "<empty>")
    raise UserError(f"not a FLUX.1 transformer checkpoint (first key: {hint!r})")


_block_indices = block_indices


def diffusers_plan(keys: list[str]) -> Plan:
    """How to build every BFL key from diffusers ``FluxTransformer2DModel`` keys."""
    keyset = set(keys)
    plan: Plan = {}

    def lin(dst: str, src: str, fn=_one):
        for p in ("weight", "bias"):
            if f"{src}.{p}" in keyset:
                plan[f"{dst}.{p}"] = ([f"{src}.{p}"], fn)

    def qkv(dst: str, srcs: list[str]):
        for p in ("weight", "bias"):
            if f"{srcs[0]}.{p}" in keyset:
                plan[f"{dst}.{p}"] = ([f"{s}.{p}" for s in srcs], _cat)

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
    lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    lin("final_layer.linear", "proj_out")
    lin("final_layer.adaLN_modulation.1", "norm_out.linear", _swap_halves)

    for i in _block_indices(keys, "transformer_blocks."):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for stream, mod, q, k, v, out, qn, kn, ff in (
            ("img", "norm1", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k", "ff"),
            ("txt", "norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q", "norm_added_k", "ff_context"),
        ):
            lin(f"{d}.{stream}_mod.lin", f"{s}.{mod}.linear")
            qkv(f"{d}.{stream}_attn.qkv", [f"{s}.attn.{q}", f"{s}.attn.{k}", f"{s}.attn.{v}"])
            lin(f"{d}.{stream}_attn.proj", f"{s}.attn.{out}")
            plan[f"{d}.{stream}_attn.norm.query_norm.scale"] = ([f"{s}.attn.{qn}.weight"], _one)
            plan[f"{d}.{stream}_attn.norm.key_norm.scale"] = ([f"{s}.attn.{kn}.weight"], _one)
            lin(f"{d}.{stream}_mlp.0", f"{s}.{ff}.net.0.proj")
            lin(f"{d}.{stream}_mlp.2", f"{s}.{ff}.net.2")

    for i in _block_indices(keys, "single_transformer_blocks."):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        qkv(f"{d}.linear1", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"])
        lin(f"{d}.linear2", f"{s}.proj_out")
        lin(f"{d}.modulation.lin", f"{s}.norm.linear")
        plan[f"{d}.norm.query_norm.scale"] = ([f"{s}.attn.norm_q.weight"], _one)
        plan[f"{d}.norm.key_norm.scale"] = ([f"{s}.attn.norm_k.weight"], _one)

    missing = [src for srcs, _ in plan.values() for src in srcs if src not in keyset]
    if missing:
        raise UserError(f"diffusers FLUX checkpoint is missing {missing[0]!r}")
    return plan


_bfl_plan = identity_plan
_plan_shapes = plan_shapes


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """FLUX's RoPE split (16, 56, 56) for head dim 128, scaled to other head dims (all parts even)."""
    if head_dim == 128:
        return (16, 56, 56)
    b = (head_dim * 7 // 16) // 2 * 2
    return (head_dim - 2 * b, b, b)


_NORM_SCALE = re.compile(r"(?:double_blocks\.\d+\.(?:img|txt)_attn|single_blocks\.\d+)\.norm\.(?:query|key)_norm\.scale")


def expected_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a :class:`Flux` built from ``config`` and its shape (built on the meta device)."""
    with torch.device("meta"):
        model = Flux(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _why(key: str, cfg: FluxConfig) -> str:
    """What a tensor's expected shape follows from, for error messages."""
    h = cfg.hidden_size
    m = re.match(r"double_blocks\.(\d+)\.(img|txt)_mlp\.", key)
    if m:
        return f"for hidden size {h} and MLP width {cfg.double_mlp[int(m[1])][m[2] == 'txt']}"
    m = re.match(r"single_blocks\.(\d+)\.linear[12]\.", key)
    if m:
        return f"for hidden size {h} and MLP width {cfg.single_mlp[int(m[1])]}"
    if key.endswith("_norm.scale"):
        return f"for hidden size {h} with {cfg.num_heads} heads"
    for prefix, what in (
        ("img_in.", f"{cfg.in_channels} input channels"),
        ("final_layer.linear.", f"{cfg.out_channels} output channels"),
        ("txt_in.", f"{cfg.context_in_dim}-wide text embeddings"),
        ("vector_in.in_layer.", f"{cfg.vec_in_dim}-wide pooled vectors"),
        ("time_in.in_layer.", f"{cfg.time_dim}-wide timestep embeddings"),
        ("guidance_in.in_layer.", f"{cfg.time_dim}-wide timestep embeddings"),
    ):
        if key.startswith(prefix):
            return f"for hidden size {h} and {what}"
    return f"for hidden size {h}"


def _check_overrides(overrides) -> dict:
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise UserError(f"config overrides must be a JSON object, got {type(overrides).__name__}")
    out = {}
    if "axes_dim" in overrides:
        v = overrides["axes_dim"]
        if not (
            isinstance(v, (list, tuple)) and v
            and all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 and a % 2 == 0 for a in v)
        ):
            raise UserError(f"RoPE axes {v!r} must be a list of even non-negative integers")
        out["axes_dim"] = tuple(v)
    if "theta" in overrides:
        v = overrides["theta"]
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            raise UserError(f"RoPE theta {v!r} must be a positive number")
        out["theta"] = v
    return out


def infer_config(
    shapes: dict[str, tuple[int, ...]],
    overrides: dict | None = None,
    *,
    plan: Plan | None = None,
    source_shapes: dict[str, tuple[int, ...]] | None = None,
) -> FluxConfig:
    """A :class:`FluxConfig` from BFL key shapes, checked against every tensor; ``overrides`` (from
    metadata or config.json) win for what shapes cannot tell (RoPE axes, theta).

    Every tensor must have exactly the shape a ``Flux(config)`` has for its name, every tensor of that
    model must be present and no other: anything else is a :class:`UserError` naming the tensor.
    ``plan`` and ``source_shapes`` (the checkpoint's own names and shapes, for a mapped layout such as
    diffusers) make the errors name the checkpoint's tensors and check concatenated parts one by one.
    """
    shapes = {k: tuple(s) for k, s in shapes.items()}
    if plan is None:
        plan = {k: ([k], _one) for k in shapes}
        source_shapes = shapes
    elif source_shapes is None:
        raise TypeError("infer_config: plan needs source_shapes")

    def label(k: str) -> str:
        srcs = plan[k][0] if k in plan else [k]
        return srcs[0] if len(srcs) == 1 else f"{k} (from {', '.join(srcs)})"

    def dim(k: str, rank: int, axis: int) -> int | None:
        """Size ``axis`` of tensor ``k`` if it has rank ``rank`` and no empty dimension, else None."""
        s = shapes.get(k)
        if s is None or len(s) != rank or min(s) < 1:
            return None
        return s[axis]

    def require(k: str, rank: int) -> tuple[int, ...]:
        if k not in shapes:
            raise UserError(f"FLUX.1 checkpoint is missing {k!r}")
        s = shapes[k]
        if len(s) != rank:
            raise UserError(f"{label(k)} has shape {s}, expected a {rank}-D {tensor_kind(k)}")
        if min(s) < 1:
            raise UserError(f"{label(k)} has shape {s}, expected no empty dimension")
        return s

    def positive(v: int | None) -> int | None:
        return v if v is not None and v > 0 else None

    double_idx = _block_indices(shapes, "double_blocks.")
    single_idx = _block_indices(shapes, "single_blocks.")
    if not double_idx and not single_idx:
        raise UserError("FLUX.1 checkpoint has no transformer blocks")

    in_ch = require("img_in.weight", 2)[1]
    hidden = majority([dim("img_in.weight", 2, 0), dim("txt_in.weight", 2, 0), dim("time_in.in_layer.weight", 2, 0),
                    dim("vector_in.in_layer.weight", 2, 0), dim("final_layer.linear.weight", 2, 1)])
    out_ch = majority([dim("final_layer.linear.weight", 2, 0), dim("final_layer.linear.bias", 1, 0)])
    if out_ch is None:
        out_ch = require("final_layer.linear.weight", 2)[0]
    context_dim = require("txt_in.weight", 2)[1]
    vec_dim = require("vector_in.in_layer.weight", 2)[1]
    time_dim = majority([dim("time_in.in_layer.weight", 2, 1), dim("guidance_in.in_layer.weight", 2, 1)])
    if time_dim is None:
        time_dim = require("time_in.in_layer.weight", 2)[1]

    def head_dim_of(k: str) -> int | None:
        d = dim(k, 1, 0)
        return d if d is not None and d % 2 == 0 and hidden % d == 0 else None

    head_dim = majority([head_dim_of(k) for k in shapes if _NORM_SCALE.fullmatch(k)])
    if head_dim is None:
        first = "double_blocks.0.img_attn.norm.query_norm.scale" if double_idx else "single_blocks.0.norm.query_norm.scale"
        s = require(first, 1)
        raise UserError(f"{label(first)} has shape {s}, expected an even head dim that divides hidden size {hidden}")

    double = []
    for i in double_idx:
        pair = []
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}_mlp"
            w = majority([dim(f"{b}.0.weight", 2, 0), dim(f"{b}.0.bias", 1, 0), dim(f"{b}.2.weight", 2, 1)])
            pair.append(w if w is not None else require(f"{b}.0.weight", 2)[0])
        double.append(tuple(pair))
    single = []
    for i in single_idx:
        b = f"single_blocks.{i}"
        rows, bias, cols = dim(f"{b}.linear1.weight", 2, 0), dim(f"{b}.linear1.bias", 1, 0), dim(f"{b}.linear2.weight", 2, 1)
        w = majority([positive(rows and rows - 3 * hidden), positive(bias and bias - 3 * hidden), positive(cols and cols - hidden)])
        if w is None:
            s = require(f"{b}.linear1.weight", 2)
            raise UserError(
                f"{label(b + '.linear1.weight')} has shape {s}, expected more than {3 * hidden} rows "
                f"(q, k and v for hidden size {hidden}, then the MLP)"
            )
        single.append(w)
    has_bias = [f"double_blocks.{i}.{s}_attn.qkv.bias" in shapes for i in double_idx for s in ("img", "txt")]
    cfg = dict(
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        in_channels=in_ch,
        out_channels=out_ch,
        context_in_dim=context_dim,
        vec_in_dim=vec_dim,
        time_dim=time_dim,
        qkv_bias=2 * sum(has_bias) >= len(has_bias) if has_bias else True,
        guidance_embed=any(k.startswith("guidance_in.") for k in shapes),
        axes_dim=default_axes_dim(head_dim),
        double_mlp=double,
        single_mlp=single,
    )
    cfg.update(_check_overrides(overrides))
    try:
        config = FluxConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"inconsistent FLUX.1 checkpoint: {e}") from None

    expected = expected_shapes(config)
    missing = [k for k in expected if k not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"FLUX.1 checkpoint is missing {missing[0]!r}{more}")
    extra = [k for k in shapes if k not in expected]
    if extra:
        raise UserError(
            f"unexpected tensor {label(extra[0])!r} for a FLUX.1 transformer with {config.depth} double and "
            f"{config.depth_single} single blocks"
        )
    for k, want in expected.items():
        srcs = plan[k][0]
        if len(srcs) == 1:
            parts = [(srcs[0], want)]
        else:  # q, k, v (and a single block's MLP input) concatenated: each part but the last is hidden-sized
            rows = [hidden] * (len(srcs) - 1)
            parts = [(s, (r,) + want[1:]) for s, r in zip(srcs, rows + [want[0] - sum(rows)])]
        for s, w in parts:
            got = tuple(source_shapes[s])
            if got != w:
                why = f"expected a {len(w)}-D {tensor_kind(k)}" if len(got) != len(w) else f"expected {w} {_why(k, config)}"
                raise UserError(f"{s} has shape {got}, {why}")
    return config


def family_of(cfg: FluxConfig) -> str:
    full = cfg.hidden_size == 3072 and cfg.depth_single == 38
    if full and cfg.depth == 19:
        return "flux1-dev" if cfg.guidance_embed else "flux1-schnell"
    if full and cfg.depth == 8:
        return "flex1-alpha"
    return "flux1-custom"


class FluxCheckpoint:
    """An opened FLUX.1 transformer checkpoint: lazy weights + BFL key plan + inferred config."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path).expanduser()
        if p.is_dir() and (p / "transformer").is_dir() and not list(p.glob("*.safetensors")):
            p = p / "transformer"  # a diffusers pipeline root
        self.path = p
        self.files: SafetensorsFiles = open_weights(p)
        keys = self.files.keys()
        try:
            self.format, prefix = detect_format(keys)
            self.plan = diffusers_plan(keys) if self.format == "diffusers" else _bfl_plan(keys, prefix)
        except UserError as e:
            raise UserError(f"{p}: {e}") from None
        overrides = {}
        if CONFIG_METADATA_KEY in self.files.metadata:
            try:
                overrides = json.loads(self.files.metadata[CONFIG_METADATA_KEY])
            except json.JSONDecodeError:
                raise UserError(f"{p}: invalid {CONFIG_METADATA_KEY} metadata") from None
            if not isinstance(overrides, dict):
                raise UserError(f"{p}: invalid {CONFIG_METADATA_KEY} metadata (expected a JSON object)")
        if self.format == "diffusers" and p.is_dir() and (p / "config.json").exists():
            dc = read_json(p / "config.json")
            if isinstance(dc, dict) and "axes_dims_rope" in dc:
                overrides["axes_dim"] = dc["axes_dims_rope"]
        shapes = self.files.shapes
        try:
            self.config = infer_config(_plan_shapes(self.plan, shapes), overrides, plan=self.plan, source_shapes=shapes)
            self._check_sources(keys)
        except UserError as e:
            raise UserError(f"{p}: {e}") from None

    def _check_sources(self, keys: list[str]) -> None:
        """No checkpoint tensor is left out of the plan (diffusers), and every one the plan reads is floating-point."""
        used = [s for srcs, _ in self.plan.values() for s in srcs]
        if self.format == "diffusers":
            unused = set(keys) - set(used)
            extra = [k for k in keys if k in unused and not k.startswith("rflow.")]
            if extra:
                raise UserError(f"unexpected tensor {extra[0]!r} in a diffusers FLUX.1 transformer")
        for s in used:
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
            name = str(self.files.dtypes[s]).removeprefix("torch.")
            dtypes[name] = dtypes.get(name, 0) + 1
        return CheckpointInfo(str(self.path), self.format, family_of(self.config), self.config, n, dtypes, dict(self.files.metadata))

    def stored_dtype(self) -> torch.dtype:
        """The dtype holding most parameters; float8 (and anything else narrow) computes in bfloat16."""
        by_numel: dict[torch.dtype, int] = {}
        for srcs, _ in self.plan.values():
            for s in srcs:
                dt = self.files.dtypes[s]
                by_numel[dt] = by_numel.get(dt, 0) + int(torch.Size(self.files.shapes[s]).numel())
        stored = max(by_numel, key=by_numel.get)
        return stored if stored in (torch.float32, torch.float16) else torch.bfloat16

    def tensors(self, dtype: torch.dtype | None = None):
        """Yield (BFL key, tensor) one at a time, so peak host memory stays near one copy."""
        for dst, (srcs, fn) in self.plan.items():
            yield dst, fn([self.files.get(s, dtype) for s in srcs])

    def fingerprint(self) -> str:
        """Content fingerprint of the tensors under their BFL names (16 hex digits): a renamed or
        re-prefixed copy matches, other weights of the same shapes do not (rflow.checkpoints.hashing)."""
        from .hashing import content_fingerprint

        return content_fingerprint(self.files.paths, {dst: list(srcs) for dst, (srcs, _) in self.plan.items()})

    def model_hash(self) -> str:
        """The "Model hash" of A1111/ComfyUI/Civitai: sha256 of the weights file(s), 10 hex digits."""
        from .hashing import model_hash

        return model_hash(self.files.paths)


def load_flux(
    path: str | os.PathLike, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[Flux, CheckpointInfo]:
    """Build a :class:`Flux` on the meta device from a checkpoint's shapes and load it with ``assign=True``.

    ``dtype`` defaults to the checkpoint's floating dtype (float8 is upcast to bfloat16)."""
    with FluxCheckpoint(path) as ckpt:
        info = ckpt.info()
        if dtype is None:
            dtype = ckpt.stored_dtype()
        with torch.device("meta"):
            model = Flux(ckpt.config)
        sd = {k: t.to(device=device or "cpu", dtype=dtype) for k, t in ckpt.tensors(dtype)}
    expected = set(model.state_dict())
    unexpected = sorted(set(sd) - expected)
    missing = sorted(expected - set(sd))
    if unexpected or missing:
        what = f"unexpected key {unexpected[0]!r}" if unexpected else f"missing key {missing[0]!r}"
        raise UserError(f"{path}: not a FLUX.1 transformer this build understands ({what})")
    for k, t in model.state_dict().items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise UserError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(t.shape)}")
    model.load_state_dict(sd, assign=True, strict=True)
    model.info = info  # type: ignore[attr-defined]
    return model.eval().requires_grad_(False), info
