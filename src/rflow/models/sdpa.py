"""The one place rflow's transformers call scaled-dot-product attention.

:func:`sdpa` is ``F.scaled_dot_product_attention`` under the backend order set by :func:`preferring`
(None: PyTorch's own choice). :func:`rflow.runtime.speed.use_sdpa_backend` sets that order around a
model's forward, so a preferred kernel (cuDNN, flash, …) applies to that model's attention only — the
VAE and the text encoders keep PyTorch's choice. The order is a priority list with every backend in it,
so a call the preferred kernel cannot run (a mask flash does not take, a dtype cuDNN does not) falls back
to the next instead of failing. Under ``torch.compile`` the order is read while tracing (the compiled
graph calls the kernel chosen then) and guarded, so a change of preference recompiles.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor

_preferred: list | None = None  # SDPBackend priority list, or None for PyTorch's choice


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)`` under the preferred backend order."""
    if _preferred is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_preferred, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def preferred() -> list | None:
    """The backend order :func:`sdpa` uses now (None: PyTorch's choice)."""
    return None if _preferred is None else list(_preferred)


def set_preferred(order: list | None) -> list | None:
    """Set the backend order; returns the previous one (for restoring)."""
    global _preferred
    before, _preferred = _preferred, (None if order is None else list(order))
    return before


@contextmanager
def preferring(order: list | None):
    """Run the body with :func:`sdpa` under ``order`` (a priority list of ``SDPBackend``, or None)."""
    before = set_preferred(order)
    try:
        yield
    finally:
        set_preferred(before)
