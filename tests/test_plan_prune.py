"""The planner's pruning options (prune50, prune25+Q8_0 …): shapes and bytes without a model call, the
pruned candidate equal to a real prune, plans that prune and the files ``rflow quantize --plan`` makes of
them, and distillation on a capture."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rflow
from rflow.checkpoints.loader import load_transformer
from rflow.cli import main
from rflow.compress.capture import CaptureReader, capture
from rflow.compress.measure import reference_trajectories
from rflow.compress.prune import choose_kept, prune_model, pruned_copy
from rflow.compress.units import unit_names
from rflow.compress.workload import Workload
from rflow.errors import UserError
from rflow.pipeline import save_pipeline
from rflow.quant import planner as P
from rflow.quant.api import linear_layers, quantize_
from rflow.quant.plan_measure import CaptureErrors, TrajectoryErrors
from rflow.quant.plan_options import (block_groups, choose_pruned, kept_count, normalize_option, planned_model, pruned_shapes,
                                      split_option)
from rflow.world import shapes, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden=32, heads=2, depth=2, depth_single=2, mlp_ratio=2.0)  # MLP width 64; linear widths 32, 64, 96
SIZE = (32, 32)


def _workload(n=3, steps=3, seed=0):
    return Workload(shapes.prompts(n, seed=5), [SIZE], [steps], seed=seed, source="shapes")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("planprune")
    p = tiny.build(seed=0, **SMALL)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # tiny.build starts blocks as the identity: give them something to lose
        for name, prm in p.transformer.named_parameters():
            if "mod" in name or "final_layer" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.2)
    save_pipeline(p, root / "model", dtype=torch.float32)
    pipe = rflow.load(root / "model", device="cpu")
    return pipe, root


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_options_parse_and_split():
    assert P.parse_options("bf16, prune25 ,PRUNE50+q8_0,prune50+keep,int8") == [
        "bf16", "prune25", "prune50+Q8_0", "prune50", "int8"]
    assert split_option("prune25+Q4_K") == (0.25, "Q4_K")
    assert split_option("prune50") == (0.5, "bf16")
    assert split_option("fp8") == (None, "fp8")
    for bad in ("prune0", "prune100", "prune25+Q9", "prunex"):
        with pytest.raises(UserError) as e:
            normalize_option(bad)
        assert "\n" not in str(e.value)


def test_pruned_copy_equals_a_real_prune_and_leaves_the_model_alone(env):
    pipe, _ = env
    model = pipe.transformer
    before, widths = _state(model), copy.deepcopy(model.config.to_dict())
    g = torch.Generator().manual_seed(3)
    kept = {u: torch.sort(torch.randperm(64, generator=g)[:24]).values
            for u in ("double_blocks.1.img", "double_blocks.1.txt", "single_blocks.0")}
    got = pruned_copy(model, kept)
    want = prune_model(copy.deepcopy(model), kept)
    gs, ws = got.state_dict(), want.state_dict()
    assert gs.keys() == ws.keys() and all(torch.equal(gs[k], ws[k]) for k in gs)
    assert got.config.to_dict() == want.config.to_dict() != widths
    after = model.state_dict()
    assert model.config.to_dict() == widths and all(torch.equal(before[k], after[k]) for k in before)
    # the blocks it did not prune are the model's own, not copies
    assert got.double_blocks[0] is model.double_blocks[0] and got.single_blocks[1] is model.single_blocks[1]
    assert got.double_blocks[1] is not model.double_blocks[1]


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_pruned_shapes_and_bytes_without_a_model_call(env, fraction):
    pipe, _ = env
    model = pipe.transformer
    units = P.group_units(linear_layers(model))
    stats_free = {u: torch.arange(kept_count(64, fraction)) for u in unit_names(model.config)}
    real = pruned_copy(model, stats_free)
    for unit, layers in units.items():
        groups = block_groups(model, unit)
        assert groups, unit
        shapes_ = pruned_shapes(model, layers, groups, fraction)
        assert shapes_ == {n: (real.get_submodule(n).out_features, real.get_submodule(n).in_features) for n in layers}
        entry = P.option_entry(model, unit, layers, f"prune{int(fraction * 100)}", "block")
        assert entry["bytes"] == sum(2 * a * b for a, b in shapes_.values())
    # 25% of 64 leaves 48: the double blocks' MLP output layer (input 48) cannot take a block-32 format
    entry = P.option_entry(model, "double_blocks.0", units["double_blocks.0"], "prune25+Q8_0", "block")
    assert ("reason" in entry) == (fraction == 0.25) or fraction == 0.5
    layer_entry = P.option_entry(model, "double_blocks.0.img_mlp.0", ["double_blocks.0.img_mlp.0"], "prune50", "layer")
    assert "whole blocks" in layer_entry["reason"]


def test_plan_that_prunes_and_the_file_quantize_makes_of_it(env, capsys):
    pipe, root = env
    model = pipe.transformer
    before = _state(model)
    options = "bf16,Q8_0,prune50,prune50+Q8_0"
    rows = P.unit_table(model, P.parse_options(options))
    q8 = sum(next(o["bytes"] for o in r["options"] if o["option"] == "Q8_0") for r in rows)
    budget = int(q8 * 0.85)  # below uniform Q8_0: some block has to be pruned
    res = P.plan(pipe, _workload(), budget, options=options)
    assert res["bytes"] <= budget
    chosen = {u["unit"]: u["chosen"] for u in res["units"]}
    pruned_units = [u for u, o in chosen.items() if o.startswith("prune")]
    assert pruned_units and set(res["prune"]) == {g.name for u in pruned_units for g in block_groups(model, u)}
    assert all(len(v) == kept_count(64, 0.5) for v in res["prune"].values())
    assert res["distill"] is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the planner leaves the model as it was

    # the same model built by hand — prune for real, then quantize — has the plan's actual error
    trajs = reference_trajectories(pipe, _workload())
    kept = {u: torch.tensor(v) for u, v in res["prune"].items()}
    hand = prune_model(copy.deepcopy(model), kept)
    quantize_(hand, {n: f for n, f in res["layers"].items() if f != "bf16"})
    assert TrajectoryErrors(pipe, trajs).error(hand)["velocity_mse"] == pytest.approx(res["actual_error"], rel=1e-9)
    # the kept units are the most often firing ones at the planner's points
    stats = TrajectoryErrors(pipe, trajs).activation_stats()
    some = next(iter(res["prune"]))
    assert res["prune"][some] == choose_kept(stats, [some], fraction=0.5)[some].tolist()

    plan_path = root / "plan.json"
    plan_path.write_text(json.dumps(res))
    out = root / "q.safetensors"
    rc, _, err = cli(capsys, "quantize", "--model", root / "model", "--plan", plan_path, "-o", out, "--json")
    assert rc == 0, err
    loaded, _ = load_transformer(out, device="cpu")
    assert TrajectoryErrors(pipe, trajs).error(loaded)["velocity_mse"] == pytest.approx(res["actual_error"], rel=1e-9)
    assert loaded.config.to_dict() == hand.config.to_dict()


def test_capture_plan_distils_pruned_blocks(env, capsys, tmp_path):
    pipe, root = env
    model = pipe.transformer
    cap = tmp_path / "cap"
    capture(pipe, _workload(6, steps=4), cap, budget_bytes=10**8)
    reader = CaptureReader(cap)
    settings = {"steps": 30, "lr": 1e-2, "batch": 4}
    rows = P.unit_table(model, ["prune50"])
    budget = sum(r["options"][0]["bytes"] for r in rows)  # every block pruned
    res = P.plan(pipe, None, budget, options="bf16,prune50", capture=reader, distill_settings=settings)
    assert all(u["chosen"] == "prune50" for u in res["units"])
    assert res["distill"]["steps"] == 30 and res["measured_on"]["source"] == "capture"
    source = CaptureErrors(pipe, reader)
    stats = source.activation_stats()
    for u in res["units"]:
        o = next(o for o in u["options"] if o["option"] == "prune50")
        assert all(d["final_heldout_mse"] < d["initial_heldout_mse"] for d in o["distillation"])
        # distilled, the pruned block's error is below the same prune without distillation
        kept = choose_pruned(model, stats, {u["unit"]: 0.5})
        with planned_model(model, {}, kept) as (plain, _):
            undistilled = source.error(plain)["velocity_mse"]
        assert o["error"] < undistilled

    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(res))
    out = tmp_path / "q.safetensors"
    args = ["quantize", "--model", root / "model", "--plan", plan_path, "-o", out]
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and "--capture" in err and err.count("\n") == 1 and not out.exists()
    rc, _, err = cli(capsys, *args, "--capture", cap)
    assert rc == 0, err
    loaded, _ = load_transformer(out, device="cpu")
    # the distillation is seeded: quantize --plan --capture rebuilds the planner's student
    assert source.error(loaded)["velocity_mse"] == pytest.approx(res["actual_error"], rel=1e-6)


def test_plan_cli_with_pruning_and_one_line_errors(env, capsys, tmp_path):
    _, root = env
    out = tmp_path / "p.json"
    base = ["plan", "--model", root / "model", "--shapes", 2, "--steps", 2, "--sizes", "32x32", "-o", out]
    rc, stdout, err = cli(capsys, *base, "--budget", "50%", "--options", "bf16,Q8_0,prune50+Q8_0")
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["bytes"] <= res["budget_bytes"] and "velocity MSE" in stdout
    for argv, msg in ((["--budget", "40%", "--options", "prune0"], "pruning share"),
                      (["--budget", "40%", "--capture", str(tmp_path)], "not several"),
                      (["--budget", "40%", "--distill-steps", "0"], "--distill-steps")):
        rc, _, err = cli(capsys, *base, *argv, "--force")
        assert rc == 2 and msg in err and err.count("\n") == 1, err


def test_quantize_capture_needs_a_plan(env, capsys, tmp_path):
    _, root = env
    rc, _, err = cli(capsys, "quantize", "--model", root / "model", "--to", "Q8_0", "--capture", tmp_path,
                     "-o", tmp_path / "q.safetensors")
    assert rc == 2 and "--capture goes with --plan" in err and err.count("\n") == 1
