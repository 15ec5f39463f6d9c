"""Text-to-image and img2img for every family: ``rflow.load(...)`` -> :class:`Pipeline`.

A pipeline is three parts — transformer, VAE (or latent codec), text encoders — plus the sigma schedule
the model was trained for, and its family (:mod:`rflow.families`), which supplies the denoiser
``denoiser(x, sigma, cond) -> v`` in rflow's one convention, the latent spec and the text conditioning.
``generate`` works in the latent space of the diffusers pipeline's own ``latents`` argument for that
family (:meth:`Pipeline.latent_shape`); ``noise`` and the ``output_type="latent"`` result live there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import sampling
from .errors import NonFiniteError, UserError, flag, warn
from .families.base import Guidance, guided
from .models.flux import Flux
from .models.text import TextEncoders

OUTPUT_TYPES = ("pil", "latent", "pt", "np")


@dataclass
class Schedule:
    """How sigmas are spaced for a model: ``rflow.sampling.get_sigmas`` arguments."""

    kind: str = "flux"  # "flux" (resolution-dependent shift) | "static" | "none"
    shift: float | None = None

    def sigmas(self, steps: int, image_seq_len: int) -> Tensor:
        return sampling.get_sigmas(steps, schedule=self.kind, image_seq_len=image_seq_len, shift=self.shift)

    def shift_factor(self, image_seq_len: int, steps: int = 50) -> float:
        """The factor s of ``t' = s·t / (1 + (s − 1)·t)`` this schedule applies at ``image_seq_len`` image
        tokens: e^mu of the resolution-dependent shift ("flux"; "flux2" at ``steps``), the static shift, or 1;
        what training's ``--shift auto`` draws its timesteps with."""
        if self.kind == "flux":
            return math.exp(sampling.flux_mu(image_seq_len))
        if self.kind == "flux2":
            return math.exp(sampling.flux2_mu(image_seq_len, steps))
        if self.kind == "static":
            return float(self.shift)
        return 1.0



@dataclass
class Pipeline:
    transformer: Flux
    vae: torch.nn.Module
    text_encoders: TextEncoders
    schedule: Schedule = field(default_factory=Schedule)
    default_size: tuple[int, int] = (1024, 1024)  # (width, height)
    name: str = "flux1"
    max_sequence_length: int = 512  # text tokens (T5 for FLUX.1)
    fingerprint: str = ""  # content fingerprint of the transformer's tensors (statistics, captures, patches)
    model_hash: str = ""  # sha256 of the transformer file(s), 10 hex digits: the PNG's "Model hash"
    patches_hash: str = ""  # set by load_with_patches
    grammar: str | None = None  # "shapes" for models trained on the shapes world (prompts outside it warn)
    family: str = "flux1"  # the rflow.families module that runs this transformer
    # Passed to the family's Denoiser: rflow-tiny's {"prediction": "data"} (it predicts x0, not v).
    denoiser_options: dict = field(default_factory=dict)
    loras: dict = field(default_factory=dict)  # name -> rflow.lora.LoadedLoRA, in loading order

    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Apply the LoRA file at ``path`` (any dialect rflow reads, :mod:`rflow.lora`) times ``scale`` beside
        the layers it adapts — transformer, and FLUX.1's CLIP/T5 — quantized or offloaded ones included; returns its name."""
        from .lora import load_lora_

        return load_lora_(self, path, scale=scale, name=name)

    def fuse_lora(self, names=None) -> None:
        """Merge the loaded LoRAs (or ``names``) into the dense weights; a quantized layer is a UserError."""
        from .lora import fuse_

        fuse_(self, names)

    def unfuse_lora(self) -> None:
        """Give every fused layer its exact original weight back; the LoRAs run beside it again."""
        from .lora import unfuse_

        unfuse_(self)

    def remove_lora(self, names=None) -> None:
        """Remove the loaded LoRAs (or ``names``) from every model of the pipeline."""
        from .lora import remove_

        remove_(self, names)

    @property
    def family_module(self):
        from .checkpoints.loader import family_module

        return family_module(self.family)

    @property
    def denoiser(self):
        """``denoiser(x, sigma, cond) -> v`` over this pipeline's latents (see rflow.families.base)."""
        return self.family_module.Denoiser(self.transformer, **self.denoiser_options)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def latent_spec(self):
        return self.family_module.latent_spec(self.transformer.config, self.vae.downscale_factor)

    @property
    def latent_channels(self) -> int:
        return self.latent_spec.channels

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (FLUX.1: the VAE's downscale factor × the 2×2 patch)."""
        return self.latent_spec.size_multiple

    def latent_shape(self, height: int, width: int, batch: int = 1) -> tuple[int, ...]:
        """The shape of ``noise`` (and of ``output_type="latent"``) for ``batch`` images of height × width."""
        return self.latent_spec.shape(batch, height, width)

    def has_guidance_embedder(self) -> bool:
        return bool(getattr(self.transformer.config, "guidance_embed", False))

    def resolve_guidance(self, guidance: float | None) -> float | None:
        """The distilled-guidance value to use: ``guidance`` checked, or the family's default when None
        (3.5 for FLUX.1, 4.0 for FLUX.2-dev), for models with a guidance embedder; None for models without one, where an explicit value is an error."""
        from . import options

        options.guidance(guidance)
        if not self.has_guidance_embedder():
            if guidance is not None:
                raise UserError(f"this model ({self.name}) has no guidance embedder: {flag('guidance')} does not "
                                f"apply (use {flag('cfg')} for true CFG)")
            return None
        return float(self.family_module.DEFAULT_GUIDANCE if guidance is None else guidance)

    def encode(self, prompts: list[str], max_sequence_length: int | None = None, guidance: float | None = None):
        """The family's conditioning for ``prompts`` (the ``cond`` its denoiser takes)."""
        return self.family_module.encode(self.text_encoders, prompts, max_sequence_length or self.max_sequence_length,
                                         guidance=guidance)

    def generate(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int = 28,
        guidance: float | None = None,
        cfg: float = 1.0,
        seed: int = 0,
        solver: str = "euler",
        noise: Tensor | None = None,
        image: Image.Image | Tensor | str | os.PathLike | None = None,
        strength: float = 1.0,
        max_sequence_length: int | None = None,
        output_type: str = "pil",
        callback: Callable[[int, int, Tensor], None] | None = None,
        images: list | None = None,
        cfg_truncation: float | None = None,
        cfg_renorm: float | None = None,
        tiled_vae: bool | None = None,
    ):
        """Generate images. ``width``/``height`` default to the model's native size (1024 for FLUX.1),
        ``max_sequence_length`` to the model's T5 length (512 for FLUX.1).

        ``guidance`` feeds the distilled-guidance embedder (default 3.5; only for models that have one:
        an explicit value for a model without one is an error); ``cfg > 1`` runs true CFG,
        v = v_neg + cfg·(v_pos − v_neg), against ``negative_prompt`` (empty prompt if none); ``image`` +
        ``strength`` is img2img. ``noise`` has the shape :meth:`latent_shape` gives. ``images``: reference
        images (PIL, paths or (3, H, W) tensors in [0, 1]) for families that take them (FLUX.2-klein);
        the size defaults to the first one's. ``cfg_truncation``: CFG is off once 1 − sigma exceeds it;
        ``cfg_renorm``: the guided velocity's norm is capped at that multiple of the conditional one
        (Z-Image's ``cfg_truncation`` and ``cfg_normalization``). ``tiled_vae``: decode in overlapping tiles
        (True), in one piece (False), or tiled above 2 megapixels (None; :mod:`rflow.runtime.tiling`).
        Returns a list of PIL images, or a tensor for ``output_type`` "latent" (normalised latents),
        "pt" (B, 3, H, W in [0, 1]) or "np" (B, H, W, 3 uint8 array).
        """
        from . import options

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise UserError("prompt must be a string or a non-empty list of strings")
        B = len(prompts)
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"unknown output_type {output_type!r}; choose from {', '.join(OUTPUT_TYPES)}")
        if solver not in sampling.SOLVERS:
            raise UserError(f"unknown solver {solver!r}; choose from {', '.join(sampling.SOLVERS)}")
        options.steps(steps)
        guidance = self.resolve_guidance(guidance)
        options.number(cfg, "cfg", low=1)
        options.number(strength, "strength", low=0, high=1)
        options.seed(seed)
        if cfg_truncation is not None:
            options.number(cfg_truncation, "cfg_truncation", low=0, high=1)
        if cfg_renorm is not None:
            options.number(cfg_renorm, "cfg_renorm", low=0)
        fam = self.family_module
        refs = self.reference_images(images)
        width, height = self.resolve_size(width, height, refs)
        self.check_request(B, width, height, cfg=cfg, tiled_vae=tiled_vae)
        shape = self.latent_shape(height, width, B)
        dev = self.device

        if noise is None:
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        elif tuple(noise.shape) != shape:
            raise UserError(f"noise has shape {tuple(noise.shape)}, expected {shape} for {B} prompt(s) at {width}x{height}")
        noise = noise.to(dev, torch.float32)

        max_sequence_length = max_sequence_length or self.max_sequence_length
        cond = self.encode(prompts, max_sequence_length, guidance)
        neg = None
        if refs is not None:
            tokens, ids = fam.prepare_references(refs, self.vae)
            cond = fam.add_references(cond, tokens, ids)
        if cfg > 1.0:
            negs = [negative_prompt or ""] * B if negative_prompt is None or isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != B:
                raise UserError(f"{len(negs)} negative prompts for {B} prompts: give one, or one per prompt")
            neg = self.encode(negs, max_sequence_length, guidance)
            if refs is not None:
                neg = fam.add_references(neg, tokens, ids)
        elif negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) != B:
            raise UserError(f"{len(negative_prompt)} negative prompts for {B} prompts: give one, or one per prompt")

        sigmas = self.schedule.sigmas(steps, image_seq_len=fam.image_seq_len(shape))
        x = noise
        if image is not None:
            # as diffusers' img2img: skip the first steps·(1 − strength) steps; strength 0 keeps the image
            start = int(max(steps - min(steps * strength, steps), 0))
            sigmas = sigmas[start:]
            x0 = self.encode_image(image, width, height)
            x0 = x0.expand(B, *x0.shape[1:])
            if not bool(torch.isfinite(x0).all()):
                raise NonFiniteError("the VAE produced NaN/inf encoding the image")
            s0 = float(sigmas[0])
            x = s0 * noise + (1.0 - s0) * x0
        if len(sigmas) < 2:  # strength 0: nothing to denoise
            latent = x.clone()
        else:
            velocity = guided(self.denoiser, cond, neg, Guidance(cfg, cfg_truncation, cfg_renorm))
            latent = sampling.sample(velocity, x, sigmas.to(dev), solver, callback=callback)
        if output_type == "latent":
            return latent
        return self.decode(latent, output_type, tiles=self.vae_tiles(width, height, tiled_vae))

    def reference_images(self, images: list | None) -> list | None:
        """Reference images read (paths) and checked to be wanted by this family; None when there are none."""
        if not images:
            return None
        if not hasattr(self.family_module, "prepare_references"):
            raise UserError(f"{self.family_module.TITLE} models take no reference images")
        return [self.read_image(im) if isinstance(im, (str, os.PathLike)) else im for im in images]

    def resolve_size(self, width: int | None, height: int | None, images: list | None = None) -> tuple[int, int]:
        """The size to draw: as given, else (as diffusers) each missing side from the first reference
        image, else the model's native size."""
        if images:
            ref_w, ref_h = self.family_module.reference_default_size(images, self.vae.downscale_factor)
            width, height = width or ref_w, height or ref_h
        return width or self.default_size[0], height or self.default_size[1]

    def vae_tiles(self, width: int, height: int, tiled_vae: bool | None = None) -> tuple[int, int] | None:
        """(tile, overlap) in latent cells for decoding a width x height image, None for one piece."""
        from .runtime.tiling import vae_tiles

        return vae_tiles(self.vae.downscale_factor, width, height, tiled_vae)

    def check_request(self, batch: int, width: int, height: int, *, cfg: float = 1.0,
                      tiled_vae: bool | None = None) -> None:
        """Refuse, before any work, a size this model cannot draw or whose activations cannot fit memory."""
        from .memory import check_generate_memory

        m = self.size_multiple
        if width <= 0 or height <= 0 or width % m or height % m:
            raise UserError(f"size {width}x{height} is not a positive multiple of {m} for this model")
        tiles, f = self.vae_tiles(width, height, tiled_vae), self.vae.downscale_factor
        tile = None if tiles is None else (min(tiles[0] * f, width), min(tiles[0] * f, height))  # pixels
        check_generate_memory(self, batch, width, height, cfg=cfg, decode_size=tile)

    def check_prompts(self, prompts: list[str]) -> None:
        """Warn about prompts the text encoders will cut, and prompts outside the model's grammar."""
        if self.grammar == "shapes":
            from .world import shapes

            for p in dict.fromkeys(prompts):
                if p:
                    try:
                        shapes.parse(p)
                    except UserError:
                        warn(f"{p!r} is outside the shapes grammar rflow-tiny was trained on (see `rflow eval`); "
                             "expect a poor picture")
        family_warn = getattr(self.family_module, "warn_if_truncated", None)
        if family_warn is not None:
            family_warn(self.text_encoders, prompts, self.max_sequence_length)
        else:
            self.text_encoders.warn_if_truncated(prompts, self.max_sequence_length)

    @staticmethod
    def read_image(path) -> Image.Image:
        """An image file as RGB; unreadable or truncated files are one UserError."""
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"{path}: cannot read image ({' '.join(str(e).split()) or type(e).__name__})") from None

    @torch.no_grad()
    def encode_image(self, image, width: int, height: int) -> Tensor:
        """An image (PIL, path, or (1|B, 3, H, W) tensor in [0, 1]) -> normalised latent."""
        if isinstance(image, (str, os.PathLike)):
            image = self.read_image(image)
        if isinstance(image, Image.Image):
            image = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            image = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255.0
        elif isinstance(image, Tensor):
            if image.ndim == 3:
                image = image[None]
            image = torch.nn.functional.interpolate(image.float(), size=(height, width), mode="bilinear", antialias=True) if image.shape[-2:] != (height, width) else image.float()
        else:
            raise UserError(f"image must be a PIL image, a path or a tensor, not {type(image).__name__}")
        return self.vae.encode((image * 2 - 1).to(self.device, self.vae.dtype)).float()

    @torch.no_grad()
    def decode(self, latent: Tensor, output_type: str = "pil", tiles: tuple[int, int] | None = None):
        """Latents -> images; ``tiles`` = (tile, overlap) in latent cells decodes tile by tile."""
        from .runtime.parts import holding
        from .runtime.tiling import decode_tiled

        with holding(self.vae):  # an offloaded VAE is copied to the device once for all the tiles
            z = latent.to(self.vae.dtype)
            img = (self.vae.decode(z) if tiles is None else decode_tiled(self.vae.decode, z, *tiles)).float()
        if not bool(torch.isfinite(img).all()):
            raise NonFiniteError("the VAE produced NaN/inf decoding the latents")
        img = ((img + 1) / 2).clamp(0, 1)
        if output_type == "pt":
            return img
        arr = (img.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return arr if output_type == "np" else [Image.fromarray(a) for a in arr]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    try:
        return table[name.lower()]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; choose from fp32, bf16, fp16") from None


from .paths import MANIFEST  # noqa: E402  (re-exported)

_FROM_LOADING = ("PIPELINE_FORMAT_VERSION", "load", "load_rflow_pipeline", "save_pipeline")


def __getattr__(name: str):
    """``load``, ``save_pipeline`` … live in :mod:`rflow.loading` (which imports this module); they are
    reachable from here too, as they always were."""
    if name in _FROM_LOADING:
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MANIFEST", "OUTPUT_TYPES", "Pipeline", "Schedule", "default_device", "default_dtype", "parse_dtype",
           *_FROM_LOADING]
