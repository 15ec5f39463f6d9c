"""Text-to-image and img2img for every family: ``rflow.load(...)`` -> :class:`Pipeline`.

A pipeline is three parts — transformer, VAE (or latent codec), text encoders — plus the sigma schedule
the model was trained for, and its family (:mod:`rflow.families`), which supplies the denoiser
``denoiser(x, sigma, cond) -> v`` in rflow's one convention, the latent spec and the text conditioning.
``generate`` works in the latent space of the diffusers pipeline's own ``latents`` argument for that
family (:meth:`Pipeline.latent_shape`); ``noise`` and the ``output_type="latent"`` result live there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import sampling
from .checkpoints.flux import FluxCheckpoint, load_flux
from .checkpoints.io import read_json
from .checkpoints.vae import load_vae
from .errors import NonFiniteError, UserError, flag, warn
from .families.base import Guidance, guided
from .models.flux import Flux
from .models.text import TextEncoders, find_text_encoders, load_text_encoders
from .paths import MANIFEST

OUTPUT_TYPES = ("pil", "latent", "pt", "np")
DEFAULT_GUIDANCE = 3.5  # FLUX.1-dev's distilled guidance


@dataclass
class Schedule:
    """How sigmas are spaced for a model: ``rflow.sampling.get_sigmas`` arguments."""

    kind: str = "flux"  # "flux" (resolution-dependent shift) | "static" | "none"
    shift: float | None = None

    def sigmas(self, steps: int, image_seq_len: int) -> Tensor:
        return sampling.get_sigmas(steps, schedule=self.kind, image_seq_len=image_seq_len, shift=self.shift)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "Schedule":
        if cfg.get("use_dynamic_shifting"):
            return cls("flux")
        shift = float(cfg.get("shift", 1.0))
        return cls("none") if shift == 1.0 else cls("static", shift)


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
        """The distilled-guidance value to use: ``guidance`` checked, or 3.5 when None, for models with a
        guidance embedder; None for models without one, where an explicit value is an error."""
        from . import options

        options.guidance(guidance)
        if not self.has_guidance_embedder():
            if guidance is not None:
                raise UserError(f"this model ({self.name}) has no guidance embedder: {flag('guidance')} does not "
                                f"apply (use {flag('cfg')} for true CFG)")
            return None
        return DEFAULT_GUIDANCE if guidance is None else float(guidance)

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512) -> tuple[Tensor, Tensor]:
        """FLUX.1's (T5 sequence, pooled CLIP vector) for ``prompts``."""
        return self.text_encoders.encode(prompts, max_sequence_length)

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
    ):
        """Generate images. ``width``/``height`` default to the model's native size (1024 for FLUX.1),
        ``max_sequence_length`` to the model's T5 length (512 for FLUX.1).

        ``guidance`` feeds the distilled-guidance embedder (default 3.5; only for models that have one:
        an explicit value for a model without one is an error); ``cfg > 1`` runs true CFG,
        v = v_neg + cfg·(v_pos − v_neg), against ``negative_prompt`` (empty prompt if none); ``image`` +
        ``strength`` is img2img. ``noise`` has the shape :meth:`latent_shape` gives.
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
        width, height = width or self.default_size[0], height or self.default_size[1]
        self.check_request(B, width, height, cfg=cfg)
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
        if cfg > 1.0:
            negs = [negative_prompt or ""] * B if negative_prompt is None or isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != B:
                raise UserError(f"{len(negs)} negative prompts for {B} prompts: give one, or one per prompt")
            neg = self.encode(negs, max_sequence_length, guidance)
        elif negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) != B:
            raise UserError(f"{len(negative_prompt)} negative prompts for {B} prompts: give one, or one per prompt")

        sigmas = self.schedule.sigmas(steps, image_seq_len=self.family_module.image_seq_len(shape))
        x = noise
        if image is not None:
            # as diffusers' img2img: skip the first steps·(1 − strength) steps; strength 0 keeps the image
            start = int(max(steps - min(steps * strength, steps), 0))
            sigmas = sigmas[start:]
            x0 = self.encode_image(image, width, height).expand(B, -1, -1, -1)
            if not bool(torch.isfinite(x0).all()):
                raise NonFiniteError("the VAE produced NaN/inf encoding the image")
            s0 = float(sigmas[0])
            x = s0 * noise + (1.0 - s0) * x0
        if len(sigmas) < 2:  # strength 0: nothing to denoise
            latent = x.clone()
        else:
            velocity = guided(self.denoiser, cond, neg, Guidance(cfg))
            latent = sampling.sample(velocity, x, sigmas.to(dev), solver, callback=callback)
        if output_type == "latent":
            return latent
        return self.decode(latent, output_type)

    def check_request(self, batch: int, width: int, height: int, *, cfg: float = 1.0) -> None:
        """Refuse, before any work, a size this model cannot draw or whose activations cannot fit memory."""
        from .memory import check_generate_memory

        m = self.size_multiple
        if width <= 0 or height <= 0 or width % m or height % m:
            raise UserError(f"size {width}x{height} is not a positive multiple of {m} for this model")
        check_generate_memory(self, batch, width, height, cfg=cfg)

    def check_prompts(self, prompts: list[str]) -> None:
        """Warn about prompts the text encoders will cut, and prompts outside the model's grammar."""
        if self.grammar == "shapes":
            from . import shapes

            for p in dict.fromkeys(prompts):
                if p:
                    try:
                        shapes.parse(p)
                    except UserError:
                        warn(f"{p!r} is outside the shapes grammar rflow-tiny was trained on (see `rflow eval`); "
                             "expect a poor picture")
        self.text_encoders.warn_if_truncated(prompts, self.max_sequence_length)

    @torch.no_grad()
    def encode_image(self, image, width: int, height: int) -> Tensor:
        """An image (PIL, path, or (1|B, 3, H, W) tensor in [0, 1]) -> normalised latent."""
        if isinstance(image, (str, os.PathLike)):
            path = image
            try:
                with Image.open(path) as im:
                    im.load()
                    image = im.convert("RGB")
            except (OSError, ValueError, SyntaxError) as e:
                raise UserError(f"{path}: cannot read image ({' '.join(str(e).split()) or type(e).__name__})") from None
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
    def decode(self, latent: Tensor, output_type: str = "pil"):
        img = self.vae.decode(latent.to(self.vae.dtype)).float()
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


def _resolve(path: Path, text_encoders, vae) -> tuple[Path, Path, Path, Schedule | None]:
    """(transformer path, VAE path, text-encoder dir, schedule from scheduler config if any)."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    schedule = None
    if path.is_dir() and (path / "model_index.json").exists():
        root, transformer = path, path / "transformer"
        if not transformer.is_dir():
            raise UserError(f"{path}: diffusers folder without a transformer/ component")
    else:
        transformer = path
        root = path.parent  # the folder a single file or a transformer/ folder lives in
    sched_cfg = root / "scheduler" / "scheduler_config.json"
    if sched_cfg.exists():
        schedule = Schedule.from_diffusers(read_json(sched_cfg))
    if vae is None:
        for cand in (root / "vae", root / "ae.safetensors"):
            if cand.exists():
                vae = cand
                break
        else:
            raise UserError(f"no VAE found next to {path}: give one with {flag('vae', 'PATH')} "
                            "(ae.safetensors or a diffusers vae/ folder)")
    te = find_text_encoders(text_encoders, root)
    if te is None:
        where = text_encoders or root
        raise UserError(f"no text encoders in {where}: give {flag('text_encoders', 'DIR')}, a folder holding "
                        "text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/")
    return transformer, Path(vae), te, schedule


def load(
    path: str | os.PathLike | None = None,
    *,
    text_encoders: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> Pipeline:
    """Load a FLUX.1-family pipeline.

    ``path``: a diffusers pipeline folder (``model_index.json``), a diffusers ``transformer/`` folder,
    or a single transformer file (BFL ``flux1-dev.safetensors``, ComfyUI prefixes). The VAE and text
    encoders are found next to it (``ae.safetensors`` or ``vae/``; ``text_encoder/`` … ``tokenizer_2/``)
    unless ``vae`` / ``text_encoders`` point elsewhere. ``device`` defaults to CUDA when available,
    ``dtype`` to bfloat16 on CUDA and float32 on CPU.
    """
    from .checkpoints.fit import check_parts_fit
    from .options import device as check_device
    from .paths import resolve_model

    dev = check_device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    dtype = dtype or default_dtype(dev)
    p = resolve_model(path)
    if (p / MANIFEST).exists():
        return load_rflow_pipeline(p, device=dev, dtype=dtype)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    with FluxCheckpoint(p / "transformer" if (p / "model_index.json").exists() else p) as ck:
        config = ck.config  # validates the transformer before looking for its companions
    transformer_path, vae_path, te_path, schedule = _resolve(p, text_encoders, vae)
    vae_model = load_vae(vae_path, device=dev, dtype=dtype)
    te = load_text_encoders(te_path, device=dev, dtype=dtype)
    check_parts_fit(config, vae_model, te, where=str(p))
    model, info = load_flux(transformer_path, device=dev, dtype=dtype)
    with FluxCheckpoint(transformer_path) as ck:
        fingerprint, model_hash = ck.fingerprint(), ck.model_hash()
    if schedule is None:
        schedule = Schedule("flux") if info.config.guidance_embed else Schedule("none")
    return Pipeline(model, vae_model, te, schedule, name=info.family, fingerprint=fingerprint, model_hash=model_hash)


PIPELINE_FORMAT_VERSION = 1


def _portable_across_transformers(folder: Path) -> None:
    """Make a folder written by ``save_pretrained`` load the same under transformers 4 and 5.

    transformers 5 writes CLIPTextModel weights without their ``text_model.`` prefix and names a
    tokenizer.json-only tokenizer's class ``TokenizersBackend``; transformers 4 reads neither (it would
    leave CLIP randomly initialised). The Hub layout (prefixed keys, ``PreTrainedTokenizerFast``) loads
    identically under both."""
    import json

    from safetensors.torch import load_file, save_file

    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.exists():
        c = json.loads(tok_cfg.read_text())
        c["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_cfg.write_text(json.dumps(c, indent=2))
    cfg = folder / "config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("model_type") == "clip_text_model":
        w = folder / "model.safetensors"
        sd = load_file(w)
        if not all(k.startswith("text_model.") for k in sd):
            save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}, w,
                      metadata={"format": "pt"})


def save_pipeline(pipe: Pipeline, path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                  extra: dict | None = None) -> Path:
    """Write ``pipe`` as an rflow pipeline folder (``rflow_pipeline.json`` + ``transformer.safetensors``
    with BFL keys + text encoders in the diffusers layout), replacing ``path`` atomically."""
    import json

    from .checkpoints.flux import CONFIG_METADATA_KEY
    from .checkpoints.io import save_safetensors
    from .outputs import replacing

    if not hasattr(pipe.vae, "to_config"):
        raise UserError("only pipelines with a parameter-free codec can be saved as rflow pipeline folders")
    cfg = pipe.transformer.config
    sd = {k: v.detach().to("cpu", dtype) for k, v in pipe.transformer.state_dict().items()}
    with replacing(path, "dir") as tmp:
        save_safetensors(sd, tmp / "transformer.safetensors",
                         {CONFIG_METADATA_KEY: json.dumps({"axes_dim": list(cfg.axes_dim), "theta": cfg.theta})})
        te = pipe.text_encoders
        for sub, obj in (("text_encoder", te.clip), ("tokenizer", te.clip_tokenizer), ("text_encoder_2", te.t5),
                         ("tokenizer_2", te.t5_tokenizer)):
            obj.save_pretrained(tmp / sub)
            _portable_across_transformers(tmp / sub)
        manifest = {
            "format": "rflow-pipeline", "version": PIPELINE_FORMAT_VERSION, "name": pipe.name,
            "codec": pipe.vae.to_config(), "schedule": {"kind": pipe.schedule.kind, "shift": pipe.schedule.shift},
            "default_size": list(pipe.default_size), "max_sequence_length": pipe.max_sequence_length,
            "family": pipe.family, "prediction": pipe.denoiser_options.get("prediction", "velocity"), **({"grammar": pipe.grammar} if pipe.grammar else {}), **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Path(path)


def load_rflow_pipeline(path: Path, *, device: torch.device, dtype: torch.dtype) -> Pipeline:
    from .models.codec import PixelUnshuffleCodec

    m = read_json(path / MANIFEST)
    if not isinstance(m, dict) or m.get("format") != "rflow-pipeline" or not isinstance(m.get("version"), int):
        raise UserError(f"{path / MANIFEST}: not an rflow pipeline manifest")
    if m["version"] > PIPELINE_FORMAT_VERSION:
        raise UserError(f"{path}: pipeline format version {m['version']} is newer than this rflow reads ({PIPELINE_FORMAT_VERSION})")
    from .checkpoints.fit import check_parts_fit

    try:
        codec = PixelUnshuffleCodec.from_config(m.get("codec", {})).to(device)
        sched = m.get("schedule", {})
        schedule = Schedule(str(sched.get("kind", "flux")), sched.get("shift"))
        w, h = (int(v) for v in m.get("default_size", (1024, 1024)))
        max_len = int(m.get("max_sequence_length", 512))
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path / MANIFEST}: corrupt pipeline manifest ({e})") from None
    prediction = _prediction(m.get("prediction", "velocity"))
    family = str(m.get("family", "flux1"))
    if family != "flux1":
        raise UserError(f"{path / MANIFEST}: rflow pipeline folders hold FLUX.1-shaped models, not {family!r}")
    grammar = m.get("grammar", "shapes" if str(m.get("name", "")).startswith("rflow-tiny") else None)
    with FluxCheckpoint(path / "transformer.safetensors") as ck:
        config = ck.config
    te = load_text_encoders(path, device=device, dtype=dtype)
    check_parts_fit(config, codec, te, where=str(path))
    model, info = load_flux(path / "transformer.safetensors", device=device, dtype=dtype)
    with FluxCheckpoint(path / "transformer.safetensors") as ck:
        fingerprint, model_hash = ck.fingerprint(), ck.model_hash()
    return Pipeline(model, codec, te, schedule, default_size=(w, h), name=str(m.get("name", "rflow")),
                    max_sequence_length=max_len, fingerprint=fingerprint, model_hash=model_hash,
                    grammar=grammar, family=family,
                    denoiser_options={} if prediction == "velocity" else {"prediction": prediction})


def _prediction(kind: str) -> str:
    if kind not in ("velocity", "data"):
        raise UserError(f"unknown model prediction type {kind!r} (velocity or data)")
    return kind


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    try:
        return table[name.lower()]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; choose from fp32, bf16, fp16") from None
