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
