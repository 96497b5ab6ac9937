"""Side-by-side comparison of checkpoints: per-set accuracy with CIs, and the paired difference of
each model against the first (the baseline), as Markdown and JSON."""
from __future__ import annotations

from pathlib import Path

from dapo_mcore.data.shards import atomic_write_bytes, atomic_write_json
from dapo_mcore.eval.evaluate import SetResult
from dapo_mcore.eval.stats import paired_difference


def compare(results: dict[str, dict[str, SetResult]]) -> dict:
    """``results``: {model label: {set: SetResult}} (first label = baseline). Returns a JSON-able dict
    {"models", "sets", "accuracy": {label: {set: {...}}}, "vs_baseline": {label: {set: paired diff}}}."""
    labels = list(results)
    if not labels:
        raise ValueError("compare: no models")
    sets = list(results[labels[0]])
    for lab in labels[1:]:
        if list(results[lab]) != sets:
            raise ValueError(f"compare: model {lab!r} has sets {list(results[lab])}, baseline has {sets}")
    out = {"models": labels, "sets": sets, "accuracy": {}, "vs_baseline": {}}
    for lab in labels:
        out["accuracy"][lab] = {s: results[lab][s].as_dict() for s in sets}
        if lab == labels[0]:
            continue
        out["vs_baseline"][lab] = {}
        for s in sets:
            a, b = results[labels[0]][s], results[lab][s]
            if a.ids != b.ids:
                raise ValueError(f"compare: set {s!r} has different problems for {labels[0]!r} and {lab!r}")
            out["vs_baseline"][lab][s] = paired_difference(a.rewards, b.rewards, b.confidence)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def comparison_markdown(cmp: dict) -> str:
    """Accuracy table (rows = sets, columns = models, ``acc% [lo, hi]``) and a paired-difference table."""
    labels, sets = cmp["models"], cmp["sets"]
    conf = next(iter(cmp["accuracy"][labels[0]].values()))["confidence"] if sets else 0.95
    head = "| set | n | " + " | ".join(labels) + " |\n|---|---|" + "---|" * len(labels) + "\n"
    rows = []
    for s in sets:
        cells = []
        for lab in labels:
            d = cmp["accuracy"][lab][s]
            cells.append(f"{_pct(d['accuracy'])}% [{_pct(d['ci_lo'])}, {_pct(d['ci_hi'])}]")
        rows.append(f"| {s} | {cmp['accuracy'][labels[0]][s]['n']} | " + " | ".join(cells) + " |")
    md = (f"Greedy accuracy, {conf:.0%} Wilson interval in brackets.\n\n" + head + "\n".join(rows) + "\n")
    if len(labels) > 1:
        md += (f"\nDifference to **{labels[0]}** on the same problems (points, {conf:.0%} paired interval; "
               "solved only by the model / only by the baseline):\n\n| model | set | diff | interval | only model | "
               "only baseline |\n|---|---|---|---|---|---|\n")
        for lab in labels[1:]:
            for s in sets:
                d = cmp["vs_baseline"][lab][s]
                md += (f"| {lab} | {s} | {100 * d['diff']:+.1f} | [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] | "
                       f"{d['b_only']} | {d['a_only']} |\n")
    return md


def write_comparison(results: dict[str, dict[str, SetResult]], out_dir: str | Path) -> dict:
    """Write ``comparison.json`` and ``comparison.md`` into ``out_dir``; return the comparison dict."""
    cmp = compare(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "comparison.json", cmp)
    atomic_write_bytes(out / "comparison.md", comparison_markdown(cmp).encode())
    return cmp
