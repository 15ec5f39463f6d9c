"""rflow bench: the CPU run at tiny size writes a complete record (timings, op floor, ratios, image),
--compare diffusers runs diffusers' model on rflow's own tensors with agreeing outputs, bad options are
one-line errors before anything is built, and benchmarks/gpu_runtime.py runs its parts (--small) and
records a part that runs out of time."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from rflow.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY = ["bench", "--device", "cpu", "--size", "64", "--iters", "2", "--warmup", "1", "--steps", "2"]


def strict_json(path: Path) -> dict:
    def refuse(c):
        raise ValueError(f"non-finite {c} in the record")

    return json.loads(path.read_text(), parse_constant=refuse)


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_tiny_bench_writes_a_complete_record(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc, stdout, err = cli(capsys, *TINY, "--config", "tiny", "--json", out)
    assert rc == 0, err
    r = strict_json(out)
    assert r["device"].endswith(")") and r["torch"] == torch.__version__ and r["date"][:2] == "20"
    assert r["command"].startswith("rflow bench --config tiny --size 64")
    c = r["config"]
    assert (c["name"], c["family"], c["scale"], c["width"], c["batch"]) == ("tiny", "flux1", "tiny", 64, 1)
    assert (c["image_tokens"], c["text_tokens"], c["dtype"]) == (16, 32, "float32")  # 64² -> 8² latent -> 4² tokens
    step = r["rflow"]
    assert positive(step["ms"]) and len(step["all_ms"]) == 2 and all(map(positive, step["all_ms"]))
    assert positive(step["first_call_s"]) and step["peak_gpu_bytes"] is None and step["finite"] is True
    f = r["floor"]
    # FLUX.1, 2 double + 2 single blocks: 10 linears a double block, 3 a single one, 10 outside them
    assert sum(m["count"] for m in f["matmuls"]) == 2 * 10 + 2 * 3 + 10
    assert sum(a["count"] for a in f["attention"]) == 4
    linear1 = [m for m in f["matmuls"] if (m["M"], m["K"], m["N"]) == (48, 128, 3 * 128 + 512)]
    assert len(linear1) == 1 and linear1[0]["count"] == 2 and linear1[0]["layer"] == "single_blocks.0.linear1"
    assert all(positive(m["ms"]) and positive(m["tflops"]) and m["kernel"] == "dense" for m in f["matmuls"])
    for a in f["attention"]:
        assert a["q"] == [1, 4, 48, 32] and isinstance(a["backends"]["math"], float) and a["ms"] == a["backends"][a["best"]]
    assert f["ms"] == pytest.approx(f["matmul_ms"] + f["attention_ms"])
    assert f["matmul_ms"] == pytest.approx(sum(m["count"] * m["ms"] for m in f["matmuls"]))
    assert step["ratio_to_floor"] == pytest.approx(step["ms"] / f["ms"])
    img = r["image"]
    assert img["steps"] == 2 and positive(img["s"]) and positive(img["decode_ms"]) and img["finite"] is True
    assert "op floor" in stdout and "rflow eager" in stdout and str(out) in stdout


# FLUX.1 (--config tiny) is compared in test_gpu_runtime_smoke's bf16 part
@pytest.mark.parametrize("config", [["--config", "flux2-klein-4b", "--scale", "tiny"],
                                    ["--config", "zimage", "--scale", "tiny"]], ids=["flux2", "zimage"])
def test_compare_diffusers_agrees(config, tmp_path, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "cmp.json"
    rc, stdout, err = cli(capsys, *TINY, *config, "--compare", "diffusers", "--no-image", "--batch", "2", "--json", out)
    assert rc == 0, err
    r = strict_json(out)
    d, ours = r["diffusers"], r["rflow"]
    assert d["class"].endswith("Transformer2DModel") and positive(d["ms"]) and positive(ours["ms"])
    assert d["ref_max_abs"] > 0.5 and d["max_abs_diff"] <= 1e-4 * d["ref_max_abs"] and d["rel_err"] < 1e-5
    assert d["ratio_to_floor"] == pytest.approx(d["ms"] / r["floor"]["ms"])
    assert "diffusers eager" in stdout


def test_diffusers_model_shares_rflow_tensors():
    pytest.importorskip("diffusers")
    from rflow.runtime import bench_models as bm, diffusers_ref

    fam, cfg = bm.published("tiny")
    cpu = torch.device("cpu")
    model = bm.build_random(fam, bm.scaled(fam, cfg, "tiny"), cpu, torch.float32, 0)
    ref = diffusers_ref.build(fam, model)
    assert ref.transformer_blocks[1].attn.to_k.weight.data_ptr() == \
        model.double_blocks[1].img_attn.qkv.weight[128:].data_ptr()  # a row view of the fused qkv, no copy
    inputs = bm.step_inputs(fam, model, (1, 16, 8, 8), 8, cpu, 1)
    theirs = diffusers_ref.step(fam, ref, inputs.args)
    with torch.no_grad():
        ref.norm_out.linear.weight[:128].mul_(1.5)  # the one copied tensor (the swapped halves): now they differ
        assert diffusers_ref.agreement(model(*inputs.args), theirs())["rel_err"] > 1e-3


BAD = [
    (["--config", "nope"], "unknown --config 'nope'"),
    (["--config", "tiny", "--size", "100"], "multiples of 16"),
    (["--config", "tiny", "--size", "64x"], "--size must look like"),
    (["--config", "tiny", "--batch", "0"], "--batch must be ≥ 1"),
    (["--config", "tiny", "--iters", "0"], "--iters must be ≥ 1"),
    (["--config", "tiny", "--warmup", "-1"], "--warmup must be ≥ 0"),
    (["--config", "tiny", "--model", "rflow-tiny"], "not both"),
    (["--config", "tiny", "--scale", "huge"], "unknown --scale"),
    (["--config", "tiny", "--vram", "4GiB"], "--vram limits offloading"),
    (["--config", "tiny", "--offload", "sometimes"], "unknown --offload"),
    (["--config", "tiny", "--compute", "fp8"], "compute capability"),
    (["--config", "tiny", "--quant", "Q9"], "unknown quantization format"),
    (["--config", "tiny", "--quant", "Q8_0", "--compute", "int8"], "needs int8 layers"),
    (["--config", "tiny", "--compare", "comfyui"], "unknown --compare"),
    (["--config", "tiny", "--compare", "diffusers", "--offload", "blocks"], "leave out --offload"),
    (["--config", "flux1-dev", "--dtype", "fp64"], "unknown dtype"),
]


@pytest.mark.parametrize("args,fragment", BAD, ids=[b[1] for b in BAD])
def test_bad_options_are_one_line_errors(args, fragment, capsys):
    rc, stdout, err = cli(capsys, *TINY, *args)
    assert rc == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rflow: error: ") and fragment in lines[0], err


def test_json_output_checks(tmp_path, capsys):
    folder = tmp_path / "dir.json"
    folder.mkdir()
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    for target, fragment in ((tmp_path, "must be a .json file"), (folder, "is a directory"), (existing, "--force")):
        rc, _, err = cli(capsys, *TINY, "--config", "tiny", "--json", target)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("rflow: error: ") and fragment in lines[0], err
    assert existing.read_text() == "{}"


def _gpu_runtime():
    spec = importlib.util.spec_from_file_location("gpu_runtime", ROOT / "benchmarks" / "gpu_runtime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_runtime_smoke(tmp_path, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "gpu.json"
    assert _gpu_runtime().main(["--device", "cpu", "--small", "--out", str(out),
                                "--parts", "bf16,fp8,offload,profile,compiled"]) == 0
    r = strict_json(out)
    p = r["parts"]
    assert list(p) == ["bf16", "fp8", "offload", "profile", "compiled"] and r["jobs"] == "inprocess"
    bf16 = p["bf16"]["result"]
    assert p["bf16"]["status"] == "ok" and bf16["config"]["name"] == "tiny" and positive(bf16["floor"]["ms"])
    d = bf16["diffusers"]
    assert d["ref_max_abs"] > 0.5 and d["max_abs_diff"] <= 1e-4 * d["ref_max_abs"] and positive(d["ms"])
    assert p["fp8"]["status"] == "skipped" and "capability" in p["fp8"]["reason"]
    assert p["compiled"]["status"] == "skipped"
    off = p["offload"]["result"]["offload"]
    assert p["offload"]["status"] == "ok" and len(off["streamed"]) == 4 and off["streamed_bytes"] > 0
    top = p["profile"]["result"]["top"]
    assert p["profile"]["status"] == "ok" and top and 0 < top[0]["share"] <= 1
    s = r["summary"]
    assert s["bf16_ms"] == bf16["rflow"]["ms"] and s["bf16_over_floor"] == pytest.approx(bf16["rflow"]["ratio_to_floor"])
    assert s["targets"]["fp8 step <= 1.07 x its floor"] is None


def test_gpu_runtime_records_a_part_out_of_time(tmp_path):
    out = tmp_path / "gpu.json"
    assert _gpu_runtime().main(["--device", "cpu", "--small", "--out", str(out), "--parts", "offload",
                                "--jobs", "subprocess", "--limit", "1.5"]) == 0
    part = strict_json(out)["parts"]["offload"]
    assert part["status"] == "timeout" and part["result"] is None and part["wall_s"] < 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bench_records_gpu_memory(tmp_path, capsys):
    out = tmp_path / "cuda.json"
    rc, _, err = cli(capsys, "bench", "--config", "tiny", "--device", "cuda", "--size", "256", "--iters", "3",
                     "--compare", "diffusers", "--json", out)
    assert rc == 0, err
    r = strict_json(out)
    assert r["rflow"]["peak_gpu_bytes"] > 0 and r["diffusers"]["peak_gpu_bytes"] > 0 and r["cuda"]
    assert r["diffusers"]["rel_err"] < 0.05  # bf16
    assert r["floor"]["attention"][0]["best"] in ("cudnn", "flash", "efficient", "math")
