"""rflow's FLUX.1 transformer equals diffusers' FluxTransformer2DModel, loaded from every format."""

import pytest
import torch

from flux_ref import diffusers_inputs, save_bfl, tiny_transformer
from rflow.checkpoints.flux import FluxCheckpoint, load_flux
from rflow.errors import UserError
from rflow.models.flux import FluxConfig, Flux, pack, unpack


def _compare(ref, path, **kw):
    model, info = load_flux(path, dtype=torch.float32)
    dkw, args = diffusers_inputs(ref, **kw)
    with torch.no_grad():
        expected = ref(**dkw)[0]
        got = model(*args)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return model, info


@pytest.mark.parametrize("guidance,depth,depth_single", [(True, 2, 2), (False, 1, 3), (True, 3, 0), (True, 0, 2)])
def test_diffusers_folder_matches(tmp_path, guidance, depth, depth_single):
    ref = tiny_transformer(guidance=guidance, depth=depth, depth_single=depth_single, axes=(4, 4, 24))
    ref.save_pretrained(tmp_path / "transformer")
    _, info = _compare(ref, tmp_path / "transformer", h=3, w=5)
    assert info.format == "diffusers"
    assert info.config.guidance_embed is guidance
    assert (info.config.depth, info.config.depth_single) == (depth, depth_single)
    assert info.config.axes_dim == (4, 4, 24)  # read from config.json, not the default split


def test_sharded_diffusers_folder(tmp_path):
    ref = tiny_transformer(depth=2, depth_single=2)
    ref.save_pretrained(tmp_path / "t", max_shard_size="20KB")
    assert len(list((tmp_path / "t").glob("*.safetensors"))) > 1
    assert list((tmp_path / "t").glob("*.safetensors.index.json"))
    _compare(ref, tmp_path / "t")


@pytest.mark.parametrize("prefix,fmt", [("", "bfl"), ("model.diffusion_model.", "comfyui"), ("diffusion_model.", "comfyui")])
@pytest.mark.parametrize("guidance", [True, False])
def test_bfl_single_file_matches(tmp_path, prefix, fmt, guidance):
    ref = tiny_transformer(guidance=guidance, depth=1, depth_single=2)
    save_bfl(ref, tmp_path / "flux.safetensors", prefix=prefix)
    _, info = _compare(ref, tmp_path / "flux.safetensors", batch=1, h=2, w=7)
    assert info.format == fmt
    assert info.family == "flux1-custom"


def test_rope_axes_from_metadata(tmp_path):
    ref = tiny_transformer(axes=(8, 8, 16))
    save_bfl(ref, tmp_path / "a.safetensors", axes=(8, 8, 16))
    _compare(ref, tmp_path / "a.safetensors")
    # without the metadata the default split differs, so the outputs must differ
    save_bfl(ref, tmp_path / "b.safetensors")
    model, _ = load_flux(tmp_path / "b.safetensors", dtype=torch.float32)
    dkw, args = diffusers_inputs(ref)
    with torch.no_grad():
        assert not torch.allclose(model(*args), ref(**dkw)[0], atol=1e-3)


def test_float8_upcast_and_dtypes(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = tiny_transformer()
    save_bfl(ref, tmp_path / "f.safetensors")
    sd = load_file(str(tmp_path / "f.safetensors"))
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}, str(tmp_path / "f8.safetensors"))
    m8, info = load_flux(tmp_path / "f8.safetensors")
    assert m8.dtype == torch.bfloat16 and "float8_e4m3fn" in info.dtypes
    m32, _ = load_flux(tmp_path / "f8.safetensors", dtype=torch.float32)
    w8 = sd["img_in.weight"].to(torch.float8_e4m3fn).float()
    torch.testing.assert_close(m32.img_in.weight, w8)
    m16, _ = load_flux(tmp_path / "f.safetensors", dtype=torch.float16)
    assert m16.dtype == torch.float16
    dkw, args = diffusers_inputs(ref)
    with torch.no_grad():
        out = m16(*args)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_per_block_mlp_widths_from_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = tiny_transformer(depth=2, depth_single=2)
    save_bfl(ref, tmp_path / "f.safetensors")
    sd = load_file(str(tmp_path / "f.safetensors"))
    hidden = 64
    sd["double_blocks.1.img_mlp.0.weight"] = sd["double_blocks.1.img_mlp.0.weight"][:100]
    sd["double_blocks.1.img_mlp.0.bias"] = sd["double_blocks.1.img_mlp.0.bias"][:100]
    sd["double_blocks.1.img_mlp.2.weight"] = sd["double_blocks.1.img_mlp.2.weight"][:, :100]
    sd["single_blocks.0.linear1.weight"] = sd["single_blocks.0.linear1.weight"][: 3 * hidden + 37]
    sd["single_blocks.0.linear1.bias"] = sd["single_blocks.0.linear1.bias"][: 3 * hidden + 37]
    sd["single_blocks.0.linear2.weight"] = sd["single_blocks.0.linear2.weight"][:, : hidden + 37]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "p.safetensors"))
    with FluxCheckpoint(tmp_path / "p.safetensors") as ck:
        cfg = ck.config
    assert cfg.double_mlp == [(256, 256), (100, 256)]
    assert cfg.single_mlp == [37, 256]
    model, _ = load_flux(tmp_path / "p.safetensors", dtype=torch.float32)
    assert model.single_blocks[0].linear1.out_features == 3 * hidden + 37


def test_full_size_configs_on_meta():
    for cfg, n in ((FluxConfig.flux1_dev(), 11_901_408_320), (FluxConfig.flux1_schnell(), 11_901_408_320 - 3072 * 256 - 3072 - 3072 * 3072 - 3072)):
        with torch.device("meta"):
            m = Flux(cfg)
        assert sum(p.numel() for p in m.parameters()) == n


def test_pack_roundtrip():
    x = torch.randn(2, 16, 6, 10)
    torch.testing.assert_close(unpack(pack(x), 6, 10), x)


def test_load_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="no such file"):
        load_flux(tmp_path / "missing.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"junk")
    with pytest.raises(UserError, match="pickle"):
        load_flux(tmp_path / "x.ckpt")
    (tmp_path / "t.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(UserError, match="not a safetensors file"):
        load_flux(tmp_path / "t.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "o.safetensors"))
    with pytest.raises(UserError, match="not a FLUX.1 transformer"):
        load_flux(tmp_path / "o.safetensors")
    ref = tiny_transformer()
    save_bfl(ref, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_flux(tmp_path / "cut.safetensors")
