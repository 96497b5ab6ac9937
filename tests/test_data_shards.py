"""Sharded stage output: atomic writes, validation on resume, config mismatch, finalize."""
from __future__ import annotations

import pytest

from dapo_mcore.data.shards import (ShardError, ShardedWriter, chunk, config_hash, iter_records, load_manifest)


def recs(i, n=3):
    return [{"shard": i, "k": k, "ids": [i, k], "v": 0.5 * k, "nested": [{"a": [1, 2], "b": None}]} for k in range(n)]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_write_resume_and_read(tmp_path, fmt):
    w = ShardedWriter(tmp_path, "demo", {"x": 1}, fmt)
    assert not w.is_done(0)
    w.write_shard(0, recs(0))
    w.write_shard(1, recs(1, 2))
    assert not list(tmp_path.glob("*.tmp-*"))                          # no temp files left behind
    with pytest.raises(ShardError, match="not complete"):
        list(iter_records(tmp_path))
    w2 = ShardedWriter(tmp_path, "demo", {"x": 1}, fmt)                # a re-run
    assert w2.is_done(0) and w2.is_done(1) and not w2.is_done(2)
    w2.write_shard(2, recs(2, 1))
    w2.finalize(3, {"n": 6})
    m = load_manifest(tmp_path)
    assert m["complete"] and m["num_shards"] == 3 and m["summary"] == {"n": 6}
    assert [r["shard"] for r in iter_records(tmp_path)] == [0, 0, 0, 1, 1, 2]
    assert list(iter_records(tmp_path))[1] == recs(0)[1]


def test_corrupt_or_missing_shard_is_recomputed(tmp_path):
    w = ShardedWriter(tmp_path, "demo", {"x": 1})
    for i in range(3):
        w.write_shard(i, recs(i))
    (tmp_path / "shard-00001.parquet").write_bytes(b"garbage")
    (tmp_path / "shard-00002.parquet").unlink()
    w2 = ShardedWriter(tmp_path, "demo", {"x": 1})
    assert [w2.is_done(i) for i in range(3)] == [True, False, False]
    assert sorted(load_manifest(tmp_path)["shards"]) == ["00000"]
    with pytest.raises(ShardError, match="not written"):
        w2.finalize(3)


def test_checksum_checked_on_read(tmp_path):
    w = ShardedWriter(tmp_path, "demo", {"x": 1}, "jsonl")
    w.write_shard(0, recs(0))
    w.finalize(1)
    p = tmp_path / "shard-00000.jsonl"
    p.write_text(p.read_text().replace('"k": 1', '"k": 9'))
    with pytest.raises(ShardError, match="checksum"):
        list(iter_records(tmp_path))


def test_config_mismatch_and_overwrite(tmp_path):
    w = ShardedWriter(tmp_path, "demo", {"x": 1})
    w.write_shard(0, recs(0))
    with pytest.raises(ShardError, match="use another output directory"):
        ShardedWriter(tmp_path, "demo", {"x": 2})
    with pytest.raises(ShardError):
        ShardedWriter(tmp_path, "other", {"x": 1})
    w3 = ShardedWriter(tmp_path, "demo", {"x": 2}, overwrite=True)
    assert not w3.is_done(0) and not (tmp_path / "shard-00000.parquet").exists()


def test_bad_manifest_and_helpers(tmp_path):
    with pytest.raises(ShardError, match="no manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"stage": "x",\n "oops"}')
    with pytest.raises(ShardError, match=r"manifest.json:2: invalid manifest JSON"):
        load_manifest(tmp_path)
    assert chunk(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        chunk([1], 0)
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1}) != config_hash({"a": 2})
    with pytest.raises(ValueError, match="format"):
        ShardedWriter(tmp_path / "z", "demo", {}, "csv")
