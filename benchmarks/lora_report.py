"""Teach rflow-tiny the reserved colour ``magenta`` and shape ``star`` with a LoRA; writes docs/training.md.

The shapes world never shows ``magenta`` or ``star`` to rflow-tiny's base training (only the ``"any"``
split holds them). This script renders at most 50 captioned scenes that contain one or both (with
``--prior``, some of the 50 are base-grammar scenes instead), trains a LoRA on them with the library
trainer (rflow.train.lora, the same code as ``rflow train``), and scores
adherence (rflow.world.evaluate) before and after on prompts with the reserved words and on base
prompts (the ``"train"`` grammar). Targets: reserved adherence from near 0 to ≥ 0.8; base adherence
drops ≤ 0.03.

    .venv/bin/python benchmarks/lora_report.py [--steps 3000] [--lr 2e-3] [--images 50] [--prior 12] [--dataset balanced|curated|random|stars] [--preserve SPEC] [--masked-loss] [--cfg 3] [--eval-set 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def reserved_scenes(n: int, seed: int):
    """Scenes of the ``any`` split that hold magenta or a star (the first ``n`` such, from ``seed``)."""
    from rflow.world import shapes

    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        sc = shapes.random_scene(rng, split="any")
        if any(o.colour in shapes.RESERVED_COLOURS or o.shape in shapes.RESERVED_SHAPES for o in sc.objects):
            out.append(sc)
    return out


PRESERVE = "magenta=red|green|blue|yellow|orange|cyan,star=circle|square|triangle"  # the base words stand in
DATASETS = {"curated": "chosen to cover every colour, size, position and background with the new words",
            "balanced": "as curated, with 40% two-object scenes holding the new words on the left or the right",
            "random": "the first random scenes of the full grammar that hold them",
            "stars": "as balanced, with more stars: 55% single stars, large and small on either background"}


def curated_scenes(n: int):
    """``n`` scenes chosen to cover the new words: half single stars (every colour incl. magenta, both
    sizes, every position, both backgrounds), a third single magenta circles / squares / triangles, the
    rest two-object scenes with a star or a magenta object on the left."""
    from rflow.world.shapes import BACKGROUNDS, COLOURS, POSITIONS, SIZES, Obj, Scene

    cols, sizes, pos, bgs = list(COLOURS) + ["magenta"], list(SIZES), list(POSITIONS), list(BACKGROUNDS)
    others = ("circle", "square", "triangle")
    scenes = [Scene(bgs[i % 2], (Obj(cols[i % 7], "star", sizes[(i // 2) % 2], pos[i % 5]),)) for i in range(n // 2)]
    scenes += [Scene(bgs[(i + 1) % 2], (Obj("magenta", others[i % 3], sizes[(i // 3) % 2], pos[(i + 2) % 5]),))
               for i in range(n // 3)]
    while len(scenes) < n:
        i = len(scenes)
        left = Obj(cols[i % 6], "star", "small", "on the left") if i % 2 else Obj("magenta", others[i % 3], "small",
                                                                                   "on the left")
        scenes.append(Scene(bgs[i % 2], (left, Obj(cols[(i + 3) % 6], others[(i + 1) % 3], "small", "on the right"))))
    return scenes


def balanced_scenes(n: int, two: float = 0.4, star: float = 0.6):
    """``n`` scenes: ``two`` of them two-object scenes (a star, a magenta object or a magenta star, on the
    left or the right beside a base object), of the one-object rest ``star`` single stars (every colour incl.
    magenta, both sizes, every position, both backgrounds) and the others magenta circles / squares / triangles."""
    from rflow.world.shapes import BACKGROUNDS, COLOURS, POSITIONS, SIZES, Obj, Scene

    cols, sizes, pos, bgs = list(COLOURS) + ["magenta"], list(SIZES), list(POSITIONS), list(BACKGROUNDS)
    others = ("circle", "square", "triangle")
    n2 = round(n * two)
    ns = round((n - n2) * star)
    nm = n - n2 - ns
    scenes = [Scene(bgs[i % 2], (Obj(cols[i % 7], "star", sizes[(i // 2) % 2], pos[i % 5]),)) for i in range(ns)]
    scenes += [Scene(bgs[(i + 1) % 2], (Obj("magenta", others[i % 3], sizes[(i // 3) % 2], pos[(i + 2) % 5]),))
               for i in range(nm)]
    for i in range(n2):
        new = (Obj(cols[i % 6], "star"), Obj("magenta", others[i % 3]), Obj("magenta", "star"))[i % 3]
        base = Obj(cols[(i + 3) % 6], others[(i + 1) % 3])
        left, right = (new, base) if (i // 3) % 2 == 0 else (base, new)
        scenes.append(Scene(bgs[i % 2], (Obj(left.colour, left.shape, "small", "on the left"),
                                         Obj(right.colour, right.shape, "small", "on the right"))))
    return scenes


def star_scenes(n: int):
    """``n`` scenes weighted towards the star: 55% single stars (every colour incl. magenta, each of
    the four size × background pairs equally, every position), ``n/8`` single magenta circles / squares /
    triangles, the rest two-object scenes of a star (one in three magenta) or a magenta base shape beside
    a base object, on the left or the right."""
    from rflow.world.shapes import BACKGROUNDS, COLOURS, POSITIONS, SIZES, Obj, Scene

    cols, sizes, pos, bgs = list(COLOURS) + ["magenta"], list(SIZES), list(POSITIONS), list(BACKGROUNDS)
    others = ("circle", "square", "triangle")
    ns, nm = round(0.55 * n), n // 8
    scenes = [Scene(bgs[i % 2], (Obj(cols[i % 7], "star", sizes[(i // 2) % 2], pos[i % 5]),)) for i in range(ns)]
    scenes += [Scene(bgs[(i + 1) % 2], (Obj("magenta", others[i % 3], sizes[i % 2], pos[(i + 2) % 5]),))
               for i in range(nm)]
    for i in range(n - ns - nm):
        new = (Obj(cols[i % 6], "star"), Obj("magenta", "star"), Obj(cols[(i + 2) % 6], "star"),
               Obj("magenta", others[i % 3]))[i % 4]
        base = Obj(cols[(i + 3) % 6], others[(i + 1) % 3])
        left, right = (new, base) if (i // 4) % 2 == 0 else (base, new)
        scenes.append(Scene(bgs[(i + i // 4) % 2], (Obj(left.colour, left.shape, "small", "on the left"),
                                                    Obj(right.colour, right.shape, "small", "on the right"))))
    return scenes


def write_dataset(folder: Path, n: int, seed: int, *, dataset: str = "random", prior: int = 0) -> list[str]:
    """``n`` captioned images: ``n - prior`` with the reserved words (``dataset``: one of ``DATASETS``) and
    ``prior`` base-grammar scenes (prior preservation). Returns the reserved captions."""
    from rflow.world import shapes

    folder.mkdir(parents=True, exist_ok=True)
    k = n - prior
    scenes = reserved_scenes(k, seed) if dataset == "random" else {"curated": curated_scenes,
                                                                    "balanced": balanced_scenes,
                                                                    "stars": star_scenes}[dataset](k)
    rng, caps = np.random.default_rng(seed + 1 if dataset == "random" else 3), []
    for i, sc in enumerate(scenes):
        shapes.render(sc, rng).save(folder / f"{i:03d}.png")
        cap = shapes.caption(sc)
        (folder / f"{i:03d}.txt").write_text(cap)
        caps.append(cap)
    for i, (im, cap) in enumerate(shapes.samples(prior, seed=12345, split="train")):
        im.save(folder / f"p{i:03d}.png")
        (folder / f"p{i:03d}.txt").write_text(cap)
    return caps


def write_masks(folder: Path) -> None:
    """A loss mask beside every image of ``folder`` (``masks/NAME.png``): the pixels that differ from the
    background (the image's corner pixel) by more than 1/20 of the range, grown by one pixel."""
    from PIL import Image

    (folder / "masks").mkdir(exist_ok=True)
    for p in sorted(folder.glob("*.png")):
        a = np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
        m = (np.abs(a - a[0, 0]).max(axis=2) > 12).astype(np.uint8)
        grown = np.pad(m, 1)
        m = np.max([grown[i:i + m.shape[0], j:j + m.shape[1]] for i in range(3) for j in range(3)], axis=0)
        Image.fromarray(m * 255).save(folder / "masks" / p.name)


def stand_in_scenes(scenes, k: int):
    """``scenes`` with each reserved word replaced by a base word: the star of object ``j`` by the base shape
    ``(k + j) mod 3`` (so ``k`` = 0, 1, 2 give every star as each base shape), magenta by a base colour,
    never forming a held-out colour × shape pair. The base model's judgements at the reserved words' places
    in these scenes are what it does with words it has learnt."""
    from rflow.world.shapes import COLOURS, HELDOUT_PAIRS, Obj, RESERVED_COLOURS, RESERVED_SHAPES, SHAPES, Scene

    cols, out = list(COLOURS), []
    for sc in scenes:
        objs = []
        for j, o in enumerate(sc.objects):
            shape = SHAPES[(k + j) % 3] if o.shape in RESERVED_SHAPES else o.shape
            c = (2 * k + j) % len(cols)
            if o.colour in RESERVED_COLOURS:
                while (cols[c], shape) in HELDOUT_PAIRS:
                    c = (c + 1) % len(cols)
            elif o.shape in RESERVED_SHAPES and (o.colour, shape) in HELDOUT_PAIRS:  # the next base shape
                shape = next(s for s in SHAPES[(k + j + 1) % 3:] + SHAPES if (o.colour, s) not in HELDOUT_PAIRS)
            objs.append(Obj(cols[c] if o.colour in RESERVED_COLOURS else o.colour, shape, o.size, o.position))
        out.append(Scene(sc.background, tuple(objs)))
    return out


def reserved_hits(report, prompts, originals=None) -> list[tuple[str, bool]]:
    """Each judgement on a reserved word, as (group, right): each magenta object's colour, each star's shape
    (the evaluator judges objects in the prompt's order); groups by word, size and company. With
    ``originals`` (the prompts the ``prompts`` stand in for, object by object), the judgements at the
    places of their reserved words."""
    from rflow.world import shapes

    hits = []
    for d, p in zip(report.details, originals if originals is not None else prompts):
        objs = shapes.parse(p).objects
        for j, o in enumerate(objs):
            where = "beside another object" if len(objs) > 1 else f"{o.size}, alone"
            if o.colour in shapes.RESERVED_COLOURS:
                hits.append((f"magenta, {where}", bool(d["colour"][j])))
            if o.shape in shapes.RESERVED_SHAPES:
                hits.append((f"star, {where}", bool(d["shape"][j])))
    return hits


def reserved_accuracy(report, prompts, originals=None) -> float:
    """The share of the judgements on reserved words that are right (:func:`reserved_hits`)."""
    hits = reserved_hits(report, prompts, originals)
    return float(np.mean([h for _, h in hits])) if hits else float("nan")


def by_group(hits) -> dict[str, tuple[int, int]]:
    """(right, judgements) per group of :func:`reserved_hits`."""
    out: dict[str, tuple[int, int]] = {}
    for g, h in hits:
        r, n = out.get(g, (0, 0))
        out[g] = (r + h, n + 1)
    return dict(sorted(out.items()))


def score(pipe, prompts, args):
    from rflow.world.evaluate import evaluate

    res = evaluate(pipe, prompts=prompts, heldout=0, steps=args.eval_steps, seed=0, guidance=args.guidance,
                   cfg=args.cfg)
    acc = dict(res.report.accuracy, reserved_words=reserved_accuracy(res.report, prompts))
    acc["groups"] = by_group(reserved_hits(res.report, prompts))
    return res.report.adherence, acc, res.images


def stand_in_score(pipe, scenes, args) -> tuple[float, dict]:
    """The base model's judgements at the reserved words' places when base words stand in for them
    (:func:`stand_in_scenes`, all three ``k``): what it does with words it has learnt, in the same places."""
    from rflow.world import shapes
    from rflow.world.evaluate import evaluate

    originals, hits = [shapes.caption(sc) for sc in scenes], []
    for k in range(3):
        prompts = [shapes.caption(sc) for sc in stand_in_scenes(scenes, k)]
        res = evaluate(pipe, prompts=prompts, heldout=0, steps=args.eval_steps, seed=0, guidance=args.guidance,
                       cfg=args.cfg)
        hits += reserved_hits(res.report, prompts, originals)
    return float(np.mean([h for _, h in hits])), by_group(hits)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--images", type=int, default=50, help="training images in all (reserved + prior)")
    ap.add_argument("--dataset", choices=tuple(DATASETS), default="balanced")
    ap.add_argument("--prior", type=int, default=12, help="of the images, base-grammar scenes (prior preservation)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--targets", default="attn,mlp")
    ap.add_argument("--guidance", type=float, default=3.5, help="training and sampling guidance")
    ap.add_argument("--logit-mean", type=float, default=0.0, help="timesteps t = sigmoid(N(mean, std))")
    ap.add_argument("--logit-std", type=float, default=1.0)
    ap.add_argument("--x0-floor", type=float, default=0.3,
                    help="x0-error weight floor (1: plain x0 error; lower weighs nearly clean samples up)")
    ap.add_argument("--preserve", default=PRESERVE, help="output preservation spec ('' for none)")
    ap.add_argument("--preserve-weight", type=float, default=1.0)
    ap.add_argument("--masked-loss", action="store_true", help="weigh the loss by object masks (written from the scenes)")
    ap.add_argument("--mask-floor", type=float, default=0.1, help="--masked-loss: the weight of background pixels")
    ap.add_argument("--eval", type=int, default=48, help="prompts per set")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--eval-set", type=int, default=0, help="which set of reserved prompts (0: the docs' set; 1, 2, ...: others)")
    ap.add_argument("--cfg", type=float, default=1.0, help="true CFG scale of every scored sample (1: none)")
    ap.add_argument("--out", type=Path, default=DOCS / "training.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from rflow.pipeline import load
    from rflow.train.data import read_dataset
    from rflow.train.lora import LoRAConfig, LoRATrainer
    from rflow.world import shapes
    from rflow.world.evaluate import EVAL_SEED_OFFSET

    pipe = load("rflow-tiny", device="cpu", dtype=torch.float32)
    scenes = reserved_scenes(args.eval, EVAL_SEED_OFFSET + 7 + args.eval_set)
    reserved = [shapes.caption(sc) for sc in scenes]
    base = shapes.prompts(args.eval, seed=EVAL_SEED_OFFSET, split="train")
    t0 = time.perf_counter()
    r0, racc0, rimg0 = score(pipe, reserved, args)
    b0, bacc0, _ = score(pipe, base, args)
    ref, ref_groups = stand_in_score(pipe, scenes, args)
    print(f"before: reserved {r0:.3f} ({racc0['reserved_words']:.3f} words; base words in their place "
          f"{ref:.3f}) base {b0:.3f}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="rflow-lora-"))
    caps = write_dataset(work / "data", args.images, seed=11, dataset=args.dataset, prior=args.prior)
    if args.masked_loss:
        write_masks(work / "data")
    cfg = LoRAConfig(steps=args.steps, rank=args.rank, lr=args.lr, batch=args.batch, targets=args.targets,
                     warmup=min(50, args.steps // 10), resolution=64, logit_mean=args.logit_mean, logit_std=args.logit_std,
                     x0_weight_floor=args.x0_floor,
                     caption_dropout=0.1, guidance=args.guidance, checkpoint_every=max(1, args.steps),
                     preserve=args.preserve, preserve_weight=args.preserve_weight, masked_loss=args.masked_loss,
                     mask_floor=args.mask_floor)
    trainer = LoRATrainer(pipe, cfg, read_dataset(work / "data"), work / "run")
    t1 = time.perf_counter()
    trainer.run(progress=lambda r: print(f"step {r['step']} loss {r['loss']:.4f}", file=sys.stderr)
                if r["step"] % 50 == 0 else None)
    train_s = time.perf_counter() - t1
    lora = trainer.export("peft")
    r1, racc1, rimg1 = score(pipe, reserved, args)
    b1, bacc1, _ = score(pipe, base, args)
    print(f"after: reserved {r1:.3f} ({racc1['reserved_words']:.3f} words) base {b1:.3f}", file=sys.stderr)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [r["loss"] for r in trainer.log]
    k = max(1, len(losses) // 30)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(losses, alpha=0.3, label="loss")
    ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=f"mean of {k}")
    ax.set_xlabel("step"), ax.set_ylabel("flow-matching loss"), ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_name(f"{args.out.stem}-lora-loss.png"), dpi=110)
    n = min(16, len(reserved))
    g0 = shapes.grid(rimg0[:n], reserved[:n], cols=8)
    g1 = shapes.grid(rimg1[:n], reserved[:n], cols=8)
    from PIL import Image

    both = Image.new("RGB", (max(g0.width, g1.width), g0.height + g1.height + 8), "white")
    both.paste(g0, (0, 0)), both.paste(g1, (0, g0.height + 8))
    both.save(args.out.with_name(f"{args.out.stem}-lora-grid.png"))

    w0, w1 = racc0["reserved_words"], racc1["reserved_words"]
    ok_w, ok_r, ok_b = w1 >= 0.8, r1 >= 0.8, (b0 - b1) <= 0.03
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "device": f"CPU ({platform.processor() or platform.machine()}), 1 torch thread",
               "torch": torch.__version__, "config": vars(args) | {"out": str(args.out)},
               "images": args.images, "reserved_images": len(caps), "reserved_before": r0, "reserved_after": r1, "base_before": b0,
               "base_after": b1, "reserved_words_before": w0, "reserved_words_after": w1, "reserved_accuracy_before": racc0, "reserved_accuracy_after": racc1,
               "stand_in_words": ref, "stand_in_groups": ref_groups,
               "train_seconds": train_s, "total_seconds": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-50:])),
               "lora": str(lora)}
    args.out.with_name(f"{args.out.stem}-results.json").write_text(json.dumps(results, indent=1))
    cmd = (f"rflow train --model rflow-tiny --data DATA --steps {args.steps} --rank {args.rank} --lr {args.lr} "
           f"--batch {args.batch} --targets {args.targets} --resolution 64 --logit-mean {args.logit_mean:g} --logit-std {args.logit_std:g} "
           f"--caption-dropout 0.1 --guidance {args.guidance} --warmup {cfg.warmup}"
           + (f" --x0-weight-floor {args.x0_floor:g}" if args.x0_floor != 1.0 else "")
           + (f" --preserve '{args.preserve}' --preserve-weight {args.preserve_weight:g}" if args.preserve else "")
           + (f" --masked-loss --mask-floor {args.mask_floor:g}" if args.masked_loss else "")
           + " -o RUN")
    keep_text = (f", with output preservation (`--preserve`, weight {args.preserve_weight:g}: each caption again "
                 "with magenta and star swapped for base colours and shapes, held to the base model's prediction)"
                 if args.preserve else "")
    prior_text = (f" and {args.prior} base-grammar scenes (prior preservation; {args.images} images in all)"
                  if args.prior else "")
    acc = "\n".join(f"| {a} | {racc0[a]:.3f} | {racc1[a]:.3f} |" for a in racc0 if a != "groups")
    groups = "\n".join(f"| {g} | {r}/{n} = {r / n:.2f} | {racc1['groups'].get(g, (0, 0))[0]}/{n // 3} = "
                       f"{racc1['groups'].get(g, (0, 0))[0] / max(1, n // 3):.2f} |" for g, (r, n) in ref_groups.items())
    text = f"""# Training a LoRA: teaching rflow-tiny magenta and stars

rflow-tiny's base training never shows the colour `magenta` or the shape `star` (the shapes world keeps
them for this experiment). {len(caps)} rendered scenes that contain one or both ({args.dataset}: {DATASETS[args.dataset]}){prior_text},
with their captions, teach them through a LoRA (rank {args.rank}, targets `{args.targets}`){keep_text}; adherence is scored by the shapes-world
evaluator on {len(reserved)} prompts with the reserved words{f" (prompt set {args.eval_set})" if args.eval_set else ""} and {len(base)} base-grammar prompts,
{args.eval_steps} Euler steps, guidance {args.guidance}{f", true CFG {args.cfg:g}" if args.cfg != 1 else ""}, seed 0. Adherence is the evaluator's share of
right judgements per image (background, count, colour, shape, size, position), so a model that draws a
wrong colour or shape for the reserved word still scores on the rest; the first row counts only the
judgements on the reserved words themselves (each magenta object's colour, each star's shape).

| prompts | before | after | target |
|---|---|---|---|
| magenta / star words right (reserved prompts) | {w0:.3f} | {w1:.3f} | ≥ 0.8 after: {"met" if ok_w else "**missed**"} |
| adherence, prompts with magenta / star | {r0:.3f} | {r1:.3f} | ≥ 0.8 after: {"met" if ok_r else "**missed**"} |
| adherence, base grammar | {b0:.3f} | {b1:.3f} | drop ≤ 0.03: {"met" if ok_b else "**missed**"} (drop {b0 - b1:+.3f}) |
| for reference: the same judgements with base words in the reserved words' places (base model) | {ref:.3f} | – | – |

The reference row asks what rflow-tiny does with words it has learnt from its 128,000 training images, in
the places of the new ones: each star replaced by a circle, a square and a triangle in turn, each magenta
by a base colour (never a held-out pair), the same judgements scored. Where the judgements are, and how
many are right:

| reserved word, where | base words in its place (base model) | the word itself, after the LoRA |
|---|---|---|
{groups}

Per attribute, reserved prompts:

| attribute | before | after |
|---|---|---|
{acc}

![loss]({args.out.stem}-lora-loss.png)

Reserved prompts before (top) and after (bottom) the LoRA:

![grid]({args.out.stem}-lora-grid.png)

Command (the script, `benchmarks/lora_report.py`, calls the same trainer as):

    {cmd}

Training: {args.steps} steps of batch {args.batch} in {train_s:.0f} s; final loss {results['final_loss']:.4f}.
Run {results['date']} on {results['device']}, torch {results['torch']}; numbers in
`docs/{args.out.stem}-results.json`. LoRA written as `{lora.name}` (PEFT/diffusers format).

Guidance: rflow-tiny learnt its guidance embedding over 1–5 as an input, not by distillation, so the LoRA
trains at the guidance it is sampled with; for distilled models (FLUX.1-dev) `rflow train` uses 1.0.
"""
    args.out.write_text(text)
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
