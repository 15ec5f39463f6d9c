"""LoRA for every family: read the files users have, apply them beside the base layers, fuse on demand.

::

    name = load_lora_(pipe_or_transformer, "style.safetensors", scale=0.8)   # Pipeline.load_lora
    fuse_(pipe); unfuse_(pipe); remove_(pipe, name)                          # Pipeline.fuse_lora …

    add_lora_(model, [LoRAWeight(layer, A, B, scale, offset)], name="x")    # the verb underneath
    fuse_lora_(model) / unfuse_lora_(model) / remove_lora_(model, "x")

Dialects (:mod:`.read`, told from the keys): kohya (``lora_unet_…`` / ``lora_te1_…``, with
``.alpha``), diffusers / PEFT / ai-toolkit (``transformer.…lora_A.weight``, ``base_model.model.…``,
PEFT configs in the header), XLabs (``double_blocks.N.processor.qkv_lora1.down.weight``), BFL /
ComfyUI (``diffusion_model.…lora_A`` or ``.lora_down``). They map onto rflow's layers by
:mod:`.targets` — rflow's own names, XLabs' processors, or diffusers' names through the family's
key plan (q, k and v of diffusers land on row ranges of rflow's fused projections); text-encoder
LoRAs go to FLUX.1's CLIP and T5. :mod:`.layer` computes every LoRA beside its layer's matmul, dense
or quantized, without touching the weight. :mod:`.write` writes trained LoRAs as PEFT/diffusers or kohya
files (``rflow train``).
"""

from .layer import (LoRA, LoRAStack, LoRAWeight, add_lora_, check_weights, fuse_lora_, lora_layers, lora_names,
                    lora_parameters, remove_lora_, unfuse_lora_)
from .load import LoadedLoRA, fuse_, load_lora_, loaded_names, parse_spec, remove_, unfuse_
from .read import Entry, LoRAFile, read_lora
from .targets import lora_weights
from .write import write_lora

__all__ = ["Entry", "LoRA", "LoRAFile", "LoRAStack", "LoRAWeight", "LoadedLoRA", "add_lora_", "check_weights",
           "fuse_", "fuse_lora_", "load_lora_", "loaded_names", "lora_layers", "lora_names", "lora_parameters",
           "lora_weights", "parse_spec", "read_lora", "remove_", "remove_lora_", "unfuse_", "unfuse_lora_", "write_lora"]
