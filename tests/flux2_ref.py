"""Test helpers for FLUX.2: tiny diffusers transformers, an independent diffusers -> BFL key map, a
local loader built from the family functions, and inputs built the way Flux2KleinPipeline builds them.

The key map here is written from BFL's and diffusers' module definitions, separately from
rflow.families.flux2's plan, so a mistake in one shows up as a mismatch against the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from safetensors.torch import save_file

from rflow.checkpoints.io import open_weights, read_json
from rflow.checkpoints.plan import plan_shapes
from rflow.errors import UserError
from rflow.families import flux2 as fam


def tiny_transformer(*, guidance=False, depth=2, depth_single=2, heads=2, head_dim=16, axes=(4, 4, 4, 4), theta=2000,
                     in_channels=32, joint_dim=24, seed=0) -> Flux2Transformer2DModel:
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=depth, num_single_layers=depth_single,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
        axes_dims_rope=tuple(axes), rope_theta=theta, guidance_embeds=guidance,
    )
    # Gain-1 random weights (std 1/sqrt(fan_in)) and non-trivial RMSNorm scales, so every parameter
    # matters (a q/k norm swap or a wrong half of a fused weight changes the output).
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5 if p.ndim >= 2 else 1 + 0.2 * torch.randn_like(p))
    return model.eval()


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers Flux2Transformer2DModel state dict -> BFL flux2 state dict."""
    top = {
        "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin",
    }
    double = {
        "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
        "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
        "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
        "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
    }
    single = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
              "attn.norm_k": "norm.key_norm"}
    out = {}
    for k, v in sd.items():
        name, param = k.rsplit(".", 1)
        if name in top:
            out[f"{top[name]}.{param}"] = v
        elif name == "norm_out.linear":  # diffusers (scale, shift) -> BFL (shift, scale)
            scale, shift = v.chunk(2)
            out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale])
        elif k.startswith("transformer_blocks."):
            _, i, rest = name.split(".", 2)
            if rest in double:
                out[f"double_blocks.{i}.{double[rest]}." + ("scale" if "norm" in rest else param)] = v
            elif rest in ("attn.to_q", "attn.add_q_proj"):
                s, pre = ("img", "to_") if rest == "attn.to_q" else ("txt", "add_")
                post = "" if s == "img" else "_proj"
                parts = [sd[f"transformer_blocks.{i}.attn.{pre}{n}{post}.{param}"] for n in "qkv"]
                out[f"double_blocks.{i}.{s}_attn.qkv.{param}"] = torch.cat(parts)
        elif k.startswith("single_transformer_blocks."):
            _, i, rest = name.split(".", 2)
            out[f"single_blocks.{i}.{single[rest]}." + ("scale" if "norm" in rest else param)] = v
    return out


def save_bfl(sd: dict[str, torch.Tensor], path, *, prefix="", config: dict | None = None) -> None:
    meta = {fam.CONFIG_METADATA_KEY: json.dumps(config)} if config else None
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)


def load(path, dtype=torch.float32):
    """(model, layout, config) through the family functions alone: detect -> plan -> infer_config ->
    build on meta -> load_state_dict(assign=True)."""
    p = Path(path)
    with open_weights(p) as files:
        keys = files.keys()
        hit = fam.detect(keys)
        if hit is None:
            raise UserError(f"{p}: not a FLUX.2 checkpoint")
        layout, prefix = hit
        plan = fam.plan(keys, layout, prefix)
        dc = read_json(p / "config.json") if p.is_dir() and (p / "config.json").exists() else None
        cfg = fam.infer_config(plan_shapes(plan, files.shapes), fam.overrides(files.metadata, dc), plan=plan,
                               source_shapes=files.shapes)
        sd = {k: fn([files.get(s, dtype) for s in srcs]) for k, (srcs, fn) in plan.items()}
    with torch.device("meta"):
        model = fam.build(cfg)
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval(), layout, cfg


def inputs(ref: Flux2Transformer2DModel, *, batch=2, h=3, w=4, seq=5, refs=(), guidance=None, seed=1):
    """Random inputs as Flux2KleinPipeline builds them: a (B, C, h, w) latent packed into tokens, text
    ids, latent ids and (optionally) reference images of token grids ``refs`` appended to the image
    tokens. Returns (diffusers kwargs, rflow args) with ids from diffusers' and from rflow's helpers."""
    from rflow.models.flux2 import image_ids, pack, reference_ids, text_ids

    g = torch.Generator().manual_seed(seed)
    c = ref.config
    latents = torch.randn(batch, c.in_channels, h, w, generator=g)
    ref_latents = [torch.randn(1, c.in_channels, rh, rw, generator=g) for rh, rw in refs]
    txt = torch.randn(batch, seq, c.joint_attention_dim, generator=g)
    t = torch.rand(batch, generator=g)
    gv = None if guidance is None else torch.full((batch,), float(guidance))
    P = Flux2KleinPipeline
    d_img, d_ids = P._pack_latents(latents), P._prepare_latent_ids(latents)
    o_img, o_ids = pack(latents), image_ids(h, w)
    if refs:
        d_ref = torch.cat([P._pack_latents(x) for x in ref_latents], dim=1).repeat(batch, 1, 1)
        d_img = torch.cat([d_img, d_ref], dim=1)
        d_ids = torch.cat([d_ids, P._prepare_image_ids(ref_latents).repeat(batch, 1, 1)], dim=1)
        o_img = torch.cat([o_img, torch.cat([pack(x) for x in ref_latents], dim=1).expand(batch, -1, -1)], dim=1)
        o_ids = torch.cat([o_ids, reference_ids(list(refs))], dim=1)
    dkw = dict(hidden_states=d_img, encoder_hidden_states=txt, timestep=t, img_ids=d_ids,
               txt_ids=P._prepare_text_ids(txt), guidance=gv, return_dict=False)
    return dkw, (o_img, o_ids, txt, text_ids(seq), t, gv)
