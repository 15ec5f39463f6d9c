"""Property: whatever value an option gets, the answer is exit 0 or one ``rflow: error:`` line and exit 2.

For every verb a valid base command line (small: steps 1-2, 64x64 or 32x32, one or two prompts) has one to
three of its options replaced by values drawn from a seeded ``random.Random``: numbers (nan, inf, 1e308,
-5, 0, 10^23, abc, the empty string, a few valid ones), paths (an existing folder, a folder with missing
parents, an existing file, garbage bytes, nothing, a .png where a .safetensors is wanted) and strings
(unicode, empty). The call runs in-process; it must never raise, print a traceback or exit 1, and a
non-finite number must never be accepted.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest
from PIL import Image

from rflow.cli import main
from rflow.paths import DEFAULT_MODEL_DIR

PROMPT = "a large red circle on the left on a white background"
DRAWS = int(os.environ.get("RFLOW_PROPERTY_DRAWS", "12"))
SEED = int(os.environ.get("RFLOW_PROPERTY_SEED", "0"))

NONFINITE = ["nan", "inf", "-inf", "NaN", "-Infinity"]
BAD_NUMBERS = NONFINITE[:3] + ["1e308", "-5", "0", "99999999999999999999999", "abc", "", "-0", "1e-320"]
STRINGS = ["日本語 ☃ ünïcødé", "", " ", "--", "🙂" * 40]

# option kinds -> valid values (bad ones are added by draw())
VALID = {
    "steps": ["1", "2"], "shapes": ["1", "2"], "count": ["1", "2"], "heldout": ["0", "1"],
    "batch": ["1", "2"], "seed": ["0", "3"], "every": ["1", "2"], "ckpt": ["1", "2"],
    "guidance": ["3.5", "1"], "cfg": ["1", "1.5"], "strength": ["0.5", "1"], "lr": ["0.001", "0.01"],
    "fraction": ["0.3", "0.5"], "threshold": ["0.5", "0.1"], "level": ["0.3", "0.5"], "holdout": ["0.2", "0.5"],
    "stepspec": ["2", "1-2", "1,2"], "size": ["64x64", "32x32"], "sizes": ["64x64", "32x32,64x64"],
    "layers": ["0", "0-1"], "streams": ["img", "img,txt", "single"], "budget": ["50MB", "20MiB"],
    "shard": ["1MB", "256MiB"], "solver": ["euler", "dpm++2m", "unipc"], "dtype": ["fp32", "bf16"],
    "store_dtype": ["fp32", "fp16"], "device": ["cpu"], "criterion": ["frequency", "magnitude"],
    "train": ["mlp", "block"], "prompt": [PROMPT, "a small blue square"], "negative": ["blurry", ""],
    "qformat": ["Q8_0", "int8", "q4_0"], "qoptions": ["bf16,Q8_0", "bf16,Q4_0,prune50", "int8,prune25+Q8_0"],
    "units": ["block", "layer"], "share": ["60%", "60MB"], "qlayers": ["double_blocks.*", "*,single_blocks.0.*"],
}
NUMERIC = {"steps", "shapes", "count", "heldout", "batch", "seed", "every", "ckpt", "guidance", "cfg", "strength",
           "lr", "fraction", "threshold", "level", "holdout", "stepspec"}
SPECIAL_BAD = {
    "stepspec": ["2-1", "0-2", "1,,2", "1-nan", "nan,2", "-"],
    "size": ["0x0", "64x", "x", "-64x64", "nanxnan", "infx64", "99999999x99999999", "64x64x64", "63x63"],
    "sizes": ["0x0", "64x,32x32", ",", "nanx64", "99999999x99999999", "64x64,"],
    "layers": ["99", "1-0", "-1", "0-nan", "0,,1", "abc"],
    "streams": ["bogus", "img,bogus", ","],
    "budget": ["0", "-1MB", "nanMB", "infGB", "1e308GB", "abc", "5", "1XB"],
    "shard": ["0", "-1MB", "nanMB", "abc"],
    "solver": ["bogus"], "dtype": ["int8", "fp64"], "store_dtype": ["int8"], "device": ["bogus", "cuda:x"],
    "criterion": ["bogus"], "train": ["bogus"],
    "qformat": ["Q9", "prune25", "keepme", "Q4_K"], "qoptions": ["prune0", "prune100", "Q9", ",", "prune50+Q9", "bf16,"],
    "units": ["row", "blocks"], "qlayers": ["nothing.*", ",", "img_in", "final_layer.*"], "share": ["0%", "-5%", "nan%", "inf%", "1e308%", "abc%", "1KB", "%"],
}


@pytest.fixture(autouse=True)
def _inside_tmp(tmp_path, monkeypatch):
    """Relative paths ('', unicode names) land in tmp_path, never in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    w = tmp_path_factory.mktemp("prop")
    tiny = w / "tiny"
    shutil.copytree(DEFAULT_MODEL_DIR, tiny)
    stats = w / "stats.safetensors"
    stats2 = w / "stats2.safetensors"
    cap = w / "cap"
    pruned = w / "pruned"
    patches = w / "patches.safetensors"
    for argv in (
        ["analyze", "--model", tiny, "--shapes", "2", "--steps", "2", "-o", stats],
        ["analyze", "--model", tiny, "--shapes", "1", "--steps", "2", "--seed", "5", "-o", stats2],
        ["capture", "--model", tiny, "--shapes", "2", "--steps", "2", "--budget", "50MB", "--layers", "0-1", "-o", cap],
        ["prune", "--model", tiny, "--stats", stats, "--fraction", "0.3", "--layers", "0-1", "-o", pruned],
        ["distill", "--teacher", tiny, "--student", pruned, "--capture", cap, "--steps", "2", "-o", patches],
    ):
        assert main([str(a) for a in argv]) == 0, argv
    png = w / "image.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(png)
    prompts = w / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    bad = w / "bad"
    bad.mkdir()
    garbage = bad / "garbage.safetensors"
    garbage.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(4096)))
    text = bad / "notes.txt"
    text.write_text("just some text\n")
    existing_dir = bad / "a-folder"
    existing_dir.mkdir()
    (existing_dir / "x").write_text("x")
    bad_png = bad / "looks.png"
    bad_png.write_bytes(png.read_bytes())
    return dict(tiny=tiny, stats=stats, stats2=stats2, cap=cap, pruned=pruned, patches=patches, png=png,
                prompts=prompts, garbage=garbage, text=text, existing_dir=existing_dir, bad=bad, bad_png=bad_png)


def bad_inputs(e, here):
    return [str(e["existing_dir"]), str(here / "no" / "such" / "parents"), str(e["text"]), str(e["garbage"]),
            str(here / "missing.safetensors"), str(e["bad_png"]), ""]


def bad_outputs(e, here, suffix):
    return [str(e["existing_dir"]), str(here / "deep" / "er" / f"out{suffix}"), str(e["text"]), str(e["garbage"]),
            str(here / "out.png"), str(here / "out.weird"), "", str(here / ("日本語" + suffix))]


def verbs(e, here):
    """verb -> (base argv with {slot} placeholders, {slot: (kind, valid value)})."""
    o = lambda name: str(here / name)  # noqa: E731
    model_in = ("in_model", str(e["tiny"]))
    return {
        "generate": (["generate", "{prompt}", "--model", "{model}", "--steps", "{steps}", "--size", "{size}",
                      "--guidance", "{guidance}", "--cfg", "{cfg}", "--seed", "{seed}", "--solver", "{solver}",
                      "--batch", "{batch}", "--negative", "{negative}", "--image", "{image}", "--strength",
                      "{strength}", "--device", "{device}", "--dtype", "{dtype}", "-o", "{out}"],
                     {"prompt": ("prompt", PROMPT), "model": model_in, "steps": ("steps", "2"), "size": ("size", "64x64"),
                      "guidance": ("guidance", "3.5"), "cfg": ("cfg", "1"), "seed": ("seed", "0"),
                      "solver": ("solver", "euler"), "batch": ("batch", "1"), "negative": ("negative", "blurry"),
                      "image": ("in_png", str(e["png"])), "strength": ("strength", "1"), "device": ("device", "cpu"),
                      "dtype": ("dtype", "fp32"), "out": ("out.png", o("x.png"))}),
        "eval": (["eval", "--model", "{model}", "--shapes", "{shapes}", "--heldout", "{heldout}", "--steps", "{steps}",
                  "--solver", "{solver}", "--seed", "{seed}", "--guidance", "{guidance}", "--cfg", "{cfg}",
                  "--device", "{device}", "-o", "{out}"],
                 {"model": model_in, "shapes": ("shapes", "2"), "heldout": ("heldout", "0"), "steps": ("steps", "2"),
                  "solver": ("solver", "euler"), "seed": ("seed", "0"), "guidance": ("guidance", "3.5"),
                  "cfg": ("cfg", "1"), "device": ("device", "cpu"), "out": ("out.png", o("g.png"))}),
        "train": (["train", "--full", "--steps", "{steps}", "--batch", "{batch}", "--lr", "{lr}", "--seed", "{seed}",
                   "--checkpoint-every", "{ckpt}", "--device", "{device}", "-o", "{out}"],
                  {"steps": ("steps", "1"), "batch": ("batch", "2"), "lr": ("lr", "0.001"), "seed": ("seed", "0"),
                   "ckpt": ("ckpt", "1"), "device": ("device", "cpu"), "out": ("out/", o("run"))}),
        "info": (["info", "{path}"], {"path": model_in}),
        "analyze": (["analyze", "--model", "{model}", "--shapes", "{shapes}", "--steps", "{steps}", "--sizes",
                     "{sizes}", "--seed", "{seed}", "--guidance", "{guidance}", "--cfg", "{cfg}", "--layers",
                     "{layers}", "--streams", "{streams}", "--device", "{device}", "-o", "{out}"],
                    {"model": model_in, "shapes": ("shapes", "1"), "steps": ("stepspec", "2"),
                     "sizes": ("sizes", "32x32"), "seed": ("seed", "0"), "guidance": ("guidance", "3.5"),
                     "cfg": ("cfg", "1"), "layers": ("layers", "0-1"), "streams": ("streams", "img,txt"),
                     "device": ("device", "cpu"), "out": ("out.safetensors", o("s.safetensors"))}),
        "stats merge": (["stats", "merge", "{a}", "{b}", "-o", "{out}"],
                        {"a": ("in_stats", str(e["stats"])), "b": ("in_stats", str(e["stats2"])),
                         "out": ("out.safetensors", o("m.safetensors"))}),
        "stats show": (["stats", "show", "{path}", "--heatmap", "{heatmap}"],
                       {"path": ("in_stats", str(e["stats"])), "heatmap": ("out.png", o("h.png"))}),
        "capture": (["capture", "--model", "{model}", "--shapes", "{shapes}", "--steps", "{steps}", "--sizes",
                     "{sizes}", "--budget", "{budget}", "--layers", "{layers}", "--every", "{every}", "--seed", "{seed}",
                     "--guidance", "{guidance}", "--cfg", "{cfg}", "--solver", "{solver}", "--store-dtype",
                     "{store_dtype}", "--shard-size", "{shard}", "--device", "{device}", "-o", "{out}"],
                    {"model": model_in, "shapes": ("shapes", "1"), "steps": ("stepspec", "2"),
                     "sizes": ("sizes", "32x32"), "budget": ("budget", "50MB"), "layers": ("layers", "0-1"),
                     "every": ("every", "1"), "seed": ("seed", "0"), "guidance": ("guidance", "3.5"),
                     "cfg": ("cfg", "1"), "solver": ("solver", "euler"), "store_dtype": ("store_dtype", "fp32"),
                     "shard": ("shard", "256MiB"), "device": ("device", "cpu"), "out": ("out/", o("c"))}),
        "prune": (["prune", "--model", "{model}", "--stats", "{stats}", "--fraction", "{fraction}", "--layers",
                   "{layers}", "--streams", "{streams}", "--criterion", "{criterion}", "-o", "{out}"],
                  {"model": model_in, "stats": ("in_stats", str(e["stats"])), "fraction": ("fraction", "0.3"),
                   "layers": ("layers", "0-1"), "streams": ("streams", "img,txt"),
                   "criterion": ("criterion", "frequency"), "out": ("out/", o("p"))}),
        "prune-count": (["prune", "--model", "{model}", "--stats", "{stats}", "--count", "{count}", "-o", "{out}"],
                        {"model": model_in, "stats": ("in_stats", str(e["stats"])), "count": ("count", "2"),
                         "out": ("out/", o("p"))}),
        "prune-threshold": (["prune", "--model", "{model}", "--stats", "{stats}", "--threshold", "{threshold}",
                             "--criterion", "{criterion}", "-o", "{out}"],
                            {"model": model_in, "stats": ("in_stats", str(e["stats"])),
                             "threshold": ("threshold", "0.5"), "criterion": ("criterion", "frequency"),
                             "out": ("out/", o("p"))}),
        "distill": (["distill", "--teacher", "{teacher}", "--student", "{student}", "--capture", "{cap}", "--layers",
                     "{layers}", "--train", "{train}", "--steps", "{steps}", "--lr", "{lr}", "--batch", "{batch}",
                     "--holdout", "{holdout}", "--seed", "{seed}", "--device", "{device}", "-o", "{out}"],
                    {"teacher": model_in, "student": ("in_model", str(e["pruned"])), "cap": ("in_cap", str(e["cap"])),
                     "layers": ("layers", "0-1"), "train": ("train", "mlp"), "steps": ("steps", "2"),
                     "lr": ("lr", "0.001"), "batch": ("batch", "2"), "holdout": ("holdout", "0.2"),
                     "seed": ("seed", "0"), "device": ("device", "cpu"), "out": ("out.safetensors", o("d.safetensors"))}),
        "patch apply": (["patch", "apply", "{model}", "{patches}", "-o", "{out}"],
                        {"model": ("in_model", str(e["pruned"])), "patches": ("in_patches", str(e["patches"])),
                         "out": ("out/", o("q"))}),
        "measure": (["measure", "--model", "{model}", "--reference", "{ref}", "--shapes", "{shapes}", "--steps",
                     "{steps}", "--sizes", "{sizes}", "--seed", "{seed}", "--guidance", "{guidance}", "--solver",
                     "{solver}", "--batch", "{batch}", "--device", "{device}", "--dtype", "{dtype}"],
                    {"model": ("in_model", str(e["pruned"])), "ref": model_in, "shapes": ("shapes", "1"),
                     "steps": ("stepspec", "2"), "sizes": ("sizes", "32x32"), "seed": ("seed", "0"),
                     "guidance": ("guidance", "3.5"), "solver": ("solver", "euler"), "batch": ("batch", "2"),
                     "device": ("device", "cpu"), "dtype": ("dtype", "fp32")}),
        "measure-capture": (["measure", "--model", "{model}", "--reference", "{ref}", "--capture", "{cap}"],
                            {"model": ("in_model", str(e["pruned"])), "ref": model_in,
                             "cap": ("in_cap", str(e["cap"]))}),
        "quantize": (["quantize", "--model", "{model}", "--to", "{fmt}", "--layers", "{layers}", "-o", "{out}"],
                     {"model": model_in, "fmt": ("qformat", "Q8_0"), "layers": ("qlayers", "double_blocks.*"),
                      "out": ("out.safetensors", o("q.safetensors"))}),
        "plan": (["plan", "--model", "{model}", "--budget", "{budget}", "--options", "{options}", "--units", "{units}",
                  "--shapes", "{shapes}", "--steps", "{steps}", "--sizes", "{sizes}", "--seed", "{seed}", "-o", "{out}"],
                 {"model": model_in, "budget": ("share", "60%"), "options": ("qoptions", "bf16,Q8_0"),
                  "units": ("units", "block"), "shapes": ("shapes", "1"), "steps": ("stepspec", "1"),
                  "sizes": ("sizes", "32x32"), "seed": ("seed", "0"), "out": ("out.json", o("p.json"))}),
        "sensitivity": (["sensitivity", "--model", "{model}", "--stats", "{stats}", "--level", "{level}", "--shapes",
                         "{shapes}", "--steps", "{steps}", "--sizes", "{sizes}", "--seed", "{seed}", "--guidance",
                         "{guidance}", "--criterion", "{criterion}", "--streams", "{streams}", "--batch", "{batch}",
                         "--png", "{png}", "--json", "{json}"],
                        {"model": model_in, "stats": ("in_stats", str(e["stats"])), "level": ("level", "0.3"),
                         "shapes": ("shapes", "1"), "steps": ("stepspec", "1"), "sizes": ("sizes", "32x32"),
                         "seed": ("seed", "0"), "guidance": ("guidance", "3.5"), "criterion": ("criterion", "frequency"),
                         "streams": ("streams", "img"), "batch": ("batch", "2"), "png": ("out.png", o("s.png")),
                         "json": ("out.json", o("s.json"))}),
    }


def draw(rng, kind, e, here):
    """A value for an option of this kind: mostly bad, a quarter of the time valid."""
    valid_now = rng.random() < 0.25
    if kind.startswith("in_"):
        valid = {"in_model": [str(e["tiny"])], "in_png": [str(e["png"])], "in_stats": [str(e["stats"])],
                 "in_cap": [str(e["cap"])], "in_patches": [str(e["patches"])]}[kind]
        return rng.choice(valid + ["rflow-tiny"] if valid_now else bad_inputs(e, here) + STRINGS[:2])
    if kind.startswith("out"):
        suffix = kind[3:]
        suffix = "" if suffix == "/" else suffix
        return str(here / f"fresh{suffix}") if valid_now else rng.choice(bad_outputs(e, here, suffix))
    if valid_now:
        return rng.choice(VALID[kind])
    pool = []
    if kind in NUMERIC:
        pool += BAD_NUMBERS + NONFINITE[3:]
    pool += SPECIAL_BAD.get(kind, []) + STRINGS
    return rng.choice(pool)


def cases():
    names = ["generate", "eval", "train", "info", "analyze", "stats merge", "stats show", "capture", "prune",
             "prune-count", "prune-threshold", "distill", "patch apply", "measure", "measure-capture", "sensitivity",
             "quantize", "plan"]
    return names


def check(argv, rc, err, nonfinite):
    shown = " ".join(repr(a) for a in argv)
    assert rc in (0, 2), f"rflow {shown}\nexit {rc}\n{err}"
    assert "Traceback" not in err, f"rflow {shown}\n{err}"
    if rc == 2:
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("rflow: warning:")]
        assert len(lines) == 1 and lines[0].startswith("rflow: error:"), f"rflow {shown}\n{err}"
    if nonfinite:
        assert rc != 0, f"rflow {shown}\nnon-finite {nonfinite} accepted (exit 0)\n{err}"


@pytest.mark.parametrize("verb", cases())
def test_random_option_values_give_exit_0_or_one_error_line(capsys, env, tmp_path, verb):
    rng = random.Random(f"{SEED}-{verb}")
    failures = []
    for i in range(DRAWS):
        here = tmp_path / f"draw{i}"
        here.mkdir()
        base, slots = verbs(env, here)[verb]
        chosen = rng.sample(sorted(slots), k=min(len(slots), rng.choice([1, 1, 2, 3])))
        values = {k: v for k, (_, v) in slots.items()}
        nonfinite = []
        for k in chosen:
            kind = slots[k][0]
            values[k] = draw(rng, kind, env, here)
            if kind in NUMERIC and values[k] in NONFINITE:
                nonfinite.append(f"{k}={values[k]}")
        argv = [a.format(**values) if a.startswith("{") else a for a in base]
        if verb == "generate" and values["image"] == str(env["png"]) and "image" not in chosen:
            j = argv.index("--image")  # img2img only when drawn
            del argv[j:j + 2]
            if "strength" not in chosen:
                j = argv.index("--strength")
                del argv[j:j + 2]
        try:
            rc = main(argv)
        except BaseException as exc:  # noqa: BLE001
            cap = capsys.readouterr()
            failures.append(f"rflow {' '.join(repr(a) for a in argv)}\nraised {type(exc).__name__}: {exc}\n{cap.err}")
            continue
        cap = capsys.readouterr()
        if os.environ.get("RFLOW_PROPERTY_SHOW"):
            with capsys.disabled():
                print(f"\n[{verb}] rc={rc} {dict((k, values[k]) for k in chosen)} {cap.err.strip()[-150:]!r}")
        try:
            check(argv, rc, cap.err, nonfinite)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {DRAWS} draws broke the rule:\n\n" + "\n\n".join(failures)


@pytest.mark.parametrize("verb", cases())
def test_base_command_lines_are_valid(capsys, env, tmp_path, verb):
    """The command lines the values are substituted into run as they are, so a refusal means the value."""
    base, slots = verbs(env, tmp_path)[verb]
    values = {k: v for k, (_, v) in slots.items()}
    argv = [a.format(**values) if a.startswith("{") else a for a in base]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 0, f"rflow {' '.join(repr(a) for a in argv)}\n{err}"


@pytest.mark.parametrize("verb", ["generate", "eval", "analyze", "capture", "measure", "sensitivity"])
def test_huge_finite_guidance_is_one_error_line(capsys, env, tmp_path, verb):
    """A finite --guidance beyond float32 (1e308) once passed the finiteness check and crashed in torch."""
    base, slots = verbs(env, tmp_path)[verb]
    values = {k: v for k, (_, v) in slots.items()}
    values["guidance"] = "1e308"
    argv = [a.format(**values) if a.startswith("{") else a for a in base]
    try:
        rc = main(argv)
    except BaseException as exc:  # noqa: BLE001
        capsys.readouterr()
        pytest.fail(f"rflow {' '.join(repr(a) for a in argv)}\nraised {type(exc).__name__}: {exc}")
    check(argv, rc, capsys.readouterr().err, [])
