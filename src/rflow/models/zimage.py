"""The Z-Image transformer (Z-Image-Turbo, Z-Image base and pruned variants) in one small module.

A single-stream DiT ("S3-DiT"): image patches and Qwen3 caption features are first refined on their
own (``noise_refiner``: modulated by the timestep; ``context_refiner``: unmodulated), then joined as
``[image, caption]`` and run through ``layers``. Every block uses sandwich RMSNorm (before and after
attention and feed-forward), tanh-gated adaLN scales, fused q/k/v with per-head RMSNorm, 3-axis RoPE
(caption index, row, column) and a SwiGLU feed-forward with separate ``w1``/``w2``/``w3``. Each
sequence is padded to a multiple of ``seq_multiple`` tokens with a learned pad token.

Module attribute names equal the original single-file checkpoint keys (``z_image_turbo_bf16.safetensors``,
the Lumina2-style "NextDiT" names ComfyUI loads: ``x_embedder``, ``final_layer``,
``layers.{i}.attention.qkv`` / ``.out`` / ``.q_norm`` / ``.k_norm``); diffusers' layout is mapped in
:mod:`rflow.families.zimage`. Each block carries its own MLP width, so a pruned checkpoint is just one
whose widths differ per block.

Convention: :meth:`ZImage.forward` is Z-Image's own — exactly what diffusers'
``ZImageTransformer2DModel`` returns for the same inputs: ``t`` = 1 − sigma (1 is data), and the
output is the negated velocity (x0 − noise). The pipeline's denoiser converts. The SwiGLU hidden
activation of every block is the output of ``….feed_forward.act`` (hookable, parameter-free).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from .sdpa import sdpa


def default_mlp_width(dim: int) -> int:
    return int(dim / 3 * 8)


@dataclass
class ZImageConfig:
    dim: int = 3840
    n_heads: int = 30
    in_channels: int = 16
    patch_size: int = 2
    cap_feat_dim: int = 2560
    adaln_dim: int = 256  # width of the timestep embedding that modulates (min(dim, 256) in Z-Image)
    t_mid_dim: int = 1024  # hidden width of the timestep MLP
    t_freq_dim: int = 256  # sinusoidal timestep features
    qk_norm: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    seq_multiple: int = 32  # every sequence (caption, image) is padded to a multiple of this
    # Per-block SwiGLU hidden widths.
    layers_mlp: list[int] = field(default_factory=lambda: [10240] * 30)
    noise_refiner_mlp: list[int] = field(default_factory=lambda: [10240] * 2)
    context_refiner_mlp: list[int] = field(default_factory=lambda: [10240] * 2)

    def __post_init__(self):
        self.axes_dims = tuple(int(a) for a in self.axes_dims)
        for name in ("layers_mlp", "noise_refiner_mlp", "context_refiner_mlp"):
            setattr(self, name, [int(w) for w in getattr(self, name)])
        if self.n_heads < 1 or self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if sum(self.axes_dims) != self.head_dim or any(a % 2 for a in self.axes_dims):
            raise ValueError(f"RoPE axes {self.axes_dims} must be even and sum to the head dim {self.head_dim}")
        if len(self.axes_dims) != 3:
            raise ValueError(f"Z-Image uses 3 RoPE axes, got {self.axes_dims}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_layers(self) -> int:
        return len(self.layers_mlp)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dims"] = list(self.axes_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ZImageConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------
# Pieces


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of ``t`` (already scaled by ``t_scale``) as [cos, sin] halves, in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    def __init__(self, freq_dim: int, mid_dim: int, out_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, mid_dim), nn.SiLU(), nn.Linear(mid_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(self.weight.dtype) * self.weight


def rope(pos: Tensor, axes_dims: tuple[int, ...], theta: float) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (…, L, 1, head_dim/2), for integer positions ``pos`` (…, L, 3); angles in float64."""
    angles = []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)
        angles.append((pos[..., i].to(torch.float64)[..., None] * freqs).float())
    a = torch.cat(angles, dim=-1).unsqueeze(-2)
    return torch.cos(a), torch.sin(a)


def apply_rope(x: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` (B, L, H, D) (complex multiplication, as Z-Image)."""
    cos, sin = pe
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        head_dim = dim // n_heads
        # diffusers (the reference) uses eps 1e-5 here whatever norm_eps is
        self.q_norm = RMSNorm(head_dim, 1e-5) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, 1e-5) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None, pe: tuple[Tensor, Tensor]) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).unbind(2)  # (B, L, H, D) each
        q, k = apply_rope(self.q_norm(q), pe), apply_rope(self.k_norm(k), pe)
        q, k = q.to(v.dtype), k.to(v.dtype)
        o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.out(o.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """silu(a)·b: the hidden activation of a feed-forward, its own module so that it can be hooked."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return F.silu(a) * b


class FeedForward(nn.Module):
    """``w2(silu(w1·x) · w3·x)``. ``w1`` and ``w3`` read the same input: :func:`rflow.runtime.fusion.fuse_projections_`
    may replace them by one linear ``w13`` (their rows stacked), which :meth:`forward` then uses."""

    FUSABLE = {"w13": ("w1", "w3")}

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.act = SwiGLU()

    def forward(self, x: Tensor) -> Tensor:
        if "w13" in self._modules:
            a, b = self._modules["w13"](x).chunk(2, dim=-1)
            return self.w2(self.act(a, b))
        return self.w2(self.act(self.w1(x), self.w3(x)))


class Block(nn.Module):
    """Sandwich-normed attention + SwiGLU; with ``modulation``, adaLN scales (1 + s) and tanh gates."""

    def __init__(self, c: ZImageConfig, mlp_width: int, modulation: bool):
        super().__init__()
        self.attention = Attention(c.dim, c.n_heads, c.qk_norm)
        self.feed_forward = FeedForward(c.dim, mlp_width)
        self.attention_norm1 = RMSNorm(c.dim, c.norm_eps)
        self.ffn_norm1 = RMSNorm(c.dim, c.norm_eps)
        self.attention_norm2 = RMSNorm(c.dim, c.norm_eps)
        self.ffn_norm2 = RMSNorm(c.dim, c.norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(c.adaln_dim, 4 * c.dim))

    def forward(self, x: Tensor, mask: Tensor | None, pe: tuple[Tensor, Tensor], adaln: Tensor | None = None) -> Tensor:
        if self.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
            scale_msa, scale_mlp, gate_msa, gate_mlp = 1.0 + scale_msa, 1.0 + scale_mlp, gate_msa.tanh(), gate_mlp.tanh()
            x = x + gate_msa * self.attention_norm2(self.attention(self.attention_norm1(x) * scale_msa, mask, pe))
            return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))
        x = x + self.attention_norm2(self.attention(self.attention_norm1(x), mask, pe))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, adaln_dim: int, out: int):
        super().__init__()
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(self, x: Tensor, adaln: Tensor) -> Tensor:
        scale = 1.0 + self.adaLN_modulation(adaln)
        return self.linear(F.layer_norm(x, x.shape[-1:], eps=1e-6) * scale.unsqueeze(1))


def _batch(seqs: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Variable-length (L_i, …) sequences as one zero-padded batch, with a key mask (B, 1, 1, L) when
    the lengths differ (None when they are all equal)."""
    lens = [len(s) for s in seqs]
    x = pad_sequence(seqs, batch_first=True)
    if min(lens) == max(lens):
        return x, None
    keep = torch.arange(x.shape[1], device=x.device)[None] < torch.tensor(lens, device=x.device)[:, None]
    return x, keep[:, None, None, :]


# ----------------------------------------------------------------------------------------------
# The model


class ZImage(nn.Module):
    def __init__(self, config: ZImageConfig):
        super().__init__()
        self.config = c = config
        p2c = c.patch_size**2 * c.in_channels
        self.x_embedder = nn.Linear(p2c, c.dim)
        self.cap_embedder = nn.Sequential(RMSNorm(c.cap_feat_dim, c.norm_eps), nn.Linear(c.cap_feat_dim, c.dim))
        self.t_embedder = TimestepEmbedder(c.t_freq_dim, c.t_mid_dim, c.adaln_dim)
        self.x_pad_token = nn.Parameter(torch.zeros(1, c.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, c.dim))
        self.noise_refiner = nn.ModuleList(Block(c, w, modulation=True) for w in c.noise_refiner_mlp)
        self.context_refiner = nn.ModuleList(Block(c, w, modulation=False) for w in c.context_refiner_mlp)
        self.layers = nn.ModuleList(Block(c, w, modulation=True) for w in c.layers_mlp)
        self.final_layer = FinalLayer(c.dim, c.adaln_dim, p2c)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def _pe(self, pos: list[Tensor]) -> tuple[Tensor, Tensor]:
        return rope(pad_sequence(pos, batch_first=True), self.config.axes_dims, self.config.rope_theta)

    def _pad(self, tokens: Tensor, token: nn.Parameter) -> Tensor:
        n = (-len(tokens)) % self.config.seq_multiple
        return torch.cat([tokens, token.to(tokens.dtype).expand(n, -1)]) if n else tokens

    def forward(self, x: Tensor | list[Tensor], t: Tensor | float, cap_feats: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        """Z-Image's raw output (diffusers' ``ZImageTransformer2DModel`` output, same convention).

        ``x``: latents (B, C, H, W), or a list of (C, H, W) latents of any sizes (multiples of the patch
        size); ``t``: the timestep diffusers' transformer receives, 1 − sigma, (B,) or a scalar;
        ``cap_feats``: per-sample caption features (L_i, cap_feat_dim) with padding removed (a list of
        any lengths, or a (B, L, cap_feat_dim) tensor). Returns the same form as ``x``.
        """
        c, dtype, p = self.config, self.dtype, self.config.patch_size
        images = list(x.unbind(0)) if isinstance(x, Tensor) else list(x)
        caps = list(cap_feats.unbind(0)) if isinstance(cap_feats, Tensor) else list(cap_feats)
        B, dev = len(images), images[0].device
        if len(caps) != B:
            raise ValueError(f"{B} images but {len(caps)} captions")
        t = torch.as_tensor(t, device=dev)
        t = (t if t.is_floating_point() else t.float()).reshape(-1).expand(B)
        adaln = self.t_embedder(t * c.t_scale).to(dtype)

        patches, grids, x_pos, cap_pos = [], [], [], []
        for img, cap in zip(images, caps):
            C, H, W = img.shape
            if C != c.in_channels or H % p or W % p:
                raise ValueError(f"latent {tuple(img.shape)}: expected {c.in_channels} channels and sides divisible by {p}")
            h, w = H // p, W // p
            patches.append(img.reshape(C, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * C))
            grids.append((h, w))
            n_cap = len(cap) + (-len(cap)) % c.seq_multiple
            cap_pos.append(F.pad(torch.arange(1, n_cap + 1, device=dev)[:, None], (0, 2)))
            rows, cols = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
            img_pos = torch.stack([torch.full_like(rows, n_cap + 1), rows, cols], dim=-1).reshape(h * w, 3)
            x_pos.append(F.pad(img_pos, (0, 0, 0, (-(h * w)) % c.seq_multiple)))  # pad tokens sit at (0, 0, 0)

        # image tokens, refined under the timestep
        n_img = [len(q) for q in patches]
        emb = self.x_embedder(torch.cat(patches).to(dtype)).split(n_img)
        img_seqs = [self._pad(e, self.x_pad_token) for e in emb]
        xb, mask = _batch(img_seqs)
        pe = self._pe(x_pos)
        for block in self.noise_refiner:
            xb = block(xb, mask, pe, adaln)

        # caption tokens, refined on their own
        cap_emb = self.cap_embedder(torch.cat(caps).to(dtype)).split([len(q) for q in caps])
        cap_seqs = [self._pad(e, self.cap_pad_token) for e in cap_emb]
        cb, mask = _batch(cap_seqs)
        pe = self._pe(cap_pos)
        for block in self.context_refiner:
            cb = block(cb, mask, pe)

        # joint [image, caption] sequence
        joint = [torch.cat([xb[i, : len(img_seqs[i])], cb[i, : len(cap_seqs[i])]]) for i in range(B)]
        ub, mask = _batch(joint)
        pe = self._pe([torch.cat([x_pos[i], cap_pos[i]]) for i in range(B)])
        for block in self.layers:
            ub = block(ub, mask, pe, adaln)

        out = self.final_layer(ub[:, : max(n_img)], adaln)
        results = []
        for i, (h, w) in enumerate(grids):
            o = out[i, : h * w].view(h, w, p, p, c.out_channels).permute(4, 0, 2, 1, 3)
            results.append(o.reshape(c.out_channels, h * p, w * p))
        return torch.stack(results) if isinstance(x, Tensor) else results
