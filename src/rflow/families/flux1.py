"""FLUX.1 (dev, schnell, Flex.1-alpha, pruned variants, rflow-tiny): the family interface, layer list
and denoiser. Checkpoint layouts, key plans and config inference are in :mod:`.flux1_keys`.

rflow-tiny is a FLUX.1-shaped model that predicts x0 instead of the velocity (``prediction="data"``);
its denoiser turns that into v, so solvers, training and measurement see one convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.plan import Plan, identity_plan
from ..errors import UserError
from ..models.flux import Flux, FluxConfig, image_ids, pack, text_ids, unpack
from .base import LatentSpec, LayerRef, Slice, block_names, data_to_velocity, sigma_vector
from .flux1_keys import (CONFIG_METADATA_KEY, PREFIXES, default_axes_dim, detect_format, diffusers_plan,
                         expected_shapes, family_of, infer_config)

__all__ = ["CONFIG_METADATA_KEY", "PREFIXES", "Cond", "Denoiser", "default_axes_dim", "detect_format", "diffusers_plan",
           "expected_shapes", "family_of", "infer_config"]

NAME = "flux1"
TITLE = "FLUX.1"
CONFIG_CLASS = FluxConfig

# ---------------------------------------------------------------------------------------------- family interface


def detect(keys: list[str]) -> tuple[str, str] | None:
    """(layout, prefix) if ``keys`` look like a FLUX.1 transformer's, else None. FLUX.2 shares some key
    names (``img_in``, diffusers' ``x_embedder``), so the loader asks the other families first."""
    try:
        return detect_format(keys)
    except UserError:
        return None


def plan(keys: list[str], layout: str, prefix: str = "") -> Plan:
    return diffusers_plan(keys) if layout == "diffusers" else identity_plan(keys, prefix)


DEFAULT_SIZE = (1024, 1024)  # (width, height)
MAX_SEQUENCE_LENGTH = 512  # T5 tokens
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale (dev)
CODEC_HELP = "ae.safetensors or a diffusers vae/ folder"
TEXT_HELP = "text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/"


def default_schedule(config: FluxConfig, scheduler_config: dict | None) -> tuple[str, float | None]:
    """(kind, shift) for rflow.sampling.get_sigmas: from a diffusers scheduler config when there is one
    (dynamic shifting -> "flux"), else "flux" for guidance-distilled models (dev) and "none" (schnell)."""
    if scheduler_config is not None:
        if scheduler_config.get("use_dynamic_shifting"):
            return "flux", None
        shift = float(scheduler_config.get("shift", 1.0))
        return ("none", None) if shift == 1.0 else ("static", shift)
    return ("flux", None) if config.guidance_embed else ("none", None)


def find_codec(root: Path) -> Path | None:
    for cand in (root / "vae", root / "ae.safetensors"):
        if cand.exists():
            return cand
    return None


def load_codec(path, *, device=None, dtype=None):
    from ..checkpoints.vae import load_vae

    return load_vae(path, device=device, dtype=dtype)


def find_text(*dirs) -> Path | None:
    from ..models.text import find_text_encoders

    return find_text_encoders(*dirs)


def load_text(path, *, device=None, dtype=None):
    from ..models.text import load_text_encoders

    return load_text_encoders(path, device=device, dtype=dtype)


def check_parts_fit(config: FluxConfig, codec, text, *, where: str) -> None:
    from ..checkpoints.fit import check_parts_fit as fit

    fit(config, codec, text, where=where)


def overrides(metadata: dict[str, str], diffusers_config: dict | None) -> dict:
    """What shapes cannot tell (RoPE axes, theta): rflow's safetensors metadata, diffusers' config.json."""
    from ..checkpoints.loader import metadata_overrides

    out = dict(metadata_overrides(metadata, CONFIG_METADATA_KEY))
    if diffusers_config and "axes_dims_rope" in diffusers_config:
        out["axes_dim"] = diffusers_config["axes_dims_rope"]
    return out


def config_metadata(config: FluxConfig) -> dict[str, str]:
    """Safetensors metadata for what shapes cannot tell (read back by :func:`overrides`)."""
    import json

    return {CONFIG_METADATA_KEY: json.dumps({"axes_dim": list(config.axes_dim), "theta": config.theta})}


def summary(config: FluxConfig) -> dict:
    """The config as ``rflow info`` shows it."""
    return {"double_blocks": config.depth, "single_blocks": config.depth_single, "hidden_size": config.hidden_size,
            "heads": config.num_heads, "guidance_embed": config.guidance_embed, "double_mlp": config.double_mlp,
            "single_mlp": config.single_mlp}


def build(config: FluxConfig) -> Flux:
    return Flux(config)


def family_name(config: FluxConfig) -> str:
    return family_of(config)


def latent_spec(config: FluxConfig, vae_factor: int) -> LatentSpec:
    """FLUX.1's noise is the VAE latent, unpacked: (B, in_channels/4, H/f, W/f); sides are multiples of 2f."""
    return LatentSpec(channels=config.in_channels // 4, spatial_factor=vae_factor, size_multiple=2 * vae_factor)


def image_seq_len(latent_shape: tuple[int, ...]) -> int:
    """Image tokens for a latent: one per 2×2 patch (what the resolution-dependent shift reads)."""
    return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)


STREAMS = ("img", "txt", "single")
# Linear layers quantization leaves in high precision (globs over qualified names): the embedders and
# the output layer, as ComfyUI-GGUF files and torchao plans keep them.
UNQUANTIZED = ("img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.*")


def layers(model_or_config: Flux | FluxConfig) -> list[LayerRef]:
    """Every MLP: ``double_blocks.{i}.img|txt`` (GELU, rows of ``mlp.0``, columns of ``mlp.2``) and
    ``single_blocks.{i}`` (rows of ``linear1`` after q, k, v; columns of ``linear2`` after the attention)."""
    c = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    h = c.hidden_size
    out = []
    for i, (wi, wt) in enumerate(c.double_mlp):
        for stream, w in (("img", wi), ("txt", wt)):
            b = f"double_blocks.{i}.{stream}_mlp"
            out.append(LayerRef(f"double_blocks.{i}.{stream}", "gelu", f"{b}.1", w, i, stream,
                                (Slice(f"{b}.0.weight", 0), Slice(f"{b}.0.bias", 0), Slice(f"{b}.2.weight", 1))))
    for i, w in enumerate(c.single_mlp):
        b = f"single_blocks.{i}"
        out.append(LayerRef(b, "gelu", f"{b}.mlp_act", w, c.depth + i, "single",
                            (Slice(f"{b}.linear1.weight", 0, 3 * h), Slice(f"{b}.linear1.bias", 0, 3 * h),
                             Slice(f"{b}.linear2.weight", 1, h)), width_attr=(b, "mlp_width")))
    return out


def n_layers(config: FluxConfig) -> int:
    return config.depth + config.depth_single


BLOCK_LISTS = ("double_blocks", "single_blocks")  # the repeated blocks, in the order the forward pass runs them


def blocks(model: Flux) -> list[str]:
    """``double_blocks.{i}`` then ``single_blocks.{i}``: the blocks offload streams, in execution order."""
    return block_names(model, BLOCK_LISTS)


def config_from_widths(model: Flux) -> None:
    """After pruning: the config's per-block MLP widths from the modules."""
    cfg = model.config
    cfg.double_mlp = [(m.img_mlp[0].out_features, m.txt_mlp[0].out_features) for m in model.double_blocks]
    cfg.single_mlp = [b.mlp_width for b in model.single_blocks]


# ---------------------------------------------------------------------------------------------- denoiser


@dataclass
class Cond:
    """FLUX.1 conditioning: the T5 sequence (B, S, d_t5), the pooled CLIP vector (B, d_clip) and the
    distilled-guidance scale (a float or a (B,) tensor; ignored without a guidance embedder)."""

    txt: Tensor
    vec: Tensor
    guidance: float | Tensor | None = None

    def to(self, device) -> "Cond":
        g = self.guidance.to(device) if isinstance(self.guidance, Tensor) else self.guidance
        return Cond(self.txt.to(device), self.vec.to(device), g)


def encode(text_encoders, prompts: list[str], max_sequence_length: int, guidance: float | None = None) -> Cond:
    """CLIP + T5 conditioning, as diffusers' FluxPipeline encodes prompts."""
    txt, vec = text_encoders.encode(prompts, max_sequence_length)
    return Cond(txt, vec, guidance)


class Denoiser:
    """``denoiser(x, sigma, cond) -> v`` for a FLUX.1-shaped model over unpacked latents (B, C, H, W).

    It packs 2×2 patches into tokens, builds the RoPE ids and the guidance vector, and — for a model
    that predicts x0 (``prediction="data"``, rflow-tiny) — returns v = (x_t − x0)/sigma."""

    def __init__(self, model: Flux, prediction: str = "velocity"):
        if prediction not in ("velocity", "data"):
            raise UserError(f"unknown model prediction type {prediction!r} (velocity or data)")
        self.model, self.prediction = model, prediction

    def guidance_vector(self, cond: Cond, batch: int, device) -> Tensor | None:
        if not self.model.config.guidance_embed:
            return None
        g = cond.guidance if cond.guidance is not None else 3.5
        return sigma_vector(g, batch, device)

    def output_to_velocity(self, out: Tensor, tokens: Tensor, t: Tensor) -> Tensor:
        """The transformer's raw output over tokens as a velocity (identity for velocity models)."""
        return out if self.prediction == "velocity" else data_to_velocity(out, tokens, t)

    def loss_weight(self, t: Tensor, floor: float) -> Tensor:
        """Per-sample weight of the velocity MSE in training: 1 for velocity models; for x0 models the
        velocity error is the x0 error over t, so the weight (t / max(t, floor))² gives the x0 error
        with its 1/t² weight bounded by ``floor``."""
        if self.prediction == "velocity":
            return torch.ones_like(t)
        return (t / t.clamp_min(floor)).pow(2)

    def __call__(self, x: Tensor, sigma, cond: Cond) -> Tensor:
        B, _, h, w = x.shape
        dev = x.device
        tokens, t = pack(x), sigma_vector(sigma, B, dev)
        txt = cond.txt.to(dev)
        out = self.model(tokens, image_ids(h, w, dev), txt, text_ids(txt.shape[1], dev), t, cond.vec.to(dev),
                         self.guidance_vector(cond, B, dev))
        return unpack(self.output_to_velocity(out, tokens, t), h, w)
