"""What every model family gives the rest of rflow: latent spec, layer list, denoiser, CFG.

A family module (``flux1``, ``flux2``, ``zimage``) knows one transformer architecture: how to detect it
from checkpoint keys, map each checkpoint layout to its own (original) key names, infer its config from
shapes, build it on the meta device, and run it as a :data:`Denoiser` in rflow's one convention —
t (sigma) = 1 is noise, t = 0 is data, the velocity is v = noise − x0. Packing into tokens, position
ids, the family's own time direction and output sign, and x0 → v for data-predicting models all live
in the family's denoiser; solvers, training, capture and measure only see ``denoiser(x, sigma, cond)``.

Tools address layers through :class:`LayerRef` lists (qualified module names from the family), never by
parsing names: a LayerRef says where an MLP's hidden activation can be observed (a forward hook on
``act``) and which weight slices belong to each hidden unit (``slices``), which is all analyze,
capture, prune and sensitivity need.

Nothing here assumes an image: a latent may carry a frame axis (``LatentSpec.frames``) and a denoiser
may take a per-token sigma, which Wan2.2's image-to-video and expert switching need later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LatentSpec:
    """The latent the sampler works on (the layout of the diffusers pipeline's ``latents`` argument)."""

    channels: int  # channels of that latent
    spatial_factor: int  # image pixels per latent cell along each side
    size_multiple: int  # image sides must be multiples of this
    frames: int | None = None  # None for images; video latents add a frame axis after the channels

    def shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.spatial_factor
        frames = () if self.frames is None else (self.frames,)
        return (batch, self.channels, *frames, height // f, width // f)


@dataclass(frozen=True)
class Slice:
    """One weight slice that follows a hidden unit: ``param`` (qualified name), the ``axis`` whose
    entries are units, and where in that axis the unit block starts (``offset``): unit ``i`` is entry
    ``offset + i``. Entries outside ``[offset, offset + units)`` are kept as they are."""

    param: str
    axis: int
    offset: int = 0


@dataclass(frozen=True)
class LayerRef:
    """An MLP whose hidden units rflow counts, captures and prunes.

    ``name``: the unit group's name in statistics and captures (FLUX.1: ``double_blocks.3.img``);
    ``act``: qualified name of the module whose output is the hidden activation (B, L, units) —
    post-GELU, or the SwiGLU product silu(w1·x)·(w3·x); ``units``: its width; ``layer``: the index that
    ``--layers`` selects; ``stream``: what ``--streams`` selects; ``slices``: every weight slice of a
    unit, for pruning; ``width_attr``: (qualified module, attribute) holding the width where the forward
    pass needs it (a fused linear split by sizes), updated when pruning.
    """

    name: str
    kind: str  # "gelu" | "swiglu"
    act: str
    units: int
    layer: int
    stream: str
    slices: tuple[Slice, ...]
    width_attr: tuple[str, str] | None = None


Denoiser = Callable[[Tensor, Tensor, Any], Tensor]  # (x, sigma (B,) or scalar, cond) -> velocity


@dataclass
class Guidance:
    """How conditional and unconditional velocities combine: v = v_neg + cfg·(v_pos − v_neg).

    ``truncation``: past this share of the trajectory (1 − sigma ≥ truncation, as Z-Image's
    ``cfg_truncation``) CFG is off; ``renorm``: the guided velocity's norm per sample is capped at
    ``renorm`` × the conditional one (Z-Image's ``cfg_normalization``; 0 or None = off)."""

    cfg: float = 1.0
    truncation: float | None = None
    renorm: float | None = None

    def active(self, sigma: float) -> bool:
        if self.cfg <= 1.0:
            return False
        return self.truncation is None or (1.0 - sigma) <= self.truncation


def guided(denoiser: Denoiser, cond, neg, guidance: Guidance) -> Callable[[Tensor, Tensor], Tensor]:
    """A ``velocity(x, sigma)`` for the solvers: the denoiser under ``cond``, with true CFG against
    ``neg`` when ``guidance.cfg > 1`` (the two passes run one after the other, as in diffusers)."""

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        with torch.no_grad():
            v = denoiser(x, sigma, cond)
            if neg is None or not guidance.active(float(sigma)):
                return v
            v_neg = denoiser(x, sigma, neg)
            out = v_neg + guidance.cfg * (v - v_neg)
            if guidance.renorm:
                dims = tuple(range(1, v.ndim))
                n_pos = torch.linalg.vector_norm(v.float(), dim=dims, keepdim=True)
                n_out = torch.linalg.vector_norm(out.float(), dim=dims, keepdim=True)
                cap = n_pos * guidance.renorm
                out = torch.where(n_out > cap, out * (cap / n_out.clamp_min(1e-12)).to(out.dtype), out)
            return out

    return velocity


def data_to_velocity(x0: Tensor, x_t: Tensor, sigma: Tensor) -> Tensor:
    """v = (x_t − x0)/sigma for a model that predicts x0 (rflow-tiny). Sampling never evaluates at
    sigma = 0 (the last step's velocity is taken at the last nonzero sigma); the floor guards the division."""
    s = sigma.to(x0.dtype).clamp_min(1e-4).reshape(-1, *([1] * (x0.ndim - 1)))
    return (x_t.to(x0.dtype) - x0) / s


def sigma_vector(sigma: Tensor | float, batch: int, device) -> Tensor:
    """``sigma`` as a (batch,) float32 tensor on ``device``."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    return s.expand(batch).clone() if s.ndim == 0 else s.reshape(batch)


def cond_rows(cond) -> list:
    """A batched conditioning (a family's Cond dataclass) as one Cond per sample: tensors are split along
    their first axis, lists element by element; other fields (None, a float guidance) are shared."""
    import dataclasses

    values = {f.name: getattr(cond, f.name) for f in dataclasses.fields(cond)}
    n = next(len(v) for v in values.values() if isinstance(v, (Tensor, list)))

    def row(v, i):
        if isinstance(v, Tensor):
            return v[i : i + 1]
        if isinstance(v, list):
            return [v[i]]
        return v

    return [type(cond)(**{k: row(v, i) for k, v in values.items()}) for i in range(n)]


def cond_stack(rows: list):
    """The inverse of :func:`cond_rows`: one batched Cond from single-sample ones."""
    import dataclasses

    first = rows[0]
    out = {}
    for f in dataclasses.fields(first):
        v = getattr(first, f.name)
        if isinstance(v, Tensor):
            out[f.name] = torch.cat([getattr(r, f.name) for r in rows])
        elif isinstance(v, list):
            out[f.name] = [x for r in rows for x in getattr(r, f.name)]
        else:
            out[f.name] = v
    return type(first)(**out)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def block_names(model: nn.Module, containers: tuple[str, ...]) -> list[str]:
    """Qualified names of the repeated blocks held by the ``nn.ModuleList`` attributes ``containers``,
    listed in the order the forward pass runs them: what :mod:`rflow.runtime.offload` streams."""
    return [f"{c}.{i}" for c in containers for i in range(len(model.get_submodule(c)))]


class Family(Protocol):
    """The module-level names a family module defines (``rflow.families.flux1`` is the reference).

    Identity: ``NAME``, ``TITLE``, ``CONFIG_CLASS``, ``STREAMS``, ``UNQUANTIZED`` (linear layers kept in
    high precision). Checkpoints: ``detect(keys)``, ``plan(keys, layout, prefix)``,
    ``overrides(metadata, diffusers_config)``, ``infer_config(shapes, overrides, plan=, source_shapes=)``,
    ``config_metadata(config)``, ``build(config)``, ``family_name(config)``, ``summary(config)``.
    Layers: ``layers(model_or_config)``, ``n_layers(config)``, ``config_from_widths(model)``, ``blocks(model)``
    (qualified names of the repeated blocks in execution order, from ``BLOCK_LISTS``). Pipeline:
    ``DEFAULT_SIZE``, ``MAX_SEQUENCE_LENGTH``, ``DEFAULT_GUIDANCE`` (families with a guidance embedder),
    ``CODEC_HELP``, ``TEXT_HELP``, ``latent_spec(config, codec_factor)``, ``image_seq_len(latent_shape)``,
    ``default_schedule(config, scheduler_config)``, ``find_codec``/``load_codec``, ``find_text``/
    ``load_text``, ``check_parts_fit(config, codec, text, where=)``, ``encode(text, prompts, max_len,
    guidance=)`` -> ``Cond``, ``Denoiser(model, **options)``; optionally ``warn_if_truncated`` and, for
    reference images, ``prepare_references``, ``add_references``, ``reference_default_size``."""

    NAME: str

    def detect(self, keys: list[str]) -> tuple[str, str] | None: ...  # (layout, prefix) or None

    def plan(self, keys: list[str], layout: str, prefix: str) -> dict: ...  # own key -> (source keys, combine)

    def infer_config(self, shapes: dict, overrides: dict | None = None, **kw): ...

    def build(self, config) -> nn.Module: ...  # call under torch.device("meta")

    def layers(self, model: nn.Module) -> list[LayerRef]: ...

    def latent_spec(self, config, codec_factor: int) -> LatentSpec: ...
