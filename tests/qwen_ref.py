"""Tiny Qwen3 text parts built offline (random weights, a small byte-level BPE tokenizer), as diffusers'
FLUX.2-klein and Z-Image pipelines hold them, saved as ``text_encoder/`` + ``tokenizer/``.

The tokenizer is a transformers ``Qwen2Tokenizer`` (Qwen's own pre-tokenizer regex and byte-level BPE,
with merges trained on a small corpus), with Qwen's special tokens ``<|endoftext|>`` (pad/eos),
``<|im_start|>``, ``<|im_end|>`` and the added ``<think>``/``</think>``, and a chat template that renders
messages like Qwen3's (``<|im_start|>role\\ncontent<|im_end|>\\n``; the generation prompt
``<|im_start|>assistant\\n`` gets an empty ``<think>\\n\\n</think>\\n\\n`` block when ``enable_thinking`` is false).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

WORDS = ("a an the red green blue cat dog photo of on in with small large painting sky city night "
         "user assistant system think").split()
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


@functools.lru_cache(maxsize=1)
def _bpe(vocab_size: int):
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=1, show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 4 + [f" {w}" for w in WORDS], trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def tiny_tokenizer(vocab_size: int = 320):
    """A Qwen2Tokenizer: byte-level BPE over ``vocab_size`` entries, then the 5 special/added tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _bpe(vocab_size)
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=131072)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_qwen3(tokenizer, *, layers: int = 4, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 8, intermediate: int = 48, causal_lm: bool = False, tie: bool = True, seed: int = 0):
    """A random Qwen3 (``Qwen3ForCausalLM`` when ``causal_lm``, else ``Qwen3Model``), fp32, eval mode."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    cfg = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=1024,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg)
    with torch.no_grad():  # transformers' init (std 0.02) leaves the hidden states nearly constant: widen it
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def save_qwen_text(folder, *, layers: int = 4, causal_lm: bool = False, tie: bool = True, seed: int = 0,
                   **kw) -> Path:
    """Write ``folder/text_encoder`` (safetensors) and ``folder/tokenizer``; returns ``folder``."""
    folder = Path(folder)
    tok = tiny_tokenizer()
    model = tiny_qwen3(tok, layers=layers, causal_lm=causal_lm, tie=tie, seed=seed, **kw)
    model.save_pretrained(folder / "text_encoder", safe_serialization=True)
    tok.save_pretrained(folder / "tokenizer")
    return folder


def load_reference_parts(folder, *, causal_lm: bool = True):
    """The text encoder and tokenizer as diffusers' pipelines load them (``Qwen3ForCausalLM`` for klein,
    the saved class for Z-Image) from a folder written by :func:`save_qwen_text`."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM, Qwen3Model

    cls = Qwen3ForCausalLM if causal_lm else Qwen3Model
    model = cls.from_pretrained(Path(folder) / "text_encoder", local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(Path(folder) / "tokenizer", local_files_only=True)


def klein_pipeline(text_encoder, tokenizer, *, transformer=None, vae=None, scheduler=None, is_distilled=True):
    """A diffusers ``Flux2KleinPipeline`` around the given text parts (other parts optional: ``encode_prompt``
    needs only the text encoder and tokenizer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER_CONFIG)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=is_distilled)


def zimage_pipeline(text_encoder, tokenizer, *, transformer=None, vae=None, scheduler=None):
    """A diffusers ``ZImagePipeline`` around the given text parts (other parts optional, as above)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER_CONFIG)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


# The schedulers the published pipelines ship. FLUX.2-klein's scheduler config is FLUX.1-dev's (diffusers'
# convert_flux2_to_diffusers.py copies it): dynamic exponential shifting, its mu given by the pipeline
# (compute_empirical_mu). Z-Image-Turbo's: a static shift of 3.0.
KLEIN_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
ZIMAGE_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
