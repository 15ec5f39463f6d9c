"""LoRA training options: EMA of the adapters, the model's own timestep shift (--shift auto), the text
encoders unloaded after caching (samples still drawn)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from rflow import sampling
from rflow.cli import main
from rflow.errors import UserError
from rflow.lora import read_lora
from rflow.pipeline import Schedule
from rflow.train.data import read_dataset
from rflow.train.lora import LoRAConfig, LoRATrainer, sample_t

from test_lora_train import CFG, shapes_folder, tiny_pipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes_folder(tmp_path_factory.mktemp("data"))


def test_ema_is_exported_sampled_and_resumed(data, tmp_path):
    cfg = dict(CFG, steps=4, ema=0.9)
    a = LoRATrainer(tiny_pipe(), LoRAConfig(**cfg), read_dataset(data), tmp_path / "a")
    # the EMA by hand, alongside the trainer's steps
    mine = [p.detach().clone() for p in a.params]
    a.cache.warm(a.items, a.item_buckets, [it.caption for it in a.items] + [""])
    for step in range(4):
        a.train_step()
        d = min(0.9, (1 + step) / (10 + step))
        mine = [d * m + (1 - d) * p.detach() for m, p in zip(mine, a.params)]
    a.save_state()
    assert all(torch.allclose(m, e, atol=1e-7) for m, e in zip(mine, a.ema))
    assert not all(torch.equal(p, e) for p, e in zip(a.params, a.ema))
    trained = [p.detach().clone() for p in a.params]
    with a.averaged():
        assert all(torch.equal(p, e) for p, e in zip(a.params, a.ema))
    assert all(torch.equal(p, t) for p, t in zip(a.params, trained))  # restored after the block
    lf = read_lora(a.export("kohya"))
    weights = a.trained_weights()  # in the order of the parameters: (A, B) per adapter
    for j, lw in enumerate(weights):
        assert torch.equal(lw.down, a.ema[2 * j]) and torch.equal(lw.up, a.ema[2 * j + 1])
    assert not all(torch.equal(lw.up, p.detach()) for lw, p in zip(weights, a.params[1::2]))
    ups = {e.module: e.up for e in lf.entries}  # the file holds the EMA
    assert len(ups) == len(weights)
    for lw in weights:
        assert torch.equal(next(u for m, u in ups.items() if m.endswith(lw.layer.replace(".", "_"))), lw.up)
    # resumed: the same EMA as an uninterrupted run
    b = LoRATrainer(tiny_pipe(), LoRAConfig(**cfg), read_dataset(data), tmp_path / "b")
    b.run(until=2)
    b = LoRATrainer(tiny_pipe(), LoRAConfig(**cfg), read_dataset(data), tmp_path / "b")
    b.run(resume=True)
    assert all(torch.equal(x, y) for x, y in zip(a.ema, b.ema))
    with pytest.raises(UserError, match="--ema"):
        LoRAConfig(ema=1.0).check()


def test_auto_shift_is_the_models_schedule(data, tmp_path):
    assert math.isclose(Schedule("flux").shift_factor(256), math.exp(0.5))
    assert math.isclose(Schedule("flux").shift_factor(4096), math.exp(1.15))
    assert Schedule("static", 3.0).shift_factor(4096) == 3.0 and Schedule("none").shift_factor(64) == 1.0
    tr = LoRATrainer(tiny_pipe(), LoRAConfig(**dict(CFG, timestep="shift", shift="auto")), read_dataset(data),
                     tmp_path / "r")
    for bucket in ((32, 32), (64, 64), (128, 64)):
        w, h = bucket
        seq = tr.pipe.family_module.image_seq_len(tr.pipe.latent_shape(h, w))
        s = tr.shift_factor(bucket)
        u = torch.rand(500, generator=torch.Generator().manual_seed(1))
        t = sample_t(tr.cfg, 500, torch.Generator().manual_seed(1), s)
        # the same warp as the sampler's sigmas at that size
        assert torch.allclose(t.double(), sampling.time_shift(sampling.flux_mu(seq), u.double()), atol=1e-6)
    assert tr.shift_factor((128, 64)) > tr.shift_factor((32, 32))  # more tokens: shifted further to noise
    tr.run(until=1)
    with pytest.raises(UserError, match="--shift"):
        LoRAConfig(timestep="shift", shift="big").check()
    with pytest.raises(UserError, match="--shift"):
        LoRAConfig(timestep="shift", shift=-1.0).check()


def test_samples_with_text_encoders_unloaded(data, tmp_path):
    pipe = tiny_pipe()
    prompts = ["a red circle on a white background", "a blue square on a black background"]
    tr = LoRATrainer(pipe, LoRAConfig(**dict(CFG, steps=2)), read_dataset(data), tmp_path / "r")
    tr.run(sample_prompts=prompts, unload_text_encoders=True)
    assert pipe.text_encoders is None
    got = np.asarray(Image.open(tr.sample(prompts, tmp_path / "s.png", steps=4)))
    with pytest.raises(UserError, match="not cached"):
        tr.sample(["a green triangle on a white background"], tmp_path / "t.png")
    # the same pictures as generate() with the encoders present and the LoRA as trained
    ref = tiny_pipe()
    ims = LoRATrainer(ref, LoRAConfig(**dict(CFG, steps=2)), read_dataset(data), tmp_path / "q")
    with torch.no_grad():
        for p, q in zip(ims.params, tr.params):
            p.copy_(q)
        want = ref.generate(prompts, width=32, height=32, steps=4, seed=0)
    sheet = np.concatenate([np.asarray(im) for im in want], axis=1)
    assert np.array_equal(got, sheet)


def test_cli_options(tmp_path, data, capsys):
    from rflow.loading import save_pipeline

    model = tmp_path / "model"
    save_pipeline(tiny_pipe(), model, dtype=torch.float32)
    args = ["train", "--model", str(model), "--data", str(data), "--steps", "2", "--rank", "2", "--resolution", "32",
            "--batch", "2", "--lr", "1e-2", "--timestep", "shift", "--shift", "auto", "--ema", "0.9",
            "--sample-every", "2", "-o", str(tmp_path / "run")]
    assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "samples" / "step-000002.png").is_file()
    capsys.readouterr()
    for extra, fragment in ((["--shift", "big"], "--shift"), (["--ema", "1.5"], "--ema")):
        out = tmp_path / f"bad-{fragment}"
        assert main(args[:-1] + [str(out)] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rflow: error: ") and fragment in err[0], err
        assert not out.exists()
