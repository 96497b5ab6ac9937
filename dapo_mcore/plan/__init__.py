"""``dapo-mcore plan``: per-GPU memory, throughput and generation-fleet planner (see ``docs/planner.md``)."""
from dapo_mcore.plan.cli import main

__all__ = ["main"]
