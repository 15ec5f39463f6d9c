"""rflow.load + Pipeline.generate equal diffusers' FluxPipeline on a tiny random model."""

import numpy as np
import pytest
import torch

import rflow
from pipeline_ref import SIZE, tiny_pipeline
from refs_schedulers import reference_scheduler
from rflow.errors import UserError
from rflow.models.flux import pack, unpack

PROMPTS = ["a red cat on the sky", "a photo of a blue dog in the city at night"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for guidance in (True, False):
        pipe = tiny_pipeline(guidance=guidance)
        d = tmp_path_factory.mktemp("dev" if guidance else "schnell")
        pipe.save_pretrained(d)
        out[guidance] = (pipe, d)
    return out


def _noise(batch, seed=3):
    w, h = SIZE
    return torch.randn(batch, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(seed))


def _diffusers_latent(pipe, noise, **kw):
    w, h = SIZE
    with torch.no_grad():
        out = pipe(height=h, width=w, latents=pack(noise), output_type="latent", max_sequence_length=16, **kw).images
    return unpack(out, h // 2, w // 2)


@pytest.mark.parametrize("solver", ["euler", "dpm++2m", "unipc"])
@pytest.mark.parametrize("true_cfg", [False, True])
def test_latents_match_diffusers(saved, solver, true_cfg):
    pipe, d = saved[True]
    ours = rflow.load(d, device="cpu", dtype=torch.float32)
    steps, noise = 6, _noise(2)
    sigmas = ours.schedule.sigmas(steps, image_seq_len=noise.shape[2] // 2 * noise.shape[3] // 2)
    if solver != "euler":  # euler runs through the pipeline's own scheduler, checking the schedule too
        pipe.scheduler = reference_scheduler(solver, sigmas.numpy())
    cfg_kw = dict(negative_prompt=["a green painting", "small"], true_cfg_scale=2.5) if true_cfg else {}
    expected = _diffusers_latent(pipe, noise, prompt=PROMPTS, num_inference_steps=steps, guidance_scale=4.0, **cfg_kw)
    got = ours.generate(PROMPTS, negative_prompt=cfg_kw.get("negative_prompt"), cfg=cfg_kw.get("true_cfg_scale", 1.0),
                        width=SIZE[0], height=SIZE[1], steps=steps, guidance=4.0, solver=solver, noise=noise,
                        max_sequence_length=16, output_type="latent")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    pipe.scheduler = tiny_pipeline().scheduler


def test_schnell_schedule_and_no_guidance(saved):
    pipe, d = saved[False]
    ours = rflow.load(d, device="cpu", dtype=torch.float32)
    assert ours.schedule.kind == "none" and not ours.transformer.config.guidance_embed
    noise = _noise(1)
    expected = _diffusers_latent(pipe, noise, prompt=PROMPTS[0], num_inference_steps=4)
    got = ours.generate(PROMPTS[0], width=SIZE[0], height=SIZE[1], steps=4, noise=noise, max_sequence_length=16, output_type="latent")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_single_file_with_separate_components(saved, tmp_path):
    from flux_ref import save_bfl

    pipe, d = saved[True]
    save_bfl(pipe.transformer, tmp_path / "flux.safetensors")
    ours = rflow.load(tmp_path / "flux.safetensors", text_encoders=d, vae=d / "vae", device="cpu", dtype=torch.float32)
    noise = _noise(1)
    expected = _diffusers_latent(pipe, noise, prompt=PROMPTS[1], num_inference_steps=3)
    got = ours.generate(PROMPTS[1], width=SIZE[0], height=SIZE[1], steps=3, noise=noise, max_sequence_length=16, output_type="latent")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_outputs_seed_and_img2img(saved):
    _, d = saved[True]
    p = rflow.load(d, device="cpu", dtype=torch.float32)
    kw = dict(width=SIZE[0], height=SIZE[1], steps=3, max_sequence_length=16)
    imgs = p.generate(PROMPTS, seed=7, **kw)
    assert len(imgs) == 2 and imgs[0].size == SIZE
    again = p.generate(PROMPTS, seed=7, output_type="np", **kw)
    np.testing.assert_array_equal(np.stack([np.asarray(i) for i in imgs]), again)
    assert not np.array_equal(again, p.generate(PROMPTS, seed=8, output_type="np", **kw))
    pt = p.generate(PROMPTS[0], seed=7, output_type="pt", **kw)
    assert pt.shape == (1, 3, SIZE[1], SIZE[0]) and 0 <= pt.min() and pt.max() <= 1
    # img2img at strength 1 is text-to-image; lower strength stays nearer the input image
    init = imgs[1]
    full = p.generate(PROMPTS[0], seed=7, image=init, strength=1.0, output_type="latent", **kw)
    torch.testing.assert_close(full, p.generate(PROMPTS[0], seed=7, output_type="latent", **kw))
    x0 = p.encode_image(init, *SIZE)
    near = p.generate(PROMPTS[0], seed=7, image=init, strength=0.34, output_type="latent", **kw)
    assert (near - x0).pow(2).mean() < (full - x0).pow(2).mean()


def test_generate_errors(saved):
    _, d = saved[True]
    p = rflow.load(d, device="cpu", dtype=torch.float32)
    kw = dict(steps=2, max_sequence_length=16)
    with pytest.raises(UserError, match="multiple of 4"):
        p.generate("a cat", width=30, height=16, **kw)
    with pytest.raises(UserError, match="unknown solver"):
        p.generate("a cat", width=24, height=16, solver="heun", **kw)
    with pytest.raises(UserError, match="negative prompts for 2 prompts"):
        p.generate(PROMPTS, negative_prompt=["x", "y", "z"], cfg=2.0, width=24, height=16, **kw)
    with pytest.raises(UserError, match="noise has shape"):
        p.generate("a cat", width=24, height=16, noise=torch.zeros(1, 4, 4, 4), **kw)
    with pytest.raises(UserError, match="strength must be ≤ 1"):
        p.generate("a cat", width=24, height=16, image=torch.rand(3, 16, 24), strength=1.5, **kw)
    with pytest.raises(UserError, match="cannot read image"):
        p.generate("a cat", width=24, height=16, image=__file__, **kw)


def test_load_errors(tmp_path, saved):
    _, d = saved[True]
    with pytest.raises(UserError, match="no such file"):
        rflow.load(tmp_path / "nope")
    from flux_ref import save_bfl

    save_bfl(saved[True][0].transformer, tmp_path / "lonely.safetensors")
    with pytest.raises(UserError, match="no VAE found"):
        rflow.load(tmp_path / "lonely.safetensors", device="cpu")
    with pytest.raises(UserError, match="no text encoders"):
        rflow.load(tmp_path / "lonely.safetensors", vae=d / "vae", device="cpu")
    with pytest.raises(UserError, match="unknown dtype"):
        rflow.load(d, dtype="fp64")
