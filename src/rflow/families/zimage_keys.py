"""Z-Image checkpoints: layout detection, the diffusers -> original key plan, config inference from shapes.

Layouts (detected from keys, never from file names):

- ``original``: the single-file release (``z_image_turbo_bf16.safetensors``; Lumina2/"NextDiT" names, as
  ComfyUI loads it): ``x_embedder``, ``final_layer``, ``layers.{i}.attention.qkv`` (fused q, k, v),
  ``attention.out``, ``attention.q_norm`` / ``k_norm``;
- ``comfyui``: the same keys behind ``model.diffusion_model.`` or ``diffusion_model.``;
- ``diffusers``: ``ZImageTransformer2DModel`` keys, one file or a ``transformer/`` folder (sharded or not).
  They differ from the original only in ``all_x_embedder.2-1`` (``x_embedder``), ``all_final_layer.2-1``
  (``final_layer``), ``attention.to_q`` / ``to_k`` / ``to_v`` (rows of ``attention.qkv``),
  ``attention.to_out.0`` (``attention.out``) and ``attention.norm_q`` / ``norm_k`` (``q_norm`` / ``k_norm``);
  every other key (refiners, norms, feed-forwards, adaLN, embedders, pad tokens) is the same.

All layouts map to the original names, the attribute names of :class:`rflow.models.zimage.ZImage`.
The config (dims, heads, per-block MLP widths) is inferred from shapes; what shapes cannot tell (RoPE
axes and theta, norm eps, t_scale, patch size) comes from ``overrides`` — diffusers' ``config.json``
can be passed as it is.
"""

from __future__ import annotations

import math
import re

import torch

from ..checkpoints.io import majority, tensor_kind
from ..checkpoints.plan import Plan, block_indices, cat, check_against_model, check_plan_sources, identity_plan, one
from ..errors import UserError
from ..models.zimage import ZImage, ZImageConfig

CONFIG_METADATA_KEY = "rflow.zimage_config"  # rflow's own config in safetensors metadata
PREFIXES = ("model.diffusion_model.", "diffusion_model.")
BLOCKS = ("layers", "noise_refiner", "context_refiner")

# The published Z-Image-Turbo (and Z-Image base) transformer: Tongyi-MAI/Z-Image-Turbo
# transformer/config.json — dim 3840, 30 layers, 2 + 2 refiner layers, 30 heads, cap_feat_dim 2560,
# in_channels 16, patch 2, norm_eps 1e-5, qk_norm, rope_theta 256, t_scale 1000, axes_dims [32, 48, 48];
# MLP width int(3840 / 3 * 8) = 10240. 6,154,908,736 parameters.
Z_IMAGE = ZImageConfig()

# original-layout keys unused by the model (a leftover of Lumina 2 in some exports; diffusers drops it too)
_IGNORED = ("norm_final.weight",)


def detect(keys: list[str]) -> tuple[str, str] | None:
    """(layout, prefix) if ``keys`` are a Z-Image transformer's, else None. Lumina 2 shares the NextDiT
    names; Z-Image is told apart by its pad tokens or its SiLU-less block adaLN (``adaLN_modulation.0``)."""
    keyset = set(keys)
    for prefix in ("",) + PREFIXES:
        if f"{prefix}x_embedder.weight" in keyset and f"{prefix}cap_embedder.1.weight" in keyset and any(
            f"{prefix}{k}" in keyset for k in ("x_pad_token", "cap_pad_token", "layers.0.adaLN_modulation.0.weight")
        ):
            return ("original" if prefix == "" else "comfyui"), prefix
    if "cap_embedder.1.weight" in keyset and any(k.startswith("all_x_embedder.") for k in keyset):
        return "diffusers", ""
    return None


def _patch_tag(keys) -> str:
    tags = sorted({m[1] for k in keys if (m := re.match(r"all_x_embedder\.([^.]+)\.", k))})
    if len(tags) != 1:
        raise UserError(f"diffusers Z-Image checkpoint has patch embedders {tags}; rflow supports exactly one")
    if not re.fullmatch(r"\d+-1", tags[0]):
        raise UserError(f"all_x_embedder.{tags[0]}: only frame patch size 1 (images) is supported")
    return tags[0]


def diffusers_plan(keys: list[str], *, partial: bool = False) -> Plan:
    """How to build every original key from diffusers ``ZImageTransformer2DModel`` keys. ``partial``: ``keys``
    name only some layers (a LoRA's targets): a fused tensor is planned when any of its parts is there,
    and absent sources are no error."""
    keyset = set(keys)
    tag = _patch_tag(keys) if not partial or any(k.startswith("all_x_embedder.") for k in keys) else None
    plan: Plan = {}
    for k in keys:
        if k.startswith(f"all_x_embedder.{tag}."):
            plan["x_embedder." + k.split(".", 2)[2]] = ([k], one)
        elif k.startswith(f"all_final_layer.{tag}."):
            plan["final_layer." + k.split(".", 2)[2]] = ([k], one)
        elif ".attention.to_q." in k:
            plan[k.replace(".to_q.", ".qkv.")] = ([k, k.replace(".to_q.", ".to_k."), k.replace(".to_q.", ".to_v.")], cat)
        elif ".attention.to_k." in k or ".attention.to_v." in k:
            q = k.replace(".to_k.", ".to_q.").replace(".to_v.", ".to_q.")
            if q not in keyset:
                if not partial:
                    raise UserError(f"diffusers Z-Image checkpoint has {k!r} but no matching to_q")
                plan[q.replace(".to_q.", ".qkv.")] = ([q, q.replace(".to_q.", ".to_k."), q.replace(".to_q.", ".to_v.")], cat)
        elif not k.startswith("rflow."):
            dst = k.replace(".attention.to_out.0.", ".attention.out.")
            dst = dst.replace(".attention.norm_q.", ".attention.q_norm.").replace(".attention.norm_k.", ".attention.k_norm.")
            plan[dst] = ([k], one)
    if not partial:
        check_plan_sources(plan, keys, "diffusers Z-Image")
    return plan


def plan(keys: list[str], layout: str, prefix: str = "") -> Plan:
    if layout == "diffusers":
        return diffusers_plan(keys)
    return {k: v for k, v in identity_plan(keys, prefix).items() if k not in _IGNORED}


def default_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """Z-Image's RoPE split (32, 48, 48) for head dim 128, scaled to other head dims (all parts even)."""
    if head_dim == 128:
        return (32, 48, 48)
    b = (head_dim * 3 // 8) // 2 * 2
    return (head_dim - 2 * b, b, b)


def expected_shapes(config: ZImageConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = ZImage(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _diffusers_name(key: str, c: ZImageConfig) -> str:
    """The diffusers key a missing original key comes from (the first of q, k, v for ``qkv``)."""
    for a, b in (("x_embedder.", f"all_x_embedder.{c.patch_size}-1."), ("final_layer.", f"all_final_layer.{c.patch_size}-1.")):
        if key.startswith(a):
            return b + key[len(a):]
    for a, b in ((".attention.qkv.", ".attention.to_q."), (".attention.out.", ".attention.to_out.0."),
                 (".attention.q_norm.", ".attention.norm_q."), (".attention.k_norm.", ".attention.norm_k.")):
        key = key.replace(a, b)
    return key


def _why(key: str, c: ZImageConfig) -> str:
    m = re.match(r"(layers|noise_refiner|context_refiner)\.(\d+)\.feed_forward\.", key)
    if m:
        widths = {"layers": c.layers_mlp, "noise_refiner": c.noise_refiner_mlp, "context_refiner": c.context_refiner_mlp}
        return f"for dim {c.dim} and MLP width {widths[m[1]][int(m[2])]}"
    if key.endswith(("q_norm.weight", "k_norm.weight")):
        return f"for dim {c.dim} with {c.n_heads} heads"
    if key.startswith(("x_embedder.", "final_layer.linear.")):
        return f"for dim {c.dim}, {c.in_channels} latent channels and patch size {c.patch_size}"
    if key.startswith("cap_embedder."):
        return f"for dim {c.dim} and {c.cap_feat_dim}-wide caption features"
    if "adaLN_modulation" in key or key.startswith("t_embedder."):
        return f"for dim {c.dim} and a {c.adaln_dim}-wide timestep embedding ({c.t_freq_dim} -> {c.t_mid_dim} -> {c.adaln_dim})"
    return f"for dim {c.dim}"


def _number(overrides: dict, key: str, integer: bool = False):
    v = overrides[key]
    if isinstance(v, list) and len(v) == 1 and key.startswith("all_"):
        v = v[0]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok or (integer and not float(v).is_integer()):
        raise UserError(f"config {key} {overrides[key]!r} must be a positive {'integer' if integer else 'number'}")
    return int(v) if integer else v


def _check_overrides(overrides) -> dict:
    """What shapes cannot tell, from diffusers' config.json (or rflow's own config dict)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise UserError(f"config overrides must be a JSON object, got {type(overrides).__name__}")
    out = {}
    if "axes_dims" in overrides:
        v = overrides["axes_dims"]
        if not (isinstance(v, (list, tuple)) and len(v) == 3
                and all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 and a % 2 == 0 for a in v)):
            raise UserError(f"RoPE axes {v!r} must be a list of 3 even non-negative integers")
        out["axes_dims"] = tuple(v)
    for key in ("rope_theta", "norm_eps", "t_scale"):
        if key in overrides:
            out[key] = _number(overrides, key)
    for key, dst in (("n_heads", "n_heads"), ("seq_multiple", "seq_multiple"), ("patch_size", "patch_size"),
                     ("all_patch_size", "patch_size")):
        if key in overrides:
            out[dst] = _number(overrides, key, integer=True)
    if "all_f_patch_size" in overrides and _number(overrides, "all_f_patch_size", integer=True) != 1:
        raise UserError(f"config all_f_patch_size {overrides['all_f_patch_size']!r}: only 1 (images) is supported")
    return out


def infer_config(
    shapes: dict[str, tuple[int, ...]],
    overrides: dict | None = None,
    *,
    plan: Plan | None = None,
    source_shapes: dict[str, tuple[int, ...]] | None = None,
) -> ZImageConfig:
    """A :class:`ZImageConfig` from original-name shapes, checked against every tensor of a model built
    from it (every tensor present, no other, each of the right shape; else a UserError naming the
    checkpoint's tensor). ``plan`` and ``source_shapes`` (a mapped layout's own names and shapes) make the
    errors name the checkpoint's tensors and check q, k and v one by one."""
    shapes = {k: tuple(s) for k, s in shapes.items()}
    if plan is None:
        plan, source_shapes = {k: ([k], one) for k in shapes}, shapes
    elif source_shapes is None:
        raise TypeError("infer_config: plan needs source_shapes")
    over = _check_overrides(overrides)

    def label(k: str) -> str:
        srcs = plan[k][0] if k in plan else [k]
        return srcs[0] if len(srcs) == 1 else f"{k} (from {', '.join(srcs)})"

    def dim(k: str, rank: int, axis: int) -> int | None:
        s = shapes.get(k)
        return s[axis] if s is not None and len(s) == rank and min(s) >= 1 else None

    def require(k: str, rank: int) -> tuple[int, ...]:
        if k not in shapes:
            raise UserError(f"Z-Image checkpoint is missing {label(k)!r}")
        s = shapes[k]
        if len(s) != rank or min(s) < 1:
            raise UserError(f"{label(k)} has shape {s}, expected a {rank}-D {tensor_kind(k)} with no empty dimension")
        return s

    idx = {b: block_indices(shapes, f"{b}.") for b in BLOCKS}
    if not idx["layers"]:
        raise UserError("Z-Image checkpoint has no transformer layers (layers.0...)")
    d = majority([dim("x_embedder.weight", 2, 0), dim("x_embedder.bias", 1, 0), dim("cap_embedder.1.weight", 2, 0),
                  dim("final_layer.linear.weight", 2, 1), dim("x_pad_token", 2, 1), dim("cap_pad_token", 2, 1)])
    if d is None:
        d = require("x_embedder.weight", 2)[0]
    # diffusers names the patch size in its keys (all_x_embedder.{patch}-1); else config.json or 2
    tagged = re.fullmatch(r"all_x_embedder\.(\d+)-1\.weight", plan.get("x_embedder.weight", ([""], one))[0][0])
    patch = int(tagged[1]) if tagged else over.get("patch_size", 2)
    if over.setdefault("patch_size", patch) != patch:
        raise UserError(f"{tagged[0]} is for patch size {patch}, but the config says {over['patch_size']}")
    in_features = require("x_embedder.weight", 2)[1]
    if in_features % (patch * patch):
        raise UserError(f"{label('x_embedder.weight')} has shape {shapes['x_embedder.weight']}, "
                        f"expected columns divisible by {patch * patch} (patch size {patch})")
    t_freq, t_mid = require("t_embedder.mlp.0.weight", 2)[1], require("t_embedder.mlp.0.weight", 2)[0]
    adaln = majority([dim("t_embedder.mlp.2.weight", 2, 0), dim("t_embedder.mlp.2.bias", 1, 0),
                      dim("final_layer.adaLN_modulation.1.weight", 2, 1)]
                     + [dim(f"{b}.{i}.adaLN_modulation.0.weight", 2, 1) for b in ("layers", "noise_refiner") for i in idx[b]])
    if adaln is None:
        adaln = require("t_embedder.mlp.2.weight", 2)[0]

    norms = [k for k in shapes if re.fullmatch(r"(?:layers|noise_refiner|context_refiner)\.\d+\.attention\.[qk]_norm\.weight", k)]
    qk_norm = bool(norms)
    if qk_norm:
        head_dim = majority([v for k in norms if (v := dim(k, 1, 0)) and v % 2 == 0 and d % v == 0])
        if head_dim is None:
            raise UserError(f"{label(norms[0])} has shape {shapes[norms[0]]}, expected an even head dim that divides dim {d}")
        n_heads = over.pop("n_heads", d // head_dim)
    elif "n_heads" in over:
        n_heads = over.pop("n_heads")
    else:
        raise UserError("Z-Image checkpoint without q/k norms: the number of heads is unknown (give n_heads in the config)")

    def width(b: str, i: int) -> int:
        f = f"{b}.{i}.feed_forward"
        w = majority([dim(f"{f}.w1.weight", 2, 0), dim(f"{f}.w3.weight", 2, 0), dim(f"{f}.w2.weight", 2, 1)])
        return w if w is not None else require(f"{f}.w1.weight", 2)[0]

    head = d // n_heads if n_heads and d % n_heads == 0 else 0
    cfg = dict(
        dim=d, n_heads=n_heads, in_channels=in_features // (patch * patch), patch_size=patch,
        cap_feat_dim=require("cap_embedder.1.weight", 2)[1], adaln_dim=adaln, t_mid_dim=t_mid, t_freq_dim=t_freq,
        qk_norm=qk_norm, axes_dims=default_axes_dims(head) if head else (0, 0, 0),
        layers_mlp=[width("layers", i) for i in idx["layers"]],
        noise_refiner_mlp=[width("noise_refiner", i) for i in idx["noise_refiner"]],
        context_refiner_mlp=[width("context_refiner", i) for i in idx["context_refiner"]],
    )
    cfg.update(over)
    try:
        config = ZImageConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"inconsistent Z-Image checkpoint: {e}") from None

    mapped = any(srcs != [k] for k, (srcs, _) in plan.items())
    check_against_model(
        expected_shapes(config), shapes, plan, source_shapes, title="Z-Image", label=label,
        model=f"a Z-Image transformer with {config.n_layers} layers, {len(config.noise_refiner_mlp)} noise and "
              f"{len(config.context_refiner_mlp)} context refiner layers",
        why=lambda k: _why(k, config), missing_name=(lambda k: _diffusers_name(k, config)) if mapped else None)
    return config


def overrides(metadata: dict[str, str], diffusers_config: dict | None) -> dict:
    """What shapes cannot tell: rflow's safetensors metadata, then diffusers' config.json (which wins)."""
    from ..checkpoints.loader import metadata_overrides

    return {**metadata_overrides(metadata, CONFIG_METADATA_KEY), **(diffusers_config or {})}


def config_metadata(config: ZImageConfig) -> dict[str, str]:
    """Safetensors metadata for what shapes cannot tell, in the config.json names :func:`overrides` reads."""
    import json

    return {CONFIG_METADATA_KEY: json.dumps({"axes_dims": list(config.axes_dims), "rope_theta": config.rope_theta,
                                             "norm_eps": config.norm_eps, "t_scale": config.t_scale,
                                             "n_heads": config.n_heads, "seq_multiple": config.seq_multiple})}
