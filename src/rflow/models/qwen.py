"""Qwen3 text conditioning through transformers, for FLUX.2-klein and Z-Image.

Loaded from a diffusers pipeline folder's ``text_encoder/`` and ``tokenizer/``. The published pipelines save
the encoder in two layouts: FLUX.2-klein as ``Qwen3ForCausalLM`` (keys ``model.*`` plus ``lm_head``),
Z-Image as ``Qwen3Model`` (keys without the prefix). Both load here as the bare ``Qwen3Model``: only
hidden states are used, so ``lm_head`` (up to 0.6 B parameters for Qwen3-8B) is never built.

Each prompt becomes one user message of the tokenizer's chat template with the generation prompt added;
the text is padded (right, with the tokenizer's pad token) and truncated to ``max_sequence_length``
tokens, template included, and run through the encoder with its attention mask. Then, as in diffusers:

* **klein** (``Flux2KleinPipeline.encode_prompt``): thinking off (the template appends an empty
  ``<think>\\n\\n</think>`` block); the hidden states after layers ``(9, 18, 27)`` (``hidden_states[k]``,
  index 0 is the embedding output) are concatenated per token → ``(B, L, 3·hidden)``, padding kept;
  text ids ``(B, L, 4)`` int64 rows ``(0, 0, 0, l)``;
* **Z-Image** (``ZImagePipeline.encode_prompt``): thinking on (the template's default), the second-to-last
  hidden state with padding removed → one ``(L_i, hidden)`` tensor per prompt.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError

COMPONENTS = ("text_encoder", "tokenizer")
KLEIN_LAYERS = (9, 18, 27)
MODES = ("klein", "zimage")


def find_qwen_text(*dirs: str | os.PathLike | None) -> Path | None:
    """The first of ``dirs`` that holds ``text_encoder/`` and ``tokenizer/`` with a Qwen3 config."""
    for d in dirs:
        if d is None or not all((Path(d) / c).is_dir() for c in COMPONENTS):
            continue
        if _model_type(Path(d) / "text_encoder") == "qwen3":
            return Path(d)
    return None


def _model_type(folder: Path) -> str | None:
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _prompt_list(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("no prompts to encode")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise UserError(f"prompts must be strings, got {type(bad[0]).__name__}")
    return prompts


def _check_length(max_sequence_length) -> int:
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise UserError(f"max_sequence_length must be an integer ≥ 1, got {max_sequence_length!r}")
    return max_sequence_length


class QwenText(nn.Module):
    """A Qwen3 encoder (``transformers`` ``Qwen3Model``) and its tokenizer (with a chat template)."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def chat_text(self, prompt: str, mode: str = "klein") -> str:
        """The prompt as the pipeline hands it to the tokenizer: one user turn plus the generation prompt."""
        if mode not in MODES:
            raise UserError(f"unknown Qwen3 prompt mode {mode!r}; choose one of {', '.join(MODES)}")
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
            enable_thinking=(mode == "zimage"))

    def _tokens(self, prompts: list[str], max_sequence_length: int, mode: str):
        texts = [self.chat_text(p, mode) for p in prompts]
        enc = self.tokenizer(texts, padding="max_length", max_length=max_sequence_length, truncation=True,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def encode_klein(self, prompts: str | list[str], max_sequence_length: int = 512,
                     layers: Sequence[int] = KLEIN_LAYERS) -> tuple[Tensor, Tensor]:
        """(text embeddings (B, max_sequence_length, len(layers)·hidden), text ids (B, max_sequence_length, 4))."""
        prompts, n = _prompt_list(prompts), _check_length(max_sequence_length)
        layers = tuple(layers)
        bad = [k for k in layers if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.num_layers]
        if not layers or bad:
            raise UserError(f"layers must be hidden-state indices 0..{self.num_layers} "
                            f"(this encoder has {self.num_layers} layers), got {list(layers)!r}")
        ids, mask = self._tokens(prompts, n, "klein")
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states
        emb = torch.cat([hidden[k] for k in layers], dim=-1)  # == stack(dim=1).permute(0, 2, 1, 3).reshape
        return emb, klein_text_ids(emb.shape[0], emb.shape[1], device=emb.device)

    @torch.no_grad()
    def encode_zimage(self, prompts: str | list[str], max_sequence_length: int = 512) -> list[Tensor]:
        """One (L_i, hidden) tensor per prompt: the second-to-last hidden state at the prompt's real tokens."""
        prompts, n = _prompt_list(prompts), _check_length(max_sequence_length)
        if self.num_layers < 1:
            raise UserError("the Qwen3 encoder has no layers")
        ids, mask = self._tokens(prompts, n, "zimage")
        mask = mask.bool()
        hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [h[m] for h, m in zip(hidden, mask)]

    def warn_if_truncated(self, prompts: str | list[str], max_sequence_length: int, *, mode: str = "klein") -> None:
        """Warn (once per prompt) when a prompt in its chat template has more tokens than the encoder reads."""
        from ..errors import warn

        prompts, n = _prompt_list(prompts), _check_length(max_sequence_length)
        for p in dict.fromkeys(prompts):
            count = len(self.tokenizer(self.chat_text(p, mode), truncation=False, verbose=False)["input_ids"])
            if count > n:
                short = p if len(p) <= 60 else p[:57] + "..."
                warn(f"prompt {short!r} has {count} Qwen3 tokens with its chat template; the text encoder reads "
                     f"the first {n}, the rest is cut")


def klein_text_ids(batch: int, length: int, *, device=None) -> Tensor:
    """FLUX.2's text position ids: (batch, length, 4) int64 rows (t, h, w, l) = (0, 0, 0, l)."""
    ids = torch.zeros(batch, length, 4, dtype=torch.int64, device=device)
    ids[..., 3] = torch.arange(length, device=device)
    return ids


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:160]


def load_qwen_text(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> QwenText:
    """Load the Qwen3 encoder and tokenizer from ``path/text_encoder`` and ``path/tokenizer``."""
    from transformers import AutoTokenizer, Qwen3Model
    from transformers.utils import logging as hf_logging

    root = Path(path).expanduser()
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise UserError(f"{root}: not a Qwen3 text-encoder directory (missing {', '.join(c + '/' for c in missing)})")
    kind = _model_type(root / "text_encoder")
    if kind != "qwen3":
        what = "no readable config.json" if kind is None else f"a {kind!r} model"
        raise UserError(f"{root / 'text_encoder'}: {what}, not Qwen3")

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # keep stderr for rflow's own messages
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a Qwen3ForCausalLM checkpoint reports its unused lm_head
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = Qwen3Model.from_pretrained(root / "text_encoder", dtype=dtype, local_files_only=True,
                                               use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{root / 'text_encoder'}: cannot load Qwen3 ({_first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{root / 'tokenizer'}: cannot load tokenizer ({_first_line(e)})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{root / 'tokenizer'}: the tokenizer has no chat template (Qwen3's is needed)")
    if tokenizer.pad_token_id is None:
        raise UserError(f"{root / 'tokenizer'}: the tokenizer has no pad token")
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"{root / 'tokenizer'}: {len(tokenizer)} tokens, but embed_tokens.weight of the text encoder "
                        f"has {model.config.vocab_size} rows")
    if device is not None:
        model = model.to(device)
    return QwenText(model, tokenizer)
