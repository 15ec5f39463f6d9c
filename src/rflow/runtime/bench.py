"""``rflow bench``: how fast one transformer step and one whole image run here, against the op floor of
that step on this device and, optionally, against diffusers' model with the same weights.

What is measured (every figure lands in one JSON record, see :func:`run`):

* **step**: the transformer's forward pass on random inputs of the requested size and batch (sigma 0.5,
  the family's full text length), timed one call at a time after ``warmup`` calls, median of ``iters``
  (CUDA events on a GPU, ``perf_counter`` on the CPU), in inference mode; ``first_call_s`` is the wall
  time of the very first call (allocations, kernel selection; with ``compile`` the compilation);
  peak GPU memory (``max_memory_allocated``, weights included) and peak host memory (VmHWM) per phase.
* **image**: ``steps`` Euler steps through the family's denoiser plus the VAE decode, end to end
  (text encoding excluded: the conditioning is random), and the decode alone.
* **floor**: every matmul and attention of the step timed alone at the best speed of this device
  (:mod:`.floor`); each step figure is also given as a ratio to it.
* **diffusers** (``compare="diffusers"``): diffusers' model built from the same config, holding the
  same tensors (:mod:`.diffusers_ref`), timed the same way on the same inputs; how far its output is
  from rflow's (before any quantization) is recorded.

Random weights (``config``) are built on the meta device and initialised on the device
(:mod:`.bench_models`); a ``model`` path is loaded as ``rflow.load`` would (text encoders aside).
Options are checked before any model is built (:func:`check`).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from ..errors import NonFiniteError, UserError, warn
from . import bench_models as bm
from . import floor as floor_mod
from .bench_options import Checked, Options, _fits_on, check, command_line, offload_function  # noqa: F401 (re-exported)
from .timing import Peaks, environment, first_call_s, free, synchronize, time_calls

RECORD_VERSION = 1


# ---------------------------------------------------------------------------------------------- the run


def _entry(timing: dict, peaks: Peaks, first_s: float) -> dict:
    return {**timing, "first_call_s": first_s, "peak_gpu_bytes": peaks.gpu, "peak_host_bytes": peaks.host}


def _time_step(fn: Callable, dev: torch.device, o: Options) -> dict:
    with Peaks(dev) as peaks:
        first = first_call_s(fn, dev)
        timing = time_calls(fn, dev, iters=o.iters, warmup=o.warmup)
    return _entry(timing, peaks, first)


def _finite(out: torch.Tensor, what: str) -> bool:
    ok = bool(torch.isfinite(out).all())
    if not ok:
        warn(f"{what} produced NaN/inf with these random weights; its timings stand, its numbers do not")
    return ok


def _h2d_gbps(dev: torch.device) -> float:
    """Pinned host -> device bandwidth, GB/s (256 MiB copies, median of 5)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=dev)
    from .timing import time_op

    ms = time_op(lambda: dst.copy_(src, non_blocking=True), dev, reps=4, samples=5, warmup=2)
    return src.numel() / (ms * 1e-3) / 1e9


def _image(fam, model, codec, inputs: bm.StepInputs, steps: int, dev: torch.device, o: Options,
           denoiser_options: dict) -> dict:
    from ..families.base import Guidance, guided
    from ..sampling import sample

    denoiser = fam.Denoiser(model, **denoiser_options)
    velocity = guided(denoiser, inputs.cond, None, Guidance())
    noise = torch.randn(inputs.latent_shape, generator=torch.Generator(device=dev).manual_seed(o.seed + 2), device=dev)
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=dev)

    def decode():
        return codec.decode(noise)

    with Peaks(dev) as peaks:
        first_decode = first_call_s(decode, dev)
        dec = time_calls(decode, dev, iters=min(o.iters, 3), warmup=0)
        with torch.inference_mode():
            synchronize(dev)
            t0 = time.perf_counter()
            try:
                img = codec.decode(sample(velocity, noise, sigmas, "euler"))
            except NonFiniteError as e:
                warn(f"whole image: {e}")
                return {"error": str(e)}
            synchronize(dev)
            total = time.perf_counter() - t0
    return {"steps": steps, "s": total, "decode_ms": dec["ms"], "decode_first_call_s": first_decode,
            "finite": _finite(img, "the VAE decode"), "compiled": o.compile, "peak_gpu_bytes": peaks.gpu,
            "peak_host_bytes": peaks.host}


def run(o: Options, progress: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark ``o`` describes and return its record (see the module docstring)."""
    say = progress or (lambda msg: None)
    c = check(o)
    dev, dtype = c.device, c.dtype
    torch.backends.cuda.matmul.allow_tf32 = True
    res: dict = {"rflow_bench": RECORD_VERSION, **environment(dev), "command": command_line(o)}
    say("building the model")
    t0 = time.perf_counter()
    offloading = o.offload != "none"
    if o.model is None:
        fam, config = c.family, c.config
        model = bm.build_random(fam, config, dev, dtype, o.seed, host=offloading and not _fits_on(c, dev))
        codec = bm.random_codec(fam, "tiny" if o.config == "tiny" else o.scale, dev, dtype, o.seed + 1) if o.image else None
        name, weights, denoiser_options, text_len = o.config or "flux1-dev", "random", {}, None
    else:
        loaded = bm.load_checkpoint(o.model, torch.device("cpu") if offloading else dev, dtype)
        fam, model, codec, name = loaded.family, loaded.model, loaded.codec, loaded.name
        config, weights, denoiser_options, text_len = model.config, "checkpoint", loaded.denoiser_options, loaded.text_tokens
        if codec is not None:
            codec = codec.to(dev)
    synchronize(dev)
    build_s = time.perf_counter() - t0
    spec = fam.latent_spec(config, bm.codec_factor(fam, codec))
    if c.width % spec.size_multiple or c.height % spec.size_multiple:
        raise UserError(f"--size {c.width}x{c.height}: {fam.TITLE} needs sides that are multiples of {spec.size_multiple}")
    small = o.config == "tiny" or o.scale == "tiny"
    scale = "tiny" if small else o.scale
    text_tokens = o.text_tokens or text_len or (bm.TINY_TEXT_TOKENS if small else fam.MAX_SEQUENCE_LENGTH)
    inputs = bm.step_inputs(fam, model, spec.shape(o.batch, c.height, c.width), text_tokens, dev, o.seed + 3)
    n_params = sum(p.numel() for p in model.parameters())
    res["config"] = {"name": name, "family": fam.NAME, "title": fam.TITLE, "weights": weights, "scale": scale,
                     "parameters": n_params, "config": config.to_dict(), "width": c.width, "height": c.height,
                     "batch": o.batch, "dtype": str(dtype).removeprefix("torch."), "compute": o.compute, "quant": c.quant,
                     "offload": o.offload, "vram_bytes": c.vram, "compile": o.compile, "iters": o.iters,
                     "warmup": o.warmup, "seed": o.seed, "image_tokens": inputs.image_tokens, "text_tokens": text_tokens}
    res["build"] = {"s": build_s}
    step = lambda: model(*inputs.args)  # noqa: E731

    if o.compare is not None:
        res["diffusers"] = _compare(fam, model, inputs, step, dev, o, say)

    if c.quant is not None:
        from ..quant.api import plan_summary, quantize_

        say(f"quantizing to {c.quant}")
        t0 = time.perf_counter()
        quantize_(model, c.quant, compute=o.compute)
        synchronize(dev)
        s = plan_summary(model)
        res["quantize"] = {"s": time.perf_counter() - t0, "format": c.quant, "weight_bytes": s["bytes"],
                           "bf16_weight_bytes": s["bf16_bytes"], "model_bytes": s["model_bytes"]}
    if offloading:
        res["offload"] = _offload(model, c, say)

    say("timing rflow's step")
    with Peaks(dev) as peaks:
        first = first_call_s(step, dev)
        out, ops = floor_mod.capture(step, model)  # the second call records the step's matmuls and attentions
        finite = _finite(out, "rflow's step")
        del out
        timing = time_calls(step, dev, iters=o.iters, warmup=o.warmup)
    res["rflow"] = {**_entry(timing, peaks, first), "finite": finite}

    if o.compile:
        from .speed import optimize_

        say("compiling the blocks")
        done = optimize_(model, compile="blocks", tokens=inputs.image_tokens + text_tokens)
        res["rflow_compiled"] = {**_time_step(step, dev, o), "blocks": done["compile"]["blocks"], "optimized": done}

    if o.image and codec is not None:
        say(f"timing a whole image ({o.steps or bm.DEFAULT_STEPS.get(name, 28)} steps + VAE decode)")
        res["image"] = _image(fam, model, codec, inputs, o.steps or bm.DEFAULT_STEPS.get(name, 28), dev, o,
                              denoiser_options)
    elif o.image:
        res["image"] = {"skipped": "no VAE next to the model"}

    model = codec = step = inputs = None  # freed before the floor is measured
    free(dev)
    if o.floor:
        say("measuring the op floor")
        res["floor"] = floor_mod.measure(ops, dev, reps=max(2, min(o.iters, 20)), samples=5 if dev.type == "cuda" else 3,
                                         warmup=max(1, min(o.warmup, 5)), seed=o.seed)
        for key in ("rflow", "rflow_compiled", "diffusers"):
            if key == "diffusers" and c.quant is not None:
                continue  # diffusers runs the dense weights; this floor is the quantized step's
            if key in res and "ms" in res[key]:
                res[key]["ratio_to_floor"] = res[key]["ms"] / res["floor"]["ms"]
    link = res.get("offload", {}).get("host_link_limit_ms")
    if link:
        for key in ("rflow", "rflow_compiled"):
            if key in res:
                res[key]["ratio_to_host_link"] = res[key]["ms"] / link
    return res


def _compare(fam, model, inputs: bm.StepInputs, step, dev: torch.device, o: Options, say) -> dict:
    from . import diffusers_ref

    say("building diffusers' model with the same weights")
    ref = diffusers_ref.build(fam, model)
    theirs = diffusers_ref.step(fam, ref, inputs.args)
    with torch.inference_mode():
        agree = diffusers_ref.agreement(step(), theirs())
    say("timing diffusers' step")
    entry = {**_time_step(theirs, dev, o), **agree, "class": diffusers_ref.CLASSES[fam.NAME]}
    del ref, theirs
    free(dev)
    return entry


def _offload(model, c: Checked, say) -> dict:
    """Apply ``offload_`` (the model is on the host); the plan, and on CUDA the pinned host-to-device
    bandwidth and the time its streamed bytes need at that bandwidth (the host-link limit of a step)."""
    say(f"offloading ({c.opts.offload})")
    offload_ = offload_function()
    t0 = time.perf_counter()
    plan = offload_(model, vram=c.vram, mode=c.opts.offload, device=c.device, prefetch=1)
    synchronize(c.device)
    out = {"s": time.perf_counter() - t0, **plan.summary()}
    if c.device.type == "cuda":
        out["h2d_gbps"] = _h2d_gbps(c.device)
        out["host_link_limit_ms"] = plan.streamed_bytes / (out["h2d_gbps"] * 1e9) * 1e3
    return out


# ---------------------------------------------------------------------------------------------- output


def clean(x):
    """``x`` with non-finite floats as None (JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x
