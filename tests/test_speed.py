"""The speed switches (rflow.runtime.speed, .fusion, .cuda_graphs) on tiny FLUX.1, FLUX.2 and Z-Image models.

What is proved on the CPU: fused projections give the unfused model's output (fp32, tight), keep the
state dict's keys, order and values, load unfused state dicts and undo exactly, and skip quantized or
hooked layers; the SDPA helper runs every transformer attention under the preferred backend order of
that model only (observed at each attention call), the timing picks the fastest backend that runs,
and the CPU keeps PyTorch's choice; regional compilation gives the eager output with one compiled
function per block class, under block offload too, and a persistent inductor cache in the rflow
cache folder; ``optimize_``
checks every argument before touching the model and says what it did; ``rflow generate --compile``
draws the same image as without. CUDA graphs and the GPU's SDPA timing run where a GPU is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

from rflow.errors import UserError
from rflow.models import flux, flux2, sdpa as sdpa_mod, zimage
from rflow.runtime import speed
from rflow.runtime.cuda_graphs import check_call, check_graph_inputs, cuda_graph_step, graph_model_
from rflow.runtime.fusion import fuse_projections_, unfuse_projections_

pytestmark = pytest.mark.usefixtures("one_thread")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FAMILIES = ("flux1", "flux2", "zimage")


def tiny(family: str, seed: int = 0, refiners: bool = True):
    """(model, forward arguments) of a tiny random fp32 transformer of ``family`` (Z-Image: two captions of
    different lengths, so that the attention masks are exercised too; without ``refiners``, main layers
    of one width only: one graph to compile)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 100)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if family == "flux1":
        c = flux.FluxConfig(hidden_size=64, num_heads=2, in_channels=16, out_channels=16, context_in_dim=32,
                            vec_in_dim=16, axes_dim=(4, 14, 14), double_mlp=[(96, 96)] * 2, single_mlp=[96] * 2)
        args = (rnd(1, 12, 16), flux.image_ids(6, 8), rnd(1, 5, 32), flux.text_ids(5), torch.tensor([0.7]), rnd(1, 16),
                torch.tensor([3.5]))
        return flux.Flux(c).eval(), args
    if family == "flux2":
        c = flux2.Flux2Config(hidden_size=64, num_heads=2, in_channels=16, out_channels=16, context_in_dim=32,
                              axes_dim=(8, 8, 8, 8), double_mlp=[(96, 96)] * 2, single_mlp=[96] * 2)
        return flux2.Flux2(c).eval(), (rnd(1, 12, 16), flux2.image_ids(3, 4), rnd(1, 5, 32), flux2.text_ids(5),
                                       torch.tensor([0.7]))
    c = zimage.ZImageConfig(dim=64, n_heads=2, in_channels=4, patch_size=2, cap_feat_dim=32, adaln_dim=64, t_mid_dim=64,
                            axes_dims=(8, 12, 12), seq_multiple=4, layers_mlp=[96, 80] if refiners else [96, 96],
                            noise_refiner_mlp=[96] if refiners else [], context_refiner_mlp=[96] if refiners else [])
    model = zimage.ZImage(c).eval()
    with torch.no_grad():
        model.x_pad_token.normal_(), model.cap_pad_token.normal_()
    return model, (rnd(2, 4, 8, 8), torch.tensor([0.3, 0.6]), [rnd(6, 32), rnd(3, 32)])


@torch.no_grad()
def run(model, args):
    out = model(*args)
    return torch.stack(out) if isinstance(out, list) else out


# ---------------------------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_equals_unfused(family):
    model, args = tiny(family)
    ref = run(model, args)
    keys = list(model.state_dict())
    done = fuse_projections_(model)
    if family == "zimage":  # the SwiGLU gate/up pair of every block; q/k/v are one linear in every family
        blocks = [*model.noise_refiner, *model.context_refiner, *model.layers]
        assert len(done["fused"]) == len(blocks) == 4 and not done["skipped"]
        for b in blocks:
            assert type(b.feed_forward) is zimage.FeedForward and "w1" not in b.feed_forward._modules
            assert b.feed_forward.w13.weight.shape[0] == 2 * b.feed_forward.w2.in_features
    else:
        assert done == {"fused": [], "skipped": {}}
    out = run(model, args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == keys


def test_fused_state_dict_round_trips(tmp_path):
    model, args = tiny("zimage")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_projections_(model)
    sd = model.state_dict()
    assert list(sd) == list(before)  # same keys, same order
    for k, v in before.items():
        assert torch.equal(sd[k], v), k
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "fused.safetensors")
    fresh, _ = tiny("zimage", seed=5)  # other weights, unfused
    fresh.load_state_dict(load_file(tmp_path / "fused.safetensors"))
    ref = run(fresh, args)
    torch.testing.assert_close(run(model, args), ref, rtol=1e-5, atol=1e-6)

    other, _ = tiny("zimage", seed=7)
    model.load_state_dict(other.state_dict())  # an unfused state dict into the fused model
    torch.testing.assert_close(run(model, args), run(other, args), rtol=1e-5, atol=1e-6)

    order = [list(b.feed_forward._modules) for b in other.layers]
    assert unfuse_projections_(model) == 4
    assert [list(b.feed_forward._modules) for b in model.layers] == order
    assert all(type(b.feed_forward.w1) is nn.Linear for b in model.layers)
    torch.testing.assert_close(run(model, args), run(other, args), rtol=1e-5, atol=1e-6)
    assert not model.layers[0].feed_forward._state_dict_hooks and unfuse_projections_(model) == 0


def test_fusion_skips_quantized_and_hooked_layers_and_offloaded_models():
    from rflow.quant.linear import QuantLinear
    from rflow.runtime.offload import offload_

    model, args = tiny("zimage")
    ref = run(model, args)
    ff = model.layers[0].feed_forward
    ff.w1 = QuantLinear.from_linear(ff.w1, "int8")
    model.layers[1].feed_forward.w3.register_forward_hook(lambda *a: None)
    q_ref = run(model, args)
    done = fuse_projections_(model)
    assert done["skipped"] == {"layers.0.feed_forward.w13": "not plain nn.Linear (Int8Linear)",
                               "layers.1.feed_forward.w13": "a part has hooks"}
    assert len(done["fused"]) == 2
    torch.testing.assert_close(run(model, args), q_ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(q_ref, ref)  # the int8 layer is really in the path

    plain, args = tiny("zimage")
    offload_(plain, mode="blocks", device="cpu", reserve=0)
    with pytest.raises(UserError, match="before offloading"):
        fuse_projections_(plain)
    assert speed.optimize_(plain)["fuse"]["fused"] == []
    assert "w1" in plain.layers[0].feed_forward._modules


# ---------------------------------------------------------------------------------------------- SDPA


class SeeAttention(TorchFunctionMode):
    """Records, at every SDPA call, the backend PyTorch would try first."""

    def __init__(self):
        super().__init__()
        self.first: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.first.append(torch._C._get_sdp_priority_order()[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["flux2", "zimage"])
def test_use_sdpa_backend_routes_the_model_attention(family):
    model, args = tiny(family)
    default = torch._C._get_sdp_priority_order()[0]
    ref = run(model, args)
    setting = speed.use_sdpa_backend(model, "math")
    assert speed.sdpa_setting(model) == SDPBackend.MATH
    with SeeAttention() as seen:
        out = run(model, args)
        q = torch.randn(1, 2, 4, 8)
        sdpa_mod.sdpa(q, q, q)  # outside the model: PyTorch's order
    n = len(seen.first) - 1
    assert n >= 4 and seen.first[:n] == [SDPBackend.MATH.value] * n and seen.first[n] == default
    assert sdpa_mod.preferred() is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    with setting:  # leaving the block removes the setting
        pass
    with SeeAttention() as seen:
        run(model, args)
    assert set(seen.first) == {default} and speed.sdpa_setting(model) is None
    with speed.use_sdpa_backend(model, SDPBackend.EFFICIENT_ATTENTION), SeeAttention() as seen:
        run(model, args)
    assert set(seen.first) == {SDPBackend.EFFICIENT_ATTENTION.value}


def test_sdpa_backend_on_cpu_and_bad_arguments():
    assert speed.sdpa_backend("cpu", torch.float32, (1, 2, 16, 32)) is None
    for bad in [(1, 2, 16), (1, 0, 16, 32), ((1, 2, 16, 32), (1, 2, 16), (1, 2, 16, 32))]:
        with pytest.raises(UserError, match="attention shapes"):
            speed.sdpa_backend("cpu", torch.float32, bad)
    with pytest.raises(UserError, match="unknown SDPA backend 'fastest'"):
        speed.use_sdpa_backend(nn.Linear(2, 2), "fastest")
    assert speed.parse_backend("cudnn") == SDPBackend.CUDNN_ATTENTION
    assert speed.priority(SDPBackend.CUDNN_ATTENTION)[0] == SDPBackend.CUDNN_ATTENTION
    assert sorted(speed.priority(SDPBackend.MATH), key=str) == sorted(speed.backend_names().values(), key=str)


def test_fastest_backend_times_what_runs():
    best, times = speed.fastest_backend("cpu", torch.float32, (1, 2, 64, 32), reps=2, samples=1)
    assert set(times) == {"cudnn", "flash", "efficient", "math"}
    assert times["cudnn"].startswith("unavailable")  # no cuDNN kernel on the CPU
    ran = {k: v for k, v in times.items() if isinstance(v, float)}
    assert "math" in ran and best == speed.parse_backend(min(ran, key=ran.get))
    assert speed.fastest_backend("cpu", torch.float32, (1, 2, 64, 32))[1] is times  # cached


# ---------------------------------------------------------------------------------------------- compile


def test_compile_blocks_equals_eager_one_function_per_class():
    import torch._dynamo
    from torch._dynamo.utils import counters

    from rflow.runtime.offload import offload_, streamer

    model, args = tiny("flux1")
    ref = run(model, args)
    keys, classes = list(model.state_dict()), [type(m) for m in model.modules()]
    torch._dynamo.reset()
    counters.clear()
    done = speed.compile_blocks_(model, backend="aot_eager")
    assert done["blocks"] == 4 and done["classes"] == {"DoubleStreamBlock": 2, "SingleStreamBlock": 2}
    assert done["cache_dir"] is None and done["mode"] == "default"
    out = run(model, args)
    assert counters["stats"]["unique_graphs"] == 2  # four blocks, two compiled graphs
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == classes
    offload_(model, mode="blocks", device="cpu", reserve=0)  # offload's hooks run around the compiled forwards
    torch.testing.assert_close(run(model, args), ref, rtol=1e-5, atol=1e-5)
    assert streamer(model).stats["fetches"] >= 4
    with pytest.raises(UserError, match="do not combine with block offload"):
        speed.compile_blocks_(model, mode="reduce-overhead")
    offload_(model, mode="none", device="cpu")
    assert speed.uncompile_blocks_(model) == 4 and "forward" not in model.single_blocks[0].__dict__
    with pytest.raises(UserError, match="unknown compile mode"):
        speed.compile_blocks_(model, mode="fast")
    with pytest.raises(UserError, match="no repeated blocks"):
        speed.compile_blocks_(nn.Linear(2, 2))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.b(F.gelu(self.a(x)))


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


def test_compiled_kernels_go_to_the_rflow_cache(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    monkeypatch.setenv("RFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    done = speed.compile_blocks_(_Stack())  # inductor; nothing compiles before the first call
    assert done["backend"] == "inductor" and done["cache_dir"] == str(tmp_path / "inductor")
    assert cache_dir() == str(tmp_path / "inductor")  # where inductor writes its FX graph and kernel caches
    import torch._inductor.config as inductor

    assert inductor.fx_graph_cache
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor sets on first use
    assert speed.compile_cache_dir() == tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice wins
    assert speed.compile_cache_dir() == tmp_path / "mine"


# ---------------------------------------------------------------------------------------------- optimize_


def test_optimize_checks_first_and_says_what_it_did():
    model, args = tiny("zimage", refiners=False)
    ref = run(model, args)
    for kw, msg in [(dict(compile="yes"), "compile must be"), (dict(cuda_graphs=True), "need the model on a CUDA"),
                    (dict(mode="reduce-overhead"), "applies to compile='blocks'"), (dict(sdpa="best"), "unknown SDPA"),
                    (dict(tokens=0), "tokens must be")]:
        with pytest.raises(UserError, match=msg):
            speed.optimize_(model, **kw)
    assert "w1" in model.layers[0].feed_forward._modules  # nothing changed
    done = speed.optimize_(model, compile="blocks", backend="aot_eager")
    assert len(done["fuse"]["fused"]) == 2 and done["sdpa"] == "default" and done["cuda_graphs"] is None
    assert done["compile"]["blocks"] == 2 and done["compile"]["classes"] == {"Block": 2}
    torch.testing.assert_close(run(model, args), ref, rtol=1e-5, atol=1e-5)
    line = speed.describe(done)
    assert line.startswith("speed: 2 projection group(s) fused, SDPA default, 2 blocks compiled")
    assert speed.optimize_(model, fuse=False, sdpa="math")["sdpa"] == "math"
    assert speed.sdpa_setting(model) == SDPBackend.MATH


def test_cuda_graph_arguments_are_checked():
    x = torch.zeros(2, 3)
    with pytest.raises(UserError, match="needs a callable"):
        check_graph_inputs(3, [x])
    with pytest.raises(UserError, match="list or tuple"):
        check_graph_inputs(torch.sin, x)
    with pytest.raises(UserError, match="is empty"):
        check_graph_inputs(torch.sin, [])
    with pytest.raises(UserError, match="must all be tensors, got float"):
        check_graph_inputs(torch.sin, [x, 1.0])
    with pytest.raises(UserError, match="CUDA device, not cpu"):
        cuda_graph_step(torch.sin, [x])
    want = [((2, 3), torch.float32, torch.device("cpu"))]
    check_call(want, [x])
    with pytest.raises(UserError, match=r"input 0 is \(3, 2\).*captured for \(2, 3\)"):
        check_call(want, [x.T])
    with pytest.raises(UserError, match="captured with 1 inputs, got 2"):
        check_call(want, [x, x])
    with pytest.raises(UserError, match="whole model on a CUDA device"):
        graph_model_(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- the CLI


def test_generate_compile_draws_the_same_image(tmp_path, monkeypatch):
    from rflow.cli import main

    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")  # inductor's C++ build is too slow for a test
    base = ["generate", "a red circle on a blue background", "--steps", "2", "--device", "cpu"]
    assert main(base + ["-o", str(tmp_path / "eager.png")]) == 0
    assert main(base + ["--compile", "-o", str(tmp_path / "compiled.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("eager", "compiled"))
    assert a.shape == b.shape and a.std() > 0
    assert np.abs(a - b).max() <= 1


# ---------------------------------------------------------------------------------------------- CUDA


@needs_cuda
def test_cuda_graph_step_and_graphed_model_equal_eager():
    model, args = tiny("flux1")
    model = model.cuda()
    args = tuple(a.cuda() for a in args)
    ref = run(model, args)
    with torch.no_grad():
        step = cuda_graph_step(model, list(args))
        torch.testing.assert_close(step(*args), ref, rtol=1e-5, atol=1e-5)
        graph_model_(model)
        for _ in range(2):
            torch.testing.assert_close(model(*args), ref, rtol=1e-5, atol=1e-5)
    assert len(model.__dict__["_rflow_graphs"].graphs) == 1


@needs_cuda
def test_sdpa_backend_on_cuda_picks_one_that_runs():
    best = speed.sdpa_backend("cuda", torch.bfloat16, (1, 4, 256, 64))
    assert isinstance(best, SDPBackend)
    assert speed.sdpa_backend("cuda", torch.bfloat16, (1, 4, 256, 64)) is best
    model, args = tiny("zimage")
    model = model.cuda()
    args = (args[0].cuda(), args[1].cuda(), [c.cuda() for c in args[2]])
    ref = run(model, args)
    done = speed.optimize_(model, tokens=64)
    assert done["sdpa"] in speed.backend_names()
    torch.testing.assert_close(run(model, args), ref, rtol=1e-4, atol=1e-4)
