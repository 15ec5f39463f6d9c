"""The part runner of the GPU benchmark scripts (gpu_runtime.py, lora_step.py).

Each part runs in its own process (an out-of-memory error or a CUDA fault stays in its part, and its
peak memory is its own) or in this one (on the CPU, for tests), under its own time limit inside the
run's budget; the JSON record is rewritten after every part, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


class PartTimeout(BaseException):
    """A part ran past its limit (in-process runs)."""


def run_subprocess(argv: list[str], limit: float) -> tuple[int | str, str]:
    """(exit code or "timeout", stderr) of ``argv`` in its own session, killed with it on timeout."""
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=limit)
        return p.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        return "timeout", err


@contextlib.contextmanager
def alarm(limit: float):
    def fire(signum, frame):
        raise PartTimeout

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(limit, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_inprocess(fn, limit: float) -> tuple[int | str, str]:
    """(``fn()``'s return value, 1 on an exception or "timeout"; its stderr) with ``fn`` stopped at ``limit``."""
    err = io.StringIO()
    try:
        with alarm(limit), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = fn()
    except PartTimeout:
        rc = "timeout"
    except Exception as e:  # noqa: BLE001 - a part's failure is recorded, the run goes on
        rc = 1
        err.write(f"{type(e).__name__}: {e}\n")
    return rc, err.getvalue()


def run_parts(record: dict, names: list[str], *, limits: dict[str, float], budget: float, limit: float | None,
              run: Callable[[str, float, dict], tuple], save: Callable[[], None], start: float, label: str,
              skip: Callable[[str], str | None] = lambda name: None) -> None:
    """Run each part ``name`` of ``names`` as ``run(name, limit, entry) -> (rc, stderr, result)`` under
    ``limit`` (or ``limits[name]``) and what is left of ``budget`` since ``start``; its entry in
    ``record["parts"]`` gets status ok / error / timeout / skipped (``skip(name)``'s reason, or no time
    left), exit code, wall time, result and, unless ok, the end of its stderr; ``save()`` after each."""
    for name in names:
        left = budget - (time.monotonic() - start)
        part_limit = min(limit or limits[name], left)
        entry = record["parts"][name] = {"limit_s": part_limit}
        why = skip(name) or ("no time left in --budget" if part_limit < 1 else None)
        if why:
            entry.update(status="skipped", reason=why)
            save()
            continue
        print(f"{label}: {name} (limit {part_limit:.0f} s)", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        rc, err, result = run(name, part_limit, entry)
        status = "ok" if rc == 0 and result is not None else "timeout" if rc == "timeout" else "error"
        entry.update(status=status, rc=rc, wall_s=time.monotonic() - t0, result=result)
        if status != "ok":
            entry["stderr_tail"] = err.strip().splitlines()[-12:]
        print(f"{label}: {name}: {status} in {entry['wall_s']:.1f} s", file=sys.stderr, flush=True)
        save()


def begin(script: str, args, argv: list[str] | None, known: list[str] | tuple[str, ...]) -> tuple[list[str], str, dict]:
    """Check a run of ``script`` (``args``: its parsed --device, --small, --parts, --jobs, --budget) and
    return (part names, jobs, the record's head: environment, command line, settings); a bad run exits
    with ``SCRIPT: error: ...``."""
    import torch

    from rflow.runtime.timing import environment

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"{script}: error: needs a CUDA device (or --device cpu --small to check the script)")
    if not cuda and (args.device != "cpu" or not args.small):
        raise SystemExit(f"{script}: error: on the CPU it runs only as --device cpu --small")
    names = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in names if p not in known]
    if bad or not names:
        raise SystemExit(f"{script}: error: unknown part {bad[0] if bad else '(none)'}; choose {', '.join(known)}")
    jobs = args.jobs or ("subprocess" if cuda else "inprocess")
    record = {"script": f"benchmarks/{script}", **environment(torch.device(args.device)),
              "command": " ".join(["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])]),
              "small": args.small, "jobs": jobs, "budget_s": args.budget, "parts": {}}
    return names, jobs, record


def saver(record: dict, out: str, summary: Callable[[dict], dict], start: float) -> Callable[[], None]:
    """``save()``: the record with its summary and wall time, written to ``out`` atomically."""
    import json

    from rflow.outputs import atomic_write_bytes

    def save() -> None:
        record["summary"] = summary(record["parts"])
        record["wall_s"] = time.monotonic() - start
        atomic_write_bytes(out, (json.dumps(record, indent=1, allow_nan=False) + "\n").encode())

    return save


def arguments(script: str, description: str, parts, budget: float):
    """The argument parser every part-running script starts from: --out, --device, --small, --parts,
    --budget, --limit, --jobs."""
    import argparse

    ap = argparse.ArgumentParser(prog=script, description=description)
    ap.add_argument("--out", default=script.replace(".py", ".json"), help="the JSON record (rewritten after every part)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny models: a check of the script, not a benchmark")
    ap.add_argument("--parts", default=",".join(parts), help=f"comma-separated, of {', '.join(parts)}")
    ap.add_argument("--budget", type=float, default=budget, help=f"seconds for the whole run (default {budget:g})")
    ap.add_argument("--limit", type=float, help="seconds per part (default: each part's own)")
    ap.add_argument("--jobs", choices=("subprocess", "inprocess"), help="default: subprocess on CUDA, else inprocess")
    return ap
