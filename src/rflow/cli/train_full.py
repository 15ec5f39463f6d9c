"""``rflow train --full``: every weight on the shapes world (rflow-tiny from scratch, or a --model), on
one process or sharded with FSDP2 under torchrun."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import UserError
from .common import console, progress


def run_full(*, output: Path, model, steps: int, batch: int, lr: float, seed: int, resume: bool,
             checkpoint_every: int, device, offload: str, vram) -> None:
    from .. import distributed, options
    from ..outputs import check_output
    from ..runtime.offload import check_options
    from ..train.full import STATE_FILE, TrainConfig

    check_options(offload, vram)
    if offload != "none":  # streamed weights are frozen; --full trains every one of them
        raise UserError("--offload streams frozen blocks, but --full trains every weight: full training runs with "
                        "the whole model on the device (--offload none)")
    options.integer(steps, "--steps", low=1, high=10_000_000)
    options.integer(batch, "--batch", low=1, high=4096)
    options.number(lr, "--lr", low=0, low_open=True, high=1)
    options.integer(checkpoint_every, "--checkpoint-every", low=1)
    output = output.expanduser()
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; the run folder must be a folder")
    if resume and not (output / STATE_FILE).is_file():
        raise UserError(f"{output / STATE_FILE}: nothing to resume")
    if not resume and output.is_dir() and any(output.iterdir()):
        raise UserError(f"{output} already exists: continue that run with --resume, or choose a new folder")
    check_output(output, kind="dir", force=True, what="the run folder")  # a writable place
    dev = options.device(device) if device is not None else None
    cfg = TrainConfig(steps=steps, batch=batch, lr=lr, seed=seed, checkpoint_every=checkpoint_every)
    source = None
    if model is not None:
        from ..paths import resolve_model

        source = resolve_model(model)
    with distributed.group(dev) as (rank, world, dev):  # each rank on its own GPU
        # the model (and FSDP's hold on the group) is gone when _train returns
        result, path, seconds = _train(output=output, model=model, source=source, dev=dev, cfg=cfg, rank=rank,
                                       world=world, resume=resume)
    if rank == 0:
        console.print(f"{result['step']} steps, loss {result['loss']:.4f}, {seconds:.0f} s",
                      highlight=False)
        print(path)


def _train(*, output, model, source, dev, cfg, rank, world, resume):
    """Train and export on this rank: (result, exported path, seconds)."""
    from ..train.full import Trainer, export_path
    from ..train.tensorboard import EventWriter
    from ..world import tiny

    if model is not None:
        from ..pipeline import load

        pipe = load(source, device=dev, dtype="fp32")
        pipe.check_request(1, 64, 64)  # the shapes world draws 64x64 images
    else:
        pipe = tiny.build(seed=cfg.model_seed)
        if dev is not None:
            pipe.transformer.to(dev), pipe.text_encoders.to(dev), pipe.vae.to(dev)
    trainer = Trainer(pipe, cfg, output, source=source, rank=rank, world=world)
    board = EventWriter(output / "tensorboard") if rank == 0 else None
    t0 = time.perf_counter()
    with progress("training", cfg.steps) as update:
        def on_step(row):
            recent = [r["loss"] for r in trainer.log[-50:]]
            update(row["step"], description=f"training (loss {sum(recent) / len(recent):.4f})")
            if board is not None:
                board.scalars(row["step"], {f"train/{k}": row[k] for k in ("loss", "lr", "grad_norm")})
                board.flush()

        try:
            result = trainer.run(resume=resume, progress=on_step)
        finally:
            if board is not None:
                board.close()
    command = (f"rflow train --full -o {output} --steps {cfg.steps} --batch {cfg.batch} --lr {cfg.lr} --seed {cfg.seed}"
               + (f" --model {model}" if model is not None else ""))
    path = trainer.export(export_path(output, source), extra={"training": {
        "command": command, "steps": result["step"], "seed": cfg.seed, "final_loss": result["loss"]}})
    return result, path, time.perf_counter() - t0
