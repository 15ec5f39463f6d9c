"""FLUX.2 (klein 4B / 9B, distilled and base; FLUX.2-dev; pruned variants): checkpoint knowledge and layer list.

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

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.io import majority, tensor_kind
from ..checkpoints.plan import Plan, block_indices, cat, check_against_model, check_plan_sources, identity_plan, one, swap_halves
from ..errors import UserError
from ..models.flux2 import Flux2, Flux2Config, image_ids, pack, unpack
from .base import LatentSpec, LayerRef, Slice, sigma_vector
from .flux2_refs import prepare_references, reference_default_size, reference_pixels  # noqa: F401  (the interface)

NAME = "flux2"
TITLE = "FLUX.2"
CONFIG_CLASS = Flux2Config
CONFIG_METADATA_KEY = "rflow.flux2_config"
PREFIXES = ("model.diffusion_model.", "diffusion_model.")
STREAMS = ("img", "txt", "single")
DEFAULT_SIZE = (1024, 1024)  # (width, height), Flux2KleinPipeline's default
MAX_SEQUENCE_LENGTH = 512  # Qwen3 tokens, chat template included
DEFAULT_GUIDANCE = 4.0  # Flux2Pipeline's guidance_scale, for models with a guidance embedder (FLUX.2-dev)
CODEC_HELP = "a diffusers vae/ folder (AutoencoderKLFlux2), ae.safetensors or flux2-vae.safetensors"
TEXT_HELP = "text_encoder/ and tokenizer/ of a Qwen3 encoder"
CODEC_FILES = ("ae.safetensors", "flux2-vae.safetensors", "flux2_vae.safetensors")

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


def diffusers_plan(keys: list[str]) -> Plan:
    """How to build every BFL key from diffusers ``Flux2Transformer2DModel`` keys (q, k, v concatenated
    into qkv; the final norm's (scale, shift) swapped into BFL's (shift, scale)). Any diffusers tensor
    the plan does not use is a UserError."""
    keyset = set(keys)
    plan: Plan = {}

    def lin(dst: str, src: str, fn=one, parts=None):  # FLUX.2 has no biases: a bias is an unexpected tensor
        srcs = [f"{s}.weight" for s in (parts or [src])]
        if srcs[0] in keyset:
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


def build(config: Flux2Config) -> Flux2:
    return Flux2(config)


def family_name(config: Flux2Config) -> str:
    """"flux2-klein-4b", "flux2-klein-9b", "flux2-dev" for the published architectures (MLP widths may
    differ: a pruned klein-4B is still klein-4B, as FLUX.1 names pruned dev models), else "flux2-custom"."""
    def arch(c: Flux2Config):
        return (c.hidden_size, c.num_heads, c.in_channels, c.out_channels, c.context_in_dim, c.guidance_embed,
                c.depth, c.depth_single)

    for name, ref in (("flux2-klein-4b", KLEIN_4B), ("flux2-klein-9b", KLEIN_9B), ("flux2-dev", DEV)):
        if arch(config) == arch(ref):
            return name
    return "flux2-custom"


def summary(config: Flux2Config) -> dict:
    """The config as ``rflow info`` shows it."""
    return {"double_blocks": config.depth, "single_blocks": config.depth_single, "hidden_size": config.hidden_size,
            "heads": config.num_heads, "context_in_dim": config.context_in_dim, "guidance_embed": config.guidance_embed,
            "double_mlp": config.double_mlp, "single_mlp": config.single_mlp}


def layers(model_or_config: Flux2 | Flux2Config) -> list[LayerRef]:
    """Every SwiGLU MLP: ``double_blocks.{i}.img|txt`` (gate rows [0, W) and up rows [W, 2W) of ``mlp.0``,
    columns of ``mlp.2``) and ``single_blocks.{i}`` (``linear1`` rows after q, k, v: gate at 3h, up at
    3h + W; ``linear2`` columns after the attention's h). No block needs a width attribute: the fused
    splits follow the weight shapes."""
    c = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    h, out = c.hidden_size, []
    for i, pair in enumerate(c.double_mlp):
        for stream, w in zip(("img", "txt"), pair):
            b = f"double_blocks.{i}.{stream}_mlp"
            out.append(LayerRef(f"double_blocks.{i}.{stream}", "swiglu", f"{b}.1", w, i, stream,
                                (Slice(f"{b}.0.weight", 0, 0), Slice(f"{b}.0.weight", 0, w), Slice(f"{b}.2.weight", 1, 0))))
    for i, w in enumerate(c.single_mlp):
        b = f"single_blocks.{i}"
        out.append(LayerRef(b, "swiglu", f"{b}.mlp_act", w, c.depth + i, "single",
                            (Slice(f"{b}.linear1.weight", 0, 3 * h), Slice(f"{b}.linear1.weight", 0, 3 * h + w),
                             Slice(f"{b}.linear2.weight", 1, h))))
    return out


def n_layers(config: Flux2Config) -> int:
    return config.depth + config.depth_single


def config_from_widths(model: Flux2) -> None:
    """After pruning: the config's per-block MLP widths from the weight shapes."""
    cfg = model.config
    cfg.double_mlp = [(b.img_mlp[2].weight.shape[1], b.txt_mlp[2].weight.shape[1]) for b in model.double_blocks]
    cfg.single_mlp = [b.mlp_width for b in model.single_blocks]


# ---------------------------------------------------------------------------------------------- pipeline parts


def latent_spec(config: Flux2Config, codec_factor: int) -> LatentSpec:
    """The latent of Flux2KleinPipeline's ``latents`` argument: the codec's normalised patchified latent
    (B, in_channels, H/f, W/f), f = 16 for the FLUX.2 codec; one token per latent cell, so sides are
    multiples of f."""
    return LatentSpec(channels=config.in_channels, spatial_factor=codec_factor, size_multiple=codec_factor)


def image_seq_len(latent_shape: tuple[int, ...]) -> int:
    """Noise tokens of a latent (one per cell; reference tokens do not count), what the shift reads."""
    return latent_shape[-2] * latent_shape[-1]


def default_schedule(config: Flux2Config, scheduler_config: dict | None) -> tuple[str, float | None]:
    """FLUX.2's empirical-mu schedule ("flux2"), as Flux2KleinPipeline drives a dynamically shifting
    scheduler; a scheduler config without dynamic shifting ignores the pipeline's mu and uses its static
    ``shift`` ("static", or "none" for shift 1)."""
    cfg = scheduler_config or {}
    if cfg.get("use_dynamic_shifting", True):
        kind = cfg.get("time_shift_type", "exponential")
        if kind != "exponential":
            raise UserError(f"scheduler time_shift_type {kind!r} is not supported for FLUX.2 (exponential only)")
        return "flux2", None
    try:
        shift = float(cfg.get("shift", 1.0))
    except (TypeError, ValueError):
        raise UserError(f"scheduler shift {cfg.get('shift')!r} is not a number") from None
    return ("none", None) if shift == 1.0 else ("static", shift)


def find_codec(root: str | os.PathLike) -> Path | None:
    """Where the FLUX.2 VAE lives next to a model: a diffusers ``vae/`` folder, else ``ae.safetensors``
    (BFL) or ``flux2-vae.safetensors`` (ComfyUI)."""
    root = Path(root)
    if (root / "vae").is_dir():
        return root / "vae"
    for name in CODEC_FILES:
        if (root / name).is_file():
            return root / name
    return None


def load_codec(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None):
    """The FLUX.2 latent codec (:class:`rflow.models.vae2.Flux2Codec`) from any layout it is stored in."""
    from .flux2_vae import load_flux2_vae

    return load_flux2_vae(path, device=device, dtype=dtype)


def find_text(*dirs: str | os.PathLike | None) -> Path | None:
    """The first of ``dirs`` holding a Qwen3 ``text_encoder/`` and ``tokenizer/``."""
    from ..models.qwen import find_qwen_text

    return find_qwen_text(*dirs)


def load_text(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None):
    from ..models.qwen import load_qwen_text

    return load_qwen_text(path, device=device, dtype=dtype)


def check_parts_fit(config: Flux2Config, codec, text, *, where: str) -> None:
    """One-line UserError when the transformer's channels do not fit the codec's latent, or its text
    width (``txt_in``) the Qwen3 hidden states that :func:`encode` concatenates. ``codec`` / ``text``
    may be None to skip their check."""
    from ..models.qwen import KLEIN_LAYERS

    cfg = config.config if isinstance(config, nn.Module) else config
    if codec is not None:
        latent = int(codec.latent_channels)
        for n, verb, what, codec_verb in ((cfg.in_channels, "takes", "input", "gives"),
                                          (cfg.out_channels, "gives", "output", "takes")):
            if n != latent:
                raise UserError(f"{where}: the transformer {verb} {n} {what} channels (img_in / final_layer), "
                                f"but the VAE {codec_verb} {latent}-channel latents: not a FLUX.2 VAE for this model")
    if text is not None:
        need = max(KLEIN_LAYERS)
        if text.num_layers < need:
            raise UserError(f"{where}: the Qwen3 text encoder has {text.num_layers} layers; FLUX.2 reads the hidden "
                            f"states after layers {', '.join(map(str, KLEIN_LAYERS))}")
        width = len(KLEIN_LAYERS) * text.hidden_size
        if width != cfg.context_in_dim:
            raise UserError(f"{where}: the transformer takes {cfg.context_in_dim}-wide text embeddings (txt_in), but "
                            f"the Qwen3 encoder gives {len(KLEIN_LAYERS)}×{text.hidden_size} = {width}")


# ---------------------------------------------------------------------------------------------- denoiser


@dataclass
class Cond:
    """FLUX.2 conditioning: the Qwen3 sequence ``txt`` (B, S, D) and its RoPE ids ``txt_ids`` (B or 1, S, 4);
    optional reference-image tokens ``ref`` (B or 1, R, C) with their ids ``ref_ids`` (B or 1, R, 4)
    (:func:`prepare_references`, :func:`add_references`); the distilled-guidance scale ``guidance``
    (a float or a (B,) tensor; used only by models with a guidance embedder)."""

    txt: Tensor
    txt_ids: Tensor
    ref: Tensor | None = None
    ref_ids: Tensor | None = None
    guidance: float | Tensor | None = None

    def to(self, device) -> "Cond":
        def move(t):
            return t.to(device) if isinstance(t, Tensor) else t

        return Cond(move(self.txt), move(self.txt_ids), move(self.ref), move(self.ref_ids), move(self.guidance))

    @property
    def batch(self) -> int:
        return self.txt.shape[0]


def encode(text, prompts: list[str], max_sequence_length: int, guidance: float | None = None) -> Cond:
    """Qwen3 conditioning as Flux2KleinPipeline.encode_prompt makes it (layers 9, 18, 27 concatenated)."""
    txt, txt_ids = text.encode_klein(prompts, max_sequence_length)
    return Cond(txt, txt_ids, guidance=guidance)


def add_references(cond: Cond, tokens: Tensor, ids: Tensor) -> Cond:
    """``cond`` with the reference tokens (1 or B, R, C) and ids (1 or B, R, 4) of :func:`prepare_references`,
    expanded to the conditioning's batch (use the same ones for the negative conditioning, as the pipeline)."""
    B = cond.batch
    if tokens.ndim != 3 or ids.ndim != 3 or ids.shape[-1] != 4 or tokens.shape[1] != ids.shape[1]:
        raise UserError(f"reference tokens {tuple(tokens.shape)} and ids {tuple(ids.shape)} do not match "
                        "((1|B, R, C) and (1|B, R, 4))")
    if tokens.shape[0] not in (1, B) or ids.shape[0] not in (1, B):
        raise UserError(f"reference tokens for batch {tokens.shape[0]}, but the conditioning has {B} prompts")
    return dataclasses.replace(cond, ref=tokens.expand(B, -1, -1), ref_ids=ids.expand(B, -1, -1))


class Denoiser:
    """``denoiser(x, sigma, cond) -> v`` for a FLUX.2 transformer over latents (B, C, h, w).

    The latent is packed into one token per cell with ids (0, row, column, 0); the conditioning's
    reference tokens follow the noise tokens (as in Flux2KleinPipeline) and only the noise tokens' output
    is kept. The transformer sees sigma directly (the pipeline's ``timestep / 1000``) and predicts
    v = noise − x0, rflow's convention, so nothing is flipped."""

    prediction = "velocity"

    def __init__(self, model: Flux2, prediction: str = "velocity"):
        if prediction != "velocity":
            raise UserError(f"FLUX.2 models predict the velocity, not {prediction!r}")
        self.model = model

    def loss_weight(self, t: Tensor, floor: float) -> Tensor:
        return torch.ones_like(t)

    def guidance_vector(self, cond: Cond, batch: int, device) -> Tensor | None:
        if not self.model.config.guidance_embed:
            return None
        return sigma_vector(DEFAULT_GUIDANCE if cond.guidance is None else cond.guidance, batch, device)

    def __call__(self, x: Tensor, sigma, cond: Cond) -> Tensor:
        B, _, h, w = x.shape
        dev = x.device
        tokens, ids = pack(x), image_ids(h, w, device=dev)
        if cond.ref is not None:
            tokens = torch.cat([tokens, cond.ref.to(dev, tokens.dtype).expand(B, -1, -1)], dim=1)
            ids = torch.cat([ids.expand(B, -1, -1), cond.ref_ids.to(dev, ids.dtype).expand(B, -1, -1)], dim=1)
        txt = cond.txt.to(dev)
        out = self.model(tokens, ids, txt, cond.txt_ids.to(dev, torch.float32), sigma_vector(sigma, B, dev),
                         self.guidance_vector(cond, B, dev))
        return unpack(out[:, : h * w], h, w).to(x.dtype)
