"""Z-Image (Turbo, base, pruned variants): the family interface, layer list, pipeline parts and denoiser.
Checkpoint layouts, key plans and config inference are in :mod:`.zimage_keys`.

The pipeline interface (as diffusers' ``ZImagePipeline``): Qwen3 caption features (:func:`encode`), the
FLUX.1 VAE (:func:`load_codec`), a static shift-3 schedule (:func:`default_schedule`) and a
:class:`Denoiser` that feeds the transformer Z-Image's time t = 1 − sigma and negates its output into
rflow's velocity, so every rflow solver runs Z-Image unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..models.zimage import ZImage, ZImageConfig, default_mlp_width
from .base import LatentSpec, LayerRef, Slice, block_names, sigma_vector
from .zimage_keys import (BLOCKS, CONFIG_METADATA_KEY, PREFIXES, Z_IMAGE, config_metadata, default_axes_dims, detect,
                          diffusers_plan, expected_shapes, infer_config, overrides, plan)

__all__ = ["BLOCKS", "CONFIG_METADATA_KEY", "PREFIXES", "Z_IMAGE", "Cond", "Denoiser", "config_metadata",
           "default_axes_dims", "detect", "diffusers_plan", "expected_shapes", "infer_config", "overrides", "plan"]

NAME = "zimage"
TITLE = "Z-Image"
CONFIG_CLASS = ZImageConfig
STREAMS = ("main", "noise_refiner", "context_refiner")
# Linear layers quantization leaves in high precision (globs over qualified names): the embedders and
# the output layer, as ComfyUI-GGUF files and torchao plans keep them.
UNQUANTIZED = ("x_embedder", "cap_embedder.*", "t_embedder.*", "final_layer.*")

def summary(config: ZImageConfig) -> dict:
    """The config as ``rflow info`` shows it."""
    return {"layers": config.n_layers, "noise_refiner": len(config.noise_refiner_mlp),
            "context_refiner": len(config.context_refiner_mlp), "dim": config.dim, "heads": config.n_heads,
            "layers_mlp": config.layers_mlp, "noise_refiner_mlp": config.noise_refiner_mlp,
            "context_refiner_mlp": config.context_refiner_mlp}


def build(config: ZImageConfig) -> ZImage:
    return ZImage(config)


def family_name(config: ZImageConfig) -> str:
    """"z-image" for the published shape (Turbo and base share it), else "z-image-custom"."""
    full = default_mlp_width(Z_IMAGE.dim)
    fields = ("dim", "n_heads", "in_channels", "patch_size", "cap_feat_dim", "adaln_dim", "qk_norm")
    same = all(getattr(config, f) == getattr(Z_IMAGE, f) for f in fields)
    widths = (config.layers_mlp, config.noise_refiner_mlp, config.context_refiner_mlp) == ([full] * 30, [full] * 2, [full] * 2)
    return "z-image" if same and widths else "z-image-custom"


def _blocks(config: ZImageConfig):
    """(block name, stream, layer index, width) of every block: main layers first, then the refiners."""
    n, nr = config.n_layers, len(config.noise_refiner_mlp)
    yield from ((f"layers.{i}", "main", i, w) for i, w in enumerate(config.layers_mlp))
    yield from ((f"noise_refiner.{i}", "noise_refiner", n + i, w) for i, w in enumerate(config.noise_refiner_mlp))
    yield from ((f"context_refiner.{i}", "context_refiner", n + nr + i, w) for i, w in enumerate(config.context_refiner_mlp))


def layers(model_or_config: ZImage | ZImageConfig) -> list[LayerRef]:
    """Every SwiGLU feed-forward: hidden activation at ``{block}.feed_forward.act``; a unit is a row of
    ``w1`` and of ``w3`` and a column of ``w2``."""
    c = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    out = []
    for b, stream, i, w in _blocks(c):
        f = f"{b}.feed_forward"
        slices = (Slice(f"{f}.w1.weight", 0), Slice(f"{f}.w3.weight", 0), Slice(f"{f}.w2.weight", 1))
        out.append(LayerRef(b, "swiglu", f"{f}.act", w, i, stream, slices))
    return out


def n_layers(config: ZImageConfig) -> int:
    return config.n_layers + len(config.noise_refiner_mlp) + len(config.context_refiner_mlp)


# The repeated blocks in the order the forward pass runs them (the layer list numbers the main layers first).
BLOCK_LISTS = ("noise_refiner", "context_refiner", "layers")


def blocks(model: ZImage) -> list[str]:
    """``noise_refiner.{i}``, ``context_refiner.{i}``, then ``layers.{i}``: the blocks offload streams, in
    execution order."""
    return block_names(model, BLOCK_LISTS)


def config_from_widths(model: ZImage) -> None:
    """After pruning: the config's per-block MLP widths from the modules."""
    cfg = model.config
    cfg.layers_mlp = [b.feed_forward.w1.out_features for b in model.layers]
    cfg.noise_refiner_mlp = [b.feed_forward.w1.out_features for b in model.noise_refiner]
    cfg.context_refiner_mlp = [b.feed_forward.w1.out_features for b in model.context_refiner]


# ---------------------------------------------------------------------------------------------- pipeline interface
#
# What ZImagePipeline (diffusers) does, in rflow's terms: latents (B, in_channels, H/8, W/8) from the FLUX.1
# VAE, normalised as (mean − shift_factor)·scaling_factor; caption features are Qwen3's second-to-last
# hidden state over the chat-templated prompt (thinking on), padding removed; sigmas are
# linspace(1, 1/n, n) under a static shift (3.0); the transformer gets t = 1 − sigma and returns
# x0 − noise, which the pipeline negates into the velocity the flow-matching scheduler steps with.

DEFAULT_SIZE = (1024, 1024)  # (width, height), ZImagePipeline's default
MAX_SEQUENCE_LENGTH = 512  # Qwen3 tokens, chat template included
DEFAULT_SHIFT = 3.0  # Z-Image-Turbo's scheduler_config.json
CODEC_HELP = "the FLUX.1 VAE: ae.safetensors or a diffusers vae/ folder"
TEXT_HELP = "text_encoder/ and tokenizer/ (Qwen3)"

# FlowMatchEulerDiscreteScheduler settings that change its sigmas in ways rflow's schedules do not
_SCHEDULER_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                          "shift_terminal", "stochastic_sampling")
_DYNAMIC_DEFAULTS = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


@dataclass
class Cond:
    """Z-Image conditioning: one (L_i, cap_feat_dim) caption-feature tensor per sample, padding removed."""

    caps: list[Tensor]

    def to(self, device) -> "Cond":
        return Cond([c.to(device) for c in self.caps])

    def __len__(self) -> int:
        return len(self.caps)


def encode(text, prompts: list[str], max_sequence_length: int, guidance: float | None = None) -> Cond:
    """Caption features as ZImagePipeline.encode_prompt makes them (``QwenText.encode_zimage``).
    Z-Image has no distilled-guidance embedder: ``guidance`` is not used (the pipeline refuses it)."""
    return Cond(text.encode_zimage(prompts, max_sequence_length))


def warn_if_truncated(text, prompts: list[str], max_sequence_length: int) -> None:
    text.warn_if_truncated(prompts, max_sequence_length, mode="zimage")


class Denoiser:
    """``denoiser(x, sigma, cond) -> v`` for a Z-Image transformer over latents (B, C, H/8, W/8).

    Z-Image runs the other way in time (t = 1 − sigma, 1 is data) and returns x0 − noise; here it gets
    t = 1 − sigma and its output is negated, so v = noise − x0 at sigma as every rflow solver expects."""

    prediction = "velocity"

    def __init__(self, model: ZImage, prediction: str = "velocity"):
        if prediction != "velocity":
            raise UserError(f"Z-Image models predict the velocity, not {prediction!r}")
        self.model = model

    def loss_weight(self, t: Tensor, floor: float) -> Tensor:
        return torch.ones_like(t)

    def __call__(self, x: Tensor, sigma, cond: Cond) -> Tensor:
        B, dev = x.shape[0], x.device
        if len(cond.caps) != B:
            raise UserError(f"{len(cond.caps)} captions for a batch of {B} latents")
        t = 1.0 - sigma_vector(sigma, B, dev)
        out = self.model(x.to(self.model.dtype), t, [c.to(dev) for c in cond.caps])
        return -out


def latent_spec(config: ZImageConfig, codec_factor: int) -> LatentSpec:
    """ZImagePipeline's latents: (B, in_channels, H/f, W/f); sides are multiples of f × the patch size."""
    return LatentSpec(channels=config.in_channels, spatial_factor=codec_factor,
                      size_multiple=codec_factor * config.patch_size)


def image_seq_len(latent_shape: tuple[int, ...]) -> int:
    """Image tokens as ZImagePipeline counts them for a dynamic shift: one per 2×2 patch."""
    return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)


def default_schedule(config: ZImageConfig, scheduler_config: dict | None) -> tuple[str, float | None]:
    """(kind, shift) for ``rflow.sampling.get_sigmas`` from the pipeline's ``scheduler_config.json``:
    a static shift (3.0 without a config; "none" for shift 1), or FLUX's resolution-dependent shift
    when the scheduler shifts dynamically with the default (FLUX.1) constants. Settings rflow cannot
    reproduce are a UserError."""
    cfg = scheduler_config or {}
    for key in _SCHEDULER_UNSUPPORTED:
        if cfg.get(key):
            raise UserError(f"scheduler config {key}={cfg[key]!r}: not supported for {TITLE} (rflow's schedules "
                            "are static or FLUX's dynamic shift)")
    if cfg.get("use_dynamic_shifting"):
        kind = cfg.get("time_shift_type", "exponential")
        if kind != "exponential":
            raise UserError(f"scheduler config time_shift_type {kind!r}: only 'exponential' is supported")
        for key, want in _DYNAMIC_DEFAULTS.items():
            if key in cfg and cfg[key] != want:
                raise UserError(f"scheduler config {key}={cfg[key]!r}: the dynamic shift is supported with "
                                f"FLUX's {key}={want} only")
        return "flux", None
    shift = cfg.get("shift", DEFAULT_SHIFT)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise UserError(f"scheduler config shift {shift!r} must be a positive number")
    return ("none", None) if shift == 1 else ("static", float(shift))


def find_codec(root) -> Path | None:
    """The FLUX.1 VAE next to a Z-Image transformer: a diffusers ``vae/`` folder or ``ae.safetensors``."""
    root = Path(root)
    if (root / "vae").is_dir():
        return root / "vae"
    if (root / "ae.safetensors").is_file():
        return root / "ae.safetensors"
    return None


def load_codec(path, *, device=None, dtype: torch.dtype | None = None):
    """The FLUX.1 VAE (:class:`rflow.models.vae.AutoEncoder`; its encode/decode apply scaling and shift
    exactly as ZImagePipeline does with ``vae.config.scaling_factor`` / ``shift_factor``)."""
    from ..checkpoints.vae import load_vae

    return load_vae(path, device=device, dtype=dtype)


def find_text(*dirs) -> Path | None:
    """The first of ``dirs`` holding a Qwen3 ``text_encoder/`` and ``tokenizer/``."""
    from ..models.qwen import find_qwen_text

    return find_qwen_text(*dirs)


def load_text(path, *, device=None, dtype: torch.dtype | None = None):
    from ..models.qwen import load_qwen_text

    return load_qwen_text(path, device=device, dtype=dtype)


def check_parts_fit(config, codec, text, *, where: str) -> None:
    """A UserError (prefixed with ``where``) if the codec's latent channels are not the transformer's
    ``in_channels`` or the text encoder's width is not its ``cap_feat_dim``; ``codec`` / ``text`` may be
    None to skip their check."""
    cfg = config.config if isinstance(config, nn.Module) else config
    if codec is not None:
        latent = getattr(codec, "latent_channels", None)
        if latent is not None and int(latent) != cfg.in_channels:
            raise UserError(f"{where}: the {TITLE} transformer takes {cfg.in_channels} latent channels "
                            f"(x_embedder.weight), but the VAE gives {latent}")
    if text is not None:
        width = getattr(text, "hidden_size", None)
        if width is not None and int(width) != cfg.cap_feat_dim:
            raise UserError(f"{where}: the {TITLE} transformer takes {cfg.cap_feat_dim}-wide caption features "
                            f"(cap_embedder.1.weight), but the text encoder gives {width}")
