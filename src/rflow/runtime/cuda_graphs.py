"""CUDA graphs for calls whose shapes do not change: one capture, then each call is one replay.

::

    cuda_graph_step(fn, example_inputs, *, warmup=2, pool=None, clone_outputs=True) -> CudaGraphStep
    graph_model_(model) -> None          # model.forward replays a graph per input signature
    ungraph_model_(model) -> bool

A sampling loop calls the transformer with the same shapes every step; on a GPU most of a small step
is then kernel-launch time, which a replayed graph removes. :func:`cuda_graph_step` captures
``fn(*example_inputs)`` once (after ``warmup`` calls on a side stream, as CUDA requires) on static
copies of the inputs; calling the result copies new inputs into those copies and replays. Inputs must
be tensors on one CUDA device, and every later call must pass tensors of the same shapes, dtypes and
device (anything else is a :class:`UserError`, not a silent wrong answer). Outputs are cloned out of
the graph's memory (``clone_outputs=False`` returns the graph's own buffers, overwritten by the next
replay). The weights ``fn`` reads must stay where they are: graphs do not combine with block offload.

:func:`graph_model_` makes ``model.forward`` keep one graph per input signature (the shapes, dtypes and
devices of its tensor arguments and the values of the others), captured on first sight with a memory
pool shared by the model's graphs (safe because every output is cloned at once). Calls with autograd
enabled run eagerly (graphs here are for inference), and so do signatures whose capture failed (code
that synchronises with the host cannot be captured; a warning says so once). Module hooks still run
eagerly around the replay. A graph replays the weights at the addresses it was captured with: call
:func:`ungraph_model_` before moving the model, replacing its layers or changing their compute mode.
All of this needs CUDA; on the CPU the argument checks run and capture is refused with a
:class:`UserError`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..errors import UserError, warn

_ATTR = "_rflow_graphs"


def check_graph_inputs(fn: Callable, example_inputs: Sequence[Tensor]) -> torch.device:
    """The CUDA device of ``example_inputs``, or a :class:`UserError` saying why they cannot be captured."""
    if not callable(fn):
        raise UserError(f"cuda_graph_step needs a callable, got {type(fn).__name__}")
    if isinstance(example_inputs, Tensor) or not isinstance(example_inputs, (list, tuple)):
        raise UserError("example_inputs must be a list or tuple of tensors")
    if not example_inputs:
        raise UserError("example_inputs is empty: a graph needs at least one input tensor")
    bad = [type(x).__name__ for x in example_inputs if not isinstance(x, Tensor)]
    if bad:
        raise UserError(f"example_inputs must all be tensors, got {', '.join(bad)}")
    devices = {x.device for x in example_inputs}
    if len(devices) > 1:
        raise UserError(f"example_inputs are on several devices ({', '.join(sorted(map(str, devices)))})")
    dev = devices.pop()
    if dev.type != "cuda":
        raise UserError(f"CUDA graphs need inputs on a CUDA device, not {dev}")
    if not torch.cuda.is_available():
        raise UserError("CUDA graphs need CUDA, which this PyTorch build or machine does not have")
    return dev


def signature(x: Tensor) -> tuple:
    return tuple(x.shape), x.dtype, x.device


def check_call(expected: list[tuple], inputs: Sequence) -> None:
    """A :class:`UserError` unless ``inputs`` match the captured signatures ``expected``."""
    if len(inputs) != len(expected):
        raise UserError(f"this graph was captured with {len(expected)} inputs, got {len(inputs)}")
    for i, (x, want) in enumerate(zip(inputs, expected)):
        if not isinstance(x, Tensor):
            raise UserError(f"input {i} must be a tensor, got {type(x).__name__}")
        if signature(x) != want:
            shape, dtype, dev = want
            raise UserError(f"input {i} is {tuple(x.shape)} {x.dtype} on {x.device}; this graph was captured "
                            f"for {shape} {dtype} on {dev}: capture another graph for other shapes")


class CudaGraphStep:
    """``fn`` captured on static copies of its inputs; ``step(*inputs)`` copies them in and replays."""

    def __init__(self, fn: Callable, example_inputs: Sequence[Tensor], *, warmup: int = 2, pool=None,
                 clone_outputs: bool = True):
        dev = check_graph_inputs(fn, example_inputs)
        if not isinstance(warmup, int) or warmup < 1:
            raise UserError(f"warmup must be a positive integer (CUDA requires calls before capture), got {warmup!r}")
        self.device, self.clone_outputs = dev, clone_outputs
        self.expected = [signature(x) for x in example_inputs]
        self.static = [x.detach().clone() for x in example_inputs]
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.static)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn(*self.static)
        self.leaves, self.spec = pytree.tree_flatten(self.out)

    def __call__(self, *inputs: Tensor):
        check_call(self.expected, inputs)
        for s, x in zip(self.static, inputs):
            s.copy_(x)
        self.graph.replay()
        if not self.clone_outputs:
            return self.out
        return pytree.tree_unflatten([x.clone() if isinstance(x, Tensor) else x for x in self.leaves], self.spec)


def cuda_graph_step(fn: Callable, example_inputs: Sequence[Tensor], *, warmup: int = 2, pool=None,
                    clone_outputs: bool = True) -> CudaGraphStep:
    """Capture ``fn(*example_inputs)`` as a CUDA graph (see the module docstring)."""
    return CudaGraphStep(fn, example_inputs, warmup=warmup, pool=pool, clone_outputs=clone_outputs)


class _GraphedForward:
    """``model.forward`` with a graph per input signature (see :func:`graph_model_`)."""

    def __init__(self, forward: Callable):
        self.forward = forward
        self.graphs: dict = {}  # key -> CudaGraphStep, or None where capture failed
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        if torch.is_grad_enabled() or not tensors or any(x.device.type != "cuda" for x in tensors):
            return self.forward(*args, **kwargs)
        try:
            key = (spec, tuple(signature(x) if isinstance(x, Tensor) else (type(x), x) for x in leaves))
            hash(key)
        except TypeError:  # an unhashable non-tensor argument: no stable signature
            return self.forward(*args, **kwargs)
        if key not in self.graphs:
            where = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]

            def call(*ts):
                vals = list(leaves)
                for i, t in zip(where, ts):
                    vals[i] = t
                a, kw = pytree.tree_unflatten(vals, spec)
                return self.forward(*a, **kw)

            try:
                self.graphs[key] = CudaGraphStep(call, tensors, pool=self.pool)
            except RuntimeError as e:
                self.graphs[key] = None
                why = " ".join(str(e).split())[:160]
                warn(f"could not capture a CUDA graph for this call, running it eagerly ({why})")
        g = self.graphs[key]
        return self.forward(*args, **kwargs) if g is None else g(*tensors)


def graph_model_(model: nn.Module) -> None:
    """Make ``model.forward`` replay CUDA graphs, one per input signature (see the module docstring)."""
    from .offload import streamer

    params = list(model.parameters())
    if not params or any(p.device.type != "cuda" for p in params):
        raise UserError("CUDA graphs need the whole model on a CUDA device")
    if streamer(model) is not None:
        raise UserError("CUDA graphs do not combine with block offload: a graph replays fixed weight addresses")
    if not torch.cuda.is_available():
        raise UserError("CUDA graphs need CUDA, which this PyTorch build or machine does not have")
    ungraph_model_(model)
    g = _GraphedForward(model.forward)
    model.__dict__[_ATTR] = g
    model.forward = g


def ungraph_model_(model: nn.Module) -> bool:
    """Undo :func:`graph_model_` (the graphs and their memory are released); False if there was none."""
    g = model.__dict__.pop(_ATTR, None)
    if g is None:
        return False
    model.__dict__.pop("forward", None)
    g.graphs.clear()
    return True
