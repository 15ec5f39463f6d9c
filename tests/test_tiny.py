"""rflow-tiny: pipeline folder format, codec, training steps, exact resume, evaluation."""

import json

import pytest
import torch

import rflow
from rflow.world import tiny
from rflow.errors import UserError
from rflow.models.codec import PixelUnshuffleCodec
from rflow.pipeline import save_pipeline
from rflow.train.full import TrainConfig, Trainer

SMALL = dict(hidden=32, heads=2, depth=1, depth_single=1, mlp_ratio=2.0)


def test_codec_is_exactly_invertible():
    c = PixelUnshuffleCodec(4)
    x = torch.rand(2, 3, 64, 32) * 2 - 1
    z = c.encode(x)
    assert z.shape == (2, 48, 16, 8) and c.latent_channels == 48 and c.downscale_factor == 4
    torch.testing.assert_close(c.decode(z), x, atol=0, rtol=0)
    with pytest.raises(UserError, match="multiple of 4"):
        c.encode(torch.zeros(1, 3, 30, 32))


def test_vocabulary_covers_grammar_and_reserved_words():
    from rflow.world import shapes

    vocab = set(tiny.vocabulary())
    for p in shapes.prompts(200, seed=3, split="any"):
        assert set(p.split()) <= vocab, p
    tok = tiny.build_text_encoders().t5_tokenizer
    assert tok.unk_token_id not in tok("a small magenta star at the top on a black background").input_ids


def test_save_and_load_pipeline_folder(tmp_path):
    p = tiny.build(seed=1, **SMALL)
    save_pipeline(p, tmp_path / "m", dtype=torch.float32)
    manifest = json.loads((tmp_path / "m" / "rflow_pipeline.json").read_text())
    assert manifest["codec"]["type"] == "pixel_unshuffle" and manifest["default_size"] == [64, 64]
    # the Hub layout, which transformers 4 and 5 both load: prefixed CLIP keys, a known tokenizer class
    from safetensors import safe_open

    with safe_open(tmp_path / "m" / "text_encoder" / "model.safetensors", "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    for sub in ("tokenizer", "tokenizer_2"):
        assert json.loads((tmp_path / "m" / sub / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    q = rflow.load(tmp_path / "m", device="cpu")
    kw = dict(steps=3, output_type="latent", seed=5)
    prompt = "a large red circle on the left on a white background"
    with torch.no_grad():
        p.transformer.final_layer.linear.weight.normal_()  # zero-initialised: make the output depend on weights
    save_pipeline(p, tmp_path / "m", dtype=torch.float32)  # overwrite in place
    q = rflow.load(tmp_path / "m", device="cpu")
    torch.testing.assert_close(q.generate(prompt, **kw), p.generate(prompt, **kw))
    assert q.generate(prompt)[0].size == (64, 64)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "rflow_pipeline.json").write_text('{"format": "other"}')
    with pytest.raises(UserError, match="not an rflow pipeline"):
        rflow.load(tmp_path / "bad", device="cpu")


def _trainer(tmp_path, name, **kw):
    cfg = TrainConfig(batch=4, lr=3e-3, warmup=2, checkpoint_every=3, **kw)
    return Trainer(tiny.build(seed=0, **SMALL), cfg, tmp_path / name)


def test_training_lowers_loss(tmp_path):
    tr = _trainer(tmp_path, "run", steps=40)
    probe = range(10_000, 10_008)  # fixed held-out steps: same images, t and noise before and after
    with torch.no_grad():
        before = sum(tr.loss_at(s).item() for s in probe)
    tr.run()
    with torch.no_grad():
        after = sum(tr.loss_at(s).item() for s in probe)
    assert after < 0.8 * before
    assert (tmp_path / "run" / "train_state.safetensors").exists()


def test_resume_continues_exactly(tmp_path):
    straight = _trainer(tmp_path, "a", steps=6)
    straight.run()
    first = _trainer(tmp_path, "b", steps=6)
    first.run(until=3)  # an interrupted run: state saved at step 3
    resumed = _trainer(tmp_path, "b", steps=6)
    resumed.run(resume=True)
    assert resumed.step == 6
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, atol=0, rtol=0)
    for k, v in straight.ema.items():
        torch.testing.assert_close(resumed.ema[k], v, atol=0, rtol=0)
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in straight.log]
    with pytest.raises(UserError, match="--resume"):
        _trainer(tmp_path, "b", steps=6).run()
    with pytest.raises(UserError, match="differs: lr"):
        Trainer(tiny.build(seed=0, **SMALL), TrainConfig(batch=4, lr=1e-2, warmup=2, steps=9), tmp_path / "b").run(resume=True)


def test_export_writes_ema_weights(tmp_path):
    tr = _trainer(tmp_path, "e", steps=3)
    tr.run()
    path = tr.export(tmp_path / "e" / "model")
    q = rflow.load(path, device="cpu", dtype=torch.float32)
    for k, v in q.transformer.state_dict().items():
        torch.testing.assert_close(v, tr.ema[k].to(torch.bfloat16).float())
