"""``rflow bench`` records as a table for people and as JSON for files (written atomically)."""

from __future__ import annotations

import json
import os

from ..memory import format_bytes
from .bench import clean


_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _bytes(v) -> str:
    return "-" if v is None else format_bytes(v)


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}×"


def format_table(res: dict) -> str:
    """The record as a few lines of text: one row per implementation timed, the floor, the image."""
    c = res["config"]
    n = c["parameters"]
    count = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
    lines = [f"rflow bench: {c['name']} ({c['title']}, {count} parameters, {c['weights']} "
             f"{_DTYPES.get(c['dtype'], c['dtype'])} weights{', ' + c['quant'] if c['quant'] else ''}) on {res['device']}, "
             f"{c['width']}x{c['height']}, batch {c['batch']}, {c['image_tokens']} image + {c['text_tokens']} text tokens",
             f"torch {res['torch']}" + (f", CUDA {res['cuda']}" if res["cuda"] else "") + f", {res['date']}"]
    head = f"{'':<18} {'ms/step':>9} {'× floor':>8} {'first call':>11} {'peak GPU':>10} {'peak host':>10}"
    lines += ["", head]
    rows = [("rflow", "rflow eager"), ("rflow_compiled", "rflow compiled"), ("diffusers", "diffusers eager")]
    for key, label in rows:
        e = res.get(key)
        if not e:
            continue
        lines.append(f"{label:<18} {_ms(e['ms']):>9} {_ratio(e.get('ratio_to_floor')):>8} "
                     f"{e['first_call_s']:>10.2f}s {_bytes(e['peak_gpu_bytes']):>10} {_bytes(e['peak_host_bytes']):>10}")
    f = res.get("floor")
    if f:
        best = sorted({a["best"] for a in f["attention"]})
        lines.append(f"{'op floor':<18} {_ms(f['ms']):>9} {'1.00×':>8}   matmuls {_ms(f['matmul_ms'])} ms + attention "
                     f"{_ms(f['attention_ms'])} ms ({', '.join(best) or 'none'})")
    d = res.get("diffusers")
    if d:
        lines.append(f"diffusers' output vs rflow's: max |diff| {d['max_abs_diff']:.3g} (largest |value| "
                     f"{d['ref_max_abs']:.3g}, relative error {d['rel_err']:.3g})")
    off = res.get("offload")
    if off:
        link = (f", host-link limit {_ms(off['host_link_limit_ms'])} ms at {off['h2d_gbps']:.1f} GB/s"
                if "h2d_gbps" in off else "")
        lines.append(f"offload {off['mode']}: {len(off['streamed'])} blocks, {_bytes(off['streamed_bytes'])} streamed "
                     f"per step, {_bytes(off['resident_bytes'])} resident{link}")
    img = res.get("image")
    if img:
        if "s" in img:
            lines.append(f"whole image: {img['steps']} steps + VAE decode in {img['s']:.3f} s "
                         f"(decode {_ms(img['decode_ms'])} ms)")
        else:
            lines.append(f"whole image: {img.get('skipped') or img.get('error')}")
    return "\n".join(lines)


def to_json(res: dict) -> str:
    return json.dumps(clean(res), indent=1, allow_nan=False) + "\n"


def write_json(res: dict, path: str | os.PathLike) -> None:
    from ..outputs import atomic_write_bytes

    atomic_write_bytes(path, to_json(res).encode())
