"""Which layers a LoRA trains (``--targets``), its initial tensors, and per-block gradient checkpointing."""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import math
import re

import torch

from ..errors import UserError
from ..lora.layer import LoRAWeight
from ..lora.targets import linear_layers

GROUPS = {  # --targets groups: patterns over rflow layer names, every family
    "attn": [r"(^|\.)(img_attn|txt_attn|attn|attention)\.", r"^single_blocks\.\d+\.linear[12]$"],
    "mlp": [r"(^|\.)(img_mlp|txt_mlp|mlp|feed_forward|ff)\.", r"^single_blocks\.\d+\.linear[12]$"],
    "mod": [r"(^|\.)(img_mod|txt_mod|modulation|adaLN_modulation)(\.|$)", r"_modulation_\w+\.lin$"],
}
BLOCK_LISTS = ("double_blocks", "single_blocks", "layers", "noise_refiner", "context_refiner")


def target_layers(model: torch.nn.Module, targets: str) -> list[str]:
    """The linear layers ``targets`` names: groups ``attn``, ``mlp``, ``mod``, ``all`` (every linear layer; comma-separated)
    or shell-style globs over rflow layer names (``double_blocks.*.img_attn.qkv``)."""
    layers = [n for n in linear_layers(model) if ".lora." not in n]
    chosen: set[str] = set()
    for part in [p.strip() for p in str(targets).split(",") if p.strip()]:
        if part == "all":
            hits = layers
        elif part in GROUPS:
            hits = [n for n in layers if any(re.search(p, n) for p in GROUPS[part])]
        else:
            hits = [n for n in layers if fnmatch.fnmatchcase(n, part)]
        if not hits:
            raise UserError(f"--targets {part!r} matches no linear layer of this model (e.g. {layers[0]!r})")
        chosen.update(hits)
    if not chosen:
        raise UserError("--targets names no layer: give attn, mlp, mod, all or a pattern")
    return [n for n in layers if n in chosen]


def init_weights(model: torch.nn.Module, layers: list[str], rank: int, alpha: float, seed: int) -> list[LoRAWeight]:
    """A: PEFT's kaiming-uniform(a=√5) bound 1/√in; B: zeros — the LoRA starts as no change."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in layers:
        lin = model.get_submodule(n)
        bound = 1 / math.sqrt(lin.in_features)
        A = (torch.rand(rank, lin.in_features, generator=g) * 2 - 1) * bound
        out.append(LoRAWeight(n, A, torch.zeros(lin.out_features, rank), alpha / rank))
    return out


def checkpoint_blocks_(model: torch.nn.Module) -> int:
    """Recompute each transformer block in backward instead of keeping its activations; returns how many.
    The recomputation of a block that offload streams runs inside the streamer's ``recompute`` (its
    weights fetched to the device again: backward calls the block's forward without the block's hooks)."""
    from torch.utils.checkpoint import checkpoint

    from ..runtime.offload import streamer

    n = 0
    for attr in BLOCK_LISTS:
        for block in getattr(model, attr, None) or ():
            fwd = block.forward

            def run(*args, _fwd=fwd, _block=block, **kwargs):
                if not torch.is_grad_enabled():
                    return _fwd(*args, **kwargs)
                calls = itertools.count()

                def body(*a, **k):
                    if next(calls) == 0:  # the forward pass, inside the block's own call (its hooks ran)
                        return _fwd(*a, **k)
                    s = streamer(model)  # backward's recomputation
                    with s.recompute(_block) if s is not None else contextlib.nullcontext():
                        return _fwd(*a, **k)

                return checkpoint(body, *args, use_reentrant=False, **kwargs)

            block.forward = run
            n += 1
    return n
