"""Loading and saving pipelines: ``rflow.load(path)`` for every family, rflow pipeline folders.

``load`` finds the transformer inside the path (a diffusers pipeline folder, a ``transformer/`` folder
or a single file), lets the checkpoint's keys say which family it is (:mod:`rflow.checkpoints.loader`),
and asks that family (:mod:`rflow.families`) where its VAE and text encoders live next to it, how to
load them, whether they fit the transformer, and which sigma schedule it was trained for.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoints.io import read_json
from .checkpoints.loader import Checkpoint, load_transformer
from .errors import UserError, flag
from .models.text import load_text_encoders
from .paths import MANIFEST
from .pipeline import Pipeline, Schedule, default_device, default_dtype, parse_dtype


def _layout(path: Path) -> tuple[Path, Path]:
    """(transformer path, the folder its companions live in)."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "model_index.json").exists():
        if not (path / "transformer").is_dir():
            raise UserError(f"{path}: diffusers folder without a transformer/ component")
        return path / "transformer", path
    return path, path.parent  # a single file or a transformer/ folder: companions sit beside it


def _has_quant_metadata(path: Path) -> bool:
    from .checkpoints.io import open_weights
    from .checkpoints.plan import QUANT_METADATA_KEY

    with open_weights(path) as f:
        return QUANT_METADATA_KEY in f.metadata


def load(
    path: str | os.PathLike | None = None,
    *,
    text_encoders: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    keep_quantized: bool | None = None,
    offload: str = "none",
    vram: int | str | None = None,
    text_device: str | None = None,
) -> Pipeline:
    """Load a pipeline of any family (FLUX.1, FLUX.2-klein, Z-Image, rflow-tiny).

    ``path``: a diffusers pipeline folder (``model_index.json``), a diffusers ``transformer/`` folder,
    a single transformer file (BFL, ComfyUI prefixes, Z-Image's original file), an rflow pipeline
    folder, or ``None``/``"rflow-tiny"`` for the built-in model. The VAE and text encoders are found next
    to it (``ae.safetensors`` or ``vae/``; ``text_encoder/`` and ``tokenizer/`` folders, FLUX.1 also
    ``text_encoder_2/`` and ``tokenizer_2/``) unless ``vae`` / ``text_encoders`` point elsewhere.
    ``device`` defaults to CUDA when available, ``dtype`` to bfloat16 on CUDA and float32 on CPU.
    ``keep_quantized``: keep GGUF, rflow-quantized and float8 linear weights packed (rflow.quant layers)
    instead of expanding them to ``dtype``; the default for GGUF files and rflow's quantized files.
    ``offload``: "none" (the whole transformer on ``device``), "blocks" or "auto" — stream transformer
    blocks from host memory within ``vram`` (bytes or a size such as "4GiB"; "auto" without it: the
    device's free memory), see :func:`rflow.runtime.offload.offload_`; the transformer is then read
    into host memory first, and the text encoders and VAE stay there, copied to ``device`` only while
    they encode or decode (:func:`rflow.runtime.parts.offload_parts_`; "auto" keeps them resident when
    everything fits). ``text_device``: "auto" (the default), "device" (on ``device``, while encoding
    when offloading) or "cpu" (the text encoders run on the CPU; their conditioning goes to ``device``).
    """
    from .checkpoints.gguf_file import is_gguf
    from .options import device as check_device
    from .paths import resolve_model
    from .runtime.offload import check_options

    offload, vram, _ = check_options(offload, vram)
    text_device = _check_text_device(text_device)
    dev = check_device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    dtype = dtype or default_dtype(dev)
    p = resolve_model(path)
    if (p / MANIFEST).exists():
        return load_rflow_pipeline(p, device=dev, dtype=dtype, offload=offload, vram=vram, text_device=text_device)
    transformer_path, root = _layout(p)
    with Checkpoint(transformer_path) as ck:  # validates the transformer before looking for its companions
        fam, config = ck.family, ck.config
        fingerprint, model_hash = ck.fingerprint(), ck.model_hash()
    if keep_quantized is None:  # GGUF files and rflow's quantized layout stay packed unless asked otherwise
        keep_quantized = transformer_path.is_file() and (is_gguf(transformer_path) or _has_quant_metadata(transformer_path))
    if offload != "none" and not keep_quantized:  # a budget too small for streaming fails before any weight is read
        _probe_offload(fam.build, config, dtype, offload, vram, dev)
    sched_file = root / "scheduler" / "scheduler_config.json"
    sched_cfg = read_json(sched_file) if sched_file.exists() else None
    vae_path = Path(vae).expanduser() if vae is not None else fam.find_codec(root)
    if vae_path is None:
        raise UserError(f"no VAE found next to {p}: give one with {flag('vae', 'PATH')} "
                        f"({fam.CODEC_HELP})")
    te_path = fam.find_text(text_encoders, root)
    if te_path is None:
        raise UserError(f"no text encoders in {text_encoders or root}: give {flag('text_encoders', 'DIR')}, "
                        f"a folder holding {fam.TEXT_HELP}")
    codec = fam.load_codec(vae_path, device=_host(dev, offload), dtype=dtype)
    text = fam.load_text(te_path, device=_host(dev, offload, text_device), dtype=dtype)
    fam.check_parts_fit(config, codec, text, where=str(p))
    plan, place = None, (dev if offload == "none" else torch.device("cpu"))
    if keep_quantized:
        from .quant.load import keep_quantized_plan

        plan = keep_quantized_plan(transformer_path, device=place, dtype=dtype)
    model, info = load_transformer(transformer_path, device=place, dtype=dtype, plan=plan)
    _offload(model, offload, vram, dev)
    kind, shift = fam.default_schedule(config, sched_cfg if isinstance(sched_cfg, dict) else None)
    return _place_parts(Pipeline(model, codec, text, Schedule(kind, shift), default_size=tuple(fam.DEFAULT_SIZE),
                                 name=info.family, max_sequence_length=fam.MAX_SEQUENCE_LENGTH, fingerprint=fingerprint,
                                 model_hash=model_hash, family=fam.NAME), offload, text_device, dev)


TEXT_DEVICES = ("auto", "device", "cpu")


def _check_text_device(text_device: str | None) -> str:
    text_device = "auto" if text_device is None else text_device
    if text_device not in TEXT_DEVICES:
        raise UserError(f"unknown {flag('text_device')} {text_device!r}; choose auto, device or cpu")
    return text_device


def _host(device: torch.device, offload: str, text_device: str = "auto") -> torch.device:
    """Where a text encoder or VAE is read to: host memory when offloading (or for text on the CPU)."""
    return torch.device("cpu") if offload != "none" or text_device == "cpu" else device


def _place_parts(pipe: Pipeline, offload: str, text_device: str, device: torch.device) -> Pipeline:
    """Text encoders and VAE in host memory, on ``device`` only while used (rflow.runtime.parts)."""
    if offload != "none" or text_device == "cpu":
        from .runtime.parts import offload_parts_

        text = {"auto": "auto", "device": "swap" if offload != "none" else "resident", "cpu": "cpu"}[text_device]
        offload_parts_(pipe, text=text, vae="auto", device=device)
    return pipe


PIPELINE_FORMAT_VERSION = 1


def _portable_across_transformers(folder: Path) -> None:
    """Make a folder written by ``save_pretrained`` load the same under transformers 4 and 5.

    transformers 5 writes CLIPTextModel weights without their ``text_model.`` prefix and names a
    tokenizer.json-only tokenizer's class ``TokenizersBackend``; transformers 4 reads neither (it would
    leave CLIP randomly initialised). The Hub layout (prefixed keys, ``PreTrainedTokenizerFast``) loads
    identically under both."""
    import json

    from safetensors.torch import load_file, save_file

    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.exists():
        c = json.loads(tok_cfg.read_text())
        c["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_cfg.write_text(json.dumps(c, indent=2))
    cfg = folder / "config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("model_type") == "clip_text_model":
        w = folder / "model.safetensors"
        sd = load_file(w)
        if not all(k.startswith("text_model.") for k in sd):
            save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}, w,
                      metadata={"format": "pt"})


def save_pipeline(pipe: Pipeline, path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                  extra: dict | None = None) -> Path:
    """Write ``pipe`` as an rflow pipeline folder (``rflow_pipeline.json`` + ``transformer.safetensors``
    with BFL keys + text encoders in the diffusers layout), replacing ``path`` atomically."""
    import json

    from .families.flux1 import CONFIG_METADATA_KEY
    from .checkpoints.io import save_safetensors
    from .outputs import replacing

    if not hasattr(pipe.vae, "to_config"):
        raise UserError("only pipelines with a parameter-free codec can be saved as rflow pipeline folders")
    cfg = pipe.transformer.config
    sd = {k: v.detach().to("cpu", dtype) for k, v in pipe.transformer.state_dict().items()}
    with replacing(path, "dir") as tmp:
        save_safetensors(sd, tmp / "transformer.safetensors",
                         {CONFIG_METADATA_KEY: json.dumps({"axes_dim": list(cfg.axes_dim), "theta": cfg.theta})})
        te = pipe.text_encoders
        for sub, obj in (("text_encoder", te.clip), ("tokenizer", te.clip_tokenizer), ("text_encoder_2", te.t5),
                         ("tokenizer_2", te.t5_tokenizer)):
            obj.save_pretrained(tmp / sub)
            _portable_across_transformers(tmp / sub)
        manifest = {
            "format": "rflow-pipeline", "version": PIPELINE_FORMAT_VERSION, "name": pipe.name,
            "codec": pipe.vae.to_config(), "schedule": {"kind": pipe.schedule.kind, "shift": pipe.schedule.shift},
            "default_size": list(pipe.default_size), "max_sequence_length": pipe.max_sequence_length,
            "family": pipe.family, "prediction": pipe.denoiser_options.get("prediction", "velocity"), **({"grammar": pipe.grammar} if pipe.grammar else {}), **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Path(path)


def _probe_offload(build, config, dtype: torch.dtype, offload: str, vram: int | None, device: torch.device,
                   size=None, text_tokens=None) -> None:
    from .runtime.offload import plan_offload, working_reserve

    with torch.device("meta"):
        probe = build(config).to(dtype).requires_grad_(False)
    plan_offload(probe, vram=vram, mode=offload, device=device,
                 reserve=working_reserve(probe, device, size=size, text_tokens=text_tokens))


def _offload(model, offload: str, vram: int | None, device: torch.device, size=None, text_tokens=None) -> None:
    """Stream ``model``'s blocks (rflow.runtime.offload), the working reserve sized for one call at the
    pipeline's default ``size`` (width, height) and ``text_tokens``."""
    if offload != "none":
        from .runtime.offload import offload_, working_reserve

        offload_(model, vram=vram, mode=offload, device=device,
                 reserve=working_reserve(model, device, size=size, text_tokens=text_tokens))


def load_rflow_pipeline(path: Path, *, device: torch.device, dtype: torch.dtype, offload: str = "none",
                        vram: int | None = None, text_device: str = "auto") -> Pipeline:
    from .models.codec import PixelUnshuffleCodec

    m = read_json(path / MANIFEST)
    if not isinstance(m, dict) or m.get("format") != "rflow-pipeline" or not isinstance(m.get("version"), int):
        raise UserError(f"{path / MANIFEST}: not an rflow pipeline manifest")
    if m["version"] > PIPELINE_FORMAT_VERSION:
        raise UserError(f"{path}: pipeline format version {m['version']} is newer than this rflow reads ({PIPELINE_FORMAT_VERSION})")
    from .checkpoints.fit import check_parts_fit

    try:
        codec = PixelUnshuffleCodec.from_config(m.get("codec", {})).to(_host(device, offload))
        sched = m.get("schedule", {})
        schedule = Schedule(str(sched.get("kind", "flux")), sched.get("shift"))
        w, h = (int(v) for v in m.get("default_size", (1024, 1024)))
        max_len = int(m.get("max_sequence_length", 512))
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path / MANIFEST}: corrupt pipeline manifest ({e})") from None
    prediction = _prediction(m.get("prediction", "velocity"))
    family = str(m.get("family", "flux1"))
    if family != "flux1":
        raise UserError(f"{path / MANIFEST}: rflow pipeline folders hold FLUX.1-shaped models, not {family!r}")
    grammar = m.get("grammar", "shapes" if str(m.get("name", "")).startswith("rflow-tiny") else None)
    with Checkpoint(path / "transformer.safetensors", family="flux1") as ck:
        config = ck.config
    if offload != "none":
        from .families.flux1 import build

        _probe_offload(build, config, dtype, offload, vram, device, (w, h), max_len)
    te = load_text_encoders(path, device=_host(device, offload, text_device), dtype=dtype)
    check_parts_fit(config, codec, te, where=str(path))
    model, info = load_transformer(path / "transformer.safetensors", device=device if offload == "none" else "cpu",
                                   dtype=dtype, family="flux1")
    _offload(model, offload, vram, device, (w, h), max_len)
    with Checkpoint(path / "transformer.safetensors", family="flux1") as ck:
        fingerprint, model_hash = ck.fingerprint(), ck.model_hash()
    pipe = Pipeline(model, codec, te, schedule, default_size=(w, h), name=str(m.get("name", "rflow")),
                    max_sequence_length=max_len, fingerprint=fingerprint, model_hash=model_hash,
                    grammar=grammar, family=family,
                    denoiser_options={} if prediction == "velocity" else {"prediction": prediction})
    return _place_parts(pipe, offload, text_device, device)


def _prediction(kind: str) -> str:
    if kind not in ("velocity", "data"):
        raise UserError(f"unknown model prediction type {kind!r} (velocity or data)")
    return kind


