"""A FLUX.1-dev-size LoRA training step on one GPU: resident, offloaded, offloaded with a quantized base.

Run on a CUDA machine (an H100 / H200 finishes in about 5 minutes; each part has its own time limit and
the whole run a budget):

    python benchmarks/lora_step.py --out lora_step.json
    python benchmarks/lora_step.py --device cpu --small --out smoke.json   # the script's logic, tiny, on a CPU

What one step is: the LoRA trainer's step on random inputs — FLUX.1-dev with random weights (bf16,
``rflow.runtime.bench_models``), a rank-16 LoRA on the ``attn,mlp`` layers in float32 (the trainer's
``target_layers`` / ``init_weights`` / ``add_lora_``), every block checkpointed (``checkpoint_blocks_``),
the forward under bf16 autocast at 1024² (4096 image tokens, 512 text tokens, batch 1, guidance 1),
the flow-matching MSE against a random target, backward, gradient clipping and a fused AdamW step.
Each step is timed on the wall clock, synchronised before and after (the median of ``--steps`` after
``--warmup`` steps); peak GPU memory is ``torch.cuda.max_memory_allocated`` over the timed steps,
the weights included (``peak_reserved_bytes``: what the caching allocator held); ``working_bytes`` (the
peak less the weights and block buffers on the GPU) stands beside ``estimated_reserve_bytes``, what
``rflow train`` plans for the step.

Parts (``--parts`` picks some; each runs as its own process on CUDA, so an out-of-memory error stays
in its part and every part's peak is its own):

* ``resident``: the whole bf16 base on the GPU;
* ``offload_all``: every block streamed from pinned host memory (``offload_(mode="blocks")``), the
  least GPU memory;
* ``offload_12g``: as many blocks resident as fit in 12 GiB (``--vram 12GiB``) with the working reserve
  ``rflow train`` plans for the step (``rflow.train.budget.training_reserve``);
* ``fp8_offload_8g`` / ``q8_0_offload_8g``: the base quantized to fp8 / GGUF Q8_0 (dequantized per
  layer in forward and in backward's recomputation), then offloaded into 8 GiB the same way (the
  reserve holds one block's dequantized weights, which a recomputed block keeps for its backward);
* ``resident_no_ckpt``: resident without gradient checkpointing (every activation kept).

The JSON is rewritten after every part; ``summary`` sets the issue's targets (offloaded ≤ 12 GiB at ≤
1.3 × the resident step time; ≤ 8 GiB with an fp8 / Q8_0 base) against the figures that exist.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from partrun import arguments, begin, run_inprocess, run_parts, run_subprocess, saver  # noqa: E402  (the shared part runner)

GiB = 2**30
# part -> (quantization, offload budget: None resident, "all" every block streamed, else GiB; checkpointing)
PARTS = {"resident": (None, None, True), "offload_all": (None, "all", True), "offload_12g": (None, 12, True),
         "fp8_offload_8g": ("fp8", 8, True), "q8_0_offload_8g": ("Q8_0", 8, True),
         "resident_no_ckpt": (None, None, False)}
LIMITS = {"resident": 90, "offload_all": 90, "offload_12g": 90, "fp8_offload_8g": 90, "q8_0_offload_8g": 100,
          "resident_no_ckpt": 75}  # seconds


def lora_step_part(name: str, device: str, small: bool, *, steps: int, warmup: int, rank: int) -> dict:
    """Build part ``name``'s model, time its LoRA step and return the record."""
    import torch

    from rflow.lora import add_lora_, lora_parameters
    from rflow.runtime import bench_models as bm
    from rflow.runtime.offload import offload_, streamer
    from rflow.runtime.timing import Peaks, free, synchronize
    from rflow.train.adapters import checkpoint_blocks_, init_weights, target_layers
    from rflow.train.budget import training_reserve

    quant, budget, ckpt = PARTS[name]
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    fam, config = bm.published("flux1-dev")
    config = bm.scaled(fam, config, "tiny" if small else "full")
    dtype = torch.bfloat16 if cuda else torch.float32
    side, text_tokens = (64, bm.TINY_TEXT_TOKENS) if small else (1024, 512)
    rec: dict = {"part": name, "quant": quant, "offload": budget, "gradient_checkpointing": ckpt, "rank": rank,
                 "targets": "attn,mlp", "size": side, "text_tokens": text_tokens, "batch": 1,
                 "dtype": str(dtype).removeprefix("torch.")}
    t0 = time.perf_counter()
    model = bm.build_random(fam, config, dev, dtype, 0)  # on the GPU: quantized there, offload_ moves blocks out
    if quant is not None:
        from rflow.quant.api import plan_summary, quantize_

        quantize_(model, quant)
        rec["weight_bytes"] = plan_summary(model)["model_bytes"]
    else:
        rec["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = target_layers(model, "attn,mlp")
    weights = init_weights(model, layers, rank, float(rank), seed=0)
    # what the trainer plans for this step: the reserve of the budgeted parts
    reserve = rec["estimated_reserve_bytes"] = training_reserve(
        model, dev, tokens=fam.image_seq_len(fam.latent_spec(config, 8).shape(1, side, side)) + text_tokens, batch=1,
        checkpointing=ckpt, trainable=sum(w.down.numel() + w.up.numel() for w in weights))
    if budget is not None:
        vram = None if budget == "all" else int(budget * GiB)
        plan = offload_(model, vram=vram, mode="blocks", device=dev, prefetch=1, reserve=reserve)
        rec["offload_plan"] = {k: v for k, v in plan.summary().items() if k not in ("resident", "streamed")}
        rec["offload_plan"].update(resident_blocks=len(plan.resident), streamed_blocks=len(plan.streamed))
    add_lora_(model, weights, name="bench", trainable=True, dtype=torch.float32, device=dev)
    if ckpt:
        checkpoint_blocks_(model)
    params = list(lora_parameters(model, "bench"))
    rec["lora_layers"], rec["lora_parameters"] = len(layers), sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if cuda else {}))
    inputs = bm.step_inputs(fam, model, fam.latent_spec(config, 8).shape(1, side, side), text_tokens, dev, 3)
    args = list(inputs.args)
    if args[-1] is not None:  # guidance: distilled models train with 1.0
        args[-1] = torch.ones_like(args[-1])
    g = torch.Generator(device=dev).manual_seed(5)
    target = torch.randn(args[0].shape, generator=g, device=dev)
    synchronize(dev)
    rec["build_s"] = time.perf_counter() - t0

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            v = model(*args)
        loss = (v.float() - target).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    def timed() -> tuple[float, float]:
        synchronize(dev)
        t = time.perf_counter()
        loss = step()
        synchronize(dev)
        return time.perf_counter() - t, loss

    first, loss = timed()
    rec["first_step_s"] = first
    for _ in range(max(warmup - 1, 0)):
        timed()
    free(dev)
    s = streamer(model)
    fetched0 = s.stats["bytes"] if s is not None else 0
    times, losses = [], []
    with Peaks(dev) as peaks:
        for _ in range(steps):
            dt, loss = timed()
            times.append(dt)
            losses.append(loss)
        reserved = torch.cuda.max_memory_reserved(dev) if cuda else None
    times.sort()
    rec.update(step_ms=1e3 * times[len(times) // 2], min_ms=1e3 * times[0], max_ms=1e3 * times[-1], steps=steps,
               warmup=warmup, peak_gpu_bytes=peaks.gpu, peak_reserved_bytes=reserved, peak_host_bytes=peaks.host,
               losses=losses, finite=all(x == x and abs(x) != float("inf") for x in losses))
    if s is not None:
        rec["streamed_bytes_per_step"] = (s.stats["bytes"] - fetched0) / steps
        rec["backward_fetches"] = s.stats["backward_fetches"]
    if peaks.gpu is not None:
        held = rec["weight_bytes"] if budget is None else \
            rec["offload_plan"]["resident_bytes"] + rec["offload_plan"]["buffer_bytes"]
        rec["working_bytes"] = peaks.gpu - held  # activations, LoRA state, workspace: what a reserve must hold
    if cuda and budget is not None:
        from rflow.runtime.bench import _h2d_gbps

        rec["h2d_gbps"] = _h2d_gbps(dev)
        rec["host_link_limit_ms"] = rec["streamed_bytes_per_step"] / (rec["h2d_gbps"] * 1e9) * 1e3
    return rec


def summary(parts: dict) -> dict:
    """The issue's targets against the figures this run has (None where a part is missing)."""
    def get(name, key):
        r = (parts.get(name) or {}).get("result") or {}
        return r.get(key)

    res = get("resident", "step_ms")
    out: dict = {"resident_ms": res, "resident_peak_GiB": (get("resident", "peak_gpu_bytes") or 0) / GiB or None}
    for name in ("offload_all", "offload_12g", "fp8_offload_8g", "q8_0_offload_8g", "resident_no_ckpt"):
        ms, peak = get(name, "step_ms"), get(name, "peak_gpu_bytes")
        out[f"{name}_ms"] = ms
        out[f"{name}_peak_GiB"] = peak / GiB if peak else None
        out[f"{name}_over_resident"] = ms / res if ms and res else None

    def target(names, gib, ratio=None):
        ok = None
        for n in names:
            ms, peak = get(n, "step_ms"), get(n, "peak_gpu_bytes")
            if ms is None or peak is None or (ratio is not None and not res):
                continue
            hit = peak <= gib * GiB and (ratio is None or ms <= ratio * res)
            ok = bool(ok) or hit
        return ok

    out["targets"] = {"offloaded bf16 <= 12 GiB at <= 1.3 x resident": target(["offload_12g", "offload_all"], 12, 1.3),
                      "fp8 / Q8_0 base <= 8 GiB": target(["fp8_offload_8g", "q8_0_offload_8g"], 8)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = arguments("lora_step.py", __doc__.splitlines()[0], list(PARTS), 420)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per part (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="steps before timing (default 2)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--part", help=argparse.SUPPRESS)  # run one part alone: --part NAME:OUT.json
    args = ap.parse_args(argv)
    if args.part:
        name, _, out = args.part.partition(":")
        rec = lora_step_part(name, args.device, args.small, steps=args.steps, warmup=args.warmup, rank=args.rank)
        Path(out).write_text(json.dumps(rec))
        return 0

    if args.steps < 1 or args.warmup < 1 or args.rank < 1:
        raise SystemExit("lora_step.py: error: --steps, --warmup and --rank must be at least 1")
    names, jobs, record = begin("lora_step.py", args, argv, list(PARTS))
    start = time.monotonic()
    save = saver(record, args.out, summary, start)

    opts = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank),
            *(["--small"] if args.small else [])]
    with tempfile.TemporaryDirectory(prefix="lora_step-") as tmp:
        def run(name: str, limit: float, entry: dict):
            out = Path(tmp) / f"{name}.json"
            part = ["--part", f"{name}:{out}", *opts]
            if jobs == "subprocess":
                rc, err = run_subprocess([sys.executable, str(Path(__file__).resolve()), *part], limit)
            else:
                rc, err = run_inprocess(lambda: main(part), limit)
            return rc, err, json.loads(out.read_text()) if out.exists() else None

        run_parts(record, names, limits=LIMITS, budget=args.budget, limit=args.limit, run=run, save=save, start=start,
                  label="lora_step.py")
    save()
    print(json.dumps(record["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
