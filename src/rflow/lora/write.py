"""Writing LoRA files: PEFT/diffusers (``--format peft``) and kohya (``--format kohya``).

* **peft**: ``transformer.<diffusers module>.lora_A.weight`` / ``lora_B.weight`` with diffusers'
  ``lora_adapter_metadata`` (``transformer.r``, ``transformer.lora_alpha``, target modules) in the
  header, the layout ``FluxPipeline.save_lora_weights`` writes and ``load_lora_weights`` reads. rflow's
  names go to diffusers' through the family's diffusers key plan run backwards: an adapter on a fused
  layer (``qkv``, FLUX's ``linear1``) is split by rows into one adapter per part (``to_q``, ``to_k``,
  ``to_v``, ``proj_mlp``), each with the same A — exactly the same update; the final norm's halves are
  swapped back to diffusers' (scale, shift).
* **kohya**: ``lora_unet_<rflow name with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  — rflow's names are the BFL checkpoint's, which is what kohya's FLUX scripts and ComfyUI use.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ..checkpoints.plan import cat, one, swap_halves
from ..errors import UserError
from .layer import LoRAWeight
from .read import METADATA_KEY

FORMATS = ("peft", "kohya")

# diffusers FluxTransformer2DModel linear modules, by block kind ({i}: block index)
_FLUX1_GLOBAL = ["x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
                 "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
                 "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
                 "time_text_embed.guidance_embedder.linear_2", "proj_out", "norm_out.linear"]
_FLUX1_DOUBLE = ["norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                 "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                 "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
_FLUX1_SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]


def _flux1_modules(model: nn.Module) -> list[str]:
    cfg = model.config
    out = list(_FLUX1_GLOBAL)
    out += [f"transformer_blocks.{i}.{m}" for i in range(cfg.depth) for m in _FLUX1_DOUBLE]
    out += [f"single_transformer_blocks.{i}.{m}" for i in range(cfg.depth_single) for m in _FLUX1_SINGLE]
    return out


def diffusers_parts(fam: ModuleType, model: nn.Module) -> dict[str, tuple[list[str], object]]:
    """rflow layer -> (its diffusers modules, how they combine), from the family's key plan."""
    if getattr(fam, "NAME", None) != "flux1":
        raise UserError(f"--format peft writes diffusers' names for FLUX.1; for a {getattr(fam, 'TITLE', 'this')} "
                        "model use --format kohya (rflow's own names, which rflow and ComfyUI read)")
    plan = fam.diffusers_plan([f"{m}.weight" for m in _flux1_modules(model)], partial=True)
    out = {}
    for dst, (srcs, combine) in plan.items():
        if dst.endswith(".weight"):
            out[dst.removesuffix(".weight")] = ([s.removesuffix(".weight") for s in srcs], combine)
    return out


def _peft_tensors(weights: list[LoRAWeight], fam, model) -> dict[str, torch.Tensor]:
    from .targets import model_width

    parts = diffusers_parts(fam, model)
    width = model_width(model)
    t = {}
    for w in weights:
        if w.layer not in parts:
            raise UserError(f"{w.layer}: diffusers' FLUX.1 transformer has no layer for it; use --format kohya")
        srcs, combine = parts[w.layer]
        n_out = model.get_submodule(w.layer).out_features
        B = torch.zeros(n_out, w.up.shape[1], dtype=w.up.dtype)
        B[w.offset:w.offset + w.up.shape[0]] = w.up
        if combine is one:
            pieces = [(srcs[0], B)]
        elif combine is swap_halves:
            pieces = [(srcs[0], swap_halves([B]))]
        elif combine is cat:
            rows = [width] * (len(srcs) - 1) + [n_out - width * (len(srcs) - 1)]
            pieces = list(zip(srcs, B.split(rows)))
        else:  # pragma: no cover - the diffusers plans combine with these three
            raise UserError(f"cannot write {w.layer} in diffusers' names ({combine!r})")
        for src, b in pieces:
            t[f"transformer.{src}.lora_A.weight"] = w.down.clone()
            t[f"transformer.{src}.lora_B.weight"] = b.contiguous()
    return t


def lora_tensors(weights: list[LoRAWeight], *, fam: ModuleType | None, model: nn.Module, rank: int, alpha: float,
                 fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and header metadata. Every weight must have scale ``alpha / rank`` and rank ``rank``."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    for w in weights:
        if w.down.shape[0] != rank or abs(w.scale - alpha / rank) > 1e-9 * max(1.0, alpha / rank):
            raise UserError(f"{w.layer}: rank {w.down.shape[0]} scale {w.scale} differ from the file's rank {rank}, "
                            f"alpha {alpha}")
    if fmt == "kohya":
        t = {}
        for w in weights:
            B = torch.zeros(model.get_submodule(w.layer).out_features, rank, dtype=w.up.dtype)
            B[w.offset:w.offset + w.up.shape[0]] = w.up
            key = "lora_unet_" + w.layer.replace(".", "_")
            t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"] = w.down, B
            t[f"{key}.alpha"] = torch.tensor(float(alpha))
        return t, {"ss_network_dim": str(rank), "ss_network_alpha": repr(float(alpha)),
                   "ss_network_module": "networks.lora_flux"}
    t = _peft_tensors(weights, fam, model)
    modules = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in t})
    cfg = {"r": rank, "lora_alpha": float(alpha), "target_modules": modules, "peft_type": "LORA",
           "init_lora_weights": True, "use_dora": False, "use_rslora": False, "lora_bias": False}
    return t, {METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in cfg.items()}), "format": "pt"}


def write_lora(path, weights: list[LoRAWeight], *, fam: ModuleType | None, model: nn.Module, rank: int,
               alpha: float, fmt: str = "peft", extra: dict[str, str] | None = None) -> Path:
    """Write ``weights`` (LoRAs on ``model``'s layers) to ``path`` atomically in format ``fmt``."""
    from ..checkpoints.io import save_safetensors

    tensors, meta = lora_tensors(weights, fam=fam, model=model, rank=rank, alpha=alpha, fmt=fmt)
    meta.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path, meta)
    return path
