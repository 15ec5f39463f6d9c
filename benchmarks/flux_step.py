"""One FLUX.1-dev transformer step at 1024×1024, batch 1, random bf16 weights: rflow vs diffusers.

Run on a CUDA machine (diffusers optional; without it only rflow is timed):

    python benchmarks/flux_step.py [--iters 10] [--compile] [--json OUT.json]

Prints median ms per step (CUDA events, after warm-up) and peak allocated memory for each
implementation, in the same process, on the same inputs. Method follows the reference baseline:
TF32 on, inference mode, 3 warm-up calls, median of ``--iters``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

from rflow.models.flux import Flux, FluxConfig, image_ids, text_ids


def bench(fn, iters: int, warm: int = 3) -> float:
    with torch.inference_mode():
        for _ in range(warm):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def random_init_(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(max-autotune-no-cudagraphs)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("flux_step.py: error: needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    dev, dt = torch.device("cuda"), torch.bfloat16
    B, L_img, L_txt = 1, 4096, 512
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, L_img, 64, device=dev, dtype=dt, generator=g)
    ctx = torch.randn(B, L_txt, 4096, device=dev, dtype=dt, generator=g)
    pooled = torch.randn(B, 768, device=dev, dtype=dt, generator=g)
    t = torch.full((B,), 0.5, device=dev)
    gd = torch.full((B,), 3.5, device=dev)
    iids, tids = image_ids(128, 128, dev), text_ids(L_txt, dev)
    res = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "host": platform.node()}

    with torch.device("meta"):
        ours = Flux(FluxConfig.flux1_dev())
    ours = ours.to_empty(device=dev).to(dt)
    random_init_(ours)
    ours.eval().requires_grad_(False)
    torch.cuda.reset_peak_memory_stats()
    res["rflow_ms"] = bench(lambda: ours(x, iids, ctx, tids, t, pooled, gd), args.iters)
    res["rflow_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if args.compile:
        oc = torch.compile(ours, mode="max-autotune-no-cudagraphs")
        res["rflow_compiled_ms"] = bench(lambda: oc(x, iids, ctx, tids, t, pooled, gd), args.iters)
    print(json.dumps(res), flush=True)
    del ours
    torch.cuda.empty_cache()

    try:
        from diffusers import FluxTransformer2DModel
    except ImportError:
        res["diffusers"] = "not installed"
    else:
        with torch.device("meta"):
            ref = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        ref = ref.to_empty(device=dev).to(dt)
        random_init_(ref)
        ref.eval().requires_grad_(False)
        tb, gb = t.to(dt), gd.to(dt)
        torch.cuda.reset_peak_memory_stats()
        step = lambda: ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=tb,  # noqa: E731
                           img_ids=iids[0], txt_ids=tids[0], guidance=gb, return_dict=False)[0]
        res["diffusers_ms"] = bench(step, args.iters)
        res["diffusers_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
