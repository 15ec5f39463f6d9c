"""Structured pruning, saving like the source, and full-stack measurement on a tiny rflow model.

The key proof: pruning, saving and reloading with ``rflow.load`` (no flags) gives exactly the outputs
of the unpruned model with the same units zeroed, for double-block img/txt units and single-block
units, through ``rflow prune`` and through the library.
"""

import json
import zlib

import numpy as np
import pytest
import torch
from safetensors import safe_open

import rflow
from rflow.families.base import Guidance, guided
from rflow.world import tiny
from rflow.checkpoints.flux import CONFIG_METADATA_KEY, FluxCheckpoint, load_flux
from rflow.cli import main
from rflow.compress.measure import measure, reference_trajectories, sensitivity, zeroed
from rflow.compress.prune import KEPT_PREFIX, choose_kept, kept_tensors, prune_model, zero_units
from rflow.compress.save import model_fingerprint, save_transformer_like
from rflow.compress.stats import ActivationStats
from rflow.compress.units import unit_names
from rflow.compress.workload import Workload
from rflow.models.flux import image_ids, text_ids
from rflow.pipeline import save_pipeline

SMALL = dict(hidden=32, heads=2, depth=2, depth_single=2, mlp_ratio=2.0)  # MLP width 64, layers 0-1 double, 2-3 single
WIDTH = 64
DEAD = 32  # single_blocks.1 units 0..31 never fire (input row 0, bias -30: GELU output exactly 0)
POSITIONS = 1000


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_error_line(rc, err, fragment):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rflow: error: "), err
    assert fragment in lines[0], err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An rflow pipeline folder whose every weight matters (tiny.build zero-initialises some)."""
    pipe = tiny.build(seed=3, **SMALL)
    g = torch.Generator().manual_seed(0)
    m = pipe.transformer
    with torch.no_grad():
        for block in m.double_blocks:
            for lin in (block.img_mod.lin, block.txt_mod.lin):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
        for block in m.single_blocks:
            lin = block.modulation.lin
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
        for lin in (m.final_layer.linear, m.final_layer.adaLN_modulation[1]):  # outputs of order 0.3
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.05)
        for mlp in [b.img_mlp for b in m.double_blocks] + [b.txt_mlp for b in m.double_blocks]:
            mlp[0].bias.copy_(torch.randn(mlp[0].bias.shape, generator=g) * 0.3)
        dead = m.single_blocks[1]
        h = dead.hidden_size
        dead.linear1.weight[3 * h : 3 * h + DEAD] = 0
        dead.linear1.bias[3 * h : 3 * h + DEAD] = -30.0
    d = tmp_path_factory.mktemp("prune") / "tiny"
    save_pipeline(pipe, d, dtype=torch.float32)
    return d


@pytest.fixture(scope="module")
def base(model_dir):
    return rflow.load(model_dir, device="cpu")


def make_stats(config, fingerprint, fill) -> ActivationStats:
    st = ActivationStats.empty(config, fingerprint, prompts=4, steps=[2], sizes=[[64, 64]])
    for u in st.units:
        st.positions[u] = POSITIONS
        fill(u, st)
    return st


def random_fill(u, st):
    """Distinct random counts; single_blocks.1's dead units never fired."""
    rng = np.random.default_rng(zlib.crc32(u.encode()))
    st.count[u] = torch.from_numpy(rng.permutation(POSITIONS)[:WIDTH].astype(np.int64) + 1)
    st.sum_abs[u] = st.count[u].double() * 0.1
    st.sum_sq[u] = st.count[u].double() * 0.01
    if u == "single_blocks.1":
        st.count[u][:DEAD] = 0
        st.sum_abs[u][:DEAD] = 0


@pytest.fixture(scope="module")
def stats_file(base, model_dir, tmp_path_factory):
    st = make_stats(base.transformer.config, base.fingerprint, random_fill)
    p = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    st.save(p)
    return p


def forward_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, S = 2, 64, 7
    return (torch.randn(B, L, cfg.in_channels, generator=g), image_ids(16, 16), torch.randn(B, S, cfg.context_in_dim, generator=g),
            text_ids(S), torch.tensor([0.9, 0.3]), torch.randn(B, cfg.vec_in_dim, generator=g), torch.tensor([3.5, 3.5]))


def assert_pruned_equals_zeroed(pruned_dir, model_dir, kept, dtype=torch.float32):
    """Outputs of the reloaded pruned model == outputs of the original with the same units zeroed:
    transformer outputs to 1e-6 (float32) or 1e-12 (float64), and final latents of the float32
    sampler to 1e-6 relative to their scale."""
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    pruned = rflow.load(pruned_dir, device="cpu", dtype=dtype)  # no other flags: widths from the shapes
    ref = rflow.load(model_dir, device="cpu", dtype=dtype)
    full = rflow.load(model_dir, device="cpu", dtype=dtype).transformer
    zero_units(ref.transformer, kept)
    x = [t.to(dtype) if t.is_floating_point() else t for t in forward_inputs(ref.transformer.config)]
    with torch.no_grad():
        a, b = pruned.transformer(*x), ref.transformer(*x)
        assert (a - b).abs().max() <= tol
        assert (full(*x) - b).abs().max() > 1e-3  # the zeroed units did matter
    kw = dict(steps=2, seed=1, output_type="latent")
    prompt = "a large red circle on the left on a white background"
    la, lb = pruned.generate(prompt, **kw), ref.generate(prompt, **kw)
    assert (la - lb).abs().max() <= 1e-6 * lb.abs().max()
    return pruned


def read_saved(path):
    with safe_open(str(path), framework="pt") as f:
        kept = {k[len(KEPT_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(KEPT_PREFIX)}
        return kept, f.metadata()


# ---------------------------------------------------------------------------------------------- prune


def test_cli_prune_reload_equals_zeroed(capsys, model_dir, stats_file, base, tmp_path):
    out = tmp_path / "pruned"
    rc, stdout, err = cli(capsys, "prune", "--model", model_dir, "--stats", stats_file, "--fraction", "0.25", "-o", out)
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert lines[-1] == str(out)
    n_groups = len(unit_names(base.transformer.config))
    assert sum(ln.startswith(("double_blocks.", "single_blocks.")) for ln in lines) == n_groups
    assert f"units removed: {16 * n_groups} of {WIDTH * n_groups}" in stdout
    before, after = (int(v.replace(",", "")) for v in next(ln for ln in lines if ln.startswith("parameters:")).split()[1:4:2])
    assert after < before

    cfg = rflow.load(out).transformer.config  # no flags: widths come from the shapes
    assert cfg.double_mlp == [(48, 48)] * 2 and cfg.single_mlp == [48, 48]
    assert (out / "rflow_pipeline.json").exists() and (out / "text_encoder_2").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no temporary leftovers

    stats = ActivationStats.load(stats_file)
    expected = choose_kept(stats, unit_names(base.transformer.config), fraction=0.25)
    kept, meta = read_saved(out / "transformer.safetensors")
    assert kept.keys() == expected.keys()
    for u in expected:
        assert torch.equal(kept[u], expected[u])
    rec = json.loads(meta["rflow.pruning"])
    assert rec["stats_fingerprint"] == base.fingerprint and rec["mode"] == "fraction" and rec["value"] == 0.25
    assert rec["criterion"] == "frequency" and rec["units_removed"] == 16 * n_groups
    assert rec["groups"]["double_blocks.1.txt"] == {"width": 64, "kept": 48, "removed": 16}
    assert rec["parameters_before"] == before and rec["parameters_after"] == after
    assert json.loads(meta[CONFIG_METADATA_KEY])["axes_dim"] == list(base.transformer.config.axes_dim)
    assert_pruned_equals_zeroed(out, model_dir, expected)
    assert_pruned_equals_zeroed(out, model_dir, expected, torch.float64)


def test_library_prune_restricted_layers_and_streams(model_dir, stats_file, tmp_path):
    from rflow.compress.units import select_units

    model, _ = load_flux(model_dir / "transformer.safetensors")
    stats = ActivationStats.load(stats_file)
    units = select_units(model.config, layers="1-2", streams="txt,single")
    assert units == ["double_blocks.1.txt", "single_blocks.0"]
    kept = choose_kept(stats, units, fraction=0.5)
    prune_model(model, kept)
    saved = save_transformer_like(model_dir, model, tmp_path / "lib", extra_tensors=kept_tensors(kept),
                                  metadata={"rflow.pruning": {"note": "library"}})
    cfg = assert_pruned_equals_zeroed(saved.path, model_dir, kept).transformer.config
    assert cfg.double_mlp == [(64, 64), (64, 32)] and cfg.single_mlp == [32, 64]
    assert read_saved(saved.path / "transformer.safetensors")[0].keys() == set(units)


def test_cli_layers_streams_and_single_file_source(capsys, model_dir, stats_file, tmp_path):
    """A BFL single file stays a BFL single file; --layers/--streams restrict the pruned groups."""
    import shutil

    src = tmp_path / "transformer.safetensors"
    shutil.copy(model_dir / "transformer.safetensors", src)  # same name and bytes: same fingerprint as the pipeline
    out = tmp_path / "pruned.safetensors"
    rc, stdout, err = cli(capsys, "prune", "--model", src, "--stats", stats_file, "--count", "500",
                          "--layers", "0,3", "--streams", "img,single", "-o", out)
    assert rc == 0, err
    kept, meta = read_saved(out)
    assert set(kept) == {"double_blocks.0.img", "single_blocks.1"}
    stats = ActivationStats.load(stats_file)
    for u, k in kept.items():
        assert torch.equal(k, torch.nonzero(stats.count[u] >= 500).flatten())
    model, _ = load_flux(out)
    widths = [len(kept["double_blocks.0.img"]), len(kept["single_blocks.1"])]
    assert model.config.double_mlp == [(widths[0], 64), (64, 64)] and model.config.single_mlp == [64, widths[1]]
    ref, _ = load_flux(src)
    zero_units(ref, kept)
    x = forward_inputs(ref.config, seed=2)
    with torch.no_grad():
        assert (model(*x) - ref(*x)).abs().max() <= 1e-6
    # the source is never overwritten
    rc, _, err = cli(capsys, "prune", "--model", src, "--stats", stats_file, "--fraction", "0.1", "-o", src)
    assert_one_error_line(rc, err, "refusing to write over")


def test_diffusers_pipeline_source_becomes_a_bfl_file(capsys, tmp_path):
    from pipeline_ref import SIZE, tiny_pipeline

    root = tmp_path / "diffusers"
    tiny_pipeline().save_pretrained(root)
    with FluxCheckpoint(root) as ck:
        cfg = ck.config

    def fill(u, st):
        st.count[u] = torch.randperm(st.count[u].numel(), generator=torch.Generator().manual_seed(len(u)))

    stats = tmp_path / "stats.safetensors"
    make_stats(cfg, model_fingerprint(root), fill).save(stats)
    out = tmp_path / "pruned.safetensors"
    rc, stdout, err = cli(capsys, "prune", "--model", root, "--stats", stats, "--fraction", "0.5", "-o", out)
    assert rc == 0, err
    assert f"--vae {root / 'vae'} --text-encoders {root}" in stdout and stdout.strip().endswith(str(out))
    kept, meta = read_saved(out)
    assert set(kept) == set(unit_names(cfg)) and CONFIG_METADATA_KEY in meta
    pruned = rflow.load(out, vae=root / "vae", text_encoders=root, device="cpu")
    ref = rflow.load(root, device="cpu")
    zero_units(ref.transformer, kept)
    kw = dict(width=SIZE[0], height=SIZE[1], steps=2, seed=3, output_type="latent")
    la, lb = pruned.generate("a red cat", **kw), ref.generate("a red cat", **kw)
    assert (la - lb).abs().max() <= 1e-6 * lb.abs().max()


def test_ties_break_by_index_and_modes(base):
    cfg = base.transformer.config

    def equal(u, st):
        st.count[u][:] = 5
        st.sum_abs[u][:] = 1.0

    st = make_stats(cfg, base.fingerprint, equal)
    a = choose_kept(st, st.units, fraction=0.25)
    b = choose_kept(st, st.units, fraction=0.25)
    for u in st.units:
        assert torch.equal(a[u], torch.arange(16, WIDTH)) and torch.equal(a[u], b[u])  # lower index removed first

    def ramp(u, st):
        st.count[u] = torch.arange(WIDTH, dtype=torch.int64) * 10  # frequency rises with the index
        st.sum_abs[u] = torch.arange(WIDTH, 0, -1, dtype=torch.float64) * 10  # magnitude falls with it

    st = make_stats(cfg, base.fingerprint, ramp)
    u = "double_blocks.0.img"
    assert torch.equal(choose_kept(st, [u], count=100)[u], torch.arange(10, WIDTH))  # fired at < 100 positions
    assert torch.equal(choose_kept(st, [u], threshold=0.2)[u], torch.arange(20, WIDTH))  # frequency < 0.2
    assert torch.equal(choose_kept(st, [u], fraction=0.25)[u], torch.arange(16, WIDTH))
    by_mag = choose_kept(st, [u], fraction=0.25, criterion="magnitude")[u]
    assert torch.equal(by_mag, torch.arange(0, WIDTH - 16))  # the other end


def test_cli_criterion_changes_the_choice(capsys, base, model_dir, tmp_path):
    def ramp(u, st):
        st.count[u] = torch.arange(WIDTH, dtype=torch.int64) * 10
        st.sum_abs[u] = torch.arange(WIDTH, 0, -1, dtype=torch.float64) * 10

    p = tmp_path / "ramp.safetensors"
    make_stats(base.transformer.config, base.fingerprint, ramp).save(p)
    outs = {}
    for crit in ("frequency", "magnitude"):
        out = tmp_path / crit
        rc, _, err = cli(capsys, "prune", "--model", model_dir, "--stats", p, "--threshold", "0.2", "--criterion", crit,
                         "--layers", "2", "-o", out)
        assert rc == 0, err
        outs[crit] = read_saved(out / "transformer.safetensors")[0]["single_blocks.0"]
    assert torch.equal(outs["frequency"], torch.arange(20, WIDTH))  # frequency i/100 < 0.2: units 0-19 go
    assert torch.equal(outs["magnitude"], torch.arange(0, 45))  # mean |a| (64 - i)/100 < 0.2: units 45-63 go


@pytest.mark.parametrize("case", ["fingerprint", "corrupt", "not-stats", "two-modes", "bad-layers", "into-source"])
def test_prune_errors_are_one_line(capsys, case, base, model_dir, stats_file, tmp_path):
    stats, extra, fragment, out = stats_file, ["--fraction", "0.2"], None, tmp_path / "p"
    if case == "fingerprint":
        stats = tmp_path / "other.safetensors"
        make_stats(base.transformer.config, "0123456789abcdef", random_fill).save(stats)
        fragment = "collected on model 0123456789abcdef"
    elif case == "corrupt":
        stats = tmp_path / "corrupt.safetensors"
        data = stats_file.read_bytes()
        stats.write_bytes(data[: len(data) // 2])
        fragment = "corrupt"
    elif case == "not-stats":
        stats = model_dir / "transformer.safetensors"
        fragment = "not an rflow statistics file"
    elif case == "two-modes":
        extra, fragment = ["--fraction", "0.2", "--count", "3"], "exactly one of"
    elif case == "bad-layers":
        extra, fragment = ["--fraction", "0.2", "--layers", "0-9"], "outside 0-3"
    else:
        out, fragment = model_dir / "pruned", "refusing to write over or inside the source"
    rc, _, err = cli(capsys, "prune", "--model", model_dir, "--stats", stats, *extra, "-o", out)
    assert_one_error_line(rc, err, fragment)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------------------------------------- measure


@pytest.fixture(scope="module")
def pruned_dir(model_dir, stats_file, tmp_path_factory):
    from rflow.compress.checkpoint_ops import prune_checkpoint

    out = tmp_path_factory.mktemp("pruned") / "half"
    prune_checkpoint(model_dir, stats_file, out, fraction=0.5)
    return out


def test_measure_self_is_zero_and_pruned_is_not(capsys, model_dir, pruned_dir):
    common = ["--reference", model_dir, "--shapes", "3", "--steps", "2", "--sizes", "64x64,32x32", "--seed", "1", "--json"]  # seed 1: both sizes
    rc, out, err = cli(capsys, "measure", "--model", model_dir, *common)
    assert rc == 0, err
    same = json.loads(out)
    assert same["velocity_mse"] == 0.0 and same["latent_mse"] == 0.0 and same["velocity_rel_mse"] == 0.0
    assert same["velocity_evaluations"] == 3 * 2 and same["runs"] == 3
    assert same["adherence_model"] == same["adherence_reference"]

    rc, out, err = cli(capsys, "measure", "--model", pruned_dir, *common)
    assert rc == 0, err
    diff = json.loads(out)
    assert diff["velocity_mse"] > 0 and diff["latent_mse"] > 0 and diff["velocity_rel_mse"] > 0
    assert "adherence_model" in diff and diff["model_fingerprint"] != diff["reference_fingerprint"]

    rc, out, err = cli(capsys, "measure", "--model", pruned_dir, *common[:-1])  # the human-readable form
    assert rc == 0 and "velocity MSE" in out and "adherence" in out


def test_measure_library_follows_the_reference_trajectory(base, pruned_dir):
    """Velocities are compared at the reference's own x_t; its final latents are generate()'s."""
    work = Workload(["a small blue square at the top on a black background"] * 2 + ["a red cat"], [(64, 64), (32, 32)],
                    [2, 3], seed=4, source="test")
    trajs = reference_trajectories(base, work, batch=2)
    for t in trajs:
        assert len(t.points) == t.steps * 1 and t.final.shape[0] == len(t.runs)
        for r, lat in zip(t.runs, t.final):
            g = base.generate(r.prompt, width=r.width, height=r.height, steps=r.steps, seed=r.seed, output_type="latent")
            torch.testing.assert_close(g[0], lat, atol=1e-6, rtol=0)
    pruned = rflow.load(pruned_dir, device="cpu")
    res = measure(pruned, base, work, trajectories=trajs)
    assert res["velocity_mse"] > 0 and res["runs"] == 3 and "adherence_model" not in res  # "a red cat": no adherence
    # by hand: the pruned velocity at the reference's first point
    t0 = trajs[0]
    x, t, v_ref = t0.points[0]
    v = guided(pruned.denoiser, t0.cond, None, Guidance())(x, t)
    assert res["velocity_mse_max"] >= float((v - v_ref).pow(2).flatten(1).mean(1).max()) > 0


def test_measure_errors(capsys, model_dir, tmp_path):
    rc, _, err = cli(capsys, "measure", "--model", model_dir, "--reference", model_dir, "--shapes", "1", "--prompts",
                     tmp_path / "p.txt")
    assert_one_error_line(rc, err, "give one of")
    rc, _, err = cli(capsys, "measure", "--model", model_dir, "--reference", tmp_path / "missing", "--shapes", "1")
    assert_one_error_line(rc, err, "no such file")


def test_measure_from_a_capture_matches_the_prompt_path(capsys, base, model_dir, pruned_dir, tmp_path):
    from rflow.compress.capture import capture
    from rflow.compress.workload import make_workload

    work = make_workload(shapes_n=2, steps="2", seed=0, default_size=base.default_size)
    capture(base, work, tmp_path / "cap", in_out_only=True, budget_bytes=10**8)
    common = ["--reference", model_dir, "--json"]
    rc, out, err = cli(capsys, "measure", "--model", pruned_dir, *common, "--capture", tmp_path / "cap")
    assert rc == 0, err
    from_capture = json.loads(out)
    rc, out, err = cli(capsys, "measure", "--model", pruned_dir, *common, "--shapes", "2", "--steps", "2")
    from_prompts = json.loads(out)
    assert from_capture["velocity_evaluations"] == from_prompts["velocity_evaluations"] == 4
    assert from_capture["velocity_mse"] == pytest.approx(from_prompts["velocity_mse"], rel=1e-5)
    assert from_capture["velocity_mse"] > 0
    rc, out, err = cli(capsys, "measure", "--model", model_dir, *common, "--capture", tmp_path / "cap")
    assert rc == 0 and json.loads(out)["velocity_mse"] < 1e-12
    rc, out, err = cli(capsys, "measure", "--model", model_dir, "--reference", pruned_dir, "--capture", tmp_path / "cap")
    assert_one_error_line(rc, err, "not from the reference")


# ---------------------------------------------------------------------------------------------- sensitivity


def test_sensitivity_table_png_and_dead_layer(capsys, model_dir, stats_file, tmp_path):
    png, js = tmp_path / "sens.png", tmp_path / "sens.json"
    rc, out, err = cli(capsys, "sensitivity", "--model", model_dir, "--stats", stats_file, "--level", "0.5",
                       "--shapes", "2", "--steps", "2", "--png", png, "--json", js)
    assert rc == 0, err
    rows = [ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layers = json.loads(js.read_text())["layers"]
    assert [r["layer"] for r in layers] == [0, 1, 2, 3] and [r["kind"] for r in layers] == ["double"] * 2 + ["single"] * 2
    assert layers[0]["zeroed"] == 64 and layers[3]["zeroed"] == 32  # double layers: img and txt groups
    assert layers[3]["velocity_mse"] < 1e-12  # its zeroed units never fired
    assert all(r["velocity_mse"] > 1e-8 for r in layers[:3])


def test_sensitivity_restores_weights_and_zeroing_equals_pruning(base, model_dir, stats_file):
    stats = ActivationStats.load(stats_file)
    before = {k: v.clone() for k, v in base.transformer.state_dict().items()}
    work = Workload(["a large green triangle on the right on a white background"], [(64, 64)], [2], source="shapes")
    res = sensitivity(base, stats, work, level=0.25, streams="txt,single")
    assert [len(r["groups"]) for r in res["layers"]] == [1, 1, 1, 1]
    for k, v in base.transformer.state_dict().items():
        assert torch.equal(v, before[k]), k
    kept = choose_kept(stats, ["single_blocks.0"], fraction=0.25)
    x = forward_inputs(base.transformer.config, seed=5)
    with torch.no_grad(), zeroed(base.transformer, kept):
        z = base.transformer(*x)
    model, _ = load_flux(model_dir / "transformer.safetensors")
    prune_model(model, kept)
    with torch.no_grad():
        assert (model(*x) - z).abs().max() <= 1e-6
