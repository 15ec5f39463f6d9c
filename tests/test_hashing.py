"""Tests for rflow.checkpoints.hashing: model hash, per-tensor digests, content fingerprint and the cache."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rflow.checkpoints import hashing
from rflow.checkpoints.hashing import (
    FileDigests,
    cache_dir,
    clear_memory_cache,
    content_fingerprint,
    file_digests,
    model_hash,
)
from rflow.errors import UserError

PREFIX = "model.diffusion_model."


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RFLOW_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    yield
    clear_memory_cache()


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "double_blocks.0.img_attn.qkv.weight": torch.randn(12, 4, generator=g, dtype=torch.float32),
        "double_blocks.0.img_attn.qkv.bias": torch.randn(12, generator=g).to(torch.bfloat16),
        "final_layer.linear.weight": torch.randn(3, 5, generator=g).to(torch.float16),
        "img_in.weight": torch.randint(-100, 100, (7, 3), generator=g, dtype=torch.int64),
        "guidance_in.flag": torch.tensor([True, False, True]),
        "empty.weight": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }


def _raw(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def _plan(keys, prefix: str = "") -> dict[str, list[str]]:
    return {k: [prefix + k] for k in keys}


def _rewrite_keeping_stat(path: Path, data: bytes) -> None:
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _flip_last_byte(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    return bytes(data)


# --- cache_dir -----------------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("RFLOW_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("RFLOW_CACHE_DIR")
    assert cache_dir() == tmp_path / "x" / "rflow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "rflow"


# --- file_digests --------------------------------------------------------------------------------


def test_file_sha256_matches_hashlib(tmp_path):
    p = _save(_tensors(), tmp_path / "m.safetensors")
    d = file_digests(p)
    assert isinstance(d, FileDigests)
    assert d.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_tensor_digests_match_raw_bytes(tmp_path):
    ts = _tensors()
    p = _save(ts, tmp_path / "m.safetensors")
    header = json.loads(p.read_bytes()[8 : 8 + int.from_bytes(p.read_bytes()[:8], "little")])
    d = file_digests(p)
    assert set(d.tensors) == set(ts)
    for k, t in ts.items():
        dtype, shape, sha = d.tensors[k]
        assert dtype == header[k]["dtype"]
        assert shape == tuple(t.shape)
        assert sha == hashlib.sha256(_raw(t)).hexdigest(), k
    assert d.tensors["double_blocks.0.img_attn.qkv.bias"][0] == "BF16"
    assert d.tensors["empty.weight"] == ("F32", (0, 4), hashlib.sha256(b"").hexdigest())
    assert d.tensors["scalar"][1] == ()


def _custom_order_file(path: Path, ts: dict[str, torch.Tensor], order: list[str], metadata: dict | None = None) -> Path:
    """A valid safetensors file whose data section holds the tensors in ``order`` (not header order)."""
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.bool: "BOOL", torch.float64: "F64"}
    header: dict = {"__metadata__": metadata} if metadata else {}
    blobs, pos = [], 0
    offsets = {}
    for k in order:
        raw = _raw(ts[k])
        offsets[k] = [pos, pos + len(raw)]
        blobs.append(raw)
        pos += len(raw)
    for k in sorted(ts, reverse=True):  # header keys in yet another order
        header[k] = {"dtype": names[ts[k].dtype], "shape": list(ts[k].shape), "data_offsets": offsets[k]}
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + b"".join(blobs))
    return path


def test_tensors_out_of_offset_order(tmp_path):
    ts = _tensors()
    order = ["scalar", "img_in.weight", "empty.weight", "double_blocks.0.img_attn.qkv.weight",
             "guidance_in.flag", "final_layer.linear.weight", "double_blocks.0.img_attn.qkv.bias"]
    p = _custom_order_file(tmp_path / "odd.safetensors", ts, order)
    from safetensors.torch import load_file
    loaded = load_file(str(p))  # the file is valid for safetensors itself
    assert all(torch.equal(loaded[k], ts[k]) for k in ts)
    d = file_digests(p)
    for k, t in ts.items():
        assert d.tensors[k][2] == hashlib.sha256(_raw(t)).hexdigest(), k
    normal = _save(ts, tmp_path / "normal.safetensors")
    assert content_fingerprint([p], _plan(ts)) == content_fingerprint([normal], _plan(ts))


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_small_chunks_give_same_digests(tmp_path, monkeypatch, chunk):
    ts = _tensors()
    ts["big"] = torch.randn(300, 17)
    p = _save(ts, tmp_path / "m.safetensors")
    big = file_digests(p)
    clear_memory_cache()
    shutil.rmtree(cache_dir())
    monkeypatch.setattr(hashing, "CHUNK", chunk)
    calls = []
    small = file_digests(p, progress=lambda done, total: calls.append((done, total)))
    assert small == big
    size = p.stat().st_size
    assert calls[-1] == (size, size)
    assert all(t == size for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    if chunk < 64:
        assert len(calls) > 10


def test_file_read_once(tmp_path, monkeypatch):
    p = _save(_tensors(), tmp_path / "m.safetensors")
    reads = []
    real_open = builtins.open

    def counting_open(file, mode="r", *a, **k):
        if Path(str(file)) == p:
            reads.append(mode)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", counting_open)
    d1 = file_digests(p)
    assert reads == ["rb"]
    assert file_digests(p) == d1  # in-memory cache
    clear_memory_cache()
    assert file_digests(p) == d1  # hashes.json
    assert reads == ["rb"]
    model_hash([p])
    content_fingerprint([p], _plan(_tensors()))
    assert reads == ["rb"]


# --- cache ---------------------------------------------------------------------------------------


def test_cache_keyed_by_size_and_mtime(tmp_path):
    p = _save(_tensors(), tmp_path / "m.safetensors")
    first = file_digests(p)
    assert (cache_dir() / "hashes.json").is_file()
    _rewrite_keeping_stat(p, _flip_last_byte(p))
    assert file_digests(p) == first  # same size and mtime: cached (memory)
    clear_memory_cache()
    assert file_digests(p) == first  # cached (hashes.json)
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    changed = file_digests(p)
    assert changed.sha256 == hashlib.sha256(p.read_bytes()).hexdigest() != first.sha256


def test_cache_keyed_by_resolved_path(tmp_path, monkeypatch):
    p = _save(_tensors(), tmp_path / "m.safetensors")
    d = file_digests(p)
    monkeypatch.chdir(tmp_path)
    data = json.loads((cache_dir() / "hashes.json").read_text())
    assert list(data["entries"]) == [str(p.resolve())]
    clear_memory_cache()
    _rewrite_keeping_stat(p, _flip_last_byte(p))
    assert file_digests(Path("m.safetensors")) == d  # relative path, same entry
    link = tmp_path / "link.safetensors"
    link.symlink_to(p)
    assert file_digests(link) == d


@pytest.mark.parametrize("junk", [b"", b"{not json", b"[1, 2]", b'{"version": 1, "entries": {"x": 3}}', b"\xff\xfe"])
def test_corrupt_cache_is_ignored(tmp_path, junk):
    p = _save(_tensors(), tmp_path / "m.safetensors")
    cache_dir().mkdir(parents=True)
    (cache_dir() / "hashes.json").write_bytes(junk)
    d = file_digests(p)
    assert d.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    data = json.loads((cache_dir() / "hashes.json").read_text())  # rewritten as a valid cache
    assert str(p.resolve()) in data["entries"]


def test_corrupt_cache_entry_is_ignored(tmp_path):
    p = _save(_tensors(), tmp_path / "m.safetensors")
    file_digests(p)
    f = cache_dir() / "hashes.json"
    data = json.loads(f.read_text())
    entry = data["entries"][str(p.resolve())]
    entry["tensors"] = {"a": ["F32"]}
    f.write_text(json.dumps(data))
    clear_memory_cache()
    assert file_digests(p).tensors["scalar"][1] == ()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_cache_dir(tmp_path):
    p = _save(_tensors(), tmp_path / "m.safetensors")
    cache_dir().mkdir(parents=True)
    cache_dir().chmod(0o500)
    try:
        d = file_digests(p)
        assert d.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
        assert list(cache_dir().iterdir()) == []
    finally:
        cache_dir().chmod(0o700)


def test_cache_path_is_a_file(tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    monkeypatch.setenv("RFLOW_CACHE_DIR", str(blocker / "sub"))
    p = _save(_tensors(), tmp_path / "m.safetensors")
    assert file_digests(p).sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_cache_keeps_at_most_max_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "MAX_ENTRIES", 3)
    paths = [_save({"w": torch.full((2,), float(i))}, tmp_path / f"m{i}.safetensors") for i in range(5)]
    for p in paths:
        file_digests(p)
    data = json.loads((cache_dir() / "hashes.json").read_text())
    assert list(data["entries"]) == [str(p.resolve()) for p in paths[2:]]
    assert not [f for f in cache_dir().iterdir() if f.name != "hashes.json"]  # no temp files left


def test_two_processes_share_the_cache_file(tmp_path):
    a = _save(_tensors(1), tmp_path / "a.safetensors")
    b = _save(_tensors(2), tmp_path / "b.safetensors")
    file_digests(a)
    clear_memory_cache()  # as if another process: it only sees hashes.json
    file_digests(b)
    data = json.loads((cache_dir() / "hashes.json").read_text())
    assert set(data["entries"]) == {str(a.resolve()), str(b.resolve())}


# --- bad files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"abc",
        b"garbage!" * 100,
        (5).to_bytes(8, "little") + b"{bad}",
        (2).to_bytes(8, "little") + b"[]",
        (1000).to_bytes(8, "little") + b"{}",
        (30).to_bytes(8, "little") + b'{"a": {"dtype": "F32"}}'.ljust(30),
    ],
)
def test_garbage_file_raises_user_error(tmp_path, content):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(content)
    with pytest.raises(UserError, match="junk.safetensors") as e:
        file_digests(p)
    assert "\n" not in str(e.value)


def test_truncated_file_raises_user_error(tmp_path):
    p = _save(_tensors(), tmp_path / "m.safetensors")
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(UserError, match="truncated"):
        file_digests(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        file_digests(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="directory"):
        file_digests(tmp_path)


# --- model_hash and content_fingerprint ----------------------------------------------------------


def test_model_hash_is_sha256_prefix(tmp_path):
    p = _save(_tensors(), tmp_path / "m.safetensors")
    assert model_hash([p]) == hashlib.sha256(p.read_bytes()).hexdigest()[:10]


def test_renamed_copy_matches(tmp_path):
    ts = _tensors()
    p = _save(ts, tmp_path / "m.safetensors")
    q = tmp_path / "other" / "renamed.safetensors"
    q.parent.mkdir()
    shutil.copyfile(p, q)
    assert model_hash([q]) == model_hash([p])
    assert content_fingerprint([q], _plan(ts)) == content_fingerprint([p], _plan(ts))
    assert len(model_hash([p])) == 10 and len(content_fingerprint([p], _plan(ts))) == 16


def test_changed_value_changes_both(tmp_path):
    ts = _tensors()
    p = _save(ts, tmp_path / "a.safetensors")
    ts2 = dict(ts)
    ts2["final_layer.linear.weight"] = ts["final_layer.linear.weight"].clone()
    ts2["final_layer.linear.weight"][1, 2] += 1
    q = _save(ts2, tmp_path / "b.safetensors")
    assert p.stat().st_size == q.stat().st_size
    assert model_hash([q]) != model_hash([p])
    assert content_fingerprint([q], _plan(ts)) != content_fingerprint([p], _plan(ts))


def test_same_shapes_different_model(tmp_path):
    p = _save(_tensors(1), tmp_path / "a.safetensors")
    q = _save(_tensors(2), tmp_path / "b.safetensors")
    plan = _plan(_tensors())
    assert content_fingerprint([p], plan) != content_fingerprint([q], plan)


def test_dtype_is_part_of_fingerprint(tmp_path):
    p = _save({"w": torch.zeros(4, dtype=torch.float32)}, tmp_path / "a.safetensors")
    q = _save({"w": torch.zeros(4, dtype=torch.int32)}, tmp_path / "b.safetensors")  # same raw bytes
    assert file_digests(p).tensors["w"][2] == file_digests(q).tensors["w"][2]
    assert content_fingerprint([p], {"w": ["w"]}) != content_fingerprint([q], {"w": ["w"]})


def test_comfyui_prefix_copy(tmp_path):
    ts = _tensors()
    p = _save(ts, tmp_path / "flux.safetensors")
    q = _save({PREFIX + k: v for k, v in ts.items()}, tmp_path / "comfy.safetensors")
    assert content_fingerprint([q], _plan(ts, PREFIX)) == content_fingerprint([p], _plan(ts))
    assert model_hash([q]) != model_hash([p])


def test_metadata_and_extra_keys_do_not_change_fingerprint(tmp_path):
    ts = _tensors()
    p = _save(ts, tmp_path / "a.safetensors")
    q = _save({**ts, "bookkeeping.step": torch.tensor([7])}, tmp_path / "b.safetensors", metadata={"note": "fine-tuned"})
    assert content_fingerprint([q], _plan(ts)) == content_fingerprint([p], _plan(ts))
    assert model_hash([q]) != model_hash([p])


def test_fingerprint_formula(tmp_path):
    ts = _tensors()
    p = _save(ts, tmp_path / "a.safetensors")
    plan = {"fused": ["img_in.weight", "scalar"], "a.bias": ["double_blocks.0.img_attn.qkv.bias"]}
    d = file_digests(p).tensors
    lines = "".join(f"{dst}\t{i}\t{d[s][0]}\t{d[s][1]}\t{d[s][2]}\n" for dst in sorted(plan) for i, s in enumerate(plan[dst]))
    assert content_fingerprint([p], plan) == hashlib.sha256(lines.encode()).hexdigest()[:16]
    swapped = {"fused": ["scalar", "img_in.weight"], "a.bias": plan["a.bias"]}
    assert content_fingerprint([p], swapped) != content_fingerprint([p], plan)


def test_fingerprint_across_shards(tmp_path):
    ts = _tensors()
    keys = sorted(ts)
    one = _save(ts, tmp_path / "one.safetensors")
    s1 = _save({k: ts[k] for k in keys[:3]}, tmp_path / "s1.safetensors")
    s2 = _save({k: ts[k] for k in keys[3:]}, tmp_path / "s2.safetensors")
    plan = _plan(ts)
    assert content_fingerprint([s1, s2], plan) == content_fingerprint([s2, s1], plan) == content_fingerprint([one], plan)


def test_missing_source_key_raises(tmp_path):
    p = _save(_tensors(), tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="missing.weight"):
        content_fingerprint([p], {"x": ["missing.weight"]})


def test_sharded_model_hash(tmp_path):
    a = _save({"w": torch.ones(3)}, tmp_path / "a.safetensors")
    b = _save({"v": torch.zeros(3)}, tmp_path / "b.safetensors")
    sha_a = hashlib.sha256(a.read_bytes()).hexdigest()
    sha_b = hashlib.sha256(b.read_bytes()).hexdigest()
    assert model_hash([a, b]) == hashlib.sha256(f"{sha_a}\n{sha_b}".encode()).hexdigest()[:10]
    assert model_hash([a, b]) != model_hash([b, a])
    c = _save({"v": torch.full((3,), 2.0)}, tmp_path / "c.safetensors")
    assert model_hash([a, c]) != model_hash([a, b])


def test_model_hash_needs_files():
    with pytest.raises(UserError):
        model_hash([])


def test_failed_cache_write_is_ignored(tmp_path, monkeypatch):
    p = _save(_tensors(), tmp_path / "m.safetensors")

    def refuse(*a, **k):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(hashing.os, "replace", refuse)
    d = file_digests(p)
    assert d.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert list(cache_dir().iterdir()) == []  # the temp file was removed


def test_unreadable_cache_is_treated_as_empty(tmp_path, monkeypatch):
    p = _save(_tensors(), tmp_path / "m.safetensors")
    file_digests(p)
    clear_memory_cache()
    real_open = builtins.open

    def guarded_open(file, *a, **k):
        if Path(str(file)).name == "hashes.json":
            raise PermissionError("denied")
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded_open)
    assert file_digests(p).sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
