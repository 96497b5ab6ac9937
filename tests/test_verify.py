"""Verifiers: math-verify cases in its own style, exact match, and the never-crash guarantee."""
from __future__ import annotations

import time

import pytest

from dapo_mcore.verify import ExactMatchVerifier, MathVerifier, Verifier, make_verifier


@pytest.fixture(scope="module")
def mv():
    return MathVerifier(timeout_s=5.0)


@pytest.mark.parametrize("completion,answer,expected", [
    ("so the answer is $\\boxed{\\frac{1}{2}}$", "0.5", 1.0),
    ("\\boxed{1/2}", "\\frac12", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("The final answer is $\\frac{2}{4}$", "1/2", 1.0),
    ("\\boxed{\\frac{1}{3}}", "1/2", 0.0),
    ("the length is $\\boxed{10\\text{ cm}}$", "10", 1.0),
    ("$\\boxed{10^\\circ}$", "10", 1.0),
    ("The final answer is $(1,2]$", "(1,2]", 1.0),
    ("The final answer is $[1,2]$", "(1,2]", 0.0),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", 1.0),
    ("$x = \\boxed{\\sqrt{2}/2}$", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{3}", "4", 0.0),
    ("I don't know", "4", 0.0),
    ("\\boxed{2x+1}", "1+2x", 1.0),
])
def test_math_cases(mv, completion, answer, expected):
    assert mv.verify(completion, answer) == expected


def test_math_counts_errors_for_unparsable_reference():
    v = MathVerifier()
    assert v.verify("\\boxed{3}", "$$") == 0.0     # nothing to extract from the reference
    assert v.stats.errors == 1 and v.stats.calls == 1


def test_exact_match():
    v = ExactMatchVerifier()
    assert v.verify("47+8=55\nanswer: 55", "55") == 1.0
    assert v.verify("answer: 54\nanswer:  55 ", "55") == 1.0       # last answer line wins
    assert v.verify("answer: 56", "55") == 0.0
    assert v.verify("no answer", "55") == 0.0
    assert v.stats.correct == 2 and v.stats.calls == 4


class _Boom(Verifier):
    def check(self, completion_text, answer):
        if completion_text == "slow":
            t = time.time()
            while time.time() - t < 5:
                pass
        if completion_text == "raise":
            raise RuntimeError("bad")
        if completion_text == "nan":
            return float("nan")
        return 1.0


def test_never_crashes_counts_errors_and_timeouts():
    v = _Boom(timeout_s=0.2)
    t = time.time()
    assert v.verify("slow", "x") == 0.0
    assert time.time() - t < 2.0
    assert v.verify("raise", "x") == 0.0
    assert v.verify("nan", "x") == 0.0
    assert v.verify("ok", "x") == 1.0
    assert v.stats.as_dict() == {"calls": 4, "correct": 1, "errors": 2, "timeouts": 1}


def test_make_verifier():
    assert isinstance(make_verifier("math"), MathVerifier)
    with pytest.raises(ValueError, match="unknown verifier"):
        make_verifier("nope")
