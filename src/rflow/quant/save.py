"""Writing quantized transformers: rflow's safetensors layout, or GGUF in the layout ComfyUI-GGUF reads.

* **safetensors** (``.safetensors``): the model's own key names; a quantized layer ``X`` stores
  ``X.qweight`` (int8, float8_e4m3fn, or uint8 GGUF blocks) and, for int8/fp8, ``X.scale`` (float32 per
  output row), next to its ``X.bias``; metadata ``rflow.quant`` = ``{"version": 1, "layers": {X:
  {"format": F, "shape": [out, in]}}}`` plus the family's config metadata. :func:`rflow.load` reads it
  with no flags, keeping the layers packed.
* **GGUF** (``.gguf``, city96's layout): ``general.architecture`` is the family's name ("flux" for
  FLUX.1), tensors under the model's key names with GGUF's reversed dimensions; quantized layers as
  their GGML blocks, every other tensor F32 when 1-D and otherwise in the model's precision (F32,
  BF16, F16: nothing is rounded on the way out).
  int8 and fp8 have no GGML type: a GGUF output takes GGUF types only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoints.plan import QUANT_METADATA_KEY, QUANT_VERSION
from ..errors import UserError
from .linear import GGUFLinear, QuantLinear, quant_layers

GGUF_ARCH = {"flux1": "flux", "flux2": "flux2", "zimage": "lumina2"}  # what ComfyUI-GGUF calls each family


def _family(model: nn.Module):
    from ..compress.units import family_of

    return family_of(model.config)


def quant_metadata(model: nn.Module) -> dict[str, str]:
    layers = {name: {"format": m.format, "shape": [m.out_features, m.in_features]}
              for name, m in quant_layers(model).items()}
    return {QUANT_METADATA_KEY: json.dumps({"version": QUANT_VERSION, "layers": layers})}


def save_quantized(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write ``model`` (quantized with :func:`rflow.quant.quantize_` or not) to ``path``: rflow's
    safetensors layout, or GGUF for a ``.gguf`` path (see the module docstring). The file is written to a
    temporary sibling and swapped in (rflow.outputs); call ``check_output`` before long work."""
    from ..outputs import replacing

    p = Path(path).expanduser()
    extra = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    with replacing(p) as tmp:
        if p.suffix.lower() == ".gguf":
            _write_gguf(model, tmp, extra)
        else:
            from safetensors.torch import save_file

            sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
            meta = {**_family(model).config_metadata(model.config), **quant_metadata(model), **extra}
            save_file(sd, str(tmp), metadata=meta)
    return p


def _write_gguf(model: nn.Module, path: Path, extra: dict[str, str]) -> None:
    import gguf

    fam = _family(model)
    quantized = quant_layers(model)
    wrong = [n for n, m in quantized.items() if not isinstance(m, GGUFLinear)]
    if wrong:
        raise UserError(f"{wrong[0]} is {quantized[wrong[0]].format}, which GGUF cannot store: "
                        "use GGUF types (Q8_0, Q6_K, Q4_K, …) for a .gguf output, or write .safetensors")
    T = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH.get(fam.NAME, fam.NAME))
    writer.add_string("rflow.family", fam.NAME)
    for k, v in {**fam.config_metadata(model.config), **extra}.items():
        writer.add_string(k, v)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            continue
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            key = f"{name}.{pname}" if name else pname
            if any(key.startswith(f"{q}.") for q in quantized) and not key.endswith(".bias"):
                continue
            _add_dense(writer, key, t.detach().to("cpu"), T)
    for name, m in quantized.items():
        blocks = m.qweight.detach().to("cpu").contiguous().numpy()
        writer.add_tensor(f"{name}.weight", blocks, raw_dtype=T[m.qtype])
        if m.bias is not None:
            _add_dense(writer, f"{name}.bias", m.bias.detach().to("cpu"), T)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_dense(writer, key: str, t: torch.Tensor, T) -> None:
    if not t.is_floating_point():
        raise UserError(f"{key}: a {t.dtype} tensor has no GGUF type")
    if t.ndim <= 1 or t.dtype == torch.float32:
        writer.add_tensor(key, t.float().numpy().astype(np.float32))
    elif t.dtype == torch.bfloat16:
        writer.add_tensor(key, t.view(torch.int16).numpy().view(np.uint16).copy().view(np.uint8).reshape(*t.shape[:-1], -1),
                          raw_dtype=T.BF16)
    else:
        writer.add_tensor(key, t.to(torch.float16).numpy())
