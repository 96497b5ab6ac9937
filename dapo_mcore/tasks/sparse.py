"""The sparse-reward demo: long chains whose reference rarely solves a whole problem, while every step stays
checkable from the line before (issue #17).

Task: the chain task (:mod:`dapo_mcore.tasks.chain`) with 8-10 operations. The reference is SFT-trained (the
demo's recipe, :func:`dapo_mcore.tasks.demo.prepare`) on solutions whose '+' steps that need a carry drop it
``carry_error_rate`` (0.85) of the time, independently at every such step: greedy decoding drops every carry
(and 95% of the chains hold one), a sample gets a carry right 15% of the time, so only ~10% of sampled
solutions are right and the errors sit wherever the carries fall. Every error is -10 and later lines stay
consistent with it, so each line is checkable from itself and the line before, and a wrong line never leads
to the right answer (no lucky successes).

``step_error_rate`` > 0 adds independent +-1/+-2 slips on the other steps. Measured (docs/sparse-notes.md):
with 0.1 the model learned a flat ones digit, opposite slips cancel and 59% of its right answers came from
wrong lines — a reward that is mostly luck; so the default is 0.

Splits (disjoint): ``sft`` (the reference's data), ``train`` (DAPO's problems), ``val`` (carved from the same
distribution, for every design choice), ``heldout`` (the final table only).

``python -m dapo_mcore.tasks.sparse prepare --out runs/sparse/setup`` builds them and the reference.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dapo_mcore.config import add_flags, from_flags
from dapo_mcore.eval.diagnostics import budget
from dapo_mcore.eval.evaluate import load_results
from dapo_mcore.eval.stats import paired_difference
from dapo_mcore.tasks.chain import make_problems
from dapo_mcore.tasks.demo import DemoSetup, _key, prepare


@dataclass
class SparseSetup(DemoSetup):
    min_ops: int = 8
    max_ops: int = 10
    carry_error_rate: float = 0.85
    step_error_rate: float = 0.0
    val_problems: int = 300
    eval_problems: int = 500

    def sft_solution(self, p, rng: random.Random) -> str:
        return p.solution(self.carry_error_rate, rng, step_error_rate=self.step_error_rate)

    def problem_sets(self) -> dict[str, list]:
        sets = super().problem_sets()
        seen = {_key(p) for name in ("sft", "train", "heldout") for p in sets[name]}
        ops = (self.min_ops, self.max_ops)
        val = [p for p in make_problems(self.val_problems * 2, self.seed * 7 + 4, ops, prefix="val")
               if _key(p) not in seen]
        sets["val"] = val[:self.val_problems]
        return sets


# ------------------------------------------------------------------------------------------- the table
# row label -> (iteration, eval label); the controls run in iteration 0 only (run.controls_first_only)
ROWS = {"reference": (0, "reference"), "DAPO": (0, "dapo"), "iterative DAPO (2 iterations)": (1, "dapo"),
        "outcome-only (control)": (0, "outcome-only"), "RFT (control)": (0, "rft")}
CONTROLS = ("outcome-only (control)", "RFT (control)")


def _set_results(run: Path, it: int, label: str, set_name: str):
    d = run / f"iter_{it}" / "eval" / label
    if not (d / "results.json").is_file():
        return None
    res = load_results(d)
    if set_name not in res:
        raise ValueError(f"{d}: no evaluation set {set_name!r} (has {sorted(res)})")
    return res[set_name]


def _budget(run: Path, it: int) -> dict:
    return budget(run / f"iter_{it}")


def sparse_table(runs: list[str | Path], set_name: str = "heldout") -> tuple[str, dict]:
    """Markdown: greedy accuracy per model and seed with Wilson intervals, mean and spread; DAPO's paired
    differences to each control per seed; generated tokens per method. Returns ``(markdown, figures)`` where
    figures holds the RESULT values (fractions)."""
    runs = [Path(r) for r in runs]
    res = {row: [_set_results(r, it, lab, set_name) for r in runs] for row, (it, lab) in ROWS.items()}
    res = {row: v for row, v in res.items() if all(x is not None for x in v)}
    if "DAPO" not in res or "reference" not in res:
        raise FileNotFoundError(f"{[str(r) for r in runs]}: DAPO or the reference was not evaluated on {set_name!r}")
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    n = res["reference"][0].n
    md = [f"Held-out greedy accuracy ({set_name}, {n} problems), 95% Wilson interval per seed:", "",
          "| model | " + " | ".join(r.name for r in runs) + " | mean | spread (max-min) |",
          "|---|" + "---|" * (len(runs) + 2)]
    stats = {}
    for row, rs in res.items():
        accs = [x.accuracy for x in rs]
        cells = []
        for x in rs:
            lo, hi = x.interval()
            cells.append(f"{pct(x.accuracy)}% [{pct(lo)}, {pct(hi)}]")
        stats[row] = {"mean": sum(accs) / len(accs), "min": min(accs), "max": max(accs)}
        md.append(f"| {row} | " + " | ".join(cells) + f" | **{pct(stats[row]['mean'])}%** | "
                  f"{pct(max(accs) - min(accs))} |")
    md += ["", "Paired difference on the same problems (points, 95% interval), per seed:", "",
           "| comparison | " + " | ".join(r.name for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for a, b in [("DAPO", c) for c in CONTROLS if c in res] + [("DAPO", "reference")] + \
            [("iterative DAPO (2 iterations)", c) for c in ("DAPO",) + CONTROLS
             if c in res and "iterative DAPO (2 iterations)" in res]:
        cells = []
        for xa, xb in zip(res[a], res[b]):
            d = paired_difference(xb.rewards, xa.rewards)
            cells.append(f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]")
        md.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    b0 = [_budget(r, 0) for r in runs]
    # the second iteration's budget only when every run finished it (a run stopped mid-way has a partial one)
    b1 = [_budget(r, 1) for r in runs] if "iterative DAPO (2 iterations)" in res else []
    if b0[0]:
        md += ["", "Generation budget (generated tokens, mean over seeds; evaluation excluded):", "",
               "| method | generated tokens | samples |", "|---|---|---|"]
        def mean_of(bs, key, field):
            v = [b[key][field] for b in bs if key in b]
            return sum(v) / len(v) if v else None
        for lab, key, bs in (("DAPO / outcome-only (generate + mc)", "dapo", b0), ("RFT", "rft", b0),
                             ("iterative DAPO, 2nd iteration", "dapo", b1)):
            t, smp = mean_of(bs, key, "generated_tokens"), mean_of(bs, key, "samples")
            if t is not None:
                md.append(f"| {lab} | {t:.0f} | {smp:.0f} |")
    controls = [c for c in CONTROLS if c in res]
    best = max(controls, key=lambda c: stats[c]["mean"]) if controls else None
    fig = {"reference_mean": stats["reference"]["mean"], "dapo_mean": stats["DAPO"]["mean"],
           "best_control": best, "best_control_mean": stats[best]["mean"] if best else float("nan"),
           "dapo_min_minus_control_max": (stats["DAPO"]["min"] - max(stats[c]["max"] for c in controls))
           if controls else float("nan"), "stats": stats}
    if "iterative DAPO (2 iterations)" in stats:
        fig["iterative_dapo_mean"] = stats["iterative DAPO (2 iterations)"]["mean"]
    return "\n".join(md) + "\n", fig


def result_lines(fig: dict, seconds: float | None) -> str:
    out = [f"RESULT sparse_reference_mean {100 * fig['reference_mean']:.1f} %",
           f"RESULT sparse_dapo_mean {100 * fig['dapo_mean']:.1f} %",
           f"RESULT sparse_best_control_mean {100 * fig['best_control_mean']:.1f} %",
           f"RESULT sparse_dapo_min_minus_control_max {100 * fig['dapo_min_minus_control_max']:+.1f} points"]
    if "iterative_dapo_mean" in fig:
        out.append(f"RESULT sparse_iterative_dapo_mean {100 * fig['iterative_dapo_mean']:.1f} %")
    if seconds is not None:
        out.append(f"RESULT sparse_demo_seconds {seconds:.0f} s")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="dapo-mcore sparse-reward demo: build the task and reference.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="problems (sft/train/val/heldout) + tokenizer + reference policy")
    p.add_argument("--out", required=True)
    add_flags(p, SparseSetup)
    t = sub.add_parser("table", help="the sparse demo's table over the runs (seeds) given, with RESULT lines")
    t.add_argument("runs", nargs="+")
    t.add_argument("--set", default="heldout", help="evaluation set (val while designing, heldout for the table)")
    t.add_argument("--seconds", type=float, default=None, help="the demo's wall time (a RESULT line)")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        s = from_flags(SparseSetup, a)
        setup = prepare(a.out, s)
        print(json.dumps({k: setup[k] for k in ("reference", "train", "val", "heldout")}, indent=1))
    else:
        text, fig = sparse_table(a.runs, a.set)
        best = fig["best_control"]
        print(text + f"\nBest control: {best}. Goal: DAPO >= best control + 10 points and the DAPO seeds' minimum "
              f"above the controls' maximum.\n\n" + result_lines(fig, a.seconds))


if __name__ == "__main__":
    main()
