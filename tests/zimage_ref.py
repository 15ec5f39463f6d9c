"""Helpers for the Z-Image tests: a tiny random diffusers ``ZImageTransformer2DModel`` (the reference),
its state dict in the original single-file layout, and a loader through rflow's zimage family."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ZImageTransformer2DModel

from rflow.checkpoints.io import open_weights
from rflow.checkpoints.plan import plan_shapes
from rflow.families import zimage

# head dim 16 = 4 + 6 + 6; MLP width int(64 / 3 * 8) = 170; adaLN width min(64, 256) = 64
TINY = dict(in_channels=4, dim=64, n_layers=2, n_refiner_layers=2, n_heads=4, n_kv_heads=4, cap_feat_dim=32,
            axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])


def tiny_diffusers(seed: int = 0, **overrides) -> ZImageTransformer2DModel:
    """Random weights of O(1) effect everywhere (diffusers zero-initialises the pad tokens)."""
    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "pad_token" in name else 0.1))
    return model


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers -> original single-file keys: the inverse of diffusers' own
    ``convert_z_image_transformer_checkpoint_to_diffusers`` (renames, q/k/v fused into ``qkv``)."""
    renames = {"all_final_layer.2-1.": "final_layer.", "all_x_embedder.2-1.": "x_embedder.",
               ".attention.to_out.0.": ".attention.out.", ".attention.norm_k.": ".attention.k_norm.",
               ".attention.norm_q.": ".attention.q_norm."}
    out = {}
    for k, v in sd.items():
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:
            qkv = [sd[k], sd[k.replace(".to_q.", ".to_k.")], sd[k.replace(".to_q.", ".to_v.")]]
            out[k.replace(".to_q.", ".qkv.")] = torch.cat(qkv, dim=0)
            continue
        for a, b in renames.items():
            k = k.replace(a, b)
        out[k] = v
    return out


def load(path: str | Path, overrides: dict | None = None):
    """(model, layout): detect, plan, infer the config (with config.json next to the weights), build on
    the meta device and load with assign=True, as rflow's loader does."""
    path = Path(path)
    if overrides is None and path.is_dir() and (path / "config.json").exists():
        overrides = json.loads((path / "config.json").read_text())
    with open_weights(path) as files:
        keys = files.keys()
        found = zimage.detect(keys)
        assert found is not None, f"{path}: not detected as Z-Image"
        layout, prefix = found
        plan = zimage.plan(keys, layout, prefix)
        config = zimage.infer_config(plan_shapes(plan, files.shapes), overrides, plan=plan, source_shapes=files.shapes)
        with torch.device("meta"):
            model = zimage.build(config)
        sd = {k: fn([files.get(s, torch.float32) for s in srcs]) for k, (srcs, fn) in plan.items()}
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval(), layout
