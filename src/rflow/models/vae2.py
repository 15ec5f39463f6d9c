"""The FLUX.2 autoencoder (32 latent channels) and its latent codec, module names equal to BFL ``ae.safetensors`` keys.

The network is FLUX.1's KL autoencoder (resnets, one single-head attention in each mid block) with the
1x1 quant convs moved inside encoder and decoder, plus fixed batch-norm statistics of the 2x2-patchified
latent. Layout (BFL names)::

    encoder.{conv_in, down.{i}.block.{j}.*, down.{i}.downsample.conv, mid.{block_1,attn_1,block_2}, norm_out,
             conv_out, quant_conv}
    decoder.{post_quant_conv, conv_in, mid.*, up.{i}.block.{j}.*, up.{i}.upsample.conv, norm_out, conv_out}
    bn.running_mean, bn.running_var            (4 * z_channels entries each: the patchified latent)

:class:`Flux2Codec` is that model and the latent codec rflow's samplers use. Its latent is what diffusers'
``Flux2KleinPipeline`` hands the transformer (and the layout of its ``latents`` argument): ``encode`` takes
images (B, 3, H, W) in [-1, 1] to the posterior mean (B, 32, H/8, W/8), patchifies 2x2 to (B, 128, H/16, W/16)
(channel ``c * 4 + 2 * di + dj``, as ``pixel_unshuffle``) and normalises with the batch-norm statistics,
``(z - running_mean) / sqrt(running_var + eps)``; ``decode`` runs that backwards. ``downscale_factor`` is 16
for FLUX.2 (``2 ** levels`` in general: a tiny 2-level test VAE has 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from . import vae as v1

PATCH = 2  # the pipeline's fixed 2x2 patchify


@dataclass
class Flux2VAEConfig:
    """Shape of a FLUX.2 autoencoder; the defaults are BFL's ``ae.safetensors`` (diffusers ``AutoencoderKLFlux2``)."""

    in_channels: int = 3
    out_channels: int = 3
    widths: tuple[int, ...] = (128, 256, 512, 512)  # encoder level widths, full resolution first
    decoder_widths: tuple[int, ...] | None = None  # decoder level widths (diffusers' decoder_block_out_channels)
    num_res_blocks: int = 2  # encoder resnets per level; the decoder has one more
    z_channels: int = 32
    norm_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_attention: bool = True
    batch_norm_eps: float = 1e-4

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.decoder_widths is not None:
            self.decoder_widths = tuple(int(w) for w in self.decoder_widths)
            if self.decoder_widths == self.widths:
                self.decoder_widths = None

    @property
    def dec_widths(self) -> tuple[int, ...]:
        return self.decoder_widths or self.widths

    @property
    def vae_factor(self) -> int:
        """Pixels per cell of the raw (unpatchified) latent."""
        return 2 ** (len(self.widths) - 1)

    @property
    def downscale_factor(self) -> int:
        """Pixels per cell of the codec's (patchified) latent."""
        return PATCH * self.vae_factor

    @property
    def latent_channels(self) -> int:
        return PATCH * PATCH * self.z_channels

    def _part(self, widths: tuple[int, ...]) -> v1.VAEConfig:
        return v1.VAEConfig(
            in_channels=self.in_channels, out_channels=self.out_channels, ch=widths[0],
            ch_mult=tuple(w // widths[0] for w in widths), num_res_blocks=self.num_res_blocks,
            z_channels=self.z_channels, norm_groups=self.norm_groups, mid_attention=self.mid_attention,
        )

    def validate(self) -> None:
        """Raise :class:`UserError` for a config no model can be built from."""
        for name, ws in (("widths", self.widths), ("decoder_widths", self.dec_widths)):
            if not ws or min(ws) < 1:
                raise UserError(f"invalid FLUX.2 VAE config: {name} {list(ws)} must be positive")
            if any(w % ws[0] for w in ws):
                raise UserError(f"unsupported FLUX.2 VAE: {name} {list(ws)} are not multiples of the first")
        if len(self.dec_widths) != len(self.widths):
            raise UserError(f"unsupported FLUX.2 VAE: {len(self.widths)} encoder levels but "
                            f"{len(self.dec_widths)} decoder levels")
        if not self.batch_norm_eps >= 0:
            raise UserError(f"invalid FLUX.2 VAE config: batch_norm_eps {self.batch_norm_eps} must be >= 0")
        self._part(self.widths).validate()
        self._part(self.dec_widths).validate()


class AttnBlock(v1.AttnBlock):
    """FLUX.1's mid-block attention (same parameters) with contiguous q, k, v for a fused SDPA kernel.

    The 1x1 convs are applied as linears to the (B, HW, C) token view, whose outputs are contiguous."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x).flatten(2).transpose(1, 2)  # (b, hw, c)
        q, k, v = (F.linear(y, p.weight.flatten(1), p.bias).unsqueeze(1) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # one head of width c; scale 1/sqrt(c)
        y = F.linear(y, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + y.transpose(1, 2).reshape(b, c, h, w)


def _fused_attention(mid: v1.MidBlock, width: int, groups: int) -> None:
    if mid.attn_1 is not None:
        mid.attn_1 = AttnBlock(width, groups)


class Encoder(v1.Encoder):
    """Images -> posterior moments (B, 2z, H/f, W/f), ``quant_conv`` included."""

    def __init__(self, cfg: Flux2VAEConfig):
        super().__init__(cfg._part(cfg.widths))
        _fused_attention(self.mid, cfg.widths[-1], cfg.norm_groups)
        z2 = 2 * cfg.z_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1) if cfg.use_quant_conv else None

    def forward(self, x: Tensor) -> Tensor:
        h = super().forward(x)
        return h if self.quant_conv is None else self.quant_conv(h)


class Decoder(v1.Decoder):
    """Raw latents (B, z, h, w) -> images, ``post_quant_conv`` included."""

    def __init__(self, cfg: Flux2VAEConfig):
        super().__init__(cfg._part(cfg.dec_widths))
        _fused_attention(self.mid, cfg.dec_widths[-1], cfg.norm_groups)
        z = cfg.z_channels
        self.post_quant_conv = nn.Conv2d(z, z, 1) if cfg.use_post_quant_conv else None

    def forward(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return super().forward(z)


class LatentNorm(nn.Module):
    """Fixed per-channel statistics of the patchified latent (BFL's eval-mode ``BatchNorm2d``, no affine)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = float(eps)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(self.running_var.view(1, -1, 1, 1) + self.eps).to(like.device, like.dtype)
        return mean, std

    def normalize(self, z: Tensor) -> Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        mean, std = self._stats(z)
        return z * std + mean


def patchify(z: Tensor) -> Tensor:
    """(B, C, 2h, 2w) -> (B, 4C, h, w), channel ``c * 4 + 2 * di + dj`` (the pipeline's ``_patchify_latents``)."""
    return F.pixel_unshuffle(z, PATCH)


def unpatchify(z: Tensor) -> Tensor:
    """Inverse of :func:`patchify`."""
    return F.pixel_shuffle(z, PATCH)


class Flux2Codec(nn.Module):
    """The FLUX.2 autoencoder as rflow's latent codec (see the module docstring for the latent).

    Inputs are cast to the model's dtype; outputs come back in it. ``encode``/``decode`` work on the
    transformer's latent; ``moments``/``decode_raw`` on the VAE's own 32-channel latent.
    """

    def __init__(self, config: Flux2VAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.bn = LatentNorm(config.latent_channels, config.batch_norm_eps)

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent cell along each side (16 for FLUX.2)."""
        return self.config.downscale_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def moments(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> posterior (mean, logvar) stacked on channels, (B, 2z, H/8, W/8)."""
        f = self.downscale_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise UserError(f"VAE encode expects images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise UserError(f"VAE encode: image size {x.shape[3]}x{x.shape[2]} is not a multiple of {f}")
        return self.encoder(x.to(self.dtype))

    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> normalised patchified latents (B, 4z, H/16, W/16).

        The posterior mean (the pipeline's ``argmax``); ``sample=True`` draws ``mean + std * eps`` instead,
        ``eps`` made on ``generator``'s device as diffusers' ``randn_tensor`` does."""
        mean, logvar = self.moments(x).chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            where = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, device=where, dtype=mean.dtype).to(mean.device)
            z = mean + std * eps
        return self.bn.normalize(patchify(z))

    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw VAE latents (B, z, h, w) -> images (B, C, 8h, 8w)."""
        if z.ndim != 4 or z.shape[1] != self.config.z_channels:
            raise UserError(f"VAE decode expects raw latents (B, {self.config.z_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z.to(self.dtype))

    def decode(self, z: Tensor) -> Tensor:
        """Normalised patchified latents (B, 4z, h, w) -> images (B, C, 16h, 16w), nominally in [-1, 1] (unclamped)."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise UserError(f"VAE decode expects latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(unpatchify(self.bn.denormalize(z.to(self.dtype))))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
