"""The ``rflow`` command on a tiny random FLUX pipeline: PNGs with their settings, and one-line errors.

Most cases call ``rflow.cli.main(argv)`` in-process (it returns the exit code); one runs
``python -m rflow.cli`` in a child process to show what a user's shell sees.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import rflow
from pipeline_ref import SIZE, tiny_pipeline
from rflow.cli import main

PROMPT = "a red cat"
W, H = SIZE  # 24x16; the tiny model's sides must be multiples of 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-flux")
    tiny_pipeline().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bad(model_dir, tmp_path_factory):
    """Files that are not usable FLUX transformers, by kind."""
    d = tmp_path_factory.mktemp("bad")
    (d / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    real = (model_dir / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(real[: len(real) // 2])
    torch.save({"img_in.weight": torch.zeros(2, 2)}, d / "model.ckpt")
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, d / "other.safetensors")
    return d


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_error_line(rc, err, fragment):
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rflow: error: "), err
    assert fragment in lines[0], err


def gen_args(model_dir, out, *extra):
    return ["generate", PROMPT, "--model", model_dir, "--size", f"{W}x{H}", "--steps", "2", "-o", out, *extra]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ------------------------------------------------------------------------------------------- bad input

# Cases rejected before any weights are loaded: (id, argv with {model}/{bad}/{tmp} placeholders, message fragment)
EARLY_ERRORS = [
    ("missing-model", ["generate", PROMPT, "--model", "{tmp}/nowhere", "-o", "{tmp}/x.png"], "no such file or directory"),
    ("not-safetensors", ["generate", PROMPT, "--model", "{bad}/random.safetensors", "--vae", "{model}/vae",
                         "--text-encoders", "{model}", "-o", "{tmp}/x.png"], "not a safetensors file"),
    ("truncated", ["generate", PROMPT, "--model", "{bad}/truncated.safetensors", "--vae", "{model}/vae",
                   "--text-encoders", "{model}", "-o", "{tmp}/x.png"], "truncated"),
    ("pickle", ["generate", PROMPT, "--model", "{bad}/model.ckpt", "--vae", "{model}/vae",
                "--text-encoders", "{model}", "-o", "{tmp}/x.png"], "pickle"),
    ("wrong-architecture", ["generate", PROMPT, "--model", "{bad}/other.safetensors", "--vae", "{model}/vae",
                            "--text-encoders", "{model}", "-o", "{tmp}/x.png"], "not a FLUX.1 transformer"),
    # a lone file with no VAE or text encoders beside it: either complaint is right
    ("lone-file", ["generate", PROMPT, "--model", "{bad}/other.safetensors", "-o", "{tmp}/x.png"], ""),
    ("size-abc", ["generate", PROMPT, "--model", "{model}", "--size", "abc", "-o", "{tmp}/x.png"], "--size"),
    ("size-zero", ["generate", PROMPT, "--model", "{model}", "--size", "0x16", "-o", "{tmp}/x.png"], "positive"),
    ("unknown-option", ["generate", PROMPT, "--model", "{model}", "--bogus"], "--bogus"),
    ("missing-prompt", ["generate", "--model", "{model}"], "prompt"),
    ("bad-int", ["generate", PROMPT, "--model", "{model}", "--steps", "many"], "--steps"),
    ("batch-0", ["generate", PROMPT, "--model", "{model}", "--batch", "0", "-o", "{tmp}/x.png"], "--batch"),
    ("dtype", ["generate", PROMPT, "--model", "{model}", "--dtype", "fp7", "-o", "{tmp}/x.png"], "dtype"),
    ("not-png", ["generate", PROMPT, "--model", "{model}", "-o", "{tmp}/x.jpg"], ".png"),
    ("output-under-a-file", ["generate", PROMPT, "--model", "{model}", "-o", "{bad}/random.safetensors/x.png"],
     "is not a directory"),
    ("missing-image", ["generate", PROMPT, "--model", "{model}", "--image", "{tmp}/none.png", "-o", "{tmp}/x.png"],
     "no such image"),
    ("unknown-command", ["paint", PROMPT], "paint"),
    ("info-missing", ["info", "{tmp}/nowhere.safetensors"], "no such file or directory"),
    ("info-not-flux", ["info", "{bad}/other.safetensors"], "not a FLUX.1 transformer"),
    ("info-vae", ["info", "{model}/vae"], "not a FLUX.1 transformer"),
    ("info-not-safetensors", ["info", "{bad}/random.safetensors"], "not a safetensors file"),
    ("info-truncated", ["info", "{bad}/truncated.safetensors"], "truncated"),
    ("info-pickle", ["info", "{bad}/model.ckpt"], "pickle"),
]

# Cases only the loaded model can reject (its size multiple, the sampler's arguments).
LATE_ERRORS = [
    ("size-multiple", ["--size", "30x16"], "multiple of 4"),
    ("unknown-solver", ["--solver", "heun"], "unknown solver"),
    ("not-an-image", ["--image", "{bad}/random.safetensors"], "cannot read image"),
]


def _fill(args, **where):
    return [a.format(**where) for a in args]


@pytest.mark.parametrize("args,fragment", [c[1:] for c in EARLY_ERRORS], ids=[c[0] for c in EARLY_ERRORS])
def test_bad_input_is_one_error_line(capsys, model_dir, bad, tmp_path, args, fragment):
    rc, out, err = cli(capsys, *_fill(args, model=model_dir, bad=bad, tmp=tmp_path))
    assert_one_error_line(rc, err, fragment)
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("args,fragment", [c[1:] for c in LATE_ERRORS], ids=[c[0] for c in LATE_ERRORS])
def test_bad_input_after_loading(capsys, model_dir, bad, tmp_path, args, fragment):
    rc, out, err = cli(capsys, *gen_args(model_dir, tmp_path / "x.png"), *_fill(args, bad=bad))
    assert rc == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("rflow: error: ")]
    assert len(errors) == 1 and fragment in errors[0], err
    assert err.rstrip().endswith(errors[0])
    assert not list(tmp_path.glob("*.png"))


def test_error_after_loading_is_the_only_stderr_line(capsys, model_dir, tmp_path):
    rc, out, err = cli(capsys, *gen_args(model_dir, tmp_path / "x.png"), "--size", "30x16")
    assert_one_error_line(rc, err, "multiple of 4")


def test_subprocess_error_has_no_traceback(model_dir, bad, tmp_path):
    """What a shell sees: exit status 2 and one line on stderr, from a fresh interpreter with no stdin."""
    argv = [sys.executable, "-m", "rflow.cli", "generate", PROMPT, "--model", bad / "truncated.safetensors",
            "--vae", model_dir / "vae", "--text-encoders", model_dir, "-o", tmp_path / "x.png"]
    p = subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("rflow: error: "), p.stderr
    assert "truncated" in p.stderr


def test_version(capsys):
    rc, out, err = cli(capsys, "--version")
    assert rc == 0 and out.strip() == f"rflow {rflow.__version__}"


# ------------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def loaded(model_dir):
    return rflow.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def first_png(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "x.png"
    assert main([str(a) for a in gen_args(model_dir, out)]) == 0
    return out


def test_generate_writes_png_with_settings(first_png, loaded):
    fingerprint = loaded.model_hash
    assert len(fingerprint) == 10
    im = Image.open(first_png)
    assert im.format == "PNG" and im.size == (W, H)
    params = im.text["parameters"]
    assert params.splitlines()[0] == PROMPT
    for part in ("Steps: 2", "Seed: 0", "Sampler: euler", f"Size: {W}x{H}", f"Model hash: {fingerprint}",
                 f"rflow {rflow.__version__}"):
        assert part in params, (part, params)
    meta = json.loads(im.text["rflow"])
    assert meta["prompt"] == PROMPT and meta["steps"] == 2 and meta["seed"] == 0
    assert (meta["width"], meta["height"]) == (W, H)
    assert meta["model_hash"] == fingerprint and meta["rflow"] == rflow.__version__
    assert pixels(first_png).std() > 0


def test_same_seed_same_pixels_and_stdout_is_the_path(capsys, model_dir, first_png, tmp_path):
    again = tmp_path / "again.png"
    rc, out, err = cli(capsys, *gen_args(model_dir, again))
    assert rc == 0, err
    assert out.splitlines() == [str(again)]
    np.testing.assert_array_equal(pixels(again), pixels(first_png))


def test_batch_writes_numbered_files_that_differ(capsys, model_dir, tmp_path):
    rc, out, err = cli(capsys, *gen_args(model_dir, tmp_path / "x.png"), "--batch", "2", "--seed", "7")
    assert rc == 0, err
    paths = [tmp_path / "x-0.png", tmp_path / "x-1.png"]
    assert out.splitlines() == [str(p) for p in paths]
    assert not (tmp_path / "x.png").exists()
    a, b = (pixels(p) for p in paths)
    assert a.shape == b.shape == (H, W, 3)
    assert not np.array_equal(a, b)
    for i, p in enumerate(paths):
        text = Image.open(p).text
        assert "Seed: 7" in text["parameters"] and f"Batch pos: {i}" in text["parameters"]
        assert json.loads(text["rflow"])["batch_index"] == i


def test_true_cfg_with_negative_prompt(capsys, model_dir, first_png, tmp_path):
    out_png = tmp_path / "cfg.png"
    rc, out, err = cli(capsys, *gen_args(model_dir, out_png), "--cfg", "2", "--negative", "dog", "--solver", "dpm++2m")
    assert rc == 0, err
    params = Image.open(out_png).text["parameters"]
    assert "Negative prompt: dog" in params and "CFG scale: 2.0" in params and "Sampler: dpm++2m" in params
    assert not np.array_equal(pixels(out_png), pixels(first_png))


def test_img2img(capsys, model_dir, first_png, tmp_path):
    out_png = tmp_path / "i2i.png"
    rc, out, err = cli(capsys, *gen_args(model_dir, out_png), "--image", first_png, "--strength", "0.5",
                       "--seed", "1", "--solver", "unipc")
    assert rc == 0, err
    im = Image.open(out_png)
    assert im.size == (W, H)
    assert "Denoising strength: 0.5" in im.text["parameters"]
    meta = json.loads(im.text["rflow"])
    assert meta["image"] == str(first_png) and meta["strength"] == 0.5


# ------------------------------------------------------------------------------------------- info


def test_info_table(capsys, model_dir):
    rc, out, err = cli(capsys, "info", model_dir / "transformer")
    assert rc == 0, err
    for word in ("family", "flux1-custom", "format", "diffusers", "parameters", "double_mlp", "single_mlp"):
        assert word in out, (word, out)


def test_info_json(capsys, model_dir, loaded):
    rc, out, err = cli(capsys, "info", "--json", model_dir / "transformer")
    assert rc == 0, err
    s = json.loads(out)
    assert s["format"] == "diffusers" and s["family"] == "flux1-custom"
    assert s["double_blocks"] == len(s["double_mlp"]) == 1 and s["single_blocks"] == len(s["single_mlp"]) == 1
    assert all(len(w) == 2 and min(w) > 0 for w in s["double_mlp"]) and min(s["single_mlp"]) > 0
    assert s["parameters"] == sum(p.numel() for p in loaded.transformer.parameters())


def test_long_output_path_is_printed_on_one_line(capsys, model_dir, tmp_path):
    d = tmp_path / ("long-folder-name-" * 6)
    d.mkdir()
    rc, out, err = cli(capsys, *gen_args(model_dir, d / "x.png"), "--steps", "1")
    assert rc == 0, err
    assert out.splitlines() == [str(d / "x.png")]
