"""Noise schedules and ODE solvers for rectified-flow models (FLUX.1).

Conventions, used everywhere in rflow:

* time ``t`` runs from 1 (pure noise) to 0 (data); ``x_t = (1 - t) * x0 + t * eps``;
* the model predicts the velocity ``v = eps - x0``, so ``dx/dt = v``;
* ``sigma`` is the same number as ``t`` (there is no separate noise scale);
* a schedule is a 1-D float64 tensor ``sigmas`` of ``steps + 1`` decreasing values ending in 0.

The schedules match diffusers' ``FlowMatchEulerDiscreteScheduler`` as configured for FLUX.1 (and, for
"flux2", as Flux2KleinPipeline drives it; Z-Image's static shift 3.0 is "static"), and the
solvers match diffusers' flow-matching Euler, DPM-Solver++(2M) and UniPC(bh2) schedulers given the same
sigmas. Every solver calls the model exactly ``len(sigmas) - 1`` times.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterator, Sequence

import torch

from rflow.errors import NonFiniteError, UserError

SOLVERS = ("euler", "dpm++2m", "unipc")
SCHEDULES = ("flux", "static", "none", "flux2")

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- schedules


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift: ``mu`` linear in the number of image tokens.

    ``mu = 0.5`` at 256 tokens (512x512 px), ``1.15`` at 4096 tokens (1024x1024 px), extrapolated beyond.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux2_mu(image_seq_len: int, steps: int) -> float:
    """FLUX.2's empirical shift: ``mu`` depends on the number of image tokens and on the number of steps.

    Two lines in ``image_seq_len`` were fitted, one for 10 steps and one for 200; ``mu`` is linear in
    ``steps`` between (and beyond) them. Above 4300 tokens only the 200-step line is used, whatever ``steps``.
    Equals diffusers' / BFL's ``compute_empirical_mu(image_seq_len, num_steps)``.
    """
    a1, b1 = 8.73809524e-05, 1.89833333  # mu at 10 steps
    a2, b2 = 0.00016927, 0.45666666  # mu at 200 steps
    mu_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(mu_200)
    mu_10 = a1 * image_seq_len + b1
    slope = (mu_200 - mu_10) / 190.0
    return float(slope * steps + (mu_200 - 200.0 * slope))


def _shift(factor: float, t: torch.Tensor) -> torch.Tensor:
    """``factor * t / (factor * t + 1 - t)``: fixes 0 and 1, pushes the rest towards 1 when factor > 1."""
    return factor * t / (factor * t + (1 - t))


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """FLUX's exponential time shift ``t' = e^mu / (e^mu + 1/t - 1)``; exact 0 at t = 0 and 1 at t = 1.

    Computed as ``e^mu t / (e^mu t + 1 - t)``, so no division by zero. Python numbers become float64.
    """
    t = t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64)
    return _shift(math.exp(mu), t)


def _positive_int(value, what: str) -> int:
    try:
        if not isinstance(value, bool) and operator.index(value) >= 1:
            return operator.index(value)
    except TypeError:
        pass
    raise UserError(f"{what} must be an integer >= 1, got {value!r}")


def get_sigmas(steps: int, *, schedule: str = "flux", image_seq_len: int | None = None,
               shift: float | None = None) -> torch.Tensor:
    """The ``steps + 1`` sigmas (float64, from 1 down to exactly 0) of a text-to-image run.

    The base grid is FluxPipeline's ``linspace(1, 1/steps, steps)``, then:

    * ``"flux"``: :func:`time_shift` with ``mu = flux_mu(image_seq_len)`` (FLUX.1-dev); needs ``image_seq_len``
      (the number of packed 2x2 latent tokens, ``(H/16) * (W/16)`` for an H x W image);
    * ``"static"``: ``shift * s / (1 + (shift - 1) * s)`` (diffusers' fixed ``shift``); needs ``shift``,
      there is no default (SD3 uses 3.0);
    * ``"none"``: the base grid unchanged (FLUX.1-schnell);
    * ``"flux2"``: :func:`time_shift` with ``mu = flux2_mu(image_seq_len, steps)`` (FLUX.2, klein included);
      needs ``image_seq_len`` (``(H/16) * (W/16)`` packed latent tokens).

    Arguments that the chosen schedule does not use are ignored. A shift so strong that the shifted
    sigmas are no longer strictly decreasing in float64 (they collapse to 1, or to 0) raises
    :class:`UserError` naming the cause: a huge ``image_seq_len`` for "flux", an extreme ``shift`` for "static".
    """
    steps = _positive_int(steps, "steps")
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if schedule in ("flux", "flux2"):
        if image_seq_len is None:
            raise UserError(f"schedule {schedule!r} needs image_seq_len (the number of image tokens)")
        image_seq_len = _positive_int(image_seq_len, "image_seq_len")
        mu = flux_mu(image_seq_len) if schedule == "flux" else flux2_mu(image_seq_len, steps)
        try:
            sigmas = time_shift(mu, base)
        except OverflowError:  # e^mu beyond float64: every sigma would be 1
            sigmas = torch.ones_like(base)
        if schedule == "flux" or mu > 0:
            cause = f"image_seq_len {image_seq_len} is too large for the {schedule!r} schedule"
            fix = "use a smaller size or another schedule"
        else:  # flux2's mu falls with the step count (below 4300 tokens) and is negative far beyond 200 steps
            cause = f"{steps} steps are too many for the 'flux2' schedule at image_seq_len {image_seq_len}"
            fix = "use fewer steps or another schedule"
        detail = f" (mu = {mu:.1f})"
    elif schedule == "static":
        if not isinstance(shift, numbers.Real) or isinstance(shift, bool) or not 0 < shift < math.inf:
            raise UserError(f"schedule 'static' needs shift, a positive number (got {shift!r})")
        sigmas = _shift(float(shift), base)
        cause = f"shift {shift!r} is too {'large' if shift > 1 else 'small'} for the 'static' schedule"
        detail, fix = "", "use a shift closer to 1"
    elif schedule == "none":
        sigmas = base
        cause, detail, fix = f"{steps} steps are too many for float64 sigmas", "", "use fewer steps"
    else:
        raise UserError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    ok = bool(torch.isfinite(sigmas).all()) and bool((sigmas[1:] < sigmas[:-1]).all())
    if not ok:
        flat = ~(sigmas[1:] < sigmas[:-1])  # the first pair that does not decrease tells where they collapse
        where = 1 if not bool(torch.isfinite(sigmas).all()) or float(sigmas[:-1][flat][0]) >= 0.5 else 0
        raise UserError(f"{cause}: the shifted sigmas collapse to {where}{detail}; {fix}")
    return sigmas


# ---------------------------------------------------------------------------------------------- solvers
#
# Each solver is a generator over ``model(i, x) -> v`` (the velocity at sigmas[i]) and the sigmas as Python
# floats; it yields x after every step. Multistep solvers work with the data prediction ``x0 = x - s * v``
# and the half-log-SNR ``lam = log(alpha / sigma) = log((1 - s) / s)``, which runs from -inf (s = 1) to
# +inf (s = 0). Both ends come out as clean limits in float arithmetic: a step into s = 0 returns x0, and a
# history point at s = 1 makes the finite-difference terms vanish (its lam-distance is infinite).

Model = Callable[[int, torch.Tensor], torch.Tensor]


def _lam(s: float) -> float:
    return math.inf if s == 0 else -math.inf if s == 1 else math.log((1 - s) / s)


def _euler(model: Model, x: torch.Tensor, s: list[float]) -> Iterator[torch.Tensor]:
    for i in range(len(s) - 1):
        x = x + (s[i + 1] - s[i]) * model(i, x)
        yield x


def _exp_step(x: torch.Tensor, s0: float, s1: float, h: float, d: torch.Tensor) -> torch.Tensor:
    """Step s0 -> s1 (lam-step h) of the exponential integrator with constant data prediction d
    (DPM-Solver++ first order, i.e. DDIM). Into s1 = 0 (h = inf) it returns d."""
    return (s1 / s0) * x - (1 - s1) * math.expm1(-h) * d


def _dpmpp_2m(model: Model, x: torch.Tensor, s: list[float]) -> Iterator[torch.Tensor]:
    """DPM-Solver++(2M), midpoint form; first order on the first step and on the last (into s = 0)."""
    n, lam, prev = len(s) - 1, [_lam(v) for v in s], None
    for i in range(n):
        x0 = x - s[i] * model(i, x)
        h = lam[i + 1] - lam[i]
        d = x0 if i == 0 or i == n - 1 else x0 + (h / (2 * (lam[i] - lam[i - 1]))) * (x0 - prev)
        x, prev = _exp_step(x, s[i], s[i + 1], h, d), x0
        yield x


def _unipc(model: Model, x: torch.Tensor, s: list[float]) -> Iterator[torch.Tensor]:
    """UniPC with B(h) = expm1(-h) ("bh2"), order 2, data prediction.

    Step i: evaluate at the predicted x_i, correct x_i with UniC using that same evaluation (no extra model
    call), then predict x_{i+1} with UniP from the corrected x_i. The data prediction kept for later steps is
    the one from the *uncorrected* x_i, as in the reference. Predictor order: 1 on the first and the last
    step, else 2 (then it is exactly the DPM-Solver++(2M) update); the corrector at step i has the order of
    the predictor that produced x_i; the final prediction (into s = 0, which is x0) is not corrected.
    """
    n, lam = len(s) - 1, [_lam(v) for v in s]
    m1 = m2 = x_last = None  # data predictions at s[i-1], s[i-2]; corrected x at s[i-1]
    for i in range(n):
        m = x - s[i] * model(i, x)
        if i > 0:  # UniC
            h = lam[i] - lam[i - 1]
            phi = math.expm1(-h)
            if i == 1:
                corr = 0.5 * (m - m1)
            else:
                r = (lam[i - 2] - lam[i - 1]) / h
                b1 = (phi / -h - 1) / phi
                b2 = 2 * ((phi / -h - 1) / -h - 0.5) / phi
                rho = (b1 - b2) / (1 - r)  # (rho, b1 - rho) solves [[1, 1], [r, 1]] @ rhos = (b1, b2)
                corr = (rho / r) * (m2 - m1) + (b1 - rho) * (m - m1)
            x = _exp_step(x_last, s[i - 1], s[i], h, m1 + corr)
        m1, m2, x_last = m, m1, x
        h = lam[i + 1] - lam[i]
        d = m if i == 0 or i == n - 1 else m + (h / (2 * (lam[i] - lam[i - 1]))) * (m - m2)
        x = _exp_step(x, s[i], s[i + 1], h, d)
        yield x


_SOLVER_FNS = {"euler": _euler, "dpm++2m": _dpmpp_2m, "unipc": _unipc}


def _check_sigmas(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if s.ndim != 1 or len(s) < 2:
        raise UserError(f"sigmas must be a 1-D sequence of at least 2 values, got shape {tuple(s.shape)}")
    if not (bool(torch.isfinite(s).all()) and s[-1] == 0 and s[0] <= 1 and bool((s[1:] < s[:-1]).all())):
        raise UserError("sigmas must decrease strictly from at most 1 down to exactly 0")
    return s.tolist()


def sample(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], solver: str = "euler",
           *, callback: Callable[[int, int, torch.Tensor], None] | None = None, check_every: int = 4) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from ``t = sigmas[0]`` (where ``x`` lives) to ``t = 0``.

    ``velocity(x, t)`` gets ``x`` in the dtype of the input ``x`` and ``t`` as a **0-dim tensor** on
    ``x.device`` holding ``sigmas[i]`` in the solver dtype (float64 if ``x`` is float64, else float32); it
    returns ``v = eps - x0`` shaped like ``x``. It is called exactly ``len(sigmas) - 1`` times.

    ``sigmas``: strictly decreasing, at most 1, ending in exactly 0 (e.g. :func:`get_sigmas`, or a tail of
    it for image-to-image). ``solver``: one of :data:`SOLVERS`. Solver arithmetic runs in float32 (float64
    for float64 ``x``); the result has ``x``'s dtype. ``callback(i, n, x)`` runs after step ``i`` of ``n``
    (0-based) with the solver's working tensor at ``sigmas[i + 1]`` (UniPC: before its correction); it must
    not modify it in place.

    Non-finite values never pass: the working tensor is checked after every step (read back every
    ``check_every`` steps and after the last, so a GPU waits on the host only that often) and
    :class:`~rflow.errors.NonFiniteError` names the first step that produced NaN/inf.
    """
    fn = _SOLVER_FNS.get(solver)
    if fn is None:
        raise UserError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    s = _check_sigmas(sigmas)
    dtype = x.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    ts = torch.tensor(s, dtype=work, device=x.device)
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("the starting latents hold NaN/inf")

    def model(i: int, xi: torch.Tensor) -> torch.Tensor:
        return velocity(xi.to(dtype), ts[i]).to(work)

    n, out = len(s) - 1, x.to(work)
    finite: list[torch.Tensor] = []  # one 0-dim bool per step, read (one device sync) every check_every steps
    for i, out in enumerate(fn(model, out, s)):
        finite.append(torch.isfinite(out).all())
        if len(finite) == check_every or i == n - 1:
            _raise_if_not_finite(finite, i + 1 - len(finite), n)
            finite.clear()
        if callback is not None:
            callback(i, n, out)
    return out.to(dtype)


def _raise_if_not_finite(flags: list[torch.Tensor], first: int, n: int) -> None:
    ok = torch.stack(flags).cpu()
    if not bool(ok.all()):
        step = first + int((~ok).nonzero()[0, 0])
        raise NonFiniteError(f"the model produced NaN/inf at step {step + 1} of {n}")
