"""FLUX.2 checkpoints: layout detection, the diffusers -> BFL key plan, config inference from shapes.

Layouts (detected from keys, never from file names):

- ``bfl``: Black Forest Labs single file (``flux-2-klein-4b.safetensors``), keys like
  ``double_blocks.0.img_attn.qkv.weight``, ``double_stream_modulation_img.lin.weight``;
- ``comfyui``: the same keys behind ``model.diffusion_model.`` or ``diffusion_model.``;
- ``diffusers``: ``Flux2Transformer2DModel`` keys (``transformer_blocks.0.attn.to_q.weight``), one file or
  a ``transformer/`` folder with ``config.json`` and (sharded) safetensors.

FLUX.2 is told from FLUX.1 by its shared modulations (``double_stream_modulation_*``,
``single_stream_modulation``), which FLUX.1 (per-block ``img_mod``/``txt_mod``, ``vector_in``) never has.
All layouts map to BFL names, the attribute names of :class:`rflow.models.flux2.Flux2`; the config
(depths, hidden size, heads, channels, guidance embedder, every block's MLP width) is inferred from
shapes and every tensor is checked against a model built on the meta device from it.
"""

from __future__ import annotations

import json
import math
import re

import torch

from ..checkpoints.io import majority, tensor_kind
from ..checkpoints.plan import Plan, block_indices, cat, check_against_model, check_plan_sources, identity_plan, one, swap_halves
from ..errors import UserError
from ..models.flux2 import Flux2, Flux2Config

CONFIG_METADATA_KEY = "rflow.flux2_config"
PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# The published transformers (transformer/config.json of black-forest-labs/FLUX.2-klein-4B, -klein-base-4B,
# -klein-9B, -klein-base-9B; FLUX.2-dev): head dim 128, mlp_ratio 3, RoPE axes (32, 32, 32, 32), theta 2000.
KLEIN_4B = Flux2Config(hidden_size=3072, num_heads=24, context_in_dim=7680, guidance_embed=False,
                       double_mlp=[(9216, 9216)] * 5, single_mlp=[9216] * 20)
KLEIN_9B = Flux2Config(hidden_size=4096, num_heads=32, context_in_dim=12288, guidance_embed=False,
                       double_mlp=[(12288, 12288)] * 8, single_mlp=[12288] * 24)
DEV = Flux2Config(hidden_size=6144, num_heads=48, context_in_dim=15360, guidance_embed=True,
                  double_mlp=[(18432, 18432)] * 8, single_mlp=[18432] * 48)

_MODULATIONS = ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")


def detect(keys: list[str]) -> tuple[str, str] | None:
    """(layout, prefix) if ``keys`` hold a FLUX.2 transformer (its shared modulations), else None."""
    keyset = set(keys)
    for prefix in ("",) + PREFIXES:
        if any(f"{prefix}{m}.lin.weight" in keyset for m in _MODULATIONS):
            return ("bfl" if prefix == "" else "comfyui"), prefix
    if any(f"{m}.linear.weight" in keyset for m in _MODULATIONS):
        return "diffusers", ""
    return None


def diffusers_plan(keys: list[str], *, partial: bool = False) -> Plan:
    """How to build every BFL key from diffusers ``Flux2Transformer2DModel`` keys (q, k, v concatenated
    into qkv; the final norm's (scale, shift) swapped into BFL's (shift, scale)). Any diffusers tensor
    the plan does not use is a UserError. ``partial``: ``keys`` name only some layers (a LoRA's targets):
    a fused tensor is planned when any of its parts is there; absent and unused keys are no error."""
    keyset = set(keys)
    plan: Plan = {}

    def lin(dst: str, src: str, fn=one, parts=None):  # FLUX.2 has no biases: a bias is an unexpected tensor
        srcs = [f"{s}.weight" for s in (parts or [src])]
        if any(s in keyset for s in (srcs if partial else srcs[:1])):
            plan[f"{dst}.weight"] = (srcs, cat if parts else fn)

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    for dst, src in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder")):
        lin(f"{dst}.in_layer", f"time_guidance_embed.{src}.linear_1")
        lin(f"{dst}.out_layer", f"time_guidance_embed.{src}.linear_2")
    for m in _MODULATIONS:
        lin(f"{m}.lin", f"{m}.linear")
    lin("final_layer.linear", "proj_out")
    lin("final_layer.adaLN_modulation.1", "norm_out.linear", swap_halves)

    for i in block_indices(keys, "transformer_blocks."):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for stream, qkv, out, qn, kn, ff in (
            ("img", ("to_q", "to_k", "to_v"), "to_out.0", "norm_q", "norm_k", "ff"),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "norm_added_q", "norm_added_k", "ff_context"),
        ):
            lin(f"{d}.{stream}_attn.qkv", "", parts=[f"{s}.attn.{n}" for n in qkv])
            lin(f"{d}.{stream}_attn.proj", f"{s}.attn.{out}")
            plan[f"{d}.{stream}_attn.norm.query_norm.scale"] = ([f"{s}.attn.{qn}.weight"], one)
            plan[f"{d}.{stream}_attn.norm.key_norm.scale"] = ([f"{s}.attn.{kn}.weight"], one)
            lin(f"{d}.{stream}_mlp.0", f"{s}.{ff}.linear_in")
            lin(f"{d}.{stream}_mlp.2", f"{s}.{ff}.linear_out")
    for i in block_indices(keys, "single_transformer_blocks."):
        s, d = f"single_transformer_blocks.{i}.attn", f"single_blocks.{i}"
        lin(f"{d}.linear1", f"{s}.to_qkv_mlp_proj")
        lin(f"{d}.linear2", f"{s}.to_out")
        plan[f"{d}.norm.query_norm.scale"] = ([f"{s}.norm_q.weight"], one)
        plan[f"{d}.norm.key_norm.scale"] = ([f"{s}.norm_k.weight"], one)

    if partial:
        return plan
    check_plan_sources(plan, keys, "diffusers FLUX.2")
    used = {src for srcs, _ in plan.values() for src in srcs}
    extra = [k for k in keys if k not in used and not k.startswith("rflow.")]
    if extra:
        raise UserError(f"unexpected tensor {extra[0]!r} in a diffusers FLUX.2 transformer")
    return plan


def plan(keys: list[str], layout: str, prefix: str = "") -> Plan:
    return diffusers_plan(keys) if layout == "diffusers" else identity_plan(keys, prefix)


def overrides(metadata: dict[str, str], diffusers_config: dict | None = None) -> dict:
    """What shapes cannot tell (RoPE axes, theta): diffusers' config.json (``axes_dims_rope``,
    ``rope_theta``), then rflow's safetensors metadata ``rflow.flux2_config`` (a JSON object)."""
    out = {}
    for theirs, ours in (("axes_dims_rope", "axes_dim"), ("rope_theta", "theta")):
        if diffusers_config and theirs in diffusers_config:
            out[ours] = diffusers_config[theirs]
    from ..checkpoints.loader import metadata_overrides

    out.update(metadata_overrides(metadata, CONFIG_METADATA_KEY))
    return out


def config_metadata(config: Flux2Config) -> dict[str, str]:
    """Safetensors metadata for what shapes cannot tell (read back by :func:`overrides`)."""
    return {CONFIG_METADATA_KEY: json.dumps({"axes_dim": list(config.axes_dim), "theta": config.theta})}


def _check_overrides(overrides) -> dict:
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise UserError(f"config overrides must be a JSON object, got {type(overrides).__name__}")
    out = {}
    for theirs, ours in (("axes_dims_rope", "axes_dim"), ("rope_theta", "theta")):
        if theirs in overrides and ours not in overrides:
            overrides = {**overrides, ours: overrides[theirs]}
    if "axes_dim" in overrides:
        v = overrides["axes_dim"]
        if not (isinstance(v, (list, tuple)) and v
                and all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 and a % 2 == 0 for a in v)):
            raise UserError(f"RoPE axes {v!r} must be a list of even non-negative integers")
        out["axes_dim"] = tuple(v)
    if "theta" in overrides:
        v = overrides["theta"]
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            raise UserError(f"RoPE theta {v!r} must be a positive number")
        out["theta"] = v
    return out


def default_axes_dim(head_dim: int) -> tuple[int, int, int, int]:
    """FLUX.2's RoPE split: four equal even parts ((32, 32, 32, 32) for head dim 128), the first taking
    what does not divide evenly."""
    q = head_dim // 8 * 2
    return (head_dim - 3 * q, q, q, q)


_NORM_SCALE = re.compile(r"(?:double_blocks\.\d+\.(?:img|txt)_attn|single_blocks\.\d+)\.norm\.(?:query|key)_norm\.scale")


def expected_shapes(config: Flux2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a :class:`Flux2` built from ``config`` and its shape (built on the meta device)."""
    with torch.device("meta"):
        model = Flux2(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_config(shapes: dict[str, tuple[int, ...]], overrides: dict | None = None, *, plan: Plan | None = None,
                 source_shapes: dict[str, tuple[int, ...]] | None = None) -> Flux2Config:
    """A :class:`Flux2Config` from BFL key shapes; ``overrides`` (config.json / metadata) give the RoPE
    axes and theta. Every tensor must have exactly the shape ``Flux2(config)`` has for its name, every
    tensor of that model must be there and no other, else a UserError names the tensor — the
    checkpoint's own name when ``plan`` and ``source_shapes`` (a mapped layout) are given."""
    shapes = {k: tuple(s) for k, s in shapes.items()}
    if plan is None:
        plan, source_shapes = {k: ([k], one) for k in shapes}, shapes
    elif source_shapes is None:
        raise TypeError("infer_config: plan needs source_shapes")

    def label(k: str) -> str:
        srcs = plan[k][0] if k in plan else [k]
        return srcs[0] if len(srcs) == 1 else f"{k} (from {', '.join(srcs)})"

    def dim(k: str, axis: int, rank: int = 2, div: int = 1, minus: int = 0) -> int | None:
        """(size of ``axis`` − minus) / div for a tensor of rank ``rank``, if that is a positive integer."""
        s = shapes.get(k)
        if s is None or len(s) != rank or min(s) < 1 or (s[axis] - minus) % div or s[axis] <= minus:
            return None
        return (s[axis] - minus) // div

    def require(k: str, rank: int) -> tuple[int, ...]:
        if k not in shapes:
            raise UserError(f"FLUX.2 checkpoint is missing {k!r}")
        s = shapes[k]
        if len(s) != rank or min(s) < 1:
            raise UserError(f"{label(k)} has shape {s}, expected a {rank}-D {tensor_kind(k)} with no empty dimension")
        return s

    double_idx = block_indices(shapes, "double_blocks.")
    single_idx = block_indices(shapes, "single_blocks.")
    if not double_idx and not single_idx:
        raise UserError("FLUX.2 checkpoint has no transformer blocks")
    hidden = majority([dim("img_in.weight", 0), dim("txt_in.weight", 0), dim("time_in.in_layer.weight", 0),
                       dim("final_layer.linear.weight", 1), dim("single_stream_modulation.lin.weight", 1)])
    if hidden is None:
        hidden = require("img_in.weight", 2)[0]

    def head_dim_of(k: str) -> int | None:
        d = dim(k, 0, rank=1)
        return d if d is not None and d % 2 == 0 and hidden % d == 0 else None

    head_dim = majority([head_dim_of(k) for k in shapes if _NORM_SCALE.fullmatch(k)])
    if head_dim is None:
        first = "double_blocks.0.img_attn.norm.query_norm.scale" if double_idx else "single_blocks.0.norm.query_norm.scale"
        raise UserError(f"{label(first)} has shape {require(first, 1)}, "
                        f"expected an even head dim that divides hidden size {hidden}")

    def width(k_in: str, k_out: str, minus: int) -> int:
        """A block's MLP width from its fused in-projection's rows (2W after ``minus``) and its
        out-projection's columns (W after ``minus``); two readings that disagree name both tensors."""
        w_in, w_out = dim(k_in, 0, div=2, minus=3 * minus), dim(k_out, 1, minus=minus)
        if w_in is None and w_out is None:
            raise UserError(f"{label(k_in)} has shape {require(k_in, 2)}, expected {3 * minus} + an even number of rows "
                            f"(the SwiGLU gate and up halves) for hidden size {hidden}")
        if w_in is not None and w_out is not None and w_in != w_out:
            raise UserError(f"{label(k_in)} has shape {shapes[k_in]} (MLP width {w_in}) but {label(k_out)} has shape "
                            f"{shapes[k_out]} (MLP width {w_out}): one of them is wrong")
        return w_in if w_in is not None else w_out

    double = [tuple(width(f"{b}.0.weight", f"{b}.2.weight", 0)
                    for b in (f"double_blocks.{i}.img_mlp", f"double_blocks.{i}.txt_mlp")) for i in double_idx]
    single = [width(f"single_blocks.{i}.linear1.weight", f"single_blocks.{i}.linear2.weight", hidden) for i in single_idx]
    cfg = dict(hidden_size=hidden, num_heads=hidden // head_dim, in_channels=require("img_in.weight", 2)[1],
               out_channels=require("final_layer.linear.weight", 2)[0], context_in_dim=require("txt_in.weight", 2)[1],
               time_dim=require("time_in.in_layer.weight", 2)[1],
               guidance_embed=any(k.startswith("guidance_in.") for k in shapes),
               axes_dim=default_axes_dim(head_dim), double_mlp=double, single_mlp=single)
    cfg.update(_check_overrides(overrides))
    try:
        config = Flux2Config(**cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"inconsistent FLUX.2 checkpoint: {e}") from None

    check_against_model(
        expected_shapes(config), shapes, plan, source_shapes, title="FLUX.2", label=label,
        model=f"a FLUX.2 transformer with {config.depth} double and {config.depth_single} single blocks",
        why=lambda k: f"for hidden size {hidden}, {config.num_heads} heads"
        + (f" and MLP width {_block_width(k, config)}" if _block_width(k, config) else ""))
    return config


def _block_width(key: str, cfg: Flux2Config) -> int | None:
    m = re.match(r"double_blocks\.(\d+)\.(img|txt)_mlp\.", key)
    if m:
        return cfg.double_mlp[int(m[1])][m[2] == "txt"]
    m = re.match(r"single_blocks\.(\d+)\.linear[12]\.", key)
    return cfg.single_mlp[int(m[1])] if m else None
