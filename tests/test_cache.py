"""FeatureCache: exact round trips, no stale hits, atomic and merge-safe saves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vlkit.data import cache as cache_mod
from vlkit.data.cache import FeatureCache, default_cache_root, file_id

PRE = {"size": 8, "mean": [0.5, 0.5, 0.5]}


def _files(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"pixels %d" % i)
        out.append(p)
    return out


def _ids(store: FeatureCache, paths) -> list:
    return [store.file_id(p) for p in paths]


def test_roundtrip_is_exact_and_one_shard_per_key(tmp_path):
    store = FeatureCache(tmp_path / "c")
    files = _files(tmp_path, 5)
    feats = torch.randn(5, 7)
    shard = store.shard("model-a", PRE)
    shard.put(_ids(store, files), feats)
    shard.save()
    assert sorted(p.suffix for p in (tmp_path / "c").iterdir()) == [".lock", ".safetensors"]
    again = store.shard("model-a", dict(reversed(list(PRE.items()))))  # key order does not matter
    hits, got = again.get(_ids(store, [files[3], files[0]]))
    assert hits == [0, 1] and torch.equal(got, feats[[3, 0]])
    assert len(again) == 5


def test_unsaved_entries_are_visible_before_save(tmp_path):
    store = FeatureCache(tmp_path / "c")
    files = _files(tmp_path, 5)
    shard = store.shard("m", PRE)
    shard.put(_ids(store, files[:2]), torch.tensor([[1.0] * 3, [2.0] * 3]))
    shard.save()
    shard.put(_ids(store, files[2:4]), torch.tensor([[3.0] * 3, [4.0] * 3]))  # not saved yet
    order = [files[3], files[0], files[4], files[2], files[1]]
    hits, got = shard.get(_ids(store, order))
    assert hits == [0, 1, 3, 4] and shard.dirty
    assert got[:, 0].tolist() == [4.0, 1.0, 3.0, 2.0]  # saved and unsaved rows interleaved in query order


def test_changed_model_or_preprocessing_misses(tmp_path):
    store = FeatureCache(tmp_path / "c")
    files = _files(tmp_path, 2)
    shard = store.shard("model-a", PRE)
    shard.put(_ids(store, files), torch.randn(2, 4))
    shard.save()
    assert store.shard("model-b", PRE).get(_ids(store, files)) == ([], None)
    assert store.shard("model-a", {**PRE, "size": 9}).get(_ids(store, files)) == ([], None)
    assert store.shard("model-a", PRE).get(_ids(store, files))[0] == [0, 1]


def test_changed_file_misses_and_its_row_is_replaced(tmp_path):
    store = FeatureCache(tmp_path / "c")
    files = _files(tmp_path, 3)
    shard = store.shard("m", PRE)
    shard.put(_ids(store, files), torch.zeros(3, 4))
    shard.save()
    st = files[1].stat()
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, newer mtime
    fresh = store.shard("m", PRE)
    hits, _ = fresh.get(_ids(store, files))
    assert hits == [0, 2]
    files[2].write_bytes(b"a different, longer content")  # size changes too
    assert fresh.get(_ids(store, files))[0] == [0]
    fresh.put(_ids(store, files[1:2]), torch.ones(1, 4))
    fresh.save()
    reread = store.shard("m", PRE)
    assert len(reread) == 3  # replaced in place, not appended
    hits, got = reread.get(_ids(store, files[:2]))
    assert hits == [0, 1] and torch.equal(got, torch.tensor([[0.0] * 4, [1.0] * 4]))


def test_hash_content_ignores_touch_but_not_edits(tmp_path):
    store = FeatureCache(tmp_path / "c", hash_content=True)
    files = _files(tmp_path, 1)
    shard = store.shard("m", PRE)
    shard.put(_ids(store, files), torch.ones(1, 2))
    shard.save()
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert store.shard("m", PRE).get(_ids(store, files))[0] == [0]
    files[0].write_bytes(b"pixels X")  # same size, other bytes
    assert store.shard("m", PRE).get(_ids(store, files))[0] == []
    # the identity rule is part of the key: an mtime-keyed cache never reads a hash-keyed shard
    assert FeatureCache(tmp_path / "c").shard("m", PRE).path != shard.path


def test_concurrent_writers_merge_instead_of_losing_entries(tmp_path):
    store = FeatureCache(tmp_path / "c")
    files = _files(tmp_path, 4)
    first, second = store.shard("m", PRE), store.shard("m", PRE)
    first.put(_ids(store, files[:2]), torch.full((2, 3), 1.0))
    second.put(_ids(store, files[2:]), torch.full((2, 3), 2.0))  # loaded before `first` saved
    first.save()
    second.save()
    hits, got = store.shard("m", PRE).get(_ids(store, files))
    assert hits == [0, 1, 2, 3]
    assert torch.equal(got[:, 0], torch.tensor([1.0, 1.0, 2.0, 2.0]))


def test_failed_save_keeps_old_shard_and_no_temp_files(tmp_path, monkeypatch):
    store = FeatureCache(tmp_path / "c")
    files = _files(tmp_path, 2)
    shard = store.shard("m", PRE)
    shard.put(_ids(store, files[:1]), torch.ones(1, 3))
    shard.save()
    before = shard.path.read_bytes()

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    shard.put(_ids(store, files[1:]), torch.ones(1, 3))
    with pytest.raises(OSError, match="disk full"):
        shard.save()
    assert shard.path.read_bytes() == before
    assert sorted(p.name for p in shard.path.parent.iterdir() if not p.name.endswith(".lock")) == [shard.path.name]


def test_damaged_shard_reads_as_empty_and_is_rewritten(tmp_path):
    store = FeatureCache(tmp_path / "c")
    files = _files(tmp_path, 1)
    shard = store.shard("m", PRE)
    shard.path.parent.mkdir(parents=True)
    shard.path.write_bytes(b"\x00garbage")
    assert shard.get(_ids(store, files)) == ([], None)
    shard.put(_ids(store, files), torch.ones(1, 2))
    shard.save()
    assert store.shard("m", PRE).get(_ids(store, files))[0] == [0]


def test_put_checks_shapes(tmp_path):
    store = FeatureCache(tmp_path / "c")
    files = _files(tmp_path, 2)
    shard = store.shard("m", PRE)
    with pytest.raises(ValueError, match="2 file ids for 1 feature rows"):
        shard.put(_ids(store, files), torch.ones(1, 2))
    shard.put(_ids(store, files[:1]), torch.ones(1, 2))
    shard.save()
    with pytest.raises(ValueError, match="feature width 3 != cached width 2"):
        shard.put(_ids(store, files[1:]), torch.ones(1, 3))


def test_default_root_and_env_override(tmp_path, monkeypatch):
    monkeypatch.delenv("VLKIT_CACHE", raising=False)
    assert default_cache_root() == Path.home() / ".cache" / "vlkit" / "features"
    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path / "vc"))
    assert FeatureCache().root == tmp_path / "vc" / "features"
    assert FeatureCache(tmp_path / "explicit").root == tmp_path / "explicit"


def test_file_id_is_absolute_and_tracks_size_and_mtime(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"abc")
    monkeypatch.chdir(tmp_path)
    fid = file_id("a.png")
    assert fid.path == str(tmp_path / "a.png") and fid.size == 3 and fid.sha256 is None
    assert fid.mtime_ns == (tmp_path / "a.png").stat().st_mtime_ns
    assert file_id("a.png", hash_content=True).sha256 == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    with pytest.raises(FileNotFoundError):
        file_id("missing.png")
    assert cache_mod.shard_key("m", PRE, False) != cache_mod.shard_key("m", PRE, True)
