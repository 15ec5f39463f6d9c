"""Test helpers: diffusers schedulers pinned to a given sigma schedule, as references for rflow.sampling.

``reference_scheduler(solver, sigmas)`` returns a diffusers scheduler whose ``set_timesteps(...)`` ignores
its arguments and installs exactly ``sigmas`` (float64, ``steps + 1`` values ending in 0) with
``timesteps = sigmas[:-1] * 1000`` (float64), resetting the multistep state. It can be handed to
``FluxPipeline(..., scheduler=...)``: the pipeline's ``set_timesteps(n, device, sigmas=..., mu=...)`` or
``set_timesteps(n, device, mu=...)`` both land here, and its ``timesteps`` / ``order`` / ``step`` /
``set_begin_index`` are diffusers' own.

One deliberate deviation: diffusers' Euler and DPM-Solver steps round the sample to float32 before the
update ("upcast"); for a float64 sample these subclasses keep float64, so float64 runs compare to ~1e-12.
Samples of any other dtype go through diffusers unchanged.
"""

from __future__ import annotations

import warnings

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

# FLUX.1-dev's scheduler config (the static/none schedules only differ in how sigmas are made, which the
# pinned schedulers below ignore).
FLUX_DEV_CONFIG = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
)
DPM_CONFIG = dict(
    use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2,
    final_sigmas_type="zero", lower_order_final=True,
)
UNIPC_CONFIG = dict(
    use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2, solver_type="bh2", predict_x0=True,
    final_sigmas_type="zero", lower_order_final=True,
)


class _Pinned:
    """Mixin: ``set_timesteps`` installs ``self.pinned_sigmas`` whatever it is asked for."""

    pinned_sigmas: torch.Tensor

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None, **kwargs):
        # `sigmas` must be a named parameter: FluxPipeline checks the signature before passing custom sigmas.
        s = self.pinned_sigmas
        n = len(s) - 1
        # Let diffusers reset its own step state (step index, history, lower_order_nums, ...) first.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 vs torch in DPM's set_timesteps
            if isinstance(self, FlowMatchEulerDiscreteScheduler):
                super().set_timesteps(n, device, mu=0.0)
            else:
                super().set_timesteps(n, device)
        self.sigmas = s.clone()  # on CPU, like diffusers
        self.timesteps = (s[:-1] * 1000).to(device)
        self.num_inference_steps = n

    # -- keep a float64 sample float64 through diffusers' float32 "upcast" (see module docstring) --

    def step(self, model_output, timestep, sample, *args, **kwargs):
        self._sample_in = sample
        return super().step(model_output, timestep, sample, *args, **kwargs)

    def _full(self, sample):
        return self._sample_in if self._sample_in.dtype == torch.float64 else sample


class _Euler(_Pinned, FlowMatchEulerDiscreteScheduler):
    def step(self, model_output, timestep, sample, *args, **kwargs):
        out = super().step(model_output, timestep, sample, *args, **kwargs)
        if sample.dtype != torch.float64:
            return out
        # diffusers computed sample.float() + dt * v; the Euler update is x + dt * v, so adding back what the
        # float32 rounding dropped gives the float64 result.
        fix = sample - sample.float().double()
        if isinstance(out, tuple):
            return (out[0] + fix,) + tuple(out[1:])
        out.prev_sample = out.prev_sample + fix
        return out


class _DPM(_Pinned, DPMSolverMultistepScheduler):
    def dpm_solver_first_order_update(self, model_output, *args, sample=None, **kwargs):
        return super().dpm_solver_first_order_update(model_output, *args, sample=self._full(sample), **kwargs)

    def multistep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, **kwargs):
        return super().multistep_dpm_solver_second_order_update(
            model_output_list, *args, sample=self._full(sample), **kwargs)


class _UniPC(_Pinned, UniPCMultistepScheduler):
    pass  # UniPC does not upcast


_REFERENCES = {
    "euler": (_Euler, FLUX_DEV_CONFIG),
    "dpm++2m": (_DPM, DPM_CONFIG),
    "unipc": (_UniPC, UNIPC_CONFIG),
}


def reference_scheduler(solver: str, sigmas):
    """A diffusers scheduler for ``solver`` pinned to ``sigmas`` (already set up: timesteps are ready)."""
    cls, config = _REFERENCES[solver]
    sched = cls(**config)
    sched.pinned_sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().clone()
    sched.set_timesteps()
    return sched


def reference_sample(solver: str, velocity, x: torch.Tensor, sigmas) -> torch.Tensor:
    """Run diffusers' scheduler loop (as FluxPipeline does) over ``velocity(x, t)``, t = timestep / 1000."""
    sched = reference_scheduler(solver, sigmas)
    sched.set_timesteps(len(sigmas) - 1, x.device)
    for t in sched.timesteps:
        x = sched.step(velocity(x, t / 1000), t, x, return_dict=False)[0]
    return x
