"""Nothing lost, nothing silent: every bad input is one line and exit code 2, decided before the work,
and every earlier output stays byte-identical; non-finite numbers never pass; the model hash means
the weights. Everything runs on copies of the embedded rflow-tiny model with few steps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from rflow.cli import main
from rflow.paths import DEFAULT_MODEL_DIR

PROMPT = "a large red circle on the left on a white background"


# ---------------------------------------------------------------------------------------------- helpers


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_error(rc, err, fragment=""):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("rflow: warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("rflow: error: "), err
    assert fragment in lines[0], err


def snapshot(*paths) -> dict[str, bytes]:
    """Every file under the given paths, by path, with its bytes (hidden temporary siblings included)."""
    out = {}
    for p in paths:
        p = Path(p)
        for parent in {p.parent}:
            for q in parent.iterdir():
                if q.name.startswith(f".{p.name}"):
                    out[str(q)] = b"<temporary sibling>"
        if p.is_file():
            out[str(p)] = p.read_bytes()
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    out[str(f)] = f.read_bytes()
    return out


def copy_model(dst: Path, transform=None) -> Path:
    shutil.copytree(DEFAULT_MODEL_DIR, dst)
    if transform is not None:
        f = dst / "transformer.safetensors"
        sd = load_file(f)
        from safetensors import safe_open

        with safe_open(str(f), "pt") as h:
            meta = h.metadata()
        transform(sd)
        save_file(sd, f, metadata=meta)
    return dst


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("safety")


@pytest.fixture(scope="module")
def tiny(work):
    return copy_model(work / "tiny")


@pytest.fixture(scope="module")
def nan_model(work):
    def poison(sd):
        sd["final_layer.linear.weight"] = torch.full_like(sd["final_layer.linear.weight"], float("nan"))
    return copy_model(work / "tiny-nan", poison)


@pytest.fixture(scope="module")
def retrained(work):
    """Same shapes as the tiny model, other weights."""
    def perturb(sd):
        w = sd["double_blocks.0.img_mlp.0.weight"]
        sd["double_blocks.0.img_mlp.0.weight"] = (w.float() * 1.01).to(w.dtype)
    return copy_model(work / "tiny-retrained", perturb)


@pytest.fixture(scope="module")
def stats(tiny, work):
    out = work / "stats.safetensors"
    assert main(["analyze", "--model", str(tiny), "--shapes", "2", "--steps", "2", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def capture_dir(tiny, work):
    out = work / "cap"
    assert main(["capture", "--model", str(tiny), "--shapes", "3", "--steps", "2", "--budget", "50MB",
                 "--layers", "0-1", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pruned(tiny, stats, work):
    out = work / "pruned"
    assert main(["prune", "--model", str(tiny), "--stats", str(stats), "--fraction", "0.3", "--layers", "0-1",
                 "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def patches(tiny, pruned, capture_dir, work):
    out = work / "patches.safetensors"
    assert main(["distill", "--teacher", str(tiny), "--student", str(pruned), "--capture", str(capture_dir),
                 "--steps", "2", "-o", str(out)]) == 0
    return out


@pytest.fixture
def existing(tmp_path):
    """An earlier output of each kind, to check it survives."""
    png = tmp_path / "old.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(png)
    return png


# ---------------------------------------------------------------------------------------------- non-finite numbers

NONFINITE_OPTIONS = [
    ("generate", ["generate", PROMPT, "--steps", "2", "--guidance", "nan"], "--guidance"),
    ("generate", ["generate", PROMPT, "--steps", "2", "--guidance", "inf"], "--guidance"),
    ("generate", ["generate", PROMPT, "--steps", "2", "--cfg", "inf"], "--cfg"),
    ("generate", ["generate", PROMPT, "--steps", "2", "--cfg", "nan"], "--cfg"),
    ("generate", ["generate", PROMPT, "--steps", "2", "--strength", "nan", "--image", "{png}"], "--strength"),
    ("eval", ["eval", "--shapes", "2", "--heldout", "0", "--steps", "2", "--guidance", "nan"], "--guidance"),
    ("analyze", ["analyze", "--shapes", "2", "--steps", "2", "--guidance", "nan"], "--guidance"),
    ("capture", ["capture", "--shapes", "2", "--steps", "2", "--budget", "10MB", "--cfg", "-inf"], "--cfg"),
    ("train", ["train", "--full", "--steps", "2", "--batch", "2", "--lr", "inf"], "--lr"),
    ("train", ["train", "--full", "--steps", "2", "--batch", "2", "--lr", "nan"], "--lr"),
    ("distill", ["distill", "--student", "{pruned}", "--capture", "{cap}", "--steps", "2", "--lr", "inf"], "--lr"),
    ("distill", ["distill", "--student", "{pruned}", "--capture", "{cap}", "--holdout", "nan"], "--holdout"),
    ("prune", ["prune", "--model", "{tiny}", "--stats", "{stats}", "--threshold", "nan"], "--threshold"),
    ("prune", ["prune", "--model", "{tiny}", "--stats", "{stats}", "--fraction", "inf"], "--fraction"),
    ("sensitivity", ["sensitivity", "--model", "{tiny}", "--stats", "{stats}", "--level", "nan"], "--level"),
    ("measure", ["measure", "--reference", "rflow-tiny", "--guidance", "inf"], "--guidance"),
]


def _fill(args, **kw):
    return [str(a).format(**kw) for a in args]


@pytest.mark.parametrize("verb,args,flag", [c for c in NONFINITE_OPTIONS],
                         ids=[f"{c[0]}-{c[1][-1]}-{c[2]}" for c in NONFINITE_OPTIONS])
def test_non_finite_options_are_refused_before_work(capsys, tmp_path, tiny, stats, pruned, capture_dir, existing,
                                                     verb, args, flag):
    out = {"generate": existing, "eval": existing, "analyze": tmp_path / "s.safetensors",
           "capture": tmp_path / "cap", "train": tmp_path / "run", "distill": tmp_path / "p.safetensors",
           "prune": tmp_path / "pruned", "sensitivity": None, "measure": None}[verb]
    argv = _fill(args, png=existing, tiny=tiny, stats=stats, pruned=pruned, cap=capture_dir)
    if out is not None:
        argv += ["-o", str(out)] if verb != "sensitivity" else []
    before = snapshot(tmp_path)
    rc, _, err = cli(capsys, *argv)
    assert_error(rc, err, flag)
    assert snapshot(tmp_path) == before


def test_nan_weights_stop_generation_and_keep_the_old_output(capsys, nan_model, existing):
    before = snapshot(existing)
    rc, _, err = cli(capsys, "generate", PROMPT, "--model", nan_model, "--steps", "3", "-o", existing, "--force")
    assert_error(rc, err, "NaN/inf at step 1 of 3")
    assert snapshot(existing) == before


def test_nan_weights_stop_eval_measure_analyze_capture(capsys, nan_model, tmp_path):
    cases = [
        ["eval", "--model", nan_model, "--shapes", "2", "--heldout", "0", "--steps", "2", "-o", tmp_path / "g.png"],
        ["measure", "--model", nan_model, "--reference", "rflow-tiny", "--shapes", "2", "--steps", "2"],
        ["measure", "--model", "rflow-tiny", "--reference", nan_model, "--shapes", "2", "--steps", "2"],
        ["analyze", "--model", nan_model, "--shapes", "2", "--steps", "2", "-o", tmp_path / "s.safetensors"],
        ["capture", "--model", nan_model, "--shapes", "2", "--steps", "2", "--budget", "10MB", "-o", tmp_path / "c"],
    ]
    for argv in cases:
        rc, _, err = cli(capsys, *argv)
        assert_error(rc, err, "NaN/inf")
    assert list(tmp_path.iterdir()) == []


def test_sampling_names_the_first_bad_step():
    from rflow.errors import NonFiniteError
    from rflow.sampling import get_sigmas, sample

    def velocity(x, t):
        return x * float("nan") if float(t) < 0.45 else x

    with pytest.raises(NonFiniteError, match=r"at step 7 of 10"):
        sample(velocity, torch.ones(1, 2), get_sigmas(10, schedule="none"))


def test_training_stops_on_a_non_finite_loss_and_keeps_the_last_checkpoint(tmp_path):
    from rflow.world import tiny
    from rflow.errors import NonFiniteError
    from rflow.train.full import STATE_FILE, TrainConfig, Trainer

    cfg = TrainConfig(steps=4, batch=2, checkpoint_every=2, warmup=1)
    trainer = Trainer(tiny.build(seed=0, hidden=32, heads=1, depth=1, depth_single=1), cfg, tmp_path)
    trainer.run(until=2)
    good = (tmp_path / STATE_FILE).read_bytes()
    real = trainer.loss_at
    trainer.loss_at = lambda step: real(step) * float("nan")
    with pytest.raises(NonFiniteError, match="step 3"):
        trainer.run(resume=True)
    assert (tmp_path / STATE_FILE).read_bytes() == good


def test_distillation_stops_on_a_non_finite_loss(capsys, tiny, pruned, capture_dir, tmp_path, monkeypatch):
    from rflow.compress import distill as distill_mod

    real = distill_mod._sq_err
    calls = {"n": 0}

    def poisoned(block, batch):
        err, n = real(block, batch)
        calls["n"] += 1
        return (err * float("nan") if calls["n"] > 2 else err), n

    monkeypatch.setattr(distill_mod, "_sq_err", poisoned)
    out = tmp_path / "p.safetensors"
    rc, _, err = cli(capsys, "distill", "--teacher", tiny, "--student", pruned, "--capture", capture_dir,
                     "--steps", "3", "-o", out)
    assert_error(rc, err, "NaN/inf")
    assert list(tmp_path.iterdir()) == []


def test_prune_refuses_statistics_without_positions_or_with_nan(capsys, tiny, stats, tmp_path):
    from rflow.compress.stats import ActivationStats

    st = ActivationStats.load(stats)
    u = st.units[0]
    nan = ActivationStats(st.fingerprint, dict(st.count), {**st.sum_abs, u: st.sum_abs[u] * float("nan")},
                          dict(st.sum_sq), dict(st.positions), dict(st.meta))
    nan.save(tmp_path / "nan.safetensors")
    empty = ActivationStats(st.fingerprint, {k: v * 0 for k, v in st.count.items()}, dict(st.sum_abs),
                            dict(st.sum_sq), {k: 0 for k in st.positions}, dict(st.meta))
    empty.save(tmp_path / "empty.safetensors")
    for name, fragment in (("nan.safetensors", "non-finite"), ("empty.safetensors", "no positions")):
        rc, _, err = cli(capsys, "prune", "--model", tiny, "--stats", tmp_path / name, "--fraction", "0.3",
                         "-o", tmp_path / "out")
        assert_error(rc, err, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--count", "-1"], "--count"), (["--count", "0"], "--count"), (["--fraction", "0"], "--fraction"),
    (["--threshold", "1e-30", "--criterion", "magnitude"], "removes no unit"), (["--fraction", "1"], "--fraction"),
])
def test_prune_refuses_choices_that_prune_nothing(capsys, tiny, stats, tmp_path, args, fragment):
    rc, _, err = cli(capsys, "prune", "--model", tiny, "--stats", stats, *args, "-o", tmp_path / "out")
    assert_error(rc, err, fragment)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- the model hash


def test_png_model_hash_is_the_sha256_of_the_weights(tmp_path, tiny):
    out = tmp_path / "a.png"
    assert main(["generate", PROMPT, "--model", str(tiny), "--steps", "2", "-o", str(out)]) == 0
    want = hashlib.sha256((tiny / "transformer.safetensors").read_bytes()).hexdigest()[:10]
    text = Image.open(out).text
    assert f"Model hash: {want}," in text["parameters"]
    assert json.loads(text["rflow"])["model_hash"] == want


def test_statistics_follow_the_weights_not_the_file_name(capsys, tiny, retrained, nan_model, stats, work, tmp_path):
    renamed = work / "renamed-copy"
    if not renamed.exists():
        shutil.copytree(tiny, renamed)
    rc, _, err = cli(capsys, "prune", "--model", renamed, "--stats", stats, "--fraction", "0.2", "-o", tmp_path / "a")
    assert rc == 0, err
    for other in (retrained, nan_model):
        rc, _, err = cli(capsys, "prune", "--model", other, "--stats", stats, "--fraction", "0.2", "-o", tmp_path / "b")
        assert_error(rc, err, "run rflow analyze on this model")
    assert not (tmp_path / "b").exists()


def test_fingerprint_ignores_the_key_prefix(tmp_path):
    from rflow.checkpoints.flux import FluxCheckpoint

    src = DEFAULT_MODEL_DIR / "transformer.safetensors"
    sd = load_file(src)
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, tmp_path / "comfy.safetensors")
    with FluxCheckpoint(src) as a, FluxCheckpoint(tmp_path / "comfy.safetensors") as b:
        assert a.fingerprint() == b.fingerprint()
        assert a.model_hash() != b.model_hash()


# ---------------------------------------------------------------------------------------------- one line, no traceback


@pytest.fixture(scope="module")
def bad_shape(work):
    """The tiny model with a norm scale of shape (0,): config inference used to divide by zero."""
    def break_it(sd):
        sd["double_blocks.0.img_attn.norm.query_norm.scale"] = torch.zeros(0)
    return copy_model(work / "tiny-badshape", break_it)


def verb_calls(model, stats, cap, patch_file, tmp):
    return {
        "info": ["info", model],
        "generate": ["generate", PROMPT, "--model", model, "--steps", "2", "-o", tmp / "x.png"],
        "eval": ["eval", "--model", model, "--shapes", "2", "--heldout", "0", "--steps", "2", "-o", tmp / "g.png"],
        "analyze": ["analyze", "--model", model, "--shapes", "2", "--steps", "2", "-o", tmp / "s.safetensors"],
        "capture": ["capture", "--model", model, "--shapes", "2", "--steps", "2", "--budget", "1MB", "-o", tmp / "c"],
        "prune": ["prune", "--model", model, "--stats", stats, "--fraction", "0.3", "-o", tmp / "p"],
        "measure": ["measure", "--model", model, "--reference", "rflow-tiny", "--shapes", "2", "--steps", "2"],
        "sensitivity": ["sensitivity", "--model", model, "--stats", stats, "--level", "0.3", "--png", tmp / "s.png"],
        "distill": ["distill", "--student", model, "--capture", cap, "--steps", "2", "-o", tmp / "d.safetensors"],
        "patch": ["patch", "apply", model, patch_file, "-o", tmp / "q"],
    }


VERBS = ["info", "generate", "eval", "analyze", "capture", "prune", "measure", "sensitivity", "distill", "patch"]


@pytest.mark.parametrize("verb", VERBS)
def test_wrong_shaped_tensor_is_one_line_in_every_verb(capsys, verb, bad_shape, stats, capture_dir, patches, tmp_path):
    rc, _, err = cli(capsys, *verb_calls(bad_shape, stats, capture_dir, patches, tmp_path)[verb])
    assert_error(rc, err, "query_norm.scale")
    assert list(tmp_path.iterdir()) == []


def test_pipeline_whose_transformer_does_not_fit_its_codec(capsys, work, tmp_path):
    d = work / "tiny-misfit"
    if not d.exists():
        copy_model(d)
        m = json.loads((d / "rflow_pipeline.json").read_text())
        m["codec"]["factor"] = 2
        (d / "rflow_pipeline.json").write_text(json.dumps(m))
    rc, _, err = cli(capsys, "generate", PROMPT, "--model", d, "--steps", "2", "-o", tmp_path / "x.png")
    assert_error(rc, err, "channels")


@pytest.mark.parametrize("size", ["4096x4096", "65536x65536", "1048576x1048576"])
def test_sizes_that_cannot_fit_memory_are_refused_with_the_estimate(capsys, tmp_path, size):
    rc, _, err = cli(capsys, "generate", PROMPT, "--size", size, "--steps", "2", "-o", tmp_path / "x.png")
    assert rc == 2 and "Traceback" not in err, err
    assert "decrease strictly" not in err and ("needs about" in err or "too large" in err), err


SEED_VERBS = {
    "generate": ["generate", PROMPT, "--steps", "2", "-o", "{tmp}/x.png"],
    "eval": ["eval", "--shapes", "2", "--heldout", "0", "--steps", "2", "-o", "{tmp}/g.png"],
    "analyze": ["analyze", "--shapes", "2", "--steps", "2", "-o", "{tmp}/s.safetensors"],
    "capture": ["capture", "--shapes", "2", "--steps", "2", "--budget", "1MB", "-o", "{tmp}/c"],
    "train": ["train", "--full", "--steps", "1", "-o", "{tmp}/run"],
    "measure": ["measure", "--reference", "rflow-tiny", "--shapes", "2", "--steps", "2"],
}


@pytest.mark.parametrize("verb", sorted(SEED_VERBS))
@pytest.mark.parametrize("seed", [str(2**64), "-1", str(10**40)])
def test_seeds_outside_64_bits_are_refused(capsys, tmp_path, verb, seed):
    rc, _, err = cli(capsys, *_fill(SEED_VERBS[verb], tmp=tmp_path), "--seed", seed)
    assert_error(rc, err, "--seed")
    assert list(tmp_path.iterdir()) == []


DEVICE_VERBS = {k: v for k, v in SEED_VERBS.items()}


@pytest.mark.parametrize("verb", sorted(DEVICE_VERBS))
@pytest.mark.parametrize("device,fragment", [("cuda", "CUDA is not available"), ("tpu9", "unknown device"),
                                             ("cuda:7", "CUDA is not available"), ("meta", "rflow runs on")])
def test_devices_are_validated(capsys, tmp_path, verb, device, fragment):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine has CUDA")
    rc, _, err = cli(capsys, *_fill(DEVICE_VERBS[verb], tmp=tmp_path), "--device", device)
    assert_error(rc, err, fragment)
    assert list(tmp_path.iterdir()) == []


def test_python_api_devices_and_numbers_are_user_errors():
    import rflow
    from rflow.errors import UserError

    with pytest.raises(UserError, match="unknown device"):
        rflow.load(device="tpu9")
    pipe = rflow.load(device="cpu")
    for kw in ({"guidance": float("nan")}, {"cfg": float("inf")}, {"seed": 2**64}, {"steps": 0},
               {"strength": 1.5}, {"steps": 10**9}):
        with pytest.raises(UserError):
            pipe.generate(PROMPT, **kw)


# ---------------------------------------------------------------------------------------------- late or leaky errors

OUTPUT_VERBS = {  # verb -> (argv without -o, what -o is: "file" or "dir")
    "generate": (["generate", PROMPT, "--steps", "2"], "x.png"),
    "eval": (["eval", "--shapes", "2", "--heldout", "0", "--steps", "2"], "g.png"),
    "analyze": (["analyze", "--shapes", "2", "--steps", "2"], "s.safetensors"),
    "capture": (["capture", "--shapes", "2", "--steps", "2", "--budget", "20MB", "--layers", "0"], "c"),
    "prune": (["prune", "--model", "{tiny}", "--stats", "{stats}", "--fraction", "0.3"], "p"),
    "distill": (["distill", "--teacher", "{tiny}", "--student", "{pruned}", "--capture", "{cap}", "--steps", "1"],
                "d.safetensors"),
    "patch": (["patch", "apply", "{pruned}", "{patches}"], "q"),
    "merge": (["stats", "merge", "{stats}", "{stats2}"], "m.safetensors"),
    "train": (["train", "--full", "--steps", "1", "--batch", "2", "--checkpoint-every", "1"], "run"),
}


@pytest.fixture(scope="module")
def stats2(tiny, work):
    out = work / "stats2.safetensors"
    assert main(["analyze", "--model", str(tiny), "--shapes", "1", "--steps", "2", "--seed", "5", "-o", str(out)]) == 0
    return out


def _outputs_argv(verb, o, **kw):
    args, _ = OUTPUT_VERBS[verb]
    return _fill(args, **kw) + ["-o", str(o)]


def assert_default_modes(target: Path) -> None:
    """Every file written has 0666 & ~umask (prune's transformer.safetensors once came out 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]
    modes = {str(p.relative_to(target.parent)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes


@pytest.mark.parametrize("verb", sorted(OUTPUT_VERBS))
def test_existing_output_needs_force_then_is_replaced(capsys, tmp_path, verb, tiny, stats, stats2, pruned,
                                                      capture_dir, patches):
    kw = dict(tiny=tiny, stats=stats, stats2=stats2, pruned=pruned, cap=capture_dir, patches=patches)
    name = OUTPUT_VERBS[verb][1]
    target = tmp_path / "deep" / "er" / name  # missing parent folders are created
    rc, _, err = cli(capsys, *_outputs_argv(verb, target, **kw))
    assert rc == 0, err
    assert target.exists()
    assert_default_modes(target)
    before = snapshot(target)
    rc, _, err = cli(capsys, *_outputs_argv(verb, target, **kw))
    if verb == "train":
        assert_error(rc, err, "--resume")
    else:
        assert_error(rc, err, "--force")
    assert snapshot(target) == before
    if verb != "train":
        rc, _, err = cli(capsys, *_outputs_argv(verb, target, **kw), "--force")
        assert rc == 0, err
        assert not [q for q in target.parent.iterdir() if q.name.startswith(".")]  # no temporary sibling left


@pytest.mark.parametrize("verb", sorted(OUTPUT_VERBS))
def test_output_of_the_wrong_kind_is_refused_before_work(capsys, tmp_path, verb, tiny, stats, stats2, pruned,
                                                         capture_dir, patches, monkeypatch):
    import rflow.loading
    import rflow.pipeline

    kw = dict(tiny=tiny, stats=stats, stats2=stats2, pruned=pruned, cap=capture_dir, patches=patches)
    name = OUTPUT_VERBS[verb][1]
    is_dir = "." not in name
    target = tmp_path / name
    if is_dir:
        target.write_bytes(b"a file where a folder should go")
    else:
        target.mkdir()
        (target / "keep").write_text("x")

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(rflow.pipeline, "load", no_loading)
    monkeypatch.setattr(rflow.loading, "load_transformer", no_loading)
    before = snapshot(tmp_path)
    rc, _, err = cli(capsys, *_outputs_argv(verb, target, **kw), "--force")
    assert_error(rc, err)
    assert ".rflow-tmp" not in err
    assert snapshot(tmp_path) == before


def test_truncated_image_is_one_clean_line(capsys, tmp_path, existing):
    bad = tmp_path / "bad.png"
    bad.write_bytes(existing.read_bytes()[:40])
    rc, _, err = cli(capsys, "generate", PROMPT, "--image", bad, "--steps", "2", "-o", tmp_path / "x.png")
    assert_error(rc, err, "cannot read image")
    assert "<PIL" not in err and "object at" not in err


def test_messages_name_cli_flags(capsys, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(DEFAULT_MODEL_DIR / "transformer.safetensors", lone / "t.safetensors")
    rc, _, err = cli(capsys, "generate", PROMPT, "--model", lone / "t.safetensors", "-o", tmp_path / "x.png")
    assert_error(rc, err, "--vae")
    assert "vae=" not in err


@pytest.mark.parametrize("argv,fragment", [
    (["analyze", "--shapes", "2", "--steps", "5-2"], "reversed: write 2-5"),
    (["analyze", "--shapes", "2", "--layers", "3-1"], "reversed: write 1-3"),
    (["capture", "--shapes", "2", "--budget", "1MB", "--steps", "9-3"], "reversed"),
])
def test_reversed_ranges_say_so(capsys, tmp_path, argv, fragment):
    rc, _, err = cli(capsys, *argv, "-o", tmp_path / "out.safetensors" if argv[0] == "analyze" else tmp_path / "c")
    assert_error(rc, err, fragment)


def test_strength_zero_keeps_the_image(tmp_path, capsys):
    from rflow.world import shapes

    src = tmp_path / "src.png"
    shapes.samples(1, seed=3)[0][0].save(src)
    out = tmp_path / "kept.png"
    rc, _, err = cli(capsys, "generate", PROMPT, "--image", src, "--strength", "0", "--steps", "4", "-o", out)
    assert rc == 0, err
    import numpy as np

    a = np.asarray(Image.open(src).convert("RGB"), dtype=int)
    b = np.asarray(Image.open(out).convert("RGB"), dtype=int)
    assert np.abs(a - b).max() <= 1  # the codec round trip, nothing else


def test_patch_apply_keeps_the_kind_of_its_source(capsys, pruned, patches, tmp_path):
    rc, _, err = cli(capsys, "patch", "apply", pruned, patches, "-o", tmp_path / "x.safetensors")
    assert_error(rc, err, "folder")
    assert not (tmp_path / "x.safetensors").exists()


def test_train_into_an_existing_file_fails_at_once(capsys, tmp_path):
    f = tmp_path / "run"
    f.write_text("not a folder")
    rc, _, err = cli(capsys, "train", "--full", "--steps", "100000", "-o", f)
    assert_error(rc, err, "not a folder")
    assert f.read_text() == "not a folder"


# ---------------------------------------------------------------------------------------------- CLI polish


def test_help_and_version_do_not_import_torch():
    code = ("import sys; import rflow.cli; "
            "bad = [m for m in ('torch', 'transformers', 'numpy', 'PIL', 'safetensors') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    r = subprocess.run([sys.executable, "-m", "rflow.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("rflow ")


def test_the_embedded_model_can_be_named(capsys, tmp_path):
    rc, out, err = cli(capsys, "measure", "--model", "rflow-tiny", "--reference", "rflow-tiny", "--shapes", "2",
                       "--steps", "2", "--json")
    assert rc == 0, err
    assert json.loads(out)["velocity_mse"] == 0.0
    rc, out, err = cli(capsys, "info", "rflow-tiny")
    assert rc == 0 and "flux1-custom" in out


def test_eval_prompts_is_a_file(capsys, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(f"{PROMPT}\na small blue square at the top on a black background\n")
    rc, out, err = cli(capsys, "eval", "--prompts", f, "--heldout", "0", "--steps", "2", "-o", tmp_path / "g.png",
                       "--json")
    assert rc == 0, err
    assert json.loads(out)["n"] == 2
    f.write_text("a photo of a fox\n")
    rc, _, err = cli(capsys, "eval", "--prompts", f, "--steps", "2", "-o", tmp_path / "h.png")
    assert_error(rc, err, "shapes grammar")


def test_warnings(capsys, tmp_path):
    rc, _, err = cli(capsys, "generate", PROMPT, "--negative", "blue", "--strength", "0.5", "--steps", "2",
                     "-o", tmp_path / "a.png")
    assert rc == 0
    assert "rflow: warning: --negative is used only with --cfg" in err
    assert "rflow: warning: --strength is used only with --image" in err
    rc, _, err = cli(capsys, "generate", "a photo of a red fox", "--steps", "2", "-o", tmp_path / "b.png")
    assert rc == 0 and "outside the shapes grammar" in err
    long = " ".join(["a large red circle"] * 10)
    rc, _, err = cli(capsys, "generate", long, "--steps", "2", "-o", tmp_path / "c.png")
    assert rc == 0 and "tokens" in err and "cut" in err
    assert "Traceback" not in err and "UserWarning" not in err


def test_info_piped_is_plain_and_whole(capsys, work):
    import numpy as np

    sd = load_file(DEFAULT_MODEL_DIR / "transformer.safetensors")
    f = work / "wide.safetensors"
    for i in range(4):  # different widths per block: a long run-length list
        w = sd[f"single_blocks.{i}.linear1.weight"]
        keep = 3 * 192 + 100 + 37 * i
        sd[f"single_blocks.{i}.linear1.weight"] = w[:keep]
        sd[f"single_blocks.{i}.linear1.bias"] = sd[f"single_blocks.{i}.linear1.bias"][:keep]
        sd[f"single_blocks.{i}.linear2.weight"] = sd[f"single_blocks.{i}.linear2.weight"][:, : 192 + 100 + 37 * i].contiguous()
    save_file(sd, f)
    rc, out, _ = cli(capsys, "info", f)
    assert rc == 0
    assert "single_mlp: 100, 137, 174, 211" in out
    assert "│" not in out and "…" not in out
    assert np.all([":" in ln for ln in out.strip().splitlines()])


def test_progress_plain_lines_when_not_a_terminal(capsys, tmp_path, monkeypatch):
    from rflow.cli import common

    monkeypatch.setattr(common, "PLAIN_INTERVAL_S", 0.0)
    rc, _, err = cli(capsys, "generate", PROMPT, "--steps", "3", "-o", tmp_path / "a.png")
    assert rc == 0
    lines = [ln for ln in err.splitlines() if ln.startswith("sampling")]
    assert lines and lines[-1] == "sampling: 3/3"
    assert "None" not in err


def test_interrupt_prints_one_line_and_keeps_outputs(capsys, tmp_path, existing, monkeypatch):
    import rflow.sampling

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    before = snapshot(existing)
    monkeypatch.setattr(rflow.sampling, "sample", interrupted)
    rc, _, err = cli(capsys, "generate", PROMPT, "--steps", "2", "-o", existing, "--force")
    assert rc == 130 and err.strip() == "rflow: interrupted"
    assert snapshot(existing) == before


def test_interrupt_after_the_output_was_swapped_in_says_so(capsys, tmp_path, existing, monkeypatch):
    """A Ctrl-C that lands once the new output is in place: exit 130, and a note names the (complete)
    output, so "interrupted" never hides that the earlier file was replaced."""
    import rflow.outputs

    real = rflow.outputs._commit

    def commit_then_interrupt(tmp, dst, kind):
        real(tmp, dst, kind)
        raise KeyboardInterrupt

    before = snapshot(existing)
    monkeypatch.setattr(rflow.outputs, "_commit", commit_then_interrupt)
    rc, _, err = cli(capsys, "generate", PROMPT, "--steps", "2", "-o", existing, "--force")
    lines = err.strip().splitlines()
    assert rc == 130 and lines[-1] == "rflow: interrupted"
    assert lines[:-1] == [f"rflow: note: {existing} was written before the interrupt and is complete"]
    assert snapshot(existing) != before
    with Image.open(existing) as im:
        im.load()
