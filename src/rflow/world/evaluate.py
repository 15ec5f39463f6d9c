"""Adherence of a model on the captioned-shapes world: generate from grammar prompts, score them.

Two prompt sets: ``n`` prompts drawn from the training grammar (fresh renders never seen in
training) and, reported separately, prompts that contain the held-out colour×shape pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import shapes
from ..pipeline import Pipeline

EVAL_SEED_OFFSET = 1_000_000  # eval prompt seeds never coincide with training-step seeds of small runs


@dataclass
class EvalResult:
    prompts: list[str]
    images: list
    report: shapes.ScoreReport
    heldout_prompts: list[str]
    heldout_images: list
    heldout_report: shapes.ScoreReport | None

    def summary(self) -> dict:
        out = {"adherence": self.report.adherence, **{f"acc_{k}": v for k, v in self.report.accuracy.items()},
               "n": len(self.prompts)}
        if self.heldout_report is not None:
            out.update({"heldout_adherence": self.heldout_report.adherence, "heldout_n": len(self.heldout_prompts)})
        return out


def generate_batched(pipe: Pipeline, prompts: list[str], *, batch: int = 50, seed: int = 0,
                     progress: Callable[[int], None] | None = None, **kw) -> list:
    """``pipe.generate`` over ``prompts`` in batches (batch k seeded ``seed + k·batch``); ``progress(done)``
    after each batch."""
    images = []
    for i in range(0, len(prompts), batch):
        images += pipe.generate(prompts[i : i + batch], seed=(seed + i) % 2**64, **kw)
        if progress is not None:
            progress(len(images))
    return images


def evaluate(pipe: Pipeline, *, n: int = 200, prompts: list[str] | None = None, heldout: int = 50, steps: int = 20,
             solver: str = "euler", seed: int = 0, guidance: float | None = None, cfg: float = 1.0, batch: int = 50,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    """Generate and score ``n`` grammar prompts (or the given ``prompts``) and ``heldout`` held-out-pair
    prompts; ``progress(done)`` counts images over both sets."""
    kw = dict(steps=steps, solver=solver, guidance=guidance, cfg=cfg, batch=batch, seed=seed)
    if prompts is None:
        prompts = shapes.prompts(n, seed=EVAL_SEED_OFFSET + seed, split="train")
    images = generate_batched(pipe, prompts, progress=progress, **kw)
    h_prompts = shapes.prompts(heldout, seed=EVAL_SEED_OFFSET + seed, split="heldout") if heldout else []
    done = len(images)
    h_images = generate_batched(pipe, h_prompts, progress=(lambda k: progress(done + k)) if progress else None,
                                **kw) if heldout else []
    return EvalResult(prompts, images, shapes.score(images, prompts), h_prompts, h_images,
                      shapes.score(h_images, h_prompts) if heldout else None)
