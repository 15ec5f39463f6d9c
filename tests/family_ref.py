"""Tiny FLUX.2-klein and Z-Image diffusers pipelines saved offline, for CLI and cross-family tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

from flux2_ref import tiny_transformer as tiny_flux2
from qwen_ref import (KLEIN_SCHEDULER_CONFIG, ZIMAGE_SCHEDULER_CONFIG, load_reference_parts, save_qwen_text, tiny_qwen3,
                      tiny_tokenizer, zimage_pipeline)
from zimage_ref import TINY as ZIMAGE_TINY, tiny_diffusers as tiny_zimage


def klein_folder(root: Path) -> Path:
    """A tiny distilled Flux2KleinPipeline (28-layer narrow Qwen3, 2-level VAE: 4 pixels per latent cell)."""
    text_dir = save_qwen_text(root / "qwen", layers=28, hidden=16, heads=2, kv_heads=1, head_dim=8, intermediate=24,
                              causal_lm=True, tie=True, seed=3)
    te, tok = load_reference_parts(text_dir, causal_lm=True)
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4).eval()
    tr = tiny_flux2(in_channels=4 * vae.config.latent_channels, joint_dim=3 * te.config.hidden_size, seed=1)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER_CONFIG), is_distilled=True,
                              vae=vae, text_encoder=te, tokenizer=tok, transformer=tr)
    pipe.save_pretrained(root / "klein")
    return root / "klein"


def zimage_folder(root: Path) -> Path:
    """A tiny ZImagePipeline (Qwen3 as wide as the transformer's caption features, 2-level KL VAE)."""
    tok = tiny_tokenizer()
    te = tiny_qwen3(tok, hidden=ZIMAGE_TINY["cap_feat_dim"])
    torch.manual_seed(5)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=ZIMAGE_TINY["in_channels"], norm_num_groups=4, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.8, shift_factor=0.1).eval()
    pipe = zimage_pipeline(te, tok, transformer=tiny_zimage(), vae=vae,
                           scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER_CONFIG))
    pipe.save_pretrained(root / "zimage")
    return root / "zimage"
