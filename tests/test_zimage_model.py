"""rflow's Z-Image transformer against diffusers' ZImageTransformer2DModel (tiny random configs, fp32),
loaded from every checkpoint layout; shape errors; the full-size config; the layer list and pruning."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from zimage_ref import TINY, load, tiny_diffusers, to_original

from rflow.checkpoints.plan import plan_shapes
from rflow.errors import UserError
from rflow.families import zimage
from rflow.families.base import get_module
from rflow.models.zimage import ZImage, ZImageConfig

PUBLISHED_PARAMS = 6_154_908_736  # Z-Image-Turbo / Z-Image transformer (diffusers, published config.json)
# Tongyi-MAI/Z-Image-Turbo transformer/config.json
PUBLISHED_CONFIG = {
    "_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1], "all_patch_size": [2], "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512], "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16, "n_heads": 30, "n_kv_heads": 30,
    "n_layers": 30, "n_refiner_layers": 2, "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0,
}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.fixture(scope="module")
def ref():
    return tiny_diffusers()


def mixed_batch(seed: int = 1):
    """Two latents of different non-square sizes (15 and 42 patches: padded to 32 and 64 tokens) and
    captions of 5 and 37 tokens (padded to 32 and 64)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(4, 6, 10, generator=g), torch.randn(4, 14, 12, generator=g)]
    caps = [torch.randn(5, 32, generator=g), torch.randn(37, 32, generator=g)]
    return xs, torch.tensor([0.25, 0.8]), caps


@pytest.fixture(scope="module")
def ref_out(ref):
    xs, t, caps = mixed_batch()
    with torch.no_grad():
        return [o.squeeze(1) for o in ref([x.unsqueeze(1) for x in xs], t, caps, return_dict=False)[0]]


def write(layout: str, ref, tmp_path):
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if layout == "diffusers-folder":
        ref.save_pretrained(tmp_path / "transformer", safe_serialization=True)
        return tmp_path / "transformer"
    if layout == "sharded":
        ref.save_pretrained(tmp_path / "transformer", safe_serialization=True, max_shard_size="400KB")
        assert list((tmp_path / "transformer").glob("*.safetensors.index.json"))
        assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
        return tmp_path / "transformer"
    if layout == "diffusers-file":
        save_file(sd, tmp_path / "zimage.safetensors")
    else:
        prefix = {"original": "", "comfyui-model": "model.diffusion_model.", "comfyui": "diffusion_model."}[layout]
        save_file({prefix + k: v for k, v in to_original(sd).items()}, tmp_path / "zimage.safetensors")
    return tmp_path / "zimage.safetensors"


LAYOUTS = {"diffusers-folder": "diffusers", "sharded": "diffusers", "diffusers-file": "diffusers",
           "original": "original", "comfyui-model": "comfyui", "comfyui": "comfyui"}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_equals_diffusers(layout, ref, ref_out, tmp_path):
    model, found = load(write(layout, ref, tmp_path))
    assert found == LAYOUTS[layout]
    xs, t, caps = mixed_batch()
    with torch.no_grad():
        out = model(xs, t, caps)
    for o, r in zip(out, ref_out):
        assert o.shape == r.shape
        assert close(o, r)


def test_tensor_batch_equals_diffusers(ref, tmp_path):
    model, _ = load(write("original", ref, tmp_path))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 10, 6, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    for caps in ([torch.randn(n, 32, generator=g) for n in (3, 32, 40)], torch.randn(3, 7, 32, generator=g)):
        with torch.no_grad():
            r = torch.stack(ref(list(x.unsqueeze(2).unbind(0)), t, list(caps), return_dict=False)[0]).squeeze(2)
            out = model(x, t, caps)
        assert out.shape == x.shape and close(out, r)
    with torch.no_grad():  # a scalar timestep is every sample's
        assert close(model(x, 0.5, caps), model(x, torch.full((3,), 0.5), caps))


def test_config_json_overrides(tmp_path):
    """What shapes cannot tell (RoPE theta and axes, norm eps, t_scale) comes from diffusers' config.json."""
    ref = tiny_diffusers(3, rope_theta=10000.0, axes_dims=[8, 4, 4], norm_eps=1e-3, t_scale=300.0)
    model, _ = load(write("diffusers-folder", ref, tmp_path))
    c = model.config
    assert (c.rope_theta, c.axes_dims, c.norm_eps, c.t_scale) == (10000.0, (8, 4, 4), 1e-3, 300.0)
    xs, t, caps = mixed_batch(4)
    with torch.no_grad():
        r = ref([x.unsqueeze(1) for x in xs], t, caps, return_dict=False)[0]
        out = model(xs, t, caps)
    assert all(close(o, q.squeeze(1)) for o, q in zip(out, r))
    with pytest.raises(UserError, match="RoPE axes"):
        load(tmp_path / "transformer", {"axes_dims": [4, 4]})
    # rflow's own metadata (a pruned checkpoint) carries the same fields; config.json wins over it
    meta = {zimage.CONFIG_METADATA_KEY: json.dumps(c.to_dict())}
    assert zimage.overrides(meta, None)["rope_theta"] == 10000.0
    assert zimage.overrides(meta, {"rope_theta": 50.0})["rope_theta"] == 50.0
    assert zimage.summary(c)["layers_mlp"] == [170, 170]
    with pytest.raises(UserError, match="patch size 2, but the config says 4"):
        load(tmp_path / "transformer", {"all_patch_size": [4]})


def test_patch_size_from_diffusers_keys(tmp_path):
    ref = tiny_diffusers(7, all_patch_size=(4,), all_f_patch_size=(1,))
    save_file(dict(ref.state_dict()), tmp_path / "p4.safetensors")  # no config.json: the key names tell
    model, _ = load(tmp_path / "p4.safetensors")
    assert (model.config.patch_size, model.config.in_channels) == (4, 4)
    g = torch.Generator().manual_seed(8)
    xs, caps = [torch.randn(4, 8, 12, generator=g)], [torch.randn(9, 32, generator=g)]
    with torch.no_grad():
        r = ref([x.unsqueeze(1) for x in xs], torch.tensor([0.4]), caps, patch_size=4, return_dict=False)[0]
        assert close(model(xs, 0.4, caps)[0], r[0].squeeze(1))


def test_wrong_shapes_name_the_tensor(ref, tmp_path):
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}

    def fails(tensors, name, match=None):
        path = tmp_path / "bad.safetensors"
        save_file(tensors, path)
        with pytest.raises(UserError, match=match) as e:
            load(path)
        assert name in str(e.value)

    bad = dict(sd, **{"layers.1.feed_forward.w2.weight": torch.zeros(64, 100)})  # w1, w3 say 170
    fails(bad, "layers.1.feed_forward.w2.weight", "expected \\(64, 170\\)")
    fails(dict(sd, **{"noise_refiner.0.attention.to_k.weight": torch.zeros(60, 64)}), "noise_refiner.0.attention.to_k.weight")
    fails(dict(sd, **{"cap_embedder.0.weight": torch.zeros(31)}), "cap_embedder.0.weight")
    fails(dict(sd, **{"x_pad_token": torch.zeros(64)}), "x_pad_token", "2-D")
    fails({k: v for k, v in sd.items() if k != "layers.0.ffn_norm2.weight"}, "layers.0.ffn_norm2.weight", "missing")
    fails({k: v for k, v in sd.items() if k != "layers.0.attention.to_v.weight"}, "layers.0.attention.to_v.weight", "missing")
    fails(dict(sd, **{"siglip_embedder.0.weight": torch.zeros(8)}), "siglip_embedder.0.weight", "unexpected")
    orig = to_original(sd)
    qkv = "context_refiner.1.attention.qkv.weight"
    fails(dict(orig, **{qkv: torch.zeros(190, 64)}), qkv)
    fails(dict(orig, **{"t_embedder.mlp.2.weight": torch.zeros(64, 1000)}), "t_embedder.mlp.2.weight")


def test_detect():
    orig = list(to_original(tiny_diffusers().state_dict()))
    assert zimage.detect(orig) == ("original", "")
    assert zimage.detect(["diffusion_model." + k for k in orig]) == ("comfyui", "diffusion_model.")
    lumina2 = [k for k in orig if "pad_token" not in k and "adaLN_modulation.0" not in k] + ["layers.0.adaLN_modulation.1.weight"]
    assert zimage.detect(lumina2) is None
    assert zimage.detect(["double_blocks.0.img_attn.qkv.weight", "img_in.weight"]) is None
    # a leftover norm_final of some exports is ignored, as diffusers does
    assert "norm_final.weight" not in zimage.plan(orig + ["norm_final.weight"], "original", "")


def test_full_size_config_on_meta():
    with torch.device("meta"):
        ours = ZImage(zimage.Z_IMAGE)
    n = sum(p.numel() for p in ours.parameters())
    assert n == PUBLISHED_PARAMS
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        theirs = ZImageTransformer2DModel(**{k: v for k, v in PUBLISHED_CONFIG.items() if not k.startswith("_")})
    assert sum(p.numel() for p in theirs.parameters()) == PUBLISHED_PARAMS
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    plan = zimage.plan(list(shapes), "diffusers", "")
    config = zimage.infer_config(plan_shapes(plan, shapes), PUBLISHED_CONFIG, plan=plan, source_shapes=shapes)
    assert config == zimage.Z_IMAGE and zimage.family_name(config) == "z-image"
    assert zimage.n_layers(config) == 34 and len(zimage.layers(config)) == 34


def prune(sd: dict, refs, keep: dict) -> dict:
    """Slice every LayerRef's weights down to the kept units (entries outside the unit block stay)."""
    sd = dict(sd)
    for ref in refs:
        for s in ref.slices:
            t = sd[s.param]
            idx = torch.cat([torch.arange(s.offset), s.offset + keep[ref.name],
                             torch.arange(s.offset + ref.units, t.shape[s.axis])])
            sd[s.param] = t.index_select(s.axis, idx)
    return sd


def test_layers_hook_and_prune(ref, tmp_path):
    model, _ = load(write("original", ref, tmp_path))
    refs = zimage.layers(model)
    assert [(r.name, r.stream, r.layer) for r in refs] == [
        ("layers.0", "main", 0), ("layers.1", "main", 1), ("noise_refiner.0", "noise_refiner", 2),
        ("noise_refiner.1", "noise_refiner", 3), ("context_refiner.0", "context_refiner", 4),
        ("context_refiner.1", "context_refiner", 5)]
    assert all(r.kind == "swiglu" and r.units == 170 for r in refs)
    xs, t, caps = mixed_batch(5)

    seen = {}
    def hook(name):
        def record(module, inputs, output):
            seen[name] = output.shape
        return record

    hooks = [get_module(model, r.act).register_forward_hook(hook(r.name)) for r in refs]
    with torch.no_grad():
        base = model(xs, t, caps)
    for h in hooks:
        h.remove()
    assert all(seen[r.name][-1] == r.units and len(seen[r.name]) == 3 for r in refs)

    g = torch.Generator().manual_seed(6)
    keep = {r.name: torch.randperm(r.units, generator=g)[: 40 + 20 * i].sort().values for i, r in enumerate(refs)}
    sd = model.state_dict()
    zeroed = dict(sd)
    for r in refs:
        drop = torch.ones(r.units, dtype=torch.bool)
        drop[keep[r.name]] = False
        for s in r.slices[:2]:  # w1 and w3 rows
            zeroed[s.param] = sd[s.param].clone()
            zeroed[s.param][drop] = 0
    with torch.device("meta"):
        zmodel = ZImage(model.config)
    zmodel.load_state_dict(zeroed, assign=True)

    pruned_sd = prune(sd, refs, keep)
    config = zimage.infer_config({k: tuple(v.shape) for k, v in pruned_sd.items()})
    assert config.layers_mlp == [40, 60] and config.noise_refiner_mlp == [80, 100] and config.context_refiner_mlp == [120, 140]
    assert zimage.family_name(config) == "z-image-custom"
    with torch.device("meta"):
        pmodel = zimage.build(config)
    pmodel.load_state_dict(pruned_sd, assign=True, strict=True)
    with torch.no_grad():
        z, p = zmodel(xs, t, caps), pmodel(xs, t, caps)
    assert all(close(a, b) for a, b in zip(p, z))
    assert not all(close(a, b, 1e-2) for a, b in zip(p, base))  # pruning changed the output
    zimage.config_from_widths(pmodel)
    assert pmodel.config == config


def test_bad_inputs():
    model = ZImage(ZImageConfig(dim=64, n_heads=4, in_channels=4, cap_feat_dim=32, adaln_dim=64, axes_dims=(4, 6, 6),
                                layers_mlp=[8], noise_refiner_mlp=[8], context_refiner_mlp=[8]))
    with pytest.raises(ValueError, match="divisible"):
        model([torch.randn(4, 5, 6)], 0.5, [torch.randn(3, 32)])
    with pytest.raises(ValueError, match="captions"):
        model(torch.randn(2, 4, 4, 4), 0.5, [torch.randn(3, 32)])
    with pytest.raises(ValueError, match="head dim"):
        ZImageConfig(dim=64, n_heads=4, axes_dims=(32, 48, 48))
    assert TINY["dim"] == model.config.dim
    assert json.loads(json.dumps(model.config.to_dict())) == model.config.to_dict()
    assert ZImageConfig.from_dict(model.config.to_dict()) == model.config
