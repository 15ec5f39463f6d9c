"""A parameter-free latent codec: pixel-unshuffle by ``factor``, exactly invertible.

It stands where a VAE stands (``encode``/``decode``/``downscale_factor``/``latent_channels``) for
models trained directly on pixels, like rflow-tiny: a 64×64 RGB image becomes a 48×16×16 latent at
factor 4. Pixels in [−1, 1] are the latent values, shifted and scaled like a VAE's latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError


class PixelUnshuffleCodec(nn.Module):
    kind = "pixel_unshuffle"

    def __init__(self, factor: int = 4, channels: int = 3, scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        if factor < 1:
            raise UserError(f"codec factor must be ≥ 1, got {factor}")
        self.factor, self.channels = int(factor), int(channels)
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries device and dtype

    @property
    def downscale_factor(self) -> int:
        return self.factor

    @property
    def latent_channels(self) -> int:
        return self.channels * self.factor**2

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def encode(self, x: Tensor) -> Tensor:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise UserError(f"image size {tuple(x.shape[-2:])} is not a multiple of {self.factor}")
        return (F.pixel_unshuffle(x, self.factor) - self.shift_factor) * self.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        return F.pixel_shuffle(z / self.scaling_factor + self.shift_factor, self.factor)

    def to_config(self) -> dict:
        return {"type": self.kind, "factor": self.factor, "channels": self.channels,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}

    @classmethod
    def from_config(cls, cfg: dict) -> "PixelUnshuffleCodec":
        if cfg.get("type") != cls.kind:
            raise UserError(f"unknown codec type {cfg.get('type')!r}")
        return cls(cfg.get("factor", 4), cfg.get("channels", 3), cfg.get("scaling_factor", 1.0), cfg.get("shift_factor", 0.0))
