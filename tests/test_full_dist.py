"""Full training sharded with FSDP2 over 2 gloo processes equals one process; resume of a sharded run."""

import json
from pathlib import Path

import pytest
import torch

from rflow.train.full import TrainConfig, Trainer
from rflow.world import tiny

CFG = dict(steps=3, batch=4, lr=1e-3, warmup=1, checkpoint_every=1, seed=3)


def small_pipe():
    return tiny.build(seed=0, hidden=48, heads=2, depth=1, depth_single=1)


def _rank_main(rank, world, init, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        Trainer(small_pipe(), TrainConfig(**CFG), Path(out), rank=rank, world=world).run(until=2)
        tr = Trainer(small_pipe(), TrainConfig(**CFG), Path(out), rank=rank, world=world)  # a restarted run
        tr.run(resume=True)
        tr.export(Path(out) / "model")
    finally:
        dist.destroy_process_group()


def _state(path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["rflow.train_state"])
    return load_file(str(path)), meta


@pytest.mark.slow  # two fresh processes import torch and transformers
def test_fsdp2_two_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp

    one = Trainer(small_pipe(), TrainConfig(**CFG), tmp_path / "one")
    one.run()
    one.export(tmp_path / "one" / "model")
    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "two")), nprocs=2)
    a, meta_a = _state(tmp_path / "one" / "train_state.safetensors")
    b, meta_b = _state(tmp_path / "two" / "train_state.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
    assert meta_b["step"] == 3
    assert [r["loss"] for r in meta_b["log"]] == pytest.approx([r["loss"] for r in meta_a["log"]], rel=1e-5)
    from safetensors.torch import load_file

    ma = load_file(str(tmp_path / "one" / "model" / "transformer.safetensors"))
    mb = load_file(str(tmp_path / "two" / "model" / "transformer.safetensors"))
    assert ma.keys() == mb.keys()
    for k in ma:
        torch.testing.assert_close(mb[k], ma[k], atol=2e-5, rtol=1e-4)
    # the model changed: training did something that both runs agree on
    start = small_pipe().transformer.state_dict()
    assert any(not torch.equal(ma[k], start[k]) for k in ma if k in start)


@pytest.mark.slow  # torchrun starts two fresh rflow processes
def test_torchrun_full_cli_rank0_writes(tmp_path):
    import os
    import subprocess
    import sys

    from rflow.train.tensorboard import read_events

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("rflow_exit_threads.py")), "train", "--full", "-o", str(run), "--steps", "2", "--batch", "2", "--checkpoint-every", "1"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    if os.path.isdir("/proc/self/task"):  # both ranks freed their process group before shutdown
        assert p.stderr.count("group threads at exit: []") == 2, p.stderr[-3000:]
    assert p.stdout.count(str(run / "model")) == 1  # one rank reports the result
    assert (run / "model" / "transformer.safetensors").is_file() and (run / "train_state.safetensors").is_file()
    boards = list((run / "tensorboard").iterdir())
    assert len(boards) == 1  # rank 0 alone logs
    steps = [e["step"] for e in read_events(boards[0]) if "train/loss" in e["scalars"]]
    assert steps == [1, 2]
