"""rflow's FLUX.2 VAE / latent codec against diffusers' AutoencoderKLFlux2 and Flux2KleinPipeline (tiny, CPU, fp32)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, AutoencoderKLFlux2, Flux2KleinPipeline  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import retrieve_latents  # noqa: E402

from rflow.checkpoints.io import save_safetensors  # noqa: E402
from rflow.checkpoints.vae import diffusers_vae_to_bfl  # noqa: E402
from rflow.errors import UserError  # noqa: E402
from rflow.families.flux2_vae import (  # noqa: E402
    config_metadata,
    detect_flux2_vae,
    diffusers_flux2_vae_to_bfl,
    load_flux2_vae,
)
from rflow.models.vae2 import Flux2Codec, Flux2VAEConfig, patchify, unpatchify  # noqa: E402

RTOL = 1e-5  # of the output's scale
P = Flux2KleinPipeline

# name -> AutoencoderKLFlux2 kwargs (2 levels). "g32" has FLUX.2's 32 groups and eps, so its BFL file
# needs no metadata; "small" has its own decoder widths, no post_quant_conv and a different eps.
CASES = {
    "g32": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32),
    "small": dict(block_out_channels=(8, 16), decoder_block_out_channels=(8, 8), layers_per_block=2,
                  latent_channels=2, norm_num_groups=4, use_post_quant_conv=False, batch_norm_eps=1e-3),
    "no_attn": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=2, norm_num_groups=4,
                    use_quant_conv=False, mid_block_add_attention=False),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _make_vae(kw: dict, seed: int = 0) -> AutoencoderKLFlux2:
    n = len(kw["block_out_channels"])
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                             **kw).eval()
    with torch.no_grad():  # default norms are identity and stats 0/1; randomise so every tensor matters
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        vae.bn.running_mean.copy_(0.5 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae


def _our_config(kw: dict) -> Flux2VAEConfig:
    return Flux2VAEConfig(
        widths=kw["block_out_channels"], decoder_widths=kw.get("decoder_block_out_channels"),
        num_res_blocks=kw["layers_per_block"], z_channels=kw["latent_channels"], norm_groups=kw["norm_num_groups"],
        use_quant_conv=kw.get("use_quant_conv", True), use_post_quant_conv=kw.get("use_post_quant_conv", True),
        mid_attention=kw.get("mid_block_add_attention", True), batch_norm_eps=kw.get("batch_norm_eps", 1e-4),
    )


@pytest.fixture(scope="module", params=list(CASES))
def ref(request, tmp_path_factory):
    """(kwargs, diffusers vae, {layout: path})."""
    name, kw = request.param, CASES[request.param]
    vae = _make_vae(kw)
    root = tmp_path_factory.mktemp(name)
    vae.save_pretrained(root / "vae")  # writes bn.num_batches_tracked too
    meta = None if name == "g32" else config_metadata(_our_config(kw))
    save_safetensors(diffusers_flux2_vae_to_bfl(vae.state_dict()), root / "ae.safetensors", metadata=meta)
    return kw, vae, {"diffusers": root / "vae", "bfl": root / "ae.safetensors"}


def _close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got - want).abs().max().item()
    assert err <= RTOL * want.abs().max().item(), f"max error {err} vs scale {want.abs().max().item()}"


def _image(seed=1, h=8, w=12):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, h, w, generator=g) * 2 - 1  # non-square catches H/W mix-ups


def _bn(vae):
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_encoder_decoder_match_diffusers(ref, layout):
    kw, vae, paths = ref
    model = load_flux2_vae(paths[layout])
    assert model.config == _our_config(kw)
    x = _image()
    z = torch.randn(2, kw["latent_channels"], 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(model.moments(x), vae.encode(x).latent_dist.parameters)
        _close(model.decode_raw(z), vae.decode(z).sample)
    assert model.dtype == torch.float32 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.latent_channels == 4 * kw["latent_channels"] and model.downscale_factor == 4


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_codec_equals_pipeline(ref, layout):
    """encode = the pipeline's _encode_vae_image (argmax and sample); decode = its final steps."""
    kw, vae, paths = ref
    model = load_flux2_vae(paths[layout])
    fake = SimpleNamespace(vae=vae, _patchify_latents=P._patchify_latents)
    x = _image(3)
    with torch.no_grad():
        want = P._encode_vae_image(fake, x, torch.Generator().manual_seed(0))
        _close(model.encode(x), want)
        assert want.shape == (2, model.latent_channels, 8 // 4, 12 // 4)

        post = vae.encode(x)  # sample mode: the pipeline's steps after retrieve_latents(..., "sample")
        mean, std = _bn(vae)
        sampled = (P._patchify_latents(retrieve_latents(post, torch.Generator().manual_seed(5), "sample")) - mean) / std
        _close(model.encode(x, sample=True, generator=torch.Generator().manual_seed(5)), sampled)

        lat = torch.randn(2, model.latent_channels, 2, 3, generator=torch.Generator().manual_seed(4))
        image = vae.decode(P._unpatchify_latents(lat * std + mean), return_dict=False)[0]
        _close(model.decode(lat), image)


def test_noise_layout_is_pipeline_latents():
    """The pipeline's latents (argument or its own noise) are (B, 4z, H/16, W/16) before packing: our layout."""
    kw = CASES["small"]
    model = Flux2Codec(_our_config(kw))
    fake = SimpleNamespace(vae_scale_factor=2 ** (len(kw["block_out_channels"]) - 1),
                           _prepare_latent_ids=P._prepare_latent_ids, _pack_latents=P._pack_latents)
    height, width = 32, 48
    packed, ids = P.prepare_latents(fake, 2, kw["latent_channels"], height, width, torch.float32, torch.device("cpu"),
                                    torch.Generator().manual_seed(7))
    f = model.downscale_factor
    noise = torch.randn(2, model.latent_channels, height // f, width // f, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(P._unpack_latents_with_ids(packed, ids, height // f, width // f), noise, rtol=0, atol=0)
    with torch.no_grad():
        assert model.encode(torch.zeros(1, 3, height, width)).shape[1:] == noise.shape[1:]
        assert model.decode(noise).shape == (2, 3, height, width)


def test_patchify_is_the_pipelines():
    z = torch.randn(2, 3, 6, 8)
    torch.testing.assert_close(patchify(z), P._patchify_latents(z), rtol=0, atol=0)
    p = torch.randn(2, 12, 3, 4)
    torch.testing.assert_close(unpatchify(p), P._unpatchify_latents(p), rtol=0, atol=0)


def test_wrong_shapes_are_named(tmp_path):
    kw = CASES["g32"]
    vae = _make_vae(kw, seed=1)
    sd = {k: v for k, v in vae.state_dict().items()}
    bad = "decoder.up_blocks.0.resnets.1.conv1.weight"
    sd[bad] = sd[bad][:, :-1]
    save_safetensors(sd, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "vae" / "config.json").write_text(json.dumps(dict(vae.config)))
    with pytest.raises(UserError, match=re.escape(bad)) as e:
        load_flux2_vae(tmp_path / "vae")
    assert "\n" not in str(e.value)

    bfl = diffusers_flux2_vae_to_bfl(vae.state_dict())
    bfl["bn.running_var"] = bfl["bn.running_var"][:-4]
    save_safetensors(bfl, tmp_path / "ae.safetensors")
    with pytest.raises(UserError, match=r"bn\.running_var has shape \(12,\), expected \(16,\)"):
        load_flux2_vae(tmp_path / "ae.safetensors")

    # diffusers names in a single file without config.json (as ComfyUI's flux2-vae.safetensors): FLUX.2 defaults
    save_safetensors(vae.state_dict(), tmp_path / "flux2-vae.safetensors")
    got = load_flux2_vae(tmp_path / "flux2-vae.safetensors").state_dict()
    want = diffusers_flux2_vae_to_bfl(vae.state_dict())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    # config.json stating other sizes than the weights
    cfg = dict(vae.config, latent_channels=8)
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    save_safetensors(vae.state_dict(), tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match="latent_channels is 8, but the weights have 4"):
        load_flux2_vae(tmp_path / "vae")


def test_detection_and_prefix(tmp_path):
    kw = CASES["no_attn"]
    vae = _make_vae(kw, seed=2)
    sd = vae.state_dict()
    bfl = diffusers_flux2_vae_to_bfl(sd)
    assert detect_flux2_vae(sd) == ("diffusers", "")
    assert detect_flux2_vae(bfl) == ("bfl", "")
    assert detect_flux2_vae(["first_stage_model." + k for k in bfl]) == ("bfl", "first_stage_model.")
    assert "bn.num_batches_tracked" in sd and "bn.num_batches_tracked" not in bfl
    assert "encoder.quant_conv.weight" not in bfl and "decoder.post_quant_conv.weight" in bfl

    # FLUX.1 VAE keys (16 latent channels, no batch-norm statistics), diffusers and BFL names
    flux1 = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          block_out_channels=(32, 64), layers_per_block=1, latent_channels=16, norm_num_groups=32)
    assert detect_flux2_vae(flux1.state_dict()) is None
    assert detect_flux2_vae(diffusers_vae_to_bfl(flux1.state_dict())) is None
    save_safetensors(diffusers_vae_to_bfl(flux1.state_dict()), tmp_path / "flux1_ae.safetensors")
    with pytest.raises(UserError, match="not a FLUX.2 VAE checkpoint"):
        load_flux2_vae(tmp_path / "flux1_ae.safetensors")

    # a combined file: the VAE behind "vae." next to other tensors loads, in bf16 when asked
    other = {"model.diffusion_model.img_in.weight": torch.zeros(2, 2)}
    save_safetensors({**other, **{"vae." + k: t for k, t in bfl.items()}}, tmp_path / "all.safetensors",
                     metadata=config_metadata(_our_config(kw)))
    model = load_flux2_vae(tmp_path / "all.safetensors", dtype=torch.bfloat16)
    assert model.dtype == model.bn.running_var.dtype == torch.bfloat16
    want = {k: t.to(torch.bfloat16) for k, t in bfl.items()}
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_mid_attention_gives_sdpa_contiguous_qkv(monkeypatch):
    """Contiguous (B, 1, HW, C) q, k, v let SDPA pick a fused kernel; bad image sizes are a UserError."""
    model = Flux2Codec(_our_config(CASES["small"])).eval()
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append([(t.shape, t.is_contiguous()) for t in (q, k, v)])
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model.decode(model.encode(_image()))
    assert len(seen) == 2  # encoder and decoder mid blocks
    assert all(c and s[1] == 1 and s[3] in (16, 8) for call in seen for s, c in call)
    with pytest.raises(UserError, match="not a multiple of 4"):
        model.encode(torch.zeros(1, 3, 10, 12))
    with pytest.raises(UserError, match=r"latents \(B, 8, h, w\)"):
        model.decode(torch.zeros(1, 2, 2, 2))


def test_full_size_flux2_layout():
    """diffusers' default AutoencoderKLFlux2 (FLUX.2's VAE), on the meta device: BFL names, shapes and config."""
    from rflow.families.flux2_vae import infer_flux2_vae_config

    with torch.device("meta"):
        bfl = diffusers_flux2_vae_to_bfl(AutoencoderKLFlux2().state_dict())
        ours = Flux2Codec(Flux2VAEConfig()).state_dict()
    assert {k: t.shape for k, t in bfl.items()} == {k: t.shape for k, t in ours.items()}
    assert bfl["bn.running_mean"].shape == (128,) and bfl["encoder.quant_conv.weight"].shape == (64, 64, 1, 1)
    assert bfl["decoder.post_quant_conv.weight"].shape == (32, 32, 1, 1)
    assert infer_flux2_vae_config({k: tuple(t.shape) for k, t in bfl.items()}) == Flux2VAEConfig()
    with torch.device("meta"):
        model = Flux2Codec(Flux2VAEConfig())
    assert (model.downscale_factor, model.latent_channels) == (16, 128)
