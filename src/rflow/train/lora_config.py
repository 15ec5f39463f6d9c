"""The settings of a LoRA run (:class:`LoRAConfig`, checked before anything is loaded) and its timestep sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from .preserve import parse_preserve

TIMESTEPS = ("uniform", "logit-normal", "shift")


@dataclass
class LoRAConfig:
    steps: int = 1000
    rank: int = 16
    alpha: float | None = None  # None: the rank (scale 1)
    targets: str = "attn,mlp"
    lr: float = 1e-4
    batch: int = 1
    grad_accum: int = 1
    warmup: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    caption_dropout: float = 0.05
    timestep: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float | str = 3.0  # a factor, or "auto": the model's resolution-dependent shift
    guidance: float | None = None  # None: 1.0 for a model with a guidance embedder
    resolution: int = 512
    x0_weight_floor: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 250
    ema: float = 0.0  # EMA decay of the adapters (0: none)
    preserve: str = ""  # output preservation: "word=stand-in|stand-in,..." (see .preserve); "" for none
    preserve_weight: float = 1.0
    masked_loss: bool = False  # weigh the loss by each image's mask (rflow.train.data: masks/ folder or alpha)
    mask_floor: float = 0.1  # the weight of unmasked pixels (before each image's weights are scaled to mean 1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        p = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    def check(self) -> None:
        if self.timestep not in TIMESTEPS:
            raise UserError(f"--timestep {self.timestep!r}: choose one of {', '.join(TIMESTEPS)}")
        if self.rank < 1 or self.steps < 1 or self.batch < 1 or self.grad_accum < 1 or self.checkpoint_every < 1:
            raise UserError("--rank, --steps, --batch, --grad-accum and --checkpoint-every must be at least 1")
        if not 0 <= self.caption_dropout <= 1:
            raise UserError(f"--caption-dropout {self.caption_dropout} must be in [0, 1]")
        if not 0 < self.lr <= 1:
            raise UserError(f"--lr {self.lr} must be in (0, 1]")
        if self.alpha is not None and not self.alpha > 0:
            raise UserError(f"--alpha {self.alpha} must be positive")
        if self.shift != "auto" and (isinstance(self.shift, str) or not 0 < self.shift < math.inf):
            raise UserError(f"--shift {self.shift!r}: a positive number, or auto (the model's resolution shift)")
        if not self.logit_std > 0:
            raise UserError("the logit-normal std must be positive")
        if not 0 <= self.ema < 1:
            raise UserError(f"--ema {self.ema}: an EMA decay in [0, 1) (0: no EMA), e.g. 0.99")
        if not 0 < self.x0_weight_floor <= 1:
            raise UserError(f"--x0-weight-floor {self.x0_weight_floor}: a number in (0, 1]")
        if not 0 < self.preserve_weight < math.inf:
            raise UserError(f"--preserve-weight {self.preserve_weight}: a positive number")
        if not 0 <= self.mask_floor <= 1:
            raise UserError(f"--mask-floor {self.mask_floor}: a weight in [0, 1]")
        parse_preserve(self.preserve)


def sample_t(cfg: LoRAConfig, n: int, g: torch.Generator, auto_shift: float = 1.0) -> torch.Tensor:
    """``n`` training timesteps; ``auto_shift``: the factor ``cfg.shift == "auto"`` stands for."""
    if cfg.timestep == "uniform":
        return torch.rand(n, generator=g)
    if cfg.timestep == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=g) * cfg.logit_std + cfg.logit_mean)
    u = torch.rand(n, generator=g)
    s = auto_shift if cfg.shift == "auto" else float(cfg.shift)
    return s * u / (1 + (s - 1) * u)
