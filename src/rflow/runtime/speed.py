"""A faster transformer step, as verbs over a model of any family.

::

    optimize_(model, *, fuse=True, compile=False, sdpa="auto", cuda_graphs=False, mode=None, tokens=None) -> dict
    sdpa_backend(device, dtype, shapes, *, mask=None) -> SDPBackend | None
    use_sdpa_backend(model, backend) -> SdpaSetting      # also a context manager that undoes itself
    compile_blocks_(model, *, mode=None, dynamic=False, backend=None, fullgraph=False) -> dict

* **Fused projections** (:mod:`.fusion`): sibling linears that read one input become one matmul.
* **SDPA backend**: :func:`sdpa_backend` times every ``torch.nn.attention.SDPBackend`` (cuDNN, flash,
  memory-efficient, math) on the attention shape given, on the GPU, and returns the fastest (cached per
  device, dtype and shape). :func:`use_sdpa_backend` makes it the first choice of the model's attention
  (every rflow transformer calls :func:`rflow.models.sdpa.sdpa`), for that model's forward only. On a
  device other than CUDA :func:`sdpa_backend` returns None: PyTorch's own choice stays (on the CPU it
  does not follow a priority order anyway).
* **Regional compilation**: :func:`compile_blocks_` compiles each repeated block's ``forward`` —
  one ``torch.compile`` of the class's ``forward`` shared by every block of that class, so 57 FLUX.1
  blocks compile two graphs — and leaves the module classes, the state dict and every hook (offload's
  included) as they were. Compiled artefacts go to a persistent cache, ``compile_cache_dir()`` (the rflow
  cache folder's ``inductor/``, unless ``TORCHINDUCTOR_CACHE_DIR`` is set), so a second run reuses them.
  Blocks whose weights differ in shape (pruned models) need a graph each: the recompile limit is raised
  to allow for them.
* **CUDA graphs** (:mod:`.cuda_graphs`): with ``compile="blocks"``, ``mode="reduce-overhead"``
  (inductor's CUDA graph trees, per block); without compile, the whole forward replays a graph per
  input signature.

Speed on a GPU is not measured in rflow's tests (they run on the CPU: outputs of every switch equal the
eager model's); ``rflow bench`` and ``benchmarks/`` measure it.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..models import sdpa as sdpa_mod
from .fusion import fuse_projections_, unfuse_projections_

__all__ = ["optimize_", "describe", "fuse_projections_", "unfuse_projections_", "sdpa_backend", "fastest_backend",
           "use_sdpa_backend", "sdpa_setting", "compile_blocks_", "uncompile_blocks_", "compile_cache_dir",
           "attention_shape", "pipeline_tokens"]

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKEND = "inductor"  # what compile_blocks_ uses when not told
DEFAULT_TOKENS = 64 * 64 + 512  # the joint sequence of a 1024² FLUX step: 4096 image + 512 text tokens
_COMPILED = "_rflow_compiled"  # block.__dict__ flag
_SETTING = "_rflow_sdpa"  # model.__dict__ -> SdpaSetting


# ---------------------------------------------------------------------------------------------- SDPA


def backend_names() -> dict:
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def parse_backend(backend):
    """An ``SDPBackend`` from itself or its name (cudnn, flash, efficient, math); None stays None."""
    from torch.nn.attention import SDPBackend

    if backend is None or isinstance(backend, SDPBackend):
        return backend
    names = backend_names()
    if isinstance(backend, str) and backend in names:
        return names[backend]
    raise UserError(f"unknown SDPA backend {backend!r}; choose {', '.join(names)}")


def backend_name(backend) -> str:
    return next((k for k, v in backend_names().items() if v == backend), "default")


_chosen: dict = {}  # (device, dtype, q, k, v, mask) -> (SDPBackend | None, {name: ms or why not})


def _shapes(shapes) -> tuple[tuple, tuple, tuple]:
    """(q, k, v) shapes from one (B, H, L, D) shape or a triple of them."""
    if len(shapes) == 3 and all(isinstance(s, (tuple, list, torch.Size)) for s in shapes):
        q, k, v = (tuple(int(d) for d in s) for s in shapes)
    else:
        q = k = v = tuple(int(d) for d in shapes)
    if any(len(s) != 4 for s in (q, k, v)) or min(q + k + v) < 1:
        raise UserError(f"attention shapes must be positive (B, H, L, D), got {shapes!r}")
    return q, k, v


def fastest_backend(device, dtype: torch.dtype, shapes, *, mask=None, reps: int = 10, samples: int = 5):
    """Time every SDPA backend on random q, k, v of ``shapes`` on ``device``; returns (the fastest
    ``SDPBackend`` or None if none runs, {name: ms or why it cannot run}). Cached."""
    from . import floor

    q, k, v = _shapes(shapes)
    dev = torch.device(device)
    key = (str(dev), dtype, q, k, v, None if mask is None else tuple(mask))
    if key not in _chosen:
        op = floor.Attention(q, k, v, None if mask is None else tuple(mask), dtype)
        g = torch.Generator(device=dev).manual_seed(0)
        times = floor.time_attention(op, dev, g, reps=reps, samples=samples, warmup=2)
        ok = {n: t for n, t in times.items() if isinstance(t, float)}
        best = parse_backend(min(ok, key=ok.get)) if ok else None
        _chosen[key] = (best, times)
    return _chosen[key]


def sdpa_backend(device, dtype: torch.dtype, shapes, *, mask=None):
    """The fastest SDPA backend for attention of ``shapes`` ((B, H, L, D), or q, k, v shapes) in
    ``dtype`` on ``device``, timed once per shape on a CUDA device; None elsewhere (PyTorch's choice)."""
    _shapes(shapes)
    if torch.device(device).type != "cuda":
        return None
    return fastest_backend(device, dtype, shapes, mask=mask)[0]


def priority(backend) -> list:
    """``backend`` first, then every other backend PyTorch has enabled now, in its default order."""
    from torch.nn.attention import SDPBackend

    enabled = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
               SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
               SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
               SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled()}
    return [backend] + [b for b, on in enabled.items() if on and b != backend]


class SdpaSetting:
    """A model's preferred SDPA backend, applied around each of its forwards by two hooks.
    ``remove()`` (or leaving the ``with`` block) restores PyTorch's choice."""

    def __init__(self, model: nn.Module, backend):
        self.model, self.backend, self.order = model, backend, priority(backend)
        self._saved: list = []
        self._handles = [model.register_forward_pre_hook(self._enter),
                         model.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, module, args):
        self._saved.append(sdpa_mod.set_preferred(self.order))

    def _exit(self, module, args, output):
        if self._saved:
            sdpa_mod.set_preferred(self._saved.pop())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.model.__dict__.get(_SETTING) is self:
            del self.model.__dict__[_SETTING]

    def __enter__(self) -> "SdpaSetting":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def use_sdpa_backend(model: nn.Module, backend) -> SdpaSetting | None:
    """Make ``backend`` (an ``SDPBackend`` or its name) the first choice of ``model``'s attention,
    replacing any earlier setting; None removes the setting (and returns None)."""
    backend = parse_backend(backend)
    old = model.__dict__.get(_SETTING)
    if old is not None:
        old.remove()
    if backend is None:
        return None
    setting = SdpaSetting(model, backend)
    model.__dict__[_SETTING] = setting
    return setting


def sdpa_setting(model: nn.Module):
    """The ``SDPBackend`` set on ``model`` by :func:`use_sdpa_backend`, or None."""
    s = model.__dict__.get(_SETTING)
    return None if s is None else s.backend


# ---------------------------------------------------------------------------------------------- compile


def _user_inductor_dir() -> str | None:
    """``$TORCHINDUCTOR_CACHE_DIR`` as the user set it (inductor writes its own default there on first use:
    that one is not a choice)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch layout: every value counts as the user's
        default_cache_dir = lambda: ""  # noqa: E731
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not value or os.path.abspath(value) == os.path.abspath(default_cache_dir() or "/nonexistent"):
        return None
    return value


def compile_cache_dir() -> Path:
    """Where compiled kernels are kept across runs: ``$TORCHINDUCTOR_CACHE_DIR`` if the user set it,
    else ``inductor/`` in the rflow cache folder."""
    if _user_inductor_dir():
        return Path(_user_inductor_dir())
    from ..checkpoints.hashing import cache_dir

    return cache_dir() / "inductor"


def enable_compile_cache() -> Path:
    """Point inductor's on-disk caches (FX graphs, kernels, autotuning) at :func:`compile_cache_dir`."""
    path = compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as inductor

    if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:  # an explicit choice of the user's stands
        inductor.fx_graph_cache = True
    return path


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of ``model`` (its family's, in execution order; else its ModuleLists' items)."""
    from .offload import block_names

    return [(n, model.get_submodule(n)) for n in block_names(model)]


def _raise_recompile_limit(n: int) -> None:
    import torch._dynamo.config as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name) and getattr(dynamo, name) < n:
            setattr(dynamo, name, n)


def check_mode(mode) -> str | None:
    if mode is not None and mode not in MODES:
        raise UserError(f"unknown compile mode {mode!r}; choose {', '.join(MODES)}")
    return None if mode == "default" else mode


def compile_blocks_(model: nn.Module, *, mode: str | None = None, dynamic: bool | None = False,
                    backend: str | None = None, fullgraph: bool = False) -> dict:
    """``torch.compile`` every block's ``forward`` in place, one compiled function per block class (see
    the module docstring). ``mode``: None/default, reduce-overhead (CUDA graphs), max-autotune or
    max-autotune-no-cudagraphs; ``backend``: inductor unless told (aot_eager: no code generation).
    Returns ``{"blocks", "classes": {name: count}, "mode", "backend", "cache_dir"}``."""
    from .offload import streamer

    mode = check_mode(mode)
    if mode in ("reduce-overhead", "max-autotune") and streamer(model) is not None:
        raise UserError(f"compile mode {mode} replays CUDA graphs, which do not combine with block offload; "
                        "use max-autotune-no-cudagraphs or the default mode")
    backend = backend or COMPILE_BACKEND
    found = blocks(model)
    if not found:
        raise UserError(f"{type(model).__name__} has no repeated blocks to compile")
    uncompile_blocks_(model)
    cache = enable_compile_cache() if backend == "inductor" else None
    by_class: dict[type, list[nn.Module]] = {}
    for _, b in found:
        by_class.setdefault(type(b), []).append(b)
    shapes = {tuple((n, tuple(p.shape)) for n, p in b.named_parameters()) for _, b in found}
    _raise_recompile_limit(8 + 2 * len(shapes))
    for cls, members in by_class.items():
        compiled = torch.compile(cls.forward, mode=mode, dynamic=dynamic, backend=backend, fullgraph=fullgraph)
        for b in members:
            b.forward = types.MethodType(compiled, b)
            b.__dict__[_COMPILED] = True
    return {"blocks": len(found), "classes": {c.__name__: len(m) for c, m in by_class.items()},
            "mode": mode or "default", "backend": backend, "cache_dir": None if cache is None else str(cache)}


def uncompile_blocks_(model: nn.Module) -> int:
    """Undo :func:`compile_blocks_`; returns how many blocks were compiled."""
    n = 0
    for m in model.modules():
        if m.__dict__.pop(_COMPILED, False):
            m.__dict__.pop("forward", None)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------- all together


def attention_shape(model: nn.Module, tokens: int, batch: int = 1) -> tuple[int, int, int, int]:
    """(B, H, L, D) of the joint attention of ``model`` (FLUX.1, FLUX.2, Z-Image) over ``tokens`` tokens."""
    c = getattr(model, "config", None)
    heads = getattr(c, "num_heads", None) or getattr(c, "n_heads", None)
    if not heads:
        raise UserError(f"{type(model).__name__}: cannot tell its attention heads (no config.num_heads / n_heads)")
    return int(batch), int(heads), int(tokens), int(c.head_dim)


def pipeline_tokens(pipe, width: int, height: int) -> int:
    """Tokens of the joint sequence one step of ``pipe`` attends over at width × height."""
    return pipe.family_module.image_seq_len(pipe.latent_shape(height, width, 1)) + pipe.max_sequence_length


def _device_of(model: nn.Module) -> torch.device:
    """Where ``model`` computes: its streaming device when offloaded, else its ``device``, else its first
    parameter's."""
    from .offload import streamer

    s = streamer(model)
    if s is not None:
        return s.device
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def optimize_(model: nn.Module, *, fuse: bool = True, compile=False, sdpa="auto", cuda_graphs: bool = False,
              mode: str | None = None, tokens: int | None = None, backend: str | None = None) -> dict:
    """Apply the speed switches to ``model`` in place; returns what was done.

    ``fuse``: fused projections (skipped, with the reason, on an offloaded model). ``sdpa``: "auto"
    (the fastest backend timed on this GPU for a joint attention over ``tokens`` tokens, default a 1024²
    FLUX step; PyTorch's choice off CUDA), a backend name, or None/"default". ``compile``: False or
    "blocks" (:func:`compile_blocks_` with ``mode`` and ``backend``). ``cuda_graphs``: CUDA graphs (the
    model on a CUDA device, not offloaded): reduce-overhead compilation with ``compile="blocks"``, else
    a graph per input signature of the whole forward. Every argument is checked before anything changes.
    """
    from .cuda_graphs import graph_model_
    from .offload import streamer

    if compile not in (False, None, "blocks"):
        raise UserError(f"compile must be False or 'blocks', got {compile!r}")
    mode = check_mode(mode)
    if mode is not None and compile != "blocks":
        raise UserError(f"compile mode {mode!r} applies to compile='blocks' only")
    if sdpa not in ("auto", "default"):
        parse_backend(sdpa)
    if tokens is not None and (not isinstance(tokens, int) or tokens < 1):
        raise UserError(f"tokens must be a positive integer, got {tokens!r}")
    dev, offloaded = _device_of(model), streamer(model) is not None
    if cuda_graphs:
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise UserError(f"CUDA graphs need the model on a CUDA device; it is on {dev}")
        if offloaded:
            raise UserError("CUDA graphs do not combine with block offload: a graph replays fixed weight addresses")
        if compile and mode == "max-autotune-no-cudagraphs":
            raise UserError("cuda_graphs with mode max-autotune-no-cudagraphs contradict each other")
    out: dict = {"device": str(dev)}

    if fuse and offloaded:
        out["fuse"] = {"fused": [], "skipped": {"*": "the model is offloaded (fuse before offloading)"}}
    elif fuse:
        out["fuse"] = fuse_projections_(model)

    if sdpa == "auto":
        choice = None
        if dev.type == "cuda":
            dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
            choice = sdpa_backend(dev, dtype, attention_shape(model, tokens or DEFAULT_TOKENS))
    else:
        choice = None if sdpa == "default" else parse_backend(sdpa)
    use_sdpa_backend(model, choice)
    out["sdpa"] = backend_name(choice)

    if compile == "blocks":
        if cuda_graphs and mode is None:
            mode = "reduce-overhead"
        out["compile"] = compile_blocks_(model, mode=mode, backend=backend)
    out["cuda_graphs"] = ("reduce-overhead" if compile == "blocks" else "forward") if cuda_graphs else None
    if cuda_graphs and compile != "blocks":
        graph_model_(model)
    return out


def describe(summary: dict) -> str:
    """One line saying what :func:`optimize_` did, from its summary."""
    parts = []
    if "fuse" in summary:
        f = summary["fuse"]
        skipped = f", {len(f['skipped'])} skipped" if f["skipped"] else ""
        parts.append(f"{len(f['fused'])} projection group(s) fused{skipped}")
    parts.append(f"SDPA {summary['sdpa']}")
    c = summary.get("compile")
    if c:
        parts.append(f"{c['blocks']} blocks compiled, one function per block class ({c['backend']}, mode {c['mode']}"
                     + (f", cache {c['cache_dir']}" if c["cache_dir"] else "") + "; the first step compiles)")
    if summary.get("cuda_graphs"):
        parts.append(f"CUDA graphs ({summary['cuda_graphs']})")
    return "speed: " + ", ".join(parts)
