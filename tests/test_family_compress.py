"""Compression through the family interface, for the SwiGLU families (FLUX.2, Z-Image) as for FLUX.1.

Counting hooks every LayerRef, pruning slices what LayerRef.slices name, the pruned model is written in
the family's own layout and reloaded by rflow's generic loader with per-block widths — and its output
equals the unpruned model with those units zeroed.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rflow.checkpoints.loader import Checkpoint, load_transformer
from rflow.compress.analyze import ActivationCounter
from rflow.compress.prune import choose_kept, prune_model, zero_units
from rflow.compress.save import save_transformer_like
from rflow.compress.stats import ActivationStats
from rflow.compress.units import layer_refs, select_units, unit_names, unit_widths


pytestmark = pytest.mark.usefixtures("one_thread")


def _zimage(tmp_path):
    from zimage_ref import tiny_diffusers

    tiny_diffusers(seed=3).save_pretrained(tmp_path / "transformer")
    model, _ = load_transformer(tmp_path / "transformer", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 12, generator=g)
    caps = [torch.randn(5, 32, generator=g), torch.randn(9, 32, generator=g)]
    return tmp_path / "transformer", model, lambda m: m(x, torch.tensor([0.3, 0.7]), caps)


def _flux2(tmp_path):
    from flux2_ref import inputs, tiny_transformer

    ref = tiny_transformer(depth=2, depth_single=2)
    ref.save_pretrained(tmp_path / "transformer")
    model, _ = load_transformer(tmp_path / "transformer", dtype=torch.float32)
    _, args = inputs(ref, batch=2, h=3, w=4, seq=5)
    return tmp_path / "transformer", model, lambda m: m(*args)


FAMILIES = {"zimage": _zimage, "flux2": _flux2}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generic_loader_detects_the_family(tmp_path, family):
    path, model, _ = FAMILIES[family](tmp_path)
    with Checkpoint(path) as ck:
        assert ck.family.NAME == family and ck.format == "diffusers"
        summary = ck.info().summary()
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert all(r.kind == "swiglu" for r in layer_refs(model))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_counting_hooks_every_unit_group(tmp_path, family):
    _, model, run = FAMILIES[family](tmp_path)
    with ActivationCounter(model) as counter:
        with torch.no_grad():
            run(model)
    stats = counter.to_stats("fp")
    assert set(stats.units) == set(unit_names(model.config))
    assert all(stats.positions[u] > 0 for u in stats.units)
    for u, w in unit_widths(model.config).items():
        assert stats.count[u].shape == (w,)
        assert 0 < int(stats.count[u].sum()) < w * stats.positions[u]  # SwiGLU products are signed: some fire


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prune_then_reload_equals_zeroing(tmp_path, family):
    path, model, run = FAMILIES[family](tmp_path)
    with ActivationCounter(model) as counter:
        with torch.no_grad():
            run(model)
    stats: ActivationStats = counter.to_stats("fp")
    units = select_units(model.config)
    kept = choose_kept(stats, units, fraction=0.4)
    assert all(kept[u].numel() < unit_widths(model.config)[u] for u in units)

    with torch.no_grad():
        expected = run(zero_units(copy.deepcopy(model), kept))
        full = run(model)
    pruned = prune_model(copy.deepcopy(model), kept)
    widths = unit_widths(pruned.config)
    assert all(widths[u] == kept[u].numel() for u in units)
    assert type(pruned) is type(model)
    with torch.no_grad():
        got = run(pruned)
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-5 * scale
    assert float((full - expected).abs().max()) > 1e-3 * scale  # the pruned units mattered

    saved = save_transformer_like(path, pruned, tmp_path / "pruned.safetensors", dtype=torch.float32)
    reloaded, info = load_transformer(saved.path, dtype=torch.float32)
    assert info.family_kind == family and info.format in ("bfl", "original")
    assert unit_widths(reloaded.config) == widths
    with torch.no_grad():
        again = run(reloaded)
    assert float((again - expected).abs().max()) <= 1e-5 * scale
