"""``rflow capture``, ``rflow distill`` and ``rflow patch apply``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import UserError
from .common import MODEL_HELP, console, force_option, out, progress


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
        layers: Optional[str] = typer.Option(None, "--layers", help="layers (blocks) to capture, e.g. 0-18,30-37 (default all)"),
        in_out_only: bool = typer.Option(False, "--in-out-only", help="only model-level inputs and outputs"),
        guidance: float | None = typer.Option(None, "--guidance", help="distilled guidance, default 3.5 (only models with a guidance embedder)"),
        cfg: float = typer.Option(1.0, "--cfg", help="true CFG scale; > 1 captures the unconditional calls too"),
        solver: str = typer.Option("euler", "--solver"),
        store_dtype: Optional[str] = typer.Option(None, "--store-dtype", help="fp32 | bf16 | fp16 (default: the model's)"),
        shard_size: str = typer.Option("256MiB", "--shard-size", help="target shard size"),
        force: bool = force_option(),
        device: Optional[str] = typer.Option(None, "--device"),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="model dtype: fp32 | bf16 | fp16"),
    ):
        """Run prompts through a model (any family) and save block inputs/outputs for distillation and evaluation."""
        from .. import options
        from ..compress.capture import capture, format_bytes, parse_bytes
        from ..compress.workload import make_workload, parse_sizes, parse_steps
        from ..outputs import check_output
        from ..paths import resolve_model
        from ..pipeline import load, parse_dtype
        from ..sampling import SOLVERS

        budget_bytes, shard_bytes = parse_bytes(budget), parse_bytes(shard_size)
        sources = [s for s, v in (("--prompts", prompts), ("--shapes", shapes_n), ("--calibration", calibration)) if v is not None]
        if len(sources) != 1:
            raise UserError("give exactly one of --prompts FILE, --shapes N or --calibration N"
                            + (f" (got {', '.join(sources)})" if sources else ""))
        for n, name in ((calibration, "--calibration"), (shapes_n, "--shapes")):
            if n is not None:
                options.integer(n, name, low=1, high=100_000)
        options.integer(every, "--every", low=1)
        if in_out_only and layers is not None:
            raise UserError("give --layers or --in-out-only, not both")
        options.layer_spec(layers)
        if solver not in SOLVERS:
            raise UserError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        options.guidance(guidance, "--guidance")
        options.number(cfg, "--cfg", low=1)
        if sizes is not None:
            parse_sizes(sizes)
        if steps is not None:
            parse_steps(steps)
        sdt = parse_dtype(store_dtype) if store_dtype else None
        dt = parse_dtype(dtype) if dtype else None
        output = check_output(output, kind="dir", force=force, what="the capture folder")
        dev = options.device(device) if device is not None else None
        pipe = load(resolve_model(model), device=dev, dtype=dt)
        wl = make_workload(prompts_file=prompts, shapes_n=shapes_n, calibration_n=calibration or 64, sizes=sizes,
                           steps=steps, seed=seed, default_size=pipe.default_size)
        with progress("capturing", len(wl.prompts)) as update:
            res = capture(pipe, wl, output, layers=layers, every=every, in_out_only=in_out_only, budget_bytes=budget_bytes,
                          guidance=guidance, cfg=cfg, solver=solver, store_dtype=sdt, shard_bytes=shard_bytes, force=force,
                          progress=lambda d: update(d["run"]))
        note = f"; stopped at the budget after {res['runs_done']}/{res['runs']} runs" if res["stopped"] else ""
        console.print(f"{res['records']} records in {res['shards']} shard(s), {format_bytes(res['bytes'])}{note}",
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
        force: bool = force_option(),
        device: Optional[str] = typer.Option(None, "--device"),
        as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    ):
        """Retrain a pruned student's blocks to reproduce the teacher's captured block outputs (any family)."""
        from .. import options
        from ..compress.capture import CaptureReader
        from ..compress.distill import TRAIN_MODES, distill
        from ..compress.patches import load_transformer, patch_tensors
        from ..outputs import check_output, replacing_all
        from ..paths import model_name, resolve_model
        from ..pipeline import default_device

        if train not in TRAIN_MODES:
            raise UserError(f"unknown --train {train!r}; choose mlp or block")
        options.integer(steps, "--steps", low=1, high=10_000_000)
        options.integer(batch, "--batch", low=1, high=4096)
        options.number(lr, "--lr", low=0, low_open=True, high=1)
        options.number(holdout, "--holdout", low=0, high=1, low_open=True, high_open=True)
        options.layer_spec(layers)
        output = check_output(output, suffixes=(".safetensors",), force=force, what="the patch file")
        report_path = check_output(output.with_suffix(".json"), force=force, what="the report")
        dev = options.device(device) if device is not None else default_device()
        reader = CaptureReader(capture_dir)
        teacher_model, teacher_fp = load_transformer(resolve_model(teacher), device="cpu")
        if reader.fingerprint and teacher_fp and reader.fingerprint != teacher_fp:
            raise UserError(f"{capture_dir}: captured from model {reader.fingerprint}, but the teacher is {teacher_fp}")
        student_model, student_fp = load_transformer(resolve_model(student), device="cpu")
        with progress("distilling", steps) as update:
            def on_step(d):
                update(d["step"], total=d["steps"], description=f"layer {d['layer']} loss {d['loss']:.3g}")

            patches, report = distill(teacher_model, student_model, reader, layers=layers, train=train, steps=steps, lr=lr,
                                      batch=batch, holdout=holdout, seed=seed, device=dev, progress=on_step)
        summary = {"schema": "rflow.distill_report", "version": 1, "patches": output.name, "capture": str(capture_dir),
                   "teacher": model_name(teacher), "teacher_fingerprint": teacher_fp,
                   "student": model_name(student), "student_fingerprint": student_fp, "train": train, "steps": steps, "lr": lr,
                   "batch": batch, "holdout": holdout, "seed": seed, "layers": report}
        with replacing_all([output, report_path]) as (tmp_patches, tmp_report):
            tensors, metadata = patch_tensors(patches, train=train, report=report, teacher_fingerprint=teacher_fp,
                                              student_fingerprint=student_fp, family=reader.family)
            from ..checkpoints.io import save_safetensors

            save_safetensors(tensors, tmp_patches, metadata)
            tmp_report.write_text(json.dumps(summary, indent=1))
        if as_json:
            print(json.dumps(summary))
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
            out.print(t)
        print(output)
        print(report_path)

    patch_app = typer.Typer(no_args_is_help=True, help="Distillation patches: bake them into a model.")

    @patch_app.command("apply")
    def patch_apply_cmd(
        model: Path = typer.Argument(..., help="the student the patches were trained for (rflow folder or .safetensors)"),
        patches: Path = typer.Argument(..., help="patch file from rflow distill"),
        output: Path = typer.Option(..., "-o", "--output", help="new model: a folder for an rflow folder, else a .safetensors"),
        force: bool = force_option(),
        any_student: bool = typer.Option(False, "--any-student", help="apply patches trained for another student "
                                         "(the shapes must still match)"),
    ):
        """Write MODEL with PATCHES applied as a new model of the same kind."""
        from ..compress.patches import write_patched_model
        from ..paths import resolve_model

        saved = write_patched_model(resolve_model(model), patches, output, force=force, any_student=any_student)
        if saved.note:
            console.print(saved.note, highlight=False)
        print(saved.path)

    app.add_typer(patch_app, name="patch")
