"""Block-streaming offload (rflow.runtime.offload) on tiny FLUX.1, FLUX.2 and Z-Image transformers.

What is proved, on the CPU with the same schedule CUDA runs (copies into reused slots, prefetch, the
saved-tensor hooks of backward): outputs and gradients are bit-identical with and without offload,
for bf16-style dense and quantized (int8, Q8_0) blocks, with some blocks resident and the others
streamed; the fetch order is the prefetch order; at most prefetch + 1 streamed blocks are
materialised at once and their weights are only ever views of the prefetch + 1 slots allocated
once; offload is idempotent and undone by mode="none"; bad options are one-line errors; the CLI's
``--offload`` gives the same PNG. The CUDA test runs where a GPU is.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from PIL import Image

from rflow.cli import main
from rflow.errors import UserError
from rflow.models import flux, flux2, zimage
from rflow.runtime.offload import offload_, plan_offload, streamer, working_reserve
from rflow.runtime.streaming import span, streamable

pytestmark = pytest.mark.usefixtures("one_thread")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """O(1) random weights everywhere (pad tokens and norm scales included), frozen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(r / p.shape[1] ** 0.5 if p.ndim >= 2 else 1 + 0.2 * r if "norm" in name or "scale" in name else 0.1 * r)
    return model.eval().requires_grad_(False)


def tiny(family: str, seed: int = 0):
    """(model, forward arguments) of a tiny random transformer of ``family``."""
    g = torch.Generator().manual_seed(seed + 100)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if family == "flux1":
        c = flux.FluxConfig(hidden_size=64, num_heads=2, in_channels=16, out_channels=16, context_in_dim=32,
                            vec_in_dim=16, axes_dim=(4, 14, 14), double_mlp=[(128, 128)] * 3, single_mlp=[128] * 3)
        args = (rnd(1, 12, 16), flux.image_ids(6, 8), rnd(1, 5, 32), flux.text_ids(5), torch.tensor([0.7]), rnd(1, 16),
                torch.tensor([3.5]))
        return _randomize(flux.Flux(c), seed), args
    if family == "flux2":
        c = flux2.Flux2Config(hidden_size=64, num_heads=2, in_channels=16, out_channels=16, context_in_dim=32,
                              axes_dim=(8, 8, 8, 8), double_mlp=[(96, 96)] * 2, single_mlp=[96] * 3)
        args = (rnd(1, 12, 16), flux2.image_ids(3, 4), rnd(1, 5, 32), flux2.text_ids(5), torch.tensor([0.7]))
        return _randomize(flux2.Flux2(c), seed), args
    c = zimage.ZImageConfig(dim=64, n_heads=2, in_channels=4, patch_size=2, cap_feat_dim=32, adaln_dim=64, t_mid_dim=64,
                            axes_dims=(8, 12, 12), seq_multiple=4, layers_mlp=[128] * 3, noise_refiner_mlp=[128] * 2,
                            context_refiner_mlp=[128] * 2)
    return _randomize(zimage.ZImage(c), seed), (rnd(1, 4, 8, 8), torch.tensor([0.3]), rnd(1, 6, 32))


def block_sizes(model, names) -> dict[str, int]:
    return {n: span(streamable(model.get_submodule(n), set())) for n in names}


def partial_vram(model) -> int:
    """A budget (reserve 0, prefetch 1) that keeps the two largest blocks resident and streams the rest."""
    every = plan_offload(model, mode="blocks", device="cpu", reserve=0)  # streams every block
    top = sorted(block_sizes(model, every.streamed).values(), reverse=True)
    return every.resident_bytes + top[0] + top[1] + 2 * top[2]


def slot_ranges(s):
    return [(sl.buf.data_ptr(), sl.buf.data_ptr() + sl.buf.numel()) for sl in s.slots]


def watch(model, s):
    """A pre-hook on every streamed block (after offload's own): while the block runs its weights must be
    views of a slot, and every other streamed block's weights views of its host buffer."""
    seen = []

    def inside(t, lo, hi):
        return lo <= t.data_ptr() < hi or t.numel() == 0

    def check(block, *_):
        ranges = slot_ranges(s)
        for b in s.blocks:
            for e in b.entries:
                t = e.module._parameters[e.name] if e.param else e.module._buffers[e.name]
                if b.module is block:
                    assert any(inside(t, lo, hi) for lo, hi in ranges), (b.name, e.name)
                else:
                    assert inside(t, b.host.data_ptr(), b.host.data_ptr() + b.host.numel()), (b.name, e.name)
        seen.append(block)

    for b in s.blocks:
        b.module.register_forward_pre_hook(lambda m, a: check(m))
    return seen


# ---------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("family", ["flux1", "flux2", "zimage"])
def test_outputs_identical_with_some_blocks_resident(family):
    model, args = tiny(family)
    ref = copy.deepcopy(model)
    plan = offload_(model, vram=partial_vram(model), mode="blocks", device="cpu", reserve=0)
    assert len(plan.resident) >= 2 and len(plan.streamed) >= 2, plan
    s = streamer(model)
    assert [b.name for b in s.blocks] == plan.streamed
    seen = watch(model, s)
    with torch.no_grad():
        for _ in range(3):  # three calls: the schedule wraps around between them
            assert torch.equal(model(*args), ref(*args))
    assert len(seen) == 3 * len(plan.streamed)
    assert list(s.step_bytes)[1:] == [plan.streamed_bytes] * 2  # steady state: each streamed block once per call
    resident = model.get_submodule(plan.resident[0])
    assert not resident._forward_pre_hooks and next(resident.parameters()).device.type == "cpu"


@pytest.mark.parametrize("fmt", ["int8", "Q8_0"])
def test_quantized_blocks_stream_their_packed_buffers(fmt):
    from rflow.quant.api import quantize_
    from rflow.quant.linear import QuantLinear

    model, args = tiny("flux1", seed=1)
    quantize_(model, fmt)
    ref = copy.deepcopy(model)
    plan = offload_(model, vram=partial_vram(model), mode="blocks", device="cpu", reserve=0)
    s = streamer(model)
    packed = [e for b in s.blocks for e in b.entries if isinstance(e.module, QuantLinear) and e.name == "qweight"]
    assert packed and all(not e.param for e in packed)
    watch(model, s)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(*args), ref(*args))
    dense, _ = tiny("flux1", seed=1)
    assert plan.streamed_bytes < 0.4 * sum(block_sizes(dense, plan.streamed).values())  # packed, not float32


# ---------------------------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("prefetch", [1, 2])
def test_prefetch_order_and_at_most_prefetch_plus_one_materialised(prefetch, monkeypatch):
    def no_cuda(*a, **k):
        raise AssertionError("a CUDA call on the CPU path")

    for name in ("Stream", "Event", "current_stream", "stream", "current_device", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    model, args = tiny("flux1")
    plan = offload_(model, mode="blocks", device="cpu", prefetch=prefetch, reserve=0)
    s = streamer(model)
    names, n = plan.streamed, len(plan.streamed)
    assert n == 6 and len(s.slots) == prefetch + 1
    ptrs = [sl.buf.data_ptr() for sl in s.slots]
    with torch.no_grad():
        for _ in range(3):
            model(*args)
    log = list(s.log)
    assert not [e for e in log if e.kind == "fetch"]  # nothing was waited for on demand: all prefetched
    # the model call prefetches the first blocks; while block i runs, block i + prefetch (wrapping) is fetched
    assert [e.block for e in log[:prefetch]] == names[:prefetch]
    for k, e in enumerate(log):
        if e.kind == "start" and e.step >= 2:
            i = names.index(e.block)
            after = [x.block for x in log[k + 1 :] if x.kind in ("prefetch", "end")]
            assert after[:2] == [names[(i + prefetch) % n], e.block]
    live, most = set(), 0  # materialised blocks, rebuilt from the log: fetched and not yet finished
    for e in log:
        if e.kind == "prefetch":
            live.add(e.block)
        elif e.kind == "end":
            live.discard(e.block)
        most = max(most, len(live))
    assert most == s.stats["max_materialised"] == prefetch + 1
    assert [sl.buf.data_ptr() for sl in s.slots] == ptrs  # the slots are reused, never reallocated
    assert s.stats["bytes"] == sum(s.step_bytes) and s.stats["steps"] == 3


def test_backward_refetches_blocks_and_gives_identical_gradients():
    model, args = tiny("flux1", seed=2)
    bias = "double_blocks.1.img_mlp.0.bias"
    model.get_parameter(bias).requires_grad_(True)  # a trainable weight inside a streamed block stays resident
    ref = copy.deepcopy(model)
    offload_(model, mode="blocks", device="cpu", prefetch=1, reserve=0)
    s = streamer(model)
    assert id(model.get_parameter(bias)) not in s.blocks[1].tensor_ids()
    x_ref, x = (args[0].clone().requires_grad_(True) for _ in range(2))
    ref(x_ref, *args[1:]).square().mean().backward()
    n0 = len(s.log)
    model(x, *args[1:]).square().mean().backward()
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(model.get_parameter(bias).grad, ref.get_parameter(bias).grad)
    back = [s.blocks.index(next(b for b in s.blocks if b.name == e.block)) for e in list(s.log)[n0:]
            if e.kind == "backward"]
    assert back == list(range(len(s.blocks) - 3, -1, -1))  # the last two were still in their slots
    assert s.stats["backward_fetches"] == len(back) and s.stats["max_materialised"] <= 2
    assert all(not b.live and b.saving is None for b in s.blocks[1:])


@pytest.mark.parametrize("quant", [None, "Q8_0"])
def test_checkpointed_backward_recomputes_streamed_blocks_from_their_slots(quant):
    """Gradient checkpointing recomputes each block in backward without calling the block's hooks: every
    linear layer of a streamed block must still compute from slot memory then (on a GPU the host buffer
    is on another device), and the gradients equal those of the same checkpointed model unstreamed."""
    from rflow.lora import add_lora_, lora_parameters
    from rflow.train.adapters import checkpoint_blocks_, init_weights, target_layers

    def prepared(offload: bool):
        model, args = tiny("flux1", seed=3)
        if quant:
            from rflow.quant.api import quantize_

            quantize_(model, quant)
        if offload:
            offload_(model, mode="blocks", device="cpu", prefetch=1, reserve=0)
        layers = target_layers(model, "attn,mlp")
        weights = init_weights(model, layers, 4, 4.0, seed=0)
        for w in weights:
            w.up.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))  # B != 0: gradients reach A
        add_lora_(model, weights, name="t", trainable=True, dtype=torch.float32)
        assert checkpoint_blocks_(model) == 6
        return model, args

    ref, args = prepared(False)
    model, _ = prepared(True)
    s = streamer(model)
    outside = []

    def check(layer, _args):
        w = layer._buffers.get("qweight", layer._parameters.get("weight"))
        if w is not None and w.numel() and not any(lo <= w.data_ptr() < hi for lo, hi in slot_ranges(s)):
            outside.append(layer)

    streamed = {id(m) for b in s.blocks for m in b.module.modules()}
    for m in model.modules():
        if id(m) in streamed and hasattr(m, "in_features"):
            m.register_forward_pre_hook(check)
    for m in (ref, model):
        m(*args).square().mean().backward()
    n0 = s.stats["backward_fetches"]
    assert not outside, f"{len(outside)} layer calls computed from host memory"
    assert n0 >= len(s.blocks) - 2  # recomputation fetched the blocks whose slots were reused
    for p, q in zip(lora_parameters(ref), lora_parameters(model)):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(q.grad, p.grad, atol=0, rtol=0)
    assert all(not b.live for b in s.blocks[1:]) and all(b.saving is None for b in s.blocks)


# ---------------------------------------------------------------------------------------------- the verb


def hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_offload_is_idempotent_and_mode_none_undoes_it():
    model, args = tiny("zimage")
    ref = copy.deepcopy(model)
    classes = [type(m) for m in model.modules()]
    first = offload_(model, vram=partial_vram(model), mode="auto", device="cpu", reserve=0)
    n_hooks = hooks(model)
    again = offload_(model, vram=partial_vram(model), mode="auto", device="cpu", reserve=0)
    assert again == first and hooks(model) == n_hooks == 1 + 2 * len(first.streamed)
    with torch.no_grad():
        assert torch.equal(model(*args), ref(*args))
    undone = offload_(model, mode="none", device="cpu")
    assert not undone.streamed and streamer(model) is None and hooks(model) == 0
    assert [type(m) for m in model.modules()] == classes
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(model(*args), ref(*args))


def test_auto_keeps_a_model_that_fits_whole():
    model, _ = tiny("flux2")
    plan = offload_(model, mode="auto", device="cpu", vram=10**9, reserve=0)
    assert not plan.streamed and streamer(model) is None and plan.resident_bytes > 0


@pytest.mark.parametrize("kw, fragment", [
    (dict(mode="stream"), "choose none, blocks or auto"),
    (dict(vram="4XB"), "bad size"),
    (dict(vram=0), "must be positive"),
    (dict(vram="1GB", mode="none"), "not none"),
    (dict(vram=4096, reserve=0), "below the"),
    (dict(prefetch=-1), "prefetch"),
])
def test_bad_options_are_user_errors(kw, fragment):
    model, _ = tiny("flux1")
    with pytest.raises(UserError, match=fragment):
        offload_(model, device="cpu", **kw)
    assert streamer(model) is None and hooks(model) == 0


def test_load_checks_offload_options_before_reading_anything(tmp_path):
    import rflow

    with pytest.raises(UserError, match="choose none, blocks or auto"):
        rflow.load(tmp_path / "missing", offload="everything")
    with pytest.raises(UserError, match="below the"):  # the meta-device probe, before the weights are read
        rflow.load(None, device="cpu", offload="blocks", vram="1MB")


# ---------------------------------------------------------------------------------------------- the CLI


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr()


def tiny_partial_vram() -> int:
    from rflow.checkpoints.loader import load_transformer
    from rflow.paths import DEFAULT_MODEL_DIR, TRANSFORMER_FILE

    model, _ = load_transformer(DEFAULT_MODEL_DIR / TRANSFORMER_FILE, device="cpu", dtype=torch.float32, family="flux1")
    reserve = working_reserve(model, "cpu", (64, 64), 24)
    every = plan_offload(model, mode="blocks", device="cpu", reserve=reserve)
    return every.resident_bytes + every.buffer_bytes + reserve + max(block_sizes(model, every.streamed).values())


def test_generate_with_offload_gives_the_same_png(tmp_path, capsys):
    base = ["generate", "a large red circle on the left on a white background", "--steps", "2", "--device", "cpu"]
    pixels = {}
    for name, extra in (("none", []), ("blocks", ["--offload", "blocks"]),
                        ("auto", ["--offload", "auto", "--vram", str(tiny_partial_vram())])):
        rc, cap = cli(capsys, *base, "-o", tmp_path / f"{name}.png", *extra)
        assert rc == 0, cap.err
        pixels[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
        if name == "blocks":
            assert "6 of 6 blocks streamed" in cap.err
        if name == "auto":  # some blocks resident, the others streamed
            assert 1 <= int(re.search(r"(\d) of 6 blocks streamed", cap.err).group(1)) <= 5, cap.err
    assert np.array_equal(pixels["none"], pixels["blocks"]) and np.array_equal(pixels["none"], pixels["auto"])


@pytest.mark.parametrize("extra, fragment", [
    (["--offload", "everything"], "--offload"),
    (["--offload", "blocks", "--vram", "4XB"], "--vram"),
    (["--offload", "auto", "--vram", "-1GB"], "--vram"),
    (["--vram", "4GiB"], "--offload blocks"),
])
def test_generate_bad_offload_options_exit_2_in_one_line(tmp_path, capsys, extra, fragment):
    rc, cap = cli(capsys, "generate", "a red circle", "-o", tmp_path / "x.png", *extra)
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("rflow: error: ") and fragment in lines[0], cap.err
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@needs_cuda
def test_cuda_streaming_keeps_outputs_and_stays_within_the_budget():
    dev = torch.device("cuda")
    c = flux.FluxConfig(hidden_size=512, num_heads=4, in_channels=16, out_channels=16, context_in_dim=64, vec_in_dim=32,
                        axes_dim=(16, 56, 56), double_mlp=[(2048, 2048)] * 6, single_mlp=[2048] * 12)
    model = _randomize(flux.Flux(c), 3).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(1, 256, 16, generator=g), flux.image_ids(32, 32), torch.randn(1, 16, 64, generator=g),
            flux.text_ids(16), torch.tensor([0.5]), torch.randn(1, 32, generator=g), torch.tensor([3.5])]
    args = [a.to(dev) for a in args]
    ref = copy.deepcopy(model).to(dev)
    with torch.no_grad():
        expected = ref(*args)
    whole = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
    del ref
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    reserve = 64 * 2**20
    vram = whole // 3 + reserve
    plan = offload_(model, vram=vram, mode="blocks", device=dev, reserve=reserve)
    assert plan.streamed and plan.resident
    assert all(b.host.is_pinned() for b in streamer(model).blocks)
    torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad():
        for _ in range(2):
            out = model(*args)
            assert torch.equal(out, expected)
    torch.cuda.synchronize(dev)
    assert torch.cuda.max_memory_allocated(dev) - base <= vram


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("quant", [None, "Q8_0"])
def test_cuda_checkpointed_lora_training_streams_and_matches_resident(quant):
    """A LoRA step on a streamed, checkpointed base on the GPU (backward recomputes each block from its
    slot; the host buffers are on another device) gives the resident model's LoRA gradients."""
    from rflow.lora import add_lora_, lora_parameters
    from rflow.train.adapters import checkpoint_blocks_, init_weights, target_layers

    dev = torch.device("cuda")
    c = flux.FluxConfig(hidden_size=256, num_heads=4, in_channels=16, out_channels=16, context_in_dim=64, vec_in_dim=32,
                        axes_dim=(8, 28, 28), double_mlp=[(1024, 1024)] * 3, single_mlp=[1024] * 4)
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(1, 256, 16, generator=g), flux.image_ids(32, 32), torch.randn(1, 16, 64, generator=g),
            flux.text_ids(16), torch.tensor([0.5]), torch.randn(1, 32, generator=g), torch.tensor([1.0])]
    args = [a.to(dev) for a in args]
    target = torch.randn(1, 256, 16, generator=g).to(dev)
    grads = []
    for offload in (False, True):
        model = _randomize(flux.Flux(c), 4).to(torch.bfloat16).to(dev)
        if quant:
            from rflow.quant.api import quantize_

            quantize_(model, quant)
        if offload:
            plan = offload_(model, mode="blocks", device=dev, reserve=0)
            assert len(plan.streamed) == 7 and all(b.host.is_pinned() for b in streamer(model).blocks)
        weights = init_weights(model, target_layers(model, "attn,mlp"), 8, 8.0, seed=0)
        for w in weights:
            w.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        add_lora_(model, weights, name="t", trainable=True, dtype=torch.float32)
        checkpoint_blocks_(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v = model(*args)
        (v.float() - target).pow(2).mean().backward()
        torch.cuda.synchronize(dev)
        grads.append([p.grad.float().cpu() for p in lora_parameters(model, "t")])
        if offload:
            assert streamer(model).stats["backward_fetches"] >= 5
        del model
        torch.cuda.empty_cache()
    assert all(torch.isfinite(x).all() for x in grads[0]) and any(x.abs().sum() > 0 for x in grads[0])
    for x, y in zip(*grads):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-3)
