"""What a model is run on for analysis, capture and measurement: prompts × sizes × step counts.

Prompts come from a file (one per line), the shapes world (``--shapes N``), or the built-in seeded
calibration generator; each prompt draws its size and step count from the given lists, seeded, so
statistics cover how people really sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UserError


MAX_PROMPTS = 100_000


@dataclass(frozen=True)
class Run:
    index: int
    prompt: str
    width: int
    height: int
    steps: int
    seed: int


@dataclass
class Workload:
    prompts: list[str]
    sizes: list[tuple[int, int]]
    steps: list[int]
    seed: int = 0
    source: str = ""

    def runs(self) -> Iterator[Run]:
        rng = np.random.default_rng(self.seed)
        for i, p in enumerate(self.prompts):
            w, h = self.sizes[int(rng.integers(len(self.sizes)))]
            s = self.steps[int(rng.integers(len(self.steps)))]
            yield Run(i, p, w, h, s, (self.seed + i) % 2**64)

    def shard(self, rank: int, world: int) -> "Workload":
        """This rank's share for multi-process runs (runs keep their global index and seed)."""
        w = Workload(self.prompts, self.sizes, self.steps, self.seed, self.source)
        w._only = (rank, world)  # type: ignore[attr-defined]
        return w

    def my_runs(self) -> Iterator[Run]:
        rank, world = getattr(self, "_only", (0, 1))
        for r in self.runs():
            if r.index % world == rank:
                yield r

    def describe(self) -> dict:
        return {"prompts": len(self.prompts), "sizes": [f"{w}x{h}" for w, h in self.sizes], "steps": self.steps,
                "seed": self.seed, "source": self.source}


def parse_sizes(spec: str) -> list[tuple[int, int]]:
    sizes = []
    for part in spec.split(","):
        try:
            w, h = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise UserError(f"bad size {part!r}: use WxH, e.g. 1024x1024,832x1216") from None
        if w <= 0 or h <= 0:
            raise UserError(f"bad size {part!r}: sides must be positive")
        if w > 1 << 20 or h > 1 << 20:
            raise UserError(f"bad size {part!r}: sides of at most {1 << 20} pixels")
        sizes.append((w, h))
    return sizes


def parse_steps(spec: str) -> list[int]:
    """'20' -> [20]; '15-30' -> 15..30; '10,20,28' -> those."""
    from ..options import MAX_STEPS, int_range

    return int_range(spec, "steps", low=1, high=MAX_STEPS)


def read_prompts(path: str | os.PathLike) -> list[str]:
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{p}: is a directory; --prompts takes a text file, one prompt per line")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise UserError(f"{p}: no such prompt file") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: prompt file is not UTF-8 text") from None
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise UserError(f"{p}: no prompts (one per line; # starts a comment)")
    return prompts


def make_workload(*, prompts_file: str | os.PathLike | None = None, shapes_n: int | None = None,
                  calibration_n: int = 64, sizes: str | None = None, steps: str | None = None, seed: int = 0,
                  default_size: tuple[int, int] = (1024, 1024), default_steps: int = 20) -> Workload:
    """One workload from CLI-style options (``--prompts`` and ``--shapes`` are exclusive). Sizes and step
    counts are parsed first, so a bad one is reported before any prompt is read or made."""
    from ..options import integer, seed as check_seed

    if prompts_file is not None and shapes_n is not None:
        raise UserError("give --prompts FILE or --shapes N, not both")
    check_seed(seed)
    size_list = parse_sizes(sizes) if sizes else [default_size]
    step_list = parse_steps(steps) if steps else [default_steps]
    if prompts_file is not None:
        prompts, source = read_prompts(prompts_file), f"file:{Path(prompts_file).name}"
    elif shapes_n is not None:
        integer(shapes_n, "--shapes", low=1, high=MAX_PROMPTS)
        from ..world import shapes

        prompts, source = shapes.prompts(shapes_n, seed=seed, split="train"), "shapes"
    else:
        integer(calibration_n, "--calibration", low=1, high=MAX_PROMPTS)
        from .calibration import calibration_prompts

        prompts, source = calibration_prompts(calibration_n, seed=seed), "calibration"
    return Workload(prompts, size_list, step_list, seed, source)
