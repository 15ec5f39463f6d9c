"""The FLUX.1 (and SD-style) KL autoencoder, with module names equal to BFL ``ae.safetensors`` keys.

Images are NCHW in [-1, 1]. :meth:`AutoEncoder.encode` returns the *normalised* latent the transformer
sees, ``(mean - shift_factor) * scaling_factor``; :meth:`AutoEncoder.decode` undoes that normalisation
before running the decoder. The spatial reduction is ``downscale_factor = 2 ** (len(ch_mult) - 1)``
(8 for FLUX.1; tiny test VAEs have fewer levels).

Layout (BFL names)::

    encoder.conv_in, encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut},
    encoder.down.{i}.downsample.conv, encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out,
    decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{j}.*, decoder.up.{i}.upsample.conv,
    decoder.norm_out, decoder.conv_out, [quant_conv], [post_quant_conv]

``decoder.up`` is indexed by resolution level (``up[0]`` is the full-resolution level) and run from the
last level to the first, as in BFL's code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError


@dataclass
class VAEConfig:
    """Shape and latent normalisation of a KL autoencoder. The defaults are FLUX.1's ``ae.safetensors``."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    norm_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_attention: bool = True  # diffusers' ``mid_block_add_attention``

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)

    @property
    def widths(self) -> list[int]:
        """Channel width of each resolution level, full resolution first."""
        return [self.ch * m for m in self.ch_mult]

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        """Raise :class:`UserError` for a config no model can be built from."""
        ints = (self.in_channels, self.out_channels, self.ch, self.num_res_blocks, self.z_channels, self.norm_groups)
        if min(ints) < 1 or not self.ch_mult or min(self.ch_mult) < 1:
            raise UserError(f"invalid VAE config: all sizes must be positive ({self})")
        bad = [w for w in self.widths if w % self.norm_groups]
        if bad:
            raise UserError(
                f"invalid VAE config: channel width {bad[0]} is not divisible by norm_groups={self.norm_groups}"
            )
        if not self.scaling_factor:
            raise UserError("invalid VAE config: scaling_factor must be non-zero")


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1-conv projections, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (b, c, h, w) -> (b, 1, h*w, c); SDPA's default scale is 1/sqrt(c).
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else None
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Level(nn.Module):
    """One resolution level: ``block`` (resnets) then an optional ``downsample``/``upsample``."""

    def __init__(self, cin: int, cout: int, n_blocks: int, groups: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n_blocks))
        self.downsample = Downsample(cout) if resample == "down" else None
        self.upsample = Upsample(cout) if resample == "up" else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w, g, n = cfg.widths, cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(cfg.ch if i == 0 else w[i - 1], w[i], cfg.num_res_blocks, g, "down" if i < n - 1 else None)
            for i in range(n)
        )
        self.mid = MidBlock(w[-1], g, cfg.mid_attention)
        self.norm_out = _norm(w[-1], g)
        self.conv_out = nn.Conv2d(w[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w, g, n = cfg.widths, cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.z_channels, w[-1], 3, padding=1)
        self.mid = MidBlock(w[-1], g, cfg.mid_attention)
        # up[i] works at level i; it is entered from level i+1 (or from the mid block for the last level).
        self.up = nn.ModuleList(
            Level(w[min(i + 1, n - 1)], w[i], cfg.num_res_blocks + 1, g, "up" if i > 0 else None) for i in range(n)
        )
        self.norm_out = _norm(w[0], g)
        self.conv_out = nn.Conv2d(w[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """KL autoencoder: ``encode`` images in [-1, 1] to normalised latents, ``decode`` them back.

    Inputs are cast to the model's parameter dtype; outputs come back in that dtype.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        z = config.z_channels
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if config.use_post_quant_conv else None
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.shift_factor)

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent position along each side: ``2 ** (len(ch_mult) - 1)``."""
        return self.config.downscale_factor

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images ``(B, C, H, W)`` in [-1, 1] -> normalised latents ``(B, z, H/f, W/f)``.

        Returns ``(mean - shift_factor) * scaling_factor`` of the posterior; with ``sample=True`` a draw
        ``mean + std * eps`` replaces the mean.
        """
        f = self.downscale_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise UserError(f"VAE encode expects images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise UserError(f"VAE encode: image size {x.shape[3]}x{x.shape[2]} is not a multiple of {f}")
        moments = self.encoder(x.to(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + std * eps
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents ``(B, z, h, w)`` -> images ``(B, C, h*f, w*f)``, nominally in [-1, 1] (not clamped)."""
        if z.ndim != 4 or z.shape[1] != self.config.z_channels:
            raise UserError(f"VAE decode expects latents (B, {self.config.z_channels}, h, w), got {tuple(z.shape)}")
        z = z.to(self.dtype) / self.scaling_factor + self.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
