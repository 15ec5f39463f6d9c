"""rflow quantize: rflow's quantized safetensors layout and GGUF out, both read back by rflow.load with
no flags and generating exactly as the model quantized in memory."""

from __future__ import annotations

import json

import pytest
import torch

import rflow
from pipeline_ref import tiny_pipeline
from rflow.cli import main
from rflow.quant.api import quantize_
from rflow.quant.linear import quant_layers

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")
KW = dict(width=24, height=16, steps=3, max_sequence_length=16, output_type="latent")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant") / "pipe"
    tiny_pipeline(guidance=True).save_pretrained(d)
    return d


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def parts(folder):
    return dict(vae=folder / "vae", text_encoders=folder, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("suffix,plan", [(".safetensors", {"*": "int8"}), (".safetensors", {"double_blocks.*": "fp8",
                                         "single_blocks.*.linear1": "Q8_0", "*": "keep"}), (".gguf", {"*": "Q8_0"})])
def test_written_model_loads_with_no_flags_and_generates_as_in_memory(capsys, tmp_path, folder, suffix, plan):
    out = tmp_path / f"q{suffix}"
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    rc, stdout, err = cli(capsys, "quantize", "--model", folder, "--plan", plan_file, "-o", out, "--json")
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["output"] == str(out) and res["ratio"] < 1.0
    loaded = rflow.load(out, **parts(folder))
    want = rflow.load(folder, device="cpu", dtype=torch.float32)
    quantize_(want.transformer, plan)
    got_layers, want_layers = quant_layers(loaded.transformer), quant_layers(want.transformer)
    assert {n: m.format for n, m in got_layers.items()} == {n: m.format for n, m in want_layers.items()}
    for n, m in want_layers.items():
        assert torch.equal(got_layers[n].qweight.view(torch.uint8), m.qweight.view(torch.uint8)), n
    # the same packed layers; only the float summation order of unquantized layers may differ (~1e-6)
    torch.testing.assert_close(loaded.generate("a red cat", **KW), want.generate("a red cat", **KW), rtol=1e-5, atol=1e-5)
    rc, stdout, _ = cli(capsys, "info", out, "--json")
    info = json.loads(stdout)
    assert rc == 0 and info["weight_bytes"] < sum(p.numel() * 4 for p in rflow.load(folder, device="cpu").transformer.parameters())


def test_gguf_output_is_what_the_gguf_package_reads(capsys, tmp_path, folder):
    out = tmp_path / "q.gguf"
    rc, _, err = cli(capsys, "quantize", "--model", folder, "--to", "Q8_0", "-o", out)
    assert rc == 0, err
    model = rflow.load(folder, device="cpu", dtype=torch.float32).transformer
    quantize_(model, "Q8_0")
    r = gguf.GGUFReader(str(out))
    f = r.fields["general.architecture"]
    assert bytes(f.parts[f.data[0]]).decode() == "flux"
    tensors = {t.name: t for t in r.tensors}
    layers = quant_layers(model)
    for name, m in layers.items():
        t = tensors[f"{name}.weight"]
        assert t.tensor_type.name == "Q8_0" and tuple(int(d) for d in t.shape) == (m.in_features, m.out_features)
        assert bytes(t.data) == m.qweight.numpy().tobytes()
    one_d = [t for t in r.tensors if len(t.shape) == 1]
    assert one_d and all(t.tensor_type.name == "F32" for t in one_d)
    assert {"img_in.weight", "final_layer.linear.weight"} <= set(tensors)
    assert tensors["img_in.weight"].tensor_type.name in ("F16", "BF16", "F32")  # embedders stay high precision


@pytest.mark.parametrize("argv,fragment", [
    (["--to", "int8", "-o", "{tmp}/q.gguf"], "no GGUF type"),
    (["--to", "Q4_K", "-o", "{tmp}/q.safetensors"], "multiple of 256"),
    (["--to", "Q9_9", "-o", "{tmp}/q.safetensors"], "Q9_9"),
    (["--to", "int8", "--layers", "double_blocks.99.*", "-o", "{tmp}/q.safetensors"], "double_blocks.99"),
    (["-o", "{tmp}/q.safetensors"], "--to"),
    (["--to", "int8", "-o", "{tmp}/q.pt"], ".safetensors"),
])
def test_bad_requests_are_one_line_and_write_nothing(capsys, tmp_path, folder, argv, fragment):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, _, err = cli(capsys, "quantize", "--model", folder, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("rflow: error:") and fragment in lines[0], err
    assert not list(tmp_path.iterdir())


def test_generate_runs_a_quantized_file_with_each_cpu_compute_path(capsys, tmp_path, folder):
    out = tmp_path / "q.safetensors"
    assert cli(capsys, "quantize", "--model", folder, "--to", "int8", "-o", out)[0] == 0
    pngs = {}
    for mode in ("auto", "dequant", "int8"):
        png = tmp_path / f"{mode}.png"
        rc, _, err = cli(capsys, "generate", "a red cat", "--model", out, "--vae", folder / "vae", "--text-encoders",
                         folder, "--size", "24x16", "--steps", "2", "--compute", mode, "-o", png)
        assert rc == 0, err
        pngs[mode] = png.read_bytes()
    assert pngs["auto"] == pngs["dequant"]  # on the CPU auto is dequant
    rc, _, err = cli(capsys, "generate", "a red cat", "--model", out, "--vae", folder / "vae", "--text-encoders", folder,
                     "--compute", "fp8", "-o", tmp_path / "x.png")
    assert rc == 2 and err.startswith("rflow: error:") and "fp8" in err
    rc, _, err = cli(capsys, "generate", "a red cat", "--compute", "int4", "-o", tmp_path / "y.png")
    assert rc == 2 and "--compute" in err


def test_kquant_to_gguf_with_llama_cpp_fallback(capsys, tmp_path):
    """rflow-tiny's 192- and 960-wide layers do not fit Q4_K's 256 block: without --fallback that is a
    one-line error naming the flag; with it those layers are Q5_0 in the GGUF file and the rest Q4_K."""
    import gguf

    out = tmp_path / "t.gguf"
    rc, _, err = cli(capsys, "quantize", "--model", "rflow-tiny", "--to", "Q4_K", "-o", out)
    assert rc == 2 and "--fallback" in err and err.count("\n") == 1 and not out.exists()
    rc, stdout, err = cli(capsys, "quantize", "--model", "rflow-tiny", "--to", "Q4_K", "--fallback", "-o", out)
    assert rc == 0, err
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors if t.name.endswith(".weight")}
    model = rflow.load().transformer
    for name, m in quant_layers(quantize_(model, "Q4_K", fallback=True)).items():
        assert types[name + ".weight"] == ("Q4_K" if m.in_features % 256 == 0 else "Q5_0") == m.format
    assert {"Q4_K", "Q5_0"} <= set(types.values())
