"""Timing and memory probes shared by ``rflow bench`` and the scripts in ``benchmarks/``.

Times are milliseconds. On CUDA they come from CUDA events around each call, after a synchronise, so
they measure the device's work; on the CPU from ``time.perf_counter``. Every timer runs its warm-up
calls first and reports the median, so one slow call (allocator growth, a cache miss) does not move
the figure. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (reset per phase) and the
process's resident high-water mark ``VmHWM`` from ``/proc/self/status`` on the host (reset per phase by
writing 5 to ``/proc/self/clear_refs``; None where Linux does not offer it).
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(fn: Callable[[], object], device: torch.device, n: int) -> float:
    """Milliseconds per call of ``n`` back-to-back calls."""
    if device.type == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            fn()
        e.record()
        torch.cuda.synchronize(device)
        return s.elapsed_time(e) / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


def time_calls(fn: Callable[[], object], device: torch.device, *, iters: int, warmup: int) -> dict:
    """``fn()`` timed one call at a time: ``warmup`` calls first, then ``iters`` timed ones. Returns
    ``{"ms": median, "min_ms", "max_ms", "all_ms"}``."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        synchronize(device)
        times = [_timed_ms(fn, device, 1) for _ in range(iters)]
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "all_ms": times}


def time_op(fn: Callable[[], object], device: torch.device, *, reps: int = 10, samples: int = 5,
            warmup: int = 3) -> float:
    """Median milliseconds per call of a short operation (a kernel): ``samples`` groups of ``reps``
    back-to-back calls each, so launch gaps between calls do not count against the kernel."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        synchronize(device)
        return statistics.median(_timed_ms(fn, device, reps) for _ in range(samples))


def first_call_s(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, synchronised (the first call: warm-up, autotuning, compiling)."""
    with torch.inference_mode():
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_host_peak() -> bool:
    """Reset the resident high-water mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_peak_bytes() -> int | None:
    """Peak resident memory of this process since the last :func:`reset_host_peak` (VmHWM)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def host_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


class Peaks:
    """``with Peaks(device) as p: ...`` then ``p.gpu`` (bytes, None off CUDA) and ``p.host`` (bytes or None):
    the peaks reached inside the block."""

    def __init__(self, device: torch.device):
        self.device, self.gpu, self.host = device, None, None

    def __enter__(self) -> "Peaks":
        free(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._host = reset_host_peak()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.gpu = int(torch.cuda.max_memory_allocated(self.device))
        self.host = host_peak_bytes() if self._host else None


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- the machine


def capability(device: torch.device) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({platform.processor() or 'unknown'})"


def environment(device: torch.device) -> dict:
    """Date, device, versions: what every benchmark record starts with."""
    import datetime

    cap = capability(device)
    try:  # the installed version, without importing it (seconds)
        from importlib.metadata import PackageNotFoundError, version

        diffusers_version = version("diffusers")
    except PackageNotFoundError:
        diffusers_version = None
    from .. import __version__

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": device_name(device), "capability": f"{cap[0]}.{cap[1]}" if cap else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "rflow_version": __version__,
            "diffusers_version": diffusers_version, "python": platform.python_version(), "host": platform.node(),
            "threads": torch.get_num_threads()}
