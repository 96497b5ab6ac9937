"""Chain-of-operations task: a start value and a list of small +/- operations.

Prompt ``"47:+8-3+9-6\\n"``; a correct solution has one line per operation that repeats its
inputs, then the answer line (the format :mod:`dapo_mcore.verify.exact` reads)::

    47+8=55
    55-3=52
    52+9=61
    61-6=55
    answer: 55

Every line is checkable from itself and the line before, which is what lets a small critic
learn step correctness (../shared/notes/dapo-toy-findings.md). Values stay in [0, 99].
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from dapo_mcore.verify.exact import ANSWER_KEY

DELIMITER = "\n"


@dataclass(frozen=True)
class ChainProblem:
    """One problem: ``start`` followed by signed operands ``ops`` (e.g. ``(+8, -3)``)."""

    id: str
    start: int
    ops: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return f"{self.start}:" + "".join(f"{'+' if o >= 0 else '-'}{abs(o)}" for o in self.ops) + DELIMITER

    @property
    def answer(self) -> str:
        v = self.start
        for o in self.ops:
            v += o
        return str(v)

    def solution(self, carry_error_rate: float = 0.0, rng: random.Random | None = None,
                 step_error_rate: float = 0.0) -> str:
        """The step-by-step solution text (ends with the answer line, no trailing newline).

        With ``carry_error_rate`` > 0, a '+' step that needs a carry is written without it
        with that probability (a systematic error). With ``step_error_rate`` > 0, every step that
        is otherwise right is independently written off by 1 or 2 (either sign, staying in
        [0, 99]) with that probability (errors spread over the steps). Later lines stay
        consistent with an error.
        """
        rng = rng or random.Random(0)
        lines, v = [], self.start
        for o in self.ops:
            new = v + o
            if o > 0 and (v % 10) + (o % 10) >= 10 and rng.random() < carry_error_rate:
                new = new - 10  # dropped carry
            elif step_error_rate > 0 and rng.random() < step_error_rate:
                offs = [d for d in (-2, -1, 1, 2) if 0 <= new + d <= 99] or [1, 2]
                new = new + rng.choice(offs)   # a slip: off by 1 or 2
            sign = "+" if o >= 0 else "-"
            lines.append(f"{v}{sign}{abs(o)}={new}")
            v = new
        lines.append(f"{ANSWER_KEY} {v}")
        return DELIMITER.join(lines)

    def to_record(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "answer": self.answer}


def sample_problem(rng: random.Random, idx: int, n_ops: tuple[int, int] = (3, 5), prefix: str = "p") -> ChainProblem:
    """Draw one problem whose running value stays within [0, 99]."""
    n = rng.randint(*n_ops)
    start = rng.randint(10, 89)
    v, ops = start, []
    for _ in range(n):
        while True:
            o = rng.randint(1, 9) * rng.choice((1, -1))
            if 0 <= v + o <= 99:
                break
        ops.append(o)
        v += o
    return ChainProblem(id=f"{prefix}{idx:06d}", start=start, ops=tuple(ops))


def make_problems(n: int, seed: int, n_ops: tuple[int, int] = (3, 5), prefix: str = "p") -> list[ChainProblem]:
    rng = random.Random(seed)
    return [sample_problem(rng, i, n_ops, prefix) for i in range(n)]
