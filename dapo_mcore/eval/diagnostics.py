"""Where DAPO's signal comes from, per step position, from one iteration's stage outputs alone.

- **critic ranking per position** (``advantage``): for each candidate state, the pairs of its distinct actions
  whose MC outcomes differ, ordered like the outcomes by the critic's Q (ties count half); with a task step
  checker also the pairs of a right and a wrong step (the right one ranked higher) in states without a wrong
  step so far (after one, every action is worth ~0 and no value can order them). From the critic's own
  held-out problems: ``critic/summary.json``'s ``heldout.ranking`` (same definitions).
- **gap filter per position**: the fraction of candidate states kept (gap >= threshold), for the critic's and
  the outcome-only advantages, and the mean |A| of the kept actions.
- **RFT coverage**: how many training problems RFT found at least one verified-correct sample for.
- **budget**: generated tokens and samples per method (generate + mc + one-step candidates for DAPO and
  outcome-only, RFT's own sampling).

``python -m dapo_mcore.eval.diagnostics RUN_DIR/iter_0 [--step-checker chain]`` prints the JSON; the run
report calls :func:`iteration_diagnostics` and writes ``diagnostics.json`` next to the stages.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from dapo_mcore.data.shards import iter_records
from dapo_mcore.verify.steps import action_ranking, state_is_clean
from dapo_mcore.verify.steps import step_checker as get_checker


def _load(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _positions(mc_dir: Path) -> dict[str, int]:
    return {r["state_id"]: int(r["num_steps"]) for r in iter_records(mc_dir)}


def _tokenizer(it: Path):
    stamp = _load(it / "advantage" / "stage.json") or _load(it / "advantage-outcome" / "stage.json") or {}
    path = (stamp.get("config") or {}).get("reference_path")
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def advantage_by_position(adv_dir: Path, positions: dict[str, int], check=None, tok=None) -> dict:
    """Per step position: candidate states, kept fraction, mean |A| kept; for critic advantages also the
    ranking of the critic's Q against the MC outcomes (actions a completion started) and, with ``check`` (a
    step checker) and ``tok``, against step correctness (every action, one-step candidates included)."""
    rows: dict[int, dict] = {}
    mc_states, cor_states = [], []
    for r in iter_records(adv_dir):
        pos = positions.get(r["state_id"], -1)
        d = rows.setdefault(pos, {"candidates": 0, "kept": 0, "abs_adv_sum": 0.0, "abs_adv_n": 0})
        d["candidates"] += 1
        if r["keep"]:
            d["kept"] += 1
            d["abs_adv_sum"] += sum(abs(a["advantage"]) for a in r["actions"])
            d["abs_adv_n"] += len(r["actions"])
        acts = r["actions"]
        if not acts or acts[0].get("critic_q") is None:
            continue
        mc_states.append((pos, [(a["critic_q"], a["outcome"], None) for a in acts if a["outcome"] is not None]))
        if check is not None and tok is not None:
            state = tok.decode(r["state_ids"], skip_special_tokens=True)
            if state_is_clean(check, state):    # after a wrong step every action is worth ~0
                cor_states.append((pos, [(a["critic_q"], 0.0, check(state, a["text"])) for a in acts]))
    out = {}
    for pos in sorted(rows):
        d = rows[pos]
        out[pos] = {"candidates": d["candidates"], "kept": d["kept"],
                    "kept_fraction": d["kept"] / d["candidates"] if d["candidates"] else 0.0,
                    "mean_abs_adv_kept": d["abs_adv_sum"] / d["abs_adv_n"] if d["abs_adv_n"] else 0.0}
    ranking = None
    if mc_states:
        r_mc, r_cor = action_ranking(mc_states), action_ranking(cor_states)
        nan = float("nan")
        ranking = {"vs_mc": r_mc["vs_mc"], "mc_pairs": r_mc["mc_pairs"], "vs_correct": r_cor["vs_correct"],
                   "correct_pairs": r_cor["correct_pairs"],
                   "by_position": {p: {"vs_mc": r_mc["by_position"].get(p, {}).get("vs_mc", nan),
                                       "mc_pairs": r_mc["by_position"].get(p, {}).get("mc_pairs", 0),
                                       "vs_correct": r_cor["by_position"].get(p, {}).get("vs_correct", nan),
                                       "correct_pairs": r_cor["by_position"].get(p, {}).get("correct_pairs", 0)}
                                   for p in sorted(set(r_mc["by_position"]) | set(r_cor["by_position"]))}}
    return {"by_position": out, "ranking": ranking}


def rft_coverage(gen_dir: Path) -> dict:
    n = solved = samples = correct = 0
    for r in iter_records(gen_dir):
        n += 1
        samples += int(r["num_samples"])
        correct += int(r["num_correct"])
        solved += int(r["num_correct"]) > 0
    return {"problems": n, "problems_with_correct": solved, "samples": samples, "correct_samples": correct}


def budget(it: Path) -> dict:
    """Generated tokens and samples per method (sampling stages only; evaluation excluded)."""
    def metered(stage: str) -> list[dict]:
        s = _load(it / stage / "summary.json") or {}
        return [m for m in (s.get("throughput"), s.get("one_step")) if m]

    dapo = metered("generate") + metered("mc")
    out = {}
    if dapo:
        tok = sum(m["completion_tokens"] for m in dapo)
        smp = sum(m["samples"] for m in dapo)
        one = (_load(it / "mc" / "summary.json") or {}).get("one_step") or {}
        out["dapo"] = {"generated_tokens": tok, "samples": smp, "one_step_tokens": one.get("completion_tokens", 0),
                       "one_step_samples": one.get("samples", 0)}
        if (it / "advantage-outcome").is_dir():
            out["outcome-only"] = {"generated_tokens": tok, "samples": smp, "usable_tokens":
                                   tok - one.get("completion_tokens", 0)}
    rft = metered("rft-generate")
    if rft:
        out["rft"] = {"generated_tokens": sum(m["completion_tokens"] for m in rft),
                      "samples": sum(m["samples"] for m in rft)}
    return out


def iteration_diagnostics(it: str | Path, step_checker: str = "") -> dict:
    """All diagnostics of one iteration directory (``<run>/iter_<k>``) that its outputs allow."""
    it = Path(it)
    out: dict = {"budget": budget(it)}
    critic = _load(it / "critic" / "summary.json")
    if critic and critic.get("heldout", {}).get("ranking"):
        out["critic_heldout_ranking"] = critic["heldout"]["ranking"]
    if (it / "mc" / "summary.json").is_file():
        positions = _positions(it / "mc")
        check = tok = None
        if step_checker:
            check, tok = get_checker(step_checker), _tokenizer(it)
        for stage, key in (("advantage", "critic"), ("advantage-outcome", "outcome")):
            if (it / stage / "summary.json").is_file():
                out[f"advantage_{key}"] = advantage_by_position(it / stage, positions,
                                                                check if key == "critic" else None, tok)
    if (it / "rft-generate" / "summary.json").is_file():
        out["rft"] = rft_coverage(it / "rft-generate")
    return out


def diagnostics_markdown(d: dict) -> list[str]:
    """Report lines for :func:`iteration_diagnostics`' result."""
    md = ["### Diagnostics", ""]
    if d.get("budget"):
        md += ["| method | generated tokens | samples |", "|---|---|---|"]
        md += [f"| {k} | {v['generated_tokens']} | {v['samples']} |" for k, v in d["budget"].items()]
        md.append("")
    if d.get("rft"):
        r = d["rft"]
        md.append(f"- RFT found a correct sample for {r['problems_with_correct']} of {r['problems']} training problems "
                  f"({r['correct_samples']} correct of {r['samples']} samples).")
        md.append("")
    crit = (d.get("advantage_critic") or {})
    outc = (d.get("advantage_outcome") or {})
    rk = (crit.get("ranking") or {}).get("by_position", {})
    held = (d.get("critic_heldout_ranking") or {}).get("by_position", {})
    pos = sorted({int(p) for p in list(crit.get("by_position", {})) + list(outc.get("by_position", {}))})
    if pos:
        f = lambda x: "n/a" if x is None or x != x else f"{x:.2f}"  # noqa: E731
        md += ["Per step position (state = prompt + that many steps): critic ranking accuracy against the MC "
               "outcomes and against step correctness (train problems; held-out problems from the critic stage), "
               "and the fraction of candidate states the 0.1 gap filter kept.", "",
               "| position | candidates | critic vs MC | critic vs correct | held-out vs MC | held-out vs correct | "
               "kept (critic) | kept (outcome-only) |", "|---|---|---|---|---|---|---|---|"]
        for p in pos:
            c = crit.get("by_position", {}).get(p) or crit.get("by_position", {}).get(str(p)) or {}
            o = outc.get("by_position", {}).get(p) or outc.get("by_position", {}).get(str(p)) or {}
            r = rk.get(p) or rk.get(str(p)) or {}
            h = held.get(p) or held.get(str(p)) or {}
            md.append(f"| {p} | {c.get('candidates', o.get('candidates', 0))} | {f(r.get('vs_mc'))} | "
                      f"{f(r.get('vs_correct'))} | {f(h.get('vs_mc'))} | {f(h.get('vs_correct'))} | "
                      f"{f(c.get('kept_fraction'))} | {f(o.get('kept_fraction'))} |")
        md.append("")
    return md


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Per-position DAPO diagnostics of one iteration directory.")
    ap.add_argument("iteration", help="<run>/iter_<k>")
    ap.add_argument("--step-checker", default="", help="task step checker for ranking against step correctness")
    a = ap.parse_args(argv)
    print(json.dumps(iteration_diagnostics(a.iteration, a.step_checker), indent=1))


if __name__ == "__main__":
    main()
