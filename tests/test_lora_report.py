"""benchmarks/lora_report.py's scoring helpers: the star-weighted dataset, the base-word stand-ins for the
reserved words (every reserved word replaced, nothing else changed, no held-out pair made) and the
judgements taken at the reserved words' places."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _script():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("lora_report", ROOT / "benchmarks" / "lora_report.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.pop(0)


def test_stand_ins_replace_every_reserved_word_and_nothing_else():
    from rflow.world import shapes

    lr = _script()
    scenes = lr.reserved_scenes(48, 7)
    star_as = {}  # (scene, object) -> the base shapes that stood in for its star
    for k in range(3):
        for i, (sc, st) in enumerate(zip(scenes, lr.stand_in_scenes(scenes, k))):
            assert st.background == sc.background and len(st.objects) == len(sc.objects)
            for j, (o, s) in enumerate(zip(sc.objects, st.objects)):
                assert (s.size, s.position) == (o.size, o.position)
                assert s.colour in shapes.COLOURS and s.shape in shapes.SHAPES
                assert s.colour == o.colour or o.colour in shapes.RESERVED_COLOURS
                assert s.shape == o.shape or o.shape in shapes.RESERVED_SHAPES
                if (s.colour, s.shape) != (o.colour, o.shape):
                    assert (s.colour, s.shape) not in shapes.HELDOUT_PAIRS
                if o.shape == "star":
                    star_as.setdefault((i, j), set()).add(s.shape)
            shapes.caption(st)  # a valid scene of the grammar
    assert len(star_as) > 20 and all(len(v) >= 2 for v in star_as.values())
    assert sum(v == set(shapes.SHAPES) for v in star_as.values()) > 0.6 * len(star_as)  # cyan, orange and green stars skip their held-out shape


def test_judgements_are_taken_at_the_reserved_words_places():
    lr = _script()
    originals = ["a small magenta star in the center on a black background",
                 "a red star on the left and a blue circle on the right on a white background",
                 "a large green square at the top on a black background"]
    stand_ins = ["a small red circle in the center on a black background",
                 "a red square on the left and a blue circle on the right on a white background",
                 "a large green square at the top on a black background"]
    report = SimpleNamespace(details=[{"colour": [True], "shape": [False]},
                                      {"colour": [False, False], "shape": [True, False]},
                                      {"colour": [False], "shape": [False]}])
    hits = lr.reserved_hits(report, stand_ins, originals)
    assert hits == [("magenta, small, alone", True), ("star, small, alone", False),
                    ("star, beside another object", True)]
    assert lr.reserved_accuracy(report, stand_ins, originals) == 2 / 3
    assert lr.reserved_hits(report, stand_ins) == []  # the stand-ins alone hold no reserved word
    assert lr.by_group(hits + [("star, small, alone", True)])["star, small, alone"] == (1, 2)


def test_the_star_dataset_weighs_stars_and_covers_both_sizes_and_backgrounds():
    lr = _script()
    scenes = lr.star_scenes(38)
    assert len(scenes) == 38
    stars = [(o.size, sc.background) for sc in scenes for o in sc.objects if o.shape == "star"]
    balanced = [o for sc in lr.balanced_scenes(38) for o in sc.objects if o.shape == "star"]
    assert len(stars) > len(balanced)
    assert {s for s in stars} == {(z, b) for z in ("small", "large") for b in ("white", "black")}
    assert sum(o.colour == "magenta" for sc in scenes for o in sc.objects) >= 10
