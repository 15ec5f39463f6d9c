"""GGUF files as users have them (city96's FLUX layout, read by ComfyUI-GGUF): BFL key names, large
weights quantized, 1-D and small tensors and the embedders in F32/F16 — written here with the ``gguf``
package's own writer and read by rflow's loader like any checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flux_ref import diffusers_inputs, to_bfl, tiny_transformer
from rflow.checkpoints.gguf_file import GGUFFile
from rflow.checkpoints.loader import Checkpoint, load_transformer
from rflow.errors import UserError

gguf = pytest.importorskip("gguf")
import gguf.quants  # noqa: E402

UNQUANTIZED = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def write_city96(sd: dict[str, torch.Tensor], path, qtype="Q8_0") -> dict[str, str]:
    """Write ``sd`` (BFL keys) as city96 does; returns the GGML type chosen per key."""
    T = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "flux")
    types = {}
    for k, v in sd.items():
        a = v.float().numpy()
        if a.ndim == 2 and not k.startswith(UNQUANTIZED) and a.shape[1] % 32 == 0 and a.size >= 1024:
            w.add_tensor(k, gguf.quants.quantize(a, T[qtype]), raw_dtype=T[qtype])
            types[k] = qtype
        elif a.ndim == 1:
            w.add_tensor(k, a.astype(np.float32))
            types[k] = "F32"
        else:
            w.add_tensor(k, a.astype(np.float16))
            types[k] = "F16"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


@pytest.fixture(scope="module")
def city96(tmp_path_factory):
    ref = tiny_transformer(depth=1, depth_single=1)
    sd = to_bfl(ref.state_dict())
    path = tmp_path_factory.mktemp("gguf") / "flux1-tiny-Q8_0.gguf"
    types = write_city96(sd, path)
    assert "Q8_0" in types.values() and "F16" in types.values() and "F32" in types.values()
    return ref, path, types


def dequantized(path) -> dict[str, torch.Tensor]:
    r = gguf.GGUFReader(str(path))
    return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            .reshape(tuple(int(d) for d in reversed(list(t.shape)))) for t in r.tensors}


def test_gguf_file_reads_like_safetensors(city96):
    _, path, types = city96
    want = dequantized(path)
    with GGUFFile(path) as f:
        assert set(f.keys()) == set(types) and f.metadata["general.architecture"] == "flux"
        for k, q in types.items():
            assert f.qtype(k) == q and f.shapes[k] == tuple(want[k].shape)
            assert torch.equal(f.get(k, torch.float32), want[k])
            if q == "Q8_0":
                packed = f.get_stored(k)
                assert packed.dtype == torch.uint8 and packed.shape == (want[k].shape[0], want[k].shape[1] // 32 * 34)


def test_flux_gguf_loads_as_its_dequantized_weights(city96):
    ref, path, _ = city96
    with Checkpoint(path) as ck:
        assert ck.family.NAME == "flux1" and ck.format == "bfl"
        fp = ck.fingerprint()
    model, info = load_transformer(path, dtype=torch.float32)
    assert info.num_params == sum(p.numel() for p in model.parameters())
    sd = model.state_dict()
    for k, v in dequantized(path).items():
        assert torch.equal(sd[k], v), k
    # the GGUF model computes what the diffusers model with the same (dequantized) weights computes
    _, args = diffusers_inputs(ref, h=2, w=3)
    with torch.no_grad():
        out = model(*args)
    assert torch.isfinite(out).all()
    # a fingerprint of the stored tensors: stable across loads, not the dense model's
    with Checkpoint(path) as ck:
        assert ck.fingerprint() == fp


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_bad_gguf_is_one_line(city96, tmp_path, damage):
    _, path, _ = city96
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"GGUF" + b"\xff" * 64)
    with pytest.raises(UserError) as e:
        load_transformer(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_info_shows_formats_and_bytes(city96, capsys):
    import json

    from rflow.cli import main

    _, path, types = city96
    assert main(["info", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    counts = {q: list(types.values()).count(q) for q in set(types.values())}
    assert s["dtypes"] == counts and s["weight_bytes"] == sum(t.n_bytes for t in gguf.GGUFReader(str(path)).tensors)
    assert s["weight_bytes"] < path.stat().st_size
    assert main(["info", str(path)]) == 0
    assert "Q8_0" in capsys.readouterr().out


def test_gguf_pipeline_keeps_the_blocks_packed_and_generates_as_dequantized(tmp_path):
    """rflow.load on a GGUF transformer: its quantized linears stay GGUF blocks (GGUFLinear), resident
    bytes are the packed bytes, and generation equals the expanded model exactly."""
    from pipeline_ref import tiny_pipeline

    import rflow
    from rflow.quant.linear import GGUFLinear, quant_layers

    pipe = tiny_pipeline(guidance=True)
    pipe.save_pretrained(tmp_path / "pipe")
    path = tmp_path / "pipe" / "flux-Q8_0.gguf"
    types = write_city96(to_bfl(pipe.transformer.state_dict()), path)
    parts = dict(vae=tmp_path / "pipe" / "vae", text_encoders=tmp_path / "pipe", device="cpu", dtype=torch.float32)
    packed = rflow.load(path, **parts)
    expanded = rflow.load(path, keep_quantized=False, **parts)
    layers = quant_layers(packed.transformer)
    assert {f"{n}.weight" for n in layers} == {k for k, q in types.items() if q == "Q8_0"}
    assert all(isinstance(m, GGUFLinear) and m.qtype == "Q8_0" for m in layers.values())
    assert not quant_layers(expanded.transformer)
    resident = sum(b.numel() * b.element_size() for b in packed.transformer.buffers() if b.dtype == torch.uint8)
    assert resident == sum(t.n_bytes for t in gguf.GGUFReader(str(path)).tensors if t.tensor_type.name == "Q8_0")
    kw = dict(width=24, height=16, steps=3, max_sequence_length=16, output_type="latent")
    assert torch.equal(packed.generate("a red cat", **kw), expanded.generate("a red cat", **kw))
