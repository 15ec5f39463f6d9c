"""The FLUX.2 transformer (klein 4B / 9B, distilled and base, FLUX.2-dev, pruned variants) in one module.

Module attribute names equal the Black Forest Labs ``flux2`` checkpoint keys, so a BFL state dict
loads as is; other layouts are mapped in :mod:`rflow.families.flux2`. Against FLUX.1: no biases
anywhere, SwiGLU MLPs whose in-projection is one fused linear (gate rows, then up rows), adaLN
modulations computed once per forward from the time embedding and shared by every block
(``double_stream_modulation_img/_txt``, ``single_stream_modulation``), no pooled text vector, 4-axis
RoPE (time, row, column, text index) with theta 2000. Every block carries its own MLP width
(``Flux2Config.double_mlp`` / ``single_mlp``), so a structurally pruned checkpoint is just one whose
widths differ per block.

Time convention (all of rflow): ``timesteps`` = sigma in [0, 1], 1 is noise; the model predicts the
velocity ``v = noise - x0``. As BFL and diffusers, the sinusoidal embedding sees ``1000 * sigma`` (and
``1000 * guidance``). Hookable SwiGLU activations: ``double_blocks[i].img_mlp[1]`` / ``txt_mlp[1]`` and
``single_blocks[i].mlp_act``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .flux import BlockLayout, EmbedND, QKNorm, attention, split_heads, timestep_embedding


@dataclass
class Flux2Config(BlockLayout):
    """Defaults are FLUX.2-klein-4B (``rflow.families.flux2.KLEIN_4B``)."""

    hidden_size: int = 3072
    num_heads: int = 24
    in_channels: int = 128
    out_channels: int = 128
    context_in_dim: int = 7680
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: float = 2000
    guidance_embed: bool = False
    time_dim: int = 256
    # Per-block SwiGLU hidden widths (units; the fused in-projection has twice as many rows):
    # double blocks as (img, txt) pairs, single blocks as ints.
    double_mlp: list[tuple[int, int]] = field(default_factory=lambda: [(9216, 9216)] * 5)
    single_mlp: list[int] = field(default_factory=lambda: [9216] * 20)

    def __post_init__(self):
        self.axes_dim = tuple(int(a) for a in self.axes_dim)
        self.double_mlp = [tuple(int(w) for w in p) for p in self.double_mlp]
        self.single_mlp = [int(w) for w in self.single_mlp]
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(f"RoPE axes {self.axes_dim} must be even and sum to the head dim {self.head_dim}")
        widths = [w for p in self.double_mlp for w in p] + self.single_mlp
        if any(len(p) != 2 for p in self.double_mlp) or min(widths, default=1) < 1:
            raise ValueError("MLP widths must be positive, (img, txt) pairs for double blocks")



# ----------------------------------------------------------------------------------------------
# Layers (RoPE, RMSNorm/QKNorm, attention and the sinusoidal embedding are FLUX.1's, unchanged)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=False)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class SwiGLU(nn.Module):
    """silu(gate) · up for a fused input whose last axis is [gate (W), up (W)]; output (..., W)."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class Modulation(nn.Module):
    """adaLN: ``lin(silu(vec))`` as (shift, scale, gate) once (single) or twice (double), each (B, 1, D)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=False)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


class SelfAttention(nn.Module):
    """The projections of one stream of a double block (the attention itself is joint)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _mlp(dim: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * width, bias=False), SwiGLU(), nn.Linear(width, dim, bias=False))


def _fp16_clip(x: Tensor) -> Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, img_mlp: int, txt_mlp: int):
        super().__init__()
        self.num_heads = num_heads
        self.img_attn = SelfAttention(dim, num_heads)
        self.img_mlp = _mlp(dim, img_mlp)
        self.txt_attn = SelfAttention(dim, num_heads)
        self.txt_mlp = _mlp(dim, txt_mlp)

    def forward(self, img: Tensor, txt: Tensor, pe: Tensor, mod_img, mod_txt) -> tuple[Tensor, Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = mod_img
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = mod_txt

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
        return img, _fp16_clip(txt)


class SingleStreamBlock(nn.Module):
    """Parallel attention + SwiGLU MLP: ``linear1`` makes q, k, v and the MLP's [gate, up] input,
    ``linear2`` takes [attention output, MLP hidden]. The split follows ``linear1``'s weight shape, so
    slicing the weights (pruning) is all it takes to change the width."""

    def __init__(self, dim: int, num_heads: int, mlp_width: int):
        super().__init__()
        self.hidden_size = dim
        self.num_heads = num_heads
        self.linear1 = nn.Linear(dim, dim * 3 + 2 * mlp_width, bias=False)
        self.linear2 = nn.Linear(dim + mlp_width, dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.mlp_act = SwiGLU()

    @property
    def mlp_width(self) -> int:
        return (self.linear1.weight.shape[0] - 3 * self.hidden_size) // 2

    def forward(self, x: Tensor, pe: Tensor, mod) -> Tensor:
        shift, scale, gate = mod
        h = self.linear1((1 + scale) * _layer_norm(x) + shift)
        qkv, mlp = h.split([3 * self.hidden_size, h.shape[-1] - 3 * self.hidden_size], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat([attention(q, k, v, pe), self.mlp_act(mlp)], dim=2))
        return _fp16_clip(x + gate * out)


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * _layer_norm(x) + shift)


# ----------------------------------------------------------------------------------------------
# The model


class Flux2(nn.Module):
    def __init__(self, config: Flux2Config):
        super().__init__()
        self.config = c = config
        self.pe_embedder = EmbedND(c.axes_dim, c.theta)
        self.img_in = nn.Linear(c.in_channels, c.hidden_size, bias=False)
        self.time_in = MLPEmbedder(c.time_dim, c.hidden_size)
        if c.guidance_embed:
            self.guidance_in = MLPEmbedder(c.time_dim, c.hidden_size)
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size, bias=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c.hidden_size, c.num_heads, wi, wt) for wi, wt in c.double_mlp)
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c.hidden_size, c.num_heads, w) for w in c.single_mlp)
        self.double_stream_modulation_img = Modulation(c.hidden_size, double=True)
        self.double_stream_modulation_txt = Modulation(c.hidden_size, double=True)
        self.single_stream_modulation = Modulation(c.hidden_size, double=False)
        self.final_layer = LastLayer(c.hidden_size, c.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        """Velocity for packed image tokens ``img`` (B, L, in_channels) at sigma ``timesteps`` (B,).

        ``txt`` (B, S, context_in_dim) is the text-encoder sequence, ``img_ids`` / ``txt_ids`` (B or 1,
        L, 4) the RoPE positions (:func:`image_ids`, :func:`reference_ids`, :func:`text_ids`);
        reference-image tokens are simply more image tokens (their output rows are returned too).
        ``guidance`` (B,) is the distilled-guidance scale, required by models with a guidance embedder
        (FLUX.2-dev) and ignored by the others (klein).
        """
        dtype, c = self.dtype, self.config
        vec = self.time_in(timestep_embedding(timesteps, c.time_dim).to(dtype))
        if c.guidance_embed:
            if guidance is None:
                raise ValueError("this model has a guidance embedder: pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance, c.time_dim).to(dtype))
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)

        img = self.img_in(img.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        B = img.shape[0]
        pe = self.pe_embedder(torch.cat([txt_ids.expand(B, -1, -1), img_ids.expand(B, -1, -1)], dim=1))
        for block in self.double_blocks:
            img, txt = block(img, txt, pe, mod_img, mod_txt)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, pe, mod_single)
        return self.final_layer(x[:, txt.shape[1] :], vec)


# ----------------------------------------------------------------------------------------------
# Tokens and positions, as diffusers' Flux2KleinPipeline builds them. FLUX.2's latent is already
# patchified, (B, 128, H/16, W/16): one token per latent cell, its channels in order.


def pack(latent: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h·w, C), row-major over the grid."""
    B, C, h, w = latent.shape
    return latent.reshape(B, C, h * w).transpose(1, 2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack` for a (height, width) token grid: (B, height·width, C) -> (B, C, height, width)."""
    B, L, C = tokens.shape
    return tokens.transpose(1, 2).reshape(B, C, height, width)


def image_ids(height: int, width: int, t: int = 0, device=None) -> Tensor:
    """RoPE positions (1, height·width, 4) of a token grid: (t, row, column, 0)."""
    ids = torch.zeros(height, width, 4, device=device)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(height, device=device)[:, None]
    ids[..., 2] = torch.arange(width, device=device)[None, :]
    return ids.reshape(1, -1, 4)


def reference_ids(sizes: list[tuple[int, int]], scale: int = 10, device=None) -> Tensor:
    """Positions (1, Σ h·w, 4) of reference-image token grids ``sizes`` [(h, w), ...], in order: the
    i-th sits at time ``scale + scale·i`` (diffusers ``_prepare_image_ids``)."""
    if not sizes:
        return torch.zeros(1, 0, 4, device=device)
    return torch.cat([image_ids(h, w, scale + scale * i, device) for i, (h, w) in enumerate(sizes)], dim=1)


def text_ids(length: int, device=None) -> Tensor:
    """Positions (1, length, 4) of text tokens: (0, 0, 0, token index)."""
    ids = torch.zeros(1, length, 4, device=device)
    ids[..., 3] = torch.arange(length, device=device)
    return ids
