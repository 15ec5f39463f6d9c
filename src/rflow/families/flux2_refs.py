"""FLUX.2 reference images: what ``Flux2KleinPipeline(image=[...])`` does to them, as rflow functions.

Each reference image (a PIL image, a path, or a (3, H, W) tensor in [0, 1], taken as the 8-bit image it
rounds to) is checked (both sides ≥ 64 px, aspect ratio ≤ 8), shrunk with Lanczos to about
1024² pixels when larger (``int(side · sqrt(1024² / area))``), centre-cropped to multiples of the codec's
downscale factor (16 for FLUX.2), converted to RGB, scaled to [-1, 1] and encoded to the codec's
normalised patchified latent (the posterior mean). The latents are packed into tokens and concatenated
in order; the i-th image's tokens sit at RoPE time ``10 + 10·i``. The denoiser appends these tokens after
the noise tokens and keeps only the noise tokens of the output.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import UserError
from ..models.flux2 import pack, reference_ids

MAX_AREA = 1024 * 1024  # larger references are shrunk to about this many pixels
MIN_SIDE = 64
MAX_ASPECT = 8
TIME_SCALE = 10  # the i-th reference image sits at RoPE time TIME_SCALE + TIME_SCALE·i


def _open(image, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, Tensor):  # (3, H, W) or (1, 3, H, W) in [0, 1]: the 8-bit image it stands for
        t = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if t.ndim != 3 or t.shape[0] != 3 or not t.is_floating_point():
            raise UserError(f"reference image {index + 1}: a tensor must be (3, H, W) floats in [0, 1], "
                            f"got {tuple(image.shape)} {str(image.dtype).removeprefix('torch.')}")
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"reference image {index + 1} holds NaN/inf")
        arr = (t.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr)
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                im.load()
                return im.copy()
        except (OSError, ValueError, SyntaxError) as e:
            why = " ".join(str(e).split()) or type(e).__name__
            raise UserError(f"{image}: cannot read reference image ({why})") from None
    raise UserError(f"reference image {index + 1} must be a PIL image, a path or a (3, H, W) tensor, "
                    f"not {type(image).__name__}")


def _image_list(images) -> list[Image.Image]:
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, Tensor) and images.ndim == 3):
        images = [images]
    out = [_open(im, i) for i, im in enumerate(images)]
    for i, im in enumerate(out):
        w, h = im.size
        if w < MIN_SIDE or h < MIN_SIDE:
            raise UserError(f"reference image {i + 1} is {w}x{h}: both sides must be at least {MIN_SIDE} px")
        if max(w / h, h / w) > MAX_ASPECT:
            raise UserError(f"reference image {i + 1} is {w}x{h}: aspect ratio above {MAX_ASPECT}:1")
    return out


def _check_multiple(multiple) -> int:
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise UserError(f"size multiple must be a positive integer, got {multiple!r}")
    return multiple


def _sizes(image: Image.Image, multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((width, height) after the area limit, (width, height) after cropping to multiples)."""
    w, h = image.size
    if w * h > MAX_AREA:
        scale = math.sqrt(MAX_AREA / (w * h))
        w, h = int(w * scale), int(h * scale)
    return (w, h), (w // multiple * multiple, h // multiple * multiple)


def reference_pixels(image: Image.Image, multiple: int = 16) -> Tensor:
    """One reference image -> (1, 3, H, W) float32 in [-1, 1], H and W multiples of ``multiple``
    (Flux2KleinPipeline's resize to the area limit, centre crop, RGB, /255, 2x − 1)."""
    multiple = _check_multiple(multiple)
    (rw, rh), (cw, ch) = _sizes(image, multiple)
    if (rw, rh) != image.size:
        image = image.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - cw) // 2, (rh - ch) // 2
    image = image.crop((left, top, left + cw, top + ch))
    if image.mode != "RGB":
        image = image.convert("RGB")
    arr = np.array(image).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(arr).permute(2, 0, 1)[None] - 1.0


def reference_default_size(images, multiple: int = 16) -> tuple[int, int] | None:
    """(width, height) the pipeline generates at when the caller gives none: the first reference image's
    size after the area limit and the crop to multiples of ``multiple`` (the codec's downscale factor).
    None without images."""
    multiple = _check_multiple(multiple)
    found = _image_list(images)
    return _sizes(found[0], multiple)[1] if found else None


@torch.no_grad()
def prepare_references(images, codec) -> tuple[Tensor, Tensor]:
    """Reference images (PIL images, paths or (3, H, W) tensors in [0, 1]) -> (tokens (1, R, C), RoPE ids
    (1, R, 4)) for the denoiser.

    ``codec``: the FLUX.2 latent codec (``encode`` to the normalised patchified latent, ``downscale_factor``,
    ``dtype``). Tokens come back in the codec's dtype, on its device."""
    found = _image_list(images)
    if not found:
        raise UserError("no reference images")
    dev = next(codec.parameters()).device if hasattr(codec, "parameters") else torch.device("cpu")
    latents = [codec.encode(reference_pixels(im, codec.downscale_factor).to(dev, codec.dtype)) for im in found]
    tokens = torch.cat([pack(z) for z in latents], dim=1)
    ids = reference_ids([tuple(z.shape[-2:]) for z in latents], TIME_SCALE, device=tokens.device)
    return tokens, ids
