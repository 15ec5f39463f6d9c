"""A tiny diffusers FluxPipeline built offline (random weights, word-level tokenizers), saved to disk."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from flux_ref import tiny_transformer
from rflow.models.text import build_word_tokenizer

WORDS = "a an the red green blue cat dog photo of on in with small large painting sky city night".split()
LATENT_CHANNELS = 4
SIZE = (24, 16)  # width, height: latent 12×8 with a 2× VAE, 6×4 tokens


def tiny_pipeline(*, guidance=True, seed=0) -> FluxPipeline:
    torch.manual_seed(seed)
    clip_tok, t5_tok = build_word_tokenizer(WORDS, "clip"), build_word_tokenizer(WORDS, "t5")
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id)).eval()
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.8, shift_factor=0.1).eval()
    transformer = tiny_transformer(guidance=guidance, depth=1, depth_single=1, in_channels=4 * LATENT_CHANNELS,
                                   joint_dim=32, pooled_dim=24, seed=seed)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=guidance, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=1.0)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
