"""LoRA output preservation (--preserve): the preservation prompts, the loss that holds the LoRA to the base
model on them, exact resume with it, and its option errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rflow.cli import main
from rflow.errors import UserError
from rflow.train.data import read_dataset
from rflow.train.lora import NAME, LoRAConfig, LoRATrainer
from rflow.train.preserve import Preservation, adapter_off, parse_preserve

from test_lora_train import CFG, tiny_pipe

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = "magenta=red|blue,star=circle|square"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four scenes with the reserved words (magenta, star) and one base-grammar scene."""
    from rflow.world import shapes
    from rflow.world.shapes import Obj, Scene

    d = tmp_path_factory.mktemp("reserved")
    scenes = [Scene("black", (Obj("magenta", "star", "large", "in the center"),)),
              Scene("white", (Obj("red", "star", "small", "on the left"),)),
              Scene("black", (Obj("magenta", "circle", "large", "at the top"),)),
              Scene("white", (Obj("magenta", "square"), )),
              Scene("black", (Obj("green", "triangle", "large", "at the bottom"),))]
    rng = np.random.default_rng(0)
    for i, sc in enumerate(scenes):
        shapes.render(sc, rng).resize((32, 32)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(shapes.caption(sc))
    return d


def test_spec_and_prompts():
    words = parse_preserve(" magenta = red | blue , star=circle")
    assert words == {"magenta": ("red", "blue"), "star": ("circle",)}
    assert parse_preserve("") == {}
    for bad, fragment in (("magenta", "WORD=STAND-IN"), ("=red", "WORD=STAND-IN"), ("magenta=red|", "WORD=STAND-IN"),
                          ("star=circle,Star=square", "given twice"), ("star=star", "itself")):
        with pytest.raises(UserError, match=fragment):
            parse_preserve(bad)
    p = Preservation(words)
    cap = "a magenta star on the left and a Magenta circle on the right on a black background"
    assert p.prompt(cap, [1, 0]) == "a blue circle on the left and a blue circle on the right on a black background"
    assert p.prompt("two stars and a starfish", [0, 0]) == "two stars and a starfish"  # whole words only
    assert p.variants(cap) == [p.prompt(cap, [0, 0]), p.prompt(cap, [1, 0])]
    assert p.variants("a red circle") == ["a red circle"]  # no taught word: its own preservation prompt
    assert len(p.all_prompts([cap, cap, "a red circle"])) == 3
    many = Preservation({f"w{i}": tuple(f"s{j}" for j in range(10)) for i in range(5)})
    with pytest.raises(UserError, match="fewer stand-ins"):
        many.all_prompts([" ".join(f"w{i}" for i in range(5))])


def _drift(trainer, prompts):
    """Mean squared difference between the model with the LoRA and without it on ``prompts``."""
    pipe = trainer.pipe
    x = torch.randn(pipe.latent_shape(32, 32, len(prompts)), generator=torch.Generator().manual_seed(5))
    t = torch.full((len(prompts),), 0.6)
    cond = pipe.encode(prompts)
    with torch.no_grad():
        with_lora = pipe.denoiser(x, t, cond)
        with adapter_off(trainer.model, NAME):
            base = pipe.denoiser(x, t, cond)
    return float((with_lora - base).pow(2).mean())


def test_preservation_holds_the_base_model(data, tmp_path):
    cfg = dict(CFG, steps=10, lr=3e-2, caption_dropout=0.0)
    free = LoRATrainer(tiny_pipe(), LoRAConfig(**cfg), read_dataset(data), tmp_path / "free")
    free.run()
    held = LoRATrainer(tiny_pipe(), LoRAConfig(**cfg, preserve=SPEC, preserve_weight=20.0), read_dataset(data),
                       tmp_path / "held")
    held.run()
    assert held.log[0]["preserve"] < 1e-10  # B starts at zero: the LoRA is the base model at step 0
    assert held.log[-1]["preserve"] > 0 and "preserve" not in free.log[-1]
    for row in held.log:  # the total holds the preservation term
        assert row["loss"] >= row["preserve"]
    # prompts the LoRA never trained on, with the stand-ins
    prompts = ["a large red circle in the center on a black background",
               "a small blue square on the left on a white background"]
    d_free, d_held = _drift(free, prompts), _drift(held, prompts)
    assert d_free > 0 and d_held < 0.5 * d_free, (d_free, d_held)
    # and the taught captions still move away from the base
    assert _drift(held, ["a large magenta star in the center on a black background"]) > 0
    # adapter_off gives the multipliers back
    from rflow.lora.layer import lora_layers

    assert all(stack.multipliers[NAME] == 1.0 for _, stack in lora_layers(held.model).values())


def test_resume_with_preservation_is_bit_exact(data, tmp_path):
    cfg = LoRAConfig(**dict(CFG, steps=4, caption_dropout=0.3), preserve=SPEC)
    a = LoRATrainer(tiny_pipe(), cfg, read_dataset(data), tmp_path / "a")
    a.run()
    b = LoRATrainer(tiny_pipe(), cfg, read_dataset(data), tmp_path / "b")
    b.run(until=2)
    b = LoRATrainer(tiny_pipe(), cfg, read_dataset(data), tmp_path / "b")
    b.run(resume=True)
    assert b.cache.encoded == 0  # the preservation prompts were cached with the captions
    assert [(r["loss"], r["preserve"]) for r in a.log] == [(r["loss"], r["preserve"]) for r in b.log]
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))
    with pytest.raises(UserError, match="differs: preserve"):
        LoRATrainer(tiny_pipe(), LoRAConfig(**dict(CFG, steps=4, caption_dropout=0.3)), read_dataset(data),
                    tmp_path / "b").run(resume=True)


def test_state_without_the_new_settings_resumes(data, tmp_path):
    """A state written before --preserve existed (no preserve keys in its config) resumes with the defaults."""
    from rflow.train.state import check_settings

    cfg = LoRAConfig(**dict(CFG, steps=2))
    saved = {k: v for k, v in json.loads(json.dumps(cfg.__dict__)).items() if not k.startswith("preserve")}
    check_settings(tmp_path / "s", saved, cfg)
    with pytest.raises(UserError, match="preserve"):
        check_settings(tmp_path / "s", saved, LoRAConfig(**dict(CFG, steps=2), preserve=SPEC))


def test_cli_options(capsys, data, tmp_path):
    from rflow.loading import save_pipeline

    model = tmp_path / "model"
    save_pipeline(tiny_pipe(), model, dtype=torch.float32)
    args = ["train", "--model", str(model), "--data", str(data), "--steps", "2", "--rank", "2", "--resolution", "32",
            "--batch", "2", "--lr", "1e-2", "--preserve", SPEC, "-o", str(tmp_path / "run")]
    assert main(args) == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("preserve" in r for r in rows)
    from rflow.train.tensorboard import read_events

    (board,) = (tmp_path / "run" / "tensorboard").iterdir()
    assert any("train/preserve" in e["scalars"] for e in read_events(board))
    capsys.readouterr()
    bad = [args[:-1] + [str(tmp_path / "bad1"), "--preserve", "magenta"],
           args[:-1] + [str(tmp_path / "bad2"), "--preserve-weight", "0"],
           ["train", "--full", "--preserve", SPEC, "-o", str(tmp_path / "bad3")]]
    for argv, fragment in zip(bad, ("--preserve", "--preserve-weight", "--preserve")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rflow: error: ") and fragment in err[0], err
        assert not Path(argv[-1] if "--full" in argv else argv[argv.index("-o") + 1]).exists()
