"""rflow.memory: the activation-memory estimate of ``generate``, the refusal it drives, and the
sigma-collapse error of ``get_sigmas`` that huge sizes used to hit instead.

The estimate is checked for shape (monotone, finite for absurd sizes, cheap) and against reality:
a subprocess runs ``generate`` and reads its peak RSS (``VmHWM``, reset after loading and a warm-up)
above the RSS at that moment, and the estimate must lie between 1× and 3× of that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import rflow
from rflow import memory
from rflow.errors import UserError
from rflow.memory import check_generate_memory, estimate_generate_bytes, format_bytes
from rflow.models.flux import FluxConfig
from rflow.models.vae import AttnBlock, AutoEncoder, VAEConfig
from rflow.sampling import get_sigmas

GiB = 2**30


@pytest.fixture(scope="module")
def tiny():
    return rflow.load(device="cpu")


@pytest.fixture(scope="module")
def flux_shaped():
    """A stand-in with FLUX.1-dev's shapes on CUDA in bfloat16; the VAE lives on the meta device (no memory)."""
    with torch.device("meta"):
        vae = AutoEncoder(VAEConfig()).to(torch.bfloat16)
    from rflow.families import flux1

    return SimpleNamespace(transformer=SimpleNamespace(config=FluxConfig(), dtype=torch.bfloat16), vae=vae,
                           device=torch.device("cuda", 0), latent_channels=16, max_sequence_length=512,
                           latent_spec=flux1.latent_spec(FluxConfig(), 8), family_module=flux1)


# ---------------------------------------------------------------------------------------------- the estimate


@pytest.mark.parametrize("which", ["tiny", "flux_shaped"])
def test_estimate_is_monotone(which, request):
    pipe = request.getfixturevalue(which)
    m = 16
    sizes = [(1, 64, 64), (2, 64, 64), (1, 128, 64), (1, 64, 128), (1, 512, 512), (4, 512, 512), (1, 1024, 1024),
             (1, 4096, 4096)]
    est = {s: estimate_generate_bytes(pipe, *s) for s in sizes}
    assert all(isinstance(v, int) and v > 0 for v in est.values())
    assert est[(2, 64, 64)] > est[(1, 64, 64)]
    assert est[(1, 128, 64)] > est[(1, 64, 64)] and est[(1, 64, 128)] > est[(1, 64, 64)]
    assert est[(1, 64, 64)] < est[(1, 512, 512)] < est[(4, 512, 512)]
    assert est[(1, 512, 512)] < est[(1, 1024, 1024)] < est[(1, 4096, 4096)]
    for b in (1, 3):
        row = [estimate_generate_bytes(pipe, b, w, w) for w in range(m, 40 * m, m)]
        assert row == sorted(row)
    assert estimate_generate_bytes(pipe, 1, 512, 512, txt_len=4096) > estimate_generate_bytes(pipe, 1, 512, 512, txt_len=8)


def test_cfg_runs_one_batch_at_a_time(tiny):
    """True CFG runs cond and uncond one after the other: more than cfg 1, far less than a doubled batch."""
    one, cfg, two = (estimate_generate_bytes(tiny, 1, 1024, 1024), estimate_generate_bytes(tiny, 1, 1024, 1024, cfg=3.0),
                     estimate_generate_bytes(tiny, 2, 1024, 1024))
    assert one < cfg < one + (two - one) // 4


def test_huge_sizes_are_cheap_finite_ints(tiny, flux_shaped):
    t = time.perf_counter()
    for pipe in (tiny, flux_shaped):
        for b, w, h in ((10**6, 10**6, 10**6), (1, 10**6, 10**6), (10**6, 64, 64), (1, 10**30, 10**30)):
            n = estimate_generate_bytes(pipe, b, w, h)
            assert isinstance(n, int) and n > 10**12
    assert time.perf_counter() - t < 1.0
    assert "EiB" in format_bytes(estimate_generate_bytes(tiny, 10**6, 10**6, 10**6))


def test_flux_decoder_attention_dominates_large_sizes(flux_shaped):
    """The FLUX.1 VAE's mid-block attention scores (T×T, T = H/8·W/8) make 4096x4096 need hundreds of GiB."""
    e1k = estimate_generate_bytes(flux_shaped, 1, 1024, 1024)
    e4k = estimate_generate_bytes(flux_shaped, 1, 4096, 4096)
    assert 2 * GiB < e1k < 12 * GiB
    assert e4k > memory.ATTENTION_SCORE_BYTES * (512 * 512) ** 2


def test_vae_attention_materialises_scores_on_cpu():
    """The estimate counts the T×T scores because vae.py's AttnBlock hands SDPA non-contiguous q/k/v, which
    sends it to the math kernel. If this fails, the attention became fused: drop that term in rflow.memory."""
    choice = getattr(torch, "_fused_sdp_choice", None)
    if choice is None:
        pytest.skip("this torch cannot say which SDPA kernel it picks")
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                seen.append(int(choice(*args[:3])))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Spy():
        AttnBlock(64, 32)(torch.randn(1, 64, 4, 4))
    assert seen == [0]  # SDPBackend.MATH


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(int(37.2 * GiB)) == "37.2 GiB"
    assert format_bytes(3 * 2**20 // 2) == "1.5 MiB"
    assert format_bytes(10**40).endswith(" EiB")


# ---------------------------------------------------------------------------------------------- the check


def test_check_refuses_absurd_size(tiny):
    with pytest.raises(UserError) as e:
        check_generate_memory(tiny, 1, 100_000, 100_000)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("size 100000x100000 × batch 1 needs about ")
    assert " GiB" in msg or " TiB" in msg
    assert "is free on cpu" in msg and "--size" in msg and "--batch" in msg


def test_check_passes_default_size(tiny):
    check_generate_memory(tiny, 1, 64, 64)
    check_generate_memory(tiny, 4, 64, 64, cfg=2.0)


def test_check_uses_available_bytes(tiny, monkeypatch):
    need = estimate_generate_bytes(tiny, 1, 1024, 1024)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need // 2)
    with pytest.raises(UserError, match=rf"size 1024x1024 × batch 1 needs about {format_bytes(need)} for activations, "
                                        rf"but only {format_bytes(need // 2)} is free on cpu"):
        check_generate_memory(tiny, 1, 1024, 1024)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)  # within the 0.9 margin: still refused
    with pytest.raises(UserError):
        check_generate_memory(tiny, 1, 1024, 1024)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * need)
    check_generate_memory(tiny, 1, 1024, 1024)
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)  # unknown: never refuses
    check_generate_memory(tiny, 1, 100_000, 100_000)


def test_available_bytes():
    cpu = memory.available_bytes(torch.device("cpu"))
    assert cpu is None or 0 < cpu < 2**60
    assert memory.available_bytes(torch.device("meta")) is None
    if torch.cuda.is_available():
        assert memory.available_bytes(torch.device("cuda")) > 0


# ---------------------------------------------------------------------------------------------- calibration

_MEASURE = textwrap.dedent("""
    import ctypes, gc, json, sys
    import torch
    torch.set_num_threads(2)
    sys.path.insert(0, {tests!r})
    import rflow
    from rflow.memory import estimate_generate_bytes

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    pipe = rflow.load({path!r}, device="cpu")
    m = pipe.size_multiple
    pipe.generate("a red circle", width=4 * m, height=4 * m, steps=1)  # warm-up
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to the current RSS
        f.write("5")
    base = status("VmRSS")
    pipe.generate(["a red circle"] * {batch}, width={width}, height={height}, steps=1)
    print(json.dumps({{"measured": status("VmHWM") - base,
                      "estimate": estimate_generate_bytes(pipe, {batch}, {width}, {height})}}))
""")

# Large blocks straight from mmap and back to the system when freed, so RSS follows the live tensors
# instead of what glibc's arenas happen to keep from loading and the warm-up.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}


def measure(path: str | None, batch: int, width: int, height: int) -> dict:
    """Peak RSS of ``generate`` above the level after loading and a warm-up, in a fresh process."""
    script = _MEASURE.format(tests=str(Path(__file__).parent), path=path, batch=batch, width=width, height=height)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **_MALLOC_ENV})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_calibrated(r: dict) -> None:
    assert r["measured"] <= r["estimate"] <= 3 * r["measured"], r


def test_estimate_covers_measured_peak_tiny():
    """rflow-tiny, batch 4 at 256x256: transformer activations dominate (measured ≈ 74 MiB, estimate ≈ 195 MiB)."""
    assert_calibrated(measure(None, 4, 256, 256))


@pytest.mark.slow
@pytest.mark.parametrize("batch,size", [(1, 192), (2, 128)])
def test_estimate_covers_measured_peak_kl_vae(tmp_path_factory, batch, size):
    """A tiny diffusers FLUX pipeline with a real AutoencoderKL: its VAE's mid-block attention scores dominate."""
    from pipeline_ref import tiny_pipeline

    folder = tmp_path_factory.getbasetemp() / "memory-dev"
    if not folder.exists():
        tiny_pipeline(guidance=True).save_pretrained(folder)
    assert_calibrated(measure(str(folder), batch, size, size))


# ---------------------------------------------------------------------------------------------- sigmas


def test_get_sigmas_refuses_collapsed_flux_schedule():
    with pytest.raises(UserError, match=r"image_seq_len 262144 is too large for the 'flux' schedule: "
                                        r"the shifted sigmas collapse to 1 \(mu = 44\.8\)"):
        get_sigmas(28, schedule="flux", image_seq_len=262144)
    with pytest.raises(UserError, match="too large for the 'flux' schedule"):  # e^mu overflows float64
        get_sigmas(4, schedule="flux", image_seq_len=10**9)
    for n in (1, 256, 4096, 16384, 65536):
        s = get_sigmas(28, schedule="flux", image_seq_len=n)
        assert len(s) == 29 and s[0] == 1 and s[-1] == 0 and bool((s[1:] < s[:-1]).all())


def test_get_sigmas_refuses_collapsed_static_schedule():
    with pytest.raises(UserError, match="shift 1e\\+300 is too large for the 'static' schedule: .*collapse to 1"):
        get_sigmas(28, schedule="static", shift=1e300)
    with pytest.raises(UserError, match="too small for the 'static' schedule: .*collapse to 0"):
        get_sigmas(28, schedule="static", shift=5e-324)
    s = get_sigmas(28, schedule="static", shift=3.0)
    assert bool((s[1:] < s[:-1]).all())
