"""rflow.models.qwen: Qwen3 prompt encodings equal diffusers' Flux2KleinPipeline / ZImagePipeline encode_prompt.

Tiny random Qwen3 encoders and a byte-level BPE tokenizer with Qwen's chat template (tests/qwen_ref.py), saved in
both published layouts (``Qwen3ForCausalLM`` as FLUX.2-klein ships it, ``Qwen3Model`` as Z-Image does); rflow
loads either as ``Qwen3Model``, diffusers gets the class its pipeline loads. Same tensors, bit for bit.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from qwen_ref import klein_pipeline, load_reference_parts, save_qwen_text, zimage_pipeline
from rflow.errors import RflowWarning, UserError
from rflow.models.qwen import find_qwen_text, klein_text_ids, load_qwen_text

LONG = " ".join(["the small red cat with a large blue dog on a painting of the city at night"] * 6)
PROMPTS = ["a red cat", "", "the small dog on a large painting of the city at night, under a green sky!", LONG,
           "Ünïcode 東京 photo 42"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {"causal": save_qwen_text(root / "causal", causal_lm=True, tie=False, seed=1),
            "base": save_qwen_text(root / "base", causal_lm=False, seed=2)}


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a, b), f"max |diff| {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("layout, max_len", [("causal", 32), ("base", 32), ("causal", 512)])
def test_klein_equals_pipeline(folders, layout, max_len):
    ours = load_qwen_text(folders[layout])
    pipe = klein_pipeline(*load_reference_parts(folders[layout], causal_lm=True))
    layers = (1, 2, 3)
    ref, ref_ids = pipe.encode_prompt(list(PROMPTS), max_sequence_length=max_len, text_encoder_out_layers=layers)
    emb, ids = ours.encode_klein(PROMPTS, max_sequence_length=max_len, layers=layers)
    assert emb.shape == (len(PROMPTS), max_len, 3 * ours.hidden_size)
    _same(emb, ref)
    _same(ids, ref_ids)
    assert emb.std() > 0.1 and not torch.equal(emb[0], emb[2])  # the prompts are told apart
    # klein's negative prompt: "" as a single string
    neg, neg_ids = pipe.encode_prompt("", max_sequence_length=max_len, text_encoder_out_layers=layers)
    ours_neg, ours_neg_ids = ours.encode_klein("", max_sequence_length=max_len, layers=layers)
    _same(ours_neg, neg)
    _same(ours_neg_ids, neg_ids)
    # other layer choices, repeated and in any order
    ref, _ = pipe.encode_prompt(PROMPTS[:2], max_sequence_length=max_len, text_encoder_out_layers=(4, 0, 2, 2))
    _same(ours.encode_klein(PROMPTS[:2], max_sequence_length=max_len, layers=(4, 0, 2, 2))[0], ref)


@pytest.mark.parametrize("layout, max_len", [("causal", 24), ("base", 24), ("base", 512)])
def test_zimage_equals_pipeline(folders, layout, max_len):
    ours = load_qwen_text(folders[layout])
    te, tok = load_reference_parts(folders[layout], causal_lm=(layout == "causal"))
    pipe = zimage_pipeline(te, tok)
    ref, ref_neg = pipe.encode_prompt(list(PROMPTS), max_sequence_length=max_len)  # (it rewrites its list)
    out = ours.encode_zimage(PROMPTS, max_sequence_length=max_len)
    neg = ours.encode_zimage([""] * len(PROMPTS), max_len)
    assert len(out) == len(ref) == len(PROMPTS) and len(neg) == len(ref_neg)
    for a, b in zip(out + neg, ref + ref_neg):
        _same(a, b)
    lengths = [len(o) for o in out]
    assert len(set(lengths)) > 2 and all(o.shape[1] == ours.hidden_size for o in out)
    assert max(lengths) == max_len if max_len < 100 else max(lengths) < max_len  # truncated / padding removed
    assert lengths[1] == len(neg[0])  # the empty prompt is just the chat template


def test_klein_default_layers_28(tmp_path):
    """The defaults (layers 9, 18, 27, 512 tokens) on a 28-layer, very narrow Qwen3."""
    folder = save_qwen_text(tmp_path, layers=28, hidden=16, heads=2, kv_heads=1, head_dim=8, intermediate=24,
                            causal_lm=True, tie=True, seed=3)
    ours = load_qwen_text(folder)
    pipe = klein_pipeline(*load_reference_parts(folder, causal_lm=True))
    ref, ref_ids = pipe.encode_prompt(PROMPTS[:2])
    emb, ids = ours.encode_klein(PROMPTS[:2])
    assert emb.shape == (2, 512, 48)
    _same(emb, ref)
    _same(ids, ref_ids)
    with pytest.raises(UserError, match="0..28"):
        ours.encode_klein(["a cat"], layers=(9, 18, 29))


def test_text_ids_and_dtype(folders):
    ids = klein_text_ids(2, 5)
    assert ids.dtype == torch.int64 and ids.shape == (2, 5, 4)
    assert ids[1].tolist() == [[0, 0, 0, l] for l in range(5)]
    ours = load_qwen_text(folders["causal"], dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.device == torch.device("cpu")
    emb, _ = ours.encode_klein(["a cat"], max_sequence_length=16, layers=(1, 3))
    assert emb.dtype == torch.bfloat16 and emb.shape == (1, 16, 64)
    assert ours.encode_zimage(["a cat"], 16)[0].dtype == torch.bfloat16


def test_chat_template_and_truncation_warning(folders):
    ours = load_qwen_text(folders["base"])
    klein, zimage = ours.chat_text("a cat", "klein"), ours.chat_text("a cat", "zimage")
    assert zimage == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert klein == zimage + "<think>\n\n</think>\n\n"
    tok = ours.tokenizer
    n_z, n_k = len(tok(zimage).input_ids), len(tok(klein).input_ids)
    assert n_k > n_z
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.warn_if_truncated(PROMPTS[:3], 512)
        ours.warn_if_truncated(["a cat"], n_k)
        ours.warn_if_truncated(["a cat"], n_z, mode="zimage")
    with pytest.warns(RflowWarning, match=rf"has {n_k} Qwen3 tokens .* reads the first {n_z}, the rest is cut"):
        ours.warn_if_truncated(["a cat"], n_z)
    with pytest.warns(RflowWarning) as record:
        ours.warn_if_truncated([LONG, LONG, "a cat"], 64, mode="zimage")
    assert len(record) == 1 and "..." in str(record[0].message)  # once per prompt, shortened
    # and a truncated prompt encodes to exactly max_sequence_length tokens, as in the pipeline (tested above)
    assert len(ours.encode_zimage([LONG], 64)[0]) == 64


def test_find_and_bad_folders(folders, tmp_path):
    assert find_qwen_text(None, tmp_path, folders["base"], folders["causal"]) == folders["base"]
    assert find_qwen_text(tmp_path) is None
    cases = {}
    (tmp_path / "no_tok" / "text_encoder").mkdir(parents=True)
    cases["no_tok"] = "missing tokenizer/"
    t5 = tmp_path / "t5"
    for sub in ("text_encoder", "tokenizer"):
        (t5 / sub).mkdir(parents=True)
    (t5 / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    cases["t5"] = "a 't5' model, not Qwen3"
    empty = tmp_path / "empty"
    for sub in ("text_encoder", "tokenizer"):
        (empty / sub).mkdir(parents=True)
    cases["empty"] = "no readable config.json"
    noweights = tmp_path / "noweights"
    (noweights / "tokenizer").mkdir(parents=True)
    (noweights / "text_encoder").mkdir(parents=True)
    shutil.copy(folders["base"] / "text_encoder" / "config.json", noweights / "text_encoder")
    cases["noweights"] = "cannot load Qwen3"
    assert find_qwen_text(t5, empty, noweights) == noweights  # a Qwen3 config is enough to be found
    for name, words in cases.items():
        with pytest.raises(UserError, match=words) as info:
            load_qwen_text(tmp_path / name)
        assert "\n" not in str(info.value)
    # a tokenizer without chat template; one with more tokens than the encoder's embedding has rows
    from transformers import AutoTokenizer

    for name, words in [("notemplate", "no chat template"), ("bigvocab", "embed_tokens.weight")]:
        dst = shutil.copytree(folders["base"], tmp_path / name)
        tok = AutoTokenizer.from_pretrained(dst / "tokenizer")
        if name == "notemplate":
            tok.chat_template = None
            (dst / "tokenizer" / "chat_template.jinja").unlink()
        else:
            tok.add_tokens(["zebra", "giraffe"])
        tok.save_pretrained(dst / "tokenizer")
        with pytest.raises(UserError, match=words) as info:
            load_qwen_text(dst)
        assert "\n" not in str(info.value)


def test_bad_arguments(folders):
    ours = load_qwen_text(folders["base"])
    for call, words in [(lambda: ours.encode_klein([], 16), "no prompts"),
                        (lambda: ours.encode_klein([3], 16), "strings"),
                        (lambda: ours.encode_klein(["a"], 0), "max_sequence_length"),
                        (lambda: ours.encode_zimage(["a"], 2.5), "max_sequence_length"),
                        (lambda: ours.encode_klein(["a"], 16, layers=()), "layers"),
                        (lambda: ours.encode_klein(["a"], 16, layers=(5,)), "0..4"),
                        (lambda: ours.warn_if_truncated(["a"], 16, mode="flux"), "klein, zimage")]:
        with pytest.raises(UserError, match=words) as info:
            call()
        assert "\n" not in str(info.value)
