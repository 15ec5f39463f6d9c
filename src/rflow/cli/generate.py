"""``rflow generate``, ``rflow eval``, ``rflow train`` and ``rflow info``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .. import __version__
from ..errors import UserError, warn
from .common import MODEL_HELP, console, force_option, out, progress


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must look like 1024x768, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise UserError(f"--size must be positive, got {text!r}")
    return w, h


def png_bytes(image, params: str, extra: dict) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("parameters", params)
    meta.add_text("rflow", json.dumps(extra, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def output_paths(out_path: Path, n: int) -> list[Path]:
    if n == 1:
        return [out_path]
    return [out_path.with_name(f"{out_path.stem}-{i}{out_path.suffix}") for i in range(n)]


def read_image(path: Path):
    """The image at ``path``, fully decoded now (a truncated or foreign file is a one-line error)."""
    from PIL import Image

    if not path.exists():
        raise UserError(f"{path}: no such image")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not an image")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read image ({' '.join(str(e).split()) or type(e).__name__})") from None


def generate(
    prompt: str = typer.Argument(..., help="what to draw"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    text_encoders: Optional[Path] = typer.Option(None, "--text-encoders", help="folder with text_encoder/ tokenizer/ text_encoder_2/ tokenizer_2/"),
    vae: Optional[Path] = typer.Option(None, "--vae", help="ae.safetensors or a diffusers vae/ folder"),
    patches: Optional[Path] = typer.Option(None, "--patches", help="distilled layer patches (rflow distill) to swap in"),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="LoRA file (kohya, diffusers/PEFT, XLabs, ComfyUI), "
                                                                  "FILE[:SCALE]; repeat for several"),
    negative: Optional[str] = typer.Option(None, "--negative", help="negative prompt (used when --cfg > 1)"),
    size: Optional[str] = typer.Option(None, "--size", help="WxH in pixels (default: the model's native size)"),
    steps: int = typer.Option(28, "--steps", help="sampling steps (1-10000)"),
    guidance: float | None = typer.Option(None, "--guidance", help="distilled guidance, default 3.5 (only models with a guidance embedder)"),
    cfg: float = typer.Option(1.0, "--cfg", help="true CFG scale; > 1 runs the negative prompt too"),
    seed: int = typer.Option(0, "--seed", help="noise seed, 0 … 2^64 − 1"),
    solver: str = typer.Option("euler", "--solver", help="euler | dpm++2m | unipc"),
    batch: int = typer.Option(1, "--batch", help="images per prompt"),
    image: Optional[Path] = typer.Option(None, "--image", help="start from this image (img2img)"),
    strength: float = typer.Option(1.0, "--strength", help="img2img: 1 ignores the image, 0 keeps it"),
    ref: Optional[List[Path]] = typer.Option(None, "--ref", help="reference image (FLUX.2-klein); repeat for several"),
    cfg_truncation: Optional[float] = typer.Option(None, "--cfg-truncation",
                                                   help="turn CFG off once 1 − sigma exceeds this (0-1; Z-Image)"),
    cfg_renorm: Optional[float] = typer.Option(None, "--cfg-renorm",
                                               help="cap the guided velocity's norm at this × the conditional one (Z-Image)"),
    output: Path = typer.Option(Path("out.png"), "-o", "--output", help="PNG path; a batch writes NAME-0.png, NAME-1.png …"),
    force: bool = force_option(),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | cuda:N | mps (default: cuda if present)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16"),
    compute: str = typer.Option("auto", "--compute", help="quantized layers: auto | dequant | int8 | fp8 (auto: fp8 "
                                                          "on Ada/Hopper, int8 on CUDA, dequant otherwise)"),
    offload: str = typer.Option("none", "--offload", help="none | blocks (stream transformer blocks from host "
                                                          "memory) | auto (only when the model does not fit)"),
    vram: Optional[str] = typer.Option(None, "--vram", help="GPU memory offload may use, e.g. 4GiB (default: "
                                                            "blocks streams every block, auto the free memory)"),
    tiled_vae: Optional[bool] = typer.Option(None, "--tiled-vae/--no-tiled-vae", help="decode the image in "
                                             "overlapping tiles (default: above 2 megapixels)"),
    compile_: bool = typer.Option(False, "--compile", help="fuse projections, pick the fastest attention kernel and "
                                                          "torch.compile each block (first step compiles; cached)"),
):
    """Generate images from a prompt and save them as PNG with their settings embedded."""
    import time

    from .. import options
    from ..outputs import check_output, replacing_all
    from ..paths import resolve_model
    from ..pipeline import load, parse_dtype
    from ..sampling import SOLVERS

    # Everything a user can get wrong is checked before the model loads (minutes for FLUX.1-dev).
    width, height = parse_size(size) if size else (None, None)
    if solver not in SOLVERS:
        raise UserError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    options.steps(steps)
    if compute not in ("auto", "dequant", "int8", "fp8"):
        raise UserError(f"unknown --compute {compute!r}; choose auto, dequant, int8 or fp8")
    from ..runtime.offload import check_options

    check_options(offload, vram)
    options.guidance(guidance, "--guidance")
    options.number(cfg, "--cfg", low=1)
    options.integer(batch, "--batch", low=1, high=4096)
    options.number(strength, "--strength", low=0, high=1)
    if cfg_truncation is not None:
        options.number(cfg_truncation, "--cfg-truncation", low=0, high=1)
    if cfg_renorm is not None:
        options.number(cfg_renorm, "--cfg-renorm", low=0)
    refs = [read_image(r) for r in ref or []]
    paths = [check_output(p, suffixes=(".png",), force=force) for p in output_paths(output, batch)]
    init = read_image(image) if image is not None else None
    from ..lora import parse_spec, read_lora

    loras = [(read_lora(p), s) for p, s in (parse_spec(t) for t in lora or [])]
    if negative is not None and cfg <= 1:
        warn("--negative is used only with --cfg > 1 (true CFG); it is ignored")
    if image is None and strength != 1.0:
        warn("--strength is used only with --image; it is ignored")
    dev = options.device(device) if device is not None else None
    dt = parse_dtype(dtype) if dtype is not None else None
    model_path = resolve_model(model)
    kw = dict(text_encoders=text_encoders, vae=vae, device=dev, dtype=dt, offload=offload, vram=vram)
    if patches is not None:
        from ..compress.patches import load_with_patches

        pipe = load_with_patches(model_path, patches, **kw)
    else:
        pipe = load(model_path, **kw)
    from ..quant.linear import quant_layers, set_compute

    if quant_layers(pipe.transformer) or compute != "auto":
        set_compute(pipe.transformer, compute, device=pipe.device)
    if offload != "none":
        from ..runtime.offload import offload_plan

        console.print(str(offload_plan(pipe.transformer)), highlight=False, soft_wrap=True)
        from ..runtime.parts import parts_plan

        console.print(str(parts_plan(pipe)), highlight=False, soft_wrap=True)
    for lora_file, lora_scale in loras:
        pipe.load_lora(lora_file, lora_scale)
    refs = pipe.reference_images(refs)
    width, height = pipe.resolve_size(width, height, refs)
    guidance = pipe.resolve_guidance(guidance)
    pipe.check_request(batch, width, height, cfg=cfg, tiled_vae=tiled_vae)
    pipe.check_prompts([prompt] + ([negative] if negative and cfg > 1 else []))
    if compile_:
        from ..runtime.speed import describe, optimize_, pipeline_tokens

        done = optimize_(pipe.transformer, compile="blocks", tokens=pipeline_tokens(pipe, width, height))
        console.print(describe(done), highlight=False, soft_wrap=True)
    t0 = time.perf_counter()
    with progress("sampling", steps) as update:
        images = pipe.generate([prompt] * batch, negative_prompt=negative, width=width, height=height, steps=steps,
                               guidance=guidance, cfg=cfg, seed=seed, solver=solver, image=init, strength=strength,
                               images=refs, cfg_truncation=cfg_truncation, cfg_renorm=cfg_renorm, tiled_vae=tiled_vae,
                               callback=lambda i, n, _x: update(i + 1, total=n))
    elapsed = time.perf_counter() - t0
    settings = {
        "prompt": prompt, "negative_prompt": negative, "steps": steps, "solver": solver, "guidance": guidance,
        "cfg": cfg, "seed": seed, "width": width, "height": height, "batch": batch, "model": pipe.name,
        "tiled_vae": pipe.vae_tiles(width, height, tiled_vae) is not None,
        "model_hash": pipe.model_hash, "fingerprint": pipe.fingerprint, "schedule": pipe.schedule.kind,
        "shift": pipe.schedule.shift, "image": str(image) if image else None, "strength": strength if image else None,
        "patches": str(patches) if patches else None, "patches_hash": pipe.patches_hash or None, "rflow": __version__,
        "loras": [x.summary() for x in pipe.loras.values()] or None,
    }
    with replacing_all(paths) as tmps:
        for i, (img, tmp) in enumerate(zip(images, tmps)):
            params = (f"{prompt}\n" + (f"Negative prompt: {negative}\n" if negative else "")
                      + f"Steps: {steps}, Sampler: {solver}, " + (f"Guidance: {guidance}, " if guidance is not None else "")
                      + f"CFG scale: {cfg}, Seed: {seed}, "
                      f"Size: {width}x{height}, Model: {pipe.name}, Model hash: {pipe.model_hash}, "
                      + (f"Patches hash: {pipe.patches_hash}, " if pipe.patches_hash else "")
                      + ('Lora hashes: "' + ", ".join(f"{x.name}: {x.hash}" for x in pipe.loras.values()) + '", '
                         if pipe.loras else "")
                      + (f"Batch size: {batch}, Batch pos: {i}, " if batch > 1 else "")
                      + (f"Denoising strength: {strength}, " if image else "")
                      + f"Version: rflow {__version__}")
            tmp.write_bytes(png_bytes(img, params, {**settings, "batch_index": i}))
    for p in paths:
        print(p)
    console.print(f"{batch} image(s) {width}x{height}, {steps} steps in {elapsed:.2f} s", highlight=False)


def eval_(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="rflow-tiny pipeline folder (default: the embedded model)"),
    shapes_n: int = typer.Option(200, "--shapes", help="N prompts from the training grammar"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="prompt file (shapes-world prompts, one per line) instead of --shapes"),
    heldout: int = typer.Option(50, "--heldout", help="N prompts with held-out colour×shape pairs (0: skip)"),
    steps: int = typer.Option(20, "--steps"),
    solver: str = typer.Option("euler", "--solver"),
    seed: int = typer.Option(0, "--seed"),
    guidance: float | None = typer.Option(None, "--guidance", help="distilled guidance, default 3.5 (only models with a guidance embedder)"),
    cfg: float = typer.Option(1.0, "--cfg"),
    grid: Path = typer.Option(Path("eval-grid.png"), "-o", "--grid", help="sample grid PNG"),
    force: bool = force_option(),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    device: Optional[str] = typer.Option(None, "--device"),
):
    """Score a model's adherence to shapes-world prompts: overall, per attribute, held-out pairs."""
    from .. import options
    from ..world import shapes
    from ..compress.workload import read_prompts
    from ..world.evaluate import evaluate
    from ..outputs import check_output, replacing
    from ..paths import resolve_model
    from ..pipeline import load
    from ..sampling import SOLVERS

    options.integer(shapes_n, "--shapes", low=1, high=100_000)
    options.integer(heldout, "--heldout", low=0, high=100_000)
    options.steps(steps)
    options.guidance(guidance, "--guidance")
    options.number(cfg, "--cfg", low=1)
    if solver not in SOLVERS:
        raise UserError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    grid = check_output(grid, suffixes=(".png",), force=force, what="the grid")
    prompt_list = None
    if prompts is not None:
        prompt_list = read_prompts(prompts)
        for p in prompt_list:
            shapes.parse(p)  # only shapes-world prompts can be scored
    dev = options.device(device) if device is not None else None
    pipe = load(resolve_model(model), device=dev)
    total = (len(prompt_list) if prompt_list else shapes_n) + heldout
    with progress("evaluating", total) as update:
        res = evaluate(pipe, n=shapes_n, prompts=prompt_list, heldout=heldout, steps=steps, solver=solver, seed=seed,
                       guidance=guidance, cfg=cfg, progress=update)
    k = min(len(res.images), 32)
    with replacing(grid) as tmp:
        shapes.grid(res.images[:k], res.prompts[:k], cols=8).save(tmp, format="PNG")
    summary = {"model": pipe.name, "model_hash": pipe.model_hash, "steps": steps, "solver": solver, "seed": seed,
               "guidance": guidance, "cfg": cfg, **res.summary()}
    if as_json:
        print(json.dumps(summary))
        return
    t = Table(title=f"{pipe.name} · {solver} · {steps} steps")
    t.add_column("")
    t.add_column(f"grammar ({len(res.prompts)})", justify="right")
    reports = [res.report]
    if res.heldout_report:
        t.add_column(f"held-out pairs ({len(res.heldout_prompts)})", justify="right")
        reports.append(res.heldout_report)
    t.add_row("adherence", *(f"{r.adherence:.3f}" for r in reports), end_section=True)
    for a in res.report.accuracy:
        t.add_row(a, *(f"{r.accuracy[a]:.3f}" for r in reports))
    out.print(t)
    print(f"grid: {grid}")


def info(path: Path = typer.Argument(..., help="a checkpoint file or folder, or rflow-tiny"),
         as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Tell what a checkpoint is: family, format, parameter count, dtypes, depth, per-block MLP widths."""
    from ..checkpoints.loader import Checkpoint
    from ..memory import format_bytes
    from ..paths import transformer_path

    with Checkpoint(transformer_path(path)) as ck:
        s = ck.info().summary()
    if as_json:
        print(json.dumps(s))
        return
    labels = {"double_mlp": "double_mlp (img, txt)"}
    rows = [(labels.get(k, k), _widths(v) if isinstance(v, list) else f"{v:,}" if k == "parameters"
             else f"{v:,} ({format_bytes(v)})" if k == "weight_bytes" else str(v)) for k, v in s.items()]
    if not out.is_terminal:  # piped: plain lines, nothing cut
        for k, v in rows:
            print(f"{k}: {v}")
        return
    t = Table(show_header=False, box=None)
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)


def _widths(ws: list) -> str:
    """Widths run-length encoded: '12288 ×19' or '9000, 12288 ×3, …'."""
    parts, i = [], 0
    while i < len(ws):
        j = i
        while j + 1 < len(ws) and ws[j + 1] == ws[i]:
            j += 1
        w = tuple(ws[i]) if isinstance(ws[i], (list, tuple)) else ws[i]
        parts.append(f"{w} ×{j - i + 1}" if j > i else f"{w}")
        i = j + 1
    return ", ".join(parts) or "-"


def register(app) -> None:
    app.command()(generate)
    app.command("eval")(eval_)
    from .train_lora import train as train_command  # LoRA by default; --full goes to train_full

    app.command("train")(train_command)
    app.command()(info)
