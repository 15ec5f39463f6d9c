"""Capture -> distill -> patch on a tiny random FLUX pipeline: exact block replay, budgets, one-line errors,
held-out loss going down, patches that reproduce the trained blocks, and the CLI round trip."""

import copy
import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import rflow
from rflow.world import shapes, tiny
from rflow.checkpoints.flux import load_flux
from rflow.checkpoints.io import open_weights, save_safetensors
from rflow.cli import main
from rflow.compress.capture import INDEX, CaptureReader, capture, get_block, parse_bytes
from rflow.compress.distill import _Data, _mse, distill
from rflow.compress.patches import (apply_patches, load_with_patches, model_fingerprint, read_patches, save_patches,
                                    write_patched)
from rflow.compress.prune import KEPT_PREFIX, kept_tensors, prune_model
from rflow.compress.workload import Workload
from rflow.errors import UserError
from rflow.pipeline import save_pipeline

SMALL = dict(hidden=32, heads=2, depth=2, depth_single=2, mlp_ratio=2.0)  # layers 0-1 double, 2-3 single
SIZE = (32, 32)  # 8x8 latent -> 16 image tokens
STEPS = 4
PROMPTS = 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise(model, seed=1):
    """tiny.build zero-initialises modulations and the output layer (blocks start as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mod" in name or "final_layer" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _workload(n=PROMPTS, steps=STEPS, seed=0):
    return Workload(shapes.prompts(n, seed=3), [SIZE], [steps], seed=seed, source="shapes")


def _dir_bytes(d):
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("capdist")
    p = tiny.build(seed=0, **SMALL)
    _randomise(p.transformer)
    save_pipeline(p, root / "teacher", dtype=torch.float32)
    pipe = rflow.load(root / "teacher", device="cpu")

    g = torch.Generator().manual_seed(7)
    kept = {u: torch.sort(torch.randperm(64, generator=g)[:16]).values
            for u in ("double_blocks.0.img", "double_blocks.0.txt", "double_blocks.1.img", "single_blocks.0", "single_blocks.1")}
    student = prune_model(copy.deepcopy(pipe.transformer), kept)
    save_pipeline(replace(pipe, transformer=student), root / "student", dtype=torch.float32)
    tfile = root / "student" / "transformer.safetensors"
    with open_weights(tfile) as f:  # a pruned model carries its kept indices, as rflow prune writes them
        sd, meta = dict(f.items()), dict(f.metadata)
    save_safetensors({**sd, **kept_tensors(kept)}, tfile, meta)

    cap = root / "cap"
    res = capture(pipe, _workload(), cap, budget_bytes=parse_bytes("50MB"))
    return SimpleNamespace(root=root, pipe=pipe, teacher=pipe.transformer, kept=kept, cap=cap, res=res,
                           student_dir=root / "student", student_fp=model_fingerprint(root / "student"))


def _student(env):
    model, _ = load_flux(env.student_dir / "transformer.safetensors", device="cpu")
    return model


@pytest.fixture(scope="module")
def distilled(env):
    reader = CaptureReader(env.cap)
    patches, report = distill(env.teacher, _student(env), reader, steps=40, lr=1e-2, batch=4, seed=0)
    path = env.root / "patches.safetensors"
    save_patches(path, patches, train="mlp", report=report, teacher_fingerprint=env.pipe.fingerprint,
                 student_fingerprint=env.student_fp)
    return SimpleNamespace(reader=reader, patches=patches, report=report, path=path)


# ---------------------------------------------------------------------------------------------- capture


def test_capture_replays_every_block_exactly(env):
    assert env.res["records"] == PROMPTS * STEPS and env.res["stopped"] is None
    r = CaptureReader(env.cap)
    idx = json.loads((env.cap / INDEX).read_text())
    assert idx["schema"] == "rflow.capture" and idx["version"] == 1 and idx["complete"]
    assert idx["model"]["fingerprint"] == env.pipe.fingerprint and idx["model"]["config"] == env.teacher.config.to_dict()
    assert r.layers == [0, 1, 2, 3] and not r.in_out_only
    assert idx["total_bytes"] == sum(s["bytes"] for s in idx["shards"]) == sum(
        (env.cap / s["file"]).stat().st_size for s in idx["shards"])
    rec0 = r.records[0]
    assert (rec0.latent_h, rec0.latent_w, rec0.img_len, rec0.txt_len, rec0.step) == (8, 8, 16, 24, 0)
    assert sorted({x.step for x in r}) == list(range(STEPS)) and len({x.prompt for x in r}) == PROMPTS
    m = env.teacher
    for rec in r:
        for L in r.layers:
            args, outs = r.block_io(rec, L, m.pe_embedder)
            got = get_block(m, L)(*args)
            got = got if isinstance(got, tuple) else (got,)
            assert len(got) == len(outs) == (2 if L < 2 else 1)
            for a, b in zip(got, outs):
                assert torch.equal(a, b), (rec.key, L)
        assert torch.equal(m(**r.model_inputs(rec)), r.model_output(rec))
    train, held = r.split(0.2, seed=0)
    assert {x.run for x in train}.isdisjoint({x.run for x in held}) and len(train) + len(held) == len(r)
    assert r.split(0.2, seed=0) == (train, held) and len(held) == STEPS  # one of five runs
    assert r.split(0.5, seed=0, by="record")[1] != held


def test_in_out_only_every_and_store_dtype(env, tmp_path):
    res = capture(env.pipe, _workload(2), tmp_path / "io", in_out_only=True, every=3, budget_bytes=10**7,
                  store_dtype=torch.bfloat16)
    r = CaptureReader(tmp_path / "io")
    assert res["records"] == 2 * 2 and sorted({x.step for x in r}) == [0, 3]
    assert r.in_out_only and r.layers == []
    rec = r.records[0]
    assert sorted(r.names(rec)) == ["guidance", "img", "img_ids", "t", "txt", "txt_ids", "velocity", "y"]
    assert r.tensor(rec, "img").dtype == torch.bfloat16 and r.tensor(rec, "t").dtype == torch.float32
    with pytest.raises(UserError, match="inputs/outputs only"):
        r.layer_tensors(rec, 0)
    cfg = CaptureReader(capture(env.pipe, _workload(1), tmp_path / "cfg", in_out_only=True, every=3, cfg=2.0,
                                budget_bytes=10**7)["dir"])
    assert [(x.step, x.branch) for x in cfg] == [(0, "cond"), (0, "uncond"), (3, "cond"), (3, "uncond")]
    assert cfg.records[1].prompt == "" and cfg.records[0].prompt == _workload(1).prompts[0]
    for rec in cfg:
        assert torch.equal(env.teacher(**cfg.model_inputs(rec)), cfg.model_output(rec))
    with pytest.raises(UserError, match="not both"):
        capture(env.pipe, _workload(1), tmp_path / "x", in_out_only=True, layers="0", budget_bytes=10**7)
    r2 = CaptureReader(capture(env.pipe, _workload(1), tmp_path / "l", layers="1,3", budget_bytes=10**7)["dir"])
    assert r2.layers == [1, 3] and "L0.img_in" not in r2.names(r2.records[0])
    with pytest.raises(UserError, match="not captured"):
        r2.layer_tensors(r2.records[0], 2)


def test_budget_stops_cleanly_and_index_matches_disk(env, tmp_path):
    full = env.res["bytes"]
    budget = full // 3
    out = tmp_path / "small"
    res = capture(env.pipe, _workload(), out, budget_bytes=budget, shard_bytes=full // 10)
    assert res["stopped"] == "budget" and 0 < res["records"] < PROMPTS * STEPS and res["shards"] >= 2
    idx = json.loads((out / INDEX).read_text())
    assert not idx["complete"] and idx["stopped"] == "budget"
    on_disk = sorted(f.name for f in out.iterdir())
    assert on_disk == sorted([INDEX] + [s["file"] for s in idx["shards"]])  # no strays, no temporaries
    assert len(idx["records"]) == res["records"] == sum(s["records"] for s in idx["shards"])
    assert _dir_bytes(out) <= budget
    r = CaptureReader(out)
    for rec in r:
        r.layer_tensors(rec, 3)
    # an earlier capture is replaced only when forced; then its shards go
    with pytest.raises(UserError, match="already exists"):
        capture(env.pipe, _workload(1), out, in_out_only=True, budget_bytes=10**7)
    capture(env.pipe, _workload(1), out, in_out_only=True, budget_bytes=10**7, force=True)
    assert sorted(f.name for f in out.iterdir()) == [INDEX, "shard-00000.safetensors"]
    # a folder holding anything else likewise: refused and untouched, or replaced whole when forced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        capture(env.pipe, _workload(1), foreign, budget_bytes=10**7)
    assert sorted(f.name for f in foreign.iterdir()) == ["notes.txt"]
    capture(env.pipe, _workload(1), foreign, in_out_only=True, budget_bytes=10**7, force=True)
    assert sorted(f.name for f in foreign.iterdir()) == [INDEX, "shard-00000.safetensors"]


def test_reader_errors_are_one_line(env, tmp_path):
    def broken(name, fn):
        d = tmp_path / name
        shutil.copytree(env.cap, d)
        fn(d)
        return d

    shard = "shard-00000.safetensors"
    cases = [
        (tmp_path / "nope", "no such capture folder"),
        (broken("noindex", lambda d: (d / INDEX).unlink()), "no index.json"),
        (broken("garbage", lambda d: (d / INDEX).write_text("{not json")), "invalid JSON"),
        (broken("schema", lambda d: (d / INDEX).write_text('{"schema": "other"}')), "not an rflow capture index"),
        (broken("fields", lambda d: (d / INDEX).write_text('{"schema": "rflow.capture", "version": 1}')), "corrupt capture index"),
        (broken("missing", lambda d: (d / shard).unlink()), "missing"),
        (broken("truncated", lambda d: (d / shard).write_bytes((d / shard).read_bytes()[:5000])), "truncated"),
    ]
    for path, fragment in cases:
        with pytest.raises(UserError, match=fragment) as e:
            CaptureReader(path)
        assert "\n" not in str(e.value)


def test_parse_bytes():
    assert parse_bytes("500MB") == 500 * 10**6 and parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30) and parse_bytes("4096") == 4096 and parse_bytes("3 kib") == 3072
    for bad in ("lots", "5XB", "-1MB", "0"):
        with pytest.raises(UserError):
            parse_bytes(bad)


# ---------------------------------------------------------------------------------------------- distill


def test_distillation_lowers_heldout_loss_for_every_pruned_layer(env, distilled):
    rep = {r["layer"]: r for r in distilled.report}
    assert sorted(rep) == [0, 1, 2, 3]  # double 1 lost only its img units, still counts
    for L, r in rep.items():
        assert r["final_heldout_mse"] < r["initial_heldout_mse"], r
        assert r["train_records"] + r["heldout_records"] == PROMPTS * STEPS
    assert rep[0]["student_mlp"] == [16, 16] and rep[2]["student_mlp"] == 16 and rep[3]["teacher_mlp"] == 64
    assert set(distilled.patches[0]) == {f"double_blocks.0.{s}_mlp.{i}.{p}" for s in ("img", "txt") for i in (0, 2)
                                         for p in ("weight", "bias")}
    # single blocks in "mlp" mode: the attention rows of linear1 / columns of linear2 never move
    student = _student(env)
    b = student.single_blocks[0]
    p = distilled.patches[2]
    assert torch.equal(p["single_blocks.0.linear1.weight"][:96], b.linear1.weight[:96])
    assert torch.equal(p["single_blocks.0.linear1.bias"][:96], b.linear1.bias[:96])
    assert torch.equal(p["single_blocks.0.linear2.weight"][:, :32], b.linear2.weight[:, :32])
    assert not torch.equal(p["single_blocks.0.linear1.weight"][96:], b.linear1.weight[96:])


def test_distill_is_deterministic_and_block_mode(env, distilled):
    kw = dict(layers=[2], steps=25, lr=1e-2, batch=4, seed=3)
    a, ra = distill(env.teacher, _student(env), distilled.reader, train="block", **kw)
    b, rb = distill(env.teacher, _student(env), distilled.reader, train="block", **kw)
    assert ra[0]["final_heldout_mse"] < ra[0]["initial_heldout_mse"]
    assert ra[0]["final_heldout_mse"] == rb[0]["final_heldout_mse"]
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    assert "single_blocks.0.modulation.lin.weight" in a[2]
    with pytest.raises(UserError, match="nothing to distill"):
        distill(env.teacher, copy.deepcopy(env.teacher), distilled.reader, steps=1)
    with pytest.raises(UserError, match="train mode"):
        distill(env.teacher, _student(env), distilled.reader, train="everything")


# ---------------------------------------------------------------------------------------------- patches


def test_applied_patches_give_the_trained_blocks(env, distilled):
    tensors, meta = read_patches(distilled.path)
    assert meta["schema"] == "rflow.patches" and meta["version"] == 2 and meta["layers"] == [0, 1, 2, 3]
    assert meta["student_fingerprint"] == env.student_fp and meta["train"] == "mlp"
    assert [r["layer"] for r in meta["report"]] == [0, 1, 2, 3]
    student = _student(env)
    apply_patches(student, distilled.path, fingerprint=env.student_fp)
    _, held = distilled.reader.split(0.2, 0)
    for r in distilled.report:
        L = r["layer"]
        data = _Data(distilled.reader, L, student.pe_embedder, held, cache=False)
        mse = _mse(get_block(student, L), data, held, 4, "cpu")
        assert mse == pytest.approx(r["final_heldout_mse"], rel=1e-5)
    with pytest.raises(UserError, match="has shape"):
        apply_patches(copy.deepcopy(env.teacher), distilled.path)
    with pytest.raises(UserError, match="trained for student"):
        apply_patches(_student(env), distilled.path, fingerprint="0123456789abcdef")
    apply_patches(_student(env), distilled.path, fingerprint="0123456789abcdef", any_student=True)
    bad = env.root / "bad.safetensors"
    bad.write_bytes(distilled.path.read_bytes()[:300])
    with pytest.raises(UserError):
        apply_patches(_student(env), bad)
    with pytest.raises(UserError, match="not an rflow patch file"):
        apply_patches(_student(env), env.student_dir / "transformer.safetensors")


def test_write_patched_models(env, distilled, tmp_path):
    want = _student(env)
    apply_patches(want, distilled.path)
    out = write_patched(env.student_dir, distilled.path, tmp_path / "patched")
    manifest = json.loads((out / "rflow_pipeline.json").read_text())
    assert manifest["patched"]["layers"] == [0, 1, 2, 3]
    with open_weights(out / "transformer.safetensors") as f:
        kept = {k: f.get(k) for k in f.keys() if k.startswith(KEPT_PREFIX)}
    assert sorted(kept) == sorted(KEPT_PREFIX + u for u in env.kept)
    assert all(torch.equal(kept[KEPT_PREFIX + u], v) for u, v in env.kept.items())
    got = rflow.load(out, device="cpu")
    for k, v in want.state_dict().items():
        assert torch.equal(got.transformer.state_dict()[k], v), k
    via_load = load_with_patches(env.student_dir, distilled.path, device="cpu")
    assert all(torch.equal(via_load.transformer.state_dict()[k], v) for k, v in want.state_dict().items())
    assert via_load.fingerprint.startswith(env.student_fp + "+")
    single = write_patched(env.student_dir / "transformer.safetensors", distilled.path, tmp_path / "student.safetensors")
    m, _ = load_flux(single, device="cpu")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in want.state_dict().items())
    with pytest.raises(UserError, match="already exists"):
        write_patched(env.student_dir, distilled.path, out)


# ---------------------------------------------------------------------------------------------- CLI


def _cli(capsys, *args):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_error(rc, err, fragment):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rflow: error: ") and fragment in lines[0], err


def test_cli_round_trip(env, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(shapes.prompts(4, seed=11)) + "\n")
    cap = tmp_path / "cap"
    rc, out, err = _cli(capsys, "capture", "--model", env.root / "teacher", "--prompts", prompts, "--sizes", "32x32",
                        "--steps", "3", "--budget", "20MB", "-o", cap)
    assert rc == 0, err
    assert str(cap) in out and "12 records" in err
    patches = tmp_path / "p.safetensors"
    rc, out, err = _cli(capsys, "distill", "--teacher", env.root / "teacher", "--student", env.student_dir, "--capture",
                        cap, "--steps", "15", "--lr", "1e-2", "--batch", "4", "--layers", "0-2", "-o", patches)
    assert rc == 0, err
    assert "initial" in out and "final" in out and "single 0" in out and "64/64 → 16/16" in out
    report = json.loads((tmp_path / "p.json").read_text())
    assert [r["layer"] for r in report["layers"]] == [0, 1, 2]
    assert all(r["final_heldout_mse"] < r["initial_heldout_mse"] for r in report["layers"])
    rc, out, err = _cli(capsys, "patch", "apply", env.student_dir, patches, "-o", tmp_path / "patched")
    assert rc == 0, err
    assert rflow.load(tmp_path / "patched", device="cpu").transformer.config.single_mlp == [16, 16]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    base = ["capture", "--model", env.root / "teacher", "--shapes", "2", "--sizes", "32x32", "--steps", "2"]
    _one_error(*_cli(capsys, *base, "--budget", "20MB", "-o", foreign)[::2], "--force")
    _one_error(*_cli(capsys, *base, "--budget", "lots", "-o", tmp_path / "c2")[::2], "bad size")
    _one_error(*_cli(capsys, *base, "--budget", "1kB", "-o", tmp_path / "c3")[::2], "too small")
    _one_error(*_cli(capsys, *base[:3], "--budget", "1MB", "-o", tmp_path / "c4")[::2], "exactly one of")
    _one_error(*_cli(capsys, "distill", "--student", env.student_dir, "--capture", cap, "--train", "all",
                     "-o", tmp_path / "q.safetensors")[::2], "--train")
    _one_error(*_cli(capsys, "distill", "--teacher", env.root / "teacher", "--student", env.student_dir, "--capture",
                     tmp_path / "nocap", "-o", tmp_path / "q.safetensors")[::2], "no such capture folder")
    _one_error(*_cli(capsys, "patch", "apply", env.root / "teacher", patches, "-o", tmp_path / "t2")[::2],
               "trained for student")
