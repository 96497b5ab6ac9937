"""Output checks by output kind (:data:`dapo_mcore.run.stages.SHARDS` / ``CHECKPOINT`` / ``EVAL``): a finished
unit is skipped only when its outputs are complete and intact, not merely present."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open

from dapo_mcore.data.shards import ShardError, file_sha256, load_manifest
from dapo_mcore.eval.evaluate import load_results
from dapo_mcore.run.layout import PipelineError
from dapo_mcore.run.stages import CHECKPOINT, EVAL, SHARDS


def verify_hf_checkpoint(path: str | Path) -> dict:
    """Check an HF checkpoint directory: ``config.json`` parses, the safetensors index (or the single
    ``model.safetensors``) loads, every listed shard exists and holds the tensors the index names.
    Returns ``{"files": {name: bytes}, "headers": sha256 of the shard headers}``; raises PipelineError."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise PipelineError(f"{d}: not an HF checkpoint (no config.json)")
    try:
        json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{d / 'config.json'}:{e.lineno}: invalid JSON ({e.msg})") from None
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PipelineError(f"{index}: corrupt index ({e})") from None
        if not wmap:
            raise PipelineError(f"{index}: empty weight_map")
    elif (d / "model.safetensors").is_file():
        wmap = None
    else:
        raise PipelineError(f"{d}: no model.safetensors or model.safetensors.index.json")
    files = sorted(set(wmap.values())) if wmap else ["model.safetensors"]
    h = hashlib.sha256()
    sizes = {}
    for f in files:
        fp = d / f
        if not fp.is_file():
            raise PipelineError(f"{fp}: shard listed in the index is missing")
        try:
            with safe_open(str(fp), framework="pt") as sf:
                keys = set(sf.keys())
        except Exception as e:  # noqa: BLE001 - any unreadable shard is a corrupt checkpoint
            raise PipelineError(f"{fp}: unreadable safetensors shard ({e})") from None
        if wmap:
            missing = [k for k, v in wmap.items() if v == f and k not in keys]
            if missing:
                raise PipelineError(f"{fp}: tensors {missing[:3]} listed in the index are missing")
        with open(fp, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))
        sizes[f] = fp.stat().st_size
    return {"files": sizes, "headers": h.hexdigest()[:16]}


def verify_sharded(path: str | Path) -> None:
    """A complete manifest whose every shard file matches its recorded size and sha256."""
    try:
        m = load_manifest(path)
    except ShardError as e:
        raise PipelineError(str(e)) from None
    if not m["complete"]:
        raise PipelineError(f"{path}: stage output is not complete")
    if m.get("num_shards") is not None and len(m["shards"]) != m["num_shards"]:
        raise PipelineError(f"{path}: manifest lists {len(m['shards'])} of {m['num_shards']} shards")
    for key, e in m["shards"].items():
        fp = Path(path) / e["file"]
        if not fp.is_file() or fp.stat().st_size != e["bytes"] or file_sha256(fp) != e["sha256"]:
            raise PipelineError(f"{fp}: shard {key} missing or corrupt")


def _summary(path: Path) -> None:
    try:
        json.loads((path / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path / 'summary.json'}: missing or unreadable ({e})") from None


def check_outputs(kind: str, path: str | Path) -> None:
    """Raise PipelineError unless the outputs of a unit of output ``kind`` in ``path`` are complete and intact
    (``EVAL``: one evaluated model's directory)."""
    path = Path(path)
    if kind == SHARDS:
        verify_sharded(path)
        _summary(path)
    elif kind == CHECKPOINT:
        _summary(path)
        verify_hf_checkpoint(path / "hf")
    elif kind == EVAL:
        try:
            load_results(path)
        except (OSError, ValueError, KeyError) as e:
            raise PipelineError(f"{path}: evaluation results missing or corrupt ({e})") from None
    else:
        raise PipelineError(f"unknown output kind {kind!r}")
