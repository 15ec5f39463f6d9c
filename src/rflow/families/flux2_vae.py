"""Loading the FLUX.2 autoencoder into :class:`rflow.models.vae2.Flux2Codec` (BFL names).

Accepted inputs (the layout is detected from the tensor names, never from file names):

* ``bfl``: a BFL single file (``ae.safetensors``: ``encoder.down.0.block.0.conv1.weight``,
  ``encoder.quant_conv.weight``, ``bn.running_mean``, ...), also behind a ``vae.`` or ``first_stage_model.``
  prefix; group count and batch-norm eps are FLUX.2's (32, 1e-4) unless the safetensors metadata holds a
  JSON object under ``"rflow.flux2_vae_config"`` (see :func:`config_metadata`);
* ``diffusers``: ``AutoencoderKLFlux2`` names (``encoder.down_blocks.0.resnets.0.conv1.weight``,
  ``quant_conv.weight``, ``bn.running_mean``): a ``vae/`` folder with ``config.json`` (which gives the
  group count and eps), a pipeline root holding ``vae/``, or a single file such as ComfyUI's
  ``flux2-vae.safetensors``.

The structure (widths, levels, resnets, latent channels, optional convs and attention) is inferred from
shapes, and every tensor is checked against it before anything is read; bad input is a one-line
:class:`~rflow.errors.UserError` naming the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping

import torch

from ..checkpoints.io import majority, open_weights, read_json, tensor_kind
from ..checkpoints.plan import Plan, one
from ..checkpoints.vae import diffusers_key_to_bfl, resolve_vae_path
from ..errors import UserError
from ..models.vae2 import PATCH, Flux2Codec, Flux2VAEConfig

METADATA_KEY = "rflow.flux2_vae_config"
PREFIXES = ("", "vae.", "first_stage_model.")
_BN = ("bn.running_mean", "bn.running_var")
_SKIP = ("bn.num_batches_tracked",)  # BatchNorm bookkeeping some files carry; unused
_ATTN = (".attn_1.q.weight", ".attn_1.k.weight", ".attn_1.v.weight", ".attn_1.proj_out.weight")
_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


# ----------------------------------------------------------------------------------------------- names


def detect_flux2_vae(keys) -> tuple[str, str] | None:
    """(layout, prefix) of FLUX.2 VAE weights, layout ``"bfl"`` or ``"diffusers"``; None for anything else.

    A FLUX.2 VAE is an encoder/decoder pair plus the latent batch-norm statistics, which FLUX.1's
    (16-channel, shift/scale normalised) VAE does not have."""
    keyset = set(keys)
    for p in PREFIXES:
        if not all(f"{p}{k}" in keyset for k in ("encoder.conv_in.weight", "decoder.conv_in.weight", *_BN)):
            continue
        if any(k.startswith(f"{p}encoder.down_blocks.") for k in keyset):
            return "diffusers", p
        if any(k.startswith(f"{p}encoder.down.") for k in keyset):
            return "bfl", p
    return None


def diffusers_to_bfl_name(key: str, decoder_levels: int) -> str:
    """One ``AutoencoderKLFlux2`` tensor name -> the BFL name (unknown names pass through)."""
    if key.startswith("quant_conv."):
        return "encoder." + key
    if key.startswith("post_quant_conv."):
        return "decoder." + key
    return diffusers_key_to_bfl(key, decoder_levels)


def _decoder_levels(keys) -> int:
    return len({k.split(".")[2] for k in keys if k.startswith("decoder.up_blocks.")})


def _conv1x1(ts):
    t = ts[0]
    return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t


def key_plan(keys: list[str], layout: str, prefix: str = "") -> Plan:
    """Every BFL key of the model from the checkpoint's keys (``prefix`` removed; other components skipped).

    Diffusers' attention projections are linears; they become the 1x1 convs of BFL's layout."""
    own = [k for k in keys if k.startswith(prefix) and k[len(prefix):].startswith(("encoder.", "decoder.", "bn.",
                                                                                    "quant_conv.", "post_quant_conv."))]
    own = [k for k in own if k[len(prefix):] not in _SKIP]
    n = _decoder_levels([k[len(prefix):] for k in own])
    plan: Plan = {}
    for k in own:
        name = k[len(prefix):]
        bfl = diffusers_to_bfl_name(name, n) if layout == "diffusers" else name
        if bfl in plan:
            raise UserError(f"{k} and {plan[bfl][0][0]} are the same tensor {bfl}")
        plan[bfl] = ([k], _conv1x1 if bfl.endswith(_ATTN) else one)
    return plan


def _bfl_shape(bfl: str, shape) -> tuple[int, ...]:
    return tuple(shape) + (1, 1) if len(shape) == 2 and bfl.endswith(_ATTN) else tuple(shape)


def diffusers_flux2_vae_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKLFlux2`` state dict under BFL names and shapes (what ``ae.safetensors`` holds)."""
    plan = key_plan(list(state_dict), "diffusers")
    return {dst: fn([state_dict[s] for s in srcs]) for dst, (srcs, fn) in plan.items()}


def config_metadata(config: Flux2VAEConfig) -> dict[str, str]:
    """Safetensors metadata recording ``config`` (read back by :func:`load_flux2_vae` for BFL files)."""
    return {METADATA_KEY: json.dumps(dataclasses.asdict(config))}


# ----------------------------------------------------------------------------------------------- config


def infer_flux2_vae_config(shapes: Mapping[str, tuple[int, ...]], where="checkpoint", *,
                           names: Mapping[str, str] | None = None) -> Flux2VAEConfig:
    """The structure of a FLUX.2 VAE from its BFL-named shapes (group count and eps get the defaults).

    Each size is the majority of the tensors that carry it, so one bad tensor is the one reported later
    by the full check; ``names`` maps BFL names to the checkpoint's own, for messages."""
    shapes = {k: tuple(s) for k, s in shapes.items()}

    def label(k: str) -> str:
        return (names or {}).get(k, k)

    def dim(key: str, rank: int, axis: int, div: int = 1) -> int | None:
        s = shapes.get(key)
        if s is None or len(s) != rank or min(s, default=1) < 1 or s[axis] % div:
            return None
        return s[axis] // div

    def size(what: str, votes: list, key: str) -> int:
        v = majority(votes)
        if v is None:
            s = shapes.get(key)
            why = "is missing" if s is None else f"has shape {s}, expected a {tensor_kind(key)} giving the {what}"
            raise UserError(f"{where}: not a FLUX.2 VAE: {label(key)} {why}")
        return v

    def indices(prefix: str, pos: int) -> list[int]:
        found = {k.split(".")[pos] for k in shapes if k.startswith(prefix)}
        bad = sorted(s for s in found if not (s.isascii() and s.isdigit()))
        if bad:
            raise UserError(f"{where}: not a FLUX.2 VAE: unexpected tensor names under {prefix}{bad[0]}")
        idx = sorted(int(s) for s in found)
        if not idx or idx != list(range(len(idx))):
            raise UserError(f"{where}: not a FLUX.2 VAE: no contiguous {prefix}N blocks")
        return idx

    def level_widths(part: str, kind: str) -> list[int]:
        out = []
        for i in indices(f"{part}.{kind}.", 2):
            votes = []
            for j in indices(f"{part}.{kind}.{i}.block.", 4):
                b = f"{part}.{kind}.{i}.block.{j}"
                votes += [dim(f"{b}.conv1.weight", 4, 0), dim(f"{b}.conv1.bias", 1, 0), dim(f"{b}.norm2.weight", 1, 0),
                          dim(f"{b}.conv2.weight", 4, 0), dim(f"{b}.conv2.weight", 4, 1), dim(f"{b}.conv2.bias", 1, 0)]
            out.append(size("level width", votes, f"{part}.{kind}.{i}.block.0.conv2.weight"))
        return out

    for k in _BN:
        if k not in shapes:
            raise UserError(f"{where}: not a FLUX.2 VAE: {k} is missing")
    q = PATCH * PATCH
    z = size("latent channels", [
        dim("decoder.conv_in.weight", 4, 1),
        dim("encoder.conv_out.weight", 4, 0, 2), dim("encoder.conv_out.bias", 1, 0, 2),
        dim("encoder.quant_conv.weight", 4, 0, 2), dim("encoder.quant_conv.bias", 1, 0, 2),
        dim("decoder.post_quant_conv.weight", 4, 0), dim("decoder.post_quant_conv.bias", 1, 0),
        dim("bn.running_mean", 1, 0, q), dim("bn.running_var", 1, 0, q)], "decoder.conv_in.weight")
    widths, dec_widths = level_widths("encoder", "down"), level_widths("decoder", "up")
    return Flux2VAEConfig(
        in_channels=size("input channels", [dim("encoder.conv_in.weight", 4, 1)], "encoder.conv_in.weight"),
        out_channels=size("output channels", [dim("decoder.conv_out.weight", 4, 0), dim("decoder.conv_out.bias", 1, 0)],
                          "decoder.conv_out.weight"),
        widths=tuple(widths), decoder_widths=tuple(dec_widths),
        num_res_blocks=len(indices("encoder.down.0.block.", 4)), z_channels=z,
        use_quant_conv="encoder.quant_conv.weight" in shapes,
        use_post_quant_conv="decoder.post_quant_conv.weight" in shapes,
        mid_attention="encoder.mid.attn_1.q.weight" in shapes,
    )


_SIZES = ("in_channels", "out_channels", "widths", "dec_widths", "num_res_blocks", "z_channels")
_FIELDS = {f.name: f for f in dataclasses.fields(Flux2VAEConfig)}


_DIFFUSERS_NAMES = {"widths": "block_out_channels", "dec_widths": "decoder_block_out_channels",
                    "num_res_blocks": "layers_per_block", "z_channels": "latent_channels"}


def _apply(config: Flux2VAEConfig, overrides: dict, source: str, diffusers: bool = False) -> Flux2VAEConfig:
    """``config`` with ``overrides``; the sizes stated there must agree with the weights (``config``)."""
    new = dataclasses.replace(config, **overrides)
    for f in _SIZES:
        have, want = getattr(config, f), getattr(new, f)
        if have != want:
            name = _DIFFUSERS_NAMES.get(f, f) if diffusers else ("decoder_widths" if f == "dec_widths" else f)
            show = (lambda v: list(v)) if isinstance(have, tuple) else (lambda v: v)
            raise UserError(f"{source}: {name} is {show(want)}, but the weights have {show(have)}")
    return new


def _diffusers_overrides(d, where: Path) -> dict:
    """``Flux2VAEConfig`` fields from an ``AutoencoderKLFlux2`` config.json."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a JSON object")
    if d.get("_class_name") not in (None, "AutoencoderKLFlux2"):
        raise UserError(f"{where}: class {d.get('_class_name')}, expected AutoencoderKLFlux2")
    bad = [t for t in list(d.get("down_block_types") or []) + list(d.get("up_block_types") or [])
           if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D")]
    if bad:
        raise UserError(f"{where}: unsupported VAE block type {bad[0]!r}")
    if d.get("act_fn", "silu") != "silu":
        raise UserError(f"{where}: unsupported act_fn {d['act_fn']!r}, expected 'silu'")
    if list(d.get("patch_size") or (PATCH, PATCH)) != [PATCH, PATCH]:
        raise UserError(f"{where}: unsupported patch_size {d['patch_size']}, expected [2, 2]")
    fields = {"norm_num_groups": ("norm_groups", int), "batch_norm_eps": ("batch_norm_eps", float),
              "in_channels": ("in_channels", int), "out_channels": ("out_channels", int),
              "layers_per_block": ("num_res_blocks", int), "latent_channels": ("z_channels", int),
              "block_out_channels": ("widths", tuple), "decoder_block_out_channels": ("decoder_widths", tuple),
              "use_quant_conv": ("use_quant_conv", bool), "use_post_quant_conv": ("use_post_quant_conv", bool),
              "mid_block_add_attention": ("mid_attention", bool)}
    out = {"norm_groups": 32, "batch_norm_eps": 1e-4}  # diffusers' defaults
    try:
        for src, (dst, typ) in fields.items():
            if d.get(src) is not None:
                out[dst] = tuple(int(w) for w in d[src]) if typ is tuple else typ(d[src])
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: bad VAE config value ({e})") from None
    if "widths" in out and "decoder_widths" not in out:
        out["decoder_widths"] = out["widths"]
    return out


def _metadata_overrides(text: str, where) -> dict:
    """``Flux2VAEConfig`` fields from the ``rflow.flux2_vae_config`` metadata JSON."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: metadata {METADATA_KEY!r} is not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise UserError(f"{where}: metadata {METADATA_KEY!r} must be a JSON object")
    out = {}
    for k, v in d.items():
        f = _FIELDS.get(k)
        if f is None:
            raise UserError(f"{where}: metadata {METADATA_KEY!r} has unknown field {k!r}")
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = {"bool": isinstance(v, bool), "int": num and isinstance(v, int), "float": num}.get(str(f.type))
        if ok is None:  # widths / decoder_widths
            ok = (v is None and k == "decoder_widths") or (isinstance(v, list) and all(isinstance(w, int) for w in v))
        if not ok:
            raise UserError(f"{where}: metadata {METADATA_KEY!r}: bad value for {k}: {v!r}")
        out[k] = float(v) if f.type == "float" else v
    return out


def _check_against(config: Flux2VAEConfig, shapes: Mapping[str, tuple[int, ...]], where, names: Mapping[str, str],
                   source_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor the config needs is present with the right shape, and nothing else is."""
    try:
        config.validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    with torch.device("meta"):
        expected = {k: tuple(t.shape) for k, t in Flux2Codec(config).state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    extra = [k for k in shapes if k not in expected]
    if missing or extra:
        what = [f"{len(missing)} missing, e.g. {missing[0]}"] if missing else []
        what += [f"{len(extra)} unexpected, e.g. {names[extra[0]]}"] if extra else []
        raise UserError(f"{where}: FLUX.2 VAE weights do not match the inferred config ({'; '.join(what)})")
    wrong = [k for k in expected if tuple(shapes[k]) != expected[k]]
    if wrong:
        k = wrong[0]
        got, want = tuple(source_shapes[k]), expected[k]
        if len(got) == 2 and k.endswith(_ATTN):
            want = want[:2]  # stored as a linear weight (diffusers)
        more = f" ({len(wrong) - 1} more with a wrong shape)" if len(wrong) > 1 else ""
        raise UserError(f"{where}: {names[k]} has shape {got}, expected {want} for a FLUX.2 VAE with widths "
                        f"{list(config.widths)}, decoder widths {list(config.dec_widths)}, num_res_blocks "
                        f"{config.num_res_blocks} and {config.z_channels} latent channels{more}")


# ----------------------------------------------------------------------------------------------- loading


def load_flux2_vae(path: str | os.PathLike, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Flux2Codec:
    """Load a FLUX.2 VAE (BFL ``ae.safetensors``, diffusers ``vae/`` folder or file, pipeline root), eval, frozen.

    ``dtype=None`` keeps the checkpoint's floating dtype (float32 when it mixes dtypes, bfloat16 for float8);
    ``device=None`` leaves it on the CPU."""
    weights_path, config_json = resolve_vae_path(Path(path).expanduser())
    with open_weights(weights_path) as w:
        keys = w.keys()
        found = detect_flux2_vae(keys)
        if found is None:
            gone = [b for b in _BN if not any(k.endswith(b) for k in keys)]
            if any(k.endswith("encoder.conv_in.weight") for k in keys) and gone:
                why = f"a VAE without the latent batch-norm statistics {' and '.join(gone)}: FLUX.1 or SD?"
            else:
                why = f"keys look like: {', '.join(sorted(keys)[:3]) or 'no tensors'}"
            raise UserError(f"{weights_path}: not a FLUX.2 VAE checkpoint ({why})")
        layout, prefix = found
        plan = key_plan(keys, layout, prefix)
        names = {dst: srcs[0] for dst, (srcs, _) in plan.items()}
        source_shapes = {dst: tuple(w.shapes[src]) for dst, src in names.items()}
        shapes = {dst: _bfl_shape(dst, s) for dst, s in source_shapes.items()}

        config = infer_flux2_vae_config(shapes, weights_path, names=names)
        if layout == "diffusers" and config_json is not None:
            config = _apply(config, _diffusers_overrides(read_json(config_json), config_json), str(config_json),
                            diffusers=True)
        if METADATA_KEY in w.metadata:
            config = _apply(config, _metadata_overrides(w.metadata[METADATA_KEY], weights_path),
                            f"{weights_path}: metadata {METADATA_KEY!r}")
        _check_against(config, shapes, weights_path, names, source_shapes)
        for src in names.values():
            if not w.dtypes[src].is_floating_point:
                dt = str(w.dtypes[src]).removeprefix("torch.")
                raise UserError(f"{weights_path}: {src} has dtype {dt}, expected a floating-point tensor")

        if dtype is None:
            found_dtypes = {w.dtypes[s] for s in names.values()}
            dtype = found_dtypes.pop() if len(found_dtypes) == 1 else torch.float32
            if dtype in _FLOAT8:
                dtype = torch.bfloat16
        state = {dst: fn([w.get(s, dtype) for s in srcs]) for dst, (srcs, fn) in plan.items()}

    with torch.device("meta"):
        model = Flux2Codec(config)
    model.load_state_dict(state, strict=True, assign=True)
    if device is not None:
        model.to(device)
    return model.eval().requires_grad_(False)
