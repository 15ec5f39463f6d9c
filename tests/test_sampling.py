"""rflow.sampling: schedules and solvers against diffusers, and against an exact velocity field.

Gaussian data x0 ~ N(m, s^2) (per channel) has a closed-form rectified-flow velocity. With
x_t = (1 - t) x0 + t eps, x_t is Gaussian with mean (1 - t) m and variance V = (1 - t)^2 s^2 + t^2, and

    v(x, t) = E[eps - x0 | x_t = x] = (t - (1 - t) s^2) / V * (x - (1 - t) m) - m.

Its ODE flow is affine, x_t = (1 - t) m + sqrt(V) * eps, so noise eps at t = 1 lands on m + s * eps at t = 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

from rflow.errors import UserError
from rflow.sampling import SOLVERS, flux_mu, get_sigmas, sample, time_shift
from refs_schedulers import FLUX_DEV_CONFIG, reference_sample, reference_scheduler

M = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(3, 1, 1)
S = torch.tensor([0.3, 1.5, 0.8], dtype=torch.float64).view(3, 1, 1)


def gaussian_velocity(x, t):
    """Exact velocity for x0 ~ N(M, S^2) per channel (channels on dim -3)."""
    var = (1 - t) ** 2 * S**2 + t**2
    return (t - (1 - t) * S**2) / var * (x - (1 - t) * M) - M


def noise(shape=(2, 3, 8, 8), seed=0, standardize=False):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if standardize:  # exactly mean 0 / std 1 per channel, so the exact endpoint has mean M and std S
        x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    return x


def test_analytic_field_is_exact():
    """Sanity of the test field itself: v(x_t, t) integrated by a fine RK4 lands on M + S * eps."""
    eps = noise()
    x, ts = eps.clone(), torch.linspace(1.0, 0.0, 2001, dtype=torch.float64)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = t1 - t0
        k1 = gaussian_velocity(x, t0)
        k2 = gaussian_velocity(x + h / 2 * k1, t0 + h / 2)
        k3 = gaussian_velocity(x + h / 2 * k2, t0 + h / 2)
        k4 = gaussian_velocity(x + h * k3, t1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(x, M + S * eps, rtol=0, atol=1e-8)


# ------------------------------------------------------------------------------------------- schedules


def test_flux_mu_matches_diffusers():
    assert flux_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert flux_mu(4096) == pytest.approx(1.15, abs=1e-12)
    for n in (1, 256, 1024, 2304, 4096, 8192):
        assert flux_mu(n) == pytest.approx(calculate_shift(n), abs=1e-12)


def test_time_shift_ends_and_formula():
    t = torch.tensor([0.0, 1e-12, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    for mu in (0.0, 0.5, 1.15, 3.0):
        out = time_shift(mu, t)
        assert torch.isfinite(out).all()
        assert out[0] == 0 and out[-1] == 1
        inner = t[1:-1]
        torch.testing.assert_close(out[1:-1], math.exp(mu) / (math.exp(mu) + 1 / inner - 1), rtol=1e-14, atol=0)
    torch.testing.assert_close(time_shift(0.0, t), t, rtol=1e-15, atol=0)  # mu = 0 is the identity


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 28, 50])
def test_get_sigmas_matches_diffusers(steps):
    for seq in (256, 1024, 4096, 6000):
        ref = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_CONFIG)
        ref.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq))
        torch.testing.assert_close(get_sigmas(steps, image_seq_len=seq), ref.sigmas.double(), rtol=0, atol=1e-6)
    for shift in (1.0, 1.5, 3.0, 6.0):
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
        torch.testing.assert_close(get_sigmas(steps, schedule="static", shift=shift), ref.sigmas.double(),
                                   rtol=0, atol=1e-6)
    ref = FlowMatchEulerDiscreteScheduler(shift=1.0)  # FLUX.1-schnell's config
    ref.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
    torch.testing.assert_close(get_sigmas(steps, schedule="none"), ref.sigmas.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(image_seq_len=4096), dict(schedule="static", shift=3.0), dict(schedule="none")])
def test_get_sigmas_shape_and_ends(kw):
    for steps in (1, 2, 7, 30):
        s = get_sigmas(steps, **kw)
        assert s.dtype == torch.float64 and s.shape == (steps + 1,)
        assert s[0] == 1.0 and s[-1] == 0.0
        assert (s[1:] < s[:-1]).all()
    assert get_sigmas(4, schedule="none").tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert torch.equal(get_sigmas(np.int64(5), image_seq_len=np.int64(999)), get_sigmas(5, image_seq_len=999))
    # more image tokens / bigger shift -> more time spent at high noise
    assert (get_sigmas(8, image_seq_len=4096)[1:-1] > get_sigmas(8, image_seq_len=256)[1:-1]).all()


@pytest.mark.parametrize("call, words", [
    (lambda: get_sigmas(0, image_seq_len=256), "steps"),
    (lambda: get_sigmas(-3, image_seq_len=256), "steps"),
    (lambda: get_sigmas(2.5, image_seq_len=256), "steps"),
    (lambda: get_sigmas(10), "image_seq_len"),
    (lambda: get_sigmas(10, schedule="flux", image_seq_len=0), "image_seq_len"),
    (lambda: get_sigmas(10, schedule="static"), "shift"),
    (lambda: get_sigmas(10, schedule="static", shift=-1.0), "shift"),
    (lambda: get_sigmas(10, schedule="static", shift=math.inf), "shift"),
    (lambda: get_sigmas(10, schedule="karras"), "flux, static, none"),
])
def test_get_sigmas_bad_input(call, words):
    with pytest.raises(UserError, match=words) as info:
        call()
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------- parity with diffusers

def _parity_cases():
    cases = [(steps, "static", shift) for shift in (1.0, 3.0) for steps in range(2, 31)]
    cases += [(steps, "static", shift) for shift in (2.0, 4.0, 5.0, 6.0) for steps in (2, 3, 5, 13, 30)]
    cases += [(steps, "flux", seq) for seq in (256, 1024, 4096) for steps in (2, 4, 9, 28)]
    cases += [(steps, "none", None) for steps in (2, 4, 11)]
    return cases


def _sigmas(steps, schedule, arg):
    if schedule == "flux":
        return get_sigmas(steps, image_seq_len=arg)
    return get_sigmas(steps, schedule=schedule, shift=arg)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("steps, schedule, arg", _parity_cases())
def test_sample_matches_diffusers(solver, steps, schedule, arg):
    sigmas, eps = _sigmas(steps, schedule, arg), noise()
    ours = sample(gaussian_velocity, eps, sigmas, solver)
    ref = reference_sample(solver, gaussian_velocity, eps, sigmas)
    assert torch.isfinite(ours).all() and ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("start", [1, 5, 10, 18])
def test_sample_matches_diffusers_img2img(solver, start):
    """A tail of the schedule (image-to-image): starts below 1, first step(s) are lower order."""
    sigmas = get_sigmas(20, image_seq_len=1024)[start:]
    x = (1 - sigmas[0]) * (M + S * noise(seed=1)) + sigmas[0] * noise(seed=2)
    ours = sample(gaussian_velocity, x, sigmas, solver)
    torch.testing.assert_close(ours, reference_sample(solver, gaussian_velocity, x, sigmas), rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_sample_matches_diffusers_float32(solver):
    """float32 in: float32 out, and close to diffusers (which also computes in float32)."""
    sigmas, eps = get_sigmas(12, image_seq_len=1024), noise().float()
    v32 = lambda x, t: gaussian_velocity(x.double(), t.double()).float()  # noqa: E731
    ours = sample(v32, eps, sigmas, solver)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference_sample(solver, v32, eps, sigmas), rtol=1e-5, atol=1e-5)


def test_reference_scheduler_resets_and_ignores_arguments():
    sigmas = get_sigmas(6, schedule="static", shift=3.0)
    for solver in SOLVERS:
        sched = reference_scheduler(solver, sigmas)
        # FluxPipeline's calls: with custom sigmas (Euler) / without (flow-sigma multistep schedulers)
        for kwargs in (dict(sigmas=np.linspace(1.0, 1 / 6, 6), mu=0.9), dict(mu=0.9), {}):
            outs = []
            for _ in range(2):  # a second run must not see the first run's multistep history
                sched.set_timesteps(6, "cpu", **kwargs)
                assert torch.equal(sched.sigmas, sigmas)
                torch.testing.assert_close(sched.timesteps, sigmas[:-1] * 1000, rtol=0, atol=0)
                x = noise()
                for t in sched.timesteps:
                    x = sched.step(gaussian_velocity(x, t / 1000), t, x).prev_sample
                outs.append(x)
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
            torch.testing.assert_close(outs[0], sample(gaussian_velocity, noise(), sigmas, solver), rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_reference_scheduler_drives_flux_pipeline(solver):
    """diffusers' FluxPipeline with the pinned scheduler = rflow's sample over the same transformer."""
    from flux_ref import tiny_transformer

    model = tiny_transformer(guidance=False, depth=1, depth_single=1)
    steps, batch, h, w = 4, 1, 32, 48
    sigmas = get_sigmas(steps, schedule="static", shift=3.0)
    g = torch.Generator().manual_seed(0)
    txt = torch.randn(batch, 5, model.config.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, model.config.pooled_projection_dim, generator=g)
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 16, w // 16, "cpu", torch.float32)
    latents = torch.randn(batch, len(img_ids), model.config.in_channels, generator=g)

    pipe = FluxPipeline(scheduler=reference_scheduler(solver, sigmas), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(prompt_embeds=txt, pooled_prompt_embeds=pooled, latents=latents, height=h, width=w,
                   num_inference_steps=steps, output_type="latent").images

        def velocity(x, t):
            return model(hidden_states=x, timestep=t.expand(batch), pooled_projections=pooled,
                         encoder_hidden_states=txt, txt_ids=torch.zeros(txt.shape[1], 3), img_ids=img_ids).sample

        ours = sample(velocity, latents, sigmas, solver)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------- solver behaviour


def _rmse(solver, steps):
    eps = noise((1, 3, 32, 32), standardize=True)
    out = sample(gaussian_velocity, eps, get_sigmas(steps, schedule="static", shift=3.0), solver)
    return (out - (M + S * eps)).pow(2).mean().sqrt().item(), out


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_converge(solver):
    errs, stats = [], []
    for steps in (4, 8, 16, 32, 64):
        err, out = _rmse(solver, steps)
        mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))
        errs.append(err)
        stats.append(((mean - M.flatten()).abs().max() + (std - S.flatten()).abs().max()).item())
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert all(b < a for a, b in zip(stats, stats[1:])), stats
    if solver == "euler":  # first order: doubling the steps about halves the error
        assert all(0.4 < b / a < 0.6 for a, b in zip(errs, errs[1:])), errs
        assert errs[-1] < 0.035 and stats[-1] < 0.04, (errs, stats)
    else:  # faster (not second order overall: the last step into sigma = 0 is first order)
        assert errs[-1] < 0.01 and stats[-1] < 0.01, (errs, stats)
        assert errs[-1] / errs[-3] < 0.15, errs


def test_multistep_solvers_beat_euler():
    euler = _rmse("euler", 10)[0]
    for solver in ("dpm++2m", "unipc"):
        assert _rmse(solver, 10)[0] < 0.5 * euler, (solver, _rmse(solver, 10)[0], euler)


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_step_returns_x0_prediction(solver):
    """Every solver's step into sigma = 0 is x - sigma * v, the model's data prediction."""
    eps = noise()
    torch.testing.assert_close(sample(gaussian_velocity, eps, torch.tensor([1.0, 0.0]), solver),
                               eps - gaussian_velocity(eps, 1.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_velocity_calls_and_callback(solver):
    for steps in range(1, 31):
        calls, seen = [], []

        def velocity(x, t):
            assert x.dtype == torch.float64 and t.dtype == torch.float64 and t.ndim == 0
            calls.append(t.item())
            return gaussian_velocity(x, t)

        out = sample(velocity, noise(), get_sigmas(steps, image_seq_len=1024), solver,
                     callback=lambda i, n, x: seen.append((i, n, x)))
        assert calls == get_sigmas(steps, image_seq_len=1024)[:-1].tolist()  # once per sigma, in order
        assert [(i, n) for i, n, _ in seen] == [(i, steps) for i in range(steps)]
        assert torch.equal(seen[-1][2], out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    """The model sees the input dtype; the solver works in float32; the result has the input dtype."""
    seen = set()

    def velocity(x, t):
        seen.add((x.dtype, t.dtype))
        return gaussian_velocity(x.double(), t.double()).to(x.dtype)

    for solver in SOLVERS:
        out = sample(velocity, noise().to(dtype), get_sigmas(8, image_seq_len=1024), solver)
        assert out.dtype == dtype and torch.isfinite(out).all()
    assert seen == {(dtype, torch.float32)}


def test_sample_bad_input():
    eps, sigmas = noise(), get_sigmas(4, image_seq_len=256)
    with pytest.raises(UserError, match=r"unknown solver 'heun'; choose one of euler, dpm\+\+2m, unipc"):
        sample(gaussian_velocity, eps, sigmas, "heun")
    for bad in (torch.tensor([1.0, 0.5]), torch.tensor([0.5, 1.0, 0.0]), torch.tensor([1.5, 0.5, 0.0]),
                torch.tensor([1.0, 0.5, 0.5, 0.0]), torch.tensor([0.0]), sigmas[None]):
        with pytest.raises(UserError, match="sigmas"):
            sample(gaussian_velocity, eps, bad, "euler")
