"""Exact-match verifier for synthetic tasks whose solutions end with an ``answer: N`` line (the chain task)."""
from __future__ import annotations

from typing import Callable

from dapo_mcore.verify.base import Verifier

ANSWER_KEY = "answer:"


def extract_answer(text: str) -> str | None:
    """The value after the last ``answer:`` in ``text`` (up to the end of its line), or None."""
    pos = text.rfind(ANSWER_KEY)
    if pos < 0:
        return None
    rest = text[pos + len(ANSWER_KEY):].strip().split("\n")[0].strip()
    return rest or None


class ExactMatchVerifier(Verifier):
    """Reward 1.0 iff ``extract(completion)`` equals the answer after stripping whitespace."""

    name = "exact"

    def __init__(self, extract: Callable[[str], str | None] = extract_answer, timeout_s: float | None = 5.0):
        super().__init__(timeout_s)
        self.extract = extract

    def check(self, completion_text: str, answer: str) -> float:
        got = self.extract(completion_text)
        return 1.0 if got is not None and got.strip() == str(answer).strip() else 0.0
