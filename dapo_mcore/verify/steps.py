"""Step-level checks: a task's step checker ``(state_text, action_text) -> bool | None`` (is this line the
right next step?), whether a state holds no wrong step yet, and how well values rank a state's candidate
actions against their MC outcomes and against step correctness (the critic's diagnostics).

Step checkers by name (:func:`step_checker`): ``"chain"`` (:mod:`dapo_mcore.tasks.chain`'s format: prompt
``"47:+8-3\\n"``, one ``"47+8=55"`` line per operation, then ``"answer: 52"``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from dapo_mcore.verify.exact import ANSWER_KEY

StepChecker = Callable[[str, str], Optional[bool]]


def parse_chain_prompt(prompt: str) -> tuple[int, list[int]] | None:
    """``"47:+8-3\\n"`` -> ``(47, [8, -3])``; None if it is not a chain prompt."""
    head, sep, rest = prompt.strip().partition(":")
    if not sep or not head.isdigit():
        return None
    ops, i = [], 0
    while i < len(rest):
        if rest[i] not in "+-":
            return None
        j = i + 1
        while j < len(rest) and rest[j].isdigit():
            j += 1
        if j == i + 1:
            return None
        ops.append(int(rest[i + 1:j]) * (1 if rest[i] == "+" else -1))
        i = j
    return int(head), ops


def check_chain_step(state_text: str, action: str) -> bool | None:
    """Is ``action`` (one line) the right next step after ``state_text`` (chain prompt + the lines so far)?

    Right = the next operation applied correctly to the value the previous line wrote (each line is
    checkable from itself and the line before, whether or not the earlier lines were right); after the
    last operation the right step is ``answer: <value>``. None if the state is not a chain state.
    """
    lines = state_text.split("\n")
    parsed = parse_chain_prompt(lines[0])
    if parsed is None:
        return None
    start, ops = parsed
    steps = [ln for ln in lines[1:] if ln.strip()]
    v = start
    if steps:
        _, eq, val = steps[-1].rpartition("=")
        if not eq or not val.strip().lstrip("-").isdigit():
            return None
        v = int(val)
    act = action.strip()
    if len(steps) >= len(ops):
        return act == f"{ANSWER_KEY} {v}"
    o = ops[len(steps)]
    return act == f"{v}{'+' if o >= 0 else '-'}{abs(o)}={v + o}"


STEP_CHECKERS: dict[str, StepChecker] = {"chain": check_chain_step}


def step_checker(name: str) -> StepChecker:
    """A task's step checker by name."""
    if name not in STEP_CHECKERS:
        raise ValueError(f"unknown step checker {name!r} (known: {sorted(STEP_CHECKERS)})")
    return STEP_CHECKERS[name]


def state_is_clean(check: StepChecker, state_text: str, delimiter: str = "\n") -> bool:
    """Whether every step of ``state_text`` (prompt, then one step per line) is right by ``check``: only in
    such a state can a right next step have a higher value than a wrong one (after an error every action's
    value is ~0), so ranking against step correctness is measured on clean states."""
    lines = state_text.split(delimiter)
    head = lines[0] + delimiter
    for ln in lines[1:]:
        if not ln.strip():
            continue
        if not check(head, ln):
            return False
        head += ln + delimiter
    return True


def action_ranking(states: Sequence[tuple[int, Sequence[tuple[float, float, Optional[bool]]]]]) -> dict:
    """How well values order the candidate actions of each state — the quality DAPO's gain tracks.

    ``states``: ``(step position, [(value, outcome, correct) per distinct action])`` where ``outcome`` is the
    action's MC outcome (mean reward of the rollouts through it) and ``correct`` whether the step is right
    (a step checker; None if unknown). Returns, overall and per position (``by_position``): ``vs_mc`` (pairs
    whose outcomes differ, ordered like the outcomes; ties in value count half) with its ``mc_pairs``, and
    ``vs_correct`` (pairs of a right and a wrong step where the right one has the higher value) with its
    ``correct_pairs``."""
    def acc(pairs: list[float]) -> float:
        return sum(pairs) / len(pairs) if pairs else float("nan")

    mc: dict[int, list[float]] = {}
    cor: dict[int, list[float]] = {}
    for pos, acts in states:
        for i, (va, oa, ca) in enumerate(acts):
            for vb, ob, cb in acts[i + 1:]:
                if oa != ob:
                    s = (va - vb) * (oa - ob)
                    mc.setdefault(pos, []).append(1.0 if s > 0 else 0.5 if s == 0 else 0.0)
                if ca is not None and cb is not None and ca != cb:
                    d = (va - vb) if ca else (vb - va)
                    cor.setdefault(pos, []).append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)
    every = lambda d: [x for v in d.values() for x in v]  # noqa: E731
    return {"vs_mc": acc(every(mc)), "mc_pairs": len(every(mc)), "vs_correct": acc(every(cor)),
            "correct_pairs": len(every(cor)),
            "by_position": {int(p): {"vs_mc": acc(mc.get(p, [])), "mc_pairs": len(mc.get(p, [])),
                                     "vs_correct": acc(cor.get(p, [])), "correct_pairs": len(cor.get(p, []))}
                            for p in sorted(set(mc) | set(cor))}}


__all__ = ["StepChecker", "STEP_CHECKERS", "parse_chain_prompt", "check_chain_step", "step_checker",
           "state_is_clean", "action_ranking"]
