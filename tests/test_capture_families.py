"""Capture -> prune -> distill -> patch on FLUX.2-klein and Z-Image (tiny diffusers pipelines), through the
CLI: captured records replay the teacher's blocks and transformer exactly, a distilled student is closer
to the teacher than the pruned one, and ``rflow patch apply`` writes a student that loads with the
source's VAE and text encoders. Also: the capture folder rules, one-line errors across families, and
version-1 (FLUX.1) captures without call structures."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import rflow
from family_ref import klein_folder, zimage_folder
from rflow.checkpoints.io import open_weights
from rflow.cli import main
from rflow.compress.capture import INDEX, CaptureReader, capture, get_block, residual_blocks
from rflow.compress.measure import measure_capture
from rflow.compress.patches import apply_patches, load_with_patches, read_patches
from rflow.compress.prune import KEPT_PREFIX
from rflow.compress.units import layer_refs
from rflow.compress.workload import Workload
from rflow.errors import UserError
from rflow.world import shapes, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["flux2", "zimage"]
SIZE = "64x64"
RUNS, STEPS = 3, 2


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(rc, err, fragment):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("rflow: error:") and fragment in lines[0], err


class Chains:
    """Each family's capture -> analyze -> prune -> distill -> patch apply, built once, on demand."""

    def __init__(self, root):
        self.root, self.built = root, {}

    def get(self, family, capsys):
        if family not in self.built:
            self.built[family] = self._build(family, capsys)
        return self.built[family]

    def _build(self, family, capsys):
        root = self.root / family
        root.mkdir()
        m = (klein_folder if family == "flux2" else zimage_folder)(root)
        cap, stats, student = root / "cap", root / "stats.safetensors", root / "student.safetensors"
        cfg = ["--cfg", "2"] if family == "zimage" else []  # Z-Image: the unconditional calls are records too
        rc, _, err = cli(capsys, "capture", "--model", m, "--shapes", RUNS, "--sizes", SIZE, "--steps", STEPS,
                         "--budget", "50MB", "-o", cap, *cfg)
        assert rc == 0, err
        rc, _, err = cli(capsys, "analyze", "--model", m, "--shapes", 2, "--steps", 2, "--sizes", SIZE, "-o", stats)
        assert rc == 0, err
        rc, _, err = cli(capsys, "prune", "--model", m, "--stats", stats, "--fraction", "0.5", "-o", student)
        assert rc == 0, err
        patches = root / "patches.safetensors"
        rc, out, err = cli(capsys, "distill", "--teacher", m, "--student", student, "--capture", cap, "--steps", 60,
                           "--lr", "1e-2", "--batch", 4, "--json", "-o", patches)
        assert rc == 0, err
        report = json.loads(out.strip().splitlines()[0])
        patched = root / "patched.safetensors"
        rc, out, err = cli(capsys, "patch", "apply", student, patches, "-o", patched)
        assert rc == 0, err
        assert out.strip() == str(patched)
        return SimpleNamespace(family=family, model=m, cap=cap, student=student, patches=patches, report=report,
                               patched=patched, parts=dict(vae=m / "vae", text_encoders=m))


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    return Chains(tmp_path_factory.mktemp("capfam"))


def _close(got, want, tol=1e-6):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# ---------------------------------------------------------------------------------------------- capture


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_replays_the_teacher_exactly(chains, capsys, family):
    c = chains.get(family, capsys)
    r = CaptureReader(c.cap)
    idx = json.loads((c.cap / INDEX).read_text())
    assert idx["version"] == 2 and idx["family"] == family and idx["complete"] and idx["stopped"] is None
    teacher = rflow.load(c.model, device="cpu")
    assert idx["model"]["fingerprint"] == teacher.fingerprint and r.config == teacher.transformer.config
    blocks = residual_blocks(teacher.transformer)
    assert r.layers == sorted(blocks) and r.blocks == blocks
    n_calls = RUNS * STEPS * (2 if family == "zimage" else 1)
    assert len(r) == n_calls and [(x.step, x.branch) for x in r][:2] == (
        [(0, "cond"), (0, "uncond")] if family == "zimage" else [(0, "cond"), (1, "cond")])
    for rec in r:
        for L in r.layers:
            args, outs = r.block_io(rec, L)
            _close(get_block(teacher.transformer, L)(*args), outs)
        _close(teacher.transformer(**r.model_inputs(rec)), r.model_output(rec))
    # stored once: a block's input that is the previous block's output, context shared by blocks of one call
    rec = r.records[0]
    call, names = r.call(rec), set(r.names(rec))
    for L, name in blocks.items():
        b = call["blocks"][str(L)]
        if name.endswith(".1"):  # the second block of its list reads what the first wrote
            prev = next(P for P, n in blocks.items() if n == name[:-1] + "0")
            assert [a[1]["t"] for a in b["args"][: len(b["streams"])]] == [f"L{prev}.{s}_out" for s in b["streams"]]
            assert not any(f"L{L}.{s}_in" in names for s in b["streams"])

    def distinct(param):
        return {json.dumps(dict(b["args"])[param]) for b in call["blocks"].values() if dict(b["args"]).get(param)}

    if family == "flux2":
        assert len(distinct("pe")) == len(distinct("mod_img")) == len(distinct("mod")) == 1
    else:  # the noise refiner, context refiner and joint layers each have their own RoPE; one adaLN input
        assert len(distinct("pe")) == 3 and len(distinct("adaln")) == 1
    # context equal to an earlier record's (RoPE of the same size, one timestep's modulation) is a reference
    assert any(x.refs for x in r)
    for x in r:
        for name, key in x.refs:
            assert int(key.split(".")[0][1:]) < x.index and name in r.names(x)


def test_budget_stop_and_failed_capture_keep_the_folder_rules(chains, capsys, tmp_path):
    c = chains.get("flux2", capsys)
    pipe = rflow.load(c.model, device="cpu")
    wl = Workload(shapes.prompts(3, seed=5), [(64, 64)], [2], seed=0, source="shapes")
    full = capture(pipe, wl, tmp_path / "full", budget_bytes=10**8, shard_bytes=400_000)
    out = tmp_path / "small"
    res = capture(pipe, wl, out, budget_bytes=full["bytes"] // 2, shard_bytes=400_000)
    assert res["stopped"] == "budget" and 0 < res["records"] < full["records"] and res["shards"] >= 2
    idx = json.loads((out / INDEX).read_text())
    assert not idx["complete"] and sorted(f.name for f in out.iterdir()) == sorted([INDEX] + [s["file"] for s in idx["shards"]])
    assert sum(f.stat().st_size for f in out.iterdir()) <= full["bytes"] // 2
    r = CaptureReader(out)  # every record's tensors (references into earlier shards included) are on disk
    for rec in r:
        r.block_io(rec, 3)
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def interrupt(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture(pipe, wl, out, in_out_only=True, budget_bytes=10**8, force=True, progress=interrupt)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    with pytest.raises(UserError, match="already exists"):
        capture(pipe, wl, out, in_out_only=True, budget_bytes=10**8)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------- distill


@pytest.mark.parametrize("family", FAMILIES)
def test_distilled_student_is_closer_to_the_teacher(chains, capsys, family):
    c = chains.get(family, capsys)
    rows = c.report["layers"]
    student = rflow.load(c.student, device="cpu", **c.parts)
    pruned = {r.layer for r in layer_refs(student.transformer)
              if r.units < {x.name: x.units for x in layer_refs(rflow.load(c.model, device="cpu").transformer)}[r.name]}
    assert sorted(r["layer"] for r in rows) == sorted(pruned)
    assert all(r["final_heldout_mse"] < r["initial_heldout_mse"] for r in rows), rows
    tensors, meta = read_patches(c.patches)
    assert meta["family"] == family and meta["layers"] == sorted(pruned)
    params = dict(student.transformer.named_parameters())
    assert all(k in params and params[k].shape == t.shape for k, t in tensors.items())
    want = {"flux2": "double_blocks.0.img_mlp.0.weight", "zimage": "layers.0.feed_forward.w1.weight"}[family]
    assert want in tensors and not any("attn" in k or "attention" in k for k in tensors)

    reader = CaptureReader(c.cap)
    teacher = rflow.load(c.model, device="cpu")
    assert measure_capture(teacher, reader, reference_fingerprint=teacher.fingerprint, batch=1)["velocity_mse"] == 0.0
    before = measure_capture(student, reader)
    after = measure_capture(load_with_patches(c.student, c.patches, device="cpu", **c.parts), reader)
    assert after["velocity_evaluations"] == before["velocity_evaluations"] == len(reader)
    assert 0 < after["velocity_mse"] < before["velocity_mse"], (before, after)
    # rflow measure --capture: the same numbers through the CLI, for the pruned student and the patched one
    for model, want in ((c.student, before), (c.patched, after)):
        rc, out, err = cli(capsys, "measure", "--model", model, "--reference", c.model, "--capture", c.cap, "--json")
        assert rc == 0, err
        got = json.loads(out)
        assert got["velocity_evaluations"] == want["velocity_evaluations"]
        assert abs(got["velocity_mse"] - want["velocity_mse"]) <= 1e-6 * want["velocity_mse"]


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_apply_writes_a_student_that_loads_with_the_source_parts(chains, capsys, family):
    c = chains.get(family, capsys)
    want = rflow.load(c.student, device="cpu", **c.parts).transformer
    apply_patches(want, c.patches)
    got = rflow.load(c.patched, device="cpu", **c.parts)
    assert got.family == family
    sd = got.transformer.state_dict()
    assert sd.keys() == want.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in want.state_dict().items())
    with open_weights(c.patched) as f, open_weights(c.student) as s:
        assert sorted(k for k in f.keys() if k.startswith(KEPT_PREFIX)) == sorted(k for k in s.keys() if k.startswith(KEPT_PREFIX))
        assert "rflow.pruning" in f.metadata and json.loads(f.metadata["rflow.patched"])["layers"] == read_patches(c.patches)[1]["layers"]
    rc, _, err = cli(capsys, "generate", "a red circle", "--model", c.patched, "--vae", c.parts["vae"],
                     "--text-encoders", c.model, "--size", SIZE, "--steps", 1, "-o", c.patched.with_suffix(".png"))
    assert rc == 0, err


def test_families_do_not_mix(chains, capsys, tmp_path):
    klein, zimage = chains.get("flux2", capsys), chains.get("zimage", capsys)
    one_error(*cli(capsys, "distill", "--teacher", zimage.model, "--student", zimage.student, "--capture", klein.cap,
                   "-o", tmp_path / "x.safetensors")[::2], "captured from model")
    one_error(*cli(capsys, "patch", "apply", zimage.student, klein.patches, "-o", tmp_path / "y.safetensors")[::2],
              "patches for a FLUX.2 model, this is a Z-Image model")
    with pytest.raises(UserError, match="captured from a Z-Image model, this is a FLUX.2 model"):
        measure_capture(rflow.load(klein.model, device="cpu"), CaptureReader(zimage.cap))
    flux1 = tiny.build(seed=0, hidden=32, heads=2, depth=1, depth_single=1, mlp_ratio=2.0)
    with pytest.raises(UserError, match="patches for a Z-Image model, this is a FLUX.1 model"):
        apply_patches(flux1.transformer, zimage.patches)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


# ---------------------------------------------------------------------------------------------- version 1


def test_version_1_captures_are_still_read(tmp_path):
    pipe = tiny.build(seed=0, hidden=32, heads=2, depth=1, depth_single=1, mlp_ratio=2.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # tiny.build starts every block as the identity
        for n, p in pipe.transformer.named_parameters():
            if "mod" in n or "final_layer" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    wl = Workload(shapes.prompts(2, seed=3), [(32, 32)], [2], seed=0, source="shapes")
    new = tmp_path / "new"
    capture(pipe, wl, new, budget_bytes=10**8)
    assert json.loads((new / INDEX).read_text())["version"] == 1  # FLUX.1: the version-1 layout, plus additions
    old = tmp_path / "old"  # what rflow wrote before call structures: no calls, no refs, no RoPE tables
    shutil.copytree(new, old)
    idx = json.loads((old / INDEX).read_text())
    for k in ("calls", "blocks", "family"):
        del idx[k]
    for rec in idx["records"]:
        rec.pop("refs", None)
        rec.pop("call", None)
    (old / INDEX).write_text(json.dumps(idx))
    m = pipe.transformer
    r_new, r_old = CaptureReader(new), CaptureReader(old)
    assert r_old.legacy and not r_new.legacy and r_old.family == "flux1"
    for a, b in zip(r_new, r_old):
        for L in r_old.layers:
            args, outs = r_old.block_io(b, L, m.pe_embedder)
            assert all(torch.equal(x, y) for x, y in zip(args, r_new.block_io(a, L)[0]))
            _close(get_block(m, L)(*args), outs, tol=0)
        assert torch.equal(m(**r_old.model_inputs(b)), r_old.model_output(b))
    with pytest.raises(UserError, match="pe_embedder") as e:
        r_old.block_io(r_old.records[0], 0)
    assert "\n" not in str(e.value)
    idx["version"] = 3
    (old / INDEX).write_text(json.dumps(idx))
    with pytest.raises(UserError, match="capture again"):
        CaptureReader(old)
