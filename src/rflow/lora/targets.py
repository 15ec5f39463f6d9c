"""Which layer, and which of its output rows, each module of a LoRA file adapts.

A file names modules in one of three ways, tried in this order:

1. rflow's own names (the BFL / original checkpoint keys, which are rflow's attribute names), as BFL,
   ComfyUI and kohya files do — kohya with ``_`` for ``.``: each name is looked up among the model's
   linear layers with its dots replaced;
2. XLabs' attention processors (FLUX.1: ``double_blocks.N.processor.qkv_lora1`` is ``img_attn.qkv``,
   ``…lora2`` the text stream's, ``proj_lora*`` the projections; ``single_blocks.N.processor.qkv_lora``
   is the q, k, v rows of ``linear1``, ``proj_lora`` is ``linear2``);
3. diffusers' names, through the family's diffusers -> rflow key plan (``diffusers_plan``, planned for
   just the named layers), run backwards: a layer taken as it is maps to itself, a part of a fused
   layer (``to_q`` of ``qkv``, ``proj_mlp`` of ``linear1``) to its rows — q, k and v are the model's
   width each, the last part the rest — and the final norm's (scale, shift) halves, which FLUX keeps
   as (shift, scale), to the up-projection's rows swapped. A kohya name over diffusers names
   (``lora_transformer_…``) is matched by trying every way to put its ``_`` back as ``.``.

A module none of these finds is a UserError naming the file's key.
"""

from __future__ import annotations

import itertools
import re
from types import ModuleType

from torch import nn

from ..checkpoints.plan import cat, one, swap_halves
from ..errors import UserError
from .layer import LoRAWeight, is_linear
from .read import Entry, LoRAFile

_MAX_SPLITS = 14  # a kohya name of more parts than this is not tried against diffusers names
_XLABS_DOUBLE = re.compile(r"double_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12])")
_XLABS_SINGLE = re.compile(r"single_blocks\.(\d+)\.processor\.(qkv|proj)_lora")


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and is_linear(m)}


def model_width(model: nn.Module) -> int | None:
    """The width of q, k and v in a fused projection (FLUX: hidden_size; Z-Image: dim)."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None)


def _dottings(name: str) -> list[str]:
    """Every way to turn some of ``name``'s ``_`` into ``.`` (a part that starts with a digit stays a
    whole block number, so ``blocks_0_attn`` never becomes ``blocks.0_attn``)."""
    parts = name.split("_")
    if len(parts) > _MAX_SPLITS:
        return []
    out = []
    for seps in itertools.product("._", repeat=len(parts) - 1):
        s = parts[0] + "".join(sep + p for sep, p in zip(seps, parts[1:]))
        if all(not c[:1].isdigit() or c.isdigit() for c in s.split(".")):
            out.append(s)
    return out


def _placeholders(names: list[str]) -> set[str]:
    """Keys ``PREFIX.i.…`` for every block number i up to the largest a name uses, so a key plan numbering
    blocks 0 … n − 1 accepts a LoRA that adapts only some of them (and Z-Image's patch-embedder tag for a
    LoRA on its final layer alone); no plan reads them."""
    out = set()
    for n in names:
        m = re.match(r"all_final_layer\.([^.]+)\.", n)  # Z-Image's patch tag is read from its embedder
        if m:
            out.add(f"all_x_embedder.{m[1]}.rflow-placeholder")
        parts = n.split(".")
        for j, c in enumerate(parts):
            if c.isdigit():
                prefix = ".".join(parts[:j])
                out.update(f"{prefix}.{i}.rflow-placeholder" for i in range(int(c) + 1))
                break
    return out


class Resolver:
    """Maps the entries of one component of a LoRA file onto ``model`` (family ``fam``, or None for a
    text encoder)."""

    def __init__(self, model: nn.Module, fam: ModuleType | None, lora: LoRAFile):
        self.model, self.fam, self.lora = model, fam, lora
        self.layers = linear_layers(model)
        flat: dict[str, list[str]] = {}
        for n in self.layers:
            flat.setdefault(n.replace(".", "_"), []).append(n)
        self.flat = flat

    def weights(self, entries: list[Entry]) -> list[LoRAWeight]:
        out: list[LoRAWeight] = []
        pending: list[tuple[Entry, list[str]]] = []
        for e in entries:
            w = self._own(e)
            if w is not None:
                out.append(w)
            elif self.fam is not None and hasattr(self.fam, "diffusers_plan"):
                pending.append((e, _dottings(e.module) if e.underscored else [e.module]))
            else:
                raise self._unknown(e)
        if pending:
            out += self._diffusers(pending)
        return out

    def _weight(self, e: Entry, layer: str, up=None, offset: int = 0) -> LoRAWeight:
        return LoRAWeight(layer, e.down, e.up if up is None else up, e.scale, offset, self.lora.where(e.key))

    def _unknown(self, e: Entry) -> UserError:
        what = {"transformer": "transformer", "clip": "CLIP text encoder", "t5": "T5 text encoder"}[e.component]
        return UserError(f"{self.lora.where(e.key)}: no layer {e.module!r} in this model's {what}; "
                         "the LoRA was made for another model")

    def _spellings(self, e: Entry) -> list[str]:
        """The module name, and for CLIP also with or without ``text_model.`` (transformers 5 dropped
        that wrapper from CLIPTextModel; the files still name it)."""
        if e.component != "clip":
            return [e.module]
        sep = "_" if e.underscored else "."
        head = f"text_model{sep}"
        return [e.module, e.module.removeprefix(head) if e.module.startswith(head) else head + e.module]

    def _own(self, e: Entry) -> LoRAWeight | None:
        """rflow's own names (dotted or kohya's flattened) and XLabs' processors."""
        for name in self._spellings(e):
            if e.underscored:
                hits = self.flat.get(name, [])
                if len(hits) > 1:
                    raise UserError(f"{self.lora.where(e.key)}: {e.module!r} could be any of {', '.join(hits)}")
                if hits:
                    return self._weight(e, hits[0])
            elif name in self.layers:
                return self._weight(e, name)
        if e.underscored or e.style != "xlabs":
            return None
        m = _XLABS_DOUBLE.fullmatch(e.module)
        if m:
            stream = "img" if m[3] == "1" else "txt"
            return self._weight(e, f"double_blocks.{m[1]}.{stream}_attn.{m[2]}")
        m = _XLABS_SINGLE.fullmatch(e.module)
        if m and m[2] == "proj":
            return self._weight(e, f"single_blocks.{m[1]}.linear2")
        if m:
            width = model_width(self.model)
            if width is not None and e.up.shape[0] != 3 * width:
                raise UserError(f"{self.lora.where(e.key)}: an XLabs qkv LoRA of {e.up.shape[0]} rows, expected "
                                f"{3 * width} (q, k and v of width {width})")
            return self._weight(e, f"single_blocks.{m[1]}.linear1")
        raise self._unknown(e)

    def _diffusers(self, pending: list[tuple[Entry, list[str]]]) -> list[LoRAWeight]:
        names = sorted({c for _, cands in pending for c in cands})
        keys = sorted({f"{c}.weight" for c in names} | _placeholders(names))
        try:
            plan = self.fam.diffusers_plan(keys, partial=True)
        except UserError as err:
            raise UserError(f"{self.lora.where(pending[0][0].key)}: cannot map it onto this {self.fam.TITLE} "
                            f"model ({err})") from None
        parts = {}
        for dst, (srcs, combine) in plan.items():
            layer = dst.removesuffix(".weight")
            if dst.endswith(".weight") and layer in self.layers:
                for i, src in enumerate(srcs):
                    parts[src.removesuffix(".weight")] = (layer, i, len(srcs), combine)
        out = []
        for e, cands in pending:
            hits = [c for c in cands if c in parts]
            if not hits:
                raise self._unknown(e)
            if len(hits) > 1:
                raise UserError(f"{self.lora.where(e.key)}: {e.module!r} could be any of {', '.join(hits)}")
            out.append(self._part(e, *parts[hits[0]]))
        return out

    def _part(self, e: Entry, layer: str, i: int, n: int, combine) -> LoRAWeight:
        where = self.lora.where(e.key)
        if combine is one:
            return self._weight(e, layer)
        if combine is swap_halves:
            if e.up.shape[0] % 2:
                raise UserError(f"{where}: {e.up.shape[0]} rows, expected an even number (scale and shift halves)")
            return self._weight(e, layer, up=swap_halves([e.up]))
        if combine is not cat:  # pragma: no cover - the diffusers plans combine with these three
            raise UserError(f"{where}: cannot map a LoRA onto {layer} ({combine!r})")
        out_rows, width = self.layers[layer].out_features, model_width(self.model)
        rows = [width] * (n - 1) + [out_rows - width * (n - 1)]
        if e.up.shape[0] != rows[i]:
            raise UserError(f"{where}: {e.up.shape[0]} rows, expected {rows[i]} (part {i + 1} of {n} of {layer}, "
                            f"rows {sum(rows[:i])}:{sum(rows[:i + 1])})")
        return self._weight(e, layer, offset=sum(rows[:i]))


def component_models(target) -> tuple[dict[str, nn.Module], ModuleType | None]:
    """The models a LoRA's components go to ({component: model}) and the transformer's family, for a
    :class:`~rflow.pipeline.Pipeline` or a bare transformer."""
    from ..pipeline import Pipeline

    if isinstance(target, Pipeline):
        models = {"transformer": target.transformer}
        for component in ("clip", "t5"):
            m = getattr(target.text_encoders, component, None)
            if isinstance(m, nn.Module):
                models[component] = m
        return models, target.family_module
    if not isinstance(target, nn.Module):
        raise UserError(f"a LoRA goes onto a Pipeline or a transformer, not a {type(target).__name__}")
    fam = None
    if getattr(target, "config", None) is not None:
        from ..compress.units import family_of

        try:
            fam = family_of(target.config)
        except UserError:
            fam = None
    return {"transformer": target}, fam


def lora_weights(lora: LoRAFile, target) -> dict[str, tuple[nn.Module, list[LoRAWeight]]]:
    """{component: (model, its LoRAWeights)} for every component of ``lora``, all mapped and checked
    against ``target``'s layers; a UserError names the first key that does not fit."""
    from .layer import check_weights

    models, fam = component_models(target)
    out = {}
    for component in lora.components:
        entries = [e for e in lora.entries if e.component == component]
        if component not in models:
            raise UserError(f"{lora.where(entries[0].key)}: a LoRA for a {component.upper()} text encoder, which this "
                            f"{'pipeline' if len(models) > 1 or fam is None else fam.TITLE + ' model'} does not have")
        model = models[component]
        weights = Resolver(model, fam if component == "transformer" else None, lora).weights(entries)
        check_weights(model, weights)
        out[component] = (model, weights)
    return out

