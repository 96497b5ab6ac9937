"""Sharded, atomic, resumable stage output (used by every pipeline stage).

A stage writes its records as numbered shards plus ``manifest.json`` in its output directory::

    out/
      manifest.json            {"stage", "config_hash", "config", "format", "num_shards",
                                "shards": {"00000": {"file", "records", "sha256", "bytes"}}, "complete"}
      shard-00000.parquet
      shard-00001.parquet ...

Rules
- Work is split into shards *deterministically* by the stage (same input + config -> same shard
  contents). A shard is the unit of resume: a finished shard is kept, an unfinished one is
  recomputed whole, so a killed-and-resumed run writes the same records as an uninterrupted one.
- Every file write is atomic: write ``<name>.tmp-<pid>``, fsync, ``os.replace``. The manifest is
  updated (atomically) only after its shard file is in place, so a shard listed in the manifest
  is always complete.
- On re-run a shard counts as done only if it is listed, its file exists, and its size, sha256
  and record count match the manifest (not just presence). Corrupt shards are recomputed.
- A directory written with another ``config_hash`` is refused (:class:`ShardError`) unless
  ``overwrite=True``, which deletes the old shards.

Formats: ``parquet`` (pyarrow; nested lists/structs supported) or ``jsonl``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
FORMATS = ("parquet", "jsonl")


class ShardError(RuntimeError):
    """Stage output directory is inconsistent with the requested run."""


def config_hash(config: Any) -> str:
    """Stable sha256 (16 hex chars) of a JSON-able config (dataclasses allowed)."""
    if is_dataclass(config):
        config = asdict(config)
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory + ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def _encode_records(records: list[dict], fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buf, compression="zstd")
    return buf.getvalue()


def read_shard_file(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open("r", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


class ShardedWriter:
    """Writer for one stage's output directory (see module docstring).

    ``config`` identifies the run (stage config + input identity); its hash must match an existing
    manifest. Use :meth:`is_done` to skip finished shards, :meth:`write_shard` to commit one, and
    :meth:`finalize` after the last.
    """

    def __init__(self, out_dir: str | Path, stage: str, config: Any, fmt: str = "parquet",
                 overwrite: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"shard format must be one of {FORMATS}, got {fmt!r}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stage, self.fmt = stage, fmt
        self.config = asdict(config) if is_dataclass(config) else config
        self.hash = config_hash(self.config)
        mpath = self.dir / MANIFEST
        if mpath.exists():
            old = load_manifest(self.dir)
            if (old["config_hash"] != self.hash or old["stage"] != stage or old["format"] != fmt):
                if not overwrite:
                    raise ShardError(
                        f"{mpath}: written by stage {old['stage']!r} with config {old['config_hash']} "
                        f"(format {old['format']}), this run is {stage!r} with {self.hash} ({fmt}); "
                        "use another output directory or overwrite=True")
                for name in os.listdir(self.dir):
                    if name.startswith("shard-"):
                        os.remove(self.dir / name)
                old = None
        else:
            old = None
        self.manifest = old or {"stage": stage, "config_hash": self.hash, "config": self.config,
                                "format": fmt, "num_shards": None, "shards": {}, "complete": False}
        atomic_write_json(mpath, self.manifest)

    @staticmethod
    def key(idx: int) -> str:
        return f"{idx:05d}"

    def shard_path(self, idx: int) -> Path:
        return self.dir / f"shard-{self.key(idx)}.{self.fmt}"

    def is_done(self, idx: int) -> bool:
        """True if shard ``idx`` is listed and its file validates (size, sha256, record count)."""
        entry = self.manifest["shards"].get(self.key(idx))
        if entry is None:
            return False
        path = self.dir / entry["file"]
        ok = (path.is_file() and path.stat().st_size == entry["bytes"] and file_sha256(path) == entry["sha256"])
        if ok:
            try:
                ok = len(read_shard_file(path)) == entry["records"]
            except Exception:  # unreadable = not done
                ok = False
        if not ok:  # forget it; it will be recomputed whole
            del self.manifest["shards"][self.key(idx)]
            self.manifest["complete"] = False
            atomic_write_json(self.dir / MANIFEST, self.manifest)
        return ok

    def write_shard(self, idx: int, records: list[dict], counts: dict | None = None) -> None:
        """Atomically write shard ``idx`` and record it in the manifest (with ``counts``, the work that made
        it, e.g. generated tokens, kept in its entry so that a resumed stage can still count all of it)."""
        path = self.shard_path(idx)
        data = _encode_records(records, self.fmt)
        atomic_write_bytes(path, data)
        self.manifest["shards"][self.key(idx)] = {
            "file": path.name, "records": len(records),
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        if counts is not None:
            self.manifest["shards"][self.key(idx)]["counts"] = counts
        atomic_write_json(self.dir / MANIFEST, self.manifest)

    def finalize(self, num_shards: int, summary: dict | None = None) -> None:
        """Mark the stage complete (every shard 0..num_shards-1 must be written)."""
        missing = [i for i in range(num_shards) if self.key(i) not in self.manifest["shards"]]
        if missing:
            raise ShardError(f"{self.dir}: cannot finalize, shards {missing[:10]} not written")
        extra = sorted(k for k in self.manifest["shards"] if int(k) >= num_shards)
        if extra:
            raise ShardError(f"{self.dir}: manifest lists shards {extra} beyond num_shards={num_shards}")
        self.manifest["num_shards"] = num_shards
        self.manifest["complete"] = True
        if summary is not None:
            self.manifest["summary"] = summary
        atomic_write_json(self.dir / MANIFEST, self.manifest)


def load_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no manifest (not a stage output directory)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}:{e.lineno}: invalid manifest JSON ({e.msg})") from e
    for k in ("stage", "config_hash", "format", "shards", "complete"):
        if k not in m:
            raise ShardError(f"{path}: manifest has no {k!r}")
    return m


def iter_records(out_dir: str | Path, require_complete: bool = True, verify: bool = True) -> Iterator[dict]:
    """Yield every record of a stage output in shard order (shard 0 first)."""
    m = load_manifest(out_dir)
    if require_complete and not m["complete"]:
        raise ShardError(f"{Path(out_dir) / MANIFEST}: stage {m['stage']!r} is not complete; run it first")
    for key in sorted(m["shards"]):
        entry = m["shards"][key]
        path = Path(out_dir) / entry["file"]
        if verify and file_sha256(path) != entry["sha256"]:
            raise ShardError(f"{path}: checksum does not match the manifest (corrupt shard)")
        recs = read_shard_file(path)
        if len(recs) != entry["records"]:
            raise ShardError(f"{path}: {len(recs)} records, manifest says {entry['records']}")
        yield from recs


def chunk(items: list, size: int) -> list[list]:
    """Deterministic split of ``items`` into consecutive chunks of ``size`` (last may be shorter)."""
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


def input_identity(out_dir: str | Path) -> dict:
    """What identifies a finished stage output as the input of the next stage."""
    m = load_manifest(out_dir)
    return {"stage": m["stage"], "config_hash": m["config_hash"],
            "shards": {k: v["sha256"] for k, v in sorted(m["shards"].items())}}


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    """Write a stage's ``summary.json`` atomically (the one writer of that file; distributed stages call it on
    rank 0): a stage's summary exists only once its outputs do."""
    path = Path(out_dir) / "summary.json"
    atomic_write_json(path, summary)
    return path


__all__ = ["ShardError", "ShardedWriter", "config_hash", "atomic_write_bytes", "atomic_write_json",
           "iter_records", "load_manifest", "read_shard_file", "chunk", "input_identity",
           "write_summary"]
