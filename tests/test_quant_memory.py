"""Loading a quantized transformer costs about its file size in host memory, never the expanded model.

A FLUX.1-shaped transformer (hidden 1280, 2 double + 2 single blocks, 176 M parameters: ~187 MiB as
Q8_0, ~336 MiB in bf16, ~672 MiB in float32) is written twice: a GGUF file in city96's layout (its
Q8_0 blocks written directly as random bytes with valid float16 scales, so building it takes no
quantizer) and rflow's own safetensors layout (``save_quantized``). One fresh process loads each with
``rflow.load`` on the CPU (a tiny VAE beside it, rflow-tiny's text encoders, a cold hash cache), then
reads every byte of the transformer's tensors so that weights still only mapped from the file count
too. Its peak RSS (``VmHWM``, reset before each load) above the RSS at that moment must stay within
``PEAK_FACTOR`` × file size + ``PEAK_SLACK`` — below the bf16 model's size — and the packed buffers
must be exactly the file's Q8_0 bytes. The negative control expands the same files to bf16
(``keep_quantized=False``) and must break that bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

MiB = 2**20
PEAK_FACTOR, PEAK_SLACK = 1.25, 32 * MiB
HIDDEN, DOUBLE, SINGLE = 1280, 2, 2
UNQUANTIZED = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
FORMATS = ("gguf", "safetensors")


def write_random_city96(path, config) -> tuple[int, int]:
    """A GGUF file in city96's layout for ``config``: 2-D weights outside the embedders as Q8_0 blocks
    (random int8 values, float16 scales in [1e-6, 1e-5]), other 2-D tensors F16, 1-D F32. Returns
    (bytes of its Q8_0 tensors, parameters of the other tensors)."""
    from rflow.families import flux1

    with torch.device("meta"):
        model = flux1.build(config)
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "flux")
    packed = dense = 0
    for k, v in model.state_dict().items():
        shape = tuple(v.shape)
        if len(shape) == 2 and not k.startswith(UNQUANTIZED) and shape[1] % 32 == 0:
            rows, nb = shape[0], shape[1] // 32
            blocks = rng.integers(0, 256, size=(rows, nb, 34), dtype=np.uint8)
            scales = rng.uniform(1e-6, 1e-5, size=(rows, nb)).astype(np.float16)
            blocks[:, :, :2] = scales.view(np.uint8).reshape(rows, nb, 2)
            w.add_tensor(k, blocks.reshape(rows, nb * 34), raw_dtype=T.Q8_0)
            packed += blocks.nbytes
        else:
            a = rng.standard_normal(shape, dtype=np.float32) * 0.02
            w.add_tensor(k, a if len(shape) == 1 else a.astype(np.float16))
            dense += a.size
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return packed, dense


_MEASURE = textwrap.dedent("""
    import ctypes, gc, json, os, sys
    import torch
    torch.set_num_threads(2)
    import rflow

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    def measure(name, path, keep, dtype):
        os.environ["RFLOW_CACHE_DIR"] = os.path.join({cache!r}, name)  # a cold hash cache for each load
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to the current RSS
            f.write("5")
        base = status("VmRSS")
        pipe = rflow.load(path, text_encoders={text!r}, device="cpu", dtype=dtype, keep_quantized=keep)
        tensors = list(pipe.transformer.parameters()) + list(pipe.transformer.buffers())
        for t in tensors:  # read every byte: weights only mapped from the file count once touched
            t.detach().reshape(-1).view(torch.uint8).max()
        return {{"peak": status("VmHWM") - base,
                "packed": sum(t.numel() * t.element_size() for t in tensors if t.dtype == torch.uint8),
                "resident": sum(t.numel() * t.element_size() for t in tensors)}}

    rflow.load(device="cpu")  # warm-up: the imports a load needs
    import gguf, gguf.quants, rflow.checkpoints.vae, rflow.quant.load, rflow.quant.gguf_codecs
    runs = {runs!r}
    print(json.dumps({{name: measure(name, path, keep, getattr(torch, dtype)) for name, path, keep, dtype in runs}}))
""")

# Large blocks straight from mmap and back to the system when freed (as tests/test_memory.py does).
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """{format: file facts}, {"<format>-packed" | "<format>-expanded": what its load measured}."""
    from rflow.checkpoints.io import save_safetensors
    from rflow.checkpoints.loader import load_transformer
    from rflow.checkpoints.vae import config_metadata
    from rflow.models.flux import FluxConfig
    from rflow.models.vae import AutoEncoder, VAEConfig
    from rflow.paths import embedded_model_dir
    from rflow.quant.load import keep_quantized_plan
    from rflow.quant.save import save_quantized

    root = tmp_path_factory.mktemp("quant-memory")
    text = embedded_model_dir()  # rflow-tiny's CLIP and T5, both 64 wide
    vae = VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=4)
    save_safetensors(AutoEncoder(vae).state_dict(), root / "ae.safetensors",  # found beside the transformer files
                     metadata=config_metadata(vae))
    config = FluxConfig(hidden_size=HIDDEN, num_heads=HIDDEN // 128, in_channels=16, out_channels=16,
                        context_in_dim=64, vec_in_dim=64, double_mlp=[(4 * HIDDEN, 4 * HIDDEN)] * DOUBLE,
                        single_mlp=[4 * HIDDEN] * SINGLE)
    paths = {"gguf": root / "flux-Q8_0.gguf", "safetensors": root / "flux-Q8_0.safetensors"}
    packed, dense = write_random_city96(paths["gguf"], config)
    model, _ = load_transformer(paths["gguf"], dtype=torch.bfloat16,
                                plan=keep_quantized_plan(paths["gguf"], dtype=torch.bfloat16))
    params = dense + sum(m.out_features * m.in_features for m in model.modules() if hasattr(m, "qweight"))
    save_quantized(model, paths["safetensors"])
    del model
    facts = {f: {"file": p.stat().st_size, "packed": packed, "dense": dense, "params": params}
             for f, p in paths.items()}
    runs = [(f"{f}-packed", str(paths[f]), None, "float32") for f in FORMATS]
    runs += [(f"{f}-expanded", str(paths[f]), False, "bfloat16") for f in FORMATS]
    script = _MEASURE.format(runs=runs, cache=str(root / "cache"), text=str(text))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **_MALLOC_ENV})
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in results.items():  # shown with -s: the numbers docs/compression.md quotes
        f = facts[name.split("-")[0]]
        print(f"{name}: file {f['file'] / MiB:.1f} MiB, peak +{r['peak'] / MiB:.1f} MiB "
              f"({r['peak'] / f['file']:.2f}x), resident {r['resident'] / MiB:.1f} MiB, "
              f"packed {r['packed'] / MiB:.1f} MiB, bf16 model {2 * f['params'] / MiB:.1f} MiB")
    return facts, results


def bound(file_bytes: int) -> float:
    return PEAK_FACTOR * file_bytes + PEAK_SLACK


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_load_peaks_near_the_file_size(measured, fmt):
    facts, results = measured
    f, r = facts[fmt], results[f"{fmt}-packed"]
    assert bound(f["file"]) < 0.85 * 2 * f["params"]  # the bound tells a packed load from a bf16 one
    assert r["packed"] == f["packed"]  # every Q8_0 block resident, once
    assert r["resident"] == f["packed"] + 4 * f["dense"]  # the rest in float32: biases, norms, embedders
    assert r["peak"] <= bound(f["file"]), {**r, **f}


@pytest.mark.parametrize("fmt", FORMATS)
def test_expanded_load_breaks_the_bound(measured, fmt):
    """The negative control: the same file expanded to bf16 (keep_quantized=False) breaks the bound."""
    facts, results = measured
    f, r = facts[fmt], results[f"{fmt}-expanded"]
    assert r["packed"] == 0 and r["resident"] == 2 * f["params"]
    assert r["peak"] > bound(f["file"]), {**r, **f}
