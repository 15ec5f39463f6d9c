"""``rflow train``: LoRA training on a captioned image folder (the default), or ``--full`` (shapes world)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import console, progress


def train(
    output: Path = typer.Option(..., "-o", "--output", help="run folder: train_state.safetensors, lora.safetensors "
                                                             "(LoRA) or model/ (--full)"),
    full: bool = typer.Option(False, "--full", help="train every weight on the shapes world: rflow-tiny from scratch, "
                                                  "or the --model given"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="the base model (LoRA: required; --full: start "
                                                                     "from it instead of a fresh rflow-tiny)"),
    data: Optional[Path] = typer.Option(None, "--data", help="LoRA: folder of images with .txt captions, or a "
                                                             "metadata.jsonl / metadata.csv"),
    steps: Optional[int] = typer.Option(None, "--steps", help="default 1000 (LoRA), 4000 (--full)"),
    rank: int = typer.Option(16, "--rank", help="LoRA rank"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha (default: the rank)"),
    targets: str = typer.Option("attn,mlp", "--targets", help="attn, mlp, mod, all (comma-separated) or layer globs"),
    lr: Optional[float] = typer.Option(None, "--lr", help="default 1e-4 (LoRA), 1e-3 (--full)"),
    batch: Optional[int] = typer.Option(None, "--batch", help="default 1 (LoRA), 32 (--full)"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro-batches per optimizer step"),
    warmup: int = typer.Option(0, "--warmup", help="linear warm-up steps"),
    resolution: int = typer.Option(512, "--resolution", help="bucket area target: RESOLUTION² pixels"),
    timestep: str = typer.Option("logit-normal", "--timestep", help="uniform | logit-normal | shift"),
    logit_mean: float = typer.Option(0.0, "--logit-mean"),
    logit_std: float = typer.Option(1.0, "--logit-std"),
    shift: str = typer.Option("3.0", "--shift", help="for --timestep shift: a factor, or auto (the model's "
                                                   "resolution-dependent shift per bucket)"),
    x0_weight_floor: float = typer.Option(1.0, "--x0-weight-floor", help="models that predict x0 (rflow-tiny): the "
                                          "loss is the x0 error weighted by 1/max(t, F)², up to 1/F² for nearly "
                                          "clean samples; 1: the plain x0 error"),
    ema: float = typer.Option(0.0, "--ema", help="EMA decay of the LoRA weights, e.g. 0.99 (0: none); samples and "
                                                "the final LoRA use the EMA"),
    caption_dropout: float = typer.Option(0.05, "--caption-dropout"),
    preserve: str = typer.Option("", "--preserve", help="LoRA output preservation: WORD=STAND-IN[|STAND-IN...] pairs, "
                                                      "comma-separated (e.g. magenta=red|blue,star=circle); the "
                                                      "LoRA is held to the base model on captions with the words "
                                                      "replaced"),
    preserve_weight: float = typer.Option(1.0, "--preserve-weight", help="weight of the preservation loss"),
    masked_loss: bool = typer.Option(False, "--masked-loss", help="weigh the loss by each image's mask: a same-name "
                                     "image in DATA/masks/ (white: full weight) or the image's alpha channel"),
    mask_floor: float = typer.Option(0.1, "--mask-floor", help="--masked-loss: the weight of unmasked pixels, "
                                     "in [0, 1] (each image's weights are then scaled to mean 1)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="distilled models: guidance during training "
                                                                      "(default 1.0)"),
    quant: Optional[str] = typer.Option(None, "--quant", help="quantize the frozen base first: one format (int8, fp8, "
                                                              "Q8_0, …)"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="recompute blocks in backward"),
    fmt: str = typer.Option("peft", "--format", help="peft (diffusers) | kohya"),
    seed: int = typer.Option(0, "--seed", help="data and noise seed"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in OUTPUT exactly where it stopped"),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every"),
    sample_every: int = typer.Option(0, "--sample-every", help="LoRA: write RUN/samples/step-N.png every N steps "
                                                               "(0: never)"),
    sample_prompt: Optional[list[str]] = typer.Option(None, "--sample-prompt", help="prompt for the samples, "
                                                       "repeatable (default: the first 4 captions), seed 0"),
    device: Optional[str] = typer.Option(None, "--device"),
    offload: str = typer.Option("none", "--offload", help="none | blocks | auto: stream frozen transformer blocks "
                                                          "from host memory (not with --full, which trains them all)"),
    vram: Optional[str] = typer.Option(None, "--vram", help="GPU memory offload may use, e.g. 4GiB"),
):
    """Train a LoRA on a frozen model from a captioned image folder (atomic checkpoints, exact resume,
    PEFT or kohya output), or with --full every weight on the shapes world."""
    if full:
        from .train_full import run_full

        lora_only = {"--data": data is not None, "--alpha": alpha is not None, "--quant": quant is not None,
                     "--guidance": guidance is not None, "--grad-accum": grad_accum != 1, "--rank": rank != 16,
                     "--ema": ema != 0.0, "--shift": shift != "3.0", "--preserve": bool(preserve),
                     "--preserve-weight": preserve_weight != 1.0, "--x0-weight-floor": x0_weight_floor != 1.0,
                     "--masked-loss": masked_loss, "--mask-floor": mask_floor != 0.1}
        lora_only.update({"--sample-every": sample_every != 0, "--sample-prompt": bool(sample_prompt)})
        used = [k for k, v in lora_only.items() if v]
        if used:
            raise UserError(f"{', '.join(used)}: LoRA options, not for --full")
        return run_full(output=output, model=model, steps=4000 if steps is None else steps,
                        batch=32 if batch is None else batch, lr=1e-3 if lr is None else lr, seed=seed, resume=resume,
                        checkpoint_every=checkpoint_every, device=device, offload=offload, vram=vram)
    run_lora(output=output, model=model, data=data, steps=1000 if steps is None else steps, rank=rank, alpha=alpha,
             targets=targets, lr=1e-4 if lr is None else lr, batch=1 if batch is None else batch, grad_accum=grad_accum,
             warmup=warmup, resolution=resolution, timestep=timestep, logit_mean=logit_mean, logit_std=logit_std,
             shift=shift, ema=ema, caption_dropout=caption_dropout, guidance=guidance, quant=quant,
             gradient_checkpointing=gradient_checkpointing, fmt=fmt, seed=seed, resume=resume,
             checkpoint_every=checkpoint_every, device=device, offload=offload, vram=vram, sample_every=sample_every,
             sample_prompts=sample_prompt or [], preserve=preserve, preserve_weight=preserve_weight,
             x0_weight_floor=x0_weight_floor, masked_loss=masked_loss, mask_floor=mask_floor)


def _memory(device) -> str:
    """Peak memory so far: the GPU's allocations on CUDA, the process's resident set on the CPU."""
    from ..memory import format_bytes

    import torch

    if device.type == "cuda":
        return f"{format_bytes(torch.cuda.max_memory_allocated(device))} peak"
    import resource

    return f"{format_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)} RSS peak"


def run_lora(*, output: Path, model, data, steps, rank, alpha, targets, lr, batch, grad_accum, warmup, resolution,
             timestep, logit_mean, logit_std, shift, caption_dropout, ema, guidance, quant, gradient_checkpointing, fmt,
             seed, resume, checkpoint_every, device, offload, vram, sample_every=0, sample_prompts=(), preserve="",
             preserve_weight=1.0, x0_weight_floor=1.0, masked_loss=False, mask_floor=0.1) -> None:
    import time

    from .. import distributed, options
    from ..lora.write import FORMATS
    from ..outputs import check_output
    from ..runtime.offload import check_options
    from ..train.data import check_masks, read_dataset
    from ..train.lora import STATE_FILE, LoRAConfig, LoRATrainer
    from ..train.tensorboard import EventWriter
    from PIL import Image

    if model is None:
        raise UserError("LoRA training needs --model (the frozen base), or pass --full to train every weight")
    if data is None:
        raise UserError("LoRA training needs --data: a folder of images with .txt captions or a metadata.jsonl")
    check_options(offload, vram)
    if quant is not None and offload != "none":
        raise UserError("--quant quantizes the loaded base, --offload streams it: for both, quantize the model first "
                        "(rflow quantize) and train on that file with --offload")
    if quant is not None:
        from ..quant.api import normalize_format

        try:
            normalize_format(quant)
        except UserError as err:
            raise UserError(f"--quant: {err}") from None
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    options.integer(steps, "--steps", low=1, high=10_000_000)
    options.integer(batch, "--batch", low=1, high=4096)
    options.integer(rank, "--rank", low=1, high=4096)
    options.integer(grad_accum, "--grad-accum", low=1, high=4096)
    options.integer(warmup, "--warmup", low=0)
    options.integer(resolution, "--resolution", low=8, high=16384)
    options.integer(checkpoint_every, "--checkpoint-every", low=1)
    options.integer(sample_every, "--sample-every", low=0)
    options.number(lr, "--lr", low=0, low_open=True, high=1)
    options.number(caption_dropout, "--caption-dropout", low=0, high=1)
    options.number(preserve_weight, "--preserve-weight", low=0, low_open=True)
    options.number(mask_floor, "--mask-floor", low=0, high=1)
    if shift != "auto":
        try:
            shift = float(shift)
        except ValueError:
            raise UserError(f"--shift {shift!r}: a positive number, or auto") from None
    cfg = LoRAConfig(steps=steps, rank=rank, alpha=alpha, targets=targets, lr=lr, batch=batch, grad_accum=grad_accum,
                     warmup=warmup, resolution=resolution, timestep=timestep, logit_mean=logit_mean,
                     logit_std=logit_std, shift=shift, caption_dropout=caption_dropout, guidance=guidance, ema=ema,
                     gradient_checkpointing=gradient_checkpointing, seed=seed, checkpoint_every=checkpoint_every,
                     preserve=preserve, preserve_weight=preserve_weight, x0_weight_floor=x0_weight_floor,
                     masked_loss=masked_loss, mask_floor=mask_floor)
    cfg.check()
    output = output.expanduser()
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; the run folder must be a folder")
    if resume and not (output / STATE_FILE).is_file():
        raise UserError(f"{output / STATE_FILE}: nothing to resume")
    if not resume and output.is_dir() and any(p.name != "cache" for p in output.iterdir()):
        raise UserError(f"{output} already exists: continue that run with --resume, or choose a new folder")
    check_output(output, kind="dir", force=True, what="the run folder")
    items = read_dataset(data)  # a bad dataset fails before the model loads
    if masked_loss:
        check_masks(items)

    from ..paths import resolve_model
    from ..pipeline import load

    dev = options.device(device) if device is not None else None
    with distributed.group(dev) as (rank_id, world, dev):  # each rank on its own GPU
        pipe = load(resolve_model(model), device=dev, dtype="fp32" if (dev is None or dev.type == "cpu") else None,
                    offload=offload, vram=vram)
        if quant is not None:
            from ..quant.api import quantize_

            quantize_(pipe.transformer, quant)
        if sample_prompts:
            pipe.check_prompts(list(sample_prompts))
        trainer = LoRATrainer(pipe, cfg, items, output, rank=rank_id, world=world)
        if trainer.offload is not None and rank_id == 0:
            console.print(str(trainer.offload), highlight=False, soft_wrap=True)
        prompts = list(sample_prompts) or list(dict.fromkeys(it.caption for it in items))[:4]
        t0 = time.perf_counter()
        log_path = output / "log.jsonl"
        first: list[int] = []
        board = EventWriter(output / "tensorboard") if rank_id == 0 else None
        with progress("training LoRA", cfg.steps) as update:
            def on_step(row):
                first.append(first[0] if first else row["step"] - 1)
                recent = [r["loss"] for r in trainer.log[-50:]]
                its = (row["step"] - first[0]) / max(1e-9, time.perf_counter() - t0)
                update(row["step"], description=f"training LoRA (loss {sum(recent) / len(recent):.4f}, {its:.2f} it/s, "
                                                f"{_memory(pipe.device)})")
                if rank_id == 0:
                    if len(first) == 1:  # the log as of the checkpoint (a killed run may have logged past it)
                        log_path.write_text("".join(json.dumps(r) + "\n" for r in trainer.log[:-1]), encoding="utf-8")
                    with open(log_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
                    board.scalars(row["step"], {f"train/{k}": row[k] for k in ("loss", "lr", "grad_norm", "preserve")
                                                if k in row})
                    if sample_every and row["step"] % sample_every == 0:
                        path = trainer.sample(prompts, output / "samples" / f"step-{row['step']:06d}.png")
                        with Image.open(path) as im:
                            board.image("samples", im, row["step"])
                    board.flush()

            # every caption and sample prompt is cached first: the text encoders are not needed after that
            try:
                result = trainer.run(resume=resume, progress=on_step, sample_prompts=prompts, unload_text_encoders=True)
            finally:
                if board is not None:
                    board.close()
    if rank_id == 0:
        path = trainer.export(fmt)
        console.print(f"{result['step']} steps, loss {result['loss']:.4f}, {time.perf_counter() - t0:.0f} s",
                      highlight=False)
        print(path)
