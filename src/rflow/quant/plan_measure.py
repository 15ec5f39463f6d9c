"""Where the planner's errors come from (:mod:`rflow.quant.planner`): the full-stack velocity error of a
candidate transformer against the unmodified one, at a fixed set of points.

* :class:`TrajectoryErrors` (``--prompts`` / ``--shapes``): the points of the reference's own sampling
  trajectories (:func:`rflow.compress.measure.reference_trajectories`), conditioning and all.
* :class:`CaptureErrors` (``--capture DIR``): the transformer inputs stored by ``rflow capture`` — points
  of the same kind, sampled once and kept on disk. The reference outputs are recomputed with the
  unmodified model (so keeping a layer has error 0 exactly, whatever precision the capture stored).

Both count how often every MLP hidden unit fires at those points (:meth:`activation_stats`), which is
what the pruning options choose units by.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from ..errors import NonFiniteError, UserError


def with_transformer(pipe, model: nn.Module):
    """``pipe`` with another transformer (everything else shared)."""
    return pipe if model is pipe.transformer else dataclasses.replace(pipe, transformer=model)


class TrajectoryErrors:
    """Velocity MSE of a candidate at the points of ``trajectories`` (recorded with ``pipe``)."""

    def __init__(self, pipe, trajectories):
        self.pipe, self.trajectories = pipe, trajectories

    @torch.no_grad()
    def error(self, model: nn.Module) -> dict:
        from ..compress.measure import velocity_errors

        return velocity_errors(with_transformer(self.pipe, model), self.trajectories).summary()

    @torch.no_grad()
    def activation_stats(self):
        from ..compress.analyze import ActivationCounter
        from ..compress.measure import velocity_errors

        model = self.pipe.transformer
        with ActivationCounter(model) as counter:
            velocity_errors(self.pipe, self.trajectories)
        return counter.to_stats(self.pipe.fingerprint, source="planner trajectories")

    def describe(self) -> dict:
        return {"source": "trajectories", "points": sum(len(t.points) for t in self.trajectories),
                "prompts": sum(len(t.runs) for t in self.trajectories)}


class CaptureErrors:
    """Velocity MSE of a candidate on the records of a capture (a :class:`~rflow.compress.capture.CaptureReader`
    of this model), against the unmodified model's outputs on the same inputs. The records' model inputs
    are read once and kept in memory."""

    def __init__(self, pipe, reader, batch: int = 8):
        from ..compress.units import family_of

        model = pipe.transformer
        if reader.fingerprint and pipe.fingerprint and reader.fingerprint != pipe.fingerprint:
            raise UserError(f"{reader.path}: captured from model {reader.fingerprint}, not from this one ({pipe.fingerprint})")
        if family_of(model.config).NAME != reader.family or reader.config.to_dict() != model.config.to_dict():
            raise UserError(f"{reader.path}: the capture was made with another model (configs differ)")
        if not len(reader):
            raise UserError(f"{reader.path}: the capture holds no records")
        self.pipe, self.reader = pipe, reader
        dev = model.device
        self.batches = [kw for kw, _, _ in reader.model_batches(list(reader), batch, device=dev)]
        self._stats = None
        self.reference = self._velocities(model, count=True)

    @torch.no_grad()
    def _velocities(self, model: nn.Module, count: bool = False) -> list[torch.Tensor]:
        from ..compress.analyze import ActivationCounter

        pipe = with_transformer(self.pipe, model)
        den = pipe.denoiser
        out = []
        counter = ActivationCounter(model) if count else None
        with counter if counter is not None else contextlib.nullcontext():
            for kw in self.batches:
                y = model(**kw)
                if getattr(den, "prediction", "velocity") == "data":  # x0-predicting (rflow-tiny): compare velocities
                    y = den.output_to_velocity(y, kw["img"].to(y.dtype), kw["timesteps"])
                y = y.double()
                if not bool(torch.isfinite(y).all()):
                    raise NonFiniteError(f"{pipe.name}: the model produced NaN/inf on a captured input")
                out.append(y)
        if counter is not None:
            self._stats = counter.to_stats(self.pipe.fingerprint, source=f"capture {self.reader.path}")
        return out

    @torch.no_grad()
    def error(self, model: nn.Module) -> dict:
        errs: list[float] = []
        sq_err = sq_ref = 0.0
        for v, v_ref in zip(self._velocities(model), self.reference):
            d = (v - v_ref).pow(2)
            errs += d.flatten(1).mean(1).tolist()
            sq_err += float(d.sum())
            sq_ref += float(v_ref.pow(2).sum())
        rel = sq_err / sq_ref if sq_ref > 0 else (0.0 if sq_err == 0 else math.inf)
        return {"velocity_evaluations": len(errs), "velocity_mse": sum(errs) / len(errs),
                "velocity_mse_max": max(errs), "velocity_rel_mse": rel}

    def activation_stats(self):
        return self._stats

    def describe(self) -> dict:
        return {"source": "capture", "capture": str(self.reader.path), "records": len(self.reader),
                "points": sum(int(v.shape[0]) for v in self.reference)}
