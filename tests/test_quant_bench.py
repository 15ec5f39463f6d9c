"""benchmarks/quant_step.py: its CPU ``--small`` path runs and reports every entry, with the weight-size
ratios the formats imply; without CUDA its default invocation is a one-line error."""

import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "quant_step.py"

# FLUX.1-dev's (K, N) divided by 12, as --small runs them, 64 rows
SMALL_SHAPES = {"double img_attn.proj": (256, 256), "double img_mlp.0": (256, 1024), "double img_mlp.2": (1024, 256),
                "single linear1": (256, 1792), "single linear2": (1280, 256)}
MATMUL_TIMED = ["bf16", "int8_kernel", "int8_w8a8", "int8_dequant", "fp8_dequant", "q8_0_dequant", "q4_k_dequant"]
CUDA_ONLY = ["fp8_rowwise", "fp8_kernel"]
STEP_TIMED = ["bf16", "int8_dequant", "int8_w8a8", "fp8_dequant", "q8_0_dequant"]
# packed bytes / bf16 bytes: int8 and fp8 one byte a weight plus a float32 scale a row; GGUF exact per block
RATIO = {"int8": 0.5, "fp8": 0.5, "q8_0": 8.5 / 16, "q4_k": 4.5 / 16}
# rows of a weight with input width K add 4 bytes of scale to K bytes of codes: 2/K over 0.5
MIN_K = 256


def run(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant_bench") / "res.json"
    p = run("--device", "cpu", "--small", "--iters", "2", "--out", str(out))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout
    res = json.loads(lines[0])
    assert json.loads(out.read_text()) == res
    return res


def fmt_of(method: str) -> str | None:
    return next((f for f in RATIO if method.startswith(f + "_") and not method.endswith("kernel")), None)


def check_timing(entry: dict) -> None:
    assert "skipped" not in entry, entry
    assert math.isfinite(entry["ms"]) and entry["ms"] > 0, entry


def test_header(small):
    assert small["date"] == datetime.date.today().isoformat()
    assert small["torch"] == torch.__version__
    assert "CPU" in small["device"] and small["capability"] is None
    assert small["command"].startswith("python ") and "--small" in small["command"]
    assert small["small"] is True and small["iters"] == 2


def test_matmul_entries(small):
    rows = {r["layer"]: r for r in small["matmul"]}
    assert set(rows) == set(SMALL_SHAPES)
    for layer, (K, N) in SMALL_SHAPES.items():
        r = rows[layer]
        assert (r["M"], r["K"], r["N"]) == (64, K, N)
        res = r["results"]
        assert set(res) == set(MATMUL_TIMED + CUDA_ONLY)
        for m in CUDA_ONLY:
            assert "compute capability" in res[m]["skipped"]
        for m in MATMUL_TIMED:
            e = res[m]
            check_timing(e)
            assert e["tflops"] == pytest.approx(2 * 64 * K * N / (e["ms"] * 1e-3) / 1e12)
            if m.endswith("kernel"):
                continue
            assert e["rel_err"] < 0.15 and math.isfinite(e["rel_err"]), (layer, m, e)
            fmt = fmt_of(m)
            if fmt is None:
                assert e["weight_bytes"] == 2 * K * N and e["weight_ratio"] == 1.0
            else:
                assert e["weight_ratio"] == pytest.approx(e["weight_bytes"] / (2 * K * N))
                if fmt in ("int8", "fp8"):
                    assert e["weight_bytes"] == K * N + 4 * N
                else:
                    assert e["weight_ratio"] == RATIO[fmt]
        # the error grows as the bits shrink, bf16 rounding being the smallest
        assert res["bf16"]["rel_err"] < res["q8_0_dequant"]["rel_err"] < res["q4_k_dequant"]["rel_err"]


def test_step_entries(small):
    st = small["step"]
    assert (st["image_tokens"], st["text_tokens"]) == (64, 16)
    v = st["variants"]
    assert set(v) == set(STEP_TIMED) | {"fp8_rowwise"}
    assert "compute capability" in v["fp8_rowwise"]["skipped"]
    bf16 = v["bf16"]
    assert bf16["weight_ratio"] == 1.0 and bf16["rel_err_vs_bf16"] == 0.0 and bf16["quantize_s"] is None
    for name in STEP_TIMED:
        e = v[name]
        check_timing(e)
        assert e["peak_GiB"] is None  # no CUDA memory on the CPU
        assert e["bf16_weight_bytes"] == bf16["weight_bytes"]
        assert e["weight_ratio"] == pytest.approx(e["weight_bytes"] / bf16["weight_bytes"])
        # the unquantized rest (embedders, final layer, norms, biases) is the same in every variant
        assert e["model_bytes"] - e["weight_bytes"] == bf16["model_bytes"] - bf16["weight_bytes"]
        fmt = fmt_of(name)
        if fmt is None:
            continue
        assert e["quantize_s"] > 0 and 0 < e["rel_err_vs_bf16"] < 0.05, (name, e)
        if fmt in ("int8", "fp8"):
            assert RATIO[fmt] < e["weight_ratio"] <= RATIO[fmt] + 2 / MIN_K
        else:
            assert e["weight_ratio"] == RATIO[fmt]
    assert v["int8_dequant"]["weight_bytes"] == v["int8_w8a8"]["weight_bytes"] == v["fp8_dequant"]["weight_bytes"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("args", [(), ("--device", "cpu")])
def test_no_cuda_is_one_line_error(args):
    p = run(*args, timeout=60)
    assert p.returncode != 0 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quant_step.py: error:"), p.stderr
    assert ("CUDA" in lines[0]) if not args else ("--small" in lines[0])
