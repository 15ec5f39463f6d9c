"""Test helpers for LoRA files: small writers of each tool's layout and a by-hand merge.

Each writer returns the file's tensors and the merges they mean — (rflow layer, first row, A, B,
scale) — from this module's own reading of each tool's layout, written apart from rflow.lora so a
mistake in one shows as a mismatch against the other.
"""

import copy
import json

import torch
from safetensors.torch import save_file

H = 64  # hidden size of every model here


def pair(g, rank, n_in, n_out):
    return torch.randn(rank, n_in, generator=g) / n_in ** 0.5, 0.5 * torch.randn(n_out, rank, generator=g) / rank ** 0.5


def layer_of(model, name):
    return model.get_submodule(name)


def kohya(model, seed=1, te=None):
    g, sd, merges = torch.Generator().manual_seed(seed), {}, []
    layers = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.0",
              "double_blocks.0.txt_mod.lin", "single_blocks.0.linear1", "single_blocks.0.linear2",
              "final_layer.adaLN_modulation.1", "img_in"]
    for i, name in enumerate(layers):
        lin = layer_of(model, name)
        rank = 2 + i % 3
        A, B = pair(g, rank, lin.in_features, lin.out_features)
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = A, B
        alpha = None if i == 3 else float(torch.empty(()).uniform_(1, 8, generator=g))  # no alpha: scale 1
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
        merges.append((name, 0, A, B, 1.0 if alpha is None else alpha / rank))
    for prefix, m, names in te or ():
        for file_name, name in names:
            lin = layer_of(m, name)
            A, B = pair(g, 2, lin.in_features, lin.out_features)
            key = prefix + file_name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"] = A, B, torch.tensor(3.0)
            merges.append((m, name, A, B, 1.5))
    return sd, merges


def xlabs(model, seed=2):
    g, sd, merges = torch.Generator().manual_seed(seed), {}, []
    for proc, layer, rows in (("double_blocks.0.processor.qkv_lora1", "double_blocks.0.img_attn.qkv", 3 * H),
                              ("double_blocks.0.processor.proj_lora1", "double_blocks.0.img_attn.proj", H),
                              ("double_blocks.0.processor.qkv_lora2", "double_blocks.0.txt_attn.qkv", 3 * H),
                              ("double_blocks.0.processor.proj_lora2", "double_blocks.0.txt_attn.proj", H),
                              ("single_blocks.0.processor.qkv_lora", "single_blocks.0.linear1", 3 * H),
                              ("single_blocks.0.processor.proj_lora", "single_blocks.0.linear2", H)):
        A, B = pair(g, 4, layer_of(model, layer).in_features, rows)
        sd[f"{proc}.down.weight"], sd[f"{proc}.up.weight"] = A, B
        merges.append((layer, 0, A, B, 1.0))  # XLabs: no alpha
    return sd, merges


def bfl(model, seed=3):
    g, sd, merges = torch.Generator().manual_seed(seed), {}, []
    for i, name in enumerate(["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.txt_mlp.2"]):
        lin = layer_of(model, name)
        A, B = pair(g, 3, lin.in_features, lin.out_features)
        key = "diffusion_model." + name
        if i == 1:  # ComfyUI's kohya-style names behind the BFL prefix, no alpha
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = A, B
            merges.append((name, 0, A, B, 1.0))
        else:
            sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"], sd[f"{key}.alpha"] = A, B, torch.tensor(6.0)
            merges.append((name, 0, A, B, 2.0))
    return sd, merges


# diffusers module -> (rflow layer, first row, rows); rows None: all
DIFFUSERS = {
    "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", H, H),
    "transformer_blocks.0.attn.add_v_proj": ("double_blocks.0.txt_attn.qkv", 2 * H, H),
    "transformer_blocks.0.attn.add_q_proj": ("double_blocks.0.txt_attn.qkv", 0, H),
    "transformer_blocks.0.attn.to_out.0": ("double_blocks.0.img_attn.proj", 0, None),
    "transformer_blocks.0.ff.net.2": ("double_blocks.0.img_mlp.2", 0, None),
    "transformer_blocks.0.norm1_context.linear": ("double_blocks.0.txt_mod.lin", 0, None),
    "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", 3 * H, 4 * H),
    "single_transformer_blocks.0.attn.to_v": ("single_blocks.0.linear1", 2 * H, H),
    "single_transformer_blocks.0.proj_out": ("single_blocks.0.linear2", 0, None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0, None),
    "x_embedder": ("img_in", 0, None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", 0, None),  # (scale, shift) -> (shift, scale)
}


def diffusers_style(model, prefix, seed, scale_of):
    g, sd, merges = torch.Generator().manual_seed(seed), {}, []
    for module, (layer, row, rows) in DIFFUSERS.items():
        lin = layer_of(model, layer)
        A, B = pair(g, 4, lin.in_features, rows or lin.out_features)
        sd[f"{prefix}{module}.lora_A.weight"], sd[f"{prefix}{module}.lora_B.weight"] = A, B
        scale = scale_of(module)
        if module == "x_embedder":  # diffusers' network alphas: an .alpha tensor beside lora_A/B
            sd[f"{prefix}{module}.alpha"] = torch.tensor(2.0)
            scale = 0.5
        ours = torch.cat([B[B.shape[0] // 2:], B[: B.shape[0] // 2]]) if module == "norm_out.linear" else B
        merges.append((layer, row, A, ours, scale))
    return sd, merges


def peft(model, folder, seed=4):
    """PEFT's save_pretrained layout: adapter_model.safetensors + adapter_config.json."""
    folder.mkdir(exist_ok=True)
    cfg = {"r": 4, "lora_alpha": 16, "alpha_pattern": {"proj_mlp": 2}, "peft_type": "LORA"}
    sd, merges = diffusers_style(model, "base_model.model.", seed, lambda m: (2 if m.endswith("proj_mlp") else 16) / 4)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder, merges


def ai_toolkit(model, seed=5):
    return diffusers_style(model, "transformer.", seed, lambda m: 1.0)


def write(path, sd_merges):
    sd, merges = sd_merges
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, merges


@torch.no_grad()
def merged(model, merges, user_scale=1.0):
    ref = copy.deepcopy(model)
    for layer, row, A, B, scale in merges:
        w = ref.get_submodule(layer).weight
        w[row:row + B.shape[0]] += user_scale * scale * (B @ A)
    return ref


# tiny FLUX.2 and Z-Image transformers, and diffusers / kohya / ComfyUI keys for them


def tiny_flux2():
    from rflow.models.flux2 import Flux2, Flux2Config

    torch.manual_seed(0)
    return Flux2(Flux2Config(hidden_size=H, num_heads=2, in_channels=16, out_channels=16, context_in_dim=32,
                             axes_dim=(8, 8, 8, 8), double_mlp=[(96, 96)], single_mlp=[96])).eval()


def tiny_zimage():
    from rflow.models.zimage import ZImage, ZImageConfig

    torch.manual_seed(0)
    return ZImage(ZImageConfig(dim=H, n_heads=2, in_channels=4, patch_size=2, cap_feat_dim=32, adaln_dim=H,
                               t_mid_dim=32, axes_dims=(8, 12, 12), layers_mlp=[96], noise_refiner_mlp=[96],
                               context_refiner_mlp=[96])).eval()


# (file key without .lora_X.weight, rflow layer, first row, rows or None, B halves swapped)
FAMILY_KEYS = {
    "flux2": [("transformer.transformer_blocks.0.attn.to_k", "double_blocks.0.img_attn.qkv", H, H, False),
              ("transformer.transformer_blocks.0.attn.add_q_proj", "double_blocks.0.txt_attn.qkv", 0, H, False),
              ("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_blocks.0.linear1", 0, None, False),
              ("transformer.transformer_blocks.0.ff.linear_in", "double_blocks.0.img_mlp.0", 0, None, False),
              ("transformer.double_stream_modulation_img.linear", "double_stream_modulation_img.lin", 0, None, False),
              ("transformer.norm_out.linear", "final_layer.adaLN_modulation.1", 0, None, True),
              ("diffusion_model.single_blocks.0.linear2", "single_blocks.0.linear2", 0, None, False)],
    "zimage": [("transformer.layers.0.attention.to_v", "layers.0.attention.qkv", 2 * H, H, False),
               ("transformer.noise_refiner.0.attention.to_q", "noise_refiner.0.attention.qkv", 0, H, False),
               ("lora_unet_context_refiner_0_attention_to_k", "context_refiner.0.attention.qkv", H, H, False),
               ("transformer.layers.0.attention.to_out.0", "layers.0.attention.out", 0, None, False),
               ("transformer.all_final_layer.2-1.linear", "final_layer.linear", 0, None, False),
               ("diffusion_model.layers.0.feed_forward.w1", "layers.0.feed_forward.w1", 0, None, False),
               ("lora_unet_layers_0_adaLN_modulation_0", "layers.0.adaLN_modulation.0", 0, None, False)],
}
