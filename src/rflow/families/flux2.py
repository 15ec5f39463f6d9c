"""FLUX.2 (klein 4B / 9B, distilled and base; FLUX.2-dev; pruned variants): the family interface, layer
list, pipeline parts and denoiser. Checkpoint layouts, key plans and config inference are in
:mod:`.flux2_keys`; reference images in :mod:`.flux2_refs`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..models.flux2 import Flux2, Flux2Config, image_ids, pack, unpack
from .base import LatentSpec, LayerRef, Slice, block_names, sigma_vector
from .flux2_keys import (CONFIG_METADATA_KEY, DEV, KLEIN_4B, KLEIN_9B, PREFIXES, config_metadata, default_axes_dim,
                         detect, diffusers_plan, expected_shapes, infer_config, overrides, plan)
from .flux2_refs import prepare_references, reference_default_size, reference_pixels

__all__ = ["CONFIG_METADATA_KEY", "DEV", "KLEIN_4B", "KLEIN_9B", "PREFIXES", "Cond", "Denoiser", "config_metadata",
           "default_axes_dim", "detect", "diffusers_plan", "expected_shapes", "infer_config", "overrides", "plan",
           "prepare_references", "reference_default_size", "reference_pixels"]

NAME = "flux2"
TITLE = "FLUX.2"
CONFIG_CLASS = Flux2Config
STREAMS = ("img", "txt", "single")
# Linear layers quantization leaves in high precision (globs over qualified names): the embedders and
# the output layer, as ComfyUI-GGUF files and torchao plans keep them.
UNQUANTIZED = ("img_in", "txt_in", "time_in.*", "guidance_in.*", "final_layer.*")
DEFAULT_SIZE = (1024, 1024)  # (width, height), Flux2KleinPipeline's default
MAX_SEQUENCE_LENGTH = 512  # Qwen3 tokens, chat template included
DEFAULT_GUIDANCE = 4.0  # Flux2Pipeline's guidance_scale, for models with a guidance embedder (FLUX.2-dev)
CODEC_HELP = "a diffusers vae/ folder (AutoencoderKLFlux2), ae.safetensors or flux2-vae.safetensors"
TEXT_HELP = "text_encoder/ and tokenizer/ of a Qwen3 encoder"
CODEC_FILES = ("ae.safetensors", "flux2-vae.safetensors", "flux2_vae.safetensors")

def build(config: Flux2Config) -> Flux2:
    return Flux2(config)


def family_name(config: Flux2Config) -> str:
    """"flux2-klein-4b", "flux2-klein-9b", "flux2-dev" for the published architectures (MLP widths may
    differ: a pruned klein-4B is still klein-4B, as FLUX.1 names pruned dev models), else "flux2-custom"."""
    def arch(c: Flux2Config):
        return (c.hidden_size, c.num_heads, c.in_channels, c.out_channels, c.context_in_dim, c.guidance_embed,
                c.depth, c.depth_single)

    for name, ref in (("flux2-klein-4b", KLEIN_4B), ("flux2-klein-9b", KLEIN_9B), ("flux2-dev", DEV)):
        if arch(config) == arch(ref):
            return name
    return "flux2-custom"


def summary(config: Flux2Config) -> dict:
    """The config as ``rflow info`` shows it."""
    return {"double_blocks": config.depth, "single_blocks": config.depth_single, "hidden_size": config.hidden_size,
            "heads": config.num_heads, "context_in_dim": config.context_in_dim, "guidance_embed": config.guidance_embed,
            "double_mlp": config.double_mlp, "single_mlp": config.single_mlp}


def layers(model_or_config: Flux2 | Flux2Config) -> list[LayerRef]:
    """Every SwiGLU MLP: ``double_blocks.{i}.img|txt`` (gate rows [0, W) and up rows [W, 2W) of ``mlp.0``,
    columns of ``mlp.2``) and ``single_blocks.{i}`` (``linear1`` rows after q, k, v: gate at 3h, up at
    3h + W; ``linear2`` columns after the attention's h). No block needs a width attribute: the fused
    splits follow the weight shapes."""
    c = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    h, out = c.hidden_size, []
    for i, pair in enumerate(c.double_mlp):
        for stream, w in zip(("img", "txt"), pair):
            b = f"double_blocks.{i}.{stream}_mlp"
            out.append(LayerRef(f"double_blocks.{i}.{stream}", "swiglu", f"{b}.1", w, i, stream,
                                (Slice(f"{b}.0.weight", 0, 0), Slice(f"{b}.0.weight", 0, w), Slice(f"{b}.2.weight", 1, 0))))
    for i, w in enumerate(c.single_mlp):
        b = f"single_blocks.{i}"
        out.append(LayerRef(b, "swiglu", f"{b}.mlp_act", w, c.depth + i, "single",
                            (Slice(f"{b}.linear1.weight", 0, 3 * h), Slice(f"{b}.linear1.weight", 0, 3 * h + w),
                             Slice(f"{b}.linear2.weight", 1, h))))
    return out


def n_layers(config: Flux2Config) -> int:
    return config.depth + config.depth_single


BLOCK_LISTS = ("double_blocks", "single_blocks")  # the repeated blocks, in the order the forward pass runs them


def blocks(model: Flux2) -> list[str]:
    """``double_blocks.{i}`` then ``single_blocks.{i}`` (the shared modulations stay outside): the blocks
    offload streams, in execution order."""
    return block_names(model, BLOCK_LISTS)


def config_from_widths(model: Flux2) -> None:
    """After pruning: the config's per-block MLP widths from the weight shapes."""
    cfg = model.config
    cfg.double_mlp = [(b.img_mlp[2].weight.shape[1], b.txt_mlp[2].weight.shape[1]) for b in model.double_blocks]
    cfg.single_mlp = [b.mlp_width for b in model.single_blocks]


# ---------------------------------------------------------------------------------------------- pipeline parts


def latent_spec(config: Flux2Config, codec_factor: int) -> LatentSpec:
    """The latent of Flux2KleinPipeline's ``latents`` argument: the codec's normalised patchified latent
    (B, in_channels, H/f, W/f), f = 16 for the FLUX.2 codec; one token per latent cell, so sides are
    multiples of f."""
    return LatentSpec(channels=config.in_channels, spatial_factor=codec_factor, size_multiple=codec_factor)


def image_seq_len(latent_shape: tuple[int, ...]) -> int:
    """Noise tokens of a latent (one per cell; reference tokens do not count), what the shift reads."""
    return latent_shape[-2] * latent_shape[-1]


def default_schedule(config: Flux2Config, scheduler_config: dict | None) -> tuple[str, float | None]:
    """FLUX.2's empirical-mu schedule ("flux2"), as Flux2KleinPipeline drives a dynamically shifting
    scheduler; a scheduler config without dynamic shifting ignores the pipeline's mu and uses its static
    ``shift`` ("static", or "none" for shift 1)."""
    cfg = scheduler_config or {}
    if cfg.get("use_dynamic_shifting", True):
        kind = cfg.get("time_shift_type", "exponential")
        if kind != "exponential":
            raise UserError(f"scheduler time_shift_type {kind!r} is not supported for FLUX.2 (exponential only)")
        return "flux2", None
    try:
        shift = float(cfg.get("shift", 1.0))
    except (TypeError, ValueError):
        raise UserError(f"scheduler shift {cfg.get('shift')!r} is not a number") from None
    return ("none", None) if shift == 1.0 else ("static", shift)


def find_codec(root: str | os.PathLike) -> Path | None:
    """Where the FLUX.2 VAE lives next to a model: a diffusers ``vae/`` folder, else ``ae.safetensors``
    (BFL) or ``flux2-vae.safetensors`` (ComfyUI)."""
    root = Path(root)
    if (root / "vae").is_dir():
        return root / "vae"
    for name in CODEC_FILES:
        if (root / name).is_file():
            return root / name
    return None


def load_codec(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None):
    """The FLUX.2 latent codec (:class:`rflow.models.vae2.Flux2Codec`) from any layout it is stored in."""
    from .flux2_vae import load_flux2_vae

    return load_flux2_vae(path, device=device, dtype=dtype)


def find_text(*dirs: str | os.PathLike | None) -> Path | None:
    """The first of ``dirs`` holding a Qwen3 ``text_encoder/`` and ``tokenizer/``."""
    from ..models.qwen import find_qwen_text

    return find_qwen_text(*dirs)


def load_text(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None):
    from ..models.qwen import load_qwen_text

    return load_qwen_text(path, device=device, dtype=dtype)


def check_parts_fit(config: Flux2Config, codec, text, *, where: str) -> None:
    """One-line UserError when the transformer's channels do not fit the codec's latent, or its text
    width (``txt_in``) the Qwen3 hidden states that :func:`encode` concatenates. ``codec`` / ``text``
    may be None to skip their check."""
    from ..models.qwen import KLEIN_LAYERS

    cfg = config.config if isinstance(config, nn.Module) else config
    if codec is not None:
        latent = int(codec.latent_channels)
        for n, verb, what, codec_verb in ((cfg.in_channels, "takes", "input", "gives"),
                                          (cfg.out_channels, "gives", "output", "takes")):
            if n != latent:
                raise UserError(f"{where}: the transformer {verb} {n} {what} channels (img_in / final_layer), "
                                f"but the VAE {codec_verb} {latent}-channel latents: not a FLUX.2 VAE for this model")
    if text is not None:
        need = max(KLEIN_LAYERS)
        if text.num_layers < need:
            raise UserError(f"{where}: the Qwen3 text encoder has {text.num_layers} layers; FLUX.2 reads the hidden "
                            f"states after layers {', '.join(map(str, KLEIN_LAYERS))}")
        width = len(KLEIN_LAYERS) * text.hidden_size
        if width != cfg.context_in_dim:
            raise UserError(f"{where}: the transformer takes {cfg.context_in_dim}-wide text embeddings (txt_in), but "
                            f"the Qwen3 encoder gives {len(KLEIN_LAYERS)}×{text.hidden_size} = {width}")


# ---------------------------------------------------------------------------------------------- denoiser


@dataclass
class Cond:
    """FLUX.2 conditioning: the Qwen3 sequence ``txt`` (B, S, D) and its RoPE ids ``txt_ids`` (B or 1, S, 4);
    optional reference-image tokens ``ref`` (B or 1, R, C) with their ids ``ref_ids`` (B or 1, R, 4)
    (:func:`prepare_references`, :func:`add_references`); the distilled-guidance scale ``guidance``
    (a float or a (B,) tensor; used only by models with a guidance embedder)."""

    txt: Tensor
    txt_ids: Tensor
    ref: Tensor | None = None
    ref_ids: Tensor | None = None
    guidance: float | Tensor | None = None

    def to(self, device) -> "Cond":
        def move(t):
            return t.to(device) if isinstance(t, Tensor) else t

        return Cond(move(self.txt), move(self.txt_ids), move(self.ref), move(self.ref_ids), move(self.guidance))

    @property
    def batch(self) -> int:
        return self.txt.shape[0]


def encode(text, prompts: list[str], max_sequence_length: int, guidance: float | None = None) -> Cond:
    """Qwen3 conditioning as Flux2KleinPipeline.encode_prompt makes it (layers 9, 18, 27 concatenated)."""
    txt, txt_ids = text.encode_klein(prompts, max_sequence_length)
    return Cond(txt, txt_ids, guidance=guidance)


def add_references(cond: Cond, tokens: Tensor, ids: Tensor) -> Cond:
    """``cond`` with the reference tokens (1 or B, R, C) and ids (1 or B, R, 4) of :func:`prepare_references`,
    expanded to the conditioning's batch (use the same ones for the negative conditioning, as the pipeline)."""
    B = cond.batch
    if tokens.ndim != 3 or ids.ndim != 3 or ids.shape[-1] != 4 or tokens.shape[1] != ids.shape[1]:
        raise UserError(f"reference tokens {tuple(tokens.shape)} and ids {tuple(ids.shape)} do not match "
                        "((1|B, R, C) and (1|B, R, 4))")
    if tokens.shape[0] not in (1, B) or ids.shape[0] not in (1, B):
        raise UserError(f"reference tokens for batch {tokens.shape[0]}, but the conditioning has {B} prompts")
    return dataclasses.replace(cond, ref=tokens.expand(B, -1, -1), ref_ids=ids.expand(B, -1, -1))


class Denoiser:
    """``denoiser(x, sigma, cond) -> v`` for a FLUX.2 transformer over latents (B, C, h, w).

    The latent is packed into one token per cell with ids (0, row, column, 0); the conditioning's
    reference tokens follow the noise tokens (as in Flux2KleinPipeline) and only the noise tokens' output
    is kept. The transformer sees sigma directly (the pipeline's ``timestep / 1000``) and predicts
    v = noise − x0, rflow's convention, so nothing is flipped."""

    prediction = "velocity"

    def __init__(self, model: Flux2, prediction: str = "velocity"):
        if prediction != "velocity":
            raise UserError(f"FLUX.2 models predict the velocity, not {prediction!r}")
        self.model = model

    def loss_weight(self, t: Tensor, floor: float) -> Tensor:
        return torch.ones_like(t)

    def guidance_vector(self, cond: Cond, batch: int, device) -> Tensor | None:
        if not self.model.config.guidance_embed:
            return None
        return sigma_vector(DEFAULT_GUIDANCE if cond.guidance is None else cond.guidance, batch, device)

    def __call__(self, x: Tensor, sigma, cond: Cond) -> Tensor:
        B, _, h, w = x.shape
        dev = x.device
        tokens, ids = pack(x), image_ids(h, w, device=dev)
        if cond.ref is not None:
            tokens = torch.cat([tokens, cond.ref.to(dev, tokens.dtype).expand(B, -1, -1)], dim=1)
            ids = torch.cat([ids.expand(B, -1, -1), cond.ref_ids.to(dev, ids.dtype).expand(B, -1, -1)], dim=1)
        txt = cond.txt.to(dev)
        out = self.model(tokens, ids, txt, cond.txt_ids.to(dev, torch.float32), sigma_vector(sigma, B, dev),
                         self.guidance_vector(cond, B, dev))
        return unpack(out[:, : h * w], h, w).to(x.dtype)
