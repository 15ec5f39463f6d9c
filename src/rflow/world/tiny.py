"""rflow-tiny: a FLUX.1-architecture model at small scale for the captioned-shapes world.

Same code path as FLUX.1-dev (the :class:`~rflow.models.flux.Flux` class, guidance embedder
included), with tiny random frozen CLIP and T5 encoders from transformers over a word-level
tokenizer, and a pixel-unshuffle codec (factor 4: 64×64 RGB -> 48×16×16 latent -> 64 tokens).
It is trained by ``rflow train --full`` and shipped inside the package as the default model.

Its transformer predicts the clean image x0 rather than the velocity: each token is an 8×8×3 pixel
patch (192 values) as wide as the hidden size, and in that regime a network that must output noise
(or velocity) learns far worse than one that outputs data, which lies on a low-dimensional manifold.
The FLUX.1 family's denoiser turns x0 into v = (x_t − x0)/t at its boundary, so solvers, analysis and pruning see the
same velocity interface as FLUX.1.
"""

from __future__ import annotations

import torch

from . import shapes
from ..models.codec import PixelUnshuffleCodec
from ..models.flux import Flux, FluxConfig
from ..models.text import TextEncoders, build_word_tokenizer

TEXT_DIM = 64
MAX_SEQUENCE_LENGTH = 24


def vocabulary() -> list[str]:
    """Every word of the shapes grammar, reserved words included (a LoRA can teach them later)."""
    words = set()
    for name in (*shapes.BACKGROUNDS, *shapes.COLOURS, *shapes.RESERVED_COLOURS, *shapes.SHAPES,
                 *shapes.RESERVED_SHAPES, *shapes.SIZES, *shapes.POSITIONS):
        words.update(name.split())
    words.update("a an and on the background".split())
    return sorted(words)


def transformer_config(hidden: int = 192, heads: int = 3, depth: int = 2, depth_single: int = 4, mlp_ratio: float = 4.0,
                       codec_factor: int = 4) -> FluxConfig:
    head_dim = hidden // heads
    b = (head_dim * 7 // 16) // 2 * 2
    mlp = int(hidden * mlp_ratio)
    return FluxConfig(hidden_size=hidden, num_heads=heads, in_channels=3 * codec_factor**2 * 4,
                      out_channels=3 * codec_factor**2 * 4, context_in_dim=TEXT_DIM, vec_in_dim=TEXT_DIM,
                      axes_dim=(head_dim - 2 * b, b, b), guidance_embed=True,
                      double_mlp=[(mlp, mlp)] * depth, single_mlp=[mlp] * depth_single)


def build_text_encoders(seed: int = 0) -> TextEncoders:
    """Tiny random CLIP-L-like and T5-like encoders (frozen) with word-level tokenizers."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    words = vocabulary()
    clip_tok, t5_tok = build_word_tokenizer(words, "clip"), build_word_tokenizer(words, "t5")
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=TEXT_DIM, d_kv=32, d_ff=4 * TEXT_DIM, num_layers=2, num_heads=2,
        relative_attention_num_buckets=16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return TextEncoders(clip, clip_tok, t5, t5_tok)


def build(seed: int = 0, **config_kw):
    """A random-weight rflow-tiny :class:`~rflow.pipeline.Pipeline` (the starting point of training)."""
    from ..pipeline import Pipeline, Schedule

    torch.manual_seed(seed)
    cfg = transformer_config(**config_kw)
    model = Flux(cfg)
    init_weights_(model)
    codec = PixelUnshuffleCodec(factor=config_kw.get("codec_factor", 4))
    return Pipeline(model.eval().requires_grad_(False), codec, build_text_encoders(seed), Schedule("flux"),
                    default_size=(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), name="rflow-tiny",
                    max_sequence_length=MAX_SEQUENCE_LENGTH, grammar="shapes", denoiser_options={"prediction": "data"})


def init_weights_(model: Flux) -> None:
    """Xavier linear layers, zero-initialised adaLN modulations and output layer (DiT-style), so the
    untrained model starts as the identity on its residual streams and predicts zero velocity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
        for block in model.double_blocks:
            for mod in (block.img_mod.lin, block.txt_mod.lin):
                mod.weight.zero_(), mod.bias.zero_()
        for block in model.single_blocks:
            block.modulation.lin.weight.zero_(), block.modulation.lin.bias.zero_()
        fl = model.final_layer
        fl.adaLN_modulation[1].weight.zero_(), fl.adaLN_modulation[1].bias.zero_()
        fl.linear.weight.zero_(), fl.linear.bias.zero_()
        for emb in (model.time_in, model.guidance_in):
            torch.nn.init.normal_(emb.in_layer.weight, std=0.02)
            torch.nn.init.normal_(emb.out_layer.weight, std=0.02)
