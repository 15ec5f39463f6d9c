"""Every GPU measurement of the runtime work in one run, written to one JSON file.

Run on a CUDA machine (an H100 / H200 finishes in about 8 minutes; each part has its own time limit and
the whole run a budget, so a slow part costs only itself):

    python benchmarks/gpu_runtime.py --out gpu_runtime.json
    python benchmarks/gpu_runtime.py --device cpu --small --out smoke.json   # the script's logic, tiny, on a CPU

Parts (FLUX.1-dev size, random weights, 1024², batch 1, bf16; ``--parts`` picks some):

* ``bf16``: ``rflow bench`` eager with ``--compare diffusers`` (diffusers eager on the same weights and
  inputs, their outputs compared), the op floor, a whole 28-step image with the VAE decode, peak memory;
* ``fp8``: the linear layers quantized to fp8 and computed with rowwise ``torch._scaled_mm``, against the
  fp8 floor (needs compute capability ≥ 8.9, else recorded as skipped);
* ``offload``: ``--offload blocks --vram 4GiB``: blocks streamed from pinned host memory, against the
  host-link limit (streamed bytes ÷ the measured pinned host-to-device bandwidth);
* ``q8_0_offload``: the same with GGUF Q8_0 weights streamed (about half the bytes);
* ``profile``: the eager bf16 step under ``torch.profiler``: the top kernels and their share of the step;
* ``compiled``: every block ``torch.compile``'d (regional compilation), with its compile time.

Each part runs as its own ``rflow bench`` process (``--jobs subprocess``, the default on CUDA: an
out-of-memory error or a CUDA fault stays in its part) or in this process (``--jobs inprocess``, the
default on the CPU). The JSON is rewritten after every part, so a run cut short keeps what it measured;
``summary`` sets the issue's targets against the figures that exist.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from partrun import arguments, begin, run_inprocess, run_parts, run_subprocess, saver  # noqa: E402  (the shared part runner)

PARTS = ("bf16", "fp8", "offload", "q8_0_offload", "profile", "compiled")
LIMITS = {"bf16": 150, "fp8": 75, "offload": 75, "q8_0_offload": 75, "profile": 60, "compiled": 180}  # seconds
GiB = 2**30


def part_args(name: str, small: bool, device: str) -> list[str] | None:
    """The ``rflow bench`` arguments of a part (None for the profile, which is not a bench)."""
    if name == "profile":
        return None
    base = ["--config", "tiny", "--size", "64", "--iters", "2", "--warmup", "1", "--steps", "2"] if small else \
        ["--config", "flux1-dev", "--size", "1024", "--dtype", "bf16", "--iters", "10", "--warmup", "3"]
    base += ["--device", device]
    vram = [] if small else ["--vram", "4GiB"]  # tiny: stream every block
    extra = {"bf16": ["--compare", "diffusers"],
             "fp8": ["--quant", "fp8", "--compute", "fp8", "--no-image"],
             "offload": ["--offload", "blocks", *vram, "--no-image"],
             "q8_0_offload": ["--quant", "Q8_0", "--offload", "blocks", *vram, "--no-image"],
             "compiled": ["--compile", "--no-image"]}[name]
    if name in ("offload", "q8_0_offload") and not small:
        base[base.index("--iters") + 1] = "5"
    return base + extra


def skip_reason(name: str, small: bool, device: str) -> str | None:
    import torch

    if name == "fp8":
        cap = torch.cuda.get_device_capability(device) if device.startswith("cuda") else None
        if cap is None or cap < (8, 9):
            return f"fp8 compute needs a CUDA GPU of compute capability >= 8.9 ({'CPU' if cap is None else cap})"
    if name == "compiled" and not device.startswith("cuda"):
        return "torch.compile is timed on CUDA only"
    if name in ("offload", "q8_0_offload"):
        if importlib.util.find_spec("rflow.runtime.offload") is None:
            return "rflow.runtime.offload is not in this build"
    return None


# ---------------------------------------------------------------------------------------------- running a part


def bench_part(args: list[str], jobs: str, limit: float, tmp: Path) -> tuple[int | str, str, dict | None]:
    out = tmp / "part.json"
    out.unlink(missing_ok=True)
    argv = ["bench", *args, "--json", str(out)]
    if jobs == "subprocess":
        rc, err = run_subprocess([sys.executable, "-m", "rflow.cli", *argv], limit)
    else:
        from rflow.cli import main

        rc, err = run_inprocess(lambda: main(argv), limit)
    return rc, err, json.loads(out.read_text()) if out.exists() else None


def profile(device: str, small: bool, top: int = 15) -> dict:
    """The eager step of the bf16 part under torch.profiler: the ``top`` kernels by self time."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from rflow.runtime import bench_models as bm
    from rflow.runtime.timing import synchronize

    dev = torch.device(device)
    fam, config = bm.published("flux1-dev")
    config = bm.scaled(fam, config, "tiny" if small else "full")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = bm.build_random(fam, config, dev, dtype, 0)
    side = 64 if small else 1024
    inputs = bm.step_inputs(fam, model, fam.latent_spec(config, 8).shape(1, side, side),
                            bm.TINY_TEXT_TOKENS if small else 512, dev, 3)
    cuda = dev.type == "cuda"
    with torch.inference_mode():
        for _ in range(2):
            model(*inputs.args)
        synchronize(dev)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=acts) as prof:
            for _ in range(3):
                model(*inputs.args)
            synchronize(dev)
    averages = prof.key_averages()
    attr = "self_cpu_time_total"
    if cuda:  # the name of the device-time field changed across torch releases
        attr = next((a for a in ("self_device_time_total", "self_cuda_time_total")
                     if averages and hasattr(averages[0], a)), "self_device_time_total")
    events = [e for e in averages if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    rows = sorted(events, key=lambda e: -getattr(e, attr))[:top]
    return {"clock": "device" if cuda else "cpu", "step_us": total / 3,
            "top": [{"name": e.key[:160], "calls_per_step": e.count / 3, "us_per_step": getattr(e, attr) / 3,
                     "share": getattr(e, attr) / total} for e in rows]}


# ---------------------------------------------------------------------------------------------- summary


def _get(parts: dict, name: str, *keys):
    v = (parts.get(name) or {}).get("result")
    for k in keys:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return v


def summary(parts: dict) -> dict:
    """The issue's targets against the figures this run has (None where a part is missing)."""
    def ratio(a, b):
        return a / b if a is not None and b else None

    rflow, floor = _get(parts, "bf16", "rflow", "ms"), _get(parts, "bf16", "floor", "ms")
    diff = _get(parts, "bf16", "diffusers", "ms")
    fp8, fp8_floor = _get(parts, "fp8", "rflow", "ms"), _get(parts, "fp8", "floor", "ms")
    off, link = _get(parts, "offload", "rflow", "ms"), _get(parts, "offload", "offload", "host_link_limit_ms")
    q8, q8_link = _get(parts, "q8_0_offload", "rflow", "ms"), _get(parts, "q8_0_offload", "offload", "host_link_limit_ms")
    comp = _get(parts, "compiled", "rflow_compiled", "ms")
    peak, dpeak = _get(parts, "bf16", "rflow", "peak_gpu_bytes"), _get(parts, "bf16", "diffusers", "peak_gpu_bytes")
    off_peak = _get(parts, "offload", "rflow", "peak_gpu_bytes")
    s = {"bf16_ms": rflow, "bf16_floor_ms": floor, "bf16_over_floor": ratio(rflow, floor), "diffusers_eager_ms": diff,
         "speedup_vs_diffusers_eager": ratio(diff, rflow), "compiled_ms": comp, "compiled_over_floor": ratio(comp, floor),
         "compile_warmup_s": _get(parts, "compiled", "rflow_compiled", "first_call_s"),
         "fp8_ms": fp8, "fp8_floor_ms": fp8_floor, "fp8_over_floor": ratio(fp8, fp8_floor),
         "offload_ms": off, "offload_host_link_ms": link, "offload_share_of_link": ratio(link, off),
         "offload_peak_gpu_GiB": off_peak / GiB if off_peak else None, "q8_0_offload_ms": q8,
         "q8_0_share_of_link": ratio(q8_link, q8), "q8_0_over_bf16_offload": ratio(q8, off),
         "peak_gpu_GiB": peak / GiB if peak else None, "diffusers_peak_gpu_GiB": dpeak / GiB if dpeak else None}
    best = min((x for x in (rflow, comp) if x is not None), default=None)
    s["targets"] = {
        "bf16 step <= 1.06 x floor": None if best is None or not floor else best <= 1.06 * floor,
        "bf16 step >= 1.7 x faster than diffusers eager": None if best is None or not diff else diff >= 1.7 * best,
        "fp8 step <= 1.07 x its floor": None if fp8 is None or not fp8_floor else fp8 <= 1.07 * fp8_floor,
        "warm-up <= 60 s": None if s["compile_warmup_s"] is None else s["compile_warmup_s"] <= 60,
        "offload >= 0.9 x host-link limit at <= 4 GiB": None if off is None or not link or off_peak is None
        else link >= 0.9 * off and off_peak <= 4 * GiB,
        "peak memory <= diffusers + 3%": None if not peak or not dpeak else peak <= 1.03 * dpeak,
    }
    return s


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = arguments("gpu_runtime.py", __doc__.splitlines()[0], list(PARTS), 480)
    ap.add_argument("--profile-part", help=argparse.SUPPRESS)  # run the profile part alone, into this JSON
    args = ap.parse_args(argv)
    if args.profile_part:
        Path(args.profile_part).write_text(json.dumps(profile(args.device, args.small)))
        return 0

    names, jobs, record = begin("gpu_runtime.py", args, argv, list(PARTS))
    start = time.monotonic()
    save = saver(record, args.out, summary, start)

    with tempfile.TemporaryDirectory(prefix="gpu_runtime-") as tmp:
        def run(name: str, limit: float, entry: dict):
            bench = part_args(name, args.small, args.device)
            if bench is None and jobs == "subprocess":  # its model must not stay cached in this process
                prof_out = Path(tmp) / "profile.json"
                prof_out.unlink(missing_ok=True)
                rc, err = run_subprocess([sys.executable, str(Path(__file__).resolve()), "--profile-part", str(prof_out),
                                          "--device", args.device, *(["--small"] if args.small else [])], limit)
                return rc, err, json.loads(prof_out.read_text()) if prof_out.exists() else None
            if bench is None:
                res: dict = {}
                rc, err = run_inprocess(lambda: res.update(profile(args.device, args.small)) or 0, limit)
                return rc, err, res or None
            entry["argv"] = ["rflow", "bench", *bench]
            return bench_part(bench, jobs, limit, Path(tmp))

        run_parts(record, names, limits=LIMITS, budget=args.budget, limit=args.limit, run=run, save=save,
                  start=start, label="gpu_runtime.py", skip=lambda name: skip_reason(name, args.small, args.device))
    save()
    print(json.dumps(record["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
