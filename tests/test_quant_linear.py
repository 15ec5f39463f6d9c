"""Quantized linear layers (int8, fp8, GGUF blocks) and the ``quantize_`` verb on tiny FLUX.1 and Z-Image models.

What is proved: a QuantLinear on the dequant path is exactly ``F.linear`` of its dequantized weight; the
int8/fp8 round trips stay within their documented bounds; W8A8's int32 reference is exact integer
arithmetic and close to the dequant path; packed buffers survive a safetensors round trip bit for bit;
``quantize_`` follows the first matching glob, leaves the family's high-precision layers and "keep"
entries alone, frees the dense weights, refuses bad plans in one line without touching the model, and
gives generations close to the dense model's — pruned models included. GGUF cases run once
``rflow.quant.gguf_codecs`` exists; CUDA-only paths run where a GPU is.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rflow.checkpoints.loader import load_transformer
from rflow.errors import UserError
from rflow.families.base import Guidance, guided
from rflow.quant import formats
from rflow.quant.api import linear_layers, plan_summary, quantize_, resolve_plan
from rflow.quant.linear import (Fp8Linear, GGUFLinear, Int8Linear, QuantLinear, int8_linear, int_matmul,
                                quant_layers, quantize_rows_int8, set_compute)
from rflow.sampling import get_sigmas, sample

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_GGUF = importlib.util.find_spec("rflow.quant.gguf_codecs") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="rflow.quant.gguf_codecs is not there yet")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                   reason="needs a CUDA GPU of compute capability >= 8.9")

GGUF_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
ALL_FORMATS = ["int8", "fp8"] + [pytest.param(q, marks=needs_gguf) for q in GGUF_TYPES]
W8A8_RTOL = 0.015  # W8A8 vs dequant on O(1) Gaussian activations: relative RMS of the difference (measured ≈ 0.007)


def gguf():
    from rflow.quant import gguf_codecs

    return gguf_codecs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def reference_dequant(layer: QuantLinear, dtype) -> torch.Tensor:
    """The weight from the format's own dequantizer, not through the module."""
    if isinstance(layer, Int8Linear):
        return formats.dequantize_int8(layer.qweight, layer.scale, dtype)
    if isinstance(layer, Fp8Linear):
        return formats.dequantize_fp8(layer.qweight, layer.scale, dtype)
    return gguf().dequantize(layer.qweight, layer.qtype, (layer.out_features, layer.in_features), dtype)


def packed_size(fmt: str, shape) -> int:
    return formats.packed_nbytes(shape, fmt) if fmt in ("int8", "fp8") else gguf().packed_nbytes(shape, fmt)


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_round_trip_error_within_the_documented_bound(fmt):
    torch.manual_seed(0)
    w = torch.randn(3072, 3072)
    q, s = (formats.quantize_int8 if fmt == "int8" else formats.quantize_fp8)(w)
    deq = (formats.dequantize_int8 if fmt == "int8" else formats.dequantize_fp8)(q, s)
    err = rel(deq, w)
    bound = formats.ROUND_TRIP_RMS[fmt]
    assert 0.9 * bound < err <= bound, err  # the documented bound is the measured error, rounded up
    qmax = formats.INT8_MAX if fmt == "int8" else formats.FP8_MAX
    assert q.dtype == (torch.int8 if fmt == "int8" else formats.FP8_DTYPE) and s.dtype == torch.float32
    assert s.shape == (3072,)
    torch.testing.assert_close(s, w.abs().amax(1) / qmax, rtol=0, atol=0)
    assert torch.equal(q.float().abs().amax(1), torch.full((3072,), float(qmax)))  # each row's absmax hits the top code


def test_int8_rounds_half_to_even_and_zero_rows_stay_zero():
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5], [0, 0, 0, 0, 0, 0]])
    q, s = formats.quantize_int8(w)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2], [0, 0, 0, 0, 0, 0]]
    assert s.tolist() == [1.0, 0.0]
    assert torch.equal(formats.dequantize_int8(q, s), torch.tensor([[127.0, 0, 2, 2, 0, -2], [0] * 6]))
    q8, s8 = formats.quantize_fp8(w)
    assert torch.equal(formats.dequantize_fp8(q8, s8)[1], torch.zeros(6))


def test_fp8_dequantize_takes_a_tensor_or_row_scale():
    torch.manual_seed(1)
    q = (torch.randn(6, 8) * 40).to(formats.FP8_DTYPE)
    rows = torch.rand(6) + 0.5
    assert torch.equal(formats.dequantize_fp8(q, torch.tensor(0.25)), q.float() * 0.25)
    assert torch.equal(formats.dequantize_fp8(q, torch.tensor([0.25])), q.float() * 0.25)
    assert torch.equal(formats.dequantize_fp8(q, rows, torch.bfloat16), (q.float() * rows[:, None]).bfloat16())
    with pytest.raises(ValueError, match="scale of shape"):
        formats.dequantize_fp8(q, torch.ones(8))


# ---------------------------------------------------------------------------------------------- modules


def random_linear(in_f=256, out_f=48, bias=True, seed=0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, in_f**-0.5)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_dequant_path_is_plain_linear_of_the_dequantized_weight(fmt, dtype):
    lin = random_linear(dtype=dtype)
    layer = QuantLinear.from_linear(lin, fmt)
    assert layer.format == fmt and layer.compute == "dequant"
    assert (layer.in_features, layer.out_features) == (256, 48)
    assert [n for n, _ in layer.named_parameters()] == ["bias"] and layer.bias.dtype == dtype
    assert "qweight" in dict(layer.named_buffers())
    want = {"int8": torch.int8, "fp8": formats.FP8_DTYPE}.get(fmt, torch.uint8)
    assert layer.qweight.dtype == want
    assert layer.weight_nbytes() == packed_size(fmt, (48, 256))

    x = torch.randn(2, 5, 256).to(dtype)
    with torch.no_grad():
        got = layer(x)
        want_out = F.linear(x, reference_dequant(layer, dtype), lin.bias)
    assert got.dtype == dtype and torch.equal(got, want_out)
    assert torch.equal(layer.dequantize_weight(), reference_dequant(layer, dtype))  # the dense weight's dtype by default
    # a coarse sanity check of the codes themselves: the dequantized weight is near the original
    assert rel(layer.dequantize_weight(torch.float32), lin.weight.float()) < 0.6


def test_a_layer_without_bias_and_odd_widths():
    lin = random_linear(37, 13, bias=False)
    for fmt in ("int8", "fp8"):
        layer = QuantLinear.from_linear(lin, fmt)
        assert layer.bias is None
        x = torch.randn(3, 37)
        assert torch.equal(layer(x), F.linear(x, reference_dequant(layer, x.dtype)))


def test_int_matmul_is_exact_integer_arithmetic():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 300), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (21, 300), generator=g, dtype=torch.int8)
    out = int_matmul(a, w)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), a.long() @ w.long().t())


def test_w8a8_reference_path_matches_its_formula_and_is_close_to_dequant():
    lin = random_linear(256, 48)
    layer = Int8Linear.from_linear(lin, "int8")
    x = torch.randn(2, 9, 256)
    with torch.no_grad():
        deq = layer(x)
        layer.compute = "int8"
        w8a8 = layer(x)
    assert w8a8.shape == deq.shape and w8a8.dtype == x.dtype
    xq, xs = quantize_rows_int8(x.reshape(-1, 256))
    formula = (xq.double() @ layer.qweight.double().t()) * xs.double() * layer.scale.double() + lin.bias.double()
    torch.testing.assert_close(w8a8.reshape(-1, 48).double(), formula, rtol=1e-6, atol=1e-6)
    err = rel(w8a8, deq)
    assert 0 < err <= W8A8_RTOL, err


def test_compile_traces_without_graph_breaks():
    x = torch.randn(3, 5, 40)
    x256 = torch.randn(3, 5, 256)
    cases = [("int8", "int8", x), ("int8", "dequant", x), ("fp8", "dequant", x)]
    cases += [("Q8_0", "dequant", x256), ("Q4_K", "dequant", x256)] if HAS_GGUF else []
    for fmt, mode, x in cases:
        layer = QuantLinear.from_linear(random_linear(x.shape[-1], 24), fmt)
        layer.compute = mode
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        with torch.no_grad():
            assert torch.equal(compiled(x), layer(x)), (fmt, mode)


def test_compute_modes_and_their_errors():
    model = nn.Sequential(random_linear(64, 32), nn.GELU(), random_linear(32, 64, seed=1), random_linear(64, 16, seed=2))
    quantize_(model, {"0": "int8", "2": "fp8", "3": "keep"})
    assert isinstance(model[0], Int8Linear) and isinstance(model[2], Fp8Linear) and type(model[3]) is nn.Linear
    set_compute(model, "auto")
    assert model[0].compute == "dequant" and model[2].compute == "dequant"  # CPU: dequant everywhere
    set_compute(model, "int8")
    assert model[0].compute == "int8" and model[2].compute == "dequant"  # only layers that have the mode take it
    with pytest.raises(UserError, match="compute capability") as e:
        set_compute(model, "fp8")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="unknown compute mode 'fast'"):
        set_compute(model, "fast")
    with pytest.raises(UserError, match="cannot compute 'fp8'"):
        model[0].compute = "fp8"
    model[2].compute = "fp8"
    with pytest.raises(UserError, match="fp8 compute needs a CUDA GPU"):
        model(torch.randn(2, 64))


def test_to_dtype_moves_the_bias_but_never_the_packed_codes():
    model = nn.Sequential(random_linear(64, 32), random_linear(32, 16, seed=1))
    quantize_(model, {"0": "int8", "1": "fp8"})
    packed = {k: v.clone() for k, v in model.state_dict().items() if "bias" not in k}
    model.to(torch.bfloat16)
    assert model[0].bias.dtype == torch.bfloat16 and model[1].bias.dtype == torch.bfloat16
    assert model[0].dequantize_weight().dtype == torch.bfloat16  # the default dtype follows the model
    for k, v in model.state_dict().items():
        if k in packed:
            assert v.dtype == packed[k].dtype and torch.equal(v.view(torch.uint8), packed[k].view(torch.uint8)), k
    out = model(torch.randn(3, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_fp8_checkpoint_weight_with_one_scale():
    torch.manual_seed(2)
    q = (torch.randn(16, 32) * 100).clamp(-448, 448).to(formats.FP8_DTYPE)
    layer = Fp8Linear.from_fp8(q, torch.tensor([0.01]), torch.zeros(16), dtype=torch.float32)
    assert layer.per_tensor and layer.scale.shape == ()
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), F.linear(x, q.float() * 0.01, torch.zeros(16)))
    # a per-row layer adopts a per-tensor scale from a state dict
    fresh = QuantLinear.empty("fp8", 32, 16, dtype=torch.float32)
    assert fresh.scale.shape == (16,)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.per_tensor and torch.equal(fresh(x), layer(x))


# ---------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from flux_ref import tiny_transformer

    d = tmp_path_factory.mktemp("quant") / "flux"
    tiny_transformer().save_pretrained(d)  # hidden 64, MLP 256, 2 double + 2 single blocks
    return d


@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory):
    from zimage_ref import tiny_diffusers

    d = tmp_path_factory.mktemp("quant") / "zimage"
    tiny_diffusers(seed=3).save_pretrained(d)  # dim 64, SwiGLU width 170
    return d


def load(path):
    return load_transformer(path, dtype=torch.float32)[0]


def flux_generate(model, seed=0, device="cpu"):
    from rflow.families import flux1

    g = torch.Generator().manual_seed(seed)
    cond = flux1.Cond(torch.randn(2, 5, 32, generator=g), torch.randn(2, 24, generator=g), 3.5)
    noise = torch.randn(2, 4, 8, 8, generator=g).to(device)
    return sample(guided(flux1.Denoiser(model), cond, None, Guidance()), noise, get_sigmas(4, schedule="none"))


def zimage_generate(model, seed=0):
    from rflow.families import zimage

    g = torch.Generator().manual_seed(seed)
    cond = zimage.Cond([torch.randn(5, 32, generator=g), torch.randn(9, 32, generator=g)])
    noise = torch.randn(2, 4, 8, 12, generator=g)
    return sample(guided(zimage.Denoiser(model), cond, None, Guidance()), noise, get_sigmas(4, schedule="static", shift=3.0))


def resident_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


FLUX_HIGH_PRECISION = ["img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
                       "guidance_in.in_layer", "guidance_in.out_layer", "txt_in", "final_layer.linear",
                       "final_layer.adaLN_modulation.1"]


def test_linear_layers_leave_out_the_family_high_precision_ones(flux_dir, zimage_dir):
    flux = load(flux_dir)
    names = linear_layers(flux)
    every = [n for n, m in flux.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(set(every) - set(names)) == sorted(FLUX_HIGH_PRECISION)
    assert names == [n for n in every if n in names]  # model order
    assert names[0] == "double_blocks.0.img_mod.lin" and names[-1] == "single_blocks.1.modulation.lin"
    zi = load(zimage_dir)
    names = linear_layers(zi)
    assert not any(n.startswith(("x_embedder", "cap_embedder", "t_embedder", "final_layer")) for n in names)
    assert names[0].startswith("noise_refiner.0.") and "layers.1.feed_forward.w2" in names


def flux_plan():
    plan = {"double_blocks.0.img_mlp.0": "keep",  # first match wins: stays dense despite the glob below
            "double_blocks.*.img_mlp.*": "Q8_0" if HAS_GGUF else "fp8",
            "single_blocks.*.linear1": "fp8",
            "double_blocks.1.txt_attn.proj": "bf16",
            "*": "int8"}
    if HAS_GGUF:
        plan = {"double_blocks.1.img_mlp.2": "q4_k", **plan}  # in_features 256: a K-quant fits (any case)
    return plan


def expected_format(name: str) -> str:
    if name == "double_blocks.0.img_mlp.0" or name == "double_blocks.1.txt_attn.proj":
        return "keep"
    if HAS_GGUF and name == "double_blocks.1.img_mlp.2":
        return "Q4_K"
    if name.startswith("double_blocks.") and ".img_mlp." in name:
        return "Q8_0" if HAS_GGUF else "fp8"
    if name.endswith(".linear1"):
        return "fp8"
    return "int8"


def test_quantize_flux_with_globs_mixed_formats_and_keep(flux_dir):
    dense = load(flux_dir)
    model = load(flux_dir)
    eligible = linear_layers(model)
    before = resident_bytes(model)
    dense_weight_bytes = {n: model.get_submodule(n).weight.nbytes for n in eligible}
    weak = weakref.ref(model.double_blocks[0].img_attn.qkv.weight)

    assert quantize_(model, flux_plan()) is model
    gc.collect()
    assert weak() is None  # the dense weight is gone, not just hidden

    quantized = quant_layers(model)
    for name in eligible:
        layer, fmt = model.get_submodule(name), expected_format(name)
        if fmt == "keep":
            assert type(layer) is nn.Linear, name
        else:
            assert isinstance(layer, QuantLinear) and layer.format == fmt, (name, type(layer))
            assert f"{name}.weight" not in dict(model.named_parameters())
            assert layer.bias is not None and layer.bias.dtype == torch.float32
    for name in FLUX_HIGH_PRECISION:
        assert type(model.get_submodule(name)) is nn.Linear
    assert linear_layers(model) == ["double_blocks.0.img_mlp.0", "double_blocks.1.txt_attn.proj"]

    # resident bytes: the packed sizes plus whatever stayed a parameter, and exactly the dense weights' bytes less
    packed = sum(m.weight_nbytes() for m in quantized.values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert resident_bytes(model) == packed + params
    assert resident_bytes(model) == before - sum(dense_weight_bytes[n] for n in quantized) + packed
    assert all(m.weight_nbytes() == packed_size(m.format, (m.out_features, m.in_features)) for m in quantized.values())

    summary = plan_summary(model)
    assert list(summary["layers"]) == eligible
    assert summary["layers"]["double_blocks.0.img_mlp.0"]["format"] == "fp32"
    assert summary["layers"]["single_blocks.0.linear1"]["format"] == "fp8"
    assert summary["bytes"] == sum(quantized[n].weight_nbytes() if n in quantized else dense_weight_bytes[n] for n in eligible)
    assert summary["bf16_bytes"] == sum(dense_weight_bytes[n] // 2 for n in eligible)
    assert summary["model_bytes"] == resident_bytes(model) and summary["model_bf16_bytes"] == before // 2

    with torch.no_grad():
        ref, got = flux_generate(dense), flux_generate(model)
    assert bool(torch.isfinite(got).all())
    assert 0 < rel(got, ref) < 0.05  # mixed int8 / fp8 layers


@pytest.mark.parametrize("fmt, compute, tol", [("int8", "dequant", 0.015), ("int8", "int8", 0.02),
                                               ("fp8", "dequant", 0.05),
                                               pytest.param("Q8_0", "dequant", 0.015, marks=needs_gguf)])
def test_generation_close_to_the_dense_model(flux_dir, fmt, compute, tol):
    dense = load(flux_dir)
    model = quantize_(load(flux_dir), {"*": fmt}, compute=compute)
    assert all(m.compute == compute for m in quant_layers(model).values())
    with torch.no_grad():
        ref, got = flux_generate(dense), flux_generate(model)
    assert bool(torch.isfinite(got).all())
    assert 0 < rel(got, ref) < tol, rel(got, ref)


def test_quantize_zimage(zimage_dir):
    dense = load(zimage_dir)
    model = load(zimage_dir)
    plan = {"layers.0.*": "keep", **({"*.adaLN_modulation.0": "Q8_0"} if HAS_GGUF else {}),  # in_features 64
            "*.attention.*": "fp8", "*.feed_forward.w[13]": "int8", "*": "int8"}
    quantize_(model, plan)
    for name in linear_layers(dense):
        layer = model.get_submodule(name)
        if name.startswith("layers.0."):
            assert type(layer) is nn.Linear, name
        elif HAS_GGUF and name.endswith("adaLN_modulation.0"):
            assert isinstance(layer, GGUFLinear) and layer.format == "Q8_0"
        elif ".attention." in name:
            assert isinstance(layer, Fp8Linear), name
        else:
            assert isinstance(layer, Int8Linear), name
    for name in ("x_embedder", "cap_embedder.1", "t_embedder.mlp.0", "final_layer.linear"):
        assert type(model.get_submodule(name)) is nn.Linear
    packed = sum(m.weight_nbytes() for m in quant_layers(model).values())
    assert resident_bytes(model) == packed + sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        ref, got = zimage_generate(dense), zimage_generate(model)
    # this random tiny Z-Image amplifies weight error about 4× (the noise refiner most): see below for int8
    assert bool(torch.isfinite(got).all()) and 0 < rel(got, ref) < 0.12, rel(got, ref)


def test_zimage_int8_error_is_that_of_a_random_perturbation_of_the_same_size(zimage_dir):
    dense = load(zimage_dir)
    perturbed = load(zimage_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in linear_layers(perturbed):
            w = perturbed.get_submodule(name).weight
            w.add_(torch.randn(w.shape, generator=g) * w.pow(2).mean().sqrt() * formats.ROUND_TRIP_RMS["int8"])
        ref = zimage_generate(dense)
        floor = rel(zimage_generate(perturbed), ref)  # ≈ 0.04 for this model
        got = zimage_generate(quantize_(load(zimage_dir), "int8"))
    assert bool(torch.isfinite(got).all()) and 0 < rel(got, ref) < 1.5 * floor, (rel(got, ref), floor)


def test_state_dict_round_trip_through_safetensors(flux_dir, tmp_path):
    model = quantize_(load(flux_dir), flux_plan())
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "q.safetensors"))

    other = quantize_(load(flux_dir), flux_plan())  # same layout, to load into
    with torch.no_grad():
        for m in quant_layers(other).values():
            for t in m.packed().values():
                t.zero_()
    loaded = load_file(str(tmp_path / "q.safetensors"))
    other.load_state_dict(loaded, strict=True)
    got = other.state_dict()
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k  # bit-exact, float8 included
    assert any(v.dtype == formats.FP8_DTYPE for v in loaded.values()) and any(v.dtype == torch.int8 for v in loaded.values())
    with torch.no_grad():
        assert torch.equal(flux_generate(other), flux_generate(model))


def test_empty_layers_load_a_saved_layer(tmp_path):
    formats_here = ["int8", "fp8"] + (["Q8_0"] if HAS_GGUF else [])
    x = torch.randn(3, 64)
    for fmt in formats_here:
        layer = QuantLinear.from_linear(random_linear(64, 24), fmt)
        save_file(layer.state_dict(), str(tmp_path / f"{fmt}.safetensors"))
        fresh = QuantLinear.empty(fmt, 64, 24, dtype=torch.float32)
        assert type(fresh) is type(layer)
        fresh.load_state_dict(load_file(str(tmp_path / f"{fmt}.safetensors")))
        assert torch.equal(fresh(x), layer(x)), fmt


PLAN_ERRORS = [
    ({"double_blocks.*.img_mpl.0": "int8"}, "pattern 'double_blocks.*.img_mpl.0' matches no linear layer"),
    ({"*": "int4"}, "unknown quantization format 'int4'"),
    ({"img_in": "int8"}, "keeps in high precision (img_in)"),
    ({"final_layer.*": "fp8", "*": "int8"}, "keeps in high precision (final_layer.linear)"),
    ({}, "non-empty"),
    ("nope", "unknown quantization format 'nope'"),
    pytest.param({"double_blocks.0.img_attn.qkv": "Q4_K"},
                 "double_blocks.0.img_attn.qkv: Q4_K needs an input width that is a multiple of 256, and this layer's is 64",
                 marks=needs_gguf),
    pytest.param({"*": "Q5_K"}, "double_blocks.0.img_mod.lin: Q5_K needs an input width that is a multiple of 256",
                 marks=needs_gguf),
]


@pytest.mark.parametrize("plan, fragment", PLAN_ERRORS)
def test_bad_plans_are_one_line_and_change_nothing(flux_dir, plan, fragment):
    model = load(flux_dir)
    with pytest.raises(UserError) as e:
        quantize_(model, plan)
    msg = str(e.value)
    assert "\n" not in msg and fragment in msg, msg
    assert not quant_layers(model)


def test_more_one_line_errors(flux_dir, zimage_dir):
    model = load(flux_dir)
    with pytest.raises(UserError, match="unknown compute mode 'fast'"):
        quantize_(model, "int8", compute="fast")
    with pytest.raises(UserError, match="compute='fp8' needs a CUDA GPU") as e:
        quantize_(model, "fp8", compute="fp8")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="compute='int8' needs int8 layers"):
        quantize_(model, "fp8", compute="int8")
    assert not quant_layers(model)
    quantize_(model, {"double_blocks.0.*": "int8"})
    with pytest.raises(UserError, match="already quantized"):
        quantize_(model, {"double_blocks.0.img_attn.*": "int8"})
    quantize_(model, {"img_in": "keep", "single_blocks.*": "int8"})  # keeping a high-precision layer is fine
    if HAS_GGUF:
        zi = load(zimage_dir)
        with pytest.raises(UserError) as e:
            quantize_(zi, {"*.feed_forward.w2": "Q8_0"})
        assert str(e.value) == ("noise_refiner.0.feed_forward.w2: Q8_0 needs an input width that is a multiple of 32, "
                                "and this layer's is 170")


def test_quantize_after_pruning(flux_dir):
    from rflow.compress.prune import prune_model
    from rflow.compress.units import unit_widths

    dense = load(flux_dir)
    g = torch.Generator().manual_seed(5)
    kept = {u: torch.randperm(w, generator=g)[: 37 + 10 * i].sort().values for i, (u, w) in
            enumerate(unit_widths(dense.config).items())}
    pruned = prune_model(dense, kept)
    model = copy.deepcopy(pruned)
    plan = {"*": "int8"}
    if HAS_GGUF:
        plan = {"double_blocks.*.img_mlp.0": "Q8_0", **plan}  # input width 64 is still a block multiple
    quantize_(model, plan, compute="int8")
    assert model.double_blocks[0].img_mlp[2].in_features == 37 and model.single_blocks[1].linear2.in_features == 64 + 87
    assert resolve_plan(pruned, plan)  # the same plan is valid for the dense pruned model
    with torch.no_grad():
        ref, got = flux_generate(pruned), flux_generate(model)
    assert bool(torch.isfinite(got).all()) and 0 < rel(got, ref) < 0.03, rel(got, ref)


# ---------------------------------------------------------------------------------------------- CUDA


@needs_cuda
def test_int8_kernel_on_cuda_equals_the_cpu_reference():
    for m, k, n in ((3, 40, 30), (17, 64, 48), (40, 256, 8)):  # padded rows, padded widths, none
        lin = random_linear(k, n)
        layer = Int8Linear.from_linear(lin, "int8")
        x = torch.randn(m, k)
        cpu = int8_linear(x, layer.qweight, layer.scale, layer.bias)
        layer = layer.cuda()
        layer.compute = "int8"
        gpu = layer(x.cuda())
        xq, _ = quantize_rows_int8(x.cuda())
        assert torch.equal(int_matmul(xq, layer.qweight).cpu(), int_matmul(xq.cpu(), layer.qweight.cpu()))
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_quantize_on_cuda_keeps_the_device_and_auto_picks_kernels(flux_dir):
    model = load(flux_dir).cuda()
    quantize_(model, {"single_blocks.*": "fp8", "*": "int8"}, compute="auto")
    cap = torch.cuda.get_device_capability()
    for m in quant_layers(model).values():
        assert m.qweight.device.type == "cuda"
        if isinstance(m, Int8Linear):
            assert m.compute == ("int8" if cap >= (8, 0) else "dequant")
        else:
            assert m.compute == ("fp8" if cap >= (8, 9) else "dequant")
    dense = load(flux_dir).cuda()
    with torch.no_grad():
        ref, got = flux_generate(dense, device="cuda"), flux_generate(model, device="cuda")
    assert bool(torch.isfinite(got).all()) and rel(got, ref) < 0.06


@needs_fp8_gpu
def test_fp8_scaled_mm_close_to_dequant():
    for m, k, n, per_tensor in ((3, 40, 30, False), (64, 256, 48, False), (5, 64, 32, True)):
        layer = Fp8Linear.from_linear(random_linear(k, n, dtype=torch.bfloat16), "fp8")
        if per_tensor:
            layer = Fp8Linear.from_fp8(layer.qweight, layer.scale.max(), layer.bias, dtype=torch.bfloat16)
        layer = layer.cuda()
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        deq = layer(x)
        layer.compute = "fp8"
        got = layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        assert rel(got.float(), deq.float()) < 0.06


@needs_gguf
def test_kquant_fallback_follows_llama_cpp(flux_dir):
    """With fallback=True a K-quant layer whose input width 256 does not divide takes llama.cpp's fallback
    type (Q6_K→Q8_0, Q5_K→Q5_1, Q4_K→Q5_0, Q3_K/Q2_K→Q4_0); layers it fits keep the K-quant."""
    from rflow.quant.api import FALLBACK

    assert FALLBACK == {"Q6_K": "Q8_0", "Q5_K": "Q5_1", "Q4_K": "Q5_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0"}
    for fmt, sub in FALLBACK.items():
        model = load(flux_dir)
        with pytest.raises(UserError, match="fallback=True"):
            resolve_plan(model, fmt)
        chosen = resolve_plan(model, fmt, fallback=True)
        widths = {n: model.get_submodule(n).in_features for n in chosen}
        assert chosen == {n: (fmt if w % 256 == 0 else sub) for n, w in widths.items()}
        quantize_(model, fmt, fallback=True)
        assert {n: m.format for n, m in quant_layers(model).items()} == chosen
