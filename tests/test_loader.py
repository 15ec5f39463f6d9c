"""The one loader: a LoadPlan decides where each tensor lands and may build a layer's module itself
(what quantization and offload plug into), without any family knowing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flux_ref import diffusers_inputs, save_bfl, tiny_transformer
from rflow.checkpoints.loader import Checkpoint, LoadPlan, load_transformer
from rflow.errors import UserError

FP8 = getattr(torch, "float8_e4m3fn", None)


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    ref = tiny_transformer(depth=1, depth_single=1)
    path = tmp_path_factory.mktemp("loader") / "flux.safetensors"
    save_bfl(ref, path)
    return ref, path


class UpcastLinear(nn.Module):
    """A stand-in for a quantized layer: keeps its weight in the stored (narrow) dtype, computes in float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_stored", weight)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x):
        return nn.functional.linear(x, self.weight_stored.to(x.dtype), self.bias)


def test_default_plan_loads_every_family_the_same_way(flux_file):
    ref, path = flux_file
    model, info = load_transformer(path, dtype=torch.float32)
    assert info.family_kind == "flux1" and info.format == "bfl"
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    with Checkpoint(path) as ck:
        assert ck.family.NAME == "flux1" and ck.stored_dtype() == torch.float32


def test_tensor_placement_sets_dtype_per_tensor(flux_file):
    _, path = flux_file
    half = lambda k: (None, torch.float16) if k.startswith("double_blocks.0.img_mlp.") else None  # noqa: E731
    model, _ = load_transformer(path, plan=LoadPlan(dtype=torch.float32, tensor_placement=half))
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float16 if name.startswith("double_blocks.0.img_mlp.") else torch.float32), name


@pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")
def test_stored_float8_reaches_a_layer_hook(flux_file, tmp_path):
    ref, path = flux_file
    sd = load_file(str(path))
    mlp = [k for k in sd if k.endswith("mlp.0.weight")]
    fp8 = {k: (v.to(FP8) if k in mlp else v) for k, v in sd.items()}
    save_file(fp8, str(tmp_path / "fp8.safetensors"))

    stored = lambda k: (None, "stored") if k in mlp else None  # noqa: E731
    seen = {}

    def build(name, linear, tensors):
        if tensors["weight"].dtype != FP8:
            return None
        seen[name] = tuple(tensors["weight"].shape)
        assert isinstance(linear, nn.Linear) and tuple(linear.weight.shape) == seen[name]
        return UpcastLinear(tensors["weight"], tensors.get("bias"))

    model, _ = load_transformer(tmp_path / "fp8.safetensors",
                                plan=LoadPlan(dtype=torch.float32, tensor_placement=stored, build_layer=build))
    assert sorted(f"{n}.weight" for n in seen) == sorted(mlp)
    for n in seen:
        layer = model.get_submodule(n)
        assert isinstance(layer, UpcastLinear) and layer.weight_stored.dtype == FP8

    # the same function as upcasting everything at load time (the default for float8)
    upcast, _ = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)
    assert isinstance(upcast.get_submodule(next(iter(seen))), nn.Linear)
    _, args = diffusers_inputs(ref, h=2, w=3)
    with torch.no_grad():
        torch.testing.assert_close(model(*args), upcast(*args), rtol=0, atol=0)


def test_wrong_family_is_one_line(flux_file):
    _, path = flux_file
    with pytest.raises(UserError, match="not a Z-Image transformer checkpoint"):
        Checkpoint(path, family="zimage")
    with pytest.raises(UserError, match="unknown model family 'sd3'"):
        Checkpoint(path, family="sd3")


@pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")
@pytest.mark.parametrize("marker", [True, False])
def test_comfyui_scaled_fp8_applies_the_scale(flux_file, tmp_path, marker):
    """ComfyUI's scaled-fp8 files: X.weight in fp8 with X.scale_weight beside it (and a scaled_fp8 marker);
    the weight is the product, never the bare fp8 values."""
    _, path = flux_file
    sd = load_file(str(path))
    prefix = "model.diffusion_model."
    out, want = {}, {}
    for k, v in sd.items():
        if v.ndim == 2 and not k.startswith(("img_in", "final_layer")):
            scale = (v.abs().max() / 448).float()
            q = (v / scale).to(FP8)
            out[prefix + k], out[prefix + k[: -len("weight")] + "scale_weight"] = q, scale.reshape(1)
            out[prefix + k[: -len("weight")] + "scale_input"] = torch.ones(1)
            want[k] = q.float() * scale
        else:
            out[prefix + k] = v
            want[k] = v
    if marker:
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file(out, str(tmp_path / "scaled.safetensors"))
    model, info = load_transformer(tmp_path / "scaled.safetensors", dtype=torch.float32)
    assert info.format == "comfyui"
    got = model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    bare = next(k for k in want if prefix + k[: -len("weight")] + "scale_weight" in out)
    assert not torch.equal(got[bare], out[prefix + bare].float())  # the scale was applied


@pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")
def test_keep_quantized_fp8_builds_fp8_layers(flux_file, tmp_path):
    from rflow.quant.linear import Fp8Linear, quant_layers
    from rflow.quant.load import keep_quantized_plan

    ref, path = flux_file
    sd = load_file(str(path))
    fp8 = {k: (v.to(FP8) if v.ndim == 2 and "mlp" in k else v) for k, v in sd.items()}
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    plan = keep_quantized_plan(tmp_path / "fp8.safetensors", dtype=torch.float32)
    kept, _ = load_transformer(tmp_path / "fp8.safetensors", plan=plan)
    layers = quant_layers(kept)
    assert {f"{n}.weight" for n in layers} == {k for k, v in fp8.items() if v.dtype == FP8}
    assert all(isinstance(m, Fp8Linear) and m.qweight.dtype == FP8 for m in layers.values())
    upcast, _ = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)
    _, args = diffusers_inputs(ref, h=2, w=3)
    with torch.no_grad():
        torch.testing.assert_close(kept(*args), upcast(*args), rtol=0, atol=0)
    assert keep_quantized_plan(path) is None  # nothing quantized: load as usual
