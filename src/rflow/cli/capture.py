"""CLI commands of the compression workbench: ``rflow capture``, ``rflow distill`` and ``rflow patch apply``;
registered on the main app by rflow.cli."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UserError

err_console = Console(stderr=True)
out_console = Console()

MODEL_HELP = "model: rflow pipeline folder, BFL/ComfyUI .safetensors or diffusers folder (default: embedded rflow-tiny)"


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err_console, transient=True, disable=not err_console.is_terminal)


def _width(w) -> str:
    return "/".join(map(str, w)) if isinstance(w, (list, tuple)) else str(w)


def register(app) -> None:
    @app.command("capture")
    def capture_cmd(
        output: Path = typer.Option(..., "-o", "--output", help="capture folder (empty, new, or an earlier capture)"),
        budget: str = typer.Option(..., "--budget", help="most disk the capture may use, e.g. 500MB, 2GB, 1.5GiB"),
        model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
        prompts: Optional[Path] = typer.Option(None, "--prompts", help="prompt file, one per line"),
        shapes_n: Optional[int] = typer.Option(None, "--shapes", help="N prompts from the shapes world"),
        calibration: Optional[int] = typer.Option(None, "--calibration", help="N built-in calibration prompts"),
        sizes: Optional[str] = typer.Option(None, "--sizes", help="WxH[,WxH…] (default: the model's native size)"),
        steps: Optional[str] = typer.Option(None, "--steps", help="sampling steps: N, A-B or A,B,C (default 20)"),
        seed: int = typer.Option(0, "--seed"),
        every: int = typer.Option(1, "--every", help="keep every K-th sampling step"),
        layers: Optional[str] = typer.Option(None, "--layers", help="layers to capture, e.g. 0-18,30-37 (default all)"),
        in_out_only: bool = typer.Option(False, "--in-out-only", help="only model-level inputs and outputs"),
        guidance: float = typer.Option(3.5, "--guidance"),
        cfg: float = typer.Option(1.0, "--cfg", help="true CFG scale; > 1 captures the unconditional calls too"),
        solver: str = typer.Option("euler", "--solver"),
        store_dtype: Optional[str] = typer.Option(None, "--store-dtype", help="fp32 | bf16 | fp16 (default: the model's)"),
        shard_size: str = typer.Option("256MiB", "--shard-size", help="target shard size"),
        force: bool = typer.Option(False, "--force", help="write into a non-empty folder that is not a capture"),
        device: Optional[str] = typer.Option(None, "--device"),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="model dtype: fp32 | bf16 | fp16"),
    ):
        """Run prompts through a model and save block inputs/outputs for distillation and evaluation."""
        from ..pipeline import load, parse_dtype
        from ..sampling import SOLVERS
        from .capture import _prepare_dir, capture, format_bytes, parse_bytes
        from .workload import make_workload

        budget_bytes, shard_bytes = parse_bytes(budget), parse_bytes(shard_size)
        sources = [s for s, v in (("--prompts", prompts), ("--shapes", shapes_n), ("--calibration", calibration)) if v is not None]
        if len(sources) != 1:
            raise UserError("give exactly one of --prompts FILE, --shapes N or --calibration N"
                            + (f" (got {', '.join(sources)})" if sources else ""))
        if calibration is not None and calibration < 1:
            raise UserError(f"--calibration must be ≥ 1, got {calibration}")
        if every < 1:
            raise UserError(f"--every must be ≥ 1, got {every}")
        if in_out_only and layers is not None:
            raise UserError("give --layers or --in-out-only, not both")
        if solver not in SOLVERS:
            raise UserError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        if cfg < 1:
            raise UserError(f"--cfg must be ≥ 1 (1 disables true CFG), got {cfg}")
        sdt = parse_dtype(store_dtype) if store_dtype else None
        _prepare_dir(output, force, create=False)  # refuse a foreign non-empty folder before loading anything
        pipe = load(model, device=device, dtype=dtype)
        wl = make_workload(prompts_file=prompts, shapes_n=shapes_n, calibration_n=calibration or 64, sizes=sizes,
                           steps=steps, seed=seed, default_size=pipe.default_size)
        with _progress() as progress:
            task = progress.add_task("capturing", total=len(wl.prompts))
            res = capture(pipe, wl, output, layers=layers, every=every, in_out_only=in_out_only, budget_bytes=budget_bytes,
                          guidance=guidance, cfg=cfg, solver=solver, store_dtype=sdt, shard_bytes=shard_bytes, force=force,
                          progress=lambda d: progress.update(task, completed=d["run"]))
        if res["records"] == 0:
            raise UserError(f"--budget {budget} is too small for even one record; nothing was captured")
        note = f"; stopped at the budget after {res['runs_done']}/{res['runs']} runs" if res["stopped"] else ""
        err_console.print(f"{res['records']} records in {res['shards']} shard(s), {format_bytes(res['bytes'])}{note}",
                          highlight=False)
        print(res["dir"])

    @app.command("distill")
    def distill_cmd(
        student: Path = typer.Option(..., "--student", help="the pruned model (rflow pipeline folder or .safetensors)"),
        capture_dir: Path = typer.Option(..., "--capture", help="capture folder of the teacher (rflow capture)"),
        output: Path = typer.Option(..., "-o", "--output", help="patch file (.safetensors); the report goes to NAME.json"),
        teacher: Optional[Path] = typer.Option(None, "--teacher", help=MODEL_HELP),
        layers: Optional[str] = typer.Option(None, "--layers", help="layers to train, e.g. 0-18 (default: every pruned one)"),
        train: str = typer.Option("mlp", "--train", help="mlp (MLP weights only) | block (every linear of the block)"),
        steps: int = typer.Option(200, "--steps", help="optimizer steps per layer"),
        lr: float = typer.Option(1e-3, "--lr"),
        batch: int = typer.Option(8, "--batch", help="records per step"),
        holdout: float = typer.Option(0.2, "--holdout", help="share of the capture held out for evaluation"),
        seed: int = typer.Option(0, "--seed"),
        device: Optional[str] = typer.Option(None, "--device"),
        as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    ):
        """Retrain a pruned student's blocks to reproduce the teacher's captured block outputs."""
        from ..checkpoints.io import atomic_write_bytes
        from ..pipeline import default_device
        from .capture import CaptureReader
        from .distill import TRAIN_MODES, distill
        from .patches import load_transformer, save_patches

        if train not in TRAIN_MODES:
            raise UserError(f"unknown --train {train!r}; choose mlp or block")
        if steps < 1 or batch < 1 or lr <= 0:
            raise UserError("--steps and --batch must be ≥ 1 and --lr > 0")
        if not 0 < holdout < 1:
            raise UserError(f"--holdout must be in (0, 1), got {holdout}")
        if output.suffix.lower() != ".safetensors":
            raise UserError(f"{output}: the patch file must be a .safetensors file")
        if not output.parent.is_dir():
            raise UserError(f"{output.parent}: output directory does not exist")
        reader = CaptureReader(capture_dir)
        teacher_model, teacher_fp = load_transformer(teacher, device="cpu")
        if reader.fingerprint and teacher_fp and reader.fingerprint != teacher_fp:
            raise UserError(f"{capture_dir}: captured from model {reader.fingerprint}, but the teacher is {teacher_fp}")
        student_model, student_fp = load_transformer(student, device="cpu")
        dev = device or default_device()
        with _progress() as progress:
            task = progress.add_task("distilling", total=None)

            def on_step(d):
                progress.update(task, description=f"layer {d['layer']} loss {d['loss']:.3g}", completed=d["step"], total=d["steps"])

            patches, report = distill(teacher_model, student_model, reader, layers=layers, train=train, steps=steps, lr=lr,
                                      batch=batch, holdout=holdout, seed=seed, device=dev, progress=on_step)
        save_patches(output, patches, train=train, report=report, teacher_fingerprint=teacher_fp,
                     student_fingerprint=student_fp)
        summary = {"schema": "rflow.distill_report", "version": 1, "patches": output.name, "capture": str(capture_dir),
                   "teacher": str(teacher) if teacher else "rflow-tiny", "teacher_fingerprint": teacher_fp,
                   "student": str(student), "student_fingerprint": student_fp, "train": train, "steps": steps, "lr": lr,
                   "batch": batch, "holdout": holdout, "seed": seed, "layers": report}
        report_path = output.with_suffix(".json")
        atomic_write_bytes(report_path, json.dumps(summary, indent=1).encode())
        if as_json:
            out_console.print_json(json.dumps(summary))
        else:
            t = Table(title=f"distillation ({train}, {steps} steps, held-out MSE)")
            for col, just in (("layer", "right"), ("block", "left"), ("MLP width", "left"), ("initial", "right"),
                              ("final", "right"), ("change", "right"), ("train loss", "right")):
                t.add_column(col, justify=just)
            for r in report:
                change = (r["final_heldout_mse"] / r["initial_heldout_mse"] - 1) * 100 if r["initial_heldout_mse"] else 0.0
                t.add_row(str(r["layer"]), r["block"].replace("_blocks.", " "),
                          f"{_width(r['teacher_mlp'])} → {_width(r['student_mlp'])}",
                          f"{r['initial_heldout_mse']:.4g}", f"{r['final_heldout_mse']:.4g}", f"{change:+.1f}%",
                          f"{r['final_train_loss']:.4g}")
            out_console.print(t)
        print(output)
        print(report_path)

    patch_app = typer.Typer(no_args_is_help=True, help="Distillation patches: bake them into a model.")

    @patch_app.command("apply")
    def patch_apply_cmd(
        model: Path = typer.Argument(..., help="the student the patches were trained for (rflow folder or .safetensors)"),
        patches: Path = typer.Argument(..., help="patch file from rflow distill"),
        output: Path = typer.Option(..., "-o", "--output", help="new model: a folder for an rflow folder, else a .safetensors"),
        force: bool = typer.Option(False, "--force", help="apply patches trained for another student fingerprint"),
    ):
        """Write MODEL with PATCHES applied as a new model of the same kind."""
        from .patches import write_patched

        print(write_patched(model, patches, output, force=force))

    app.add_typer(patch_app, name="patch")
