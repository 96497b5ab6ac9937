"""Math verifier on HuggingFace ``math-verify``: extracts the final answer of a completion
(``\\boxed{}``, "final answer is", last LaTeX/plain expression) and checks LaTeX / numeric /
symbolic equivalence with the reference answer.

math-verify's own timeouts use ``signal.alarm`` with whole seconds; here they are disabled and the
whole check (both parses + comparison) runs under one :func:`~dapo_mcore.verify.base.time_limit`.
"""
from __future__ import annotations

import logging

from dapo_mcore.verify.base import Verifier


class MathVerifier(Verifier):
    """Reward 1.0 iff math-verify finds the completion's answer equivalent to ``answer``.

    ``answer`` may be plain (``"1/2"``, ``"0.5"``), LaTeX (``"\\frac{1}{2}"``, ``"[1, 2)"``) or
    already delimited (``"$...$"``, ``"\\boxed{...}"``).
    """

    name = "math"

    def __init__(self, timeout_s: float | None = 5.0, float_rounding: int = 6):
        super().__init__(timeout_s)
        self.float_rounding = float_rounding
        # math-verify warns once that its (signal) timeout is disabled: we apply our own.
        logging.getLogger("math_verify").setLevel(logging.ERROR)

    @staticmethod
    def _gold_text(answer: str) -> str:
        a = answer.strip()
        if "$" in a or "\\boxed" in a or "\\(" in a or "\\[" in a:
            return a
        return f"${a}$"

    def check(self, completion_text: str, answer: str) -> float:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
        gold = parse(self._gold_text(answer), extraction_config=cfg, parsing_timeout=None, raise_on_error=True)
        if not gold:
            raise ValueError(f"reference answer {answer!r} could not be parsed")
        pred = parse(completion_text, extraction_config=cfg, parsing_timeout=None, raise_on_error=True)
        if not pred:
            return 0.0
        ok = verify(gold, pred, float_rounding=self.float_rounding, timeout_seconds=None, raise_on_error=True)
        return 1.0 if ok else 0.0
