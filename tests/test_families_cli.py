"""Every verb on every family, through the CLI: FLUX.2-klein and Z-Image pipelines (tiny, random, saved
by diffusers) are generated from, inspected, analysed, pruned, measured and trained like FLUX.1."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import rflow
from family_ref import klein_folder, zimage_folder
from rflow.checkpoints.loader import load_transformer
from rflow.cli import main
from rflow.compress.units import unit_widths

SIZE = "64x64"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"flux2": klein_folder(root), "zimage": zimage_folder(root)}


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(rc, err, fragment):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("rflow: error:") and fragment in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("family", ["flux2", "zimage"])
def test_generate_writes_the_picture_and_its_settings(capsys, tmp_path, models, family):
    out = tmp_path / "a.png"
    extra = ["--cfg", "2", "--negative", "blurry", "--cfg-truncation", "0.6", "--cfg-renorm", "1.0"] if family == "zimage" else []
    rc, _, err = cli(capsys, "generate", "a red circle", "--model", models[family], "--size", SIZE, "--steps", "2",
                     "-o", out, *extra)
    assert rc == 0, err
    with Image.open(out) as im:
        assert im.size == (64, 64)
        params = im.info["parameters"]
    assert "Guidance:" not in params and "Steps: 2" in params  # neither family has a guidance embedder
    # the same settings through the library give the same pixels
    pipe = rflow.load(models[family], device="cpu")
    kw = dict(negative_prompt="blurry", cfg=2.0, cfg_truncation=0.6, cfg_renorm=1.0) if family == "zimage" else {}
    again = pipe.generate("a red circle", width=64, height=64, steps=2, output_type="np", **kw)[0]
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), again)


def test_klein_reference_images(capsys, tmp_path, models):
    ref = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(ref)
    with_ref, plain = tmp_path / "ref-out.png", tmp_path / "plain.png"
    rc, _, err = cli(capsys, "generate", "a red circle", "--model", models["flux2"], "--steps", "2", "-o", with_ref,
                     "--ref", ref, "--ref", ref)
    assert rc == 0, err
    with Image.open(with_ref) as im:
        assert im.size == (96, 64)  # the size follows the first reference image
        referenced = np.asarray(im.convert("RGB"))
    rc, _, err = cli(capsys, "generate", "a red circle", "--model", models["flux2"], "--steps", "2", "-o", plain,
                     "--size", "96x64")
    assert rc == 0, err
    with Image.open(plain) as im:
        assert not np.array_equal(np.asarray(im.convert("RGB")), referenced)  # the references were used


@pytest.mark.parametrize("family,argv,fragment", [
    ("flux2", ["--guidance", "3"], "no guidance embedder"),
    ("zimage", ["--guidance", "3"], "no guidance embedder"),
    ("zimage", ["--ref", "{img}"], "take no reference images"),
    ("zimage", ["--cfg-truncation", "1.5"], "--cfg-truncation"),
    ("zimage", ["--size", "62x62"], "multiple of"),
    ("flux2", ["--size", "100000x100000"], "needs about"),  # refused before any work, with the estimate
    ("zimage", ["--size", "100000x100000", "--batch", "4"], "needs about"),
])
def test_family_errors_are_one_line(capsys, tmp_path, models, family, argv, fragment):
    img = tmp_path / "i.png"
    Image.new("RGB", (64, 64)).save(img)
    argv = [a.replace("{img}", str(img)) for a in argv]
    rc, _, err = cli(capsys, "generate", "a red circle", "--model", models[family], "--steps", "2", "-o",
                     tmp_path / "x.png", *(["--size", SIZE] if "--size" not in argv else []), *argv)
    one_error(rc, err, fragment)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("family,name", [("flux2", "flux2-custom"), ("zimage", "z-image-custom")])
def test_info_reports_the_family_and_its_widths(capsys, models, family, name):
    rc, out, err = cli(capsys, "info", models[family], "--json")
    assert rc == 0, err
    s = json.loads(out)
    assert s["family"] == name and s["format"] == "diffusers" and s["parameters"] > 0
    model, _ = load_transformer(models[family] / "transformer")
    widths = unit_widths(model.config)
    listed = [w for k, v in s.items() if k.endswith("_mlp") for w in (v if isinstance(v, list) else [])]
    flat = [x for w in listed for x in (w if isinstance(w, (list, tuple)) else [w])]
    assert sorted(flat) == sorted(widths.values())
    rc, out, _ = cli(capsys, "info", models[family])
    assert rc == 0 and f"family: {name}" in out


@pytest.mark.parametrize("family", ["flux2", "zimage"])
def test_analyze_prune_measure_sensitivity(capsys, tmp_path, models, family):
    m = models[family]
    stats, pruned = tmp_path / "stats.safetensors", tmp_path / "pruned.safetensors"
    rc, _, err = cli(capsys, "analyze", "--model", m, "--shapes", "2", "--steps", "2", "--sizes", SIZE, "-o", stats)
    assert rc == 0, err
    rc, out, err = cli(capsys, "prune", "--model", m, "--stats", stats, "--fraction", "0.25", "-o", pruned)
    assert rc == 0, err
    before, _ = load_transformer(m / "transformer")
    after, info = load_transformer(pruned)
    assert info.family_kind == family
    w0, w1 = unit_widths(before.config), unit_widths(after.config)
    assert set(w0) == set(w1) and all(w1[u] == w0[u] - round(0.25 * w0[u]) for u in w0)
    # the pruned single file loads as a pipeline with the source's VAE and text encoders
    rc, _, err = cli(capsys, "generate", "a red circle", "--model", pruned, "--vae", m / "vae", "--text-encoders", m,
                     "--size", SIZE, "--steps", "2", "-o", tmp_path / "p.png")
    assert rc == 0, err
    rc, out, err = cli(capsys, "measure", "--model", pruned, "--reference", m, "--vae", m / "vae", "--text-encoders", m,
                       "--shapes", "2", "--steps", "2", "--sizes", SIZE, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["velocity_mse"] > 0 and np.isfinite(res["velocity_mse"])
    rc, out, err = cli(capsys, "sensitivity", "--model", m, "--stats", stats, "--level", "0.5", "--shapes", "1",
                       "--steps", "2", "--sizes", SIZE, "--png", tmp_path / "sens.png", "--json", tmp_path / "sens.json")
    assert rc == 0, err
    rows = json.loads((tmp_path / "sens.json").read_text())["layers"]
    assert len(rows) == 1 + max(r["layer"] for r in rows) and all(r["velocity_mse"] >= 0 for r in rows)
    assert any(r["velocity_mse"] > 0 for r in rows)


@pytest.mark.parametrize("family", ["flux2", "zimage"])
def test_train_full_from_a_model(capsys, tmp_path, models, family):
    m = models[family]
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", "--full", "--model", m, "--steps", "2", "--batch", "2", "--lr", "1e-3",
                       "--checkpoint-every", "1", "-o", run)
    assert rc == 0, err
    exported = run / "model.safetensors"
    assert exported.is_file() and (run / "train_state.safetensors").is_file()
    trained, info = load_transformer(exported)
    base, _ = load_transformer(m / "transformer")
    assert info.family_kind == family
    diffs = [float((a - b).abs().max()) for a, b in zip(trained.state_dict().values(), base.state_dict().values())]
    assert max(diffs) > 0  # the weights moved
    assert all(np.isfinite(diffs))
