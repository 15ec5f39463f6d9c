"""How long ``rflow --help`` and ``rflow --version`` take (the CLI imports torch only in commands).

    python benchmarks/cli_startup.py [--runs 10]

Prints the median wall time of each over ``--runs`` fresh processes, as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time


def median_seconds(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    base = [sys.executable, "-m", "rflow.cli"]
    res = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "python": platform.python_version(), "runs": args.runs,
           "help_s": round(median_seconds(base + ["--help"], args.runs), 3),
           "version_s": round(median_seconds(base + ["--version"], args.runs), 3)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
