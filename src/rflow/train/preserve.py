"""Output preservation for LoRA training: keep the model's behaviour on prompts without the taught words.

The same idea as ai-toolkit's "differential output preservation": with ``--preserve
"magenta=red|blue,star=circle|square"`` every training caption gets a *preservation prompt* in which each
taught word (``magenta``, ``star``; whole words or phrases, any case) is replaced by one of its stand-ins
(drawn per sample from the step's generator, one stand-in per word for the whole caption). Beside the
flow-matching loss, the LoRA's prediction for that prompt at the same noisy latent and timestep is pulled
towards the base model's own prediction (the adapter switched off, no gradient), weighted like the
flow-matching loss and times ``preserve_weight``. A caption without any taught word is its own
preservation prompt, so base-grammar images in the data (prior preservation) hold the LoRA to the base
model's output on them, not only to their pixels.

Every preservation prompt a caption can give is encoded with the captions before training (so the text
encoders can still be unloaded); a spec whose alternatives multiply past :data:`MAX_PROMPTS` prompts is
refused up front.
"""

from __future__ import annotations

import contextlib
import itertools
import re

import torch

from ..errors import UserError

MAX_PROMPTS = 20_000  # preservation prompts over a whole dataset, all encoded before training
_BAD = re.compile(r"[=,|]")


def parse_preserve(spec: str) -> dict[str, tuple[str, ...]]:
    """``"word=stand-in|stand-in,word=stand-in"`` → {word: stand-ins}; ``""`` → {} (no preservation)."""
    if not spec or not spec.strip():
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for part in spec.split(","):
        word, eq, alts = part.partition("=")
        word = " ".join(word.split())
        stand_ins = tuple(" ".join(a.split()) for a in alts.split("|"))
        if not eq or not word or not all(stand_ins):
            raise UserError(f"--preserve {spec!r}: write WORD=STAND-IN[|STAND-IN...] pairs separated by commas, "
                            "e.g. magenta=red|blue,star=circle")
        if word.lower() in (w.lower() for w in out):
            raise UserError(f"--preserve {spec!r}: {word!r} is given twice")
        if any(s.lower() == word.lower() for s in stand_ins):
            raise UserError(f"--preserve {spec!r}: {word!r} cannot stand in for itself")
        out[word] = stand_ins
    return out


def _pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


class Preservation:
    """The preservation prompts of one run's captions (``words``: :func:`parse_preserve`'s map)."""

    def __init__(self, words: dict[str, tuple[str, ...]]):
        self.words = dict(words)
        self.order = list(self.words)  # one draw per word and sample, in this order
        self.patterns = {w: _pattern(w) for w in self.order}

    def present(self, caption: str) -> list[str]:
        return [w for w in self.order if self.patterns[w].search(caption)]

    def prompt(self, caption: str, choice: list[int]) -> str:
        """``caption`` with word ``order[i]`` replaced by its stand-in ``choice[i] % len(stand-ins)``."""
        for w, c in zip(self.order, choice):
            alts = self.words[w]
            caption = self.patterns[w].sub(lambda _m, s=alts[c % len(alts)]: s, caption)
        return caption

    def variants(self, caption: str) -> list[str]:
        """Every preservation prompt ``caption`` can give (the caption itself when it has no taught word)."""
        present = self.present(caption)
        if not present:
            return [caption]
        out = []
        for combo in itertools.product(*(range(len(self.words[w])) for w in present)):
            pick = dict(zip(present, combo))
            out.append(self.prompt(caption, [pick.get(w, 0) for w in self.order]))
        return list(dict.fromkeys(out))

    def all_prompts(self, captions: list[str]) -> list[str]:
        """The preservation prompts of ``captions`` (deduplicated), refused past :data:`MAX_PROMPTS`."""
        out: dict[str, None] = {}
        for c in dict.fromkeys(captions):
            for v in self.variants(c):
                out[v] = None
            if len(out) > MAX_PROMPTS:
                raise UserError(f"--preserve: the captions give over {MAX_PROMPTS} preservation prompts to encode; "
                                "give fewer stand-ins per word")
        return list(out)

    def draw(self, n: int, g: torch.Generator) -> list[list[int]]:
        """One stand-in choice per word for each of ``n`` samples (a fixed number of draws: exact resume)."""
        return torch.randint(0, 2**31 - 1, (n, len(self.order)), generator=g).tolist()


@contextlib.contextmanager
def adapter_off(model: torch.nn.Module, name: str):
    """LoRA ``name`` switched off on every layer of ``model`` for the ``with`` block (the base model)."""
    from ..lora.layer import lora_layers

    held = []
    for _, stack in lora_layers(model).values():
        if name in stack.multipliers:
            held.append((stack, stack.multipliers[name]))
            stack.multipliers[name] = 0.0
    try:
        yield
    finally:
        for stack, m in held:
            stack.multipliers[name] = m
