"""Reading a LoRA file: its tensors grouped per adapted module, each with the scale its tool gives it.

Key grammar (the dialect is told from the keys, never from file names)::

    [component prefix][module prefix]MODULE.(lora_down|lora_up|lora_A|lora_B)[.ADAPTER].weight
    [component prefix][module prefix]MODULE.alpha
    [diffusion_model.]double_blocks.N.processor.(qkv|proj)_lora(1|2).(down|up).weight      (XLabs)

Component prefixes: ``lora_unet_`` (kohya / ComfyUI, module names with ``_`` for ``.``),
``lora_transformer_`` (the same over diffusers names), ``transformer.`` (diffusers, ai-toolkit),
``lora_te1_`` / ``lora_te_`` / ``text_encoder.`` / ``text_encoders.clip_l.transformer.`` (CLIP),
``lora_te2_`` / ``text_encoder_2.`` / ``text_encoders.t5xxl.transformer.`` (T5), none (the transformer).
Module prefixes of the transformer: ``base_model.model.`` (PEFT), ``diffusion_model.`` and
``model.diffusion_model.`` (BFL / ComfyUI).

Scale (what multiplies ``B A`` before the user's own scale), as each tool defines it:

* an ``.alpha`` tensor beside the module (kohya, ComfyUI, BFL, diffusers' network alphas): alpha / rank;
* else, for ``lora_A`` / ``lora_B`` with a PEFT config — diffusers' ``lora_adapter_metadata`` in the
  safetensors header, or PEFT's ``adapter_config.json`` beside ``adapter_model.safetensors``:
  ``lora_alpha / r`` (``alpha_pattern`` matched as PEFT matches it, ``/ sqrt(r)`` with ``use_rslora``);
* else 1: kohya's default alpha is the rank, XLabs' processors have no alpha, and diffusers loads a
  PEFT file without metadata with ``lora_alpha = r``.

Anything else — a key of no LoRA shape, a down without its up, DoRA / LoHa / LoKr / LoRA-bias tensors,
a pickle file — is a one-line :class:`~rflow.errors.UserError` naming it; nothing is dropped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError

COMPONENTS = ("transformer", "clip", "t5")
FOLDER_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")  # diffusers, PEFT
METADATA_KEY = "lora_adapter_metadata"  # diffusers' PEFT config in the safetensors header

# (prefix, component, module names use "_" for ".")
_COMPONENT_PREFIXES = (
    ("lora_unet_", "transformer", True), ("lora_transformer_", "transformer", True),
    ("lora_te1_", "clip", True), ("lora_te2_", "t5", True), ("lora_te_", "clip", True),
    ("text_encoders.clip_l.transformer.", "clip", False), ("text_encoders.t5xxl.transformer.", "t5", False),
    ("text_encoder_2.", "t5", False), ("text_encoder.", "clip", False), ("transformer.", "transformer", False),
)
_MODULE_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")
_PEFT_PREFIXES = {"transformer": "transformer.", "clip": "text_encoder.", "t5": "text_encoder_2."}

_LORA = re.compile(r"(?P<module>.+?)\.(?P<kind>lora_down|lora_up|lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight")
_XLABS = re.compile(r"(?P<module>(?:double|single)_blocks\.\d+\.processor\.[a-z]+_lora[12]?)\.(?P<kind>down|up)\.weight")
_ALPHA = re.compile(r"(?P<module>.+)\.alpha")
_UNSUPPORTED = (
    (re.compile(r".*\.(dora_scale|lora_magnitude_vector)(\..*)?"), "DoRA (magnitude vectors)"),
    (re.compile(r".*\.(hada_|lokr_).*"), "LyCORIS LoHa/LoKr"),
    (re.compile(r".*\.lora_mid\..*"), "LoCon (convolution LoRA)"),
    (re.compile(r".*\.(lora_B|lora_up|up)\.bias"), "a LoRA bias"),
    (re.compile(r".*\.diff(_b)?"), "a full weight difference (.diff)"),
)


@dataclass
class Entry:
    """One adapted module of a file: its down (A) and up (B) tensors and the file's scale for them."""

    component: str  # "transformer" | "clip" | "t5"
    module: str  # the file's module name, prefixes removed (dotted, or with "_" when ``underscored``)
    underscored: bool
    style: str  # "kohya" (lora_down/up) | "peft" (lora_A/B) | "xlabs" (processor down/up)
    down: Tensor
    up: Tensor
    scale: float
    key: str  # the down tensor's key in the file, for messages


@dataclass
class LoRAFile:
    path: Path
    entries: list[Entry]
    dialect: str  # what the keys look like: "kohya", "diffusers", "peft", "xlabs", "comfyui", "bfl" (joined by "+")
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if any(e.component == c for e in self.entries)]

    def where(self, key: str) -> str:
        return f"{self.path}: {key!r}"


def lora_path(path) -> Path:
    """The LoRA file at ``path``: a .safetensors file, or a folder holding diffusers' or PEFT's file."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = [p / n for n in FOLDER_FILES if (p / n).is_file()]
        if not found:
            files = sorted(p.glob("*.safetensors"))
            if len(files) != 1:
                raise UserError(f"{p}: a folder must hold one LoRA .safetensors file ({' or '.join(FOLDER_FILES)})")
            found = files
        p = found[0]
    return p


def _split(key: str) -> tuple[str, bool, str]:
    """(component, underscored, rest of the key)."""
    for prefix, component, underscored in _COMPONENT_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    else:
        component, underscored = "transformer", False
    if component == "transformer" and not underscored:
        for prefix in _MODULE_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
    return component, underscored, key


def _dialect(key: str, style: str) -> str:
    if style == "xlabs":
        return "xlabs"
    if key.startswith(("lora_unet_", "lora_te", "lora_transformer_")):
        return "kohya"
    if key.startswith(("diffusion_model.", "model.diffusion_model.", "text_encoders.")):
        return "comfyui"
    if key.startswith("base_model.model."):
        return "peft"
    if key.startswith(("transformer.", "text_encoder")) or re.search(r"transformer_blocks\.|\.to_[qkv]\.|\.to_out\.", key):
        return "diffusers"
    return "bfl"


def _unsupported(path: Path, key: str) -> UserError:
    for pattern, what in _UNSUPPORTED:
        if pattern.fullmatch(key):
            return UserError(f"{path}: {key!r} is {what}, which rflow does not read; rflow reads plain LoRA "
                             "(lora_down/lora_up, lora_A/lora_B, alpha)")
    return UserError(f"{path}: {key!r} is not a LoRA tensor (expected MODULE.lora_A/lora_B.weight, "
                     "MODULE.lora_down/lora_up.weight or MODULE.alpha)")


def _peft_configs(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    """component -> PEFT LoraConfig fields, from diffusers' metadata or PEFT's adapter_config.json."""
    raw = None
    if METADATA_KEY in metadata:
        try:
            raw = json.loads(metadata[METADATA_KEY])
        except ValueError:
            raise UserError(f"{path}: {METADATA_KEY} in the header is not valid JSON") from None
    elif path.name == "adapter_model.safetensors" and (path.parent / "adapter_config.json").is_file():
        from ..checkpoints.io import read_json

        raw = read_json(path.parent / "adapter_config.json")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the LoRA's PEFT config is not a JSON object")
    out = {}
    for component, prefix in _PEFT_PREFIXES.items():
        sub = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        if sub:
            out[component] = sub
    if not out and ("r" in raw or "lora_alpha" in raw):
        out = dict.fromkeys(COMPONENTS, raw)
    for component, cfg in out.items():
        if cfg.get("use_dora"):
            raise UserError(f"{path}: a DoRA adapter (use_dora), which rflow does not read")
    return out


def _number(v, what: str, path: Path) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{path}: PEFT config {what} {v!r} is not a finite number")
    return float(v)


def peft_scale(cfg: dict, module: str, rank: int, path: Path) -> float:
    """PEFT's ``scaling`` for ``module``: lora_alpha (or its alpha_pattern match) / r, / sqrt(r) with rslora."""
    alpha = cfg.get("lora_alpha", 8)  # PEFT's LoraConfig default
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    alpha = _number(alpha, "lora_alpha", path)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _alpha(t: Tensor, key: str, path: Path) -> float:
    if t.numel() != 1 or (not t.is_floating_point() and t.dtype not in (torch.int32, torch.int64)):
        raise UserError(f"{path}: {key!r} has shape {tuple(t.shape)}, expected one number (the LoRA alpha)")
    v = float(t.reshape(()))
    if not math.isfinite(v):
        raise UserError(f"{path}: {key!r} is {v}, expected a finite LoRA alpha")
    return v


def read_lora(path) -> LoRAFile:
    """Read and check a LoRA file (see the module docstring); no model is needed."""
    from ..checkpoints.io import SafetensorsFiles

    p = lora_path(path)
    with SafetensorsFiles([p]) as f:
        keys, metadata = f.keys(), dict(f.metadata)
        tensors = {k: f.get(k) for k in keys}
    if not keys:
        raise UserError(f"{p}: holds no tensors, not a LoRA")
    groups: dict[tuple[str, bool, str], dict] = {}
    for k in keys:
        component, underscored, rest = _split(k)
        m = _XLABS.fullmatch(rest) if component == "transformer" and not underscored else None
        style = "xlabs" if m else None
        m = m or _LORA.fullmatch(rest)
        if m:
            kind = m["kind"]
            style = style or ("kohya" if kind in ("lora_down", "lora_up") else "peft")
            slot = "down" if kind in ("lora_down", "lora_A", "down") else "up"
        elif _ALPHA.fullmatch(rest):
            m, slot = _ALPHA.fullmatch(rest), "alpha"
        else:
            raise _unsupported(p, k)
        g = groups.setdefault((component, underscored, m["module"]), {})
        if slot in g:
            raise UserError(f"{p}: {k!r} and {g[slot][0]!r} are the same LoRA tensor of {m['module']!r}")
        g[slot] = (k, tensors[k])
        if style:
            g["style"] = style
    configs = _peft_configs(p, metadata)
    entries, dialects = [], set()
    for (component, underscored, module), g in groups.items():
        if "down" not in g or "up" not in g:
            have = g.get("down") or g.get("up") or g["alpha"]
            missing = "up (B) tensor" if "down" in g else "down (A) tensor" if "up" in g else "LoRA weights"
            raise UserError(f"{p}: {have[0]!r} has no {missing} beside it")
        (dk, down), (uk, up) = g["down"], g["up"]
        if down.ndim != 2 or up.ndim != 2:
            raise UserError(f"{p}: {dk!r} {tuple(down.shape)} / {uk!r} {tuple(up.shape)}: rflow reads linear "
                            "LoRAs (2-D down and up)")
        if up.shape[1] != down.shape[0]:
            raise UserError(f"{p}: {uk!r} has shape {tuple(up.shape)}, expected (rows, {down.shape[0]}) for the "
                            f"rank-{down.shape[0]} {dk!r}")
        if not (down.is_floating_point() and up.is_floating_point()):
            raise UserError(f"{p}: {dk!r} holds {down.dtype}, expected floating point")
        rank = down.shape[0]
        if "alpha" in g:
            scale = _alpha(g["alpha"][1], g["alpha"][0], p) / rank
        elif g["style"] == "peft" and component in configs and not underscored:
            scale = peft_scale(configs[component], module, rank, p)
        else:
            scale = 1.0
        entries.append(Entry(component, module, underscored, g["style"], down, up, scale, dk))
        dialects.add(_dialect(dk, g["style"]))
    return LoRAFile(p, entries, "+".join(sorted(dialects)), metadata)
