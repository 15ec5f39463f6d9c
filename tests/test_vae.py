"""rflow's AutoEncoder and load_vae against diffusers' AutoencoderKL (tiny random VAEs, CPU, fp32)."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from rflow.checkpoints.io import save_safetensors  # noqa: E402
from rflow.checkpoints.vae import (  # noqa: E402
    METADATA_KEY,
    config_metadata,
    diffusers_vae_to_bfl,
    infer_vae_config,
    load_vae,
)
from rflow.errors import UserError  # noqa: E402
from rflow.models.vae import AutoEncoder, VAEConfig  # noqa: E402

ATOL = 1e-5

# name -> AutoencoderKL kwargs. "flux32" uses FLUX.1's 32 groups and normalisation, so its BFL file
# needs no metadata; the others record their config in the file's metadata.
CASES = {
    "sd_quant": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                     scaling_factor=0.18215, shift_factor=None),
    "deep16": dict(block_out_channels=(8, 16, 16, 32), layers_per_block=2, latent_channels=16, norm_num_groups=8,
                   use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.5, shift_factor=0.25),
    "no_mid_attn": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        use_quant_conv=True, use_post_quant_conv=False, mid_block_add_attention=False,
                        scaling_factor=0.7, shift_factor=-0.2),
    "flux32": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=16, norm_num_groups=32,
                   use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
}


def _make_diffusers_vae(kw: dict, seed: int = 0):
    n = len(kw["block_out_channels"])
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **kw
    ).eval()
    with torch.no_grad():  # default norms are identity; randomise them so every weight matters
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return vae


def _our_config(kw: dict) -> VAEConfig:
    boc = kw["block_out_channels"]
    return VAEConfig(
        ch=boc[0], ch_mult=tuple(c // boc[0] for c in boc), num_res_blocks=kw["layers_per_block"],
        z_channels=kw["latent_channels"], norm_groups=kw["norm_num_groups"],
        scaling_factor=kw["scaling_factor"], shift_factor=kw["shift_factor"] or 0.0,
        use_quant_conv=kw.get("use_quant_conv", True), use_post_quant_conv=kw.get("use_post_quant_conv", True),
        mid_attention=kw.get("mid_block_add_attention", True),
    )


@pytest.fixture(scope="module", params=list(CASES))
def ref(request, tmp_path_factory):
    """(name, kwargs, diffusers vae, diffusers folder, BFL file)."""
    name, kw = request.param, CASES[request.param]
    vae = _make_diffusers_vae(kw)
    root = tmp_path_factory.mktemp(name)
    vae.save_pretrained(root / "vae")
    config = _our_config(kw)
    bfl = diffusers_vae_to_bfl(vae.state_dict(), config)
    meta = None if name == "flux32" else config_metadata(config)
    save_safetensors(bfl, root / "ae.safetensors", metadata=meta)
    return name, kw, vae, root / "vae", root / "ae.safetensors"


def _inputs(kw, seed=1):
    f = 2 ** (len(kw["block_out_channels"]) - 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1  # non-square catches H/W mix-ups
    z = torch.randn(2, kw["latent_channels"], 16 // f, 24 // f, generator=g)
    return x, z


def _reference(vae, kw, x, z):
    scale, shift = kw["scaling_factor"], kw["shift_factor"] or 0.0
    with torch.no_grad():
        enc = (vae.encode(x).latent_dist.mode() - shift) * scale
        dec = vae.decode(z / scale + shift).sample
    return enc, dec


@pytest.mark.parametrize("fmt", ["diffusers", "bfl"])
def test_matches_diffusers(ref, fmt):
    name, kw, vae, folder, single = ref
    model = load_vae(folder if fmt == "diffusers" else single)
    x, z = _inputs(kw)
    want_enc, want_dec = _reference(vae, kw, x, z)
    with torch.no_grad():
        got_enc, got_dec = model.encode(x), model.decode(z)
    assert got_enc.shape == want_enc.shape and got_dec.shape == want_dec.shape
    torch.testing.assert_close(got_enc, want_enc, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_dec, want_dec, atol=ATOL, rtol=0)
    assert model.config == _our_config(kw)
    assert model.downscale_factor == 2 ** (len(kw["block_out_channels"]) - 1)
    assert model.latent_channels == kw["latent_channels"]
    assert model.dtype == torch.float32 and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_pipeline_root_and_bf16(tmp_path):
    kw = CASES["deep16"]
    vae = _make_diffusers_vae(kw, seed=2)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    model = load_vae(tmp_path / "pipe", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x, z = _inputs(kw)
    want_enc, want_dec = _reference(vae, kw, x, z)
    with torch.no_grad():
        enc, dec = model.encode(x), model.decode(z)  # fp32 inputs are cast to the model dtype
    assert enc.dtype == dec.dtype == torch.bfloat16
    assert (enc.float() - want_enc).abs().max() < 0.05 * want_enc.abs().max()
    assert (dec.float() - want_dec).abs().max() < 0.05 * want_dec.abs().max()
    # a file stored in bf16 loads in bf16 by default
    bf = {k: v.to(torch.bfloat16) for k, v in diffusers_vae_to_bfl(vae.state_dict()).items()}
    save_safetensors(bf, tmp_path / "ae_bf16.safetensors", metadata=config_metadata(_our_config(kw)))
    assert load_vae(tmp_path / "ae_bf16.safetensors").dtype == torch.bfloat16


def test_checkpoint_variants(tmp_path):
    """SD full checkpoint prefix, legacy diffusers attention names, Linear-shaped attention in a BFL file."""
    kw = CASES["sd_quant"]
    vae = _make_diffusers_vae(kw, seed=3)
    config = _our_config(kw)
    meta = config_metadata(config)
    x, z = _inputs(kw)
    want_enc, want_dec = _reference(vae, kw, x, z)
    sd = vae.state_dict()
    bfl = diffusers_vae_to_bfl(sd, config)
    legacy = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"): v
              for k, v in sd.items()}
    variants = {
        "sd_full.safetensors": ({"first_stage_model." + k: v for k, v in bfl.items()}
                                | {"model.diffusion_model.x.weight": torch.zeros(2)}, meta),
        "legacy.safetensors": (legacy, None),
        "linear_attn.safetensors": ({k: (v.flatten(1) if ".attn_1." in k and v.ndim == 4 else v)
                                     for k, v in bfl.items()}, meta),
    }
    for fname, (tensors, md) in variants.items():
        save_safetensors(tensors, tmp_path / fname, metadata=md)
    # the legacy diffusers file sits next to a diffusers config.json
    vae.save_config(tmp_path)
    for fname in variants:
        model = load_vae(tmp_path / fname)
        with torch.no_grad():
            torch.testing.assert_close(model.encode(x), want_enc, atol=ATOL, rtol=0)
            torch.testing.assert_close(model.decode(z), want_dec, atol=ATOL, rtol=0)


def test_flux_config_inference_and_encode_api():
    with torch.device("meta"):
        flux = AutoEncoder(VAEConfig())
    shapes = {k: tuple(v.shape) for k, v in flux.state_dict().items()}
    assert infer_vae_config(shapes) == VAEConfig()
    assert flux.downscale_factor == 8 and flux.latent_channels == 16
    assert "quant_conv.weight" not in shapes and "decoder.up.3.upsample.conv.weight" in shapes
    assert "decoder.up.0.upsample.conv.weight" not in shapes and shapes["decoder.up.0.block.2.conv1.weight"][0] == 128

    model = AutoEncoder(VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=4))
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        a = model.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        b = model.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and not torch.equal(a, model.encode(x))
    with pytest.raises(UserError, match="multiple of 2"):
        model.encode(torch.zeros(1, 3, 7, 8))
    with pytest.raises(UserError, match="expects latents"):
        model.decode(torch.zeros(1, 3, 4, 4))


def test_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_vae(tmp_path / "missing.safetensors")

    save_safetensors({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "dit.safetensors")
    with pytest.raises(UserError, match="not a FLUX/SD VAE checkpoint"):
        load_vae(tmp_path / "dit.safetensors")

    (tmp_path / "vae.ckpt").write_bytes(b"\x80\x02" + b"\x00" * 64)
    with pytest.raises(UserError, match="pickle"):
        load_vae(tmp_path / "vae.ckpt")

    kw = CASES["sd_quant"]
    vae = _make_diffusers_vae(kw)
    config = _our_config(kw)
    bfl = diffusers_vae_to_bfl(vae.state_dict(), config)

    # 8/16-channel widths with no metadata: FLUX's 32 groups cannot apply
    save_safetensors(bfl, tmp_path / "nometa.safetensors")
    with pytest.raises(UserError, match="norm_groups=32"):
        load_vae(tmp_path / "nometa.safetensors")

    partial = {k: v for k, v in bfl.items() if k != "decoder.mid.block_2.conv1.weight"}
    save_safetensors(partial, tmp_path / "partial.safetensors", metadata=config_metadata(config))
    with pytest.raises(UserError, match="do not match.*1 missing"):
        load_vae(tmp_path / "partial.safetensors")

    for text, msg in (("{bad", "not valid JSON"), ('{"nope": 1}', "unknown field"), ('{"ch": "8"}', "bad value")):
        save_safetensors(bfl, tmp_path / "badmeta.safetensors", metadata={METADATA_KEY: text})
        with pytest.raises(UserError, match=msg):
            load_vae(tmp_path / "badmeta.safetensors")

    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="no vae/"):
        load_vae(tmp_path / "pipe")

    vae.save_pretrained(tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg | {"_class_name": "AutoencoderTiny"}))
    with pytest.raises(UserError, match="not a FLUX/SD VAE checkpoint"):
        load_vae(tmp_path / "other")
