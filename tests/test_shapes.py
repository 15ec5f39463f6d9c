import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from rflow.world import shapes as S
from rflow.errors import UserError


def _pairs(scene):
    return {(o.colour, o.shape) for o in scene.objects}


@pytest.fixture(scope="module")
def own():
    """300 of the world's own images: 100 train, 100 heldout, 100 any (with reserved items)."""
    out = S.samples(100, 11) + S.samples(100, 12, split="heldout") + S.samples(100, 13, split="any")
    return [im for im, _ in out], [c for _, c in out]


def test_samples_are_deterministic_and_seeded():
    a, b, c = S.samples(16, 7), S.samples(16, 7), S.samples(16, 8)
    assert [cap for _, cap in a] == [cap for _, cap in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b))
    assert [cap for _, cap in a] != [cap for _, cap in c]
    assert S.prompts(16, 7) == [cap for _, cap in a]
    assert all(im.size == (64, 64) and im.mode == "RGB" for im, _ in a)
    scene = S.parse(a[0][1])
    again = S.render(scene, np.random.default_rng(3))
    assert np.array_equal(np.asarray(S.render(scene, 3)), np.asarray(again))


def test_caption_parse_roundtrip_including_reserved():
    rng = np.random.default_rng(0)
    scenes = [S.random_scene(rng, split="any") for _ in range(500)]
    scenes += [S.Scene("black", (S.Obj("magenta", "star", "large", "at the top"),)),
               S.Scene("white", (S.Obj("magenta", "circle"), S.Obj("red", "star", "small", "on the right")))]
    with pytest.raises(UserError):  # the second scene above has its first object in the center
        S.caption(scenes[-1])
    scenes[-1] = S.Scene("white", (S.Obj("magenta", "circle", "small", "on the left"),
                                   S.Obj("red", "star", "small", "on the right")))
    for sc in scenes:
        assert S.parse(S.caption(sc)) == sc
    assert S.parse("A  small red Circle in the center on a white background.") == S.Scene(
        "white", (S.Obj("red", "circle", "small", "in the center"),))
    assert {o.colour for sc in scenes for o in sc.objects} >= {"magenta"}
    assert {o.shape for sc in scenes for o in sc.objects} >= {"star"}


def test_splits_respect_heldout_pairs_and_reserved_items():
    train = [S.parse(p) for p in S.prompts(3000, 1)]
    held = [S.parse(p) for p in S.prompts(1000, 2, split="heldout")]
    for sc in train:
        assert not _pairs(sc) & set(S.HELDOUT_PAIRS)
        assert all(o.colour in S.COLOURS and o.shape in S.SHAPES for o in sc.objects)
    for sc in held:
        assert _pairs(sc) & set(S.HELDOUT_PAIRS)
        assert all(o.colour in S.COLOURS and o.shape in S.SHAPES for o in sc.objects)
    seen = set().union(*map(_pairs, train))
    assert seen == {(c, s) for c in S.COLOURS for s in S.SHAPES} - set(S.HELDOUT_PAIRS)
    one = np.mean([len(sc.objects) == 1 for sc in train])
    assert 0.65 < one < 0.75
    assert {sc.background for sc in train} == set(S.BACKGROUNDS)
    with pytest.raises(UserError):
        S.prompts(3, split="test")


def test_render_geometry():
    for size, across in S.SIZES.items():
        for shape in S.SHAPES + S.RESERVED_SHAPES:
            sc = S.Scene("white", (S.Obj("blue", shape, size, "on the right"),))
            a = np.asarray(S.render(sc, 0)).astype(int)
            ys, xs = np.nonzero(np.abs(a - 255).sum(-1) > 255)  # at least ~1/3 covered
            assert abs(max(np.ptp(xs), np.ptp(ys)) + 1 - across) <= 2, (shape, size)
            assert abs((xs.min() + xs.max() + 1) / 2 - 48) <= 3.6
            assert abs((ys.min() + ys.max() + 1) / 2 - 32) <= 3.6


def test_score_on_own_images(own):
    images, prompts = own
    rep = S.score(images, prompts)
    assert rep.adherence >= 0.98 and len(rep.per_image) == 300
    assert set(rep.accuracy) == set(S.ATTRIBUTES)
    assert all(v >= 0.95 for v in rep.accuracy.values()), rep.table()
    assert "adherence" in str(rep) and "colour" in rep.table()


def test_score_tolerates_blur_and_colour_noise(own):
    images, prompts = own
    rng = np.random.default_rng(0)
    soft = [np.clip(np.asarray(im.filter(ImageFilter.GaussianBlur(1.0)), float)
                    + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8) for im in images]
    rep = S.score(soft, prompts)
    assert rep.adherence >= 0.95 and min(rep.accuracy.values()) >= 0.9, rep.table()


def test_score_is_low_on_noise_blank_and_shuffled(own):
    images, prompts = own
    chance = S.chance_adherence(prompts)
    assert 0.3 < chance < 0.4
    noise = np.random.default_rng(0).integers(0, 256, (len(prompts), 64, 64, 3), dtype=np.uint8)
    assert S.score(noise, prompts).adherence <= chance
    blank = [Image.new("RGB", (64, 64), S.BACKGROUNDS[S.parse(p).background]) for p in prompts]
    rep = S.score(blank, prompts)  # only the background is right: 1 of 6 (one object) or 1 of 10
    assert rep.accuracy["background"] == 1.0 and rep.accuracy["count"] == 0.0
    assert rep.adherence == pytest.approx(np.mean([1 / (2 + 4 * len(S.parse(p).objects)) for p in prompts]))
    assert rep.adherence <= 0.2
    shuffled = [prompts[i] for i in np.random.default_rng(1).permutation(len(prompts))]
    assert S.score(images, shuffled).adherence <= 0.6


@pytest.mark.parametrize("attr", ["colour", "shape", "size", "position"])
def test_a_wrong_attribute_is_judged_wrong_alone(attr):
    values = {"colour": list(S.COLOURS) + list(S.RESERVED_COLOURS), "shape": list(S.SHAPES) + ["star"],
              "size": list(S.SIZES), "position": list(S.POSITIONS)}[attr]
    rng = np.random.default_rng({"colour": 1, "shape": 2, "size": 3, "position": 4}[attr])
    images, prompts = [], []
    while len(images) < 40:
        sc = S.random_scene(rng, split="any")
        if len(sc.objects) == 2 and attr in ("size", "position"):
            continue
        k = int(rng.integers(len(sc.objects)))
        old = sc.objects[k]
        new = dataclasses.replace(old, **{attr: rng.choice([v for v in values if v != getattr(old, attr)])})
        objs = list(sc.objects)
        objs[k] = new
        images.append(S.render(S.Scene(sc.background, tuple(objs)), rng))
        prompts.append(S.caption(sc))
    for d in S.score(images, prompts).details:
        assert {a for a, v in d.items() if not all(v)} == {attr}


def test_score_accepts_arrays_tensors_and_other_sizes(own):
    images, prompts = own[0][:20], own[1][:20]
    ref = S.score(images, prompts).per_image
    u8 = np.stack([np.asarray(im) for im in images])
    t = torch.from_numpy(u8).permute(0, 3, 1, 2).float()
    assert S.score(u8, prompts).per_image == ref
    assert S.score(t / 127.5 - 1, prompts).per_image == ref
    assert S.score(t / 255, prompts).per_image == ref
    assert S.score(list(t / 255), prompts).per_image == ref
    assert S.score([im.resize((128, 128)) for im in images], prompts).adherence >= 0.95


def test_bad_inputs_raise_user_error():
    for bad in ["a purple circle in the center on a white background", "a small red circle", "", 3]:
        with pytest.raises(UserError):
            S.parse(bad)
    img = S.samples(2)[0][0]
    with pytest.raises(UserError, match="one prompt per image"):
        S.score([img, img], ["a small red circle in the center on a white background"])
    with pytest.raises(UserError):
        S.score([], [])
    with pytest.raises(UserError):
        S.score([img], ["a dog"])
    with pytest.raises(UserError):
        S.caption(S.Scene("grey", (S.Obj("red", "circle"),)))
    with pytest.raises(UserError):
        S.render(S.Scene("white", (S.Obj("red", "hexagon"),)), 0)
    with pytest.raises(UserError):
        S.samples(-1)
    with pytest.raises(UserError) as e:
        S.grid([img], ["a", "b"])
    assert "\n" not in str(e.value)


def test_grid():
    pairs = S.samples(10, 3)
    plain = S.grid([im for im, _ in pairs], cols=4)
    assert plain.size == (4 * 130 + 2, 3 * 130 + 2)
    labelled = S.grid([im for im, _ in pairs], [c for _, c in pairs], cols=4)
    assert labelled.size[0] == plain.size[0] and labelled.size[1] > plain.size[1]
