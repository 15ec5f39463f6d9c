"""The models ``rflow bench`` times: published-size configs with random weights, their tiny scale-downs,
or a checkpoint; the step inputs of each family.

Random weights are built without a host copy: the model is constructed on the meta device, cast there,
materialised with ``to_empty`` on the target device and initialised in place from a seeded generator
on that device (``host=True`` keeps the tensors on the host, for offloading, with the same numbers:
each tensor is drawn on the device and copied over). The init has the scale of a trained model —
weights N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), biases N(0, 0.1²) — so activations stay O(1) and a
wrong key mapping shows up in the comparison with diffusers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import Tensor, nn

from ..errors import UserError

SCALES = ("full", "tiny")
# --config name -> (family, published config); "tiny" is FLUX.1-dev at --scale tiny
CONFIG_NAMES = ("flux1-dev", "flux1-schnell", "flux2-klein-4b", "flux2-klein-9b", "flux2-dev", "zimage", "tiny")
# the step counts each model is usually sampled with (FluxPipeline's default for dev, the distilled
# models' 4, Flux2Pipeline's 50 for FLUX.2-dev, 8 transformer passes for Z-Image-Turbo)
DEFAULT_STEPS = {"flux1-dev": 28, "flux1-schnell": 4, "flux2-klein-4b": 4, "flux2-klein-9b": 4, "flux2-dev": 50,
                 "zimage": 8, "tiny": 4}
TINY_TEXT_TOKENS = 32


def published(name: str):
    """(family module, config) of a ``--config`` name (before any scale-down)."""
    from ..families import flux1, flux2, zimage
    from ..models.flux import FluxConfig

    table = {"flux1-dev": (flux1, FluxConfig.flux1_dev), "tiny": (flux1, FluxConfig.flux1_dev),
             "flux1-schnell": (flux1, FluxConfig.flux1_schnell),
             "flux2-klein-4b": (flux2, lambda: flux2.KLEIN_4B), "flux2-klein-9b": (flux2, lambda: flux2.KLEIN_9B),
             "flux2-dev": (flux2, lambda: flux2.DEV), "zimage": (zimage, lambda: zimage.Z_IMAGE)}
    if name not in table:
        raise UserError(f"unknown --config {name!r}; choose {', '.join(CONFIG_NAMES)}")
    fam, make = table[name]
    return fam, dataclasses.replace(make())  # a copy: the published configs are shared objects


def scaled(fam: ModuleType, config, scale: str):
    """``config`` at ``scale``: "full" as it is; "tiny" keeps the family's layout (channels, RoPE
    split, guidance embedder, MLP ratio) at width 128, 4 heads, 2 + 2 blocks (Z-Image: 2 layers and one
    refiner of each kind), so the same code runs on a CPU in seconds."""
    if scale == "full":
        return config
    if scale != "tiny":
        raise UserError(f"unknown --scale {scale!r}; choose {', '.join(SCALES)}")
    width, heads = 128, 4
    if fam.NAME == "flux1":
        from ..families.flux1 import default_axes_dim
        from ..models.flux import FluxConfig

        return FluxConfig(hidden_size=width, num_heads=heads, in_channels=config.in_channels,
                          out_channels=config.out_channels, context_in_dim=64, vec_in_dim=32,
                          axes_dim=default_axes_dim(width // heads), guidance_embed=config.guidance_embed,
                          double_mlp=[(4 * width, 4 * width)] * 2, single_mlp=[4 * width] * 2)
    if fam.NAME == "flux2":
        from ..families.flux2_keys import default_axes_dim
        from ..models.flux2 import Flux2Config

        return Flux2Config(hidden_size=width, num_heads=heads, in_channels=config.in_channels,
                           out_channels=config.out_channels, context_in_dim=96,
                           axes_dim=default_axes_dim(width // heads), theta=config.theta,
                           guidance_embed=config.guidance_embed, double_mlp=[(3 * width, 3 * width)] * 2,
                           single_mlp=[3 * width] * 2)
    from ..families.zimage_keys import default_axes_dims
    from ..models.zimage import ZImageConfig, default_mlp_width

    w = default_mlp_width(width)
    return ZImageConfig(dim=width, n_heads=heads, in_channels=config.in_channels, patch_size=config.patch_size,
                        cap_feat_dim=64, adaln_dim=min(width, 256), axes_dims=default_axes_dims(width // heads),
                        layers_mlp=[w] * 2, noise_refiner_mlp=[w], context_refiner_mlp=[w])


# ---------------------------------------------------------------------------------------------- random weights


def _draw_(t: Tensor, name: str, g: torch.Generator) -> None:
    if t.ndim >= 2:
        t.normal_(0.0, (t[0].numel()) ** -0.5, generator=g)
    elif name.endswith("bias"):
        t.normal_(0.0, 0.1, generator=g)
    else:  # norm scales
        t.normal_(0.0, 0.1, generator=g).add_(1.0)


@torch.no_grad()
def materialize_(model: nn.Module, device: torch.device, seed: int, *, host: bool = False) -> nn.Module:
    """Give a meta-device ``model`` storage on ``device`` (or on the host with ``host=True``) and a
    seeded random init drawn on ``device``; buffers get their neutral values (running variances 1,
    everything else 0)."""
    model.to_empty(device="cpu" if host else device)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if host:
            tmp = torch.empty(p.shape, dtype=p.dtype, device=device)
            _draw_(tmp, name, g)
            p.copy_(tmp)
        else:
            _draw_(p, name, g)
    for name, b in model.named_buffers():
        b.fill_(1.0 if name.endswith("running_var") else 0.0)
    return model.eval().requires_grad_(False)


def build_random(fam: ModuleType, config, device: torch.device, dtype: torch.dtype, seed: int,
                 *, host: bool = False) -> nn.Module:
    """The family's transformer for ``config`` with random weights (see the module docstring)."""
    with torch.device("meta"):
        model = fam.build(config).to(dtype)
    return materialize_(model, device, seed, host=host)


def random_codec(fam: ModuleType, scale: str, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random VAE of the family's shape: the FLUX.1 autoencoder (FLUX.1, Z-Image) or the FLUX.2 one;
    at tiny scale 32 channels and one resnet per level, with the same downscale factor and latent."""
    if fam.NAME == "flux2":
        from ..models.vae2 import Flux2Codec, Flux2VAEConfig

        cfg = Flux2VAEConfig() if scale == "full" else Flux2VAEConfig(widths=(32, 32, 32, 32), num_res_blocks=1)
        build = lambda: Flux2Codec(cfg)  # noqa: E731
    else:
        from ..models.vae import AutoEncoder, VAEConfig

        cfg = VAEConfig() if scale == "full" else VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
        build = lambda: AutoEncoder(cfg)  # noqa: E731
    with torch.device("meta"):
        codec = build().to(dtype)
    return materialize_(codec, device, seed)


def param_bytes(fam: ModuleType, config, dtype: torch.dtype) -> tuple[int, int]:
    """(parameters, bytes in ``dtype``) of the family's model for ``config``, counted on the meta device."""
    with torch.device("meta"):
        model = fam.build(config)
    n = sum(p.numel() for p in model.parameters())
    return n, n * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------- a checkpoint


@dataclass
class Loaded:
    family: ModuleType
    model: nn.Module
    codec: nn.Module | None
    name: str
    denoiser_options: dict = field(default_factory=dict)
    text_tokens: int | None = None


def load_checkpoint(path: str, device: torch.device, dtype: torch.dtype) -> Loaded:
    """A transformer (and its VAE when one sits next to it) from any layout ``rflow.load`` reads; text
    encoders are not loaded (the bench feeds random conditioning). An rflow pipeline folder
    (rflow-tiny) loads whole, as it is small."""
    from ..checkpoints.gguf_file import is_gguf
    from ..checkpoints.loader import Checkpoint, load_transformer
    from ..loading import _has_quant_metadata, _layout, load
    from ..paths import MANIFEST, model_name, resolve_model

    p = resolve_model(path)
    if (p / MANIFEST).exists():
        pipe = load(p, device=device, dtype=dtype)
        return Loaded(pipe.family_module, pipe.transformer, pipe.vae, model_name(path), dict(pipe.denoiser_options),
                      pipe.max_sequence_length)
    transformer_path, root = _layout(p)
    with Checkpoint(transformer_path) as ck:
        fam = ck.family
    plan = None
    if transformer_path.is_file() and (is_gguf(transformer_path) or _has_quant_metadata(transformer_path)):
        from ..quant.load import keep_quantized_plan

        plan = keep_quantized_plan(transformer_path, device=device, dtype=dtype)
    model, info = load_transformer(transformer_path, device=device, dtype=dtype, plan=plan)
    codec_path = fam.find_codec(root)
    codec = fam.load_codec(codec_path, device=device, dtype=dtype) if codec_path is not None else None
    if codec is not None:
        fam.check_parts_fit(model.config, codec, None, where=str(p))
    return Loaded(fam, model, codec, info.family)


# ---------------------------------------------------------------------------------------------- step inputs


@dataclass
class StepInputs:
    """One transformer call's arguments (``args``), the conditioning of the family's denoiser (``cond``)
    and the latent they stand for."""

    args: tuple
    cond: object
    latent_shape: tuple[int, ...]
    image_tokens: int
    text_tokens: int


def codec_factor(fam: ModuleType, codec: nn.Module | None) -> int:
    if codec is not None:
        return int(codec.downscale_factor)
    return 16 if fam.NAME == "flux2" else 8


def step_inputs(fam: ModuleType, model: nn.Module, latent_shape: tuple[int, ...], text_tokens: int,
                device: torch.device, seed: int) -> StepInputs:
    """Random inputs of one step at sigma 0.5: the latent's tokens, ``text_tokens`` random text
    embeddings (and FLUX.1's pooled vector), guidance where the model embeds it."""
    c, dt = model.config, model.dtype
    g = torch.Generator(device=device).manual_seed(seed)
    B, _, h, w = latent_shape
    latent = torch.randn(latent_shape, generator=g, device=device).to(dt)
    t = torch.full((B,), 0.5, device=device)
    n_img = fam.image_seq_len(latent_shape)
    if fam.NAME == "flux1":
        from ..models.flux import image_ids, pack, text_ids

        txt = torch.randn(B, text_tokens, c.context_in_dim, generator=g, device=device).to(dt)
        vec = torch.randn(B, c.vec_in_dim, generator=g, device=device).to(dt)
        gd = torch.full((B,), fam.DEFAULT_GUIDANCE, device=device) if c.guidance_embed else None
        args = (pack(latent), image_ids(h, w, device), txt, text_ids(text_tokens, device), t, vec, gd)
        cond = fam.Cond(txt, vec, fam.DEFAULT_GUIDANCE)
    elif fam.NAME == "flux2":
        from ..models.flux2 import image_ids, pack, text_ids

        txt = torch.randn(B, text_tokens, c.context_in_dim, generator=g, device=device).to(dt)
        tids = text_ids(text_tokens, device)
        gd = torch.full((B,), fam.DEFAULT_GUIDANCE, device=device) if c.guidance_embed else None
        args = (pack(latent), image_ids(h, w, device=device), txt, tids, t, gd)
        cond = fam.Cond(txt, tids, guidance=fam.DEFAULT_GUIDANCE if c.guidance_embed else None)
    elif fam.NAME == "zimage":
        caps = list(torch.randn(B, text_tokens, c.cap_feat_dim, generator=g, device=device).to(dt).unbind(0))
        args = (latent, t, caps)
        cond = fam.Cond(caps)
    else:  # pragma: no cover - every family is listed above
        raise UserError(f"rflow bench does not know the {fam.TITLE} family's inputs")
    return StepInputs(args, cond, tuple(latent_shape), n_img, text_tokens)

