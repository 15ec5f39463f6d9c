"""FLUX.1 checkpoints: layout detection, the diffusers -> BFL key plan, config inference from shapes.

Layouts (detected from keys, never from file names):

- ``bfl``: Black Forest Labs single file (``flux1-dev.safetensors``), keys like ``double_blocks.0.img_attn.qkv.weight``;
- ``comfyui``: the same keys behind ``model.diffusion_model.`` or ``diffusion_model.``;
- ``diffusers``: ``FluxTransformer2DModel`` keys (``transformer_blocks.0.attn.to_q.weight``), one file or a
  ``transformer/`` folder with ``config.json`` and (sharded) safetensors.

All layouts are mapped to BFL names, the attribute names of :class:`rflow.models.flux.Flux`. The
config (depths, widths, heads, guidance embedder, each block's MLP width) is inferred from shapes and
every tensor is checked against it.
"""

from __future__ import annotations

import math
import re

import torch

from ..checkpoints.io import majority, tensor_kind
from ..checkpoints.plan import Plan, block_indices, cat, check_against_model, one, swap_halves
from ..errors import UserError
from ..models.flux import Flux, FluxConfig

CONFIG_METADATA_KEY = "rflow.flux_config"
PREFIXES = ("model.diffusion_model.", "diffusion_model.")


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


def diffusers_plan(keys: list[str], *, partial: bool = False) -> Plan:
    """How to build every BFL key from diffusers ``FluxTransformer2DModel`` keys. ``partial``: ``keys`` name
    only some layers (a LoRA's targets): a fused tensor is planned when any of its parts is there, and
    absent sources are no error."""
    keyset = set(keys)
    plan: Plan = {}

    def lin(dst: str, src: str, fn=one):
        for p in ("weight", "bias"):
            if f"{src}.{p}" in keyset:
                plan[f"{dst}.{p}"] = ([f"{src}.{p}"], fn)

    def qkv(dst: str, srcs: list[str]):
        for p in ("weight", "bias"):
            if any(f"{s}.{p}" in keyset for s in (srcs if partial else srcs[:1])):
                plan[f"{dst}.{p}"] = ([f"{s}.{p}" for s in srcs], cat)

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
    lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    lin("final_layer.linear", "proj_out")
    lin("final_layer.adaLN_modulation.1", "norm_out.linear", swap_halves)

    for i in block_indices(keys, "transformer_blocks."):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for stream, mod, q, k, v, out, qn, kn, ff in (
            ("img", "norm1", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k", "ff"),
            ("txt", "norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q", "norm_added_k", "ff_context"),
        ):
            lin(f"{d}.{stream}_mod.lin", f"{s}.{mod}.linear")
            qkv(f"{d}.{stream}_attn.qkv", [f"{s}.attn.{q}", f"{s}.attn.{k}", f"{s}.attn.{v}"])
            lin(f"{d}.{stream}_attn.proj", f"{s}.attn.{out}")
            plan[f"{d}.{stream}_attn.norm.query_norm.scale"] = ([f"{s}.attn.{qn}.weight"], one)
            plan[f"{d}.{stream}_attn.norm.key_norm.scale"] = ([f"{s}.attn.{kn}.weight"], one)
            lin(f"{d}.{stream}_mlp.0", f"{s}.{ff}.net.0.proj")
            lin(f"{d}.{stream}_mlp.2", f"{s}.{ff}.net.2")

    for i in block_indices(keys, "single_transformer_blocks."):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        qkv(f"{d}.linear1", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"])
        lin(f"{d}.linear2", f"{s}.proj_out")
        lin(f"{d}.modulation.lin", f"{s}.norm.linear")
        plan[f"{d}.norm.query_norm.scale"] = ([f"{s}.attn.norm_q.weight"], one)
        plan[f"{d}.norm.key_norm.scale"] = ([f"{s}.attn.norm_k.weight"], one)

    missing = [src for srcs, _ in plan.values() for src in srcs if src not in keyset]
    if missing and not partial:
        raise UserError(f"diffusers FLUX checkpoint is missing {missing[0]!r}")
    return plan


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
        plan = {k: ([k], one) for k in shapes}
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

    double_idx = block_indices(shapes, "double_blocks.")
    single_idx = block_indices(shapes, "single_blocks.")
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

    rows = lambda k, want, n: [hidden] * (n - 1) + [want[0] - hidden * (n - 1)]  # noqa: E731 (q, k, v hidden-sized)
    check_against_model(expected_shapes(config), shapes, plan, source_shapes, title="FLUX.1",
                        model=f"a FLUX.1 transformer with {config.depth} double and {config.depth_single} single blocks",
                        why=lambda k: _why(k, config), part_rows=rows, label=label)
    return config


def family_of(cfg: FluxConfig) -> str:
    full = cfg.hidden_size == 3072 and cfg.depth_single == 38
    if full and cfg.depth == 19:
        return "flux1-dev" if cfg.guidance_embed else "flux1-schnell"
    if full and cfg.depth == 8:
        return "flex1-alpha"
    return "flux1-custom"
