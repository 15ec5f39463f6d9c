"""FLUX.1's text encoders through transformers: CLIP-L (pooled vector) and the T5 v1.1 encoder (sequence).

Loaded from the diffusers layout (``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``,
``tokenizer_2/``) found in one directory. Tokenisation and encoding follow diffusers' FluxPipeline
exactly: both tokenizers pad to their maximum length and truncate; CLIP gives ``pooler_output``,
T5 its last hidden state.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError

COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def find_text_encoders(*dirs: str | os.PathLike | None) -> Path | None:
    """The first of ``dirs`` that holds all four text components (diffusers layout)."""
    for d in dirs:
        if d is not None and all((Path(d) / c).is_dir() for c in COMPONENTS):
            return Path(d)
    return None


class TextEncoders(nn.Module):
    def __init__(self, clip, clip_tokenizer, t5, t5_tokenizer):
        super().__init__()
        self.clip, self.t5 = clip.eval().requires_grad_(False), t5.eval().requires_grad_(False)
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.t5.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int = 512) -> tuple[Tensor, Tensor]:
        """(T5 sequence (B, max_sequence_length, d_t5), pooled CLIP vector (B, d_clip))."""
        if max_sequence_length < 1:
            raise UserError(f"max_sequence_length must be ≥ 1, got {max_sequence_length}")
        dev = self.device
        clip_max = min(getattr(self.clip_tokenizer, "model_max_length", 77) or 77, 77)
        ids = self.clip_tokenizer(prompts, padding="max_length", max_length=clip_max, truncation=True, return_tensors="pt").input_ids
        pooled = self.clip(ids.to(dev), output_hidden_states=False).pooler_output
        ids = self.t5_tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt").input_ids
        seq = self.t5(ids.to(dev), output_hidden_states=False)[0]
        return seq, pooled


    def warn_if_truncated(self, prompts: list[str], max_sequence_length: int) -> None:
        """Warn (once per prompt) when a prompt has more tokens than the T5 or CLIP encoder reads."""
        from ..errors import warn

        limits = ((self.t5_tokenizer, max_sequence_length, "T5"),
                  (self.clip_tokenizer, min(getattr(self.clip_tokenizer, "model_max_length", 77) or 77, 77), "CLIP"))
        for p in dict.fromkeys(prompts):
            for tok, limit, name in limits:
                n = len(tok(p, truncation=False, verbose=False).input_ids)
                if n > limit:
                    short = p if len(p) <= 60 else p[:57] + "..."
                    warn(f"prompt {short!r} has {n} {name} tokens; the text encoder reads the first {limit}, "
                         "the rest is cut")
                    break


def load_text_encoders(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None) -> TextEncoders:
    """Load CLIP + T5 and their tokenizers from a directory in the diffusers layout."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    root = Path(path).expanduser()
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise UserError(f"{root}: not a text-encoder directory (missing {', '.join(c + '/' for c in missing)})")

    def model(cls, sub):
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # keep stderr for rflow's own messages
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = cls.from_pretrained(root / sub, dtype=dtype, local_files_only=True, use_safetensors=True)
        except OSError as e:
            raise UserError(f"{root / sub}: cannot load {cls.__name__} ({str(e).splitlines()[0][:160]})") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return m.to(device) if device is not None else m

    def tokenizer(sub):
        try:
            return AutoTokenizer.from_pretrained(root / sub, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{root / sub}: cannot load tokenizer ({str(e).splitlines()[0][:160]})") from None

    return TextEncoders(model(CLIPTextModel, "text_encoder"), tokenizer("tokenizer"), model(T5EncoderModel, "text_encoder_2"), tokenizer("tokenizer_2"))


def build_word_tokenizer(words: list[str], kind: str):
    """A word-level tokenizer (lower-cased, split on whitespace and punctuation) built with ``tokenizers``.

    ``kind="clip"``: ``<|startoftext|> … <|endoftext|>``, padded with ``<|endoftext|>`` (as CLIP-L);
    ``kind="t5"``: ``… </s>``, padded with ``<pad>`` (id 0, as T5). Unknown words map to ``<unk>``.
    Returns a transformers ``PreTrainedTokenizerFast`` that ``save_pretrained`` writes as ``tokenizer.json``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if kind == "clip":
        specials = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
        bos, eos, pad = "<|startoftext|>", "<|endoftext|>", "<|endoftext|>"
    elif kind == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
        bos, eos, pad = None, "</s>", "<pad>"
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    vocab = {w: i for i, w in enumerate(specials + sorted({w.lower() for w in words} - set(specials)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = (f"{bos} $A {eos}" if bos else f"$A {eos}")
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in {bos, eos} if t]
    )
    kwargs = dict(tokenizer_object=tok, eos_token=eos, pad_token=pad, unk_token="<unk>",
                  model_max_length=77 if kind == "clip" else 512)
    if bos:
        kwargs["bos_token"] = bos
    return PreTrainedTokenizerFast(**kwargs)
