"""rflow's FLUX.2 transformer equals diffusers' Flux2Transformer2DModel, loaded from every layout; its
config inference, published sizes, position ids, packing and layer list (hooks, pruning by slices)."""

import re

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from safetensors.torch import save_file

from flux2_ref import Flux2KleinPipeline, inputs, load, save_bfl, tiny_transformer, to_bfl
from rflow.checkpoints.plan import plan_shapes
from rflow.errors import UserError
from rflow.families import flux2 as fam
from rflow.models.flux2 import Flux2Config, image_ids, pack, reference_ids, text_ids, unpack


def _assert_matches(ref, model, **kw):
    dkw, args = inputs(ref, **kw)
    with torch.no_grad():
        expected = ref(**dkw)[0]
        got = model(*args)
    assert got.shape == expected.shape
    err = (got - expected).abs().max() / expected.abs().max()
    assert err <= 1e-5, f"relative error {err:.2e}"


def _bfl_from_plan(ref) -> dict[str, torch.Tensor]:
    """The BFL state dict made by applying the family's diffusers plan (checked against flux2_ref.to_bfl)."""
    sd = ref.state_dict()
    plan = fam.plan(list(sd), "diffusers", "")
    out = {k: fn([sd[s] for s in srcs]) for k, (srcs, fn) in plan.items()}
    independent = to_bfl(sd)
    assert out.keys() == independent.keys()
    for k in out:
        assert torch.equal(out[k], independent[k]), k
    return out


# ---------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("guidance,depth,depth_single", [(False, 2, 2), (True, 2, 1), (False, 0, 2), (True, 1, 0)])
def test_diffusers_folder_matches(tmp_path, guidance, depth, depth_single):
    ref = tiny_transformer(guidance=guidance, depth=depth, depth_single=depth_single, axes=(2, 6, 4, 4), theta=500)
    ref.save_pretrained(tmp_path / "transformer")
    model, layout, cfg = load(tmp_path / "transformer")
    assert layout == "diffusers"
    assert cfg.guidance_embed is guidance and (cfg.depth, cfg.depth_single) == (depth, depth_single)
    assert (cfg.axes_dim, cfg.theta) == ((2, 6, 4, 4), 500)  # from config.json, not the defaults
    _assert_matches(ref, model, guidance=3.5 if guidance else None, refs=[(2, 3)])


def test_sharded_diffusers_folder(tmp_path):
    ref = tiny_transformer()
    ref.save_pretrained(tmp_path / "t", max_shard_size="20KB")
    assert len(list((tmp_path / "t").glob("*.safetensors"))) > 1 and list((tmp_path / "t").glob("*.index.json"))
    model, layout, _ = load(tmp_path / "t")
    assert layout == "diffusers"
    _assert_matches(ref, model)


def test_diffusers_single_file(tmp_path):
    ref = tiny_transformer(guidance=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "d.safetensors"))
    model, layout, cfg = load(tmp_path / "d.safetensors")
    assert layout == "diffusers" and cfg.axes_dim == (4, 4, 4, 4) and cfg.theta == 2000  # FLUX.2's defaults
    _assert_matches(ref, model, guidance=4.0, batch=1)


@pytest.mark.parametrize("prefix,layout", [("", "bfl"), ("model.diffusion_model.", "comfyui"),
                                           ("diffusion_model.", "comfyui")])
@pytest.mark.parametrize("guidance", [False, True])
def test_bfl_and_comfyui_single_file(tmp_path, prefix, layout, guidance):
    ref = tiny_transformer(guidance=guidance, depth=1, depth_single=2)
    save_bfl(_bfl_from_plan(ref), tmp_path / "f.safetensors", prefix=prefix)
    model, got_layout, cfg = load(tmp_path / "f.safetensors")
    assert got_layout == layout and fam.family_name(cfg) == "flux2-custom"
    _assert_matches(ref, model, guidance=2.5 if guidance else None, h=2, w=5)


def test_rope_from_metadata(tmp_path):
    ref = tiny_transformer(axes=(8, 4, 2, 2), theta=300)
    sd = _bfl_from_plan(ref)
    save_bfl(sd, tmp_path / "a.safetensors", config={"axes_dim": [8, 4, 2, 2], "theta": 300})
    model, _, cfg = load(tmp_path / "a.safetensors")
    assert (cfg.axes_dim, cfg.theta) == ((8, 4, 2, 2), 300)
    _assert_matches(ref, model, refs=[(2, 2)])
    # without the metadata the default split and theta differ, and so does the output
    save_bfl(sd, tmp_path / "b.safetensors")
    model, _, _ = load(tmp_path / "b.safetensors")
    dkw, args = inputs(ref, refs=[(2, 2)])
    with torch.no_grad():
        assert not torch.allclose(model(*args), ref(**dkw)[0], atol=1e-3)


def test_reference_images_and_text_positions(tmp_path):
    """Text ids, latent ids and two reference images' ids as Flux2KleinPipeline builds them."""
    ref = tiny_transformer(depth=2, depth_single=1)
    ref.save_pretrained(tmp_path / "t")
    model, _, _ = load(tmp_path / "t")
    _assert_matches(ref, model, h=3, w=2, seq=7, refs=[(2, 3), (1, 4)])


def test_guidance_model_needs_guidance(tmp_path):
    ref = tiny_transformer(guidance=True)
    save_bfl(to_bfl(ref.state_dict()), tmp_path / "g.safetensors")
    model, _, _ = load(tmp_path / "g.safetensors")
    _, args = inputs(ref)
    with pytest.raises(ValueError, match="guidance"):
        model(*args[:-1])


# ---------------------------------------------------------------------------------------------- ids, packing


def test_position_ids_and_packing_equal_the_pipeline():
    P = Flux2KleinPipeline
    lat = torch.randn(2, 8, 3, 5)
    torch.testing.assert_close(image_ids(3, 5), P._prepare_latent_ids(lat)[:1].float(), rtol=0, atol=0)
    torch.testing.assert_close(text_ids(6), P._prepare_text_ids(torch.zeros(1, 6, 4)).float(), rtol=0, atol=0)
    refs = [torch.zeros(1, 8, 2, 3), torch.zeros(1, 8, 4, 1), torch.zeros(1, 8, 1, 1)]
    torch.testing.assert_close(reference_ids([(2, 3), (4, 1), (1, 1)]), P._prepare_image_ids(refs).float(), rtol=0, atol=0)
    tokens = pack(lat)
    assert torch.equal(tokens, P._pack_latents(lat))
    assert torch.equal(unpack(tokens, 3, 5), lat)
    assert torch.equal(unpack(tokens, 3, 5), P._unpack_latents_with_ids(tokens, P._prepare_latent_ids(lat)))


# ---------------------------------------------------------------------------------------------- detection, errors


def test_detect_keeps_flux1_and_flux2_apart(tmp_path):
    from flux_ref import tiny_transformer as tiny_flux1, to_bfl as flux1_to_bfl
    from rflow.checkpoints import flux as flux1

    f1 = tiny_flux1(depth=1, depth_single=1).state_dict()
    for keys in (list(f1), list(flux1_to_bfl(f1)), ["model.diffusion_model." + k for k in flux1_to_bfl(f1)]):
        assert fam.detect(keys) is None
    f2 = tiny_transformer(depth=1, depth_single=1).state_dict()
    for keys, layout, prefix in ((list(f2), "diffusers", ""), (list(to_bfl(f2)), "bfl", ""),
                                 (["diffusion_model." + k for k in to_bfl(f2)], "comfyui", "diffusion_model.")):
        assert fam.detect(keys) == (layout, prefix)
    # FLUX.1's detect_format claims FLUX.2 keys (img_in/final_layer, x_embedder/proj_out/norm_out are
    # shared names), but FLUX.1's plan + config inference reject them: a FLUX.2 file never loads as FLUX.1.
    for sd in (f2, to_bfl(f2)):
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        with pytest.raises(UserError):
            layout, prefix = flux1.detect_format(list(sd))
            plan = flux1.diffusers_plan(list(sd)) if layout == "diffusers" else {k: ([k], None) for k in sd}
            flux1.infer_config(plan_shapes(plan, shapes), plan=plan, source_shapes=shapes)


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_wrong_shapes_name_the_tensor():
    ref = tiny_transformer(depth=2, depth_single=2)
    bfl = _shapes(to_bfl(ref.state_dict()))
    assert fam.infer_config(bfl) == Flux2Config(hidden_size=32, num_heads=2, in_channels=32, out_channels=32,
                                                context_in_dim=24, axes_dim=(4, 4, 4, 4), double_mlp=[(96, 96)] * 2,
                                                single_mlp=[96] * 2)
    for key, shape in (("single_blocks.1.linear2.weight", (32, 120)), ("double_blocks.0.txt_mlp.2.weight", (32, 95)),
                       ("double_blocks.1.img_attn.qkv.weight", (96, 31)), ("txt_in.weight", (33, 24)),
                       ("double_stream_modulation_txt.lin.weight", (190, 32)),
                       ("final_layer.adaLN_modulation.1.weight", (64,)),
                       ("single_blocks.0.norm.key_norm.scale", (8,)), ("double_blocks.0.img_mlp.0.weight", (191, 32))):
        with pytest.raises(UserError, match=re.escape(f"{key} has shape {shape}")):
            fam.infer_config({**bfl, key: shape})
    # diffusers: the separate q, k, v are checked one by one and named as the checkpoint names them
    dsd = _shapes(ref.state_dict())
    for key, shape in (("transformer_blocks.0.attn.add_k_proj.weight", (30, 32)),
                       ("single_transformer_blocks.1.attn.to_qkv_mlp_proj.weight", (290, 32)),
                       ("transformer_blocks.1.ff.linear_in.weight", (193, 32))):
        bad = {**dsd, key: shape}
        plan = fam.plan(list(bad), "diffusers", "")
        with pytest.raises(UserError, match=re.escape(f"{key} has shape {shape}")):
            fam.infer_config(plan_shapes(plan, bad), plan=plan, source_shapes=bad)


def test_missing_unexpected_and_bad_overrides():
    bfl = _shapes(to_bfl(tiny_transformer().state_dict()))
    with pytest.raises(UserError, match="missing 'single_stream_modulation.lin.weight'"):
        fam.infer_config({k: s for k, s in bfl.items() if k != "single_stream_modulation.lin.weight"})
    with pytest.raises(UserError, match="unexpected tensor 'double_blocks.0.img_mod.lin.weight'"):
        fam.infer_config({**bfl, "double_blocks.0.img_mod.lin.weight": (192, 32)})
    with pytest.raises(UserError, match="unexpected tensor 'transformer_blocks.0.attn.to_q.bias'"):
        fam.plan(list(tiny_transformer().state_dict()) + ["transformer_blocks.0.attn.to_q.bias"], "diffusers", "")
    with pytest.raises(UserError, match="missing 'transformer_blocks.1.attn.add_v_proj.weight'"):
        keys = [k for k in tiny_transformer().state_dict() if k != "transformer_blocks.1.attn.add_v_proj.weight"]
        fam.plan(keys, "diffusers", "")
    with pytest.raises(UserError, match="RoPE axes"):
        fam.infer_config(bfl, {"axes_dim": [4, 4, 4, 3]})
    with pytest.raises(UserError, match="inconsistent"):
        fam.infer_config(bfl, {"axes_dims_rope": [4, 4, 4]})  # sums to 12, head dim is 16
    with pytest.raises(UserError, match="RoPE theta"):
        fam.infer_config(bfl, {"rope_theta": -1})
    with pytest.raises(UserError, match="metadata"):
        fam.overrides({fam.CONFIG_METADATA_KEY: "[1, 2]"})


# ---------------------------------------------------------------------------------------------- published sizes


# Parameter counts of the published transformers (diffusers Flux2Transformer2DModel, same configs).
KLEIN_4B_PARAMS = 3_875_544_576
KLEIN_9B_PARAMS = 9_078_581_248
PUBLISHED = {  # transformer/config.json of black-forest-labs/FLUX.2-klein-4B and -9B (base: the same)
    "4b": dict(attention_head_dim=128, axes_dims_rope=[32, 32, 32, 32], eps=1e-6, guidance_embeds=False, in_channels=128,
               joint_attention_dim=7680, mlp_ratio=3.0, num_attention_heads=24, num_layers=5, num_single_layers=20,
               out_channels=None, patch_size=1, rope_theta=2000, timestep_guidance_channels=256),
    "9b": dict(attention_head_dim=128, axes_dims_rope=[32, 32, 32, 32], eps=1e-6, guidance_embeds=False, in_channels=128,
               joint_attention_dim=12288, mlp_ratio=3.0, num_attention_heads=32, num_layers=8, num_single_layers=24,
               out_channels=None, patch_size=1, rope_theta=2000, timestep_guidance_channels=256),
}


@pytest.mark.parametrize("size,config,count,name", [("4b", fam.KLEIN_4B, KLEIN_4B_PARAMS, "flux2-klein-4b"),
                                                    ("9b", fam.KLEIN_9B, KLEIN_9B_PARAMS, "flux2-klein-9b")])
def test_published_klein_sizes_on_meta(size, config, count, name):
    with torch.device("meta"):
        ours = fam.build(config)
        theirs = Flux2Transformer2DModel(**PUBLISHED[size])
    assert sum(p.numel() for p in ours.parameters()) == count
    assert sum(p.numel() for p in theirs.parameters()) == count
    # the published diffusers layout infers exactly this config, and gets the family's name
    shapes = _shapes(theirs.state_dict())
    plan = fam.plan(list(shapes), "diffusers", "")
    inferred = fam.infer_config(plan_shapes(plan, shapes), fam.overrides({}, PUBLISHED[size]), plan=plan,
                                source_shapes=shapes)
    assert inferred == config and fam.family_name(inferred) == name
    assert fam.infer_config(plan_shapes(plan, shapes), plan=plan, source_shapes=shapes) == config  # FLUX.2's default RoPE
    assert fam.family_name(Flux2Config(**{**config.to_dict(), "context_in_dim": 4096})) == "flux2-custom"


# ---------------------------------------------------------------------------------------------- layers, pruning


def _prune(sd, refs, keep):
    """Slice a state dict to the kept units, by LayerRef.slices alone."""
    masks = {}
    for r in refs:
        drop = torch.ones(r.units, dtype=torch.bool)
        drop[keep[r.name]] = False
        for s in r.slices:
            m = masks.setdefault((s.param, s.axis), torch.ones(sd[s.param].shape[s.axis], dtype=torch.bool))
            m[s.offset + drop.nonzero().flatten()] = False
    out = dict(sd)
    for (p, axis), m in masks.items():
        out[p] = sd[p].index_select(axis, m.nonzero().flatten())
    return out


def _zero(sd, refs, keep):
    """The dropped units' SwiGLU input rows (w1 and w3: every axis-0 slice) set to 0."""
    out = {k: v.clone() for k, v in sd.items()}
    for r in refs:
        drop = torch.ones(r.units, dtype=torch.bool)
        drop[keep[r.name]] = False
        for s in r.slices:
            if s.axis == 0:
                out[s.param][s.offset + drop.nonzero().flatten()] = 0
    return out


def _capture(model, refs, args):
    acts, hooks = {}, []
    for r in refs:
        hooks.append(model.get_submodule(r.act).register_forward_hook(lambda m, i, o, n=r.name: acts.__setitem__(n, o)))
    with torch.no_grad():
        out = model(*args)
    for h in hooks:
        h.remove()
    return out, acts


def test_layers_hook_and_prune(tmp_path):
    ref = tiny_transformer(depth=2, depth_single=2)
    sd = to_bfl(ref.state_dict())
    model, _, cfg = load(_save(tmp_path, sd))
    refs = fam.layers(model)
    assert [r.name for r in refs] == ["double_blocks.0.img", "double_blocks.0.txt", "double_blocks.1.img",
                                      "double_blocks.1.txt", "single_blocks.0", "single_blocks.1"]
    assert [(r.layer, r.stream, r.kind, r.units) for r in refs][::3] == [(0, "img", "swiglu", 96), (1, "txt", "swiglu", 96)]
    assert [(r.layer, r.stream) for r in refs][-2:] == [(2, "single"), (3, "single")]
    assert all(s.param in sd for r in refs for s in r.slices) and refs == fam.layers(cfg)

    B, h, w, seq = 2, 3, 4, 5
    _, args = inputs(ref, batch=B, h=h, w=w, seq=seq)
    out, acts = _capture(model, refs, args)
    tokens = {"img": h * w, "txt": seq, "single": seq + h * w}
    for r in refs:
        assert acts[r.name].shape == (B, tokens[r.stream], r.units)

    g = torch.Generator().manual_seed(3)
    keep = {r.name: torch.randperm(r.units, generator=g)[: 20 + 11 * i].sort().values for i, r in enumerate(refs)}
    pruned_sd = _prune(sd, refs, keep)
    zeroed = fam.build(cfg)
    zeroed.load_state_dict(_zero(sd, refs, keep))
    pruned, _, pcfg = load(_save(tmp_path, pruned_sd, "pruned.safetensors"))  # per-block widths via infer_config
    assert pcfg.double_mlp == [(20, 31), (42, 53)] and pcfg.single_mlp == [64, 75]
    assert [r.units for r in fam.layers(pruned)] == [20, 31, 42, 53, 64, 75]
    p_out, p_acts = _capture(pruned, fam.layers(pruned), args)
    z_out, z_acts = _capture(zeroed.eval(), refs, args)
    torch.testing.assert_close(p_out, z_out, rtol=1e-5, atol=1e-5 * z_out.abs().max().item())
    assert not torch.allclose(p_out, out, atol=1e-3)  # the pruning did remove something
    for r in refs:  # the kept units' activations are the zeroed model's, the dropped ones are 0
        torch.testing.assert_close(p_acts[r.name], z_acts[r.name][..., keep[r.name]], rtol=1e-5, atol=1e-5)
        dropped = torch.ones(r.units, dtype=torch.bool)
        dropped[keep[r.name]] = False
        assert z_acts[r.name][..., dropped].abs().max() == 0
    # slicing the loaded model's weights in place also works (the single-block split follows the shapes)
    with torch.no_grad():
        for k, v in pruned_sd.items():
            mod, _, p = k.rpartition(".")
            setattr(model.get_submodule(mod), p, torch.nn.Parameter(v, requires_grad=False))
    fam.config_from_widths(model)
    assert model.config.double_mlp == pcfg.double_mlp and model.config.single_mlp == pcfg.single_mlp
    with torch.no_grad():
        torch.testing.assert_close(model(*args), p_out, rtol=1e-5, atol=1e-5 * p_out.abs().max().item())


def _save(tmp_path, sd, name="m.safetensors"):
    save_bfl(sd, tmp_path / name)
    return tmp_path / name
