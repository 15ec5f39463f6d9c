"""rflow.distributed: torchrun's environment read and checked before any group starts."""

import pytest

from rflow import distributed
from rflow.cli import main
from rflow.errors import UserError


def test_plain_run_starts_nothing(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.world_from_env() == (0, 1, 0)
    assert distributed.start(None) == (0, 1, False, None)
    distributed.end(False)  # nothing started: nothing to end


@pytest.mark.parametrize("env, fragment", [
    ({"WORLD_SIZE": "two"}, "must be integers"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK 2, WORLD_SIZE 2"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE 0"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK -1"),
])
def test_bad_environment(monkeypatch, capsys, tmp_path, env, fragment):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=fragment):
        distributed.start(None)
    # the CLI says so in one line, before any model loads
    rc = main(["analyze", "--model", str(tmp_path / "absent-but-unread"), "--shapes", "1", "-o", str(tmp_path / "s.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("rflow: error:") and fragment in err and len(err.strip().splitlines()) == 1, err


RANK_SCRIPT = """
import sys, time
import torch
from rflow import distributed
with distributed.group(torch.device("cpu")) as (rank, world, dev):
    if rank == 1:
        raise SystemExit(3)  # this rank fails
    time.sleep(60)  # rank 0 is still at work (a long collective, say)
"""


def test_a_failing_rank_leaves_without_waiting(tmp_path):
    """A rank whose block raised destroys its group and exits at once; waiting at a barrier for peers busy
    elsewhere would hang it (torchrun stops the others when it exits)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env=env, stderr=subprocess.PIPE, text=True))
    try:
        t0 = time.monotonic()
        rc = procs[1].wait(timeout=45)
        assert rc == 3, procs[1].stderr.read()[-2000:]
        assert time.monotonic() - t0 < 45 and procs[0].poll() is None  # rank 1 left while rank 0 still works
    finally:
        for p in procs:
            p.kill()
            p.wait()
