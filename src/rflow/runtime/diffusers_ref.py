"""diffusers' transformer of a family with rflow's weights, for ``rflow bench --compare diffusers``.

The diffusers model (``FluxTransformer2DModel``, ``Flux2Transformer2DModel``, ``ZImageTransformer2DModel``)
is built on the meta device from the same config and given rflow's tensors: the family's key plan
(diffusers -> rflow, :func:`rflow.families.flux1.diffusers_plan` and its siblings) is run backwards —
a tensor fused from several diffusers tensors (q, k, v) is split into row views, a tensor taken as it
is is shared, and the (shift, scale) halves FLUX keeps swapped are swapped back. So both models hold
the same numbers and, apart from the final norm's small swapped copy, the same memory.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch
from torch import Tensor, nn

from ..checkpoints.plan import cat, one, swap_halves
from ..errors import UserError

CLASSES = {"flux1": "FluxTransformer2DModel", "flux2": "Flux2Transformer2DModel", "zimage": "ZImageTransformer2DModel"}


def check_available() -> None:
    if importlib.util.find_spec("diffusers") is None:
        raise UserError("--compare diffusers needs diffusers installed (pip install diffusers)")


def _uniform(widths: list[int], what: str, want: int) -> None:
    if any(w != want for w in widths):
        raise UserError(f"diffusers' model has one MLP width ({want}); this model's {what} widths differ "
                        f"({sorted(set(widths))}): a pruned model cannot be compared with diffusers")


def diffusers_kwargs(fam: ModuleType, c) -> dict:
    """The diffusers constructor arguments for rflow config ``c``; a UserError for what diffusers'
    class cannot express (per-block MLP widths, FLUX.1 without qkv biases, other timestep widths)."""
    if fam.NAME == "flux1":
        _uniform([w for p in c.double_mlp for w in p] + c.single_mlp, "MLP", 4 * c.hidden_size)
        if not c.qkv_bias or c.time_dim != 256 or c.theta != 10_000:
            raise UserError("diffusers' FluxTransformer2DModel needs qkv biases, 256 timestep channels and RoPE theta 10000")
        return dict(patch_size=1, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.depth,
                    num_single_layers=c.depth_single, attention_head_dim=c.head_dim, num_attention_heads=c.num_heads,
                    joint_attention_dim=c.context_in_dim, pooled_projection_dim=c.vec_in_dim,
                    guidance_embeds=c.guidance_embed, axes_dims_rope=tuple(c.axes_dim))
    if fam.NAME == "flux2":
        widths = [w for p in c.double_mlp for w in p] + c.single_mlp
        _uniform(widths, "MLP", widths[0] if widths else 0)
        ratio = widths[0] / c.hidden_size if widths else 3.0
        if widths and int(c.hidden_size * ratio) != widths[0]:
            raise UserError(f"diffusers' Flux2Transformer2DModel cannot express MLP width {widths[0]}")
        return dict(patch_size=1, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.depth,
                    num_single_layers=c.depth_single, attention_head_dim=c.head_dim, num_attention_heads=c.num_heads,
                    joint_attention_dim=c.context_in_dim, timestep_guidance_channels=c.time_dim, mlp_ratio=ratio,
                    axes_dims_rope=tuple(c.axes_dim), rope_theta=c.theta, eps=1e-6, guidance_embeds=c.guidance_embed)
    if fam.NAME == "zimage":
        from ..models.zimage import default_mlp_width

        _uniform(c.layers_mlp + c.noise_refiner_mlp + c.context_refiner_mlp, "feed-forward", default_mlp_width(c.dim))
        if len(c.noise_refiner_mlp) != len(c.context_refiner_mlp):
            raise UserError("diffusers' ZImageTransformer2DModel has as many noise as context refiner layers")
        if c.adaln_dim != min(c.dim, 256) or c.t_mid_dim != 1024 or c.t_freq_dim != 256 or c.seq_multiple != 32:
            raise UserError("diffusers' ZImageTransformer2DModel fixes the timestep widths and the 32-token padding")
        return dict(all_patch_size=(c.patch_size,), all_f_patch_size=(1,), in_channels=c.in_channels, dim=c.dim,
                    n_layers=c.n_layers, n_refiner_layers=len(c.noise_refiner_mlp), n_heads=c.n_heads,
                    n_kv_heads=c.n_heads, norm_eps=c.norm_eps, qk_norm=c.qk_norm, cap_feat_dim=c.cap_feat_dim,
                    rope_theta=c.rope_theta, t_scale=c.t_scale, axes_dims=list(c.axes_dims), axes_lens=[1536, 512, 512])
    raise UserError(f"--compare diffusers does not know the {fam.TITLE} family")


def to_diffusers_state_dict(fam: ModuleType, ours: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> dict:
    """rflow's state dict under diffusers' names (``shapes``: diffusers' tensors and their shapes),
    through the family's diffusers key plan run backwards."""
    plan = fam.diffusers_plan(list(shapes))
    out: dict[str, Tensor] = {}
    for dst, (srcs, combine) in plan.items():
        if dst not in ours:
            raise UserError(f"diffusers' model needs {dst!r}, which this rflow model does not have")
        t = ours[dst]
        if combine is one:
            out[srcs[0]] = t
        elif combine is swap_halves:  # its own inverse
            out[srcs[0]] = swap_halves([t])
        elif combine is cat:
            rows = [shapes[s][0] for s in srcs]
            if sum(rows) != t.shape[0]:
                raise UserError(f"{dst} has {t.shape[0]} rows, diffusers' parts {rows}")
            out.update(zip(srcs, t.split(rows)))
        else:  # pragma: no cover - the diffusers plans use only these three
            raise UserError(f"cannot map {dst} back to diffusers ({combine!r})")
    return out


def build(fam: ModuleType, model: nn.Module) -> nn.Module:
    """diffusers' model for rflow's ``model``, holding the same tensors (see the module docstring)."""
    check_available()
    import diffusers

    kwargs = diffusers_kwargs(fam, model.config)
    with torch.device("meta"):
        ref = getattr(diffusers, CLASSES[fam.NAME])(**kwargs)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    sd = to_diffusers_state_dict(fam, model.state_dict(), shapes)
    ref.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in (*ref.named_parameters(), *ref.named_buffers()) if t.is_meta]
    if left:
        raise UserError(f"diffusers' {CLASSES[fam.NAME]} has tensors rflow cannot give ({left[0]})")
    return ref.eval().requires_grad_(False)


def step(fam: ModuleType, ref: nn.Module, args: tuple):
    """A callable running diffusers' model on rflow's step arguments (``StepInputs.args``); its result
    is shaped as rflow's model output."""
    if fam.NAME == "flux1":
        img, iids, txt, tids, t, vec, gd = args
        dt = img.dtype
        kw = dict(hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec, timestep=t.to(dt),
                  img_ids=iids[0], txt_ids=tids[0], guidance=None if gd is None else gd.to(dt), return_dict=False)
        return lambda: ref(**kw)[0]
    if fam.NAME == "flux2":
        img, iids, txt, tids, t, gd = args
        B = img.shape[0]
        kw = dict(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_ids=iids.expand(B, -1, -1),
                  txt_ids=tids.expand(B, -1, -1), guidance=gd, return_dict=False)
        return lambda: ref(**kw)[0]
    x, t, caps = args
    frames = [xi.unsqueeze(1) for xi in x.unbind(0)]  # diffusers' latents carry a frame axis
    return lambda: torch.stack([o.squeeze(1) for o in ref(frames, t, caps, return_dict=False)[0]])


def agreement(ours: Tensor, theirs: Tensor) -> dict:
    """How close two outputs are: max |a − b|, the largest |b|, and ‖a − b‖ / ‖b‖ (float64)."""
    a, b = ours.double(), theirs.double()
    if a.shape != b.shape:
        raise UserError(f"rflow's output {tuple(a.shape)} and diffusers' {tuple(b.shape)} differ in shape")
    d = a - b
    return {"max_abs_diff": float(d.abs().max()), "ref_max_abs": float(b.abs().max()),
            "rel_err": float(d.norm() / b.norm().clamp_min(1e-300))}
