"""Loading the KL autoencoder ("VAE") from BFL or diffusers checkpoints into :class:`rflow.models.vae.AutoEncoder`.

Accepted inputs (the layout is detected from the tensor names):

* a BFL / LDM single file (``ae.safetensors``; SD-style VAE files and full SD checkpoints with a
  ``first_stage_model.`` prefix too): the config is inferred from the key names and shapes; an optional
  JSON object in the safetensors metadata under ``"rflow.vae_config"`` overrides fields (``norm_groups``,
  ``scaling_factor``, ``shift_factor``, ...), otherwise FLUX.1 defaults apply (32 groups, 0.3611 / 0.1159);
* a diffusers ``AutoencoderKL`` folder (``config.json`` + safetensors): diffusers names are mapped to BFL
  names by :func:`diffusers_key_to_bfl`, normalisation and group count come from ``config.json``;
* a diffusers pipeline root containing ``vae/`` (or a folder holding ``ae.safetensors``).

Whatever the source, the config is checked against every tensor name and shape before anything is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from ..errors import UserError
from ..models.vae import AutoEncoder, VAEConfig
from .io import majority, open_weights, read_json, tensor_kind

METADATA_KEY = "rflow.vae_config"
_PREFIXES = ("", "first_stage_model.", "vae.")
_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_ATTN_LEAF = {
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    # names used by diffusers checkpoints saved before the Attention refactor
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
}
_ATTN_WEIGHT = re.compile(r"\.attn_1\.(q|k|v|proj_out)\.weight$")
_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


# ----------------------------------------------------------------------------------------------- names


def diffusers_key_to_bfl(key: str, num_levels: int) -> str:
    """One diffusers ``AutoencoderKL`` tensor name -> the BFL name (names it does not know pass through).

    ``num_levels`` is ``len(block_out_channels)``: diffusers numbers decoder up-blocks from the lowest
    resolution, BFL numbers ``decoder.up`` by resolution level, so ``up_blocks.i`` is ``up.{n-1-i}``.
    """
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(?:resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.+)", rest)
    if m:
        kind, i, j, leaf = m.groups()
        level = int(i) if kind == "down" else num_levels - 1 - int(i)
        inner = f"block.{j}.{_resnet_leaf(leaf)}" if j is not None else f"{kind}sample.{leaf}"
        return f"{part}.{kind}.{level}.{inner}"
    m = re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest)
    if m:
        return f"{part}.mid.block_{int(m[1]) + 1}.{_resnet_leaf(m[2])}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest)
    if m:
        return f"{part}.mid.attn_1.{_ATTN_LEAF.get(m[1], m[1])}.{m[2]}"
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}"
    return key


def _resnet_leaf(leaf: str) -> str:
    return "nin_shortcut." + leaf[len("conv_shortcut."):] if leaf.startswith("conv_shortcut.") else leaf


def _bfl_shape(bfl_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Attention projections stored as Linear ``[C, C]`` become 1x1 convs ``[C, C, 1, 1]``."""
    return tuple(shape) + (1, 1) if len(shape) == 2 and _ATTN_WEIGHT.search(bfl_key) else tuple(shape)


def _diffusers_levels(keys) -> int:
    return len({k.split(".")[2] for k in keys if k.startswith("encoder.down_blocks.")})


def diffusers_vae_to_bfl(state_dict: Mapping[str, torch.Tensor], config: VAEConfig | None = None) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict with BFL names and shapes (what ``ae.safetensors`` holds).

    The level count comes from ``config`` if given, else from the encoder's down-block keys.
    """
    n = len(config.ch_mult) if config is not None else _diffusers_levels(state_dict)
    out = {}
    for k, t in state_dict.items():
        name = diffusers_key_to_bfl(k, n)
        out[name] = t.reshape(_bfl_shape(name, tuple(t.shape)))
    return out


def config_metadata(config: VAEConfig) -> dict[str, str]:
    """Safetensors metadata recording ``config`` (read back by :func:`load_vae` for BFL-layout files)."""
    return {METADATA_KEY: json.dumps(dataclasses.asdict(config))}


# ----------------------------------------------------------------------------------------------- config


def _not_vae(where, why: str) -> UserError:
    return UserError(f"{where}: not a FLUX/SD VAE checkpoint ({why})")


def infer_vae_config(
    shapes: Mapping[str, tuple[int, ...]], where: str | os.PathLike = "checkpoint", *, names: Mapping[str, str] | None = None
) -> VAEConfig:
    """The structure of a VAE from its BFL-named tensor shapes; group count and normalisation get FLUX defaults.

    ``names`` maps BFL names to the checkpoint's own (diffusers) names for error messages. A shape that
    cannot be read as a VAE is a :class:`UserError` naming the tensor; :func:`load_vae` then checks every
    tensor against the inferred config."""
    shapes = {k: tuple(s) for k, s in shapes.items()}

    def label(k: str) -> str:
        return names.get(k, k) if names else k

    def dim(key: str, rank: int, axis: int) -> int | None:
        s = shapes.get(key)
        if s is None or len(s) != rank or min(s) < 1:
            return None
        return s[axis]

    def require(key: str, rank: int) -> tuple[int, ...]:
        if key not in shapes:
            raise _not_vae(where, f"missing {key}")
        s = shapes[key]
        if len(s) != rank:
            raise UserError(f"{where}: {label(key)} has shape {s}, expected a {rank}-D {tensor_kind(key)}")
        if min(s) < 1:
            raise UserError(f"{where}: {label(key)} has shape {s}, expected no empty dimension")
        return s

    def half(v: int | None) -> int | None:
        return v // 2 if v is not None and v % 2 == 0 else None

    def indices(prefix: str, pos: int) -> list[int]:
        found = {k.split(".")[pos] for k in shapes if k.startswith(prefix)}
        if not all(s.isascii() and s.isdigit() for s in found):
            raise _not_vae(where, f"unexpected names under {prefix}")
        return sorted(int(s) for s in found)

    levels = indices("encoder.down.", 2)
    if not levels or levels != list(range(len(levels))):
        raise _not_vae(where, "no contiguous encoder.down.{i} levels")
    blocks = indices("encoder.down.0.block.", 4)
    if not blocks or blocks != list(range(len(blocks))):
        raise _not_vae(where, "no encoder.down.0.block.{j} resnets")
    in_channels = require("encoder.conv_in.weight", 4)[1]
    first = "encoder.down.0.block.0"
    ch = majority([dim("encoder.conv_in.weight", 4, 0), dim("encoder.conv_in.bias", 1, 0),
                dim(f"{first}.conv1.weight", 4, 1), dim(f"{first}.norm1.weight", 1, 0)])
    widths = []
    for i in levels:
        b = f"encoder.down.{i}.block.0"
        w = majority([dim(f"{b}.conv2.weight", 4, 0), dim(f"{b}.conv2.weight", 4, 1), dim(f"{b}.conv2.bias", 1, 0),
                   dim(f"{b}.conv1.weight", 4, 0), dim(f"{b}.norm2.weight", 1, 0)])
        widths.append(w if w is not None else require(f"{b}.conv2.weight", 4)[0])
    if any(w % ch for w in widths):
        raise UserError(f"{where}: unsupported VAE: level widths {widths} are not multiples of the first ({ch})")
    z = majority([dim("decoder.conv_in.weight", 4, 1), half(dim("encoder.conv_out.weight", 4, 0)),
               half(dim("encoder.conv_out.bias", 1, 0))])
    if z is None:
        z = require("decoder.conv_in.weight", 4)[1]
    out_channels = majority([dim("decoder.conv_out.weight", 4, 0), dim("decoder.conv_out.bias", 1, 0)])
    if out_channels is None:
        out_channels = require("decoder.conv_out.weight", 4)[0]
    return VAEConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=len(blocks),
        z_channels=z,
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        mid_attention="encoder.mid.attn_1.q.weight" in shapes,
    )


def _diffusers_json_overrides(d: dict, where: Path) -> dict:
    """``VAEConfig`` fields from a diffusers ``AutoencoderKL`` config.json (absent structural fields stay inferred)."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a JSON object")
    cls = d.get("_class_name")
    if cls not in (None, "AutoencoderKL"):
        raise _not_vae(where, f"class {cls}, expected AutoencoderKL")
    try:
        types = list(d.get("down_block_types") or []) + list(d.get("up_block_types") or [])
        bad = [t for t in types if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D")]
        if bad:
            raise UserError(f"{where}: unsupported VAE block type {bad[0]!r}")
        out: dict = {
            "norm_groups": int(d.get("norm_num_groups", 32)),
            "scaling_factor": float(d.get("scaling_factor", 0.18215)),  # diffusers' own default
            "shift_factor": float(d.get("shift_factor") or 0.0),
        }
        if "block_out_channels" in d:
            widths = [int(c) for c in d["block_out_channels"]]
            if not widths or any(w % widths[0] for w in widths):
                raise UserError(f"{where}: unsupported VAE: block_out_channels {widths} are not multiples of the first")
            out["ch"], out["ch_mult"] = widths[0], tuple(w // widths[0] for w in widths)
        for src, dst, typ in (
            ("layers_per_block", "num_res_blocks", int), ("latent_channels", "z_channels", int),
            ("in_channels", "in_channels", int), ("out_channels", "out_channels", int),
            ("use_quant_conv", "use_quant_conv", bool), ("use_post_quant_conv", "use_post_quant_conv", bool),
            ("mid_block_add_attention", "mid_attention", bool),
        ):
            if d.get(src) is not None:
                out[dst] = typ(d[src])
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: bad VAE config value ({e})") from None
    return out


def _metadata_overrides(text: str, where) -> dict:
    """``VAEConfig`` fields from the ``rflow.vae_config`` metadata JSON."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: metadata {METADATA_KEY!r} is not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise UserError(f"{where}: metadata {METADATA_KEY!r} must be a JSON object")
    types = {f.name: f.type for f in dataclasses.fields(VAEConfig)}
    out = {}
    for k, v in d.items():
        if k not in types:
            raise UserError(f"{where}: metadata {METADATA_KEY!r} has unknown field {k!r}")
        t = types[k]
        ok = (
            (t == "bool" and isinstance(v, bool))
            or (t == "int" and isinstance(v, int) and not isinstance(v, bool))
            or (t == "float" and isinstance(v, (int, float)) and not isinstance(v, bool))
            or (k == "ch_mult" and isinstance(v, list) and all(isinstance(m, int) for m in v))
        )
        if not ok:
            raise UserError(f"{where}: metadata {METADATA_KEY!r}: bad value for {k}: {v!r}")
        out[k] = float(v) if t == "float" else v
    return out


# Sizes a config.json or metadata may state but the weights decide (a stated value must agree). Which
# optional tensors exist (quant convs, mid attention) is taken from a config when given, so a missing
# tensor is reported as missing.
_STRUCTURE = ("in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks", "z_channels")
# VAEConfig structure in diffusers config.json terms (for messages about a config.json).
_DIFFUSERS_NAMES = {"ch": "block_out_channels", "ch_mult": "block_out_channels", "num_res_blocks": "layers_per_block",
                    "z_channels": "latent_channels"}


def _apply(config: VAEConfig, overrides: dict, weights: VAEConfig, source: str, diffusers: bool = False) -> VAEConfig:
    """``config`` with ``overrides``; the sizes among them must agree with what the weights have (``weights``)."""
    new = dataclasses.replace(config, **overrides)
    for f in _STRUCTURE:
        have, want = getattr(weights, f), getattr(new, f)
        if have != want:
            name = _DIFFUSERS_NAMES.get(f, f) if diffusers else f
            if name == "block_out_channels":
                have, want = weights.widths, new.widths
            raise UserError(f"{source}: {name} is {want!r}, but the weights have {have!r}")
    return new


def _check_against(
    config: VAEConfig,
    shapes: Mapping[str, tuple[int, ...]],
    where,
    *,
    names: Mapping[str, str] | None = None,
    source_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Every tensor the config needs is present with the right shape, and nothing else is.

    ``names`` / ``source_shapes`` (by BFL name) are the checkpoint's own names and shapes, for messages."""
    try:
        config.validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None

    def label(k: str) -> str:
        return names.get(k, k) if names else k

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoEncoder(config).state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    extra = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} unexpected, e.g. {label(extra[0])!r}")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} with wrong shape, e.g. {label(k)} {list(shapes[k])} != {list(expected[k])}")
    if missing or extra:
        raise UserError(f"{where}: VAE weights do not match the config ({'; '.join(problems)})")
    if wrong:
        k = wrong[0]
        got = tuple((source_shapes or shapes)[k])
        want = expected[k]
        if len(got) == 2 and want[2:] == (1, 1) and _ATTN_WEIGHT.search(k):
            want = want[:2]  # stored as a Linear weight (diffusers)
        if len(got) != len(want):
            kind = "2-D (linear) or 4-D (1x1 conv) weight" if _ATTN_WEIGHT.search(k) else f"{len(want)}-D {tensor_kind(k)}"
            why = f"expected a {kind}"
        else:
            why = (f"expected {want} for a VAE with ch={config.ch}, ch_mult={config.ch_mult}, "
                   f"{config.num_res_blocks} resnet{'s' if config.num_res_blocks != 1 else ''} per level and "
                   f"{config.z_channels} latent channels")
        n = len(wrong) - 1
        more = f" ({n} more tensor{'s have' if n > 1 else ' has'} a wrong shape)" if n else ""
        raise UserError(f"{where}: {label(k)} has shape {got}, {why}{more}")


# ----------------------------------------------------------------------------------------------- loading


def resolve_vae_path(path: Path) -> tuple[Path, Path | None]:
    """(weights path for open_weights, diffusers config.json or None) of a VAE file, a diffusers ``vae/``
    folder, or a pipeline folder holding one (FLUX.1's and FLUX.2's VAEs alike)."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_file():
        sibling = path.parent / "config.json"
        return path, sibling if sibling.is_file() else None
    if (path / "config.json").is_file():
        return path, path / "config.json"
    if (path / "vae").is_dir():
        return resolve_vae_path(path / "vae")
    if (path / "ae.safetensors").is_file():
        return path / "ae.safetensors", None
    if (path / "model_index.json").is_file():
        raise UserError(f"{path}: pipeline folder has no vae/ subfolder")
    return path, None


def _detect(keys: list[str], where) -> tuple[str, str]:
    """(prefix, layout) with layout ``"bfl"`` or ``"diffusers"``."""
    keyset = set(keys)
    for prefix in _PREFIXES:
        if f"{prefix}encoder.conv_in.weight" in keyset and f"{prefix}decoder.conv_in.weight" in keyset:
            if any(k.startswith(f"{prefix}encoder.down_blocks.") for k in keys):
                return prefix, "diffusers"
            if any(k.startswith(f"{prefix}encoder.down.") for k in keys):
                return prefix, "bfl"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise _not_vae(where, f"no encoder.conv_in/decoder.conv_in/encoder.down weights; keys look like: {sample}")


def load_vae(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> AutoEncoder:
    """Load a KL autoencoder (FLUX ``ae.safetensors``, diffusers ``vae/`` or pipeline root) in eval mode, frozen.

    ``dtype=None`` keeps the checkpoint's floating dtype (float32 when it mixes dtypes, bfloat16 for float8);
    ``device=None`` leaves it on the CPU. Bad paths and files raise :class:`UserError`.
    """
    src = Path(path).expanduser()
    weights_path, config_json = resolve_vae_path(src)
    with open_weights(weights_path) as w:
        prefix, layout = _detect(w.keys(), weights_path)
        own = [k for k in w.keys() if k.startswith(prefix) and k[len(prefix):].startswith(_PARTS)]
        n = _diffusers_levels([k[len(prefix):] for k in own]) if layout == "diffusers" else 0
        names = {k: (diffusers_key_to_bfl(k[len(prefix):], n) if layout == "diffusers" else k[len(prefix):]) for k in own}
        shapes = {b: _bfl_shape(b, w.shapes[k]) for k, b in names.items()}
        if len(shapes) != len(names):
            raise _not_vae(weights_path, "two tensors map to the same name")

        config = infer_vae_config(shapes, weights_path, names={b: k for k, b in names.items()})
        weights = config
        if layout == "diffusers" and config_json is not None:
            config = _apply(config, _diffusers_json_overrides(read_json(config_json), config_json), weights,
                            str(config_json), diffusers=True)
        if METADATA_KEY in w.metadata:
            config = _apply(config, _metadata_overrides(w.metadata[METADATA_KEY], weights_path), weights,
                            f"{weights_path}: metadata {METADATA_KEY!r}")
        _check_against(config, shapes, weights_path, names={b: k for k, b in names.items()},
                       source_shapes={b: tuple(w.shapes[k]) for k, b in names.items()})
        for k in own:
            if not w.dtypes[k].is_floating_point:
                dt = str(w.dtypes[k]).removeprefix("torch.")
                raise UserError(f"{weights_path}: {k} has dtype {dt}, expected a floating-point tensor")

        if dtype is None:
            found = {w.dtypes[k] for k in own}
            dtype = found.pop() if len(found) == 1 else torch.float32
            if dtype in _FLOAT8:
                dtype = torch.bfloat16
        state = {b: w.get(k, dtype).reshape(shapes[b]) for k, b in names.items()}

    with torch.device("meta"):
        model = AutoEncoder(config)
    model.load_state_dict(state, strict=True, assign=True)
    if device is not None:
        model.to(device)
    return model.eval().requires_grad_(False)
