"""rflow.sampling's FLUX.2 schedule ("flux2", flux2_mu) and Z-Image's ("static", shift 3) against diffusers.

The references are the sigmas diffusers' own pipelines install: Flux2KleinPipeline and ZImagePipeline are run
with the published scheduler configs (tests/qwen_ref.py) up to their ``retrieve_timesteps`` call, which a spy
scheduler records and then stops (nothing is denoised, so tiny transformers only give the latent shapes).
Diffusers computes sigmas in float32, rflow in float64: they agree to float32 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, ZImagePipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from qwen_ref import KLEIN_SCHEDULER_CONFIG, ZIMAGE_SCHEDULER_CONFIG
from rflow.errors import UserError
from rflow.sampling import SCHEDULES, flux2_mu, get_sigmas, time_shift

F32 = 2e-7  # float32 rounding of sigmas in [0, 1]


class _Stop(Exception):
    pass


class _Spy(FlowMatchEulerDiscreteScheduler):
    """Records what the pipeline asks ``set_timesteps`` for, keeps diffusers' result, stops the pipeline."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self.asked = dict(num_inference_steps=num_inference_steps, sigmas=sigmas, mu=mu)
        raise _Stop


def _klein_pipe():
    from diffusers import Flux2Transformer2DModel

    tr = Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=12, timestep_guidance_channels=16,
                                 mlp_ratio=1.0, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False)
    return Flux2KleinPipeline(scheduler=_Spy(**KLEIN_SCHEDULER_CONFIG), vae=None, text_encoder=None, tokenizer=None,
                              transformer=tr, is_distilled=True)


def _zimage_pipe():
    from diffusers import ZImageTransformer2DModel

    tr = ZImageTransformer2DModel(in_channels=4, dim=16, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                  cap_feat_dim=8, axes_dims=[2, 2, 4], axes_lens=[64, 32, 32])
    return ZImagePipeline(scheduler=_Spy(**ZIMAGE_SCHEDULER_CONFIG), vae=None, text_encoder=None, tokenizer=None,
                          transformer=tr)


SIZES = [(512, 512), (1024, 1024), (768, 1360), (1088, 1920), (2048, 2048), (64, 48)]  # (height, width)


@pytest.fixture(scope="module")
def klein_pipe():
    return _klein_pipe()


def test_flux2_mu_equals_compute_empirical_mu():
    for seq in (1, 12, 256, 1024, 4080, 4096, 4300, 4301, 8160, 16384, 65536):
        for steps in (1, 2, 4, 8, 10, 28, 50, 100, 200, 250, 1000):
            assert flux2_mu(seq, steps) == compute_empirical_mu(image_seq_len=seq, num_steps=steps)
    # the fit's anchors: 10 and 200 steps lie on their lines; above 4300 tokens steps do not matter
    assert flux2_mu(1024, 10) == pytest.approx(8.73809524e-05 * 1024 + 1.89833333, abs=1e-12)
    assert flux2_mu(1024, 200) == pytest.approx(0.00016927 * 1024 + 0.45666666, abs=1e-12)
    assert flux2_mu(8192, 4) == flux2_mu(8192, 50) == pytest.approx(0.00016927 * 8192 + 0.45666666, abs=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 4, 9, 28, 50])
def test_flux2_sigmas_equal_klein_pipeline(klein_pipe, steps):
    for h, w in SIZES:
        with pytest.raises(_Stop):
            klein_pipe(prompt_embeds=torch.zeros(1, 4, 12), height=h, width=w, num_inference_steps=steps,
                       guidance_scale=1.0, output_type="latent")
        sch, seq = klein_pipe.scheduler, (h // 16) * (w // 16)
        # what the pipeline asked for: its linspace grid and the empirical mu of its packed latent tokens
        np.testing.assert_array_equal(sch.asked["sigmas"], np.linspace(1.0, 1 / steps, steps))
        assert sch.asked["mu"] == flux2_mu(seq, steps)
        ours = get_sigmas(steps, schedule="flux2", image_seq_len=seq)
        assert ours.dtype == torch.float64 and ours.shape == (steps + 1,) and ours[0] == 1 and ours[-1] == 0
        torch.testing.assert_close(ours, sch.sigmas.double(), rtol=0, atol=F32)
        torch.testing.assert_close(sch.timesteps.double(), ours[:-1] * 1000, rtol=0, atol=1000 * F32)


def test_flux2_is_bfl_get_schedule():
    """BFL's flux2 sampling.get_schedule: linspace(1, 0, n + 1) shifted with mu = compute_empirical_mu."""
    for steps in (1, 4, 50):
        for seq in (256, 4096, 9000):
            t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
            mu = flux2_mu(seq, steps)
            ref = math.exp(mu) / (math.exp(mu) + (1 / t - 1))  # t = 0: 1/0 = inf -> 0
            torch.testing.assert_close(get_sigmas(steps, schedule="flux2", image_seq_len=seq), ref, rtol=0, atol=1e-14)
            torch.testing.assert_close(get_sigmas(steps, schedule="flux2", image_seq_len=seq),
                                       torch.cat([time_shift(mu, t[:-1]), t.new_zeros(1)]), rtol=0, atol=0)


def test_flux2_differs_from_flux_and_depends_on_steps():
    # FLUX.1's mu ignores the step count; FLUX.2's falls with it below 4300 tokens (few steps: more shift)
    assert not torch.allclose(get_sigmas(4, schedule="flux2", image_seq_len=1024), get_sigmas(4, image_seq_len=1024))
    assert flux2_mu(1024, 4) > flux2_mu(1024, 50)
    big, small = (get_sigmas(8, schedule="flux2", image_seq_len=n)[1:-1] for n in (4096, 256))
    assert (big > small).all()
    assert torch.equal(get_sigmas(np.int64(5), schedule="flux2", image_seq_len=np.int64(999)),
                       get_sigmas(5, schedule="flux2", image_seq_len=999))
    assert "flux2" in SCHEDULES and SCHEDULES[:3] == ("flux", "static", "none")


@pytest.mark.parametrize("call, words", [
    (lambda: get_sigmas(4, schedule="flux2"), "schedule 'flux2' needs image_seq_len"),
    (lambda: get_sigmas(4, schedule="flux2", image_seq_len=0), "image_seq_len"),
    (lambda: get_sigmas(0, schedule="flux2", image_seq_len=256), "steps"),
    (lambda: get_sigmas(4, schedule="flux2", image_seq_len=10**7), "too large for the 'flux2' schedule"),
    (lambda: get_sigmas(200_000, schedule="flux2", image_seq_len=256), "steps are too many for the 'flux2'"),
])
def test_flux2_bad_input(call, words):
    with pytest.raises(UserError, match=words) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("steps", [1, 2, 8, 9, 28, 50])
def test_static_3_equals_zimage_pipeline(steps):
    """Z-Image-Turbo's scheduler is a static shift of 3.0 (mu, which the pipeline computes, is unused):
    rflow's "static" schedule with shift 3.0 reproduces it."""
    pipe = _zimage_pipe()
    for h, w in [(512, 512), (1024, 1024), (768, 1360)]:
        with pytest.raises(_Stop):
            pipe(prompt_embeds=[torch.zeros(3, 8)], height=h, width=w, num_inference_steps=steps, guidance_scale=0.0,
                 output_type="latent")
        sch = pipe.scheduler
        assert sch.asked["sigmas"] == torch.linspace(1.0, 1 / steps, steps).tolist()  # float32 grid
        ours = get_sigmas(steps, schedule="static", shift=3.0)
        torch.testing.assert_close(ours, sch.sigmas.double(), rtol=0, atol=F32)
        torch.testing.assert_close(sch.timesteps.double(), ours[:-1] * 1000, rtol=0, atol=1000 * F32)
