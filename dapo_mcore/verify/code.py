"""Code verifier: extract the program from a completion, run it against the problem's unit tests in
the sandbox (:mod:`dapo_mcore.verify.sandbox`), reward 1.0 iff every test passes (or the fraction
passed, ``reward="fraction"``).

Test specs: :mod:`dapo_mcore.data.code_spec` (TACO stdin/stdout and call, HumanEval, MBPP). Verdicts per test
and per program: ``pass``, ``wrong_answer``, ``runtime_error``, ``timeout``, ``memory_limit``, ``sandbox_error``.
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dapo_mcore.data.code_spec import CodeSpec, parse_code_spec
from dapo_mcore.verify.base import Verifier, VerifierStats
from dapo_mcore.verify.sandbox import (
    Job,
    RunResult,
    Sandbox,
    SandboxConfig,
    SandboxPool,
    probe_isolation,
)

VERDICTS = ("pass", "wrong_answer", "runtime_error", "timeout", "memory_limit", "sandbox_error")


# --------------------------------------------------------------------------------------------- #
# Code extraction
# --------------------------------------------------------------------------------------------- #
@dataclass(frozen=True)
class CodeExtractConfig:
    """Which fenced block of a completion is the program. ``block``: ``"last"`` or ``"first"``;
    ``languages``: accepted fence tags (``""`` = untagged); ``allow_unterminated``: a final fence
    without closing backticks (a truncated completion) still counts; ``fallback_to_text``: with no
    block, run the whole completion."""

    block: str = "last"
    languages: tuple[str, ...] = ("python", "py", "python3", "")
    allow_unterminated: bool = True
    fallback_to_text: bool = False

    def __post_init__(self):
        if self.block not in ("last", "first"):
            raise ValueError(f"CodeExtractConfig.block must be 'last' or 'first', got {self.block!r}")


_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(^[ \t]*```|\Z)", re.DOTALL | re.MULTILINE)


def extract_code(text: str, cfg: CodeExtractConfig = CodeExtractConfig()) -> str | None:
    """The program in ``text`` per ``cfg`` (None when there is none)."""
    blocks = []
    langs = {x.lower() for x in cfg.languages}
    for m in _FENCE.finditer(text):
        if not m.group(3) and not cfg.allow_unterminated:
            continue
        if m.group(1).lower() in langs and m.group(2).strip():
            blocks.append(m.group(2))
    if blocks:
        return blocks[-1] if cfg.block == "last" else blocks[0]
    return text if cfg.fallback_to_text and text.strip() else None


# --------------------------------------------------------------------------------------------- #
# Running tests
# --------------------------------------------------------------------------------------------- #
@dataclass(frozen=True)
class CodeVerifierConfig:
    """``timeout_s``: per test (stdio: per run; call/assert: per case); ``max_run_s``: cap on one
    harness run (all cases); ``reward``: ``"all"`` (1 iff every test passes) or ``"fraction"``;
    ``fail_fast``: stop a stdio program at its first failing test; ``float_tol``: absolute/relative
    tolerance for numeric outputs."""

    timeout_s: float = 5.0
    max_run_s: float = 120.0
    reward: str = "all"
    fail_fast: bool = True
    float_tol: float = 1e-6
    extract: CodeExtractConfig = field(default_factory=CodeExtractConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def __post_init__(self):
        if self.reward not in ("all", "fraction"):
            raise ValueError(f"CodeVerifierConfig.reward must be 'all' or 'fraction', got {self.reward!r}")
        if not self.timeout_s > 0 or not self.max_run_s > 0:
            raise ValueError("CodeVerifierConfig.timeout_s and max_run_s must be > 0")


@dataclass
class TestResult:
    verdict: str
    wall_s: float = 0.0
    detail: str = ""


@dataclass
class ProgramResult:
    """Per-program verdict (the first non-passing test's, else ``pass``), reward, per-test results
    (tests not reached — fail-fast or a crash of a harness run — are not listed)."""

    verdict: str
    reward: float
    tests: list[TestResult]
    tests_total: int
    wall_s: float
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _num(tok: str) -> float | None:
    try:
        return float(tok)
    except ValueError:
        return None


def _close(a: float, b: float, tol: float) -> bool:
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tol * max(1.0, abs(b)))


def stdout_matches(got: str, want: str, float_tol: float = 1e-6) -> bool:
    """Lines equal up to trailing whitespace and trailing blank lines; else tokens equal, numbers
    within ``float_tol`` (absolute, or relative above 1)."""
    def lines(s: str) -> list[str]:
        ls = [ln.rstrip() for ln in s.replace("\r\n", "\n").split("\n")]
        while ls and not ls[-1]:
            ls.pop()
        return ls

    if lines(got) == lines(want):
        return True
    g, w = got.split(), want.split()
    if len(g) != len(w):
        return False
    for a, b in zip(g, w):
        if a == b:
            continue
        x, y = _num(a), _num(b)
        if x is None or y is None or not _close(x, y, float_tol):
            return False
    return True


def values_match(got: Any, want: Any, float_tol: float = 1e-6) -> bool:
    """JSON values equal (lists elementwise, floats within ``float_tol``; bool is not a number)."""
    if isinstance(got, bool) or isinstance(want, bool):
        return got is want if isinstance(got, bool) and isinstance(want, bool) else False
    if isinstance(got, (int, float)) and isinstance(want, (int, float)):
        return _close(float(got), float(want), float_tol) if isinstance(got, float) or isinstance(want, float) else got == want
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(values_match(a, b, float_tol) for a, b in zip(got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(values_match(got[k], want[k], float_tol) for k in got)
    return got == want


def _run_verdict(r: RunResult) -> tuple[str, str] | None:
    """Verdict of a run that did not finish normally (None when it exited 0)."""
    if r.status == "timeout":
        return "timeout", r.detail
    if r.status == "memory_limit":
        return "memory_limit", r.detail
    if r.status == "output_limit":
        return "runtime_error", r.detail
    if r.status == "sandbox_error":
        return "sandbox_error", r.detail
    if r.exit_code != 0:
        tail = r.stderr.decode("utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        how = f"killed by signal {-r.exit_code}" if (r.exit_code or 0) < 0 else f"exit code {r.exit_code}"
        return "runtime_error", f"{how}: {tail[0][:200]}"
    return None


_CASE_VERDICT = {"ok": "pass", "fail": "wrong_answer", "error": "runtime_error", "timeout": "timeout",
                 "memory": "memory_limit"}


def run_tests(sb: Sandbox, code: str, spec: CodeSpec, cfg: CodeVerifierConfig) -> ProgramResult:
    """Run every test of ``spec`` on ``code`` in sandbox ``sb``; never raises."""
    t0 = time.monotonic()
    t = spec.timeout_s or cfg.timeout_s
    base = sb.cfg.limits
    source = f"{spec.setup}\n{code}" if spec.setup else code
    tests: list[TestResult] = []
    if spec.kind == "stdio":
        lim = replace(base, wall_s=t, cpu_s=t)
        for inp, want in zip(spec.inputs, spec.outputs):
            r = sb.run(Job("stdio", source, stdin=inp.encode(), limits=lim))
            bad = _run_verdict(r)
            if bad is None:
                ok = stdout_matches(r.stdout.decode("utf-8", errors="replace"), want, cfg.float_tol)
                bad = None if ok else ("wrong_answer", "stdout differs")
            tests.append(TestResult(bad[0] if bad else "pass", r.wall_s, bad[1] if bad else ""))
            if bad and cfg.fail_fast:
                break
    else:
        n = spec.n_tests
        wall = min(cfg.max_run_s, t * n + 2.0)
        lim = replace(base, wall_s=wall, cpu_s=wall)
        if spec.kind == "call":
            payload = {"fn_name": spec.fn_name, "cases": [json.dumps(a) for a in spec.inputs], "case_timeout_s": t}
        else:
            payload = {"tests": list(spec.tests), "case_timeout_s": t}
        r = sb.run(Job(spec.kind, source, payload=payload, limits=lim))
        got = {rec["i"]: rec for rec in r.results if 0 <= rec["i"] < n}
        for i in range(n):
            rec = got.get(i)
            if rec is None:
                bad = _run_verdict(r) or ("runtime_error", "program exited before running this test")
                tests.append(TestResult(bad[0], r.wall_s, bad[1]))
                break
            v = _CASE_VERDICT.get(rec.get("status"), "sandbox_error")
            if v == "pass" and spec.kind == "call":
                out, want = rec.get("out"), spec.outputs[i]
                if not (values_match(out, want, cfg.float_tol) or values_match([out], want, cfg.float_tol)):
                    v = "wrong_answer"
            wall = rec.get("t")
            tests.append(TestResult(v, float(wall) if isinstance(wall, (int, float)) else 0.0,
                                    str(rec.get("err", ""))[:300]))
    n_pass = sum(x.verdict == "pass" for x in tests)
    total = spec.n_tests
    first_bad = next((x for x in tests if x.verdict != "pass"), None)
    verdict = first_bad.verdict if first_bad else ("pass" if n_pass == total else "wrong_answer")
    reward = (1.0 if n_pass == total else 0.0) if cfg.reward == "all" else n_pass / total
    return ProgramResult(verdict, reward, tests, total, time.monotonic() - t0, first_bad.detail if first_bad else "")


# --------------------------------------------------------------------------------------------- #
# The verifier
# --------------------------------------------------------------------------------------------- #
@dataclass
class CodeVerifierStats(VerifierStats):
    """Base counters (``errors`` = sandbox errors + bad specs, ``timeouts`` = programs timed out)
    plus verdict counts per program and per test and the isolation actually in force."""

    programs: dict = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    tests: dict = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    no_code: int = 0
    bad_spec: int = 0
    isolation: dict = field(default_factory=dict)


class CodeVerifier(Verifier):
    """Reward from running the completion's program against the tests in ``answer`` (a test spec).

    Programs run in a :class:`~dapo_mcore.verify.sandbox.SandboxPool` (created on first use, closed
    by :meth:`close` or at exit). :meth:`verify` runs one program; :meth:`verify_many` runs many in
    parallel. Neither raises. No SIGALRM is used (limits are enforced by the sandbox), so both may be
    called from any thread, but one thread at a time per verifier.
    """

    name = "code"

    def __init__(self, timeout_s: float | None = 5.0, cfg: CodeVerifierConfig | None = None):
        super().__init__(timeout_s)
        self.cfg = cfg or CodeVerifierConfig(timeout_s=timeout_s or CodeVerifierConfig.timeout_s)
        self.stats = CodeVerifierStats(isolation=probe_isolation(self.cfg.sandbox).as_dict())
        self._pool: SandboxPool | None = None
        self._lock = threading.Lock()
        self.last: ProgramResult | None = None

    @property
    def pool(self) -> SandboxPool:
        with self._lock:
            if self._pool is None:
                self._pool = SandboxPool(self.cfg.sandbox)
                weakref.finalize(self, self._pool.close)
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def _task(self, completion_text: str, answer: Any):
        """``(ProgramResult | None, note)``-returning pool task, or a ready result for no code / bad spec."""
        try:
            spec = parse_code_spec(answer)
        except ValueError as e:
            return None, f"bad_spec: {e}"
        code = extract_code(completion_text, self.cfg.extract)
        if code is None:
            return ProgramResult("wrong_answer", 0.0, [], spec.n_tests, 0.0, "no code block"), "no_code"
        cfg = self.cfg
        return (lambda sb: run_tests(sb, code, spec, cfg)), ""

    def _record(self, res: ProgramResult | None, note: str) -> float:
        s = self.stats
        s.calls += 1
        if res is None:
            s.errors += 1
            s.bad_spec += note.startswith("bad_spec")
            return 0.0
        s.no_code += note == "no_code"
        s.programs[res.verdict] = s.programs.get(res.verdict, 0) + 1
        for t in res.tests:
            s.tests[t.verdict] = s.tests.get(t.verdict, 0) + 1
        s.errors += res.verdict == "sandbox_error"
        s.timeouts += res.verdict == "timeout"
        s.correct += res.reward > 0
        self.last = res
        return float(res.reward)

    def evaluate_many(self, pairs: list[tuple[str, Any]]) -> list[ProgramResult | None]:
        """Full results (None for a bad spec) for ``(completion_text, answer)`` pairs, run in parallel
        (not counted in :attr:`stats`)."""
        return [r for r, _ in self._evaluate(pairs)]

    def _evaluate(self, pairs: list[tuple[str, Any]]) -> list[tuple[ProgramResult | None, str]]:
        prepared = [self._task(text, ans) for text, ans in pairs]
        futs = [self.pool.submit(task) if callable(task) else None for task, _ in prepared]
        out = []
        for (task, note), fut in zip(prepared, futs):
            if fut is None:
                out.append((task, note))
                continue
            try:
                out.append((fut.result(), note))
            except Exception as e:  # noqa: BLE001 - never raise
                out.append((ProgramResult("sandbox_error", 0.0, [], 0, 0.0, f"{type(e).__name__}: {e}"), note))
        return out

    def verify_many(self, pairs: list[tuple[str, Any]]) -> list[float]:
        """Rewards for ``(completion_text, answer)`` pairs, programs run in parallel on the pool."""
        try:
            out = self._evaluate(pairs)
        except Exception as e:  # noqa: BLE001 - a verifier never raises
            out = [(ProgramResult("sandbox_error", 0.0, [], 0, 0.0, f"{type(e).__name__}: {e}"), "")] * len(pairs)
        return [self._record(r, n) for r, n in out]

    def verify(self, completion_text: str, answer: str) -> float:
        return self.verify_many([(completion_text, answer)])[0]

    def check(self, completion_text: str, answer: str) -> float:
        res, note = self._evaluate([(completion_text, answer)])[0]
        if res is None:
            raise ValueError(note)
        return res.reward
