"""The embedded rflow-tiny model: the default everywhere, deterministic, and adherent on a fixed set."""

import json

import numpy as np
import pytest
from PIL import Image

import rflow
from rflow.world import shapes
from rflow.cli import main
from rflow.paths import DEFAULT_MODEL_DIR

FIXED_PROMPTS = shapes.prompts(24, seed=2026, split="train")


@pytest.fixture(scope="module")
def pipe():
    return rflow.load(device="cpu")


def test_default_is_embedded(pipe):
    assert pipe.name == "rflow-tiny" and pipe.default_size == (64, 64) and pipe.denoiser.prediction == "data"
    assert (DEFAULT_MODEL_DIR / "rflow_pipeline.json").exists()
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 15 * 2**20, f"embedded model is {size / 2**20:.1f} MiB"
    assert all(json.loads((DEFAULT_MODEL_DIR / sub / "tokenizer_config.json").read_text())["tokenizer_class"]
               == "PreTrainedTokenizerFast" for sub in ("tokenizer", "tokenizer_2"))  # loadable by transformers 4 too


def test_adherence_on_fixed_prompts(pipe):
    images = pipe.generate(FIXED_PROMPTS, steps=20, seed=0)
    report = shapes.score(images, FIXED_PROMPTS)
    assert report.adherence >= 0.85, report.table()


def test_generation_is_deterministic(pipe):
    kw = dict(steps=8, output_type="np")
    a = pipe.generate(FIXED_PROMPTS[:3], seed=11, **kw)
    np.testing.assert_array_equal(a, pipe.generate(FIXED_PROMPTS[:3], seed=11, **kw))
    assert not np.array_equal(a, pipe.generate(FIXED_PROMPTS[:3], seed=12, **kw))


def test_cli_generate_and_eval_default_model(tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["generate", "a large red circle on the left on a white background", "--steps", "12", "-o", str(out)]) == 0
    img = Image.open(out)
    assert img.size == (64, 64) and "rflow-tiny" in img.text["parameters"]
    report = shapes.score([img.convert("RGB")], ["a large red circle on the left on a white background"])
    assert report.adherence >= 0.8, report.table()
    grid = tmp_path / "grid.png"
    assert main(["eval", "--shapes", "8", "--heldout", "4", "--steps", "8", "-o", str(grid), "--json"]) == 0
    assert grid.exists() and '"adherence"' in capsys.readouterr().out
    assert main(["eval", "--shapes", "4", "--heldout", "2", "--steps", "4", "-o", str(grid), "--force"]) == 0
    table = capsys.readouterr().out
    assert all(w in table for w in ("grammar (4)", "held-out pairs (2)", "adherence", "colour", "shape", "position"))
