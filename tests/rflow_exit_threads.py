"""`rflow ARGS…` that prints, at exit, the threads of a process group still alive in this process
("group threads at exit: [...]"; Linux names its threads in /proc). Every rank must have freed its group
by then: one left to interpreter shutdown aborts now and then ("terminate called without an active
exception"). Run as `python tests/rflow_exit_threads.py ARGS…`, or as torchrun's script."""

import atexit
import os
import sys


def group_threads() -> list[str] | str:
    if not os.path.isdir("/proc/self/task"):
        return "unknown (no /proc)"
    names = []
    for t in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{t}/comm") as f:
            names.append(f.read().strip())
    return sorted(n for n in names if n.startswith(("gloo", "pt_gloo", "pt_tcpstore", "pt_nccl")))


if __name__ == "__main__":
    atexit.register(lambda: print("group threads at exit:", group_threads(), file=sys.stderr, flush=True))
    from rflow.cli import main

    sys.exit(main(sys.argv[1:]))
