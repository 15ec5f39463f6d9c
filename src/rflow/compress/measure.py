"""How far a modified model is from its reference, measured on the whole stack.

Three numbers, all against the reference model on one workload:

- **velocity MSE** — both transformers are run on the *same* inputs: the points ``(x_t, t)`` of
  the reference's own sampling trajectory (same prompts, conditioning, noise, schedule and solver),
  every step; the MSE of the two velocities is averaged over (run, step). This isolates the
  transformer: the conditioning is the reference's.
- **latent MSE** — both pipelines generate from the same noise (each with its own text encoders and
  schedule), and the final latents are compared.
- **adherence** — for shapes-world models (rflow-tiny), both final images are scored with
  :func:`rflow.world.shapes.score`.

``velocity_rel_mse`` is Σ(v − v_ref)² / Σv_ref²: scale-free, comparable across models.

With a capture of the reference (``rflow capture``), the velocity MSE is computed from the stored
model inputs and outputs instead (:func:`measure_capture`); no reference model is run.

Per-layer sensitivity zeroes one layer's least important units at a time (equivalent to slicing
them out: the unit's GELU output becomes exactly 0) and measures the velocity MSE against the
untouched model along cached reference trajectories, so the reference runs only once.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .. import sampling
from ..errors import NonFiniteError, UserError
from ..families.base import Guidance, guided
from ..families.flux1 import Denoiser
from .stats import ActivationStats
from .units import layer_refs, n_layers as count_layers, refs_by_name, select_units


def layer_kind(refs, layer: int) -> str:
    """What ``rflow sensitivity`` calls a layer: FLUX's "double" / "single" blocks, else its stream."""
    streams = {r.stream for r in refs if r.layer == layer}
    if streams <= {"img", "txt"} and streams:
        return "double"
    return "/".join(sorted(streams)) or "-"
from .workload import Run, Workload


@dataclass
class Trajectory:
    """The reference's sampling run for a batch of workload runs sharing size and step count."""

    runs: list[Run]
    width: int
    height: int
    steps: int
    cond: object  # the family's conditioning (rflow.families.*.Cond), guidance included
    noise: Tensor
    points: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # (x_t, t, v_ref) per model call
    final: Tensor | None = None  # the reference's final latents

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.runs]


def _noise(pipe, run: Run) -> Tensor:
    """The noise ``Pipeline.generate(seed=run.seed)`` draws for one prompt."""
    shape = pipe.latent_shape(run.height, run.width, 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(run.seed), dtype=torch.float32)


def _batches(workload: Workload, batch: int) -> list[list[Run]]:
    """Runs grouped by (size, steps), in workload order, at most ``batch`` per group."""
    groups: dict[tuple[int, int, int], list[Run]] = {}
    for r in workload.runs():
        groups.setdefault((r.width, r.height, r.steps), []).append(r)
    return [g[i : i + batch] for g in groups.values() for i in range(0, len(g), batch)]


def _check_sizes(pipe, workload: Workload) -> None:
    m = pipe.size_multiple
    for w, h in workload.sizes:
        if w % m or h % m:
            raise UserError(f"size {w}x{h} is not a multiple of {m} for this model")


class VelocityErrors:
    """Accumulates the velocity error of ``pipe`` at reference points: call it with
    ``(trajectory, x_t, t, v_ref)``; the model sees the trajectory's conditioning and guidance."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.errs: list[float] = []  # MSE per (sample, model call)
        self.sq_err = 0.0  # Σ (v − v_ref)²
        self.sq_ref = 0.0  # Σ v_ref²
        self._traj: Trajectory | None = None
        self._velocity = None

    @torch.no_grad()
    def __call__(self, traj: Trajectory, x: Tensor, t: Tensor, v_ref: Tensor) -> None:
        dev = self.pipe.device
        if traj is not self._traj:
            self._traj = traj
            self._velocity = guided(self.pipe.denoiser, traj.cond.to(dev), None, Guidance())
        v = self._velocity(x.to(dev), t.to(dev)).double()
        if not bool(torch.isfinite(v).all()):
            raise NonFiniteError(f"{self.pipe.name}: the model produced NaN/inf at t = {float(t):.4g}")
        v_ref = v_ref.to(dev).double()
        d = (v - v_ref).pow(2)
        self.errs += d.flatten(1).mean(1).tolist()
        self.sq_err += float(d.sum())
        self.sq_ref += float(v_ref.pow(2).sum())

    def summary(self) -> dict:
        errs = self.errs
        rel = self.sq_err / self.sq_ref if self.sq_ref > 0 else (0.0 if self.sq_err == 0 else math.inf)
        return {"velocity_evaluations": len(errs), "velocity_mse": _mean(errs),
                "velocity_mse_max": max(errs) if errs else float("nan"), "velocity_rel_mse": rel}


@torch.no_grad()
def reference_trajectories(reference, workload: Workload, *, guidance: float | None = None, solver: str = "euler",
                           batch: int = 8, keep_points: bool = True,
                           on_point: Callable[[Trajectory, Tensor, Tensor, Tensor], None] | None = None,
                           progress: Callable[[int], None] | None = None) -> list[Trajectory]:
    """Sample every run of ``workload`` with ``reference`` (a :class:`~rflow.pipeline.Pipeline`) and,
    for every model call, hand the solver's ``x_t``, ``t`` and the reference velocity to ``on_point``
    and (``keep_points``) keep them, on the CPU, in ``Trajectory.points``. The final latents equal
    ``reference.generate(..., seed=run.seed, output_type="latent")``."""
    if solver not in sampling.SOLVERS:
        raise UserError(f"unknown solver {solver!r}; choose from {', '.join(sampling.SOLVERS)}")
    if batch < 1:
        raise UserError(f"batch must be ≥ 1, got {batch}")
    _check_sizes(reference, workload)
    dev = reference.device
    out = []
    for runs in _batches(workload, batch):
        r0 = runs[0]
        noise = torch.cat([_noise(reference, r) for r in runs]).to(dev)
        cond = reference.encode([r.prompt for r in runs], guidance=reference.resolve_guidance(guidance))
        traj = Trajectory(runs, r0.width, r0.height, r0.steps, cond, noise)
        sigmas = reference.schedule.sigmas(r0.steps, image_seq_len=reference.family_module.image_seq_len(noise.shape))
        velocity = guided(reference.denoiser, cond, None, Guidance())

        def recording(x: Tensor, t: Tensor, velocity=velocity, traj=traj) -> Tensor:
            v = velocity(x, t)
            if on_point is not None:
                on_point(traj, x, t, v)
            if keep_points:
                traj.points.append((x.detach().to("cpu", copy=True), t.detach().to("cpu", copy=True), v.detach().to("cpu", copy=True)))
            return v

        traj.final = sampling.sample(recording, noise, sigmas.to(dev), solver)
        out.append(traj)
        if progress is not None:
            progress(sum(len(t.runs) for t in out))
    return out


@torch.no_grad()
def velocity_errors(pipe, trajectories: list[Trajectory]) -> VelocityErrors:
    """Run ``pipe``'s transformer on every kept point of ``trajectories``."""
    acc = VelocityErrors(pipe)
    for traj in trajectories:
        if not traj.points:
            raise UserError("the reference trajectories were recorded without their points")
        for x, t, v_ref in traj.points:
            acc(traj, x, t, v_ref)
    return acc


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _adherence_wanted(model_pipe, workload: Workload, adherence: bool | None) -> bool:
    if adherence is not None:
        return adherence
    if not (workload.source == "shapes" or str(model_pipe.name).startswith("rflow-tiny")):
        return False
    from ..world import shapes

    try:  # prompts outside the shapes grammar (a prompt file) cannot be scored
        for p in workload.prompts:
            shapes.parse(p)
    except UserError:
        return False
    return True


@torch.no_grad()
def measure(model_pipe, reference_pipe, workload: Workload, *, guidance: float | None = None, solver: str = "euler",
            batch: int = 8, final: bool = True, adherence: bool | None = None,
            trajectories: list[Trajectory] | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Full-stack distance of ``model_pipe`` from ``reference_pipe`` on ``workload`` (module docstring).

    ``final``: also generate with the model and compare final latents; ``adherence``: score both
    models' images with the shapes-world judge (default: when the model is rflow-tiny or the workload
    is ``--shapes``). ``trajectories``: reuse reference trajectories recorded earlier.
    ``progress(done, total)`` counts runs: reference trajectories, then the model's own generations.
    Returns a JSON-ready dict.
    """
    n_runs = len(workload.prompts)
    total = n_runs * (2 if final else 1)
    tick = (lambda done: progress(done, total)) if progress is not None else None
    if model_pipe.latent_channels != reference_pipe.latent_channels or model_pipe.size_multiple != reference_pipe.size_multiple:
        raise UserError("the model and the reference work in different latent spaces: they cannot be compared")
    _check_sizes(model_pipe, workload)
    guidance = reference_pipe.resolve_guidance(guidance)
    if trajectories is not None:
        trajs, acc = trajectories, velocity_errors(model_pipe, trajectories)
    else:  # the model runs right after the reference at every point: nothing is kept
        acc = VelocityErrors(model_pipe)
        trajs = reference_trajectories(reference_pipe, workload, guidance=guidance, solver=solver, batch=batch,
                                       keep_points=False, on_point=acc, progress=tick)
    res = {
        "model": model_pipe.name, "model_fingerprint": model_pipe.fingerprint,
        "reference": reference_pipe.name, "reference_fingerprint": reference_pipe.fingerprint,
        "workload": workload.describe(), "guidance": guidance, "solver": solver,
        "runs": sum(len(t.runs) for t in trajs), **acc.summary(),
    }
    if not final:
        return res
    want_adherence = _adherence_wanted(model_pipe, workload, adherence)
    latent_mse, images_m, images_r, prompts = [], [], [], []
    for traj in trajs:
        lat = model_pipe.generate(traj.prompts, width=traj.width, height=traj.height, steps=traj.steps,
                                  guidance=guidance, solver=solver, noise=traj.noise.cpu(), output_type="latent")
        ref = traj.final.to(lat.device)
        latent_mse += (lat.double() - ref.double()).pow(2).flatten(1).mean(1).tolist()
        if tick is not None:
            tick(n_runs + len(latent_mse))
        if want_adherence:
            images_m += list(model_pipe.decode(lat, "np"))  # uint8 HWC; sizes may differ between batches
            images_r += list(reference_pipe.decode(traj.final, "np"))
            prompts += traj.prompts
    res["latent_mse"] = _mean(latent_mse)
    res["latent_mse_max"] = max(latent_mse) if latent_mse else float("nan")
    if want_adherence:
        from ..world import shapes

        rm = shapes.score(images_m, prompts)
        rr = shapes.score(images_r, prompts)
        res.update({"adherence_model": rm.adherence, "adherence_reference": rr.adherence,
                    "adherence_delta": rm.adherence - rr.adherence,
                    "accuracy_model": rm.accuracy, "accuracy_reference": rr.accuracy})
    return res


@torch.no_grad()
def measure_capture(model_pipe, reader, *, reference_fingerprint: str | None = None,
                    reference_prediction: str | None = None, batch: int = 8) -> dict:
    """Velocity MSE of ``model_pipe`` against a capture of the reference (``rflow capture``), any family.

    Every record's stored transformer inputs — points of the reference's own sampling trajectories —
    are run through ``model_pipe.transformer`` and compared with the stored reference output. For
    velocity-predicting models the raw outputs are compared (FLUX.2's tokens, Z-Image's negated
    velocity: the same squared error as the velocities'); data-predicting models (rflow-tiny, FLUX.1
    shaped) have both outputs turned into velocities by the FLUX.1 denoiser first, the stored one with
    ``reference_prediction`` ("velocity" | "data", default the model's). Only ``transformer`` and
    ``denoiser`` of ``model_pipe`` are used, so a :class:`~rflow.pipeline.Pipeline` without VAE or text
    encoders will do. ``reader`` is a :class:`~rflow.compress.capture.CaptureReader`;
    ``reference_fingerprint``, when given, must be the fingerprint the capture was made with. Records
    are batched by ``batch`` where their tensors allow (Z-Image's per-sample captions run one by one)."""
    from .units import family_of

    model = model_pipe.transformer
    if reference_fingerprint is not None and reader.fingerprint != reference_fingerprint:
        raise UserError(f"{reader.path}: captured from model {reader.fingerprint or '?'}, "
                        f"not from the reference ({reference_fingerprint})")
    fam = family_of(model.config)
    if fam.NAME != reader.family:
        raise UserError(f"{reader.path}: captured from a {reader.family_module.TITLE} model, this is a {fam.TITLE} model")
    c, m = reader.config, model.config
    for k in ("in_channels", "out_channels", "context_in_dim", "vec_in_dim", "guidance_embed", "cap_feat_dim",
              "patch_size"):
        if hasattr(c, k) and getattr(c, k) != getattr(m, k, None):
            raise UserError(f"{reader.path}: captured model has {k}={getattr(c, k)}, the model has {getattr(m, k, None)}")
    if not len(reader):
        raise UserError(f"{reader.path}: the capture holds no records")
    if batch < 1:
        raise UserError(f"batch must be ≥ 1, got {batch}")
    den = model_pipe.denoiser
    pred = getattr(den, "prediction", "velocity")
    ref_pred = reference_prediction or pred
    ref_den = None
    if "data" in (pred, ref_pred):  # x0-predicting models are FLUX.1-shaped (rflow-tiny)
        if fam.NAME != "flux1":
            raise UserError(f"{reader.path}: only FLUX.1-shaped models predict x0 (prediction \"data\"), not {fam.TITLE}")
        ref_den = Denoiser(model, ref_pred)
    dev = model.device
    dtype = next(model.parameters()).dtype
    errs: list[float] = []
    sq_err = sq_ref = 0.0
    for kw, out_ref, _ in reader.model_batches(list(reader), batch, device=dev):
        out, out_ref = model(**kw), out_ref.to(dev, dtype)
        if ref_den is not None:
            img, t = kw["img"].to(dtype), kw["timesteps"]
            out, out_ref = den.output_to_velocity(out, img, t), ref_den.output_to_velocity(out_ref, img, t)
        v, v_ref = out.double(), out_ref.double()
        d = (v - v_ref).pow(2)
        errs += d.flatten(1).mean(1).tolist()
        sq_err += float(d.sum())
        sq_ref += float(v_ref.pow(2).sum())
    return {"capture": str(reader.path), "reference_fingerprint": reader.fingerprint,
            "records": len(reader), "runs": len({r.run for r in reader}), "velocity_evaluations": len(errs),
            "velocity_mse": _mean(errs), "velocity_mse_max": max(errs),
            "velocity_rel_mse": sq_err / sq_ref if sq_ref > 0 else (0.0 if sq_err == 0 else math.inf)}


# ---------------------------------------------------------------------------------------------- sensitivity


def _up_params(model, unit: str) -> list[Tensor]:
    """The parameters :func:`~rflow.compress.prune.zero_units` writes for ``unit`` (its axis-0 slices)."""
    ref = refs_by_name(model)[unit]
    return list({sl.param: model.get_parameter(sl.param) for sl in ref.slices if sl.axis == 0}.values())


@contextlib.contextmanager
def zeroed(model, kept: dict[str, Tensor]):
    """Silence the units not in ``kept`` for the duration of the block, then restore the weights exactly."""
    from .prune import zero_units

    saved = [(p, p.detach().clone()) for u in kept for p in _up_params(model, u)]
    try:
        zero_units(model, kept)
        yield model
    finally:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)


@torch.no_grad()
def sensitivity(pipe, stats: ActivationStats, workload: Workload, *, level: float, criterion: str = "frequency",
                streams: str | None = None, guidance: float | None = None, solver: str = "euler", batch: int = 8,
                progress=None) -> dict:
    """Per layer: zero that layer's ``level`` share of least important units (each of its unit
    groups), measure the velocity MSE against the untouched model. Returns a JSON-ready dict whose
    ``layers`` has one row per layer."""
    from .prune import choose_kept

    if not 0.0 < level < 1.0:
        raise UserError(f"--level must be in (0, 1), got {level}")
    model = pipe.transformer
    cfg = model.config
    guidance = pipe.resolve_guidance(guidance)
    trajs = reference_trajectories(pipe, workload, guidance=guidance, solver=solver, batch=batch)
    refs = layer_refs(cfg)
    rows = []
    for layer in range(count_layers(cfg)):
        units = select_units(cfg, layers=str(layer), streams=streams)
        kind = layer_kind(refs, layer)
        width = sum(stats.count[u].numel() for u in units)
        if not units:
            rows.append({"layer": layer, "kind": kind, "groups": [], "units": 0, "zeroed": 0,
                         "velocity_mse": 0.0, "velocity_rel_mse": 0.0})
            continue
        kept = choose_kept(stats, units, criterion=criterion, fraction=level)
        n_zero = width - sum(int(k.numel()) for k in kept.values())
        with zeroed(model, kept):
            acc = velocity_errors(pipe, trajs)
        rows.append({"layer": layer, "kind": kind, "groups": units, "units": width, "zeroed": n_zero,
                     "velocity_mse": _mean(acc.errs), "velocity_rel_mse": acc.summary()["velocity_rel_mse"]})
        if progress is not None:
            progress(rows[-1])
    return {"model": pipe.name, "model_fingerprint": pipe.fingerprint, "stats_fingerprint": stats.fingerprint,
            "level": level, "criterion": criterion, "streams": streams or ",".join(dict.fromkeys(r.stream for r in refs)), "guidance": guidance,
            "solver": solver, "workload": workload.describe(), "layers": rows}


def sensitivity_png(result: dict) -> bytes:
    """A bar chart of velocity MSE per layer, one colour per layer kind (FLUX: double and single blocks)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["layers"]
    fig = Figure(figsize=(max(6.0, 0.18 * len(rows) + 2), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    palette = ["#3b6fb6", "#d9822b", "#5a9e4b", "#8b5fb0", "#b0413e"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    colour = {k: palette[i % len(palette)] for i, k in enumerate(kinds)}
    ax.bar([r["layer"] for r in rows], [r["velocity_mse"] for r in rows], color=[colour[r["kind"]] for r in rows],
           width=0.8)
    ax.set_xlabel("layer (double blocks, then single blocks)" if kinds == ["double", "single"] else "layer")
    ax.set_ylabel("velocity MSE vs unpruned")
    ax.set_title(f"{result['model']}: {result['level']:.0%} of each layer's units zeroed ({result['criterion']})",
                 fontsize=9)
    if rows:
        ax.set_xlim(-0.8, len(rows) - 0.2)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colour[k], label=k) for k in kinds], fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
