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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..models.flux import Flux, FluxConfig
from .io import SafetensorsFiles, open_weights, read_json

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


# A plan maps each BFL key to (source keys, how to combine them).
Plan = dict[str, tuple[list[str], Callable[[list[torch.Tensor]], torch.Tensor]]]


def _one(ts):
    return ts[0]


def _cat(ts):
    return torch.cat(ts, dim=0)


def _swap_halves(ts):
    scale, shift = ts[0].chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


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


def _block_indices(keys, prefix: str) -> list[int]:
    idx = {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    if idx and sorted(idx) != list(range(len(idx))):
        raise UserError(f"checkpoint blocks {prefix}N are not numbered 0..{len(idx) - 1}")
    return sorted(idx)


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


def _bfl_plan(keys: list[str], prefix: str) -> Plan:
    """BFL keys as they are; rflow's own bookkeeping tensors (``rflow.*``, e.g. pruning indices) are skipped."""
    return {k[len(prefix) :]: ([k], _one) for k in keys if k.startswith(prefix) and not k.startswith("rflow.")}


def _plan_shapes(plan: Plan, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes of the BFL tensors a plan produces, from source shapes alone (no tensor is read)."""
    out = {}
    for dst, (srcs, fn) in plan.items():
        if fn is _cat:
            first = shapes[srcs[0]]
            out[dst] = (sum(shapes[s][0] for s in srcs),) + tuple(first[1:])
        else:
            out[dst] = shapes[srcs[0]]
    return out


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """FLUX's RoPE split (16, 56, 56) for head dim 128, scaled to other head dims (all parts even)."""
    if head_dim == 128:
        return (16, 56, 56)
    b = (head_dim * 7 // 16) // 2 * 2
    return (head_dim - 2 * b, b, b)


def infer_config(shapes: dict[str, tuple[int, ...]], overrides: dict | None = None) -> FluxConfig:
    """A :class:`FluxConfig` from BFL key shapes; ``overrides`` (from metadata or config.json) win for
    what shapes cannot tell (RoPE axes, theta)."""
    try:
        hidden, in_ch = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0] if "double_blocks.0.img_attn.norm.query_norm.scale" in shapes else shapes["single_blocks.0.norm.query_norm.scale"][0]
        double = [
            (shapes[f"double_blocks.{i}.img_mlp.0.weight"][0], shapes[f"double_blocks.{i}.txt_mlp.0.weight"][0])
            for i in _block_indices(shapes, "double_blocks.")
        ]
        single = [shapes[f"single_blocks.{i}.linear1.weight"][0] - 3 * hidden for i in _block_indices(shapes, "single_blocks.")]
        cfg = dict(
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            in_channels=in_ch,
            out_channels=shapes["final_layer.linear.weight"][0],
            context_in_dim=shapes["txt_in.weight"][1],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            time_dim=shapes["time_in.in_layer.weight"][1],
            qkv_bias=("double_blocks.0.img_attn.qkv.bias" in shapes) if double else True,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
            axes_dim=default_axes_dim(head_dim),
            double_mlp=double,
            single_mlp=single,
        )
    except KeyError as e:
        raise UserError(f"FLUX.1 checkpoint is missing {e.args[0]!r}") from None
    if not double and not single:
        raise UserError("FLUX.1 checkpoint has no transformer blocks")
    for k, v in (overrides or {}).items():
        if k in ("axes_dim", "theta"):
            cfg[k] = v
    try:
        return FluxConfig(**cfg)
    except ValueError as e:
        raise UserError(f"inconsistent FLUX.1 checkpoint: {e}") from None


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
        if self.format == "diffusers" and p.is_dir() and (p / "config.json").exists():
            dc = read_json(p / "config.json")
            if "axes_dims_rope" in dc:
                overrides["axes_dim"] = tuple(dc["axes_dims_rope"])
        self.config = infer_config(_plan_shapes(self.plan, self.files.shapes), overrides)

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
        """A short, stable id of the weights' structure and header (not a full hash of the data)."""
        import hashlib

        h = hashlib.sha256()
        for p in self.files.paths:
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}".encode())
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 1 << 24)))
        return h.hexdigest()[:16]


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
