"""Stage 4 — advantages: Q_i = V(s ⊕ a_i), A_i = Q_i − mean_j Q_j over a state's unique actions, keep
states whose advantage gap max A − min A ≥ threshold, and store log π_ref(a_i | s) per token so actor
training never loads the reference model.

Runs on every rank (in the pipeline's process, or under ``torchrun``): ``dapo-mcore advantage CONFIG`` (section
``advantage``; ``--help`` lists the keys). The math is :mod:`dapo_mcore.advantage.core`.
The critic scores all actions of a state in one shared-prefix row; the reference log-probs come from the
fused log-prob op on the same layout. Output (sharded, atomic, resumable; :mod:`dapo_mcore.data.shards`),
one record per candidate state (a non-terminal state with >= ``min_actions`` unique actions)::

    problem_id, state_id, state_ids [int], v_state (float | None), gap, keep (bool: passed the gap filter),
    actions: [{ids [int], text, count, outcome (float | None), ends_solution, critic_q (float | None),
               q, advantage, ref_logp [float per token; empty unless keep], ref_logp_sum (float | None)}]

plus ``summary.json`` and ``advantage_hist.png``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch.distributed as dist
from tqdm import tqdm

from dapo_mcore.advantage.core import advantages, keep_state, ranking_agreement, scorable, select_q, unique_actions
from dapo_mcore.config import Checked, identity, option
from dapo_mcore.data.shards import FORMATS, ShardedWriter, chunk, input_identity, iter_records, write_summary
from dapo_mcore.parallel.runtime import ParallelConfig, initialize_parallel
from dapo_mcore.training.logprobs import ActionGroup, reference_logprobs
from dapo_mcore.training.loop import load_chunks, pad_token_id
from dapo_mcore.training.values import ScoreGroup, score_groups

SOURCES = ("critic", "outcome")


@dataclass
class AdvantageConfig(Checked):
    """Stage 4 (advantage): forward-only (no optimizer); the critic and the reference run on every rank."""

    critic_path: str = option("", "HF value model (the critic stage's hf/); unused with source=outcome",
                              identity=False)
    reference_path: str = option("", "HF policy whose log-probs are stored (the generator, π_ref)", identity=False)
    source: str = option("critic", "Q of an action: critic (V(s ⊕ a)) | outcome (mean reward of the completions "
                                   "it started)", choices=SOURCES)
    terminal_reward: bool = option(True, "an action that ends the solution takes its verified reward as Q")
    gap_threshold: float = option(0.1, "keep states whose advantage gap max A − min A is at least this", ge=0)
    min_actions: int = option(2, "unique actions a state needs", ge=2)
    token_budget: int = option(4096, "tokens per packed row", ge=1)
    rows_per_microbatch: int = option(1, "packed rows stacked per micro-batch", flag="--micro-batch", ge=1)
    shard_size: int = option(512, "states per output shard (the unit of resume)", ge=1)
    fmt: str = option("parquet", "shard format: parquet | jsonl", choices=FORMATS)
    show_progress: bool = option(True, "progress bar", identity=False)
    parallel: ParallelConfig = option(factory=ParallelConfig, doc="layout and fast paths")

    def validate(self) -> None:
        if self.source == "critic" and not self.critic_path:
            raise ValueError("advantage.critic_path is required with source='critic'")
        if not self.reference_path:
            raise ValueError("advantage.reference_path is required (the policy whose log-probs are stored)")


def _candidates(mc_dir, min_actions: int, source: str = "critic",
                terminal_reward: bool = True) -> tuple[list[tuple[dict, list[dict]]], dict]:
    cands, stats = [], {"states_in": 0, "terminal": 0, "too_few_actions": 0}
    for rec in iter_records(mc_dir):
        stats["states_in"] += 1
        if rec["terminal"]:
            stats["terminal"] += 1
            continue
        acts = scorable(unique_actions(rec), source, terminal_reward)
        if len(acts) < min_actions:
            stats["too_few_actions"] += 1
            continue
        cands.append((rec, acts))
    return cands, stats


def _state_ids(rec: dict) -> list[int]:
    return list(rec["prompt_ids"]) + [int(t) for s in rec["step_ids"] for t in s]


def _load(path: str, value: bool, p: ParallelConfig):
    _, chunks = load_chunks(path, p, value_head=value, init_value_head=False)
    for c in chunks:
        c.eval()
    return chunks


def histogram_png(adv: Sequence[float], gaps: Sequence[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.hist(adv, bins=41, color="tab:blue")
    a1.set(title="advantages of kept actions", xlabel="A = Q - mean Q", ylabel="actions")
    a2.hist(gaps, bins=30, color="tab:orange")
    a2.set(title="advantage gap per state (all candidates)", xlabel="max A - min A", ylabel="states")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_advantage(cfg: AdvantageConfig, mc_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Compute (or resume) the advantage dataset from a finished ``mc`` output; returns the summary."""
    from transformers import AutoTokenizer

    cfg.validate()
    t0 = time.time()
    initialize_parallel(cfg.parallel)
    rank0 = dist.get_rank() == 0
    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(cfg.reference_path)
    pad_id = pad_token_id(tok)
    cands, stats = _candidates(mc_dir, cfg.min_actions, cfg.source, cfg.terminal_reward)
    shards = chunk(cands, cfg.shard_size) if cands else []
    writer = None
    todo_obj: list = [None]
    if rank0:
        writer = ShardedWriter(out, "advantage", {"config": identity(cfg), "input": input_identity(mc_dir)},
                               cfg.fmt, overwrite=overwrite)
        todo_obj = [[i for i in range(len(shards)) if not writer.is_done(i)]]
    dist.broadcast_object_list(todo_obj, src=0)
    todo: list[int] = todo_obj[0]
    critic = _load(cfg.critic_path, True, cfg.parallel) if (todo and cfg.source == "critic") else None
    ref = _load(cfg.reference_path, False, cfg.parallel) if todo else None
    bar = None
    if rank0 and cfg.show_progress and todo:
        bar = tqdm(total=sum(len(shards[i]) for i in todo), desc="advantage", unit="state", mininterval=1.0)
    for si in todo:
        shard = shards[si]
        if critic is not None:
            scored = score_groups(critic, [ScoreGroup(_state_ids(r), [a["ids"] for a in acts]) for r, acts in shard],
                                  cfg.token_budget, pad_id, cfg.rows_per_microbatch)
        records, kept_groups = [], []
        for k, (rec, acts) in enumerate(shard):
            cq = scored[k][1] if critic is not None else None
            q = select_q(acts, cq, cfg.source, cfg.terminal_reward)
            adv = advantages(q)
            keep = keep_state(adv, cfg.gap_threshold, cfg.min_actions)
            actions = [{"ids": a["ids"], "text": a["text"], "count": a["count"], "outcome": a["outcome"],
                        "ends_solution": a["ends_solution"], "critic_q": None if cq is None else float(cq[i]),
                        "q": float(qi), "advantage": float(ai), "ref_logp": [], "ref_logp_sum": None}
                       for i, (a, qi, ai) in enumerate(zip(acts, q, adv))]
            records.append({"problem_id": rec["problem_id"], "state_id": rec["state_id"], "state_ids": _state_ids(rec),
                            "v_state": scored[k][0] if critic is not None else None, "gap": float(max(adv) - min(adv)),
                            "keep": keep, "actions": actions})
            if keep:
                kept_groups.append((records[-1], ActionGroup(records[-1]["state_ids"], [a["ids"] for a in acts])))
        ref_lp = (reference_logprobs(ref, [g for _, g in kept_groups], cfg.token_budget, pad_id,
                                     cfg.rows_per_microbatch) if kept_groups else [])
        for (r, _), lps in zip(kept_groups, ref_lp):
            for a, lp in zip(r["actions"], lps):
                a["ref_logp"] = [float(x) for x in lp]
                a["ref_logp_sum"] = float(sum(lp))
        if rank0:
            writer.write_shard(si, records)
            if bar:
                bar.update(len(shard))
        dist.barrier()
    if bar:
        bar.close()
    summary: dict = {}
    if rank0:
        allr = list(iter_records(out, require_complete=False))
        kept = [r for r in allr if r["keep"]]
        adv_all = [a["advantage"] for r in kept for a in r["actions"]]
        pairs = [(x["critic_q"], y["critic_q"], x["outcome"], y["outcome"]) for r in allr
                 for i, x in enumerate(r["actions"]) for y in r["actions"][i + 1:]
                 if x["critic_q"] is not None and x["outcome"] is not None and y["outcome"] is not None]
        summary = {"stage": "advantage", "source": cfg.source, **stats, "candidate_states": len(cands),
                   "states_kept": len(kept), "actions_kept": len(adv_all),
                   "keep_fraction": len(kept) / len(cands) if cands else 0.0,
                   "mean_gap_candidates": sum(r["gap"] for r in allr) / len(allr) if allr else 0.0,
                   "mean_gap_kept": sum(r["gap"] for r in kept) / len(kept) if kept else 0.0,
                   "mean_abs_advantage": sum(abs(a) for a in adv_all) / len(adv_all) if adv_all else 0.0,
                   "critic_outcome_rank_agreement": ranking_agreement(pairs), "ranked_pairs": len(pairs),
                   "shards": len(shards), "shards_computed": len(todo), "seconds": time.time() - t0}
        histogram_png(adv_all, [r["gap"] for r in allr], out / "advantage_hist.png")
        writer.finalize(len(shards), summary)
        write_summary(out, summary)
        print(f"[advantage] {summary['states_kept']}/{summary['candidate_states']} states kept "
              f"(gap >= {cfg.gap_threshold}), {summary['actions_kept']} actions, mean gap "
              f"{summary['mean_gap_kept']:.3f}, critic/outcome rank agreement "
              f"{summary['critic_outcome_rank_agreement']:.3f}")
    obj = [summary]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def summary_note(summary: dict) -> str:
    """The advantage stage's line in the report's stage table."""
    sec = summary.get("seconds") or 0.0
    return f"{summary.get('candidate_states', 0) / sec:.0f} states/s" if sec else ""
