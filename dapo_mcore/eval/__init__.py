"""Stage 6 — evaluation: greedy accuracy on held-out problem sets with Wilson intervals, and a
side-by-side comparison of checkpoints (JSON + Markdown)."""
from dapo_mcore.eval.evaluate import EvalConfig, SetResult, evaluate_checkpoint, evaluate_set
from dapo_mcore.eval.stats import paired_difference, wilson_interval
from dapo_mcore.eval.table import comparison_markdown, write_comparison

__all__ = ["EvalConfig", "SetResult", "evaluate_checkpoint", "evaluate_set", "wilson_interval", "paired_difference",
           "comparison_markdown", "write_comparison"]
