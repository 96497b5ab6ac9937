"""Answer verifiers: ``verify(completion_text, answer) -> float`` in [0, 1], never raising."""
from dapo_mcore.verify.base import Verifier, VerifierStats, VerifyTimeout, time_limit
from dapo_mcore.verify.code import CodeVerifier
from dapo_mcore.verify.exact import ExactMatchVerifier
from dapo_mcore.verify.math import MathVerifier

VERIFIERS = {"math": MathVerifier, "exact": ExactMatchVerifier, "code": CodeVerifier}


def make_verifier(name: str, timeout_s: float | None = 5.0) -> Verifier:
    """A fresh verifier by name (``"math"``, ``"exact"`` or ``"code"``: sandboxed unit tests, with
    ``timeout_s`` the per-test limit)."""
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; choose one of {sorted(VERIFIERS)}")
    return VERIFIERS[name](timeout_s=timeout_s)


__all__ = ["VERIFIERS", "CodeVerifier", "ExactMatchVerifier", "MathVerifier", "Verifier", "VerifierStats",
           "VerifyTimeout", "make_verifier", "time_limit"]
