"""Corrupt checkpoints give one-line UserErrors naming the tensor, never a traceback; parts must fit.

Transformer checkpoints are checked when they are opened (``FluxCheckpoint``: info, load, prune, …),
VAE checkpoints in ``load_vae``, and a pipeline's parts against each other by ``check_parts_fit``.
"""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from rflow.checkpoints.fit import check_parts_fit
from rflow.checkpoints.flux import FluxCheckpoint, expected_shapes, infer_config, load_flux
from rflow.checkpoints.vae import config_metadata, load_vae
from rflow.cli import main
from rflow.errors import UserError
from rflow.models.codec import PixelUnshuffleCodec
from rflow.models.flux import Flux, FluxConfig
from rflow.models.vae import AutoEncoder, VAEConfig
from rflow.paths import DEFAULT_MODEL_DIR

HIDDEN = 64  # 2 heads of 32
# Per-block MLP widths differ, as in a pruned model.
CONFIG = FluxConfig(hidden_size=HIDDEN, num_heads=2, in_channels=16, out_channels=16, context_in_dim=32, vec_in_dim=24,
                    axes_dim=(4, 14, 14), double_mlp=[(256, 100), (37, 256)], single_mlp=[256, 21])


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in Flux(CONFIG).state_dict().items()}


def _save(tmp_path, sd, name="bad.safetensors", metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def _assert_one_line_error(capsys, path, name):
    """FluxCheckpoint, load_flux and `rflow info` all refuse ``path`` with one line naming ``name``."""
    for fn in (FluxCheckpoint, load_flux):
        with pytest.raises(UserError) as e:
            fn(path)
        msg = str(e.value)
        assert "\n" not in msg and name in msg and msg.startswith(str(path)), msg
    capsys.readouterr()
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rflow: error:") and name in lines[0], err
    assert "Traceback" not in err
    return msg


def _replace(sd, **tensors):
    out = dict(sd)
    out.update({k.replace("__", "."): v for k, v in tensors.items()})
    return out


def test_valid_checkpoints_open(tmp_path, state):
    path = _save(tmp_path, state, "ok.safetensors")
    with FluxCheckpoint(path) as ck:
        assert ck.config.double_mlp == [(256, 100), (37, 256)] and ck.config.single_mlp == [256, 21]
    model, _ = load_flux(path)
    assert model.config.single_mlp == [256, 21]
    with FluxCheckpoint(DEFAULT_MODEL_DIR / "transformer.safetensors") as ck:
        assert ck.config.hidden_size == 192 and ck.config.axes_dim == (8, 28, 28)


def test_check_is_fast_for_flux1_dev():
    """The consistency check builds the model on the meta device: cheap even at FLUX.1-dev's size."""
    shapes = expected_shapes(FluxConfig.flux1_dev())
    t0 = time.perf_counter()
    cfg = infer_config(shapes)
    assert time.perf_counter() - t0 < 1.0
    assert cfg == FluxConfig.flux1_dev()


def _corruptions(sd):
    qn = "double_blocks.0.img_attn.norm.query_norm.scale"
    return {
        "empty norm scale": (_replace(sd, **{qn: torch.ones(0)}), qn, "expected (32,) for hidden size 64 with 2 heads"),
        "qkv rows": (_replace(sd, **{"double_blocks.1.txt_attn.qkv.weight": torch.zeros(3 * HIDDEN - 5, HIDDEN)}),
                     "double_blocks.1.txt_attn.qkv.weight", "expected (192, 64)"),
        "1-D img_in": (_replace(sd, **{"img_in.weight": torch.zeros(HIDDEN)}), "img_in.weight", "expected a 2-D weight"),
        "single linear1": (_replace(sd, **{"single_blocks.1.linear1.weight": torch.zeros(3 * HIDDEN + 21, HIDDEN + 1)}),
                           "single_blocks.1.linear1.weight", "expected (213, 64)"),
        "single linear1 too short": (_replace(sd, **{"single_blocks.0.linear1.weight": torch.zeros(HIDDEN, HIDDEN),
                                                     "single_blocks.0.linear1.bias": torch.zeros(HIDDEN),
                                                     "single_blocks.0.linear2.weight": torch.zeros(HIDDEN, HIDDEN)}),
                                     "single_blocks.0.linear1.weight", "expected more than 192 rows"),
        "MLP up/down mismatch": (_replace(sd, **{"double_blocks.0.img_mlp.0.weight": torch.zeros(100, HIDDEN),
                                                 "double_blocks.0.img_mlp.0.bias": torch.zeros(100),
                                                 "double_blocks.0.img_mlp.2.weight": torch.zeros(HIDDEN, 120)}),
                                 "double_blocks.0.img_mlp.2.weight", "expected (64, 100) for hidden size 64 and MLP width 100"),
        "hidden size": (_replace(sd, **{"txt_in.weight": torch.zeros(HIDDEN + 2, 32)}), "txt_in.weight", "expected (64, 32)"),
        "zero dim": (_replace(sd, **{"vector_in.in_layer.weight": torch.zeros(HIDDEN, 0)}),
                     "vector_in.in_layer.weight", "no empty dimension"),
        "0-D tensor": (_replace(sd, **{"final_layer.linear.bias": torch.tensor(1.0)}),
                       "final_layer.linear.bias", "expected a 1-D tensor"),
        "int64 weight": (_replace(sd, **{"img_in.weight": torch.zeros(HIDDEN, 16, dtype=torch.int64)}),
                         "img_in.weight", "dtype int64"),
        "bool bias": (_replace(sd, **{"txt_in.bias": torch.zeros(HIDDEN, dtype=torch.bool)}), "txt_in.bias", "floating-point"),
        "unexpected key": (_replace(sd, **{"double_blocks.0.img_attn.extra.weight": torch.zeros(2)}),
                           "double_blocks.0.img_attn.extra.weight", "unexpected tensor"),
        "block name": (_replace(sd, **{"single_blocks.x.linear1.weight": torch.zeros(2)}),
                       "single_blocks.x.linear1.weight", "unexpected tensor"),
        "missing key": ({k: v for k, v in sd.items() if k != "single_blocks.1.linear2.bias"},
                        "single_blocks.1.linear2.bias", "missing"),
        "odd head dim": (_replace(sd, **{k: torch.ones(5) for k in sd if k.endswith("_norm.scale")}),
                         "double_blocks.0.img_attn.norm.query_norm.scale", "even head dim"),
    }


CASES = ["empty norm scale", "qkv rows", "1-D img_in", "single linear1", "single linear1 too short",
         "MLP up/down mismatch", "hidden size", "zero dim", "0-D tensor", "int64 weight", "bool bias", "unexpected key",
         "block name", "missing key", "odd head dim"]


@pytest.mark.parametrize("case", CASES)
def test_corrupt_transformer(tmp_path, capsys, state, case):
    sd, name, why = _corruptions(state)[case]
    msg = _assert_one_line_error(capsys, _save(tmp_path, sd), name)
    assert why in msg, msg


def test_corrupt_comfyui_names_the_stored_key(tmp_path, capsys, state):
    sd = {"model.diffusion_model." + k: v for k, v in state.items()}
    sd["model.diffusion_model.double_blocks.1.img_mlp.2.weight"] = torch.zeros(HIDDEN, 36)
    sd["vae.encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)  # other parts of an all-in-one file are ignored
    msg = _assert_one_line_error(capsys, _save(tmp_path, sd), "model.diffusion_model.double_blocks.1.img_mlp.2.weight")
    assert "expected (64, 37)" in msg


def test_corrupt_shipped_tiny_model(tmp_path, capsys):
    sd = load_file(str(DEFAULT_MODEL_DIR / "transformer.safetensors"))
    sd["single_blocks.2.norm.key_norm.scale"] = torch.ones(0, dtype=torch.bfloat16)
    meta = {"rflow.flux_config": '{"axes_dim": [8, 28, 28], "theta": 10000}'}
    msg = _assert_one_line_error(capsys, _save(tmp_path, sd, metadata=meta), "single_blocks.2.norm.key_norm.scale")
    assert "expected (64,) for hidden size 192 with 3 heads" in msg


@pytest.mark.parametrize("meta, why", [
    ('{"axes_dim": "abc"}', "RoPE axes"), ('{"axes_dim": [3, 14, 15]}', "RoPE axes"), ('{"theta": -1}', "theta"),
    ('{"axes_dim": [4, 14, 16]}', "sum to the head dim"), ('[1, 2]', "JSON object"),
])
def test_bad_config_metadata(tmp_path, capsys, state, meta, why):
    path = _save(tmp_path, state, metadata={"rflow.flux_config": meta})
    msg = _assert_one_line_error(capsys, path, "")
    assert why in msg, msg


def test_corrupt_diffusers_names_the_diffusers_tensor(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from flux_ref import tiny_transformer

    ref = tiny_transformer(depth=1, depth_single=1)  # hidden 64, 2 heads of 32
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    cases = {
        "transformer_blocks.0.attn.to_k.weight": (torch.zeros(63, 64), "expected (64, 64)"),
        "single_transformer_blocks.0.attn.to_q.weight": (torch.zeros(65, 64), "expected (64, 64)"),
        "single_transformer_blocks.0.proj_mlp.weight": (torch.zeros(256, 64, 1), "expected a 2-D weight"),
        "transformer_blocks.0.attn.norm_added_q.weight": (torch.ones(0), "expected (32,)"),
        "norm_out.linear.weight": (torch.zeros(127, 64), "expected (128, 64)"),
        "transformer_blocks.0.attn.unknown.weight": (torch.zeros(3), "unexpected tensor"),
    }
    for i, (name, (t, why)) in enumerate(cases.items()):
        d = tmp_path / f"t{i}"
        d.mkdir()
        _save(d, {**sd, name: t}, "diffusion_pytorch_model.safetensors")
        msg = _assert_one_line_error(capsys, d, name)
        assert why in msg, msg


# ----------------------------------------------------------------------------------------------- VAE

VAE = VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=4)


@pytest.fixture(scope="module")
def vae_state():
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in AutoEncoder(VAE).state_dict().items()}


@pytest.mark.parametrize("name, tensor, why", [
    ("decoder.conv_in.weight", torch.zeros(16, 3, 3, 3), "expected (16, 4, 3, 3)"),
    ("encoder.conv_in.weight", torch.zeros(8), "expected a 4-D"),
    ("encoder.conv_in.weight", torch.zeros(0, 3, 3, 3), "no empty dimension"),
    ("encoder.down.1.block.0.conv2.weight", torch.zeros(16, 15, 3, 3), "expected (16, 16, 3, 3)"),
    ("encoder.down.0.block.0.conv2.weight", torch.zeros(12, 8, 3, 3), "expected (8, 8, 3, 3)"),
    ("decoder.mid.attn_1.q.weight", torch.zeros(16, 16, 3, 3), "expected (16, 16, 1, 1)"),
    ("encoder.norm_out.weight", torch.zeros(16, dtype=torch.int32), "floating-point"),
])
def test_corrupt_vae(tmp_path, vae_state, name, tensor, why):
    path = tmp_path / "ae.safetensors"
    save_file({**vae_state, name: tensor}, str(path), metadata=config_metadata(VAE))
    with pytest.raises(UserError) as e:
        load_vae(path)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and why in msg and msg.startswith(str(path)), msg


def test_corrupt_diffusers_vae(tmp_path, vae_state):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    vae.save_pretrained(tmp_path / "vae")
    assert load_vae(tmp_path / "vae").config.z_channels == 4
    weights = next((tmp_path / "vae").glob("*.safetensors"))
    sd = load_file(str(weights))
    name = "decoder.up_blocks.0.resnets.1.conv1.weight"
    sd[name] = torch.zeros(16, 16, 3)
    save_file(sd, str(weights))
    with pytest.raises(UserError) as e:
        load_vae(tmp_path / "vae")
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "expected a 4-D" in msg, msg
    sd[name] = torch.zeros(16, 16, 3, 3)
    save_file(sd, str(weights))
    (tmp_path / "vae" / "config.json").write_text((tmp_path / "vae" / "config.json").read_text().replace(
        '"layers_per_block": 1', '"layers_per_block": 100000'))
    with pytest.raises(UserError, match="layers_per_block"):
        load_vae(tmp_path / "vae")


# ----------------------------------------------------------------------------------------------- parts fit


@pytest.fixture(scope="module")
def tiny():
    from rflow.world.tiny import build

    return build()


def test_parts_fit(tiny):
    check_parts_fit(tiny.transformer.config, tiny.vae, tiny.text_encoders, where="rflow-tiny")
    check_parts_fit(CONFIG, AutoEncoder(VAEConfig(ch=8, ch_mult=(1, 2), z_channels=4, norm_groups=4)), None, where="x")


def test_parts_do_not_fit(tiny):
    from rflow.world.tiny import build_text_encoders

    cfg = tiny.transformer.config
    with pytest.raises(UserError) as e:
        check_parts_fit(cfg, PixelUnshuffleCodec(factor=2), tiny.text_encoders, where="m")
    assert str(e.value) == "m: the transformer takes 192 input channels (48 latent channels), but the VAE gives 12"
    with pytest.raises(UserError, match="^m: the transformer takes 16 input channels .4 latent channels., but the VAE gives 16$"):
        check_parts_fit(CONFIG, AutoEncoder(VAEConfig(ch=8, ch_mult=(1, 2), z_channels=16, norm_groups=4)), None, where="m")
    import dataclasses

    with pytest.raises(UserError, match="gives 192 output channels .48 latent channels., but the VAE takes 12"):
        check_parts_fit(dataclasses.replace(cfg, in_channels=48), PixelUnshuffleCodec(factor=2), None, where="m")
    with pytest.raises(UserError, match="not a multiple of 4"):
        check_parts_fit(dataclasses.replace(cfg, in_channels=190), tiny.vae, None, where="m")

    wide = build_text_encoders()
    wide.t5.config.d_model = 128  # a T5 of another width (only the config is read)
    with pytest.raises(UserError, match="64-wide T5 text embeddings .context_in_dim., but the T5 encoder gives 128"):
        check_parts_fit(cfg, tiny.vae, wide, where="m")
    wide = build_text_encoders()
    wide.clip.config.hidden_size = 768
    with pytest.raises(UserError, match="64-wide pooled CLIP vectors .vec_in_dim., but the CLIP encoder gives 768"):
        check_parts_fit(cfg, tiny.vae, wide, where="m")
    # a model object works as well as its config
    check_parts_fit(tiny.transformer, tiny.vae, tiny.text_encoders, where="m")
