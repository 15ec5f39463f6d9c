"""What both trainers' checkpoints share (:mod:`.full`, :mod:`.lora`): the versioned JSON header, the
check that a resumed run has the settings it started with, and AdamW moments stored per parameter."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import UserError

RESUMABLE = ("steps", "checkpoint_every")  # settings a resumed run may change


def read_meta(f, path: Path, key: str, version: int, what: str) -> dict:
    """The JSON header ``key`` of an open training state ``f``, checked for presence and ``version``."""
    raw = f.metadata.get(key)
    if raw is None:
        raise UserError(f"{path}: not an rflow {what}")
    meta = json.loads(raw)
    if meta.get("version") != version:
        raise UserError(f"{path}: training state version {meta.get('version')} is not {version}")
    return meta


def check_settings(path: Path, saved: dict, cfg) -> None:
    """A resumed run must have the settings (dataclass ``cfg``) it was saved with, but for :data:`RESUMABLE`."""
    now = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in RESUMABLE}
    defaults = json.loads(json.dumps(asdict(type(cfg)())))  # a setting newer than the state: its default
    saved = {k: saved.get(k, defaults.get(k)) for k in set(saved) | set(now) if k not in RESUMABLE}
    if saved != now:
        diff = sorted(k for k in now if saved.get(k) != now[k])
        raise UserError(f"{path}: resuming needs the same settings (differs: {', '.join(diff)})")


def load_adam(f, opt: torch.optim.Optimizer, name: str, p: torch.Tensor) -> None:
    """Give ``p`` the AdamW moments stored under ``opt.{name}.*`` in ``f``, when there are any."""
    if f"opt.{name}.exp_avg" in f:
        from .dist import like  # a sharded parameter (FSDP2) gets its shard of the moments

        opt.state[p] = {"exp_avg": like(p, f.get(f"opt.{name}.exp_avg")),
                        "exp_avg_sq": like(p, f.get(f"opt.{name}.exp_avg_sq")),
                        "step": torch.tensor(float(f.get(f"opt.{name}.step")[0]))}
