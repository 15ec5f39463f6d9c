"""Captioned image folders for LoRA training: reading, aspect buckets, and the on-disk latent/text cache.

A dataset folder holds images with captions in one of three ways (tried in this order):
``metadata.jsonl`` (one JSON object per line: ``file_name`` or ``image``, and ``text`` or ``caption``),
``metadata.csv`` (the same columns), or same-name ``.txt`` files beside the images (the kohya /
ai-toolkit convention; an image without one has the empty caption). An image that cannot be read is
skipped with a warning naming it; a folder left with no images is a UserError.

Loss masks (for the masked loss): an image's mask is the same-name image in a ``masks/`` folder beside
it (ai-toolkit's ``mask_path``; any image format, read as greyscale, white = weigh fully), else the
image's own alpha channel (kohya's ``alpha_mask``). :func:`latent_weight` turns a mask into per-element
loss weights on the latent grid: ``floor + (1 − floor) · mask``, scaled to mean 1 per image.

Buckets: every image goes to the (width, height) whose aspect ratio is nearest its own among sizes
with sides multiples of the family's factor and area close to ``resolution²``; it is scaled to cover
the bucket and centre-cropped. A batch holds images of one bucket.

Cache (``cache/`` in the run folder): the VAE latent of each image and the conditioning of each caption,
one safetensors file each, named by the sha256 of the file's bytes (or the caption) and the settings
that change the result (bucket, model hash) — so a second run, or a resumed one, encodes nothing again
and the text encoders are not needed once every caption is cached. In a data-parallel run only rank 0
writes the cache (each file atomically); the other ranks read what is there and keep the rest in memory.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import RflowWarning, UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Item:
    path: Path
    caption: str
    digest: str  # sha256 of the image file
    size: tuple[int, int]  # (width, height) of the image as read
    mask: Path | None = None  # its loss mask: a masks/ file, or the image itself when it has an alpha channel


def _read_metadata(root: Path) -> dict[str, str] | None:
    rows = None
    if (root / "metadata.jsonl").is_file():
        rows = []
        for i, line in enumerate((root / "metadata.jsonl").read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise UserError(f"{root / 'metadata.jsonl'}: line {i} is not JSON") from None
        where = root / "metadata.jsonl"
    elif (root / "metadata.csv").is_file():
        with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        where = root / "metadata.csv"
    if rows is None:
        return None
    out = {}
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise UserError(f"{where}: row {i} is not an object with file_name and text")
        name = r.get("file_name", r.get("image"))
        text = r.get("text", r.get("caption", ""))
        if not isinstance(name, str) or not isinstance(text, str):
            raise UserError(f"{where}: row {i} needs file_name (or image) and text (or caption) strings")
        out[name] = text
    return out


def read_dataset(root) -> list[Item]:
    """The readable captioned images of folder ``root`` (see the module docstring), sorted by name."""
    from PIL import Image

    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: the dataset must be a folder of images with captions")
    meta = _read_metadata(root)
    if meta is not None:
        paths = [root / n for n in sorted(meta)]
        for p in paths:
            if not p.is_file():
                raise UserError(f"{p}: named in the dataset's metadata, but there is no such file")
    else:
        paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    items, bad = [], []
    for p in paths:
        data = p.read_bytes()
        try:
            with Image.open(p) as im:
                im.load()
                size, alpha = im.size, im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
        except Exception:  # noqa: BLE001 - any unreadable image is skipped, by name
            bad.append(p.name)
            continue
        mask = next((m for m in sorted((p.parent / "masks").glob(p.stem + ".*")) if m.suffix.lower() in IMAGE_SUFFIXES),
                    p if alpha else None)
        if meta is not None:
            caption = meta[p.relative_to(root).as_posix()]
        else:
            txt = p.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
        items.append(Item(p, caption, hashlib.sha256(data).hexdigest(), size, mask))
    if bad:
        warnings.warn(f"{root}: skipped {len(bad)} unreadable image(s): {', '.join(bad)}", RflowWarning, stacklevel=2)
    if not items:
        raise UserError(f"{root}: no readable images (expected {', '.join(IMAGE_SUFFIXES)} files with .txt captions, "
                        "or a metadata.jsonl / metadata.csv)")
    return items


def buckets(resolution: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) sizes with sides multiples of ``multiple``, area near ``resolution²`` and aspect
    ratio within ``max_ratio``."""
    area, out = resolution * resolution, set()
    w = multiple
    while w <= resolution * max_ratio:
        h = max(multiple, round(area / w / multiple) * multiple)
        if max(w / h, h / w) <= max_ratio + 1e-9:
            out.update({(w, h), (h, w)})  # portrait and landscape alike
        w += multiple
    if not out:
        out.add((max(multiple, resolution // multiple * multiple),) * 2)
    return sorted(out)


def bucket_for(size: tuple[int, int], options: list[tuple[int, int]]) -> tuple[int, int]:
    r = math.log(size[0] / size[1])
    return min(options, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


def _cover(im, bucket: tuple[int, int]):
    """PIL image ``im`` scaled (bicubic) to cover ``bucket`` (width, height) and centre-cropped to it."""
    from PIL import Image

    w, h = bucket
    s = max(w / im.width, h / im.height)
    nw, nh = max(w, round(im.width * s)), max(h, round(im.height * s))
    if (nw, nh) != im.size:
        im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    return im.crop((left, top, left + w, top + h))


def load_image(path: Path, bucket: tuple[int, int]) -> Tensor:
    """The image scaled to cover ``bucket``, centre-cropped: (1, 3, H, W) in [−1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(_cover(im.convert("RGB"), bucket), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).contiguous()


def check_masks(items: list[Item]) -> None:
    """A UserError naming the images that have no loss mask (the masked loss needs one for every image)."""
    missing = [it.path.name for it in items if it.mask is None]
    if missing:
        raise UserError(f"--masked-loss: {len(missing)} image(s) have no loss mask (a same-name image in masks/, or "
                        f"an alpha channel): {', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}")


def load_mask(item: Item, bucket: tuple[int, int]) -> Tensor:
    """``item``'s loss mask scaled and cropped as its image is for ``bucket``: (1, 1, H, W) in [0, 1]."""
    from PIL import Image

    if item.mask is None:
        raise UserError(f"{item.path}: no loss mask (a same-name image in {item.path.parent / 'masks'}, or an alpha "
                        "channel) for the masked loss")
    try:
        with Image.open(item.mask) as im:
            im.load()
            m = im.convert("RGBA").getchannel("A") if item.mask == item.path else im.convert("L")
    except Exception:  # noqa: BLE001 - named, one line
        raise UserError(f"{item.mask}: the loss mask of {item.path.name} cannot be read") from None
    if m.size != item.size:
        raise UserError(f"{item.mask}: the loss mask is {m.size[0]}x{m.size[1]}, its image {item.path.name} "
                        f"{item.size[0]}x{item.size[1]}")
    a = np.asarray(_cover(m, bucket), dtype=np.float32) / 255.0
    return torch.from_numpy(a)[None, None].contiguous()


def latent_weight(codec, mask: Tensor, floor: float) -> Tensor:
    """Loss weights on ``codec``'s latent grid for a (B, 1, H, W) pixel ``mask``: ``floor + (1 − floor) ·
    mask``, scaled to mean 1 per image. The pixel-unshuffle codec (rflow-tiny) keeps every pixel's weight
    on its own latent channel (B, C·f², H/f, W/f); a VAE's latent gets each cell's mean (B, 1, H/f, W/f),
    the same for every channel."""
    import torch.nn.functional as F

    f = int(codec.downscale_factor)
    w = floor + (1.0 - floor) * mask.float()
    if getattr(codec, "kind", None) == "pixel_unshuffle":
        w = F.pixel_unshuffle(w.expand(-1, codec.channels, -1, -1), f)
    else:
        w = F.avg_pool2d(w, f)
    return w / w.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)


def _key(*parts) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:32]


def _save_cond(cond, path: Path) -> None:
    from ..checkpoints.io import save_safetensors

    tensors, meta = {}, {}
    for f in dataclasses.fields(cond):
        v = getattr(cond, f.name)
        if isinstance(v, Tensor):
            tensors[f.name] = v.detach().cpu().contiguous()
        elif isinstance(v, list) and all(isinstance(x, Tensor) for x in v):
            meta[f.name] = {"list": len(v)}
            tensors.update({f"{f.name}.{i}": x.detach().cpu().contiguous() for i, x in enumerate(v)})
        else:
            meta[f.name] = {"value": v if not isinstance(v, Tensor) else None}
    save_safetensors(tensors, path, {"rflow.cond": json.dumps(meta)})


def _load_cond(cls, path: Path):
    from safetensors.torch import load_file
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["rflow.cond"])
    t = load_file(str(path))
    kw = {}
    for f in dataclasses.fields(cls):
        m = meta.get(f.name)
        if m is None:
            kw[f.name] = t[f.name]
        elif "list" in m:
            kw[f.name] = [t[f"{f.name}.{i}"] for i in range(m["list"])]
        else:
            kw[f.name] = m["value"]
    return cls(**kw)


class Cache:
    """Latents per (image, bucket) and conditionings per caption, in memory and in ``folder`` on disk."""

    def __init__(self, pipe, folder: Path, settings: str, *, write: bool = True):
        self.pipe, self.folder, self.settings, self.write = pipe, Path(folder), settings, write
        self.latents: dict[str, Tensor] = {}
        self.conds: dict[str, object] = {}
        self.cond_cls = getattr(pipe.family_module, "Cond", None)
        self.encoded = 0  # images and captions computed (not read from disk), for tests and logs

    def latent(self, item: Item, bucket: tuple[int, int]) -> Tensor:
        from safetensors.torch import load_file

        from ..checkpoints.io import save_safetensors

        k = _key("latent", item.digest, bucket, self.settings)
        if k not in self.latents:
            path = self.folder / f"latent-{k}.safetensors"
            if path.is_file():
                self.latents[k] = load_file(str(path))["latent"]
            else:
                pipe = self.pipe
                with torch.no_grad():
                    x = load_image(item.path, bucket).to(pipe.device, pipe.vae.dtype)
                    lat = pipe.vae.encode(x).float().cpu()
                if self.write:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    save_safetensors({"latent": lat}, path)
                self.latents[k], self.encoded = lat, self.encoded + 1
        return self.latents[k]

    def cond(self, caption: str):
        k = _key("text", caption, self.settings)
        if k not in self.conds:
            path = self.folder / f"text-{k}.safetensors"
            if path.is_file() and self.cond_cls is not None:
                self.conds[k] = _load_cond(self.cond_cls, path)
            else:
                from ..families.base import cond_rows

                if self.pipe.text_encoders is None:
                    raise UserError(f"the caption {caption!r} is not cached and the text encoders are unloaded")
                with torch.no_grad():
                    c = cond_rows(self.pipe.encode([caption]))[0]
                self.cond_cls = type(c)
                c = dataclasses.replace(c, **{f.name: getattr(c, f.name).cpu() for f in dataclasses.fields(c)
                                              if isinstance(getattr(c, f.name), Tensor)})
                if self.write:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    _save_cond(c, path)
                self.conds[k], self.encoded = c, self.encoded + 1
        return self.conds[k]

    def warm(self, items: list[Item], item_buckets: list[tuple[int, int]], captions: list[str]) -> None:
        """Encode (or read) everything a run needs, so the encoders can be unloaded afterwards."""
        for it, b in zip(items, item_buckets):
            self.latent(it, b)
        for c in dict.fromkeys(captions):
            self.cond(c)
