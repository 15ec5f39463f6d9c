"""benchmarks/lora_step.py: its CPU ``--small`` path runs every part (resident, streamed, budgeted,
quantized, no checkpointing) through the trainer's own LoRA and checkpointing code and records a
complete, finite record; a part out of time is recorded as such; without CUDA the default run is an error."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def _script():
    spec = importlib.util.spec_from_file_location("lora_step", ROOT / "benchmarks" / "lora_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def strict_json(path: Path) -> dict:
    def refuse(c):
        raise ValueError(f"non-finite {c} in the record")

    return json.loads(path.read_text(), parse_constant=refuse)


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_bench") / "lora.json"
    mod = _script()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert mod.main(["--device", "cpu", "--small", "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    return mod, strict_json(out)


def test_every_part_runs_the_trainer_step(record):
    mod, r = record
    p = r["parts"]
    assert list(p) == list(mod.PARTS) and r["jobs"] == "inprocess" and r["small"] is True
    assert all(e["status"] == "ok" for e in p.values()), {k: e.get("stderr_tail") for k, e in p.items()}
    res = [e["result"] for e in p.values()]
    # the tiny FLUX.1: 2 double blocks (qkv, proj, two MLP layers per stream) + 2 single blocks (linear1, linear2)
    assert {x["lora_layers"] for x in res} == {2 * 8 + 2 * 2}
    assert len({x["lora_parameters"] for x in res}) == 1 and res[0]["lora_parameters"] > 0
    for x in res:
        assert x["finite"] and len(x["losses"]) == 2 and all(positive(v) for v in x["losses"])
        assert positive(x["step_ms"]) and x["min_ms"] <= x["step_ms"] <= x["max_ms"] and x["rank"] == 16
        assert x["estimated_reserve_bytes"] > 16 * x["lora_parameters"]
        assert x.get("working_bytes") is None  # no GPU peak on the CPU
    assert [x["gradient_checkpointing"] for x in res] == [True] * 5 + [False]


def test_streamed_parts_refetch_blocks_in_backward(record):
    _, r = record
    every = r["parts"]["offload_all"]["result"]
    plan = every["offload_plan"]
    assert plan["resident_blocks"] == 0 and plan["streamed_blocks"] == 4
    # in steady state the forward fetches every block but the first two (left in the two slots by the last
    # backward) and backward, recomputing each checkpointed block, every block but the last two (still in
    # the slots): n - 2 + n - 2 blocks, here the two single blocks then the two double blocks
    assert every["streamed_bytes_per_step"] == plan["streamed_bytes"]
    assert every["backward_fetches"] == 2 * (every["steps"] + every["warmup"])
    for name in ("offload_12g", "fp8_offload_8g", "q8_0_offload_8g"):
        x = r["parts"][name]["result"]  # a 12 / 8 GiB budget holds the tiny model: every block resident
        assert x["offload_plan"]["streamed_blocks"] == 0 and x["offload_plan"]["budget"] == x["offload"] * GiB
        assert "streamed_bytes_per_step" not in x  # no streamer: nothing was streamed


def test_budgeted_parts_plan_with_the_trainers_reserve(record):
    _, r = record
    p = {k: e["result"] for k, e in r["parts"].items()}
    for name in ("offload_all", "offload_12g", "fp8_offload_8g", "q8_0_offload_8g"):
        assert p[name]["offload_plan"]["reserve"] == p[name]["estimated_reserve_bytes"]
    bf16 = p["offload_12g"]["estimated_reserve_bytes"]
    assert bf16 == p["resident"]["estimated_reserve_bytes"] < p["resident_no_ckpt"]["estimated_reserve_bytes"]
    for name in ("fp8_offload_8g", "q8_0_offload_8g"):
        extra = p[name]["estimated_reserve_bytes"] - bf16
        assert 0 < extra < p["resident"]["weight_bytes"] / 2  # the largest block's dequantized weights
        assert p[name]["weight_bytes"] < 0.5 * p["resident"]["weight_bytes"]  # float32 base at tiny scale


def test_summary_sets_ratios_and_leaves_gpu_targets_open_on_the_cpu(record):
    _, r = record
    s, p = r["summary"], r["parts"]
    assert s["resident_ms"] == p["resident"]["result"]["step_ms"]
    assert s["offload_all_over_resident"] == pytest.approx(p["offload_all"]["result"]["step_ms"] / s["resident_ms"])
    assert s["resident_peak_GiB"] is None  # no GPU memory on the CPU
    assert set(s["targets"].values()) == {None}


def test_a_part_out_of_time_is_recorded(tmp_path):
    out = tmp_path / "lora.json"
    assert _script().main(["--device", "cpu", "--small", "--out", str(out), "--parts", "resident",
                           "--jobs", "subprocess", "--limit", "1.5"]) == 0
    part = strict_json(out)["parts"]["resident"]
    assert part["status"] == "timeout" and part["result"] is None and part["wall_s"] < 10


@pytest.mark.parametrize("argv, fragment", [([], "needs a CUDA device"), (["--device", "cpu"], "--small"),
                                            (["--device", "cpu", "--small", "--parts", "nope"], "unknown part nope")])
def test_bad_invocations_are_one_line_errors(tmp_path, argv, fragment):
    if not argv and torch.cuda.is_available():
        pytest.skip("checks the error without CUDA")
    with pytest.raises(SystemExit) as e:
        _script().main([*argv, "--out", str(tmp_path / "x.json")])
    assert fragment in str(e.value) and str(e.value).startswith("lora_step.py: error:")
    assert not (tmp_path / "x.json").exists()
