"""The FLUX.1 transformer (dev, schnell, Flex.1-alpha and pruned variants) in one small module.

Module attribute names equal the Black Forest Labs checkpoint keys, so a BFL state dict loads as is
and other layouts are mapped in :mod:`rflow.checkpoints.flux`. Every block carries its own MLP width
(``FluxConfig.double_mlp`` / ``single_mlp``): a structurally pruned checkpoint is just a checkpoint
whose widths differ per block.

Time convention (all of rflow): ``t`` = sigma in [0, 1], 1 is noise; the model predicts the velocity
``v = noise - x0``. Hookable points for analysis: ``double_blocks[i].img_mlp[1]`` /
``txt_mlp[1]`` (post-GELU MLP activations) and ``single_blocks[i].mlp_act``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sdpa import sdpa


class BlockLayout:
    """What FLUX.1 and FLUX.2 configs share: heads over ``hidden_size``, double blocks as (img, txt) MLP
    width pairs (``double_mlp``), single blocks as widths (``single_mlp``), RoPE ``axes_dim``."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def depth(self) -> int:
        return len(self.double_mlp)

    @property
    def depth_single(self) -> int:
        return len(self.single_mlp)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        d["double_mlp"] = [list(p) for p in self.double_mlp]
        return d

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class FluxConfig(BlockLayout):
    hidden_size: int = 3072
    num_heads: int = 24
    in_channels: int = 64
    out_channels: int = 64
    context_in_dim: int = 4096
    vec_in_dim: int = 768
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True
    time_dim: int = 256
    # Per-block MLP hidden widths: double blocks as (img, txt) pairs, single blocks as ints.
    double_mlp: list[tuple[int, int]] = field(default_factory=lambda: [(12288, 12288)] * 19)
    single_mlp: list[int] = field(default_factory=lambda: [12288] * 38)

    def __post_init__(self):
        self.axes_dim = tuple(int(a) for a in self.axes_dim)
        self.double_mlp = [tuple(int(w) for w in p) for p in self.double_mlp]
        self.single_mlp = [int(w) for w in self.single_mlp]
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"RoPE axes {self.axes_dim} must sum to the head dim {self.head_dim}")


    @classmethod
    def flux1_dev(cls) -> "FluxConfig":
        return cls()

    @classmethod
    def flux1_schnell(cls) -> "FluxConfig":
        return cls(guidance_embed=False)


# ----------------------------------------------------------------------------------------------
# Embeddings


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of ``t * time_factor`` as [cos, sin] halves, computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * time_factor)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices (…, L, dim/2, 2, 2) for positions ``pos`` (…, L), built in float64."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = pos.to(torch.float64)[..., None] * omega
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.view(*out.shape[:-1], 2, 2).float()


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` (B, H, L, D) by ``freqs`` (B, 1, L, D/2, 2, 2)."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


class EmbedND(nn.Module):
    """RoPE over several position axes (FLUX: 3 axes — index, row, column)."""

    def __init__(self, axes_dim: tuple[int, ...], theta: int):
        super().__init__()
        self.axes_dim = axes_dim
        self.theta = theta

    def forward(self, ids: Tensor) -> Tensor:
        emb = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


# ----------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return y.to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Joint attention over (B, H, L, D) with RoPE; returns (B, L, H*D)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = sdpa(q, k, v)
    return x.transpose(1, 2).flatten(2)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) -> three (B, H, L, D)."""
    B, L, _ = qkv.shape
    q, k, v = qkv.view(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


class SelfAttention(nn.Module):
    """Holds the projections of one stream of a double block (the attention itself is joint)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """adaLN: ``lin(silu(vec))`` split into (shift, scale, gate) once or twice."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _mlp(dim: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, width), nn.GELU(approximate="tanh"), nn.Linear(width, dim))


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, img_mlp: int, txt_mlp: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.img_mod = Modulation(dim, double=True)
        self.img_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.img_mlp = _mlp(dim, img_mlp)
        self.txt_mod = Modulation(dim, double=True)
        self.txt_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.txt_mlp = _mlp(dim, txt_mlp)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)

        iq, ik, iv = split_heads(self.img_attn.qkv((1 + i_scale1) * _layer_norm(img) + i_shift1), self.num_heads)
        iq, ik = self.img_attn.norm(iq, ik, iv)
        tq, tk, tv = split_heads(self.txt_attn.qkv((1 + t_scale1) * _layer_norm(txt) + t_shift1), self.num_heads)
        tq, tk = self.txt_attn.norm(tq, tk, tv)

        attn = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp((1 + i_scale2) * _layer_norm(img) + i_shift2)
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp((1 + t_scale2) * _layer_norm(txt) + t_shift2)
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP: ``linear1`` makes qkv and the MLP input, ``linear2`` merges both."""

    def __init__(self, dim: int, num_heads: int, mlp_width: int):
        super().__init__()
        self.hidden_size = dim
        self.num_heads = num_heads
        self.mlp_width = mlp_width
        self.linear1 = nn.Linear(dim, dim * 3 + mlp_width)
        self.linear2 = nn.Linear(dim + mlp_width, dim)
        self.norm = QKNorm(dim // num_heads)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * _layer_norm(x) + shift), [3 * self.hidden_size, self.mlp_width], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat([attention(q, k, v, pe), self.mlp_act(mlp)], dim=2))
        x = x + gate * out
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * _layer_norm(x) + shift[:, None, :])


# ----------------------------------------------------------------------------------------------
# The model


class Flux(nn.Module):
    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = c = config
        self.pe_embedder = EmbedND(c.axes_dim, c.theta)
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(c.time_dim, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        self.guidance_in = MLPEmbedder(c.time_dim, c.hidden_size) if c.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(c.hidden_size, c.num_heads, wi, wt, c.qkv_bias) for wi, wt in c.double_mlp
        )
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c.hidden_size, c.num_heads, w) for w in c.single_mlp)
        self.final_layer = LastLayer(c.hidden_size, c.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Velocity for packed image tokens ``img`` (B, L, C·4) at sigma ``timesteps`` (B,).

        ``txt`` (B, S, context_in_dim) is the T5 sequence, ``y`` (B, vec_in_dim) the pooled CLIP
        vector, ``img_ids``/``txt_ids`` (B or 1, L, 3) the RoPE positions, ``guidance`` (B,) the
        distilled-guidance scale (ignored by models without a guidance embedder).
        """
        dtype = self.dtype
        img = self.img_in(img.to(dtype))
        vec = self.time_in(timestep_embedding(timesteps, self.config.time_dim).to(dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this model has a guidance embedder: pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance, self.config.time_dim).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))

        ids = torch.cat([txt_ids.expand(img.shape[0], -1, -1), img_ids.expand(img.shape[0], -1, -1)], dim=1)
        pe = self.pe_embedder(ids)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)


# ----------------------------------------------------------------------------------------------
# Latent packing helpers (2×2 patches), shared by pipelines, training and analysis


def pack(latent: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, C·4) with channel order (c, ph, pw)."""
    B, C, H, W = latent.shape
    return latent.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack` for a latent of (height, width)."""
    B, _, D = tokens.shape
    C = D // 4
    return tokens.view(B, height // 2, width // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, height, width)


def image_ids(height: int, width: int, device=None) -> Tensor:
    """RoPE positions (1, H/2·W/2, 3) for a latent of (height, width): (0, row, col)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(1, -1, 3)


def text_ids(length: int, device=None) -> Tensor:
    return torch.zeros(1, length, 3, device=device)
