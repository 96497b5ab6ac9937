"""Stage 4 — advantages: Q_i = V(s ⊕ a_i), A_i = Q_i − mean_j Q_j over a state's unique actions, keep
states whose advantage gap max A − min A ≥ threshold, and store log π_ref(a_i | s) per token so actor
training never loads the reference model.

Runs on every rank (``torchrun`` or one process): ``python -m dapo_mcore.actor.advantage --help``.
The critic scores all actions of a state in one shared-prefix row; the reference log-probs come from the
fused log-prob op on the same layout. Output (sharded, atomic, resumable; :mod:`dapo_mcore.data.shards`),
one record per candidate state (a non-terminal state with >= ``min_actions`` unique actions)::

    problem_id, state_id, state_ids [int], v_state (float | None), gap, keep (bool: passed the gap filter),
    actions: [{ids [int], text, count, outcome (float | None), ends_solution, critic_q (float | None),
               q, advantage, ref_logp [float per token; empty unless keep], ref_logp_sum (float | None)}]

plus ``summary.json`` and ``advantage_hist.png``.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence


from dapo_mcore.parallel.runtime import ParallelConfig, add_parallel_args, parallel_from_args

SOURCES = ("critic", "outcome")


@dataclass
class AdvantageConfig:
    critic_path: str = ""            # HF value model (the critic stage's hf/); unused with source=outcome
    reference_path: str = ""         # HF policy whose log-probs are stored (the generator, pi_ref)
    source: str = "critic"           # critic: Q = V(s+a); outcome: Q = mean reward of the completions led by a
    terminal_reward: bool = True     # an action that ends the solution uses its verified reward as Q
    gap_threshold: float = 0.1       # keep states with max A - min A >= this
    min_actions: int = 2             # unique actions a state needs
    token_budget: int = 4096         # tokens per packed row
    rows_per_microbatch: int = 1     # packed rows stacked per micro-batch
    shard_size: int = 512            # states per output shard
    fmt: str = "parquet"
    show_progress: bool = True
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"advantage.source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "critic" and not self.critic_path:
            raise ValueError("advantage.critic_path is required with source='critic'")
        if not self.reference_path:
            raise ValueError("advantage.reference_path is required (the policy whose log-probs are stored)")
        if self.min_actions < 2:
            raise ValueError(f"advantage.min_actions must be >= 2, got {self.min_actions}")

    def identity(self) -> dict:
        d = asdict(self)
        d.pop("show_progress")
        return d


# ------------------------------------------------------------------------------------- pure functions
def unique_actions(rec: dict) -> list[dict]:
    """A state's distinct candidate actions (by token ids, first-seen order) with how often each was
    sampled and the mean verified reward of the completions it started (its "outcome")."""
    comps = rec.get("completions") or []
    acts: dict[tuple, dict] = {}
    for i, a in enumerate(rec.get("actions") or []):
        ids = tuple(int(t) for t in a["ids"])
        if not ids:
            continue
        u = acts.setdefault(ids, {"ids": list(ids), "text": a.get("text", ""), "count": 0, "rewards": [],
                                  "ends_solution": bool(a.get("ends_solution")), "terminal_reward": None})
        u["count"] += 1
        if i < len(comps):
            u["rewards"].append(float(comps[i]["reward"]))
        if a.get("ends_solution") and a.get("reward") is not None:
            u["terminal_reward"] = float(a["reward"])
    out = []
    for u in acts.values():
        rewards = u.pop("rewards")
        u["outcome"] = sum(rewards) / len(rewards) if rewards else None
        out.append(u)
    return out


def advantages(q: Sequence[float]) -> list[float]:
    """A_i = Q_i − mean_j Q_j (uniform over the unique actions)."""
    m = sum(q) / len(q)
    return [float(x - m) for x in q]


def select_q(actions: Sequence[dict], critic_q: Optional[Sequence[float]], source: str, terminal_reward: bool) -> list[float]:
    """Q of each unique action: the critic's value, or the outcome mean; terminal actions may use their
    verified reward (``terminal_reward``)."""
    qs = []
    for i, a in enumerate(actions):
        if terminal_reward and a["ends_solution"] and a["terminal_reward"] is not None:
            qs.append(a["terminal_reward"])
        elif source == "outcome":
            qs.append(float(a["outcome"]) if a["outcome"] is not None else 0.0)
        else:
            qs.append(float(critic_q[i]))
    return qs


def keep_state(adv: Sequence[float], gap_threshold: float, min_actions: int) -> bool:
    return len(adv) >= min_actions and (max(adv) - min(adv)) >= gap_threshold - 1e-12


def ranking_agreement(pairs: Sequence[tuple[float, float, float, float]]) -> float:
    """Fraction of action pairs whose critic Q order agrees with their outcome order (pairs whose outcomes
    tie are skipped): how well the critic *ranks actions*, the quality that predicts DAPO's gain."""
    agree = total = 0
    for qa, qb, oa, ob in pairs:
        if oa == ob:
            continue
        total += 1
        agree += (qa - qb) * (oa - ob) > 0
    return agree / total if total else float("nan")


# -------------------------------------------------------------------------------------------- stage
def scorable(actions: Sequence[dict], source: str, terminal_reward: bool) -> list[dict]:
    """The actions a source can give a Q: all of them for the critic; for ``outcome`` only those a completion
    started (or, with ``terminal_reward``, that end the solution with a verified reward) — one-step samples
    that were never completed have no outcome."""
    if source != "outcome":
        return list(actions)
    return [a for a in actions if a["outcome"] is not None or (terminal_reward and a["terminal_reward"] is not None)]


def _candidates(mc_dir, min_actions: int, source: str = "critic",
                terminal_reward: bool = True) -> tuple[list[tuple[dict, list[dict]]], dict]:
    from dapo_mcore.data.shards import iter_records

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


def reference_logprobs(chunks: list, groups: Sequence, token_budget: int, pad_id: int,
                       rows_per_microbatch: int = 1) -> list[list[list[float]]]:
    """Per group, per action, the per-token log π(a | s) (fused op, shared-prefix rows, DP x PP)."""
    from dapo_mcore.actor.batching import logp_collect_step, pack_action_groups
    from dapo_mcore.training.trainer import collect_per_microbatch

    mbs = pack_action_groups(groups, token_budget, pad_id, shared=True, rows_per_microbatch=rows_per_microbatch)
    res: dict[tuple, list[float]] = {}
    for mb, lp in zip(mbs, collect_per_microbatch(chunks, mbs, logp_collect_step, "logp", pad_id)):
        seg = mb["seg"].tolist()
        for local, key in enumerate(mb["action_keys"]):
            res[key] = [x for x, s in zip(lp, seg) if s == local]
    return [[res[(gi, ai)] for ai in range(len(g.actions))] for gi, g in enumerate(groups)]


def _load(path: str, value: bool, p: ParallelConfig):
    from dapo_mcore.training.loop import load_chunks

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
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from dapo_mcore.actor.batching import ActionGroup
    from dapo_mcore.critic.score import ScoreGroup, score_groups
    from dapo_mcore.data.shards import ShardedWriter, chunk, input_identity, write_json_summary
    from dapo_mcore.parallel.runtime import initialize_parallel
    from dapo_mcore.training.loop import pad_token_id

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
        writer = ShardedWriter(out, "advantage", {"config": cfg.identity(), "input": input_identity(mc_dir)},
                               cfg.fmt, overwrite=overwrite)
        todo_obj = [[i for i in range(len(shards)) if not writer.is_done(i)]]
    dist.broadcast_object_list(todo_obj, src=0)
    todo: list[int] = todo_obj[0]
    critic = _load(cfg.critic_path, True, cfg.parallel) if (todo and cfg.source == "critic") else None
    ref = _load(cfg.reference_path, False, cfg.parallel) if todo else None
    bar = None
    if rank0 and cfg.show_progress and todo:
        from tqdm import tqdm

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
        from dapo_mcore.data.shards import iter_records

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
        write_json_summary(out, "summary.json", summary)
        print(f"[advantage] {summary['states_kept']}/{summary['candidate_states']} states kept "
              f"(gap >= {cfg.gap_threshold}), {summary['actions_kept']} actions, mean gap "
              f"{summary['mean_gap_kept']:.3f}, critic/outcome rank agreement "
              f"{summary['critic_outcome_rank_agreement']:.3f}")
    obj = [summary]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="DAPO stage 4: advantages from the critic + reference log-probs.")
    ap.add_argument("--mc", required=True, help="output directory of the mc stage")
    ap.add_argument("--critic", default="", help="critic HF checkpoint (the critic stage's hf/)")
    ap.add_argument("--reference", required=True, help="reference policy HF checkpoint (pi_ref)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", choices=SOURCES, default="critic")
    ap.add_argument("--gap", type=float, default=0.1)
    ap.add_argument("--no-terminal-reward", action="store_true")
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--shard-size", type=int, default=512)
    add_parallel_args(ap)
    a = ap.parse_args(argv)
    if a.global_batch is not None:
        ap.error("--global-batch: the advantage stage is forward-only (no optimizer step); use --micro-batch")
    cfg = AdvantageConfig(critic_path=a.critic, reference_path=a.reference, source=a.source, gap_threshold=a.gap,
                          terminal_reward=not a.no_terminal_reward, token_budget=a.token_budget,
                          shard_size=a.shard_size, rows_per_microbatch=a.micro_batch or 1,
                          parallel=parallel_from_args(a))
    run_advantage(cfg, a.mc, a.out)


if __name__ == "__main__":
    from dapo_mcore.parallel.runtime import process_group_scope

    with process_group_scope():
        main()
