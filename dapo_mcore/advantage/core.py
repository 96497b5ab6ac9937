"""The advantage estimate of DAPO as pure functions (no I/O, no model): a state's unique actions, their Q,
A_i = Q_i − mean_j Q_j, the gap filter, and how well the critic ranks actions against their outcomes."""
from __future__ import annotations

from typing import Optional, Sequence


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


def scorable(actions: Sequence[dict], source: str, terminal_reward: bool) -> list[dict]:
    """The actions a source can give a Q: all of them for the critic; for ``outcome`` only those a completion
    started (or, with ``terminal_reward``, that end the solution with a verified reward): one-step samples
    that were never completed have no outcome."""
    if source != "outcome":
        return list(actions)
    return [a for a in actions if a["outcome"] is not None or (terminal_reward and a["terminal_reward"] is not None)]


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
