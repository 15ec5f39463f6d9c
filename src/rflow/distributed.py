"""The process group of a ``torchrun`` run, started and ended in one place for every command.

:func:`start` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), puts each rank on
its own GPU and starts the group (NCCL on CUDA, gloo otherwise); :func:`end` waits for every rank and
destroys the group, so that its threads stop while the interpreter is still whole.

``torch.distributed.nn.functional`` gives its collectives ``group=group.WORLD`` defaults, evaluated at
import. Imported once the group exists (``transformers`` and FSDP import it on the way), it keeps the
world group alive past ``destroy_process_group``: gloo's worker threads then end in interpreter
shutdown, which aborts the process now and then ("terminate called without an active exception").
:func:`start` imports it first, while ``group.WORLD`` is still None. A model sharded by FSDP holds the
group too, through DTensor's caches of its device mesh: :func:`end` empties them.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys

import torch

from .errors import UserError

def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for a plain run."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise UserError(f"torchrun's environment is inconsistent: RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK {local_rank}")
    return rank, world, local_rank


def start(device: torch.device | None = None) -> tuple[int, int, bool, torch.device | None]:
    """(rank, world size, whether this call started the group, device) under torchrun, the group started;
    ``(0, 1, False, device)`` for a plain run. On CUDA a device without an index becomes ``cuda:LOCAL_RANK``."""
    rank, world, local_rank = world_from_env()
    if world == 1:
        return 0, 1, False, device
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    if use_cuda:
        if device is None or device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False, device
    import torch.distributed.nn as _defaults_to_world  # noqa: F401 - before the group exists (module docstring)

    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), True, device


@contextlib.contextmanager
def group(device: torch.device | None = None):
    """``with group(device) as (rank, world, device):`` :func:`start` before the block, :func:`end` after
    it; after a block that raised, without waiting for the other ranks (they may be in a collective this
    rank will never join; torchrun stops them when this one exits)."""
    rank, world, started, device = start(device)
    try:
        yield rank, world, device
    except BaseException:
        end(started, wait=False)
        raise
    end(started)


def end(started: bool = True, *, wait: bool = True) -> None:
    """Leave the group this process started: wait for the other ranks (no rank leaves while a peer still
    talks to it; a failing barrier, a peer already gone, is not an error here), then destroy it.
    What still holds the group (a model sharded by FSDP) must be dropped by then: end it after the
    function that trained it has returned."""
    if not started:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if wait:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer that failed first; destroying the group is all that is left
            pass
    dist.destroy_process_group()
    _forget_meshes()
    gc.collect()  # a model sharded by FSDP holds the group through reference cycles; free it now, not at exit


# DTensor's caches that keep a device mesh (and through it the process group) after its model is gone:
# (module, attribute path of a function that empties one), as torch 2.13 names them; missing ones are skipped.
MESH_CACHES = (
    ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
)


def _forget_meshes() -> None:
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor was made: nothing cached
        return
    for module, path in MESH_CACHES:
        try:
            fn = importlib.import_module(module)
            for name in path.split("."):
                fn = getattr(fn, name)
        except (ImportError, AttributeError):
            continue
        fn()

