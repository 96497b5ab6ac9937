"""Code verifier: test-spec parsing, code extraction, output comparison, the three test formats,
verdict counts, the bounded pool, problem-set validation of code rows and the generate stage with
``verifier="code"``."""
from __future__ import annotations

import json
import threading
import time

import pytest

from dapo_mcore.data.code_spec import parse_code_spec
from dapo_mcore.data.problems import ProblemSetError, read_problems
from dapo_mcore.verify import CodeVerifier, make_verifier
from dapo_mcore.verify.code import (
    CodeExtractConfig,
    CodeVerifierConfig,
    extract_code,
    stdout_matches,
    values_match,
)
from dapo_mcore.verify.sandbox import Job, SandboxConfig, SandboxLimits, SandboxPool

ADD_STDIO = {"inputs": ["1 2\n", "3 4\n", "10 -3\n"], "outputs": ["3\n", "7\n", "7"]}
ADD_SRC = "a, b = map(int, input().split())\nprint(a + b)\n"


def fence(src: str, lang: str = "python") -> str:
    return f"Let me solve it.\n```{lang}\n{src}```\nDone."


@pytest.fixture(scope="module")
def verifier():
    v = CodeVerifier(cfg=CodeVerifierConfig(timeout_s=20.0, fail_fast=False))   # generous: shared CPU
    yield v
    v.close()


# ------------------------------------------------------------------------------------------ specs
def test_parse_formats():
    s = parse_code_spec(ADD_STDIO)
    assert s.kind == "stdio" and s.inputs == ("1 2\n", "3 4\n", "10 -3\n") and s.n_tests == 3
    s = parse_code_spec(json.dumps({"inputs": [["l1", "l2"]], "outputs": [["o1", "o2"]]}))   # JSON text, line lists
    assert s.inputs == ("l1\nl2",) and s.outputs == ("o1\no2",)
    s = parse_code_spec({"fn_name": "f", "inputs": [[1, [2]]], "outputs": [3], "timeout_s": 0.5})
    assert s.kind == "call" and s.fn_name == "f" and s.inputs == ([1, [2]],) and s.timeout_s == 0.5
    s = parse_code_spec({"test": "def check(c):\n    assert c(1) == 1\n", "entry_point": "f", "prefix": "import math"})
    assert s.kind == "assert" and s.tests[0].endswith("check(f)\n") and s.setup == "import math"
    s = parse_code_spec({"test_list": ["assert f(1)", "assert f(2)"], "test_setup_code": "X = 1",
                         "test_imports": ["import math"]})
    assert s.kind == "assert" and s.n_tests == 2 and s.setup == "import math\nX = 1"


@pytest.mark.parametrize("bad,msg", [
    ("{not json", "not valid JSON"),
    ([1], "must be a JSON object"),
    ({"inputs": ["1"], "outputs": ["1"], "colour": 1}, "unknown key(s) colour"),
    ({"inputs": ["1"]}, "lists 'inputs' and 'outputs'"),
    ({"inputs": ["1", "2"], "outputs": ["1"]}, "as many inputs as outputs"),
    ({"inputs": [], "outputs": []}, "as many inputs as outputs (>0)"),
    ({"inputs": [1], "outputs": ["1"]}, "inputs[0] must be a string"),
    ({"fn_name": "a b", "inputs": [[1]], "outputs": [1]}, "'fn_name' must be a Python identifier"),
    ({"fn_name": "f", "inputs": [1], "outputs": [1]}, "inputs[0] must be a list of arguments"),
    ({"test": "", "entry_point": "f"}, "non-empty string 'test'"),
    ({"test": "x", "entry_point": "1f"}, "'entry_point' must be a Python identifier"),
    ({"test_list": []}, "non-empty list"),
    ({"test_list": ["assert 1"], "inputs": ["1"], "outputs": ["1"]}, "exactly one of"),
    ({"test_list": ["assert 1"], "timeout_s": -1}, "'timeout_s' must be a positive number"),
])
def test_parse_errors_say_what_is_wrong(bad, msg):
    with pytest.raises(ValueError) as e:
        parse_code_spec(bad)
    assert msg in str(e.value)


def test_extract_code():
    two = "```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n"
    assert extract_code(two) == "print(2)\n"
    assert extract_code(two, CodeExtractConfig(block="first")) == "print(1)\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"                       # untagged fence
    assert extract_code("```cpp\nint main(){}\n```") is None                  # other language
    assert extract_code("```python\nprint(3)\n") == "print(3)\n"              # truncated completion
    assert extract_code("```python\nprint(3)\n", CodeExtractConfig(allow_unterminated=False)) is None
    assert extract_code("print(4)") is None
    assert extract_code("print(4)", CodeExtractConfig(fallback_to_text=True)) == "print(4)"
    assert extract_code("```python\n```\n```python\nprint(5)\n```") == "print(5)\n"   # empty block skipped
    with pytest.raises(ValueError, match="block"):
        CodeExtractConfig(block="middle")


def test_output_comparison():
    assert stdout_matches("3  \n\n\n", "3")
    assert stdout_matches("1 2\n3\n", "1 2 3")                       # token-wise
    assert stdout_matches("0.3333333\n", "0.33333333")               # within 1e-6
    assert not stdout_matches("0.33\n", "0.3333")
    assert not stdout_matches("3\n4\n", "3\n")
    assert values_match([1, 2.0000000001], [1, 2]) and not values_match([1, 2], [1, 2, 3])
    assert not values_match(True, 1) and not values_match(1, True) and values_match(False, False)
    assert values_match({"a": [1.0]}, {"a": [1]}) and not values_match("1", 1)


# -------------------------------------------------------------------------------------- verifier
def test_stdio_pass_wrong_and_per_test_verdicts(verifier):
    r = verifier.evaluate_many([(fence(ADD_SRC), ADD_STDIO)])[0]
    assert r.verdict == "pass" and r.reward == 1.0 and [t.verdict for t in r.tests] == ["pass"] * 3
    bad = "a, b = map(int, input().split())\nprint(a + b if a < 3 else a - b)\n"
    r = verifier.evaluate_many([(fence(bad), ADD_STDIO)])[0]
    assert r.verdict == "wrong_answer" and r.reward == 0.0
    assert [t.verdict for t in r.tests] == ["pass", "wrong_answer", "wrong_answer"]


def test_call_format_with_solution_class_and_taco_wrapping(verifier):
    spec = {"fn_name": "twice", "inputs": [[2], [[1, 2]], ["ab"]], "outputs": [4, [[1, 2, 1, 2]], "abab"]}
    assert verifier.verify(fence("def twice(x):\n    return x * 2\n"), json.dumps(spec)) == 1.0
    cls = "class Solution:\n    def twice(self, x):\n        return x + x\n"
    assert verifier.verify(fence(cls), json.dumps(spec)) == 1.0
    r = verifier.evaluate_many([(fence("def twice(x):\n    return x * 3 if x == 2 else 1 / 0\n"), spec)])[0]
    assert [t.verdict for t in r.tests] == ["wrong_answer", "runtime_error", "runtime_error"]
    assert "ZeroDivisionError" in r.tests[1].detail
    r = verifier.evaluate_many([(fence("def other(x):\n    return x\n"), spec)])[0]
    assert r.verdict == "runtime_error" and len(r.tests) == 1     # no such function: nothing ran


def test_humaneval_and_mbpp_formats(verifier):
    he = {"test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
          "entry_point": "total", "prefix": "from typing import List\n"}
    good = "def total(xs: List[int]) -> int:\n    return sum(xs)\n"
    assert verifier.verify(fence(good), json.dumps(he)) == 1.0
    assert verifier.verify(fence("def total(xs):\n    return 3\n"), json.dumps(he)) == 0.0
    mbpp = {"test_list": ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(-2) == -4"],
            "test_setup_code": "OFFSET = 0"}
    r = verifier.evaluate_many([(fence("def sq(x):\n    return x * x + OFFSET\n"), mbpp)])[0]
    assert [t.verdict for t in r.tests] == ["pass", "pass", "wrong_answer"] and r.reward == 0.0
    assert all(t.wall_s >= 0 for t in r.tests)


def test_exit_zero_before_tests_is_not_a_pass(verifier):
    """A program that exits (even with status 0) while loading never reaches the tests."""
    mbpp = {"test_list": ["assert f() == 1"]}
    for src in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "def f():\n    raise SystemExit(0)\n"):
        assert verifier.verify(fence(src), json.dumps(mbpp)) == 0.0, src


def test_fraction_reward_and_stats_counts():
    v = CodeVerifier(cfg=CodeVerifierConfig(timeout_s=20.0, reward="fraction", fail_fast=False))
    try:
        bad = "a, b = map(int, input().split())\nprint(a + b if a < 3 else 0)\n"
        rewards = v.verify_many([(fence(ADD_SRC), ADD_STDIO), (fence(bad), ADD_STDIO), ("no code here", ADD_STDIO),
                                 (fence(ADD_SRC), '{"nonsense": 1}'), (fence("def f(:\n"), ADD_STDIO)])
        assert rewards == pytest.approx([1.0, 1 / 3, 0.0, 0.0, 0.0])
        s = v.stats.as_dict()
        assert s["calls"] == 5 and s["correct"] == 2 and s["errors"] == 1 and s["bad_spec"] == 1 and s["no_code"] == 1
        assert s["programs"]["pass"] == 1 and s["programs"]["wrong_answer"] == 2 and s["programs"]["runtime_error"] == 1
        assert s["tests"]["pass"] == 4 and s["tests"]["wrong_answer"] == 2 and s["tests"]["runtime_error"] == 3
        assert "network" in s["isolation"] and "fork_bomb_defence" in s["isolation"]
        json.dumps(s)   # the stage summary must be serialisable
    finally:
        v.close()


def test_make_verifier_code_and_never_raises():
    v = make_verifier("code", 20.0)
    try:
        assert isinstance(v, CodeVerifier) and v.cfg.timeout_s == 20.0
        assert v.verify(fence(ADD_SRC), json.dumps(ADD_STDIO)) == 1.0
        assert v.verify(fence(ADD_SRC), None) == 0.0 and v.stats.errors == 1   # type: ignore[arg-type]
    finally:
        v.close()


def test_pool_queue_is_bounded_and_results_ordered():
    cfg = SandboxConfig(workers=1, queue_size=1, limits=SandboxLimits(wall_s=20, cpu_s=20))
    with SandboxPool(cfg) as pool:
        gate = threading.Event()
        first = pool.submit(lambda sb: gate.wait(10))       # occupies the only worker
        time.sleep(0.2)
        pool.submit(lambda sb: 1)                            # fills the queue (size 1)
        blocked = threading.Event()

        def third():
            pool.submit(lambda sb: 2)
            blocked.set()

        th = threading.Thread(target=third)
        th.start()
        time.sleep(0.3)
        assert not blocked.is_set()                          # submit waits for room
        gate.set()
        th.join(10)
        assert blocked.is_set() and first.result() is True
        outs = pool.map([lambda sb, i=i: sb.run(Job("stdio", f"print({i} * 7)")).stdout for i in range(4)])
        assert outs == [b"0\n", b"7\n", b"14\n", b"21\n"]
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(lambda sb: 0)


def test_bad_configs_rejected():
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=0)
    with pytest.raises(ValueError, match="reward"):
        CodeVerifierConfig(reward="best")
    with pytest.raises(ValueError, match="mode"):
        Job("shell", "ls")
    with pytest.raises(ValueError, match="workers"):
        SandboxPool(SandboxConfig(workers=0))


# ------------------------------------------------------------------------------ problems + stage
def test_problem_rows_with_code_specs(tmp_path):
    rows = [{"id": "m", "prompt": "1+1?", "answer": "2"},
            {"id": "c", "prompt": "add two ints", "answer": ADD_STDIO},
            {"id": "h", "prompt": "sum", "answer": {"test": "def check(c):\n    assert c([1]) == 1\n",
                                                    "entry_point": "total"}}]
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ps = read_problems(p)
    assert ps.problems[0].answer == "2"                               # math rows unchanged
    assert parse_code_spec(ps.problems[1].answer).inputs == tuple(ADD_STDIO["inputs"])
    assert parse_code_spec(ps.problems[2].answer).kind == "assert"
    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"id": "x", "prompt": "q", "answer": {"inputs": ["1"]}}) + "\n")
    with pytest.raises(ProblemSetError) as e:
        read_problems(p)
    assert f"{p}:2:" in str(e.value) and "not a valid code test spec" in str(e.value) and "'outputs'" in str(e.value)
    assert read_problems(p, skip_bad_rows=True).n_skipped == 1


class ScriptedBackend:
    """Returns fixed completions (cycled) instead of sampling: the stage/verifier wiring under test."""

    def __init__(self, texts: dict[str, list[str]]):
        self.texts = texts

    def generate(self, reqs):
        out = []
        for r in reqs:
            ts = self.texts[r.rid]
            out.append([{"text": ts[i % len(ts)], "output_ids": [1, 2, 3],
                         "meta_info": {"prompt_tokens": len(r.input_ids), "completion_tokens": 3, "cached_tokens": 0,
                                       "finish_reason": {"type": "stop"}}} for i in range(r.params.n)])
        return out

    def close(self):
        pass


def test_generate_stage_with_code_verifier(tiny_qwen2, tmp_path):
    from dapo_mcore.generate.stage import GenerateConfig, run_generate

    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"id": "add", "prompt": "Add two ints.", "answer": ADD_STDIO}) + "\n"
                 + json.dumps({"id": "sq", "prompt": "Square.", "answer": {"test_list": ["assert sq(3) == 9"]}}) + "\n")
    texts = {"add": [fence(ADD_SRC), fence("print(0)\n"), "I don't know", fence("while True:\n    pass\n")],
             "sq": [fence("def sq(x):\n    return x * x\n"), fence("def sq(x):\n    return x + x\n")]}
    cfg = GenerateConfig(str(p), str(tiny_qwen2), num_samples=4, keep=2, verifier="code", verify_timeout_s=3.0,
                         show_progress=False, fmt="jsonl")
    summary = run_generate(cfg, tmp_path / "gen", backend=ScriptedBackend(texts))
    v = summary["verifier"]
    assert v["calls"] == 8 and v["correct"] == 3 and v["timeouts"] == 1 and v["no_code"] == 1
    assert v["programs"] == {"pass": 3, "wrong_answer": 4, "runtime_error": 0, "timeout": 1, "memory_limit": 0,
                             "sandbox_error": 0}
    recs = [json.loads(x) for f in sorted((tmp_path / "gen").glob("*.jsonl")) for x in f.read_text().splitlines()]
    by_id = {r["problem_id"]: r for r in recs}
    assert by_id["add"]["rewards"] == [1.0, 0.0, 0.0, 0.0] and by_id["sq"]["rewards"] == [1.0, 0.0, 1.0, 0.0]


def test_degraded_isolation_is_stated_and_still_runs():
    """With every optional layer off, the description says so plainly and programs still run."""
    from dapo_mcore.verify.sandbox import probe_isolation

    cfg = SandboxConfig(use_namespaces=False, use_cgroups=False, drop_privileges=False, workers=1)
    iso = probe_isolation(cfg)
    assert not (iso.namespaces or iso.pids_cgroup or iso.memory_cgroup or iso.privilege_drop)
    text = iso.describe()
    assert "NOT ISOLATED: audit hook only" in text and "RLIMIT_NPROC is not enforced for root" in text
    assert "SAME UID" in text
    v = CodeVerifier(cfg=CodeVerifierConfig(timeout_s=20.0, sandbox=cfg))
    try:
        assert v.verify(fence(ADD_SRC), json.dumps(ADD_STDIO)) == 1.0
        assert v.stats.isolation["network"].startswith("NOT ISOLATED")
    finally:
        v.close()


def test_per_case_timer_in_harness_formats(verifier):
    """A call case that never returns is a timeout for that case only; later cases still run."""
    spec = {"fn_name": "f", "inputs": [[1], [0], [2]], "outputs": [1, 0, 2], "timeout_s": 2.0}
    src = "def f(x):\n    while x == 0:\n        pass\n    return x\n"
    r = verifier.evaluate_many([(fence(src), spec)])[0]
    assert [t.verdict for t in r.tests] == ["pass", "timeout", "pass"] and r.verdict == "timeout"
    assert r.tests[1].wall_s >= 1.6          # the case ran until its own limit (no upper bound: load varies)


def test_parquet_struct_column_code_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "c1", "prompt": "add", "answer": {"inputs": ["1 2\n"], "outputs": ["3\n"]}},
            {"id": "c2", "prompt": "add", "answer": {"inputs": ["2 2\n"], "outputs": ["4\n"]}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    ps = read_problems(tmp_path / "c.parquet")
    assert [parse_code_spec(p.answer).outputs for p in ps.problems] == [("3\n",), ("4\n",)]
