"""Stamps: every unit directory's ``stage.json`` holds the unit's config, the identity of its inputs hashed
with the config's identity fields into ``digest``, ``finished`` and the compute ``seconds``.

A unit's digest hashes ``{"stage", "config": identity(cfg), "inputs"}`` (:func:`dapo_mcore.config.identity`:
the fields that can change results; paths are left out, inputs are identified by content): upstream units
by their digest and shard checksums, checkpoints by their files and shard headers, data files by sha256.
On re-run a unit is ``done`` (same digest, finished, outputs check out), ``resume`` (same digest, unfinished
or damaged outputs), ``stale`` (another digest: recompute from scratch) or ``new``.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from dapo_mcore.data.shards import MANIFEST, atomic_write_json, input_identity
from dapo_mcore.run.checks import verify_hf_checkpoint
from dapo_mcore.run.layout import STAMP, PipelineError, read_stamp


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(path: str | Path) -> dict:
    """What identifies a checkpoint as an input: its files and headers, plus the digest of the unit that
    produced it (``../stage.json``) when it is one of a run's outputs."""
    try:
        ident = dict(verify_hf_checkpoint(path))
    except PipelineError as e:
        raise PipelineError(f"input checkpoint: {e}") from None
    stamp = read_stamp(Path(path).parent)
    if stamp is not None:
        ident["stage_digest"] = stamp.get("digest")
    return ident


def output_identity(path: Path) -> dict:
    """What identifies a finished unit's output as another unit's input: its digest, and its shards'
    checksums when it wrote shards."""
    st = read_stamp(path)
    if not st or not st.get("finished"):
        raise PipelineError(f"{path}: input stage {path.name!r} has not finished; run it first "
                            f"(`dapo-mcore run CONFIG` runs every stage)")
    return {"digest": st["digest"], **(input_identity(path) if (path / MANIFEST).is_file() else {})}


def status(path: Path, dig: str, check: Callable[[Path], None], log: Callable[[str], None]) -> str:
    """``"done"``, ``"resume"`` (same inputs, unfinished or damaged), ``"stale"`` or ``"new"``; ``check(path)``
    raises PipelineError for damaged outputs."""
    st = read_stamp(path)
    if st is None:
        return "new"
    if st.get("digest") != dig:
        return "stale"
    if not st.get("finished"):
        return "resume"
    try:
        check(path)
    except PipelineError as e:
        log(f"  {path}: {e}; recomputing")
        return "resume"
    return "done"


def begin(path: Path, unit: str, dig: str, config: dict, inputs: dict) -> None:
    """Stamp ``path`` unfinished (before the unit computes)."""
    atomic_write_json(path / STAMP, {"stage": unit, "digest": dig, "finished": False, "config": config,
                                     "inputs": inputs})


def record(path: Path, **fields: Any) -> None:
    """Add ``fields`` to the stamp of ``path`` (e.g. ``served_model``: what an SGLang fleet served the unit)."""
    st = json.loads((path / STAMP).read_text())
    st.update(fields)
    atomic_write_json(path / STAMP, st)


def finish(path: Path, seconds: float) -> None:
    """Mark the unit in ``path`` finished (after its outputs checked out)."""
    st = json.loads((path / STAMP).read_text())
    st.update(finished=True, seconds=seconds, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(path / STAMP, st)
