"""What every command shares: the two consoles, the progress display, warnings as one line, the
``--force`` option and the check that every number a user typed is finite and fits."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import sys
import time
from typing import Callable, Iterator

import typer
from rich.console import Console

from ..outputs import check_interrupt
from ..errors import UserError
from ..options import INT_MAX, seed as check_seed

console = Console(stderr=True)  # messages, progress
out = Console()  # results

FORCE_HELP = "replace OUTPUT if it already exists (it is swapped in only when the new one is complete)"
MODEL_HELP = ("model: rflow pipeline folder, BFL/ComfyUI .safetensors, diffusers transformer/ or pipeline folder, "
              "or rflow-tiny (the default, built in)")


def force_option():
    return typer.Option(False, "--force", help=FORCE_HELP)


# ---------------------------------------------------------------------------------------------- progress

PLAIN_INTERVAL_S = float(os.environ.get("RFLOW_PROGRESS_INTERVAL", "5"))


class _Plain:
    """Progress as plain lines on stderr (not a terminal): one line per interval, and the last one if any
    was printed, so a short run prints nothing."""

    def __init__(self, description: str, total: int):
        self.description, self.total = description, max(1, int(total))
        self.last, self.printed = time.monotonic(), False

    def update(self, completed: int, total: int | None = None, description: str | None = None) -> None:
        check_interrupt()
        if total:
            self.total = max(1, int(total))
        if description:
            self.description = description
        now = time.monotonic()
        if now - self.last >= PLAIN_INTERVAL_S or (completed >= self.total and self.printed):
            print(f"{self.description}: {completed}/{self.total}", file=sys.stderr, flush=True)
            self.last, self.printed = now, True


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """``with progress("sampling", n) as update: update(i + 1)`` — a rich bar on a terminal, plain lines
    otherwise; ``update(completed, total=None, description=None)``. ``total`` is always known."""
    if not console.is_terminal:
        yield _Plain(description, total).update
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=max(1, int(total)))

        def update(completed: int, total: int | None = None, description: str | None = None) -> None:
            check_interrupt()
            kw = {"completed": completed}
            if total:
                kw["total"] = max(1, int(total))
            if description:
                kw["description"] = description
            bar.update(task, **kw)

        yield update


# ---------------------------------------------------------------------------------------------- numbers


def _flag_of(param: inspect.Parameter) -> str:
    decls = [d for d in getattr(param.default, "param_decls", ()) or () if isinstance(d, str)]
    longs = [d for d in decls if d.startswith("--")]
    return (longs or decls or ["--" + param.name.replace("_", "-")])[0]


def checked_numbers(fn: Callable) -> Callable:
    """Wrap a command so that every float option is finite, every int fits in 64 bits, seeds are in
    0 … 2^64 − 1 — before the command runs. Ranges beyond that are each command's to check."""
    sig = inspect.signature(fn)
    flags = {name: _flag_of(p) for name, p in sig.parameters.items()}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for name, v in kwargs.items():
            values = v if isinstance(v, (list, tuple)) else [v]
            for x in values:
                if isinstance(x, bool):
                    continue
                if isinstance(x, float) and not math.isfinite(x):
                    raise UserError(f"{flags[name]} must be a finite number, got {x}")
                if isinstance(x, int):
                    if name == "seed":
                        check_seed(x, flags[name])
                    elif not -INT_MAX <= x <= INT_MAX:
                        raise UserError(f"{flags[name]} {x} is out of range")
        return fn(*args, **kwargs)

    return wrapper


def check_all_commands(app: typer.Typer) -> None:
    """Apply :func:`checked_numbers` to every command of ``app`` and its sub-apps."""
    for cmd in app.registered_commands:
        if cmd.callback is not None and not hasattr(cmd.callback, "__wrapped__"):
            cmd.callback = checked_numbers(cmd.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            check_all_commands(group.typer_instance)
