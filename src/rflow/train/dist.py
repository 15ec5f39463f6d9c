"""Data-parallel training under ``torchrun``: FSDP2 sharding for full training, and the full tensors
behind shards (what rank 0 writes to checkpoints and exports). The group itself: :mod:`rflow.distributed`.

LoRA training keeps every adapter on every rank and all-reduces their gradients (DDP's rule, done by
hand in :mod:`.lora`); full training shards the weights, gradients and AdamW moments over the ranks
with FSDP2's ``fully_shard`` (each repeated block, then the whole model), which on the CPU runs on gloo.
"""

from __future__ import annotations

import torch

from ..errors import UserError


def shard_(model: torch.nn.Module, blocks: list[str], world: int, device: torch.device) -> None:
    """FSDP2 in place: each block of ``blocks`` (qualified names) its own unit, then the root; the
    parameters become DTensors sharded over ``world`` ranks on dim 0 (the module class is kept as a base)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for name in blocks:
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank must call it), or ``t`` itself."""
    return t.full_tensor() if is_sharded(t) else t


def like(ref: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``ref``: this rank's shard when ``ref`` is a DTensor, else ``full`` on its device."""
    full = full.to(ref.device)
    if not is_sharded(ref):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, ref.device_mesh, ref.placements)


def global_sum(value: float, world: int) -> float:
    """The sum of ``value`` over the ranks, in float64 (every rank gets it)."""
    if world <= 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def global_mean(value: float, world: int) -> float:
    """The mean of ``value`` over the ranks (every rank gets it)."""
    return global_sum(value, world) / world if world > 1 else value


def barrier(world: int) -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint the others may read next)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def check_batch(batch: int, world: int) -> None:
    if batch < world:
        raise UserError(f"--batch {batch} is the global batch and must be at least the number of processes ({world})")
