"""The GPU memory a LoRA step needs beside the weights, and an offloaded base re-planned for it.

``offload_`` plans a budget (``--vram``) for one inference call: resident weights, block buffers and a
working reserve of one forward pass. A training step holds more: autograd's saved activations (every
block's, or with gradient checkpointing every block's input plus one block's recomputation), the
trainable adapters with their gradients and AdamW moments, and the same forward transient. So the
trainer, once its adapters are in place, plans an offloaded model again (:func:`replan_offload_`) with
the reserve :func:`training_reserve` estimates — fewer blocks resident, the step within the budget —
and a budget below what that needs is a one-line error before the first step.

Per token and batch item, one block saves ``e · (11·D + M)`` bytes for backward (D the hidden size, M
the widest GELU MLP, e bytes per activation): measured with saved-tensor hooks on FLUX.1 blocks
(double and single, D 256–512, M 1024–2048: 11.0·D + 1.0·M elements and 11.0·D + 1.0·M within 1 %);
a SwiGLU MLP (FLUX.2, Z-Image) is counted as 3·M (its 2M-wide in-projection and the product; not
measured). Checkpointing keeps D elements per token per block plus one block's ``11·D + M``. The
forward transient is the inference reserve of the same tokens; the adapters take 16 bytes a trainable
parameter (float32 weight, gradient, two AdamW moments; the trainer plans before it adds them) and 4
more with an EMA. The activations are counted 1.25 × for allocator slack. A quantized layer computing by
dequantizing hands autograd its dense weight: one block's worth is held while a checkpointed block is
recomputed and differentiated, every block's without checkpointing.
"""

from __future__ import annotations

import torch
from torch import nn

SLACK = 1.25


def _widths(config) -> tuple[int, int]:
    """(hidden size D, MLP term per token in elements: the widest GELU M, or 3 × the widest SwiGLU M)."""
    from ..compress.units import layer_refs

    D = getattr(config, "hidden_size", None) or config.dim
    refs = layer_refs(config)
    gelu = max((r.units for r in refs if r.kind == "gelu"), default=0)
    swiglu = max((r.units for r in refs if r.kind == "swiglu"), default=0)
    return int(D), int(max(gelu, 3 * swiglu))


def training_reserve(model: nn.Module, device, *, tokens: int, batch: int, checkpointing: bool,
                     trainable: int, ema: bool = False) -> int:
    """Bytes a training step needs on ``device`` beyond ``model``'s frozen weights: ``tokens`` (image +
    text) per sample, ``batch`` samples per forward with grad, ``trainable`` adapter parameters (not yet
    in the model)."""
    from ..memory import FIXED_OVERHEAD, _activation_itemsize, _token_bytes
    from ..runtime.offload import block_names

    config = model.config
    e = _activation_itemsize(next(p.dtype for p in model.parameters() if p.is_floating_point()), torch.device(device))
    D, mlp = _widths(config)
    per_block = e * (11 * D + mlp) + 8 * config.head_dim
    n = len(block_names(model))
    saved = (n * e * D + per_block) if checkpointing else n * per_block
    transient = _token_bytes(config, e) * 3 // 2
    acts = batch * tokens * (saved + transient)
    dense = _dequantized(model)  # per block: the dense weights its quantized layers hand to autograd
    held = (max(dense, default=0) if checkpointing else sum(dense))
    return int(SLACK * acts) + held + trainable * (16 + 4 * bool(ema)) + FIXED_OVERHEAD


def _dequantized(model: nn.Module) -> list[int]:
    """Bytes of the dense weights each block's quantized layers (computing by dequantizing) save for backward."""
    from ..quant.linear import QuantLinear
    from ..runtime.offload import block_names

    out = []
    for name in block_names(model):
        layers = [m for m in model.get_submodule(name).modules() if isinstance(m, QuantLinear) and m.compute == "dequant"]
        out.append(sum(m.in_features * m.out_features * m.weight_dtype.itemsize for m in layers))
    return out


def replan_offload_(model: nn.Module, reserve: int):
    """Plan an offloaded ``model`` again within its budget with ``reserve`` of working memory (see the
    module docstring); a model streamed without a budget (every block) or not offloaded is left as it
    is. Returns the plan in force."""
    from ..runtime.offload import offload_, offload_plan, plan_offload

    plan = offload_plan(model)
    if plan is None or plan.mode == "none" or plan.budget is None:
        return plan
    kw = dict(vram=plan.budget, mode=plan.mode, device=plan.device, prefetch=plan.prefetch, reserve=int(reserve))
    new = plan_offload(model, **kw)  # a UserError here changes nothing
    if new.streamed == plan.streamed:
        plan.reserve = new.reserve
        return plan
    return offload_(model, **kw)


def offload_for_training_(pipe, item_buckets, *, batch: int, checkpointing: bool, trainable: int, ema: bool = False):
    """:func:`replan_offload_` for a LoRA step on ``pipe``'s transformer at the largest of ``item_buckets``
    ((width, height) each) with the pipeline's text length; a budget too small is a UserError saying so."""
    from ..errors import UserError

    tokens = max(pipe.family_module.image_seq_len(pipe.latent_shape(h, w)) for w, h in set(item_buckets))
    reserve = training_reserve(pipe.transformer, pipe.device, tokens=tokens + pipe.max_sequence_length, batch=batch,
                               checkpointing=checkpointing, trainable=trainable, ema=ema)
    try:
        return replan_offload_(pipe.transformer, reserve)
    except UserError as e:
        hint = "" if checkpointing else " (--gradient-checkpointing keeps far fewer activations)"
        raise UserError(f"{e} for a training step{hint}") from None
