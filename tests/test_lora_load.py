"""Reading LoRAs: a PEFT LoRA saved by diffusers gives diffusers' latents; kohya, XLabs, BFL, PEFT and
ai-toolkit files (written here) act as merging W + scale·B·A by hand; quantized bases; fuse/unfuse;
bad files and the CLI."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import rflow
from lora_ref import (FAMILY_KEYS, H, ai_toolkit, bfl, kohya, layer_of, merged, pair, peft, tiny_flux2, tiny_zimage,
                      write, xlabs)
from pipeline_ref import SIZE, tiny_pipeline
from rflow.cli import main
from rflow.errors import UserError
from rflow.lora import (LoRAWeight, add_lora_, fuse_lora_, load_lora_, lora_parameters, parse_spec, read_lora,
                        remove_lora_, unfuse_lora_)
from rflow.models.flux import Flux, FluxConfig, image_ids, pack, text_ids, unpack

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = FluxConfig(hidden_size=H, num_heads=2, in_channels=16, out_channels=16, context_in_dim=32, vec_in_dim=24,
                     axes_dim=(4, 14, 14), double_mlp=[(4 * H, 4 * H)] * 2, single_mlp=[4 * H] * 2)
    m = Flux(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 12, 16, generator=g), image_ids(6, 8), torch.randn(2, 5, 32, generator=g), text_ids(5),
            torch.tensor([0.3, 0.8]), torch.randn(2, 24, generator=g), torch.tensor([3.5, 3.5]))


def run(m):
    with torch.no_grad():
        return m(*inputs())


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {"kohya": write(d / "kohya.safetensors", kohya(model)),
            "xlabs": write(d / "xlabs.safetensors", xlabs(model)),
            "bfl": write(d / "bfl.safetensors", bfl(model)),
            "peft": peft(model, d / "peft"),
            "ai-toolkit": write(d / "ait.safetensors", ai_toolkit(model))}


# ------------------------------------------------------------------------------------------- dialects


@pytest.mark.parametrize("dialect", ["kohya", "xlabs", "bfl", "peft", "ai-toolkit"])
def test_dialect_equals_merging_by_hand(model, files, dialect):
    path, merges = files[dialect]
    m = copy.deepcopy(model)
    base = run(m)
    name = load_lora_(m, path, scale=0.7)
    got = run(m)
    close(got, run(merged(model, merges, 0.7)))
    assert (got - base).abs().max() > 0.05  # the LoRA does something
    assert type(m.double_blocks[0].img_attn.qkv) is torch.nn.Linear  # classes stay
    remove_lora_(m, name)
    assert torch.equal(run(m), base) and set(m.state_dict()) == set(model.state_dict())


def test_dialects_detected(files):
    assert read_lora(files["kohya"][0]).dialect == "kohya"
    assert read_lora(files["xlabs"][0]).dialect == "xlabs"
    assert read_lora(files["bfl"][0]).dialect == "comfyui"
    assert read_lora(files["peft"][0]).dialect == "peft"
    assert read_lora(files["ai-toolkit"][0]).dialect == "diffusers"


def test_loras_stack_and_fuse_unfuse_exactly(model, files):
    m = copy.deepcopy(model)
    original = {k: v.clone() for k, v in m.state_dict().items()}
    scales = {"kohya": 0.5, "xlabs": 1.0, "bfl": -0.8, "peft": 0.3, "ai-toolkit": 1.2}
    ref = model
    for d, s in scales.items():
        load_lora_(m, files[d][0], scale=s, name=d)
        ref = merged(ref, files[d][1], s)
    unfused = run(m)
    close(unfused, run(ref), 2e-5)
    fuse_lora_(m)
    close(run(m), unfused, 2e-5)  # merged weights, hooks skip the fused LoRAs
    assert not torch.equal(m.double_blocks[0].img_attn.qkv.weight, original["double_blocks.0.img_attn.qkv.weight"])
    unfuse_lora_(m)
    assert torch.equal(run(m), unfused)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in original.items())
    fuse_lora_(m, ["bfl"])
    remove_lora_(m, ["bfl", "xlabs"])  # a fused LoRA is unfused before it goes
    close(run(m), run(merged(merged(merged(model, files["kohya"][1], .5), files["peft"][1], .3),
                             files["ai-toolkit"][1], 1.2)), 2e-5)
    remove_lora_(m)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in original.items()) and set(m.state_dict()) == set(original)


@pytest.mark.parametrize("fmt", ["Q8_0", "int8"])
def test_quantized_base_plus_adapter(model, files, fmt):
    from rflow.quant.api import quantize_
    from rflow.quant.linear import QuantLinear

    q = quantize_(copy.deepcopy(model), fmt)
    layer = q.double_blocks[0].img_attn.qkv
    packed = {k: v.clone() for k, v in layer.packed().items()}
    dense = copy.deepcopy(model)  # the weights the quantized layers compute with, as dense layers
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, QuantLinear):
                dense.get_submodule(name).weight.copy_(mod.dequantize_weight(torch.float32))
    for d in ("kohya", "ai-toolkit"):
        load_lora_(q, files[d][0], name=d)
        dense = merged(dense, files[d][1])
    close(run(q), run(dense), 1e-4)
    assert isinstance(layer, QuantLinear) and not hasattr(layer, "weight")  # never expanded
    assert all(torch.equal(packed[k], v) for k, v in layer.packed().items())
    with pytest.raises(UserError, match="quantized") as e:
        fuse_lora_(q)
    assert "\n" not in str(e.value)


def test_int8_compute_adds_the_sliced_update():
    from rflow.quant.linear import Int8Linear

    torch.manual_seed(0)
    dense = torch.nn.Linear(32, 96)
    q = Int8Linear.from_linear(dense, "int8")
    q.compute = "int8"
    x = torch.randn(3, 7, 32)
    base = q(x)
    A1, B1, A2, B2 = torch.randn(2, 32), torch.randn(32, 2), torch.randn(3, 32), torch.randn(64, 3)
    holder = torch.nn.Sequential(q)
    add_lora_(holder, [LoRAWeight("0", A1, B1, 0.5, 32), LoRAWeight("0", A2, B2, 2.0, 0)], name="a", scale=0.5)
    want = base.clone()
    want[..., 32:64] += 0.25 * x @ A1.T @ B1.T
    want[..., 0:64] += 1.0 * x @ A2.T @ B2.T
    close(q(x), want, 1e-4)


def test_trainable_lora_gets_gradients(model):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(9)
    ws = [LoRAWeight("double_blocks.0.img_attn.qkv", torch.randn(4, H, generator=g), torch.zeros(H, 4), offset=H),
          LoRAWeight("single_blocks.1.linear2", torch.randn(4, 5 * H, generator=g), torch.zeros(H, 4))]
    add_lora_(m, ws, name="mine", trainable=True)
    params = list(lora_parameters(m, "mine"))
    assert len(params) == 4 and all(p.requires_grad for p in params)
    close(run(m), run(model))  # B = 0: no change yet
    m(*inputs()).square().mean().backward()
    assert all(p.grad is not None for p in params) and params[1].grad.abs().sum() > 0
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)


# ------------------------------------------------------------------------------------------- bad files


def _bad(tmp_path, sd, name="bad.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def test_bad_files_are_one_line_errors(model, tmp_path):
    A, B = torch.randn(2, H), torch.randn(3 * H, 2)
    cases = {
        "no layer 'double_blocks_0_img_attn_bogus'": {"lora_unet_double_blocks_0_img_attn_bogus.lora_down.weight": A,
                                                     "lora_unet_double_blocks_0_img_attn_bogus.lora_up.weight": B},
        "no layer 'double_blocks_7_img_attn_qkv'": {"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": A,
                                                   "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": B},
        "no layer 'transformer_blocks.0.attn.norm_q'": {"transformer.transformer_blocks.0.attn.norm_q.lora_A.weight": A,
                                                       "transformer.transformer_blocks.0.attn.norm_q.lora_B.weight": B},
        "not a LoRA tensor": {"img_in.weight": A},
        "do not fit": {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(2, H + 1),
                       "double_blocks.0.img_attn.qkv.lora_B.weight": B},
        "65 rows, expected 64": {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": A,
                                 "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(65, 2)},
        "expected (rows, 2)": {"lora_unet_img_in.lora_down.weight": A, "lora_unet_img_in.lora_up.weight": torch.randn(H, 3)},
        "no up (B) tensor": {"lora_unet_img_in.lora_down.weight": A},
        "DoRA": {"lora_unet_img_in.lora_down.weight": A, "lora_unet_img_in.lora_up.weight": B,
                 "lora_unet_img_in.dora_scale": torch.ones(H)},
        "CLIP text encoder": {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": A,
                              "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": B},
        "NaN": {"img_in.lora_A.weight": torch.full((2, 16), math.nan), "img_in.lora_B.weight": torch.randn(H, 2)},
    }
    for i, (fragment, sd) in enumerate(cases.items()):
        m = copy.deepcopy(model)
        with pytest.raises(UserError) as e:
            load_lora_(m, _bad(tmp_path, sd, f"bad{i}.safetensors"))
        assert fragment in str(e.value) and "\n" not in str(e.value), (fragment, str(e.value))
        assert set(m.state_dict()) == set(model.state_dict())  # nothing was added
    torch.save({"a": A}, tmp_path / "lora.ckpt")
    torch.save({"a": A}, tmp_path / "lora.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    for name, fragment in (("lora.ckpt", "pickle"), ("lora.pt", "pickle"), ("junk.safetensors", "safetensors"),
                           ("missing.safetensors", "no such file")):
        with pytest.raises(UserError, match=fragment):
            read_lora(tmp_path / name)


def test_parse_spec():
    assert parse_spec("a.safetensors:1.5") == (Path("a.safetensors"), 1.5)
    assert parse_spec("a.safetensors") == (Path("a.safetensors"), 1.0)
    assert parse_spec("dir/x:-0.25") == (Path("dir/x"), -0.25)
    assert parse_spec("C:\\loras\\x.safetensors")[0] == Path("C:\\loras\\x.safetensors")
    with pytest.raises(UserError, match="finite"):
        parse_spec("a.safetensors:inf")


# ------------------------------------------------------------------------------------------- diffusers and the CLI


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-flux")
    tiny_pipeline().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def peft_file(flux_dir, tmp_path_factory):
    """A LoRA made with peft on diffusers' transformer, saved by FluxPipeline.save_lora_weights."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = FluxPipeline.from_pretrained(flux_dir)
    torch.manual_seed(0)
    tcfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"ff.net.2": 2}, alpha_pattern={"to_k": 2},
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                      "to_add_out", "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2",
                                      "ff_context.net.0.proj", "norm1.linear", "norm1_context.linear", "norm.linear",
                                      "norm_out.linear", "x_embedder", "context_embedder", "linear_1"])
    pipe.transformer.add_adapter(tcfg)
    out = tmp_path_factory.mktemp("peft")
    # (a CLIP LoRA would go through transformers' PEFT integration, which needs a newer peft than the test
    # extra pins; test_text_encoder_loras covers text-encoder files)
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                   transformer_lora_adapter_metadata=tcfg.to_dict())
    return out / "pytorch_lora_weights.safetensors"


def test_peft_lora_gives_diffusers_latents(flux_dir, peft_file):
    from diffusers import FluxPipeline

    w, h = SIZE
    noise = torch.randn(1, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(3))
    kw = dict(prompt="a red cat on the sky", num_inference_steps=3, guidance_scale=4.0)
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.load_lora_weights(peft_file)
    with torch.no_grad():
        expected = unpack(pipe(height=h, width=w, latents=pack(noise), output_type="latent", max_sequence_length=16,
                               **kw).images, h // 2, w // 2)
    ours = rflow.load(flux_dir, device="cpu", dtype=torch.float32)
    name = ours.load_lora(peft_file)
    assert ours.loras[name].components == ["transformer"] and ours.loras[name].dialect == "diffusers"

    def gen():
        return ours.generate(kw["prompt"], width=w, height=h, steps=3, guidance=4.0, noise=noise,
                             max_sequence_length=16, output_type="latent")

    got = gen()
    assert (got - expected).norm() / expected.norm() < 1e-4
    close(got, expected, 1e-4)
    ours.fuse_lora()
    close(gen(), got, 1e-5)
    ours.unfuse_lora()
    assert torch.equal(gen(), got)
    ours.remove_lora()
    assert (gen() - expected).norm() / expected.norm() > 1e-2  # without it: far off


def test_text_encoder_loras(flux_dir, tmp_path):
    """kohya's lora_te1_/lora_te2_ (CLIP, T5) and diffusers' text_encoder.* keys with PEFT metadata."""
    pipe = rflow.load(flux_dir, device="cpu", dtype=torch.float32)
    clip, t5 = pipe.text_encoders.clip, pipe.text_encoders.t5
    def own(name):  # the files say text_model.…, which transformers 5's CLIPTextModel no longer has
        return name if hasattr(clip, "text_model") else name.removeprefix("text_model.")

    te = [("lora_te1_", clip, [(n, own(n)) for n in ("text_model.encoder.layers.0.self_attn.q_proj",
                                                      "text_model.encoder.layers.1.mlp.fc2")]),
          ("lora_te2_", t5, [(n, n) for n in ("encoder.block.0.layer.0.SelfAttention.q",
                                              "encoder.block.1.layer.1.DenseReluDense.wo")])]
    path, merges = write(tmp_path / "kohya.safetensors", kohya(pipe.transformer, te=te))
    g = torch.Generator().manual_seed(7)
    A, B = pair(g, 2, 24, 24)
    key = "text_encoder.text_model.encoder.layers.1.self_attn.k_proj"
    meta = {"lora_adapter_metadata": json.dumps({"text_encoder.r": 2, "text_encoder.lora_alpha": 3})}
    save_file({f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}, str(tmp_path / "te.safetensors"), metadata=meta)
    merges.append((clip, own("text_model.encoder.layers.1.self_attn.k_proj"), A, B, 1.5))
    ids = torch.tensor([[0, 3, 4, 5, 1]])
    refs = {}
    for m in (clip, t5):
        r = copy.deepcopy(m)
        with torch.no_grad():
            for _, name, A, B, s in [x for x in merges if x[0] is m]:
                r.get_submodule(name).weight += s * B @ A
        refs[id(m)] = r
    with torch.no_grad():
        before = clip(ids).pooler_output
        pipe.load_lora(path)
        pipe.load_lora(tmp_path / "te.safetensors")
        assert [x.components for x in pipe.loras.values()] == [["transformer", "clip", "t5"], ["clip"]]
        close(clip(ids).pooler_output, refs[id(clip)](ids).pooler_output)
        close(t5(ids)[0], refs[id(t5)](ids)[0])
        assert (clip(ids).pooler_output - before).abs().max() > 1e-3


def test_cli_lora(capsys, flux_dir, tmp_path):
    pipe = rflow.load(flux_dir, device="cpu")
    k, _ = write(tmp_path / "k.safetensors", kohya(pipe.transformer))
    x, _ = write(tmp_path / "x.safetensors", xlabs(pipe.transformer))
    bad = _bad(tmp_path, {"lora_unet_nothing.lora_down.weight": torch.ones(2, H),
                          "lora_unet_nothing.lora_up.weight": torch.ones(H, 2)})
    w, h = SIZE
    args = ["generate", "a red cat", "--model", str(flux_dir), "--size", f"{w}x{h}", "--steps", "2"]
    for lora, fragment in ((bad, "nothing"), (tmp_path / "none.safetensors", "no such file")):
        assert main(args + ["-o", str(tmp_path / "bad.png"), "--lora", str(lora)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rflow: error: ") and fragment in err[0], err
    out = tmp_path / "lora.png"
    assert main(args + ["-o", str(out), "--lora", f"{k}:0.5", "--lora", str(x)]) == 0, capsys.readouterr().err
    im = Image.open(out)
    meta = json.loads(im.text["rflow"])
    assert [(d["name"], d["scale"]) for d in meta["loras"]] == [("k", 0.5), ("x", 1.0)]
    assert 'Lora hashes: "k: ' in im.text["parameters"]
    pipe.load_lora(k, 0.5)
    pipe.load_lora(x)
    want = pipe.generate("a red cat", width=w, height=h, steps=2, output_type="np")[0]
    assert (np.abs(want.astype(int) - np.asarray(im.convert("RGB")).astype(int)) <= 1).all()


# ------------------------------------------------------------------------------------------- FLUX.2, Z-Image


@pytest.mark.parametrize("family", ["flux2", "zimage"])
def test_other_families_native_formats(family, tmp_path):
    model = {"flux2": tiny_flux2, "zimage": tiny_zimage}[family]()
    g, sd, merges = torch.Generator().manual_seed(11), {}, []
    for key, layer, row, rows, swapped in FAMILY_KEYS[family]:
        lin = layer_of(model, layer)
        A, B = pair(g, 3, lin.in_features, rows or lin.out_features)
        down, up = ("lora_down", "lora_up") if key.startswith("lora_unet_") else ("lora_A", "lora_B")
        sd[f"{key}.{down}.weight"], sd[f"{key}.{up}.weight"], sd[f"{key}.alpha"] = A, B, torch.tensor(1.5)
        merges.append((layer, row, A, torch.cat([B[B.shape[0] // 2:], B[: B.shape[0] // 2]]) if swapped else B, 0.5))
    path, _ = write(tmp_path / f"{family}.safetensors", (sd, []))
    ref = merged(model, merges)
    load_lora_(model, path)
    for layer, *_ in merges:
        x = torch.randn(3, layer_of(model, layer).in_features)
        with torch.no_grad():
            close(layer_of(model, layer)(x), layer_of(ref, layer)(x))


@pytest.mark.parametrize("order", ["lora-then-offload", "offload-then-lora"])
def test_offloaded_base(model, files, order):
    from rflow.runtime.offload import offload_

    m = copy.deepcopy(model)
    path, merges = files["kohya"]
    if order == "lora-then-offload":
        load_lora_(m, path)
    offload_(m, mode="blocks", device="cpu", prefetch=1)
    if order == "offload-then-lora":
        load_lora_(m, path)
    close(run(m), run(merged(model, merges)))
    offload_(m, mode="none", device="cpu")
