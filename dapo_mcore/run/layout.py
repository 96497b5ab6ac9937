"""The run directory::

    <out>/config.yaml  timings.json  report.md
    <out>/toy/                                  (toy section only)
    <out>/iter_<k>/<unit>/stage.json            one directory per unit of the stage table
    <out>/iter_<k>/<unit>.job.json              the job of a unit launched under torchrun
    <out>/sglang/                               logs of the SGLang servers the run launched (backend.launch)

and :class:`PipelineError`, what the run modules raise when a stage cannot run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

STAMP = "stage.json"


class PipelineError(RuntimeError):
    """A stage cannot run (missing input, failed worker, bad checkpoint); the message says what to do."""


class RunLayout:
    """The paths of one run directory ``out``."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.config, self.timings, self.report, self.toy, self.fleet_logs = (self.out / name for name in (
            "config.yaml", "timings.json", "report.md", "toy", "sglang"))

    def iteration(self, k: int) -> Path:
        return self.out / f"iter_{k}"

    def unit(self, k: int, name: str) -> Path:
        return self.iteration(k) / name

    def job(self, unit_dir: Path) -> Path:
        return unit_dir.with_name(unit_dir.name + ".job.json")

    def iterations(self) -> list[Path]:
        """The iteration directories present, in order."""
        return sorted((p for p in self.out.glob("iter_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))


def read_stamp(path: str | Path) -> Optional[dict]:
    """A unit directory's ``stage.json``, or None (absent or unreadable)."""
    try:
        return json.loads((Path(path) / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(path: str | Path) -> bool:
    return bool((read_stamp(path) or {}).get("finished"))
