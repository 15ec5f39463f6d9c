"""The options of ``rflow bench`` (:class:`Options`), checked before anything is built (:func:`check`),
and the command line that reproduces them (:func:`command_line`)."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass

import torch

from ..errors import UserError
from . import bench_models as bm

OFFLOAD_MODES = ("none", "blocks", "auto")
COMPUTES = ("auto", "dequant", "int8", "fp8")



@dataclass
class Options:
    model: str | None = None
    config: str | None = None
    scale: str = "full"
    size: str = "1024"
    batch: int = 1
    dtype: str | None = None  # bf16 on CUDA, fp32 on the CPU
    compute: str = "auto"
    quant: str | None = None
    offload: str = "none"
    vram: str | None = None
    compare: str | None = None
    steps: int | None = None
    iters: int = 10
    warmup: int = 3
    text_tokens: int | None = None
    device: str | None = None
    compile: bool = False
    image: bool = True
    floor: bool = True
    seed: int = 0


@dataclass
class Checked:
    """:class:`Options` resolved: sizes parsed, device and dtype made, the config chosen."""

    opts: Options
    device: torch.device
    dtype: torch.dtype
    width: int
    height: int
    quant: str | None
    vram: int | None
    family: object = None
    config: object = None


def parse_size(text: str) -> tuple[int, int]:
    """'1024' -> (1024, 1024); '1024x768' -> (width 1024, height 768)."""
    parts = str(text).lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise UserError(f"--size must look like 1024 or 1024x768, got {text!r}") from None
    if len(parts) > 2 or w <= 0 or h <= 0:
        raise UserError(f"--size must look like 1024 or 1024x768, got {text!r}")
    if w % 16 or h % 16:
        raise UserError(f"--size {w}x{h}: both sides must be multiples of 16")
    return w, h


def check(o: Options) -> Checked:
    """Every option checked, before anything is built; one-line UserErrors."""
    from .. import options
    from ..pipeline import default_device, default_dtype, parse_dtype

    if o.model is not None and o.config is not None:
        raise UserError("give --model PATH or --config NAME, not both")
    if o.scale not in bm.SCALES:
        raise UserError(f"unknown --scale {o.scale!r}; choose {', '.join(bm.SCALES)}")
    width, height = parse_size(o.size)
    options.integer(o.batch, "--batch", low=1, high=4096)
    options.integer(o.iters, "--iters", low=1, high=100_000)
    options.integer(o.warmup, "--warmup", low=0, high=100_000)
    if o.steps is not None:
        options.steps(o.steps, "--steps")
    if o.text_tokens is not None:
        options.integer(o.text_tokens, "--text-tokens", low=1, high=65_536)
    dev = options.device(o.device, "--device") if o.device is not None else default_device()
    dtype = parse_dtype(o.dtype) if o.dtype is not None else default_dtype(dev)
    if o.compute not in COMPUTES:
        raise UserError(f"unknown --compute {o.compute!r}; choose {', '.join(COMPUTES)}")
    quant = o.quant
    if quant is not None:
        from ..quant.api import normalize_format

        quant = normalize_format(quant)
        quant = None if quant == "keep" else quant
    if o.compute in ("int8", "fp8"):
        if quant is None:
            quant = o.compute
        elif quant != o.compute:
            raise UserError(f"--compute {o.compute} needs {o.compute} layers, not --quant {quant}")
    if o.compute == "fp8":
        from ..quant.linear import FP8_MIN_CAPABILITY, _capability

        cap = _capability(dev)
        if cap is None or cap < FP8_MIN_CAPABILITY:
            raise UserError(f"--compute fp8 needs a CUDA GPU of compute capability ≥ 8.9, not {dev}")
    if o.offload not in OFFLOAD_MODES:
        raise UserError(f"unknown --offload {o.offload!r}; choose {', '.join(OFFLOAD_MODES)}")
    vram = None
    if o.vram is not None:
        from ..compress.capture import parse_bytes

        vram = parse_bytes(o.vram)
        if o.offload == "none":
            raise UserError("--vram limits offloading: give --offload blocks or auto")
    if o.offload != "none":
        offload_function()
    if o.compare is not None:
        if o.compare != "diffusers":
            raise UserError(f"unknown --compare {o.compare!r}; rflow compares with diffusers")
        if o.offload != "none":
            raise UserError("--compare diffusers times both models resident on the device: leave out --offload")
        from .diffusers_ref import check_available

        check_available()
    c = Checked(o, dev, dtype, width, height, quant, vram)
    if o.model is None:
        c.family, base = bm.published(o.config or "flux1-dev")
        c.config = bm.scaled(c.family, base, "tiny" if o.config == "tiny" else o.scale)
        if o.compare is not None:
            from .diffusers_ref import diffusers_kwargs

            diffusers_kwargs(c.family, c.config)
        _check_fits(c)
    return c


def offload_function():
    """``rflow.runtime.offload.offload_``, or a UserError where this build has none."""
    try:
        from .offload import offload_
    except ImportError:
        raise UserError("--offload: block offloading is not available in this build of rflow") from None
    return offload_


def _check_fits(c: Checked) -> None:
    """Refuse a random model whose weights alone exceed the memory free where they would live."""
    from ..memory import available_bytes, format_bytes

    _, need = bm.param_bytes(c.family, c.config, c.dtype)
    where = torch.device("cpu") if c.opts.offload != "none" else c.device
    free_bytes = available_bytes(where)
    if free_bytes is not None and need > free_bytes:
        hint = "use --scale tiny" + (" or a GPU" if c.device.type == "cpu" else " or --offload blocks")
        raise UserError(f"the weights need {format_bytes(need)} and only {format_bytes(free_bytes)} is free on "
                        f"{where}: {hint}")


def _fits_on(c: Checked, dev: torch.device) -> bool:
    """Whether the dense random weights fit in ``dev``'s free memory with 10 % to spare (then an offloaded
    model is built and quantized there, fast, and ``offload_`` moves its streamed blocks to the host)."""
    from ..memory import available_bytes

    _, need = bm.param_bytes(c.family, c.config, c.dtype)
    free_bytes = available_bytes(dev)
    return free_bytes is not None and need * 1.1 < free_bytes


def command_line(o: Options) -> str:
    """The ``rflow bench`` command that reproduces ``o`` (every option spelled out)."""
    args = ["rflow", "bench"]
    args += ["--model", o.model] if o.model is not None else ["--config", o.config or "flux1-dev"]
    defaults = Options()
    for f in dataclasses.fields(Options):
        if f.name in ("model", "config"):
            continue
        v = getattr(o, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            if v != getattr(defaults, f.name):
                args.append(flag if v else "--no-" + f.name.replace("_", "-"))
        elif v is not None and (v != getattr(defaults, f.name) or f.name in ("size", "iters", "warmup")):
            args += [flag, str(v)]
    return shlex.join(args)
