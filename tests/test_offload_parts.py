"""Text encoders and VAE on the device only while used (rflow.runtime.parts), tiled VAE decode
(rflow.runtime.tiling) and offload in training.

On the CPU a part's copies are CPU -> CPU; the tests replace the copy (``parts._copy``) by a clone, so
each call really runs on fresh copies of the weights — as it does on a GPU — and check that the
results are bit-identical, that the weights point at their host copies again afterwards, and that
nested calls and the tiles of one decode copy once. Tiling is exact for rflow-tiny's pixel-unshuffle
codec; for the KL VAE (FLUX.1, Z-Image) and the FLUX.2 VAE the error against one decode is bounded
by what was measured (see the numbers at the tests) and shrinks with the overlap.
"""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import rflow
from rflow.cli import main
from rflow.errors import UserError
from rflow.runtime import parts, tiling
from rflow.runtime.offload import OffloadPlan, offload_, streamer
from rflow.runtime.parts import Move, auto_modes, holding, offload_parts_, part_of, parts_plan
from rflow.runtime.tiling import decode_tiled

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a large red circle on the left on a white background"


@pytest.fixture(scope="module")
def plain():
    return rflow.load(None, device="cpu")


@pytest.fixture(scope="module")
def off():
    return rflow.load(None, device="cpu", offload="blocks")


@pytest.fixture
def device_copies(monkeypatch):
    """Every copy a part makes is a fresh tensor (a stand-in for the GPU copy); returns them."""
    made = []

    def clone(t, device):
        c = t.clone()
        made.append(c)
        return c

    monkeypatch.setattr(parts, "_copy", clone)
    return made


def ptrs(module: nn.Module) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in [*module.named_parameters(), *module.named_buffers()]}


# ---------------------------------------------------------------------------------------------- parts


def test_parts_run_on_device_copies_only_while_used_and_outputs_stay_identical(plain, off, device_copies):
    plan = parts_plan(off)
    assert (plan.text, plan.vae) == ("swap", "swap") and parts_plan(plain) is None
    te = off.text_encoders
    home = ptrs(te)
    during = []
    hooks = [getattr(te, name).register_forward_pre_hook(lambda m, a, name=name: during.append(
        (name, all(t.data_ptr() != home[f"{name}.{n}"] for n, t in m.named_parameters())))) for name in ("clip", "t5")]
    part_of(te).log.clear(), part_of(off.vae).log.clear()
    kw = dict(steps=2, cfg=2.0, output_type="np")
    a, b = plain.generate(PROMPT, **kw), off.generate(PROMPT, **kw)
    for h in hooks:
        h.remove()
    assert np.array_equal(a, b)
    assert during == [("clip", True), ("t5", True)] * 2  # the prompt, then the negative prompt (CFG)
    assert ptrs(te) == home  # the host copies are the weights again
    n = plan.text_bytes
    assert part_of(te).log == [Move("in", "encode", n), Move("out", "encode", n)] * 2
    assert part_of(off.vae).log == [Move("in", "hold", 4), Move("out", "hold", 4)]  # the codec's one 4-byte buffer
    assert device_copies and all(c.device.type == "cpu" for c in device_copies)


class Enc(nn.Module):
    """A stand-in text encoder: ``encode`` calls ``encode_zimage`` (nested entry points)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.seen = []

    def encode(self, x):
        return self.encode_zimage(x)

    def encode_zimage(self, x):
        self.seen.append((x.device, self.lin.weight.data_ptr(), self.frozen.weight.data_ptr()))
        return [self.frozen(self.lin(x))]


def fake_pipe(text, vae, device="cpu"):
    return types.SimpleNamespace(text_encoders=text, vae=vae, transformer=nn.Linear(1, 1), device=torch.device(device))


def test_nested_calls_copy_once_and_trainable_parameters_stay(device_copies):
    enc = Enc()
    enc.lin.requires_grad_(True)  # a trainable adapter: never moved (its grads and optimizer state stay with it)
    lin, frozen = enc.lin.weight.data_ptr(), enc.frozen.weight.data_ptr()
    x = torch.randn(2, 4)
    ref = enc.frozen(enc.lin(x))
    offload_parts_(fake_pipe(enc, nn.Identity()), text="swap", vae="resident")
    out = enc.encode(x)
    assert torch.equal(out[0], ref)
    assert enc.seen[-1][1] == lin and enc.seen[-1][2] != frozen and enc.frozen.weight.data_ptr() == frozen
    assert [m.kind for m in part_of(enc).log] == ["in", "out"] and part_of(enc).stats["calls"] == 2
    with holding(enc), holding(nn.Identity()):  # several calls, one copy; a module that is no part: nothing
        assert enc.frozen.weight.data_ptr() != frozen
        enc.encode(x), enc.encode(x)
    assert [m.kind for m in part_of(enc).log] == ["in", "out"] * 2 and enc.frozen.weight.data_ptr() == frozen
    offload_parts_(fake_pipe(enc, nn.Identity()), text="resident", vae="resident")
    assert part_of(enc) is None and "encode" not in enc.__dict__


def test_text_on_the_cpu_sends_the_conditioning_to_the_device(plain):
    pipe = copy.deepcopy(plain)
    want = plain.encode([PROMPT])
    offload_parts_(pipe, text="cpu", vae="cpu", device="meta")  # "meta" stands for a device apart from the CPU
    cond = pipe.encode([PROMPT])
    assert cond.txt.device.type == "meta" and cond.vec.device.type == "meta"
    assert all(p.device.type == "cpu" for p in pipe.text_encoders.parameters())
    offload_parts_(pipe, text="cpu", vae="resident", device="cpu")
    got = pipe.encode([PROMPT])
    assert torch.equal(got.txt, want.txt) and torch.equal(got.vec, want.vec)


def plan_of(mode, streamed, budget, resident=100, buffers=0, reserve=10):
    return OffloadPlan(mode=mode, device="cuda:0", resident=[], streamed=["b"] * streamed, resident_bytes=resident,
                       buffer_bytes=buffers, streamed_bytes=0, reserve=reserve, budget=budget, prefetch=1)


@pytest.mark.parametrize("text, vae, plan, want", [
    (500, 100, None, ("resident", "resident")),
    (500, 100, plan_of("none", 0, None), ("resident", "resident")),
    (500, 100, plan_of("auto", 0, 1000), ("resident", "resident")),  # everything fits: nothing to offload
    (800, 200, plan_of("auto", 0, 1000), ("swap", "swap")),  # 110 + 800 + 200 > 1000, 110 + 800 fits
    (800, 200, plan_of("blocks", 3, None), ("swap", "swap")),  # no budget: the least memory
    (950, 20, plan_of("blocks", 3, 1000), ("cpu", "swap")),  # the text encoders cannot sit beside the blocks
])
def test_auto_placement(text, vae, plan, want):
    assert auto_modes(text, vae, plan) == want


def test_load_places_parts_and_checks_text_device(tmp_path):
    with pytest.raises(UserError, match="choose auto, device or cpu"):
        rflow.load(tmp_path / "missing", text_device="gpu")
    with pytest.raises(UserError, match="choose resident, swap, cpu or auto"):
        offload_parts_(fake_pipe(Enc(), nn.Identity()), text="gpu")
    fits = rflow.load(None, device="cpu", offload="auto", vram=10**10)
    assert (parts_plan(fits).text, parts_plan(fits).vae) == ("resident", "resident") and part_of(fits.vae) is None
    cpu = rflow.load(None, device="cpu", text_device="cpu")
    assert (parts_plan(cpu).text, parts_plan(cpu).vae) == ("cpu", "resident") and streamer(cpu.transformer) is None


# ---------------------------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("tile, overlap", [(8, 3), (16, 0), (6, 4), ((7, 11), 2), (64, 16)])
def test_tiled_decode_of_the_pixel_unshuffle_codec_is_exact(tile, overlap):
    from rflow.models.codec import PixelUnshuffleCodec

    codec = PixelUnshuffleCodec(4, scaling_factor=1.3, shift_factor=0.1)
    z = torch.randn(2, 48, 37, 53, generator=torch.Generator().manual_seed(0))
    assert torch.equal(decode_tiled(codec.decode, z, tile, overlap), codec.decode(z))


@pytest.mark.parametrize("tile, overlap", [(0, 0), (8, 8), (8, -1), (8.0, 2)])
def test_bad_tiles_are_user_errors(tile, overlap):
    with pytest.raises(UserError):
        decode_tiled(lambda z: z, torch.zeros(1, 1, 16, 16), tile, overlap)


def small_kl():
    from rflow.models.vae import AutoEncoder, VAEConfig

    torch.manual_seed(0)
    return AutoEncoder(VAEConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, norm_groups=4)).eval()


def small_flux2():
    from rflow.models.vae2 import Flux2Codec, Flux2VAEConfig

    torch.manual_seed(0)
    return Flux2Codec(Flux2VAEConfig(widths=(8, 16), num_res_blocks=1, z_channels=4, norm_groups=4)).eval()


# Measured on these random-weight VAEs (white-noise latents, seed 0): |tiled − one decode| / std of the
# image, mean and max. KL, 48x48 cells, tile 32 / overlap 16: 0.034, 0.47 (tile 24 / 8: 0.041, 0.52);
# FLUX.2, 32x32 cells, tile 24 / 8: 0.025, 0.46. Tiles of 16 without overlap leave seams: KL 0.19, 5.3;
# FLUX.2 0.17, 7.3.
@pytest.mark.parametrize("make, channels, cells, tile, overlap, mean_bound, max_bound", [
    (small_kl, 4, 48, 32, 16, 0.05, 0.7),
    (small_flux2, 16, 32, 24, 8, 0.04, 0.7),
])
def test_convolutional_vaes_tile_within_the_measured_error(make, channels, cells, tile, overlap, mean_bound, max_bound):
    vae = make()
    z = torch.randn(1, channels, cells, cells, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vae.decode(z)
    s = ref.std()
    assert torch.equal(decode_tiled(vae.decode, z, cells, 8), ref)  # one tile: one decode

    def err(tile, overlap):
        e = (decode_tiled(vae.decode, z, tile, overlap) - ref).abs() / s
        return float(e.mean()), float(e.max())

    blended, seams = err(tile, overlap), err(16, 0)
    assert blended[0] < mean_bound and blended[1] < max_bound, blended
    assert blended[0] * 3 < seams[0] and blended[1] * 3 < seams[1], (blended, seams)


@pytest.fixture
def small_tiles(monkeypatch):
    """128-pixel tiles with 32 pixels of overlap, above 128x128 pixels: a 192x192 image is 2x2 tiles."""
    monkeypatch.setattr(tiling, "TILE_PIXELS", 128)
    monkeypatch.setattr(tiling, "OVERLAP_PIXELS", 32)
    monkeypatch.setattr(tiling, "AUTO_PIXELS", 128 * 128)


def test_pipeline_tiles_large_images_with_one_copy_of_the_vae(plain, off, small_tiles):
    vae = part_of(off.vae)
    vae.stats.update(calls=0, swaps=0, bytes=0)
    kw = dict(width=192, height=192, steps=1, output_type="np")
    whole = plain.generate(PROMPT, tiled_vae=False, **kw)
    tiled = off.generate(PROMPT, **kw)  # 192x192 is above the (patched) threshold
    assert np.array_equal(whole, tiled)
    assert vae.stats == {"calls": 4, "swaps": 1, "bytes": 0}  # 2x2 tiles, the VAE copied once
    assert plain.vae_tiles(192, 192) == (32, 8) and plain.vae_tiles(128, 128) is None


def test_memory_check_counts_one_tile():
    from rflow.memory import estimate_generate_bytes
    from rflow.models.vae import AutoEncoder, VAEConfig
    from rflow.pipeline import Pipeline
    from rflow.world.tiny import transformer_config
    from rflow.models.flux import Flux

    with torch.device("meta"):
        pipe = Pipeline(Flux(transformer_config()), AutoEncoder(VAEConfig()), None, max_sequence_length=24)
    whole = estimate_generate_bytes(pipe, 1, 4096, 4096)
    tiles = estimate_generate_bytes(pipe, 1, 4096, 4096, decode_size=(768, 768))
    assert tiles * 100 < whole  # FLUX.1's mid-block attention over 512x512 latent cells is what tiling avoids
    assert tiles > 4096 * 4096 * 3 * 14  # the whole image is still held


# ---------------------------------------------------------------------------------------------- the CLI


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr()


def test_generate_tiled_vae_and_offload_give_the_same_png(plain, tmp_path, capsys, small_tiles):
    rc, cap = cli(capsys, "generate", PROMPT, "--steps", "1", "--size", "192x192", "--device", "cpu",
                  "-o", tmp_path / "a.png", "--tiled-vae", "--offload", "blocks")
    assert rc == 0, cap.err
    assert "text encoders (811.7 KiB) on cpu only while encoding, VAE (4 B) on cpu only while in use" in cap.err
    png = Image.open(tmp_path / "a.png")
    whole = plain.generate(PROMPT, steps=1, width=192, height=192, tiled_vae=False, output_type="np")[0]
    assert np.array_equal(np.asarray(png), whole) and json.loads(png.text["rflow"])["tiled_vae"] is True


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("extra, fragments", [
    (["--offload", "blocks"], ("--offload", "--full")),
    (["--offload", "fast"], ("choose none, blocks or auto",)),
    (["--vram", "4GiB"], ("--vram", "not none")),
])
def test_train_offload_options_are_one_line_errors(tmp_path, capsys, extra, fragments):
    rc, cap = cli(capsys, "train", "--full", "-o", tmp_path / "run", "--steps", "1", *extra)
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("rflow: error: "), cap.err
    assert all(f in lines[0] for f in fragments), lines[0]
    assert not (tmp_path / "run").exists()


def test_full_trainer_refuses_streamed_blocks(off, tmp_path):
    from rflow.train.full import TrainConfig, Trainer

    with pytest.raises(UserError, match="offload='none'"):
        Trainer(off, TrainConfig(steps=1), tmp_path)
    assert not any(p.requires_grad for p in off.transformer.parameters())


def test_two_training_steps_through_streamed_blocks_are_identical(plain, device_copies):
    """The training step of rflow.train.full (flow-matching loss, VAE encode, cached text) with frozen
    blocks and trainable resident layers: streamed (forward and backward) or not, the same numbers."""
    from rflow.train.full import TextCache, TrainConfig, Trainer, shapes_batch

    def run(pipe):
        trainable = [*pipe.transformer.final_layer.parameters(), *pipe.transformer.img_in.parameters()]
        for p in trainable:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(trainable, lr=1e-3)
        state = types.SimpleNamespace(cfg=TrainConfig(batch=2), pipe=pipe, data=shapes_batch, text=TextCache(pipe),
                                      rank=0, world=1)
        losses = []
        for step in range(2):
            loss = Trainer.loss_at(state, step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in trainable]

    ref, streamed = copy.deepcopy(plain), copy.deepcopy(plain)
    offload_(streamed.transformer, mode="blocks", device="cpu", reserve=0)
    offload_parts_(streamed, text="swap", vae="swap")
    want, got = run(ref), run(streamed)
    assert got[0] == want[0] and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    s = streamer(streamed.transformer)
    assert s.stats["backward_fetches"] > 0 and len(s.blocks) == 6
    assert [m.kind for m in part_of(streamed.vae).log] == ["in", "out"] * 2  # one encode per step
    assert [m.kind for m in part_of(streamed.text_encoders).log] == ["in", "out"] * 2  # new captions each step


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_parts_are_on_the_gpu_only_while_used(plain):
    dev = torch.device("cuda")
    ref = copy.deepcopy(plain)
    ref.transformer.to(dev), ref.text_encoders.to(dev), ref.vae.to(dev)
    want = ref.generate(PROMPT, steps=2, output_type="np")
    del ref
    pipe = copy.deepcopy(plain)
    pipe.transformer.to(dev)
    plan = offload_parts_(pipe, text="swap", vae="swap")
    assert plan.device.startswith("cuda") and all(p.is_pinned() for p in pipe.text_encoders.parameters())
    pipe.generate(PROMPT, steps=2, output_type="np")  # warm-up: library workspaces are allocated once
    base = torch.cuda.memory_allocated(dev)
    during = []
    hook = pipe.text_encoders.t5.register_forward_pre_hook(
        lambda m, a: during.append((torch.cuda.memory_allocated(dev) - base, next(m.parameters()).device.type)))
    got = pipe.generate(PROMPT, steps=2, output_type="np")
    hook.remove()
    assert np.array_equal(got, want)
    assert during[0][1] == "cuda" and during[0][0] >= plan.text_bytes  # copied in for the call
    assert torch.cuda.memory_allocated(dev) - base < plan.text_bytes  # and gone again
    assert all(p.device.type == "cpu" for p in pipe.text_encoders.parameters())
