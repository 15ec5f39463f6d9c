"""rflow analyze: firing counts and sums per MLP unit, --append / merge, multi-process, reports, the CLI.

Everything runs on a tiny random rflow-tiny pipeline (hidden 32, one double and one single block,
64 units per group; 64×64 images = 64 image tokens, 24 text tokens).
"""

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from rflow.world import tiny
from rflow.cli import main
from rflow.compress.analyze import ActivationCounter, accumulate, analyze
from rflow.compress.calibration import calibration_prompts
from rflow.compress.report import frequency_quantiles, heatmap_matrix, summary
from rflow.compress.stats import SCHEMA, ActivationStats
from rflow.compress.units import activation_module, select_units, unit_names, unit_widths
from rflow.compress.workload import Workload, make_workload
from rflow.errors import UserError
from rflow.models.flux import Flux, FluxConfig
from rflow.pipeline import load, save_pipeline

IMG, TXT = 64, 24  # tokens per image / prompt of the tiny pipeline at its native 64×64
TINY = dict(hidden=32, heads=2, depth=1, depth_single=1, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("analyze") / "tiny"
    save_pipeline(tiny.build(0, **TINY), d, dtype=torch.float32)
    return d


@pytest.fixture(scope="module")
def pipe(model_dir):
    return load(model_dir, device="cpu")


def workload(n=1, steps=2, seed=0, pipe_size=(64, 64)):
    return Workload(calibration_prompts(n, seed=seed), [pipe_size], [steps], seed=seed, source="test")


def hooks_left(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error_line(rc, err, fragment):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rflow: error: "), err
    assert fragment in lines[0], err


def assert_same(a: ActivationStats, b: ActivationStats):
    assert a.units == b.units and a.fingerprint == b.fingerprint
    for u in a.units:
        assert torch.equal(a.count[u], b.count[u]), u
        assert torch.equal(a.sum_abs[u], b.sum_abs[u]), u
        assert torch.equal(a.sum_sq[u], b.sum_sq[u]), u
        assert a.positions[u] == b.positions[u], u


# ---------------------------------------------------------------------------------------------------
# Counting


def test_counts_of_a_hand_built_model(pipe):
    """Zero MLP input weights and chosen biases: every token gives unit j the activation gelu(b_j), so
    counts, Σ|a| and Σa² are known exactly; positions = tokens × steps × passes (cfg > 1 adds one)."""
    p = copy.deepcopy(pipe)
    model = p.transformer
    hidden = model.config.hidden_size
    bias = {u: torch.linspace(-2.0, 2.0, w) + 0.01 * (k + 1) for k, (u, w) in enumerate(unit_widths(model.config).items())}
    with torch.no_grad():
        for lin, u in ((model.double_blocks[0].img_mlp[0], "double_blocks.0.img"),
                       (model.double_blocks[0].txt_mlp[0], "double_blocks.0.txt")):
            lin.weight.zero_()
            lin.bias.copy_(bias[u])
        lin1 = model.single_blocks[0].linear1
        lin1.weight[3 * hidden:].zero_()
        lin1.bias[3 * hidden:].copy_(bias["single_blocks.0"])
    tokens = {"double_blocks.0.img": IMG, "double_blocks.0.txt": TXT, "single_blocks.0": IMG + TXT}
    for cfg, passes in ((1.0, 1), (2.0, 2)):
        stats = analyze(p, workload(n=2, steps=3), cfg=cfg)
        for u, b in bias.items():
            n = tokens[u] * 3 * 2 * passes  # tokens × steps × prompts × passes
            assert stats.positions[u] == n
            v = F.gelu(b, approximate="tanh").double()
            assert (b > 0).any() and (b < 0).any()
            assert torch.equal(stats.count[u], torch.where(b > 0, n, 0).long())
            assert torch.equal(stats.sum_abs[u], n * v.abs())
            torch.testing.assert_close(stats.sum_sq[u], n * v * v, rtol=1e-14, atol=0)
        assert stats.meta["cfg"] == cfg and stats.meta["prompts"] == 2 and stats.meta["steps"] == [3]


def test_counts_match_stored_activations(pipe):
    """The random model, checked against independent hooks that keep every activation."""
    units = unit_names(pipe.transformer.config)
    seen = {u: [] for u in units}
    handles = [activation_module(pipe.transformer, u).register_forward_hook(
        lambda _m, _i, o, u=u: seen[u].append(o.detach().reshape(-1, o.shape[-1]).clone())) for u in units]
    w = workload(n=2, steps=2)
    try:
        for run in w.runs():
            pipe.generate(run.prompt, width=run.width, height=run.height, steps=run.steps, seed=run.seed,
                          output_type="latent")
    finally:
        for h in handles:
            h.remove()
    stats = analyze(pipe, w)
    assert hooks_left(pipe.transformer) == 0
    for u in units:
        a = torch.cat(seen[u]).double()
        assert stats.positions[u] == a.shape[0] == {"double_blocks.0.img": IMG, "double_blocks.0.txt": TXT}.get(u, IMG + TXT) * 4
        assert torch.equal(stats.count[u], (a > 0).sum(0))
        assert 0 < int(stats.count[u].sum()) < a.numel()  # a real mix of signs
        torch.testing.assert_close(stats.sum_abs[u], a.abs().sum(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(stats.sum_sq[u], (a * a).sum(0), rtol=1e-12, atol=0)
    assert stats.meta["model"] == pipe.name and stats.fingerprint == pipe.fingerprint and stats.fingerprint
    assert stats.meta["sizes"] == ["64x64"] and stats.meta["source"] == "test"


def test_hooks_removed_on_error_and_units_subset(pipe):
    def boom(done, total, run):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        analyze(pipe, workload(), progress=boom)
    assert hooks_left(pipe.transformer) == 0
    units = select_units(pipe.transformer.config, layers="1")
    stats = analyze(pipe, workload(steps=1), units=units)
    assert stats.units == ["single_blocks.0"] and stats.positions["single_blocks.0"] == IMG + TXT
    with pytest.raises(UserError, match="multiple of"):
        analyze(pipe, Workload(["a"], [(60, 64)], [1]))


def test_append_and_merge_are_exact_sums(pipe, tmp_path):
    a = analyze(pipe, workload(n=1, seed=0))
    b = analyze(pipe, workload(n=2, seed=1, steps=1))
    both = analyze(pipe, workload(n=2, seed=1, steps=1), stats=copy.deepcopy(a))
    for u in a.units:
        assert torch.equal(both.count[u], a.count[u] + b.count[u])
        assert torch.equal(both.sum_abs[u], a.sum_abs[u] + b.sum_abs[u])
        assert torch.equal(both.sum_sq[u], a.sum_sq[u] + b.sum_sq[u])
        assert both.positions[u] == a.positions[u] + b.positions[u]
    assert both.meta["prompts"] == 3 and both.meta["steps"] == [1, 2] and len(both.meta["history"]) == 2
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    merged = accumulate(ActivationStats.load(tmp_path / "a.safetensors"), ActivationStats.load(tmp_path / "b.safetensors"))
    assert_same(merged, both)
    other = copy.deepcopy(a)
    other.fingerprint = "0123456789abcdef"
    with pytest.raises(UserError, match="different model"):
        analyze(pipe, workload(), stats=other)  # refused before sampling


# ---------------------------------------------------------------------------------------------------
# Multi-process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXIT_THREADS = os.path.join(os.path.dirname(__file__), "rflow_exit_threads.py")  # rflow ARGS, then the live group threads


def test_two_processes_equal_one(model_dir, pipe, tmp_path):
    """`rflow analyze` under torchrun's environment (2 ranks, gloo) writes exactly the single-process result,
    and every rank frees its process group before the interpreter shuts down: a group left to interpreter
    shutdown (kept alive by torch.distributed.nn's defaults when imported after the group started) aborted
    now and then with "terminate called without an active exception"."""
    out = tmp_path / "dist.safetensors"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, EXIT_THREADS, "analyze", "--model", str(model_dir), "--shapes", "2", "--steps", "2",
             "--device", "cpu", "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (o, e) in zip(procs, results):
        assert p.returncode == 0, e[-3000:]
        assert "terminate called" not in e and "Traceback" not in e, e[-3000:]
        if os.path.isdir("/proc/self/task"):  # Linux: the group's threads are gone before shutdown
            assert "group threads at exit: []" in e, e[-3000:]
    assert str(out) in results[0][0] and not results[1][0].strip()  # rank 0 alone writes and reports

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers, so every matmul runs the same way
    try:
        single = analyze(pipe, make_workload(shapes_n=2, steps="2", default_size=pipe.default_size))
    finally:
        torch.set_num_threads(threads)
    dist = ActivationStats.load(out)
    assert_same(dist, single)
    assert dist.meta["prompts"] == 2 and dist.meta["history"][0]["processes"] == 2


# ---------------------------------------------------------------------------------------------------
# Full-size layout


def test_flux1_dev_layout():
    cfg = FluxConfig.flux1_dev()
    with torch.device("meta"):
        model = Flux(cfg)
    double = select_units(cfg, layers="0-18")
    assert len(double) == 38 and sum(unit_widths(cfg)[u] for u in double) == 466_944
    assert ActivationStats.empty(cfg, "x").total_units() == 933_888
    with ActivationCounter(model) as counter:
        assert len(counter.handles) == 19 * 2 + 38
        modules = {id(activation_module(model, u)) for u in counter.units}
        assert len(modules) == 76 and all(isinstance(activation_module(model, u), torch.nn.GELU) for u in counter.units)
        assert sum(c.numel() for c in counter.count.values()) == 933_888
        # one 1024² step of a single block: 512 text + 4096 image tokens × 12288 units, in chunks
        counter.observe("single_blocks.0", torch.empty(1, 4608, 12288, device="meta"))
        assert counter.positions["single_blocks.0"] == 4608
    assert hooks_left(model) == 0


# ---------------------------------------------------------------------------------------------------
# Calibration prompts


def test_calibration_prompts():
    p = calibration_prompts(1000, seed=0)
    assert p == calibration_prompts(1000, seed=0) and p[:50] == calibration_prompts(50, seed=0)
    assert len(set(p)) == 1000
    assert calibration_prompts(20, seed=1) != p[:20]
    quoted = sum('"' in x for x in p) / len(p)
    assert 0.15 <= quoted <= 0.25
    text = " ".join(p).lower()
    for word in ("photo", "oil painting", "watercolour", "3d render", "pixel art", "anime", "line drawing",
                 "close-up", "aerial view", "portrait", "still life"):
        assert word in text, word
    assert all(5 <= len(x.split()) <= 80 for x in p)


# ---------------------------------------------------------------------------------------------------
# Reports


def test_report_quantiles_and_heatmap_layout(pipe):
    q = frequency_quantiles(torch.arange(101, dtype=torch.float64) / 100)
    assert q["min"] == 0 and q["max"] == 1 and abs(q["50%"] - 0.5) < 1e-12 and abs(q["10%"] - 0.1) < 1e-12
    stats = ActivationStats.empty(FluxConfig(hidden_size=32, num_heads=2, axes_dim=(4, 6, 6), double_mlp=[(8, 300)],
                                             single_mlp=[4]), "x")
    stats.count["double_blocks.0.txt"] = torch.arange(300)
    stats.positions["double_blocks.0.txt"] = 299
    stats.count["single_blocks.0"] = torch.tensor([3, 0, 1, 2])
    stats.positions["single_blocks.0"] = 3
    rows = summary(stats)
    assert [r["unit"] for r in rows] == ["double_blocks.0.img", "double_blocks.0.txt", "single_blocks.0"]
    assert [r["layer"] for r in rows] == [0, 0, 1]
    assert rows[1]["never"] == 1 and rows[1]["max"] == 1.0 and rows[0]["positions"] == 0
    m, labels = heatmap_matrix(stats, columns=100)
    assert m.shape == (3, 100) and labels == [r["unit"] for r in rows]
    assert torch.isnan(m[0]).all()  # no positions seen
    assert (m[1].diff() > 0).all() and abs(float(m[1].mean()) - 0.5) < 1e-9  # 3 sorted units per column
    assert torch.equal(m[2][:25], torch.zeros(25, dtype=torch.float64)) and float(m[2][-1]) == 1.0


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_analyze_show_merge_append(model_dir, tmp_path, capsys):
    s1, s2, s3 = (tmp_path / f"s{i}.safetensors" for i in (1, 2, 3))
    base = ["analyze", "--model", model_dir, "--shapes", "3", "--steps", "2"]
    rc, out, err = cli(capsys, *base, "-o", s1)
    assert rc == 0, err
    assert str(s1) in out
    stats = ActivationStats.load(s1)
    assert stats.meta["prompts"] == 3 and stats.positions["double_blocks.0.img"] == IMG * 2 * 3
    assert stats.meta["source"] == "shapes"

    png = tmp_path / "h.png"
    rc, out, err = cli(capsys, "stats", "show", s1, "--heatmap", png)
    assert rc == 0, err
    assert "double_blocks.0.txt" in out and "single_blocks.0" in out and "never" in out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    rc, out, _ = cli(capsys, "stats", "show", s1, "--json")
    info = json.loads(out)
    assert info["totals"]["units"] == 192 and [g["unit"] for g in info["groups"]][-1] == "single_blocks.0"

    rc, _, err = cli(capsys, *base, "-o", s1)
    one_error_line(rc, err, "--append")
    rc, _, err = cli(capsys, *base, "--append", "-o", tmp_path / "missing.safetensors")
    one_error_line(rc, err, "no such statistics file")
    rc, _, err = cli(capsys, *base, "--calibration", "4", "-o", s3)
    one_error_line(rc, err, "--calibration")

    rc, _, err = cli(capsys, *base, "--seed", "1", "-o", s2)
    assert rc == 0, err
    merged = tmp_path / "m.safetensors"
    rc, _, err = cli(capsys, "stats", "merge", s1, s2, "-o", merged)
    assert rc == 0, err
    rc, _, err = cli(capsys, *base, "--seed", "1", "--append", "-o", s1)
    assert rc == 0, err
    appended, m = ActivationStats.load(s1), ActivationStats.load(merged)
    assert_same(appended, m)
    a, b = stats, ActivationStats.load(s2)
    for u in a.units:
        assert torch.equal(m.count[u], a.count[u] + b.count[u]) and m.positions[u] == a.positions[u] + b.positions[u]
    assert m.meta["prompts"] == 6

    rc, _, err = cli(capsys, "stats", "merge", s1, s2, "-o", merged)
    one_error_line(rc, err, "already exists")
    other = ActivationStats.load(s2)
    other.fingerprint = "0123456789abcdef"
    other.save(s3)
    rc, _, err = cli(capsys, "stats", "merge", s2, s3, "-o", tmp_path / "x.safetensors")
    one_error_line(rc, err, "different models")
    assert not (tmp_path / "x.safetensors").exists()
    rc, _, err = cli(capsys, *base, "--append", "-o", s3)
    one_error_line(rc, err, "different model")


def test_bad_stats_files_are_one_line_errors(tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    cfg = FluxConfig(hidden_size=32, num_heads=2, axes_dim=(4, 6, 6), double_mlp=[(8, 8)], single_mlp=[8])
    ActivationStats.empty(cfg, "x", prompts=0).save(good)
    data = good.read_bytes()
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[SCHEMA])
    cases = {"random.safetensors": os.urandom(512), "short.safetensors": data[:4],
             "truncated.safetensors": data[: len(data) - 40]}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    save_file(tensors, tmp_path / "plain.safetensors")  # no rflow.stats metadata
    save_file(tensors, tmp_path / "future.safetensors", {SCHEMA: json.dumps({**meta, "version": 99})})
    save_file(tensors, tmp_path / "badjson.safetensors", {SCHEMA: "{not json"})
    save_file({k: v for k, v in tensors.items() if not k.endswith("sum_sq")}, tmp_path / "missing.safetensors",
              {SCHEMA: json.dumps(meta)})
    for name in (*cases, "plain.safetensors", "future.safetensors", "badjson.safetensors", "missing.safetensors"):
        rc, _, err = cli(capsys, "stats", "show", tmp_path / name)
        one_error_line(rc, err, name)
        rc, _, err = cli(capsys, "stats", "merge", good, tmp_path / name, "-o", tmp_path / "out.safetensors")
        one_error_line(rc, err, name)
    assert not (tmp_path / "out.safetensors").exists()
    rc, _, err = cli(capsys, "stats", "show", good, "--heatmap", tmp_path / "h.jpg")
    one_error_line(rc, err, ".png")
