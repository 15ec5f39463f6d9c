"""Validation of option values shared by the library and the CLI: finite numbers in range, integers that
fit, seeds, step and layer ranges, devices. Every failure is a one-line :class:`~rflow.errors.UserError`
naming the option as the user spells it (:func:`rflow.errors.flag`).
"""

from __future__ import annotations

import math
import numbers

from .errors import UserError, flag

SEED_MAX = 2**64 - 1
INT_MAX = 2**63 - 1
MAX_STEPS = 10_000


def _name(name: str) -> str:
    return flag(name) if not name.startswith("-") else name


def number(value, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> float:
    """``value`` as a finite float within [low, high] (ends open where asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{_name(name)} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise UserError(f"{_name(name)} must be a finite number, got {value}")
    if low is not None and (v < low or (low_open and v == low)):
        raise UserError(f"{_name(name)} must be {'>' if low_open else '≥'} {low:g}, got {value}")
    if high is not None and (v > high or (high_open and v == high)):
        raise UserError(f"{_name(name)} must be {'<' if high_open else '≤'} {high:g}, got {value}")
    return v


GUIDANCE_MAX = 1000.0  # far above any useful value (FLUX.1-dev is used at 1-10); keeps guidance·1000 a float32


def guidance(value, name: str = "guidance") -> float | None:
    """A distilled-guidance value: finite, within [0, GUIDANCE_MAX]; None (the model's default) passes."""
    return None if value is None else number(value, name, low=0, high=GUIDANCE_MAX)


def integer(value, name: str, *, low: int | None = None, high: int | None = INT_MAX) -> int:
    """``value`` as an int within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{_name(name)} must be an integer, got {value!r}")
    v = int(value)
    if low is not None and v < low:
        raise UserError(f"{_name(name)} must be ≥ {low}, got {v}")
    if high is not None and v > high:
        raise UserError(f"{_name(name)} must be ≤ {high}, got {v}")
    return v


def seed(value, name: str = "seed") -> int:
    """A seed: an integer in 0 … 2^64 − 1 (what torch generators take)."""
    return integer(value, name, low=0, high=SEED_MAX)


def steps(value, name: str = "steps") -> int:
    return integer(value, name, low=1, high=MAX_STEPS)


def int_range(spec: str, name: str, *, low: int, high: int) -> list[int]:
    """'5' -> [5]; '2-5' -> 2..5; '1,3,7' -> those; '0-3,7' mixes both. Sorted, unique, within [low, high]."""
    text = str(spec).strip()
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                i = part.index("-", 1)
                a, b = int(part[:i]), int(part[i + 1:])
            else:
                a = b = int(part)
        except ValueError:
            raise UserError(f"bad {_name(name)} {spec!r}: use N, A-B or A,B,C") from None
        if a > b:
            raise UserError(f"{_name(name)} range {part!r} is reversed: write {b}-{a}")
        if a < low or b > high:
            raise UserError(f"{_name(name)} {part!r} is outside {low}-{high}")
        out.update(range(a, b + 1))
    if not out:
        raise UserError(f"bad {_name(name)} {spec!r}: use N, A-B or A,B,C")
    return sorted(out)


def device(value, name: str = "device"):
    """A torch device that exists here: ``cpu``, ``cuda``, ``cuda:N``, ``mps``; one-line error otherwise."""
    import torch

    if isinstance(value, torch.device):
        dev = value
    else:
        try:
            dev = torch.device(str(value).strip())
        except (RuntimeError, ValueError):
            raise UserError(f"unknown device {value!r} for {_name(name)}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise UserError(f"{_name(name)} {value}: CUDA is not available here (torch {torch.__version__}, {build}, "
                            "sees no GPU)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UserError(f"{_name(name)} {value}: there {'is' if n == 1 else 'are'} only {n} CUDA device(s) (0-{n - 1})")
        return dev
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"{_name(name)} {value}: Apple MPS is not available here")
        return dev
    raise UserError(f"{_name(name)} {value}: rflow runs on cpu, cuda or mps, not {dev.type}")


def layer_spec(spec: str | None, name: str = "layers") -> None:
    """Check a layer selection's syntax (``0-18,30-37`` or ``all``) before the model, which bounds it, is loaded."""
    if spec is not None and spec.strip().lower() != "all":
        int_range(spec, name, low=0, high=INT_MAX)
