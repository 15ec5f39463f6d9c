"""Regional compilation's warm-up, cold and cached: two fresh processes compile the same model.

Each child loads the model, applies ``optimize_(transformer, compile="blocks")`` and times two
generations of ``--steps`` steps: the first one compiles (cold in the first child, from the persistent
cache in the second), the second one is the compiled speed. Both children share one empty cache folder
(``RFLOW_CACHE_DIR``), so the difference between the two first-call times is what the cache saves.

    .venv/bin/python benchmarks/compile_cache.py [--model rflow-tiny] [--device cpu|cuda] [--steps 2]
        [--size WxH] [--json OUT]

Prints one JSON record (``cold``/``warm``: seconds of the first and second generation, the optimize_
summary; the device, torch version and command), also written to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
import torch
import rflow
from rflow.runtime.speed import optimize_, pipeline_tokens
model, device, steps, w, h = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
pipe = rflow.load(model, device=device)
w, h = pipe.resolve_size(w or None, h or None)
done = optimize_(pipe.transformer, compile="blocks", tokens=pipeline_tokens(pipe, w, h))
times = []
for _ in range(2):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe.generate("a red circle on a blue background", steps=steps, width=w, height=h, output_type="latent")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
print(json.dumps({"first_s": times[0], "second_s": times[1], "optimize": done}))
"""


def child(args, cache: str) -> dict:
    w, h = (int(v) for v in args.size.lower().split("x")) if args.size else (0, 0)
    env = {**os.environ, "RFLOW_CACHE_DIR": cache}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, args.model, args.device, str(args.steps), str(w), str(h)],
                         env=env, check=True, capture_output=True, text=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["process_s"] = time.perf_counter() - t0
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="rflow-tiny")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", default=None, help="WxH (default: the model's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="rflow-compile-cache-") as cache:
        cold = child(args, cache)
        warm = child(args, cache)
    rec = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "cold": cold, "warm": warm}
    text = json.dumps(rec, indent=1)
    print(text)
    if args.json:
        from rflow.outputs import atomic_write_bytes

        atomic_write_bytes(args.json, (text + "\n").encode())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
