"""``rflow bench``: time a transformer step and a whole image against the op floor of this device (and
diffusers); registered on the main app by :mod:`rflow.cli`. The work is :mod:`rflow.runtime.bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, force_option


def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="a model path (any layout rflow.load reads) "
                                        "instead of random weights"),
    config: Optional[str] = typer.Option(None, "--config", help="random weights of a published size: flux1-dev "
                                         "(default), flux1-schnell, flux2-klein-4b, flux2-klein-9b, flux2-dev, zimage, "
                                         "or tiny (FLUX.1 at --scale tiny)"),
    scale: str = typer.Option("full", "--scale", help="full | tiny (width 128, 2 + 2 blocks: runs on a CPU)"),
    size: str = typer.Option("1024", "--size", help="image size: 1024 or WxH, multiples of 16"),
    batch: int = typer.Option(1, "--batch"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on "
                                        "the CPU)"),
    compute: str = typer.Option("auto", "--compute", help="quantized layers compute: auto | dequant | int8 | fp8 "
                                "(int8 and fp8 quantize to that format when --quant is not given)"),
    quant: Optional[str] = typer.Option(None, "--quant", help="quantize the linear layers first: int8, fp8 or a GGUF "
                                        "type (Q8_0, Q4_K, ...)"),
    offload: str = typer.Option("none", "--offload", help="none | blocks | auto: stream blocks from host memory"),
    vram: Optional[str] = typer.Option(None, "--vram", help="GPU memory the offloaded model may use, e.g. 4GiB"),
    compare: Optional[str] = typer.Option(None, "--compare", help="diffusers: also time diffusers' model with the "
                                          "same weights on the same inputs"),
    steps: Optional[int] = typer.Option(None, "--steps", help="steps of the whole-image run (default: the model's "
                                        "usual count)"),
    iters: int = typer.Option(10, "--iters", help="timed calls per figure (the median is reported)"),
    warmup: int = typer.Option(3, "--warmup", help="untimed calls before them"),
    text_tokens: Optional[int] = typer.Option(None, "--text-tokens", help="text length (default: the family's, 512)"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda (default when available) or cpu"),
    compile_: bool = typer.Option(False, "--compile", help="also time the step with every block torch.compile'd"),
    image: bool = typer.Option(True, "--image/--no-image", help="time a whole image (steps + VAE decode)"),
    floor: bool = typer.Option(True, "--floor/--no-floor", help="measure the op floor of the step"),
    seed: int = typer.Option(0, "--seed"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the record here (OUT.json)"),
    force: bool = force_option(),
):
    """Time one transformer step, a whole image and the op floor of that step on this device.

    Random weights of a published size are built on the device itself (no host copy). Every step figure
    is the median of --iters calls after --warmup calls, and is also given as a ratio to the op floor:
    the step's matmuls and attentions timed alone at this device's best speed.
    """
    from ..outputs import check_output
    from ..runtime import bench as lib
    from ..runtime.bench_report import format_table, write_json

    opts = lib.Options(model=model, config=config, scale=scale, size=size, batch=batch, dtype=dtype, compute=compute,
                       quant=quant, offload=offload, vram=vram, compare=compare, steps=steps, iters=iters,
                       warmup=warmup, text_tokens=text_tokens, device=device, compile=compile_, image=image,
                       floor=floor, seed=seed)
    out = check_output(json_out, suffixes=(".json",), force=force, what="the record") if json_out is not None else None
    lib.check(opts)
    res = lib.run(opts, progress=lambda msg: console.print(f"bench: {msg}", highlight=False))
    if out is not None:
        write_json(res, out)
    print(format_table(res))
    if out is not None:
        print(out)


def register(app) -> None:
    app.command("bench")(bench)
