"""Quantized linear layers at FLUX.1-dev size: matmul timings and one transformer step, bf16 vs int8/fp8/GGUF.

Run on a CUDA machine (``--device cpu --small`` checks the script's logic at a tiny size on the CPU):

    python benchmarks/quant_step.py [--iters 10] [--only matmul|step] [--step-formats bf16,int8,fp8,Q8_0]
                                    [--out OUT.json]
    python benchmarks/quant_step.py --device cpu --small --iters 2

What it measures (random weights, batch 1, bf16 activations, median of ``--iters`` after warm-up,
CUDA events on a GPU, ``perf_counter`` on the CPU; inference mode, TF32 allowed):

* ``matmul``: for the FLUX.1-dev linear shapes at 1024² (M = 4096 image + 512 text = 4608 tokens;
  (K, N) of the attention projection, the MLP's two layers and the single blocks' two layers), one
  layer with bias, timed as bf16 ``F.linear`` and through rflow's quantized layers:
  ``int8_w8a8`` (:class:`~rflow.quant.linear.Int8Linear`, compute "int8": per-token activation
  quantization + ``torch._int_mm``), ``fp8_rowwise`` (:class:`~rflow.quant.linear.Fp8Linear`, compute
  "fp8": ``torch._scaled_mm``; CUDA capability ≥ 8.9 only), and the dequantize-then-``F.linear``
  paths ``int8_dequant``, ``fp8_dequant``, ``q8_0_dequant``, ``q4_k_dequant``. ``int8_kernel`` and
  ``fp8_kernel`` time the integer / fp8 product alone on pre-quantized activations, to separate the
  kernel from the activation quantization. Each entry: ms, TFLOP/s (2·M·K·N), the weight's packed bytes
  and their ratio to bf16, and the output's relative RMS error against an fp32 product of the same
  bf16 weight.
* ``step``: one forward pass of a FLUX.1-dev-size transformer (19 double and 38 single blocks, width
  3072; built on the meta device, ``to_empty``, seeded random init, the same weights for every variant)
  at 1024² with 512 text tokens, as bf16 and after ``rflow.quant.api.quantize_(model, fmt)`` for each
  of ``--step-formats`` (every eligible layer; the family keeps the embedders and the final layer in
  bf16), timed under each compute mode that format has: ``int8_dequant``, ``int8_w8a8``,
  ``fp8_dequant``, ``fp8_rowwise``, ``q8_0_dequant`` … Each entry: ms, peak allocated CUDA memory
  (weights included; null on the CPU), the quantized layers' packed bytes (``weight_bytes``) against
  the same layers in bf16 (``weight_ratio``), the whole model's resident bytes (``model_bytes``:
  parameters and buffers), the seconds ``quantize_`` took, and the output's relative RMS error against
  the bf16 step.

Prints one JSON object on stdout (date, device, torch and CUDA versions, the command line, then the
results) and writes it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from rflow.models.flux import Flux, FluxConfig, image_ids, text_ids
from rflow.errors import UserError
from rflow.quant.api import normalize_format, plan_summary, quantize_
from rflow.runtime.timing import capability, device_name, free, time_calls
from rflow.quant.linear import (FP8_MIN_CAPABILITY, INT8_MIN_CAPABILITY, QuantLinear, int_matmul, quantize_rows_fp8,
                                quantize_rows_int8, set_compute)

# (layer, K in, N out) of FLUX.1-dev's linear layers; --small divides every width by 12
SHAPES = [("double img_attn.proj", 3072, 3072), ("double img_mlp.0", 3072, 12288),
          ("double img_mlp.2", 12288, 3072), ("single linear1", 3072, 21504), ("single linear2", 15360, 3072)]
SMALL_DIV = 12
# the layer formats of the matmul table and the compute modes each is timed under
MATMUL_FORMATS = [("int8", "int8", "int8_w8a8"), ("fp8", "fp8", "fp8_rowwise"), ("int8", "dequant", "int8_dequant"),
                  ("fp8", "dequant", "fp8_dequant"), ("Q8_0", "dequant", "q8_0_dequant"),
                  ("Q4_K", "dequant", "q4_k_dequant")]
MATMUL_METHODS = ["bf16", "int8_kernel", "fp8_kernel"] + [m for _, _, m in MATMUL_FORMATS]
# compute modes timed for each step format, as (mode, entry name)
STEP_COMPUTES = {"int8": [("dequant", "int8_dequant"), ("int8", "int8_w8a8")],
                 "fp8": [("dequant", "fp8_dequant"), ("fp8", "fp8_rowwise")]}
DEFAULT_STEP_FORMATS = "bf16,int8,fp8,Q8_0"


def fp8_skip(dev: torch.device) -> str | None:
    """Why fp8 compute cannot run on ``dev`` (None when it can)."""
    cap = capability(dev)
    if cap is None:
        return f"fp8 compute needs a CUDA GPU of compute capability >= 8.9, not {dev.type}"
    if cap < FP8_MIN_CAPABILITY:
        return f"fp8 compute needs compute capability >= 8.9, this GPU has {cap[0]}.{cap[1]}"
    return None


def bench(fn, iters: int, dev: torch.device, warm: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after ``warm`` warm-up calls."""
    return time_calls(fn, dev, iters=iters, warmup=warm)["ms"]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """‖y − ref‖ / ‖ref‖ in float64."""
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------- matmuls


def matmul_entry(ms: float, M: int, K: int, N: int, **extra) -> dict:
    return {"ms": ms, "tflops": 2 * M * K * N / (ms * 1e-3) / 1e12, **extra}


def bench_matmuls(dev: torch.device, M: int, shapes, iters: int, warm: int) -> list[dict]:
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for layer, K, N in shapes:
        rows.append(bench_shape(dev, g, layer, M, K, N, iters, warm))
        print(f"quant_step.py: matmul {layer} {M}x{K}x{N} done", file=sys.stderr, flush=True)
        free(dev)
    return rows


def bench_shape(dev: torch.device, g: torch.Generator, layer: str, M: int, K: int, N: int, iters: int,
                warm: int) -> dict:
    """Every method of the matmul table on one (M, K) × (K, N) product with bias."""
    dt = torch.bfloat16
    skip8 = fp8_skip(dev)
    x = torch.randn(M, K, device=dev, dtype=dt, generator=g)
    lin = nn.Linear(K, N, device=dev, dtype=dt).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, device=dev, generator=g) * K**-0.5)
        lin.bias.copy_(torch.randn(N, device=dev, generator=g) * 0.02)
    w, b = lin.weight, lin.bias
    ref = F.linear(x.float(), w.float(), b.float())
    bf16_bytes = w.numel() * w.element_size()
    res: dict[str, dict] = {}
    res["bf16"] = matmul_entry(bench(lambda: F.linear(x, w, b), iters, dev, warm), M, K, N,
                               weight_bytes=bf16_bytes, weight_ratio=1.0,
                               rel_err=rel_err(F.linear(x, w, b), ref))
    layers, quantize_s = {}, {}
    for fmt, mode, name in MATMUL_FORMATS:
        if fmt == "fp8" and mode == "fp8" and skip8:
            res[name] = {"skipped": skip8}
            continue
        if fmt not in layers:
            t0 = time.perf_counter()
            layers[fmt] = QuantLinear.from_linear(lin, fmt)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            quantize_s[fmt] = time.perf_counter() - t0
        q = layers[fmt]
        q.compute = mode
        with torch.inference_mode():
            y = q(x)
        nbytes = q.weight_nbytes()
        res[name] = matmul_entry(bench(lambda: q(x), iters, dev, warm), M, K, N, weight_bytes=nbytes,
                                 weight_ratio=nbytes / bf16_bytes, rel_err=rel_err(y, ref),
                                 quantize_s=quantize_s[fmt])
    # the products alone, on activations quantized beforehand
    q8 = layers["int8"]
    xq, _ = quantize_rows_int8(x)
    if dev.type == "cuda" and capability(dev) < INT8_MIN_CAPABILITY:
        res["int8_kernel"] = {"skipped": "torch._int_mm needs compute capability >= 8.0"}
    else:
        res["int8_kernel"] = matmul_entry(bench(lambda: int_matmul(xq, q8.qweight), iters, dev, warm), M, K, N)
    if skip8:
        res["fp8_kernel"] = {"skipped": skip8}
    else:
        f8 = layers["fp8"]
        xf, xs = quantize_rows_fp8(x)
        wt, ws = f8.qweight.t(), f8.scale.float()[None].contiguous()

        def fp8_mm():
            return torch._scaled_mm(xf, wt, scale_a=xs, scale_b=ws, out_dtype=dt)

        res["fp8_kernel"] = matmul_entry(bench(fp8_mm, iters, dev, warm), M, K, N)
    return {"layer": layer, "M": M, "K": K, "N": N, "results": {m: res[m] for m in MATMUL_METHODS}}


# ---------------------------------------------------------------------------------------------- one step


def step_config(small: bool) -> FluxConfig:
    if not small:
        return FluxConfig.flux1_dev()
    w, mlp = 3072 // SMALL_DIV, 12288 // SMALL_DIV
    return FluxConfig(hidden_size=w, num_heads=2, context_in_dim=64, vec_in_dim=32,
                      double_mlp=[(mlp, mlp)] * 2, single_mlp=[mlp] * 2)


def build_model(config: FluxConfig, dev: torch.device, seed: int) -> Flux:
    """FLUX on the meta device, then ``to_empty`` and a seeded N(0, 0.02) init (the same weights every call)."""
    with torch.device("meta"):
        model = Flux(config).to(torch.bfloat16)  # cast on meta: no float32 copy of 12B weights on the device
    model = model.to_empty(device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def step_inputs(config: FluxConfig, dev: torch.device, small: bool):
    dt = torch.bfloat16
    side, L_txt = (16, 16) if small else (128, 512)  # latent side (tokens: (side/2)²), text tokens
    g = torch.Generator(device=dev).manual_seed(1)
    L_img = (side // 2) ** 2
    x = torch.randn(1, L_img, config.in_channels, device=dev, dtype=dt, generator=g)
    ctx = torch.randn(1, L_txt, config.context_in_dim, device=dev, dtype=dt, generator=g)
    pooled = torch.randn(1, config.vec_in_dim, device=dev, dtype=dt, generator=g)
    t = torch.full((1,), 0.5, device=dev)
    gd = torch.full((1,), 3.5, device=dev)
    return (x, image_ids(side, side, dev), ctx, text_ids(L_txt, dev), t, pooled, gd), {"image_tokens": L_img,
                                                                                         "text_tokens": L_txt}


def bench_steps(dev: torch.device, small: bool, formats: list[str], iters: int, warm: int) -> dict:
    config = step_config(small)
    inputs, tokens = step_inputs(config, dev, small)
    variants: dict[str, dict] = {}
    ref = None
    for fmt in formats:
        ref = bench_format(config, inputs, dev, fmt, iters, warm, ref, variants)
        free(dev)
    return {"depth": config.depth, "depth_single": config.depth_single, "hidden_size": config.hidden_size,
            **tokens, "variants": variants}


def bench_format(config: FluxConfig, inputs, dev: torch.device, fmt: str, iters: int, warm: int, ref, variants: dict):
    """Build the model, quantize it to ``fmt`` (unless bf16), time each compute mode of ``fmt`` into
    ``variants``; returns the bf16 output (the reference of the errors) once it is known."""
    skip8 = fp8_skip(dev)
    model = build_model(config, dev, seed=0)
    quantize_s = None
    if fmt != "bf16":
        t0 = time.perf_counter()
        quantize_(model, fmt)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        quantize_s = time.perf_counter() - t0
    s = plan_summary(model)
    weights = {"weight_bytes": s["bytes"], "bf16_weight_bytes": s["bf16_bytes"], "weight_ratio": s["ratio"],
               "bits_per_weight": s["bits_per_weight"], "model_bytes": s["model_bytes"], "quantize_s": quantize_s}
    computes = STEP_COMPUTES.get(fmt, [("dequant", "bf16" if fmt == "bf16" else f"{fmt.lower()}_dequant")])
    for mode, name in computes:
        if mode == "fp8" and skip8:
            variants[name] = {"skipped": skip8}
            continue
        if fmt != "bf16":
            set_compute(model, mode)
        free(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = bench(lambda: model(*inputs), iters, dev, warm)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
        with torch.inference_mode():
            out = model(*inputs).float()
        if fmt == "bf16":
            ref = out
        err = rel_err(out, ref) if ref is not None else None
        variants[name] = {"ms": ms, "peak_GiB": peak, **weights, "rel_err_vs_bf16": err}
        print(f"quant_step.py: step {name} {ms:.1f} ms", file=sys.stderr, flush=True)
    return ref


# ---------------------------------------------------------------------------------------------- main


def parse_formats(text: str) -> list[str]:
    """``--step-formats`` as rflow names the formats ("bf16" for the unquantized model)."""
    out = []
    for f in (s.strip() for s in text.split(",") if s.strip()):
        try:
            f = normalize_format(f)
        except UserError as e:
            raise SystemExit(f"quant_step.py: error: --step-formats: {e}") from None
        f = "bf16" if f == "keep" else f
        if f not in out:
            out.append(f)
    return sorted(out, key=lambda f: f != "bf16")  # bf16 first: the reference of the others' errors


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="quant_step.py", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --small)")
    ap.add_argument("--small", action="store_true", help=f"every width / {SMALL_DIV}, 64 matmul rows, 2+2 blocks, "
                    "64 image and 16 text tokens: a check of the script, not a benchmark")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", choices=("matmul", "step"), help="run one part")
    ap.add_argument("--step-formats", default=DEFAULT_STEP_FORMATS,
                    help=f"comma-separated: bf16, int8, fp8 or GGUF types (default {DEFAULT_STEP_FORMATS})")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("quant_step.py: error: needs a CUDA device (or --device cpu --small to check the script)")
    elif args.device != "cpu":
        raise SystemExit(f"quant_step.py: error: --device is cuda or cpu, not {args.device!r}")
    elif not args.small:
        raise SystemExit("quant_step.py: error: --device cpu runs only with --small (FLUX.1-dev size needs a GPU)")
    if args.iters < 1:
        raise SystemExit("quant_step.py: error: --iters must be at least 1")
    formats = parse_formats(args.step_formats)
    if not formats:
        raise SystemExit("quant_step.py: error: --step-formats names no format")
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    warm = 3 if dev.type == "cuda" else 1
    cap = capability(dev)
    res = {"date": datetime.date.today().isoformat(), "device": device_name(dev),
           "capability": f"{cap[0]}.{cap[1]}" if cap else None, "torch": torch.__version__,
           "cuda": torch.version.cuda, "host": platform.node(), "command": shlex.join(["python", *sys.argv]),
           "small": args.small, "iters": args.iters, "warmup": warm}
    if args.only in (None, "matmul"):
        div = SMALL_DIV if args.small else 1
        shapes = [(n, K // div, N // div) for n, K, N in SHAPES]
        res["matmul"] = bench_matmuls(dev, 64 if args.small else 4608, shapes, args.iters, warm)
    if args.only in (None, "step"):
        res["step"] = bench_steps(dev, args.small, formats, args.iters, warm)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
