"""Test helpers: tiny diffusers FLUX transformers and an independent diffusers -> BFL key map.

The map here is written from BFL's and diffusers' module definitions, separately from rflow's loader,
so a mistake in one shows up as a mismatch against the other.
"""

from __future__ import annotations

import json

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file


def tiny_transformer(*, guidance=True, depth=2, depth_single=2, heads=2, head_dim=32, axes=(4, 14, 14),
                     in_channels=16, joint_dim=32, pooled_dim=24, seed=0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=depth, num_single_layers=depth_single,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=guidance, axes_dims_rope=list(axes),
    )
    # Gain-1 random weights (std 1/sqrt(fan_in)) and non-trivial biases and norm scales, so every
    # parameter matters and activations stay O(1) as in a trained model.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            elif name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> BFL single-file state dict."""
    out = {}
    top = {
        "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    }
    for k, v in sd.items():
        name, _, param = k.rpartition(".")
        if name in top:
            out[f"{top[name]}.{param}"] = v
        elif name == "norm_out.linear":  # diffusers (scale, shift) -> BFL (shift, scale)
            scale, shift = v.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale])
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_double):
        b = f"transformer_blocks.{i}."
        for s, suffix, ctx in (("img", "", ""), ("txt", "_context", "add_")):
            d = f"double_blocks.{i}.{s}_"
            qkv = ["to_q", "to_k", "to_v"] if s == "img" else ["add_q_proj", "add_k_proj", "add_v_proj"]
            for p in ("weight", "bias"):
                out[d + f"mod.lin.{p}"] = sd[b + f"norm1{suffix}.linear.{p}"]
                out[d + f"attn.qkv.{p}"] = torch.cat([sd[b + f"attn.{n}.{p}"] for n in qkv])
                out[d + f"attn.proj.{p}"] = sd[b + ("attn.to_out.0." if s == "img" else "attn.to_add_out.") + p]
                out[d + f"mlp.0.{p}"] = sd[b + f"ff{suffix}.net.0.proj.{p}"]
                out[d + f"mlp.2.{p}"] = sd[b + f"ff{suffix}.net.2.{p}"]
            nq, nk = ("norm_q", "norm_k") if s == "img" else ("norm_added_q", "norm_added_k")
            out[d + "attn.norm.query_norm.scale"] = sd[b + f"attn.{nq}.weight"]
            out[d + "attn.norm.key_norm.scale"] = sd[b + f"attn.{nk}.weight"]
    for i in range(n_single):
        b, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[d + f"linear1.{p}"] = torch.cat([sd[b + f"attn.to_{n}.{p}"] for n in "qkv"] + [sd[b + f"proj_mlp.{p}"]])
            out[d + f"linear2.{p}"] = sd[b + f"proj_out.{p}"]
            out[d + f"modulation.lin.{p}"] = sd[b + f"norm.linear.{p}"]
        out[d + "norm.query_norm.scale"] = sd[b + "attn.norm_q.weight"]
        out[d + "norm.key_norm.scale"] = sd[b + "attn.norm_k.weight"]
    return out


def save_bfl(model: FluxTransformer2DModel, path, *, prefix="", axes=None) -> None:
    sd = {prefix + k: v.contiguous() for k, v in to_bfl(model.state_dict()).items()}
    meta = {"rflow.flux_config": json.dumps({"axes_dim": list(axes)})} if axes else None
    save_file(sd, str(path), metadata=meta)


def diffusers_inputs(model: FluxTransformer2DModel, *, batch=2, h=4, w=6, seq=5, seed=1, dtype=torch.float32):
    """Random inputs for a packed latent of h×w tokens: returns (diffusers kwargs, rflow args)."""
    from rflow.models.flux import image_ids, text_ids

    g = torch.Generator().manual_seed(seed)
    c = model.config
    img = torch.randn(batch, h * w, c.in_channels, generator=g, dtype=dtype)
    txt = torch.randn(batch, seq, c.joint_attention_dim, generator=g, dtype=dtype)
    pooled = torch.randn(batch, c.pooled_projection_dim, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype)
    guidance = torch.full((batch,), 3.5, dtype=dtype) if c.guidance_embeds else None
    iids, tids = image_ids(2 * h, 2 * w)[0], text_ids(seq)[0]
    dkw = dict(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
               img_ids=iids, txt_ids=tids, guidance=guidance, return_dict=False)
    return dkw, (img, iids[None], txt, tids[None], t, pooled, guidance)
