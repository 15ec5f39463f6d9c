"""Z-Image end to end against diffusers' ZImagePipeline on a tiny random pipeline (fp32, offline).

First the family pieces alone (``rflow.families.zimage``: encode, Denoiser, default_schedule, the
FLUX.1 VAE codec) driven by ``rflow.sampling.sample`` and ``rflow.families.base.guided``; then
``rflow.load(folder).generate(...)``. diffusers' ``guidance_scale`` g is rflow's ``cfg = 1 + g``
(diffusers: pos + g·(pos − neg)); ``cfg_truncation`` / ``cfg_normalization`` are rflow's
``Guidance(truncation=..., renorm=...)``. DPM-Solver++(2M) and UniPC run against diffusers' schedulers
swapped into the pipeline, which proves the time-direction adaptation (t = 1 − sigma, negated output)
for multistep solvers too.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from qwen_ref import ZIMAGE_SCHEDULER_CONFIG, tiny_qwen3, tiny_tokenizer, zimage_pipeline
from refs_schedulers import reference_scheduler
from zimage_ref import TINY, tiny_diffusers
from zimage_ref import load as load_transformer

from rflow import sampling
from rflow.errors import UserError
from rflow.families import zimage
from rflow.families.base import Guidance, guided

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT_CHANNELS = TINY["in_channels"]  # 4
SIZE = (24, 16)  # width, height: the tiny VAE has factor 2 -> latent 12×8, 6×4 patches
MAX_LEN = 32
STEPS = 6  # shifted sigmas 1, .9375, .857, .75, .6, .375: 1 − sigma = 0, .06, .14, .25, .4, .625
PROMPTS = ["a red cat", "a photo of a small blue dog in the city at night"]
NEGATIVE = ["a green painting of the sky", "large"]
TRUNCATION = 0.3  # CFG on for the first 4 steps, off for the last 2 (no sigma near the boundary)
RENORM = 1.0


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(5)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.8, shift_factor=0.1).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(diffusers ZImagePipeline, the folder it was saved to)."""
    tok = tiny_tokenizer()
    te = tiny_qwen3(tok, hidden=TINY["cap_feat_dim"])
    pipe = zimage_pipeline(te, tok, transformer=tiny_diffusers(), vae=tiny_vae(),
                           scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    d = tmp_path_factory.mktemp("zimage")
    pipe.save_pretrained(d)
    return pipe, d


@pytest.fixture(scope="module")
def parts(saved):
    """rflow's own parts, loaded from the saved folder through the family's loaders."""
    _, d = saved
    model, layout = load_transformer(d / "transformer")
    assert layout == "diffusers"
    codec = zimage.load_codec(zimage.find_codec(d), device="cpu", dtype=torch.float32)
    text = zimage.load_text(zimage.find_text(None, d), device="cpu", dtype=torch.float32)
    zimage.check_parts_fit(model.config, codec, text, where=str(d))
    sched = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
    return model, codec, text, zimage.default_schedule(model.config, sched)


def noise(batch: int, seed: int = 3) -> torch.Tensor:
    w, h = SIZE
    return torch.randn(batch, LATENT_CHANNELS, h // 2, w // 2, generator=torch.Generator().manual_seed(seed))


def diffusers_run(pipe, solver: str, sigmas, x, *, g=0.0, negative=None, truncation=1.0, renorm=False,
                  output_type="latent"):
    if solver != "euler":  # euler runs through the pipeline's own scheduler, checking the schedule too
        pipe.scheduler = reference_scheduler(solver, sigmas.numpy())
    try:
        with torch.no_grad():
            return pipe(prompt=list(PROMPTS), negative_prompt=list(negative) if negative else None,  # (it rewrites lists)
                        width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS, guidance_scale=g,
                        cfg_truncation=truncation, cfg_normalization=renorm, latents=x.clone(),
                        output_type=output_type, max_sequence_length=MAX_LEN).images
    finally:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER_CONFIG)


def ours_run(parts, solver: str, x, *, cfg=1.0, negative=None, truncation=None, renorm=None):
    model, _, text, (kind, shift) = parts
    cond = zimage.encode(text, PROMPTS, MAX_LEN)
    neg = zimage.encode(text, negative or [""] * len(PROMPTS), MAX_LEN) if cfg > 1 else None
    sigmas = sampling.get_sigmas(STEPS, schedule=kind, shift=shift, image_seq_len=zimage.image_seq_len(x.shape))
    velocity = guided(zimage.Denoiser(model), cond, neg, Guidance(cfg, truncation, renorm))
    return sampling.sample(velocity, x, sigmas, solver)


def sigmas_of(parts):
    kind, shift = parts[3]
    return sampling.get_sigmas(STEPS, schedule=kind, shift=shift)


GUIDANCE_CASES = {
    "no-cfg": dict(g=0.0),
    "cfg": dict(g=3.0, negative=NEGATIVE),
    "cfg-empty-negative": dict(g=2.0),
    "cfg-truncation-renorm": dict(g=3.0, negative=NEGATIVE, truncation=TRUNCATION, renorm=RENORM),
}


def ours_kw(case: dict) -> dict:
    return dict(cfg=1.0 + case["g"], negative=case.get("negative"), truncation=case.get("truncation"),
                renorm=case.get("renorm"))


# ---------------------------------------------------------------------------------------------- family pieces


@pytest.mark.parametrize("solver", sampling.SOLVERS)
@pytest.mark.parametrize("case", list(GUIDANCE_CASES))
def test_family_sampling_equals_pipeline(saved, parts, solver, case):
    pipe, _ = saved
    kw = GUIDANCE_CASES[case]
    x = noise(len(PROMPTS))
    expected = diffusers_run(pipe, solver, sigmas_of(parts), x, **{"truncation": 1.0, "renorm": False, **kw})
    got = ours_run(parts, solver, x, **ours_kw(kw))
    assert got.shape == expected.shape == x.shape
    assert close(got, expected), (got - expected).abs().max().item()


def test_truncation_and_renorm_take_effect(parts):
    """The CFG options change the result (the equality above is not vacuous)."""
    x = noise(len(PROMPTS))
    plain = ours_run(parts, "euler", x, cfg=4.0, negative=NEGATIVE)
    trunc = ours_run(parts, "euler", x, cfg=4.0, negative=NEGATIVE, truncation=TRUNCATION)
    renorm = ours_run(parts, "euler", x, cfg=4.0, negative=NEGATIVE, renorm=RENORM)
    no_cfg = ours_run(parts, "euler", x)
    for other in (trunc, renorm, no_cfg):
        assert not close(other, plain, rel=1e-2)
    assert not close(trunc, no_cfg, rel=1e-2)


def test_decoded_images_equal_pipeline(saved, parts):
    """The codec's decode of our latents is ZImagePipeline's (latents / scaling + shift) -> VAE -> [0, 1]."""
    pipe, _ = saved
    _, codec, _, _ = parts
    x = noise(len(PROMPTS))
    kw = GUIDANCE_CASES["cfg"]
    expected = diffusers_run(pipe, "euler", sigmas_of(parts), x, output_type="pt", **kw)
    latent = ours_run(parts, "euler", x, **ours_kw(kw))
    with torch.no_grad():
        got = ((codec.decode(latent) + 1) / 2).clamp(0, 1)
    assert got.shape == expected.shape == (len(PROMPTS), 3, SIZE[1], SIZE[0])
    assert (got - expected).abs().max().item() <= 1e-4


def test_denoiser_convention(parts):
    """v = −model(x, 1 − sigma): a scalar, 0-dim or per-sample sigma; grads flow (training)."""
    model, _, text, _ = parts
    cond = zimage.encode(text, PROMPTS, MAX_LEN)
    x, den = noise(2), zimage.Denoiser(model)
    assert den.prediction == "velocity" and torch.equal(den.loss_weight(torch.rand(3), 0.1), torch.ones(3))
    with torch.no_grad():
        raw = model(x, torch.tensor([0.25, 0.25]), cond.caps)
        for s in (0.75, torch.tensor(0.75), torch.tensor([0.75, 0.75])):
            assert torch.allclose(den(x, s, cond), -raw, atol=1e-6)
        per = den(x, torch.tensor([0.75, 0.1]), cond)
        assert torch.allclose(per[0], -raw[0], atol=1e-6) and not torch.allclose(per[1], -raw[1], atol=1e-3)
    xg = x.clone().requires_grad_(True)
    den(xg, 0.5, cond).square().mean().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with pytest.raises(UserError, match="2 captions for a batch of 3"):
        den(noise(3), 0.5, cond)
    with pytest.raises(UserError, match="velocity"):
        zimage.Denoiser(model, prediction="data")


def test_latent_spec_and_schedule():
    cfg = zimage.Z_IMAGE
    spec = zimage.latent_spec(cfg, 8)
    assert (spec.channels, spec.spatial_factor, spec.size_multiple) == (16, 8, 16)
    assert spec.shape(2, 1024, 768) == (2, 16, 128, 96)
    assert zimage.image_seq_len((2, 16, 128, 96)) == 64 * 48
    assert zimage.DEFAULT_SIZE == (1024, 1024) and zimage.MAX_SEQUENCE_LENGTH == 512
    assert zimage.default_schedule(cfg, None) == ("static", 3.0)
    assert zimage.default_schedule(cfg, ZIMAGE_SCHEDULER_CONFIG) == ("static", 3.0)
    assert zimage.default_schedule(cfg, {"shift": 1.0}) == ("none", None)
    assert zimage.default_schedule(cfg, {"shift": 6}) == ("static", 6.0)
    assert zimage.default_schedule(cfg, {"use_dynamic_shifting": True, "base_shift": 0.5}) == ("flux", None)
    for bad, what in (({"shift": 0}, "shift"), ({"shift": "3"}, "shift"), ({"use_karras_sigmas": True}, "use_karras"),
                      ({"shift_terminal": 0.1}, "shift_terminal"),
                      ({"use_dynamic_shifting": True, "max_shift": 2.0}, "max_shift"),
                      ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, "linear")):
        with pytest.raises(UserError, match=what):
            zimage.default_schedule(cfg, bad)


def test_schedule_equals_scheduler():
    """Our static-shift sigmas are the ones ZImagePipeline's scheduler steps through."""
    sched = FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER_CONFIG)
    for steps in (1, 4, 9):
        sched.set_timesteps(steps, sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), mu=0.7)
        kind, shift = zimage.default_schedule(zimage.Z_IMAGE, ZIMAGE_SCHEDULER_CONFIG)
        ours = sampling.get_sigmas(steps, schedule=kind, shift=shift)
        assert torch.allclose(ours.float(), sched.sigmas.float(), atol=1e-6)


def test_finding_and_fitting_parts(saved, parts, tmp_path):
    _, d = saved
    model, codec, text, _ = parts
    assert zimage.find_codec(d) == d / "vae" and zimage.find_codec(tmp_path) is None
    (tmp_path / "ae.safetensors").write_bytes(b"")
    assert zimage.find_codec(tmp_path) == tmp_path / "ae.safetensors"
    assert zimage.find_text(tmp_path, d) == d and zimage.find_text(tmp_path) is None
    zimage.check_parts_fit(model, codec, text, where="here")  # a model carrying its config is fine too
    zimage.check_parts_fit(model.config, None, None, where="here")
    wide = type(model.config)(**{**model.config.to_dict(), "in_channels": 16})
    with pytest.raises(UserError, match=r"^here: .*takes 16 latent channels .*VAE gives 4$"):
        zimage.check_parts_fit(wide, codec, text, where="here")
    other = type(model.config)(**{**model.config.to_dict(), "cap_feat_dim": 2560})
    with pytest.raises(UserError, match=r"2560-wide caption features .*text encoder gives 32$"):
        zimage.check_parts_fit(other, codec, text, where="here")


# ---------------------------------------------------------------------------------------------- rflow.load


def _loader_knows_zimage() -> bool:
    from rflow.checkpoints.loader import families

    return any(f.NAME == zimage.NAME for f in families())


needs_loader = pytest.mark.skipif(
    not _loader_knows_zimage(),
    reason="rflow.checkpoints.loader.families() does not register the zimage family yet (rflow.load cannot "
           "open a Z-Image transformer)")


@pytest.fixture(scope="module")
def loaded(saved):
    import rflow

    _, d = saved
    return rflow.load(d, device="cpu", dtype=torch.float32)


@needs_loader
def test_load_finds_the_family(loaded):
    assert loaded.family == zimage.NAME
    assert (loaded.schedule.kind, loaded.schedule.shift) == ("static", 3.0)
    assert loaded.latent_shape(SIZE[1], SIZE[0], 2) == noise(2).shape
    assert loaded.size_multiple == 4 and loaded.max_sequence_length == 512 and tuple(loaded.default_size) == (1024, 1024)


@needs_loader
@pytest.mark.parametrize("solver", sampling.SOLVERS)
@pytest.mark.parametrize("case", ["no-cfg", "cfg-empty-negative", "cfg-truncation-renorm"])
def test_generate_latents_equal_pipeline(saved, loaded, parts, solver, case):
    pipe, _ = saved
    kw = GUIDANCE_CASES[case]
    x = noise(len(PROMPTS))
    expected = diffusers_run(pipe, solver, sigmas_of(parts), x, **{"truncation": 1.0, "renorm": False, **kw})
    got = loaded.generate(PROMPTS, negative_prompt=kw.get("negative"), cfg=1.0 + kw["g"],
                          cfg_truncation=kw.get("truncation"), cfg_renorm=kw.get("renorm"), width=SIZE[0],
                          height=SIZE[1], steps=STEPS, solver=solver, noise=x, max_sequence_length=MAX_LEN,
                          output_type="latent")
    assert got.shape == expected.shape
    assert close(got, expected), (got - expected).abs().max().item()


@needs_loader
def test_generate_images_equal_pipeline(saved, loaded, parts):
    pipe, _ = saved
    kw = GUIDANCE_CASES["cfg-truncation-renorm"]
    x = noise(len(PROMPTS))
    expected = diffusers_run(pipe, "euler", sigmas_of(parts), x, output_type="pt", **kw)
    got = loaded.generate(PROMPTS, negative_prompt=NEGATIVE, cfg=1.0 + kw["g"], cfg_truncation=TRUNCATION,
                          cfg_renorm=RENORM, width=SIZE[0], height=SIZE[1], steps=STEPS, noise=x,
                          max_sequence_length=MAX_LEN, output_type="pt")
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
