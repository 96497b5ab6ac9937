"""Exact-match verifier for synthetic tasks (the chain task's ``answer: N`` line)."""
from __future__ import annotations

from typing import Callable

from dapo_mcore.tasks.chain import extract_answer as chain_extract_answer
from dapo_mcore.verify.base import Verifier


class ExactMatchVerifier(Verifier):
    """Reward 1.0 iff ``extract(completion)`` equals the answer after stripping whitespace."""

    name = "exact"

    def __init__(self, extract: Callable[[str], str | None] = chain_extract_answer, timeout_s: float | None = 5.0):
        super().__init__(timeout_s)
        self.extract = extract

    def check(self, completion_text: str, answer: str) -> float:
        got = self.extract(completion_text)
        return 1.0 if got is not None and got.strip() == str(answer).strip() else 0.0
