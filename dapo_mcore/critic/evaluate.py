"""Score a trained critic on another ``mc`` output (e.g. MC rollouts on validation problems): Brier, Pearson r,
AUC of V(s) against the MC values of the solutions' states, and the action-ranking accuracy against the MC
outcomes and (with a step checker) step correctness, overall and per step position.

``python -m dapo_mcore.critic.evaluate --critic RUN/iter_0/critic/hf --mc VAL_MC [--step-checker chain]``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from dapo_mcore.critic.data import read_mc, solution_examples
from dapo_mcore.critic.metrics import critic_metrics
from dapo_mcore.critic.train import CriticConfig, heldout_ranking, predict


def evaluate_critic(critic_path: str | Path, mc_dir: str | Path, step_checker: str = "", token_budget: int = 512,
                    rows_per_microbatch: int = 8) -> dict:
    """Metrics of the critic at ``critic_path`` on every state of ``mc_dir`` (one process, CPU or GPU)."""
    from transformers import AutoTokenizer

    from dapo_mcore.parallel.runtime import ParallelConfig, initialize_parallel
    from dapo_mcore.training.loop import load_chunks, pad_token_id

    par = ParallelConfig()
    initialize_parallel(par)
    tok = AutoTokenizer.from_pretrained(str(critic_path))
    pad_id = pad_token_id(tok)
    _, chunks = load_chunks(str(critic_path), par, value_head=True, init_value_head=False)
    for c in chunks:
        c.eval()
    records = read_mc(mc_dir)
    exs = solution_examples(records)
    preds = predict(chunks, exs, token_budget, pad_id, rows_per_microbatch)
    targets = [t for e in exs for t in e.targets]
    mean = sum(targets) / max(1, len(targets))
    out = critic_metrics(preds, targets, mean)   # constant baseline: these states' own mean (a lower bound)
    cfg = CriticConfig(token_budget=token_budget, rows_per_microbatch=rows_per_microbatch, step_checker=step_checker)
    out["ranking"] = heldout_ranking(chunks, records, tok, cfg, pad_id)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Score a trained critic on an mc output (Brier, r, action ranking).")
    ap.add_argument("--critic", required=True, help="the critic's HF checkpoint (critic stage hf/)")
    ap.add_argument("--mc", required=True, help="an mc stage output directory")
    ap.add_argument("--step-checker", default="", help="task step checker for ranking against step correctness")
    ap.add_argument("--token-budget", type=int, default=512)
    ap.add_argument("--out", default="", help="also write the JSON here")
    a = ap.parse_args(argv)
    res = evaluate_critic(a.critic, a.mc, a.step_checker, a.token_budget)
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    from dapo_mcore.parallel.runtime import process_group_scope

    with process_group_scope():
        main()
