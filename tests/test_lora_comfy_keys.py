"""A kohya-format LoRA rflow writes is one ComfyUI loads completely: ComfyUI maps every
``diffusion_model.<name>.weight`` of its FLUX model (BFL names) to ``lora_unet_<name, "." -> "_">`` and
reads ``.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` (scale alpha / rank), warning about any
key it does not load. The mapping is restated here from that description (comfy/lora.py); the merged
weights must equal rflow's own fused LoRA."""

import torch
from safetensors.torch import load_file

from rflow.lora.layer import LoRAWeight
from rflow.lora.targets import linear_layers
from rflow.lora.write import write_lora
from rflow.world import tiny


def comfy_key_map(bfl_keys):
    return {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): k
            for k in bfl_keys if k.startswith("diffusion_model.") and k.endswith(".weight")}


def comfy_merge(state: dict, lora: dict, strength: float) -> tuple[dict, set]:
    """W + strength · (alpha / rank) · up @ down for every mapped key; returns the merged weights and the
    LoRA keys ComfyUI would leave unloaded."""
    merged, loaded = dict(state), set()
    for x, key in comfy_key_map(state).items():
        up, down = lora.get(f"{x}.lora_up.weight"), lora.get(f"{x}.lora_down.weight")
        if up is None:
            continue
        alpha = lora.get(f"{x}.alpha")
        scale = (float(alpha) / down.shape[0]) if alpha is not None else 1.0
        merged[key] = state[key] + strength * scale * (up @ down)
        loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"} | ({f"{x}.alpha"} if alpha is not None else set())
    return merged, set(lora) - loaded


def test_kohya_file_loads_completely_in_comfy_mapping(tmp_path):
    pipe = tiny.build(seed=0, hidden=48, heads=2, depth=1, depth_single=1)
    model = pipe.transformer
    g = torch.Generator().manual_seed(1)
    rank, alpha = 4, 2.0
    weights = [LoRAWeight(n, torch.randn(rank, m.in_features, generator=g) * 0.1,
                          torch.randn(m.out_features, rank, generator=g) * 0.1, alpha / rank)
               for n, m in linear_layers(model).items()]
    path = write_lora(tmp_path / "k.safetensors", weights, fam=pipe.family_module, model=model, rank=rank,
                      alpha=alpha, fmt="kohya")
    lora = load_file(str(path))
    state = {f"diffusion_model.{k}": v.clone() for k, v in model.state_dict().items()}
    merged, unloaded = comfy_merge(state, lora, strength=0.7)
    assert not unloaded  # ComfyUI would warn "lora key not loaded" for each of these
    assert sum(not torch.equal(merged[k], state[k]) for k in state) == len(weights)
    pipe.load_lora(path, 0.7)
    pipe.fuse_lora()
    ours = model.state_dict()
    for k, v in merged.items():
        name = k[len("diffusion_model."):]
        torch.testing.assert_close(ours[name], v, atol=1e-6, rtol=1e-5, msg=name)
