"""Verifier interface: ``verify(completion_text, answer) -> reward in [0, 1]`` that never raises.

An exception or a timeout inside a check counts as a wrong answer (reward 0.0) and is counted in
:class:`VerifierStats`, so a bad completion can never crash a rollout run.
"""
from __future__ import annotations

import signal
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import asdict, dataclass


class VerifyTimeout(Exception):
    """A single check exceeded its time limit."""


@dataclass
class VerifierStats:
    calls: int = 0
    correct: int = 0
    errors: int = 0
    timeouts: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`VerifyTimeout` in the block after ``seconds`` (SIGALRM interval timer).

    Only usable on the main thread of the main interpreter; ``None``/``<=0`` disables it.
    """
    if not seconds or seconds <= 0:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("time_limit() needs the main thread (SIGALRM)")

    def _raise(signum, frame):
        raise VerifyTimeout(f"check exceeded {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Verifier(ABC):
    """Base class: subclasses implement :meth:`check`; :meth:`verify` adds the time limit, the
    never-raise guarantee and the counters. Off the main thread no SIGALRM is possible, so the
    check then runs without a time limit (call verifiers from the stage's main thread)."""

    name = "base"

    def __init__(self, timeout_s: float | None = 5.0):
        self.timeout_s = timeout_s
        self.stats = VerifierStats()

    @abstractmethod
    def check(self, completion_text: str, answer: str) -> float:
        """Reward in [0, 1] for ``completion_text`` against the reference ``answer``; may raise."""

    def verify(self, completion_text: str, answer: str) -> float:
        self.stats.calls += 1
        on_main = threading.current_thread() is threading.main_thread()
        try:
            with time_limit(self.timeout_s if on_main else None):
                r = float(self.check(completion_text, answer))
        except VerifyTimeout:
            self.stats.timeouts += 1
            return 0.0
        except Exception:  # noqa: BLE001 - a verifier must never crash the run
            self.stats.errors += 1
            return 0.0
        if not 0.0 <= r <= 1.0 or r != r:
            self.stats.errors += 1
            return 0.0
        if r > 0:
            self.stats.correct += 1
        return r
