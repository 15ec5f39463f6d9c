"""The ``rflow`` command: a thin layer over the library. Bad input -> one line on stderr, exit code 2."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import UserError

try:  # typer ≥ 0.26 carries its own parser; older releases raise click's exceptions
    from typer import TyperException as _CliError
except ImportError:  # pragma: no cover
    from click import ClickException as _CliError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rflow: rectified-flow diffusion transformers (FLUX.1) on one GPU.")
console = Console(stderr=True)
out = Console()

MODEL_HELP = "transformer checkpoint: BFL/ComfyUI .safetensors, diffusers transformer/ or pipeline folder"


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


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="what to draw"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    text_encoders: Optional[Path] = typer.Option(None, "--text-encoders", help="folder with text_encoder/ tokenizer/ text_encoder_2/ tokenizer_2/"),
    vae: Optional[Path] = typer.Option(None, "--vae", help="ae.safetensors or a diffusers vae/ folder"),
    patches: Optional[Path] = typer.Option(None, "--patches", help="distilled layer patches (rflow distill) to swap in"),
    negative: Optional[str] = typer.Option(None, "--negative", help="negative prompt (used when --cfg > 1)"),
    size: Optional[str] = typer.Option(None, "--size", help="WxH in pixels (default: the model's native size)"),
    steps: int = typer.Option(28, "--steps"),
    guidance: float = typer.Option(3.5, "--guidance", help="distilled guidance (models with a guidance embedder)"),
    cfg: float = typer.Option(1.0, "--cfg", help="true CFG scale; > 1 runs the negative prompt too"),
    seed: int = typer.Option(0, "--seed"),
    solver: str = typer.Option("euler", "--solver", help="euler | dpm++2m | unipc"),
    batch: int = typer.Option(1, "--batch", help="images per prompt"),
    image: Optional[Path] = typer.Option(None, "--image", help="start from this image (img2img)"),
    strength: float = typer.Option(1.0, "--strength", help="img2img: 1 ignores the image, 0 keeps it"),
    output: Path = typer.Option(Path("out.png"), "-o", "--output", help="PNG path; a batch writes NAME-0.png, NAME-1.png …"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16"),
):
    """Generate images from a prompt and save them as PNG with their settings embedded."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .pipeline import load
    from .sampling import SOLVERS

    width, height = parse_size(size) if size else (None, None)
    if solver not in SOLVERS:  # checked before loading, which can take minutes for FLUX.1-dev
        raise UserError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if steps < 1:
        raise UserError(f"--steps must be ≥ 1, got {steps}")
    if cfg < 1:
        raise UserError(f"--cfg must be ≥ 1 (1 disables true CFG), got {cfg}")
    if batch < 1:
        raise UserError(f"--batch must be ≥ 1, got {batch}")
    if image is not None and not image.exists():
        raise UserError(f"{image}: no such image")
    if output.suffix.lower() != ".png":
        raise UserError(f"{output}: output must be a .png file")
    if not output.parent.exists():
        raise UserError(f"{output.parent}: output directory does not exist")
    kw = dict(text_encoders=text_encoders, vae=vae, device=device, dtype=dtype)
    if patches is not None:
        from .compress.patches import load_with_patches

        pipe = load_with_patches(model, patches, **kw)
    else:
        pipe = load(model, **kw)
    width, height = width or pipe.default_size[0], height or pipe.default_size[1]
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("sampling", total=None)

        def callback(i, n, _x):
            progress.update(task, completed=i + 1, total=n)

        images = pipe.generate([prompt] * batch, negative_prompt=negative, width=width, height=height, steps=steps,
                               guidance=guidance, cfg=cfg, seed=seed, solver=solver, image=image, strength=strength,
                               callback=callback)
    elapsed = time.perf_counter() - t0
    settings = {
        "prompt": prompt, "negative_prompt": negative, "steps": steps, "solver": solver, "guidance": guidance,
        "cfg": cfg, "seed": seed, "width": width, "height": height, "batch": batch, "model": pipe.name,
        "model_hash": pipe.fingerprint, "schedule": pipe.schedule.kind, "shift": pipe.schedule.shift,
        "image": str(image) if image else None, "strength": strength if image else None,
        "patches": str(patches) if patches else None, "rflow": __version__,
    }
    from .checkpoints.io import atomic_write_bytes

    for i, (img, path) in enumerate(zip(images, output_paths(output, batch))):
        params = (f"{prompt}\n" + (f"Negative prompt: {negative}\n" if negative else "")
                  + f"Steps: {steps}, Sampler: {solver}, Guidance: {guidance}, CFG scale: {cfg}, Seed: {seed}, "
                  f"Size: {width}x{height}, Model: {pipe.name}, Model hash: {pipe.fingerprint}, "
                  + (f"Batch size: {batch}, Batch pos: {i}, " if batch > 1 else "")
                  + (f"Denoising strength: {strength}, " if image else "")
                  + f"Version: rflow {__version__}")
        atomic_write_bytes(path, png_bytes(img, params, {**settings, "batch_index": i}))
        print(path)
    console.print(f"{batch} image(s) {width}x{height}, {steps} steps in {elapsed:.2f} s")


@app.command("eval")
def eval_(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="rflow-tiny pipeline folder (default: the embedded model)"),
    prompts: int = typer.Option(200, "--prompts", help="prompts from the training grammar"),
    heldout: int = typer.Option(50, "--heldout", help="prompts with held-out colour×shape pairs (0: skip)"),
    steps: int = typer.Option(20, "--steps"),
    solver: str = typer.Option("euler", "--solver"),
    seed: int = typer.Option(0, "--seed"),
    guidance: float = typer.Option(3.5, "--guidance"),
    cfg: float = typer.Option(1.0, "--cfg"),
    grid: Path = typer.Option(Path("eval-grid.png"), "-o", "--grid", help="sample grid PNG"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    device: Optional[str] = typer.Option(None, "--device"),
):
    """Score a model's adherence to shapes-world prompts: overall, per attribute, held-out pairs."""
    from . import shapes
    from .checkpoints.io import atomic_write_bytes
    from .evaluate import evaluate
    from .pipeline import load

    if prompts < 1 or heldout < 0 or steps < 1:
        raise UserError("--prompts and --steps must be ≥ 1, --heldout ≥ 0")
    if grid.suffix.lower() != ".png" or not grid.parent.exists():
        raise UserError(f"{grid}: grid must be a .png in an existing directory")
    pipe = load(model, device=device)
    res = evaluate(pipe, n=prompts, heldout=heldout, steps=steps, solver=solver, seed=seed, guidance=guidance, cfg=cfg)
    k = min(len(res.images), 32)
    buf = io.BytesIO()
    shapes.grid(res.images[:k], res.prompts[:k], cols=8).save(buf, format="PNG")
    atomic_write_bytes(grid, buf.getvalue())
    summary = {"model": pipe.name, "model_hash": pipe.fingerprint, "steps": steps, "solver": solver, "seed": seed,
               "guidance": guidance, "cfg": cfg, **res.summary()}
    if as_json:
        out.print_json(json.dumps(summary))
    else:
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


@app.command()
def train(
    output: Path = typer.Option(..., "-o", "--output", help="run folder: train_state.safetensors, model/"),
    full: bool = typer.Option(False, "--full", help="train the whole model from scratch (rflow-tiny on the shapes world)"),
    steps: int = typer.Option(4000, "--steps"),
    batch: int = typer.Option(32, "--batch"),
    lr: float = typer.Option(1e-3, "--lr"),
    seed: int = typer.Option(0, "--seed", help="data and noise seed"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in OUTPUT exactly where it stopped"),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every"),
    device: Optional[str] = typer.Option(None, "--device"),
):
    """Train rflow-tiny from scratch (flow matching, AdamW, EMA); atomic checkpoints, exact resume."""
    import time

    from . import tiny
    from .train.full import TrainConfig, Trainer

    if not full:
        raise UserError("only full training (--full) is available in this version")
    if steps < 1 or batch < 1 or lr <= 0 or checkpoint_every < 1:
        raise UserError("--steps, --batch, --checkpoint-every must be ≥ 1 and --lr > 0")
    cfg = TrainConfig(steps=steps, batch=batch, lr=lr, seed=seed, checkpoint_every=checkpoint_every)
    pipe = tiny.build(seed=cfg.model_seed)
    if device:
        pipe.transformer.to(device), pipe.text_encoders.to(device), pipe.vae.to(device)
    trainer = Trainer(pipe, cfg, output)
    t0 = time.perf_counter()

    def progress(row):
        if row["step"] % 50 == 0 or row["step"] == cfg.steps:
            recent = [r["loss"] for r in trainer.log[-50:]]
            console.print(f"step {row['step']}/{cfg.steps} loss {sum(recent) / len(recent):.4f} "
                          f"lr {row['lr']:.2e} {time.perf_counter() - t0:.0f}s", highlight=False)

    result = trainer.run(resume=resume, progress=progress)
    command = f"rflow train --full -o {output} --steps {steps} --batch {batch} --lr {lr} --seed {seed}"
    path = trainer.export(Path(output) / "model", extra={"training": {
        "command": command, "steps": result["step"], "seed": seed, "final_loss": result["loss"]}})
    print(path)


@app.command()
def info(path: Path = typer.Argument(..., help="a checkpoint file or folder"),
         as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Tell what a checkpoint is: family, format, parameter count, dtypes, depth, per-block MLP widths."""
    from .checkpoints.flux import FluxCheckpoint

    with FluxCheckpoint(path) as ck:
        s = ck.info().summary()
    if as_json:
        out.print_json(json.dumps(s))
        return
    t = Table(show_header=False, box=None)
    for k in ("path", "family", "format", "parameters", "dtypes", "double_blocks", "single_blocks", "hidden_size", "heads", "guidance_embed"):
        v = s[k]
        t.add_row(k, f"{v:,}" if k == "parameters" else str(v))
    t.add_row("double_mlp (img, txt)", _widths(s["double_mlp"]))
    t.add_row("single_mlp", _widths(s["single_mlp"]))
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


def _register_compression_commands() -> None:
    from .compress import cli_analyze, cli_capture, cli_prune

    for mod in (cli_analyze, cli_capture, cli_prune):
        mod.register(app)


_register_compression_commands()


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="print the version")):
    if version:
        out.print(f"rflow {__version__}")
        raise typer.Exit()


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app, turning user errors into one line and exit code 2."""
    try:
        rc = app(args=argv, prog_name="rflow", standalone_mode=False)
    except UserError as e:
        print(f"rflow: error: {e}", file=sys.stderr)
        return _exit(2, argv)
    except typer.Abort:
        print("rflow: aborted", file=sys.stderr)
        return _exit(130, argv)
    except _CliError as e:  # usage errors: unknown option, missing argument, bad value
        if type(e).__name__ == "NoArgsIsHelpError":
            return _exit(2, argv)  # the help text was already printed
        print(f"rflow: error: {e.format_message()}", file=sys.stderr)
        return _exit(2, argv)
    except OSError as e:  # unreadable input, unwritable output, disk full
        print(f"rflow: error: {e}", file=sys.stderr)
        return _exit(2, argv)
    except KeyboardInterrupt:
        print("rflow: interrupted", file=sys.stderr)
        return _exit(130, argv)
    return _exit(rc if isinstance(rc, int) else 0, argv)


def _exit(code: int, argv) -> int:
    if argv is None:  # called as the console script
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
