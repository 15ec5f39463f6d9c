"""The shapes world: a fixed procedural world of captioned shapes and a programmatic adherence score.

A tiny FLUX-architecture model is trained on this world; ``score`` judges how well generated images
follow their prompts (generation, pruning, quantization, LoRA, editing). The world is FIXED so that
results stay comparable across versions; do not change names, colours, geometry or grammar.

World: 64x64 RGB images on a ``white`` or ``black`` background holding one object
(``a {size} {colour} {shape} {position} on a {background} background``) or two small objects
(``a {colour} {shape} on the left and a {colour} {shape} on the right on a {background} background``).
Object centres sit at the named ``POSITIONS`` (x, y from the top-left) with +-3 px uniform jitter;
``small`` objects are 16 px across, ``large`` 32 px (circle diameter, square side, triangle base and
height, star width). Triangles point up; stars have 5 points. Rendering is 4x supersampled (soft edges).

Held-out composition pairs, ``HELDOUT_PAIRS`` = (cyan, triangle), (orange, square), (green, circle):
each colour and shape still appears in training in other pairs, but the ``"train"`` split never holds
these pairs (in either object slot); the ``"heldout"`` split holds at least one of them in every scene.
Reserved for a later LoRA: colour ``magenta`` and shape ``star``; rendered and scored, never in
``"train"`` or ``"heldout"``, only in ``"any"``.

Score: per image the prompt is parsed; the background colour is the median of the 2-px border and is
right when it is the named background (nearest, within L2 128). Foreground = pixels farther than L2 80
from that observed background; 8-connected components smaller than 16 px (or 10% of the largest) are
dropped, and an image whose foreground covers over half the frame counts as having no objects. ``count``
is right when the number of remaining components equals the number of objects. The single object is the
largest component; for two objects the left and right image halves hold the left and right object. Per
object: colour = palette colour (incl. reserved) whose background-to-colour mixing line passes nearest
the median of the most saturated half of its pixels; its "solid" mask is the pixels above half that
median's contrast (the true edge under blur); shape = best soft-IoU of the solid mask, normalised to its
bounding box, with a template of each shape (sharp, or blurred by 4% / 8% of its size and cut at half
contrast the same way); size = ``large`` when that box exceeds 24 px; position = named position nearest
the box centre. A missing object (< 16 px) gets all four attributes wrong.
``adherence`` = mean over images of the fraction of that image's judgements that are right (6 for one
object: background, count, colour, shape, size, position; 10 for two objects); per-attribute
``accuracy`` pools all judgements of that attribute.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from rflow.errors import UserError

IMAGE_SIZE = 64
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
COLOURS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255),
           "yellow": (255, 220, 0), "orange": (255, 140, 0), "cyan": (0, 220, 220)}
RESERVED_COLOURS = {"magenta": (255, 0, 255)}
SHAPES = ("circle", "square", "triangle")
RESERVED_SHAPES = ("star",)
SIZES = {"small": 16, "large": 32}
POSITIONS = {"on the left": (16, 32), "on the right": (48, 32), "at the top": (32, 16),
             "at the bottom": (32, 48), "in the center": (32, 32)}
HELDOUT_PAIRS = (("cyan", "triangle"), ("orange", "square"), ("green", "circle"))
SPLITS = ("train", "heldout", "any")
JITTER = 3.0
ONE_OBJECT_FRACTION = 0.7
ATTRIBUTES = ("background", "count", "colour", "shape", "size", "position")

_ALL_COLOURS = {**COLOURS, **RESERVED_COLOURS}
_ALL_SHAPES = SHAPES + RESERVED_SHAPES
_PAIRS = {"train": tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS),
          "heldout": tuple((c, s) for c in COLOURS for s in SHAPES),
          "any": tuple((c, s) for c in _ALL_COLOURS for s in _ALL_SHAPES)}
_TWO_POSITIONS = ("on the left", "on the right")
_SS = 4                      # render supersampling factor
_BG_TOL, _FG_DIST = 128.0, 80.0  # L2 distances in 0..255 RGB
_MIN_AREA, _MAX_FG_FRAC, _SIZE_SPLIT = 16, 0.5, 24


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str = "small"
    position: str = "in the center"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]


def _check(scene: Scene) -> None:
    def need(value, allowed, what):
        if value not in allowed:
            raise UserError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    need(scene.background, tuple(BACKGROUNDS), "background")
    objs = tuple(scene.objects)
    if len(objs) not in (1, 2):
        raise UserError(f"a shapes scene holds 1 or 2 objects, got {len(objs)}")
    for o in objs:
        need(o.colour, tuple(_ALL_COLOURS), "colour")
        need(o.shape, _ALL_SHAPES, "shape")
        need(o.size, tuple(SIZES), "size")
        need(o.position, tuple(POSITIONS), "position")
    if len(objs) == 2 and (tuple(o.position for o in objs) != _TWO_POSITIONS
                           or any(o.size != "small" for o in objs)):
        raise UserError("a two-object scene needs two small objects, on the left then on the right")


def caption(scene: Scene) -> str:
    _check(scene)
    bg = f"on a {scene.background} background"
    if len(scene.objects) == 1:
        o = scene.objects[0]
        return f"a {o.size} {o.colour} {o.shape} {o.position} {bg}"
    a, b = scene.objects
    return f"a {a.colour} {a.shape} on the left and a {b.colour} {b.shape} on the right {bg}"


def _alt(names) -> str:
    return "|".join(sorted(map(re.escape, names), key=len, reverse=True))


_C, _S, _BGRE = _alt(_ALL_COLOURS), _alt(_ALL_SHAPES), rf"on an? (?P<bg>{_alt(BACKGROUNDS)}) background"
_ONE = re.compile(rf"an? (?P<size>{_alt(SIZES)}) (?P<c>{_C}) (?P<s>{_S}) (?P<pos>{_alt(POSITIONS)}) {_BGRE}")
_TWO = re.compile(rf"an? (?P<c1>{_C}) (?P<s1>{_S}) on the left and "
                  rf"an? (?P<c2>{_C}) (?P<s2>{_S}) on the right {_BGRE}")


def parse(prompt: str) -> Scene:
    """Inverse of ``caption`` (case, spacing, a trailing period and ``an`` are tolerated)."""
    if not isinstance(prompt, str):
        raise UserError(f"a prompt must be a string, got {type(prompt).__name__}")
    text = " ".join(prompt.lower().split()).rstrip(".")
    if m := _ONE.fullmatch(text):
        return Scene(m["bg"], (Obj(m["c"], m["s"], m["size"], m["pos"]),))
    if m := _TWO.fullmatch(text):
        return Scene(m["bg"], (Obj(m["c1"], m["s1"], "small", _TWO_POSITIONS[0]),
                               Obj(m["c2"], m["s2"], "small", _TWO_POSITIONS[1])))
    short = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    raise UserError(f"prompt outside the shapes grammar: {short!r}")


def _rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(rng)
    raise UserError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float, fill) -> None:
    h = s / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    else:  # star: width s, bounding box centred on (cx, cy)
        r_out = s / (2 * math.sin(math.radians(72)))
        r_in = r_out * math.sin(math.radians(18)) / math.sin(math.radians(54))
        cy += r_out * (1 - math.cos(math.radians(36))) / 2
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a))
               for k in range(10) for r, a in [((r_out, r_in)[k % 2], math.radians(-90 + 36 * k))]]
        draw.polygon(pts, fill=fill)


def render(scene: Scene, rng) -> Image.Image:
    """Render ``scene`` as a 64x64 RGB image; deterministic given ``rng`` (numpy Generator or int seed)."""
    _check(scene)
    rng = _rng(rng)
    img = Image.new("RGB", (IMAGE_SIZE * _SS,) * 2, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x, y = np.asarray(POSITIONS[o.position], float) + rng.uniform(-JITTER, JITTER, 2)
        _draw(draw, o.shape, x * _SS, y * _SS, SIZES[o.size] * _SS, _ALL_COLOURS[o.colour])
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def random_scene(rng, *, split: str = "train") -> Scene:
    """~70% one-object, ~30% two-object scenes. ``train``: no held-out pair, nothing reserved;
    ``heldout``: at least one held-out pair, nothing reserved; ``any``: everything incl. reserved."""
    _check_split(split)
    rng, pool = _rng(rng), _PAIRS[split]

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]
    bg = pick(tuple(BACKGROUNDS))
    if rng.random() < ONE_OBJECT_FRACTION:
        c, s = pick(HELDOUT_PAIRS if split == "heldout" else pool)
        return Scene(bg, (Obj(c, s, pick(tuple(SIZES)), pick(tuple(POSITIONS))),))
    pairs = [pick(pool), pick(pool)]
    if split == "heldout" and not any(p in HELDOUT_PAIRS for p in pairs):
        pairs[int(rng.integers(2))] = pick(HELDOUT_PAIRS)
    return Scene(bg, tuple(Obj(c, s, "small", pos) for (c, s), pos in zip(pairs, _TWO_POSITIONS)))


def _streams(n: int, seed: int, split: str) -> list[np.random.Generator]:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise UserError(f"n must be a non-negative integer, got {n!r}")
    _check_split(split)
    return _rng(seed).spawn(2)  # scene stream, render stream: prompts(n, s) == captions of samples(n, s)


def samples(n: int, seed: int = 0, *, split: str = "train") -> list[tuple[Image.Image, str]]:
    scene_rng, render_rng = _streams(n, seed, split)
    scenes = [random_scene(scene_rng, split=split) for _ in range(n)]
    return [(render(sc, render_rng), caption(sc)) for sc in scenes]


def prompts(n: int, seed: int = 0, *, split: str = "train") -> list[str]:
    scene_rng, _ = _streams(n, seed, split)
    return [caption(random_scene(scene_rng, split=split)) for _ in range(n)]


# ----------------------------------------------------------------------------------------- scoring
def _to_uint8(a: np.ndarray, lo_hi: tuple[float, float] | None = None) -> np.ndarray:
    """Floats: [-1, 1] when the batch (``lo_hi``: its min, max) has a negative value, else [0, 1] when
    its max is <= 1, else 0..255. Integers: 0..255."""
    if a.dtype == np.uint8:
        return a
    floating, a = a.dtype.kind == "f", np.asarray(a, np.float32)
    if floating and a.size:
        lo, hi = lo_hi or (float(a.min()), float(a.max()))
        a = (a + 1) * 127.5 if lo < 0 else a * 255 if hi <= 1.0 else a
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _hwc(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise UserError(f"cannot read an image of shape {tuple(a.shape)}; expected HWC, CHW or PIL")
    return np.repeat(a, 3, -1) if a.shape[-1] == 1 else a[..., :3]


def _as_arrays(images) -> list[np.ndarray]:
    """uint8 64x64x3 arrays from PIL images, uint8 HWC arrays, or float NCHW/NHWC batches in [-1, 1]
    (detected by any negative value in the batch) or [0, 1] (max <= 1) or 0..255."""
    if hasattr(images, "detach"):                       # torch tensor
        images = images.detach().float().cpu().numpy()
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise UserError(f"an image batch must be 4-D (NCHW or NHWC), got shape {images.shape}")
        lo_hi = (float(images.min()), float(images.max())) if images.size else None
        items = [_to_uint8(_hwc(a), lo_hi) for a in images]
    else:
        items = []
        for im in images:
            if isinstance(im, Image.Image):
                items.append(np.asarray(im.convert("RGB")))
            else:
                a = im.detach().float().cpu().numpy() if hasattr(im, "detach") else np.asarray(im)
                items.append(_to_uint8(_hwc(a)))
    return [a if a.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE) else
            np.asarray(Image.fromarray(a).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for a in items]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Masks of the significant 8-connected components, largest first (label propagation)."""
    h, w = mask.shape
    none = h * w
    lab = np.where(mask, np.arange(none).reshape(h, w), none)
    while True:
        p = np.pad(lab, 1, constant_values=none)
        new = lab.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(new, p[dy:dy + h, dx:dx + w], out=new)
        flat = np.where(mask, new, none).ravel()
        new = np.where(mask.ravel(), flat[np.minimum(flat, none - 1)], none).reshape(h, w)  # pointer jump
        if np.array_equal(new, lab):
            break
        lab = new
    ids, counts = np.unique(lab[mask], return_counts=True)
    if not len(ids):
        return []
    keep = counts >= max(_MIN_AREA, 0.1 * counts.max())
    if counts[keep].sum() > _MAX_FG_FRAC * h * w:      # no background to speak of: no objects
        return []
    return [lab == i for i in ids[keep][np.argsort(-counts[keep], kind="stable")]]


_BLURS = (0.0, 0.04, 0.08)  # template blur, as a fraction of the object size


@functools.lru_cache(maxsize=None)
def _template(shape: str, blur: float = 0.0) -> np.ndarray:
    """``shape`` as ``_judge_object`` would see it: blurred, cut at half contrast, box-normalised."""
    im = Image.new("L", (256, 256), 0)
    _draw(ImageDraw.Draw(im), shape, 128, 128, 128, 255)
    im = im.filter(ImageFilter.GaussianBlur(blur * 128)).point(lambda v: 255 * (v >= 128)) if blur else im
    return np.asarray(im.crop(im.getbbox()).resize((32, 32), Image.BOX), np.float32) / 255


def _nearest_colour(c: np.ndarray, bg: np.ndarray) -> str:
    def miss(rgb):  # distance from c to the segment bg -> rgb (blends with the background)
        v = np.asarray(rgb, np.float32) - bg
        a = np.clip(np.dot(c - bg, v) / max(float(np.dot(v, v)), 1e-6), 0, 1)
        return float(np.linalg.norm(bg + a * v - c))
    return min(_ALL_COLOURS, key=lambda k: miss(_ALL_COLOURS[k]))


def _judge_object(region, px, dist, bg) -> dict[str, str] | None:
    if region is None or region.sum() < _MIN_AREA:
        return None
    d = dist[region]
    core = d >= np.median(d)
    colour = np.median(px[region][core], axis=0)
    solid = region & (dist > 0.5 * np.median(d[core]))  # half-contrast edge: true edge under blur
    ys, xs = np.nonzero(solid)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    crop = Image.fromarray(solid[y0:y1, x0:x1].astype(np.uint8) * 255).resize((32, 32), Image.BILINEAR)
    m = np.asarray(crop, np.float32) / 255
    iou = {s: max(np.minimum(m, t).sum() / np.maximum(m, t).sum() for t in (_template(s, b) for b in _BLURS))
           for s in _ALL_SHAPES}
    return {"colour": _nearest_colour(colour, bg), "shape": max(iou, key=iou.get),
            "size": "large" if max(x1 - x0, y1 - y0) > _SIZE_SPLIT else "small",
            "position": min(POSITIONS, key=lambda k: float(np.linalg.norm(centre - POSITIONS[k])))}


def _judge(img: np.ndarray, scene: Scene) -> dict[str, list[bool]]:
    px = img.astype(np.float32)
    border = np.concatenate([px[:2].reshape(-1, 3), px[-2:].reshape(-1, 3),
                             px[:, :2].reshape(-1, 3), px[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    bg_dist = {k: float(np.linalg.norm(bg - v)) for k, v in BACKGROUNDS.items()}
    nearest = min(bg_dist, key=bg_dist.get)
    dist = np.linalg.norm(px - bg, axis=-1)
    comps = _components(dist > _FG_DIST)
    out = {"background": [nearest == scene.background and bg_dist[nearest] < _BG_TOL],
           "count": [len(comps) == len(scene.objects)], "colour": [], "shape": [], "size": [], "position": []}
    if len(scene.objects) == 1:
        regions = [comps[0] if comps else None]
    else:
        clean = np.any(comps, axis=0) if comps else np.zeros(img.shape[:2], bool)
        left = np.arange(IMAGE_SIZE)[None, :] < IMAGE_SIZE // 2
        regions = [clean & left, clean & ~left]
    for obj, region in zip(scene.objects, regions):
        found = _judge_object(region, px, dist, bg)
        for attr in ("colour", "shape", "size", "position"):
            out[attr].append(found is not None and found[attr] == getattr(obj, attr))
    return out


@dataclass
class ScoreReport:
    accuracy: dict[str, float]          # attribute -> fraction of its judgements that are right
    adherence: float                    # mean of per_image
    per_image: list[float]              # fraction of each image's judgements that are right
    details: list[dict[str, list[bool]]]  # per image: attribute -> one bool per judgement

    def table(self) -> str:
        rows = [f"{'attribute':<12}accuracy"] + [f"{k:<12}{v:.3f}" for k, v in self.accuracy.items()]
        return "\n".join(rows + [f"{'adherence':<12}{self.adherence:.3f}  (n={len(self.per_image)})"])

    def __str__(self) -> str:
        return self.table()


def score(images, prompts: list[str]) -> ScoreReport:
    """Judge how well each image follows its prompt (rules in the module docstring).

    ``images``: a list of PIL images / HWC or CHW arrays / tensors, or one NCHW or NHWC batch (numpy or
    torch). uint8 and integer data are 0..255; float data are [-1, 1] when the batch holds a negative
    value, else [0, 1] when its max is <= 1, else 0..255. Images not 64x64 are resized (bilinear)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    arrays = _as_arrays(images)
    if len(arrays) != len(prompts):
        raise UserError(f"score needs one prompt per image: {len(arrays)} images, {len(prompts)} prompts")
    if not arrays:
        raise UserError("score needs at least one image")
    details = [_judge(a, parse(p)) for a, p in zip(arrays, prompts)]
    per_image = [float(np.mean(sum(d.values(), []))) for d in details]
    accuracy = {k: float(np.mean(sum((d[k] for d in details), []))) for k in ATTRIBUTES}
    return ScoreReport(accuracy, float(np.mean(per_image)), per_image, details)


def chance_adherence(prompts: list[str]) -> float:
    """Expected adherence of uniform guessing: 1/2 background, 1/2 count (one or two objects),
    1/7 colour, 1/4 shape, 1/2 size, 1/5 position -- the level noise should not beat."""
    p = {"background": 1 / len(BACKGROUNDS), "count": 1 / 2, "colour": 1 / len(_ALL_COLOURS),
         "shape": 1 / len(_ALL_SHAPES), "size": 1 / len(SIZES), "position": 1 / len(POSITIONS)}
    per = [(p["background"] + p["count"] + len(sc.objects) * (p["colour"] + p["shape"] + p["size"]
            + p["position"])) / (2 + 4 * len(sc.objects)) for sc in map(parse, prompts)]
    return float(np.mean(per))


def grid(images, captions: list[str] | None = None, cols: int = 8, *, scale: int = 2) -> Image.Image:
    """Tile images (anything ``score`` accepts) ``cols`` per row, each upscaled ``scale``x, with optional
    wrapped captions underneath."""
    arrays = _as_arrays(images)
    if not arrays or cols < 1 or scale < 1:
        raise UserError("grid needs at least one image, cols >= 1 and scale >= 1")
    if captions is not None and len(captions) != len(arrays):
        raise UserError(f"grid needs one caption per image: {len(arrays)} images, {len(captions)} captions")
    tile, pad, font = IMAGE_SIZE * scale, 2, ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = []
    for text in captions or []:
        lines = [""]
        for word in str(text).split():
            cand = f"{lines[-1]} {word}".strip()
            if probe.textlength(cand, font=font) <= tile - 4 or not lines[-1]:
                lines[-1] = cand
            else:
                lines.append(word)
        wrapped.append(lines)
    line_h = 11
    text_h = max((len(w) for w in wrapped), default=0) * line_h
    cols = min(cols, len(arrays))
    rows = -(-len(arrays) // cols)
    cell_w, cell_h = tile + pad, tile + text_h + pad
    sheet = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), (128, 128, 128))
    draw = ImageDraw.Draw(sheet)
    for i, a in enumerate(arrays):
        x, y = pad + (i % cols) * cell_w, pad + (i // cols) * cell_h
        sheet.paste(Image.fromarray(a).resize((tile, tile), Image.NEAREST), (x, y))
        if wrapped:
            draw.rectangle([x, y + tile, x + tile - 1, y + tile + text_h - 1], fill=(255, 255, 255))
            for j, line in enumerate(wrapped[i]):
                draw.text((x + 1, y + tile + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet
