"""The run report: ``<out>/report.md`` built from the run directory's files alone.

Sections: verdict and before/after accuracy table (with intervals), stage timings and throughputs,
dataset counts, critic calibration (held-out metrics + ``calibration.png``), advantage histogram,
actor loss curves (``actor_loss.png``, drawn here from ``metrics.jsonl``), and the resolved config.
It says plainly when DAPO did not beat the reference. Stages are listed in the order of the stage table, each
with the line its table row draws from its ``summary.json``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import matplotlib

from dapo_mcore.eval.diagnostics import diagnostics_markdown, iteration_diagnostics
from dapo_mcore.eval.table import comparison_markdown
from dapo_mcore.run.layout import RunLayout
from dapo_mcore.run.stages import NEXT_REFERENCE, STAGE, STAGES


def _load(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(x, nd: int = 3) -> str:
    if isinstance(x, float):
        return "n/a" if not math.isfinite(x) else f"{x:.{nd}f}"
    return str(x)


def verdict(cmp: dict, label: str = "dapo") -> list[str]:
    """One line per set: did ``label`` beat the reference beyond the paired interval?"""
    if label not in cmp.get("vs_baseline", {}):
        return [f"- **{label}**: no trained checkpoint to compare in this run."]
    lines = []
    for s, d in cmp["vs_baseline"][label].items():
        diff = f"{100 * d['diff']:+.1f} points [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
        if d["lo"] > 0:
            lines.append(f"- {s}: **{label} beat the reference**: {diff} (interval above zero).")
        elif d["diff"] > 0:
            lines.append(f"- {s}: {label} did **not** clearly beat the reference: {diff} (interval includes zero).")
        else:
            lines.append(f"- {s}: {label} did **not** beat the reference: {diff}.")
    return lines


def plot_actor_losses(metrics: dict[str, Path], out_png: Path) -> Optional[Path]:
    """Plot every numeric ``*loss*`` key of each ``metrics.jsonl`` against ``step``; None if none."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # after choosing the backend

    series = {}
    for label, path in metrics.items():
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        for key in sorted({k for r in rows for k in r if "loss" in k}):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
            if pts:
                series[f"{label}: {key}"] = pts
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("actor training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


ORDER = tuple(s.name for s in STAGES)
MAIN_LABEL = STAGE[NEXT_REFERENCE].label       # the DAPO policy: the verdict every report states


def _note(stage: str, summary: Optional[dict]) -> str:
    """The stage table row's line for a unit's summary (empty when it has none)."""
    row = STAGE.get(stage)
    return row.note(summary) if row is not None and summary else ""


def write_report(out_dir: str | Path) -> Path:
    """Write ``<out_dir>/report.md`` (and the PNGs it draws); return its path."""
    layout = RunLayout(Path(out_dir))
    out = layout.out
    timings = _load(layout.timings) or {}
    iters = layout.iterations()
    md = [f"# DAPO run report: `{out}`", "",
          "Direct Advantage Policy Optimization (arXiv 2412.18279).", ""]
    for it in iters:
        k = it.name
        md += [f"## {k}", ""]
        cmp = _load(it / "eval" / "comparison.json")
        md += ["### Before / after (held-out, greedy)", ""]
        if cmp:
            md += verdict(cmp, MAIN_LABEL)
            for s in STAGES:
                if s.label and s.label != MAIN_LABEL and s.label in cmp["models"]:
                    md += verdict(cmp, s.label)
            md += ["", comparison_markdown(cmp)]
        else:
            md += ["Evaluation was not run in this iteration.", ""]
        md += ["### Stages", "", "| stage | status | seconds | throughput / note |", "|---|---|---|---|"]
        rows = [t for key, t in timings.items() if key.startswith(k + "/")]
        for t in sorted(rows, key=lambda t: ORDER.index(t["stage"]) if t["stage"] in ORDER else len(ORDER)):
            note = t.get("note") or _note(t["stage"], _load(it / t["stage"] / "summary.json"))
            md.append(f"| {t['stage']} | {t['status']} | {t['seconds']:.1f} | {note} |")
        md.append("")
        gen, mc = _load(it / "generate" / "summary.json"), _load(it / "mc" / "summary.json")
        critic = _load(it / "critic" / "summary.json")
        adv = _load(it / "advantage" / "summary.json")
        md += ["### Data", ""]
        if gen:
            v = gen["verifier"]
            md.append(f"- generate: {gen['problems']} problems, {v['calls']} samples, {v['correct']} correct "
                      f"({v['correct'] / max(1, v['calls']):.1%})")
        if mc:
            md.append(f"- mc: {mc['states']} states ({mc['terminal_states']} terminal), "
                      f"{mc['throughput']['samples']} completions")
        if critic:
            md.append("- critic examples: " + ", ".join(f"{a} {b}" for a, b in critic["counts"].items()))
        if adv:
            md.append("- advantage: " + ", ".join(f"{a} {_fmt(b)}" for a, b in adv.items()
                                                  if isinstance(b, (int, float)) and not isinstance(b, bool)))
        md.append("")
        if critic:
            h = critic["heldout"]
            md += ["### Critic calibration (held-out MC-labelled states)", "",
                   "| metric | value |", "|---|---|"]
            md += [f"| {a} | {_fmt(b)} |" for a, b in h.items() if not isinstance(b, (list, dict))]
            if (it / "critic" / "calibration.png").is_file():
                md += ["", f"![critic calibration]({k}/critic/calibration.png)"]
            md.append("")
        checker = ((_load(it / "critic" / "stage.json") or {}).get("config") or {}).get("step_checker", "")
        diag = iteration_diagnostics(it, checker)
        (it / "diagnostics.json").write_text(json.dumps(diag, indent=1, default=str))
        md += diagnostics_markdown(diag)
        if (it / "advantage" / "advantage_hist.png").is_file():
            md += ["### Advantages", "", f"![advantage histogram]({k}/advantage/advantage_hist.png)", ""]
        metrics = {s.name: it / s.name / "metrics.jsonl" for s in STAGES      # the actor and its controls
                   if s.section == STAGE[NEXT_REFERENCE].section and (it / s.name / "metrics.jsonl").is_file()}
        if metrics:
            png = plot_actor_losses(metrics, it / "actor_loss.png")
            if png:
                md += ["### Actor loss", "", f"![actor loss]({k}/actor_loss.png)", ""]
    cfg = layout.config
    if cfg.is_file():
        md += ["## Resolved config", "", "```yaml", cfg.read_text().rstrip(), "```", ""]
    path = layout.report
    path.write_text("\n".join(md))
    return path


__all__ = ["write_report", "verdict", "plot_actor_losses"]
