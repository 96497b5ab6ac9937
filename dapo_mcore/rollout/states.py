"""States of the step-level MDP built from kept solutions, deduplicated per problem.

For a solution with steps ``a_0..a_{S-1}`` the states are ``prompt + a_0..a_{k-1}`` for
``k = 0..S-1`` (non-terminal; the first is the prompt alone) and the terminal state
``prompt + a_0..a_{S-1}`` whose value is the solution's verified reward (no completions).
Identical states of one problem (same token ids, same terminal flag) are kept once.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from dapo_mcore.rollout.segment import TokenBytes, split_steps


@dataclass
class State:
    """One state. ``step_ids``: the state's steps (token ids, exact training tokenisation)."""

    problem_id: str
    state_id: str
    prompt_ids: list[int]
    step_ids: list[list[int]]
    terminal: bool
    reward: float | None = None          # terminal states: verified reward of the solution
    sources: list[tuple[int, int]] = field(default_factory=list)   # (solution index, #steps)

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + [t for s in self.step_ids for t in s]

    def __len__(self) -> int:
        return len(self.prompt_ids) + sum(len(s) for s in self.step_ids)


def state_id(problem_id: str, ids: list[int], terminal: bool) -> str:
    """Stable id: problem id + sha1 of the token ids and the terminal flag."""
    h = hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes() + (b"T" if terminal else b"N")).hexdigest()[:16]
    return f"{problem_id}/{h}"


@dataclass
class StateStats:
    solutions: int = 0
    states: int = 0
    duplicates: int = 0
    too_long: int = 0


def build_states(problem_id: str, prompt_ids: list[int], solutions: list[tuple[list[int], float]],
                 token_bytes: TokenBytes, delimiter: str = "\n", max_context: int | None = None,
                 stats: StateStats | None = None) -> list[State]:
    """Deduplicated states of one problem, in order of first appearance.

    ``solutions``: ``(output token ids, verified reward)`` per kept solution. States longer than
    ``max_context`` tokens (non-terminal: no room left to generate even one token) are dropped and
    counted in ``stats.too_long``.
    """
    stats = stats if stats is not None else StateStats()
    seen: dict[str, State] = {}
    out: list[State] = []
    for si, (ids, reward) in enumerate(solutions):
        stats.solutions += 1
        steps = split_steps(ids, token_bytes, delimiter)
        for k in range(len(steps) + 1):
            terminal = k == len(steps)
            prefix = steps[:k]
            st_ids = prompt_ids + [t for s in prefix for t in s]
            if max_context is not None and (len(st_ids) > max_context or (not terminal and len(st_ids) >= max_context)):
                stats.too_long += 1
                continue
            sid = state_id(problem_id, st_ids, terminal)
            if sid in seen:
                seen[sid].sources.append((si, k))
                stats.duplicates += 1
                continue
            st = State(problem_id, sid, list(prompt_ids), [list(s) for s in prefix], terminal,
                       float(reward) if terminal else None, [(si, k)])
            seen[sid] = st
            out.append(st)
            stats.states += 1
    return out
