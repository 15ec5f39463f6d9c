"""Refuse, before any work, a ``generate`` request whose activations cannot fit in memory.

Without this check a size such as 4096x4096 (or a large batch) runs until an allocation fails deep
inside the model, with a traceback that does not say what to change. :func:`check_generate_memory`
compares an estimate of the peak memory ``Pipeline.generate`` needs *on top of the loaded weights*
with the memory free on the pipeline's device and raises a one-line :class:`~rflow.errors.UserError`
that names both. The estimate is arithmetic on Python ints (no tensor is allocated, any size works).

``generate`` runs three phases one after the other; the estimate is the largest of them::

    estimate = max over phases (1.5 · tensors + exact) + 64 MiB

* **denoise**: the transformer forward over L = S + N tokens, S text tokens (``max_sequence_length``)
  and N image tokens (the family's ``image_seq_len``: (H/16)·(W/16) for FLUX.1, FLUX.2 and Z-Image),
  for a batch of B. True CFG (``cfg > 1``) runs the conditional and the unconditional forward one after
  the other (:func:`rflow.families.base.guided`), so it adds one velocity, not a second batch. Per token, with hidden
  size D, MLP width M, head dim d and e bytes per activation::

      tokens = B · L · (max(e·(8D + 3M_single), e·(9D + 2M_double), e·10D + 12D) + 8d)

  8D + 3M is what a single-stream block holds when it concatenates attention and MLP (the block
  input, linear1's qkv + MLP output, normalised q and k, the attention output, the GELU output and the
  concatenation); 9D + 2M the double-stream MLP (9D + 4M for a SwiGLU MLP, FLUX.2 and Z-Image: its
  2M-wide in-projection and the product; not calibrated by measurement); e·10D + 12D the joint attention with RoPE's float32
  temporaries; 8d the float32 RoPE table. Attention itself runs through
  ``scaled_dot_product_attention``'s fused kernels (flash on CPU and CUDA for these shapes), which do
  not build the L×L matrix. On the CPU reduced-precision activations count as float32 (e ≥ 4): its
  kernels keep float32 intermediates, and measured peaks are close to float32's. Plus 8–9 copies of
  the float32 latent (noise, the solver's working tensor and history, packed and unpacked velocity).
* **decode**, KL VAE (FLUX.1's ``ae``): the decoder walked level by level. A resnet block from cin to
  cout channels holds max(3·cin + cout, cin + 4·cout) channels per pixel at its resolution (input,
  norm and SiLU outputs, conv outputs, one conv workspace); an upsample cout·(P + 3·4P). For FLUX.1 the
  peak is the first full-resolution block, 896 channels per output pixel (3.5 KiB in float32). The
  mid-block attention over T = (H/f)·(W/f) positions is single-head with 512 channels and gets
  non-contiguous q/k/v, so SDPA takes its math kernel, which materialises the T×T scores in float32 —
  measured 9 bytes per score (scores, softmax, mask), counted as 10 and not scaled, as it is one exact
  tensor. That term is why 4096x4096 cannot be decoded in one piece with FLUX.1's VAE; the FLUX.2 VAE
  passes contiguous q/k/v (a fused kernel) and has none. The parameter-free pixel-unshuffle codec
  (rflow-tiny) costs a few latent copies.
* **output**: the image as float32 copies and uint8 arrays, 14 bytes per channel and pixel.

The factor 1.5 and the 64 MiB cover allocator slack and workspaces, which measured 15–50 % above
the tensors counted here. Calibrated against the peak RSS of real runs on the CPU (rflow-tiny at
256² to 1536², batch up to 4; FLUX-shaped transformers up to D 768; the FLUX.1 decoder at 256² and
512²; a tiny diffusers FLUX pipeline whose VAE attention dominates): over about 30 runs the estimate
was 1.1–2.3× the measured peak where activations dominate, never below it. On CUDA the same formula
is used with bfloat16 sizes (not measured here).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import UserError
from .models.vae import AutoEncoder

SAFETY = 0.9  # refuse when the estimate exceeds this fraction of the free memory
FIXED_OVERHEAD = 64 * 2**20
ATTENTION_SCORE_BYTES = 10  # per element of a materialised attention matrix (float32 scores, softmax, mask)
LATENT_COPIES = 8  # float32 latent-sized tensors alive while the transformer runs
OUTPUT_BYTES = 14  # per channel and pixel of the decoded image (float32 copies, uint8 arrays)

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


# ---------------------------------------------------------------------------------------------- free memory


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes that a new allocation on ``device`` can still get, or None when unknown.

    CUDA: the driver's free memory plus what torch's caching allocator holds unused (it hands that out
    first). CPU: ``MemAvailable`` of /proc/meminfo, lowered to the cgroup's limit minus its usage when
    the process runs under a memory limit; free physical pages where /proc is missing. Other device
    types: None.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_available(device)
    if device.type == "cpu":
        known = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
        return min(known) if known else _sysconf_available()
    return None


def _cuda_available(device: torch.device) -> int | None:
    try:
        free = torch.cuda.mem_get_info(device)[0]
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    except (RuntimeError, AssertionError, ValueError):
        return None
    return int(free) + max(int(cached), 0)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """Limit − usage of this process's memory cgroup (v2, then v1), reclaimable page cache counted free."""
    root = Path("/sys/fs/cgroup")
    for limit_f, usage_f, inactive_key in (("memory.max", "memory.current", "inactive_file"),
                                           ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                            "total_inactive_file")):
        try:
            limit = (root / limit_f).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:  # no limit set
                return None
            usage = int((root / usage_f).read_text())
            stat = (root / limit_f).with_name("memory.stat").read_text().split()
            inactive = dict(zip(stat[::2], stat[1::2])).get(inactive_key, "0")
            return max(int(limit) - usage + int(inactive), 0)
        except (OSError, ValueError):
            continue
    return None


def _sysconf_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------- estimate


def estimate_generate_bytes(pipe, batch: int, width: int, height: int, cfg: float = 1.0,
                            txt_len: int | None = None, decode_size: tuple[int, int] | None = None) -> int:
    """Estimated peak memory (bytes, beyond the weights) of ``pipe.generate`` for ``batch`` images of
    ``width`` x ``height``: the largest of the denoise, decode and output phases (see the module doc).
    ``decode_size``: (width, height) of one tile when the VAE decodes in tiles (rflow.runtime.tiling),
    whose decoder phases then count one tile plus the float32 image and weight accumulators."""
    for what, n in (("batch", batch), ("width", width), ("height", height)):
        if int(n) < 1:
            raise UserError(f"{what} must be ≥ 1, got {n}")
    batch, width, height = int(batch), int(width), int(height)
    shape = pipe.latent_spec.shape(batch, height, width)
    txt = pipe.max_sequence_length if txt_len is None else int(txt_len)
    latent = 4 * math.prod(shape)  # float32 latents, as generate keeps them
    tokens = batch * (txt + pipe.family_module.image_seq_len(shape))
    e = _activation_itemsize(pipe.transformer.dtype, pipe.device)
    denoise = tokens * _token_bytes(pipe.transformer.config, e) + (LATENT_COPIES + (cfg > 1)) * latent
    phases = [(denoise, 0), (latent + batch * 3 * width * height * OUTPUT_BYTES, 0)]
    decoder = _decoder_shape(pipe.vae)
    if decoder is not None:
        e_vae = pipe.vae.dtype.itemsize
        dw, dh = decode_size or (width, height)
        tiled = 0 if decode_size is None else 4 * (batch * 3 + 1) * width * height
        phases += [(2 * latent + tiled + batch * e_vae * elems, batch * exact)
                   for elems, exact in _decoder_phases(*decoder, dw, dh)]
    else:  # the pixel-unshuffle codec: a reshuffle of the latent
        phases.append((4 * latent, 0))
    return max(tensors + tensors // 2 + exact for tensors, exact in phases) + FIXED_OVERHEAD


def _activation_itemsize(dtype: torch.dtype, device: torch.device) -> int:
    """Bytes per transformer activation; CPU kernels keep float32 intermediates for reduced precision."""
    return dtype.itemsize if device.type == "cuda" else max(dtype.itemsize, 4)


def _token_bytes(c, e: int) -> int:
    """Peak bytes per token (and batch item) of one transformer block, plus the RoPE table. FLUX.1's
    blocks as measured; SwiGLU MLPs (FLUX.2, Z-Image) hold their 2M-wide in-projection and the M-wide
    product on top of the double-block terms."""
    from .compress.units import layer_refs

    D = getattr(c, "hidden_size", None) or c.dim
    refs = layer_refs(c)
    single = max((r.units for r in refs if r.stream == "single" and r.kind == "gelu"), default=0)
    double = max((r.units for r in refs if r.kind == "gelu" and r.stream != "single"), default=0)
    swiglu = max((r.units for r in refs if r.kind == "swiglu"), default=0)
    block = max(e * (8 * D + 3 * single) if single else 0,
                e * (9 * D + 2 * double) if double else 0,
                e * (9 * D + 4 * swiglu) if swiglu else 0,
                e * 10 * D + 12 * D)  # joint attention: q, k, v, their concatenations, RoPE float32 temporaries
    return block + 8 * c.head_dim


def _decoder_shape(codec) -> tuple[list[int], bool, bool] | None:
    """(level widths, mid-block attention, whether its T×T scores are materialised) of a codec's decoder;
    None for a parameter-free codec. FLUX.1's VAE hands SDPA non-contiguous q/k/v (math kernel, scores
    materialised); the FLUX.2 VAE's are contiguous (a fused kernel)."""
    from .models.vae2 import Flux2Codec

    if isinstance(codec, AutoEncoder):
        return list(codec.config.widths), codec.config.mid_attention, True
    if isinstance(codec, Flux2Codec):
        return list(codec.config.dec_widths), codec.config.mid_attention, False
    return None


def _resnet_channels(cin: int, cout: int) -> int:
    """Channels per pixel a resnet block holds at its peak (input, norm/SiLU outputs, convs, workspace)."""
    return max(3 * cin + cout, cin + 4 * cout)


def _decoder_phases(widths: list[int], mid_attention: bool, scores: bool, width: int,
                    height: int) -> list[tuple[int, int]]:
    """(elements per image, exact bytes per image) of each decoder phase: mid block, every level."""
    n = len(widths)
    pixels = [(height >> i) * (width >> i) for i in range(n)]  # level i works at 1/2**i resolution
    c, t = widths[-1], pixels[-1]
    phases = [(_resnet_channels(c, c) * t, 0)]
    if mid_attention:  # x, norm, q, k, v, scaled q and k, output; plus the T×T scores unless fused
        phases.append((8 * c * t, ATTENTION_SCORE_BYTES * t * t if scores else 0))
    for i in reversed(range(n)):
        cin, cout = widths[min(i + 1, n - 1)], widths[i]
        phases.append((max(_resnet_channels(cin, cout), _resnet_channels(cout, cout)) * pixels[i], 0))
        if i > 0:  # nearest upsample to level i-1, then a conv there
            phases.append((cout * (pixels[i] + 3 * pixels[i - 1]), 0))
    return phases


# ---------------------------------------------------------------------------------------------- the check


def check_generate_memory(pipe, batch: int, width: int, height: int, cfg: float = 1.0,
                          txt_len: int | None = None, decode_size: tuple[int, int] | None = None) -> None:
    """Raise :class:`UserError` when ``generate`` at this batch and size would not fit in the free memory
    of the pipeline's device (with a 10 % margin). Does nothing when the free memory is unknown."""
    free = available_bytes(pipe.device)
    if free is None:
        return
    need = estimate_generate_bytes(pipe, batch, width, height, cfg=cfg, txt_len=txt_len, decode_size=decode_size)
    if need > free * SAFETY:
        raise UserError(f"size {width}x{height} × batch {batch} needs about {format_bytes(need)} for activations, "
                        f"but only {format_bytes(free)} is free on {pipe.device}; use a smaller --size or --batch")


def format_bytes(n: int) -> str:
    """``n`` bytes with one decimal in the largest binary unit not above it (integer arithmetic, any size)."""
    n = max(int(n), 0)
    k = 0
    while k + 1 < len(_UNITS) and n >= 1024 ** (k + 1):
        k += 1
    tenths = (n * 10 + 1024**k // 2) // 1024**k
    return f"{tenths // 10}.{tenths % 10} {_UNITS[k]}" if k else f"{n} B"
