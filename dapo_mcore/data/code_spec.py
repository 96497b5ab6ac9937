"""Code problems' test specs: the ``answer`` of a code problem row (a JSON object, or its JSON text),
validated when the problem set is read (:mod:`dapo_mcore.data.problems`) and run by the code verifier
(:mod:`dapo_mcore.verify.code`).

One of:

* TACO stdin/stdout: ``{"inputs": [str, ...], "outputs": [str, ...]}`` — the program reads the
  input on stdin; its stdout must equal the output (trailing whitespace per line and trailing blank
  lines ignored; else token-wise with numeric tokens equal within ``float_tol``).
* TACO call: ``{"fn_name": "f", "inputs": [[arg, ...], ...], "outputs": [value, ...]}`` — each
  case calls ``f(*args)`` (or ``Solution().f(*args)``); the JSON-normalised return value must equal
  the output (or ``[return value]``, TACO's wrapping), floats within ``float_tol``.
* HumanEval: ``{"test": "def check(candidate): ...", "entry_point": "f", "prefix": "..."?}`` —
  one test: run ``test`` then ``check(f)``.
* MBPP: ``{"test_list": ["assert f(1) == 2", ...], "test_setup_code": "..."?, "test_imports": [...]?}``
  — each assert line is one test.

Optional in all: ``"timeout_s"`` (per test; default the verifier's). ``prefix`` / setup code and
imports are put before the extracted program.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CodeSpec:
    """Normalised tests. ``kind``: ``"stdio"`` (``inputs``/``outputs`` strings), ``"call"``
    (``fn_name``, ``args`` per case, ``outputs`` JSON values) or ``"assert"`` (``tests`` code
    snippets). ``setup``: code put before the program. ``timeout_s``: per-test limit or None."""

    kind: str
    inputs: tuple = ()
    outputs: tuple = ()
    fn_name: str | None = None
    tests: tuple[str, ...] = ()
    setup: str = ""
    timeout_s: float | None = None

    @property
    def n_tests(self) -> int:
        return len(self.tests) if self.kind == "assert" else len(self.inputs)


_FORMAT_KEYS = {"inputs", "outputs", "fn_name", "test", "entry_point", "prefix", "test_list", "test_setup_code",
                "test_imports", "timeout_s"}


def _text(v: Any, what: str) -> str:
    if isinstance(v, list) and all(isinstance(x, str) for x in v):   # TACO sometimes stores lines
        return "\n".join(v)
    if not isinstance(v, str):
        raise ValueError(f"{what} must be a string (or a list of lines), got {type(v).__name__}")
    return v


def parse_code_spec(obj: Any) -> CodeSpec:
    """Validate a test spec (dict or its JSON text) and normalise it; ``ValueError`` says what is wrong."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as e:
            raise ValueError(f"code test spec is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"code test spec must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _FORMAT_KEYS)
    if unknown:
        raise ValueError(f"code test spec has unknown key(s) {', '.join(unknown)}")
    timeout = obj.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"'timeout_s' must be a positive number, got {timeout!r}")
    taco, heval, mbpp = "inputs" in obj or "outputs" in obj, "test" in obj or "entry_point" in obj, "test_list" in obj
    if taco + heval + mbpp != 1:
        raise ValueError("code test spec must have exactly one of: 'inputs'+'outputs' (TACO), "
                         "'test'+'entry_point' (HumanEval), 'test_list' (MBPP)")
    if taco:
        ins, outs = obj.get("inputs"), obj.get("outputs")
        if not isinstance(ins, list) or not isinstance(outs, list):
            raise ValueError("TACO spec needs lists 'inputs' and 'outputs'")
        if len(ins) != len(outs) or not ins:
            raise ValueError(f"TACO spec needs as many inputs as outputs (>0), got {len(ins)} and {len(outs)}")
        fn = obj.get("fn_name")
        if fn is None:
            return CodeSpec("stdio", tuple(_text(x, f"inputs[{i}]") for i, x in enumerate(ins)),
                            tuple(_text(x, f"outputs[{i}]") for i, x in enumerate(outs)), timeout_s=timeout)
        if not isinstance(fn, str) or not fn.isidentifier():
            raise ValueError(f"'fn_name' must be a Python identifier, got {fn!r}")
        for i, a in enumerate(ins):
            if not isinstance(a, list):
                raise ValueError(f"call spec: inputs[{i}] must be a list of arguments, got {type(a).__name__}")
        return CodeSpec("call", tuple(ins), tuple(outs), fn_name=fn, timeout_s=timeout)
    if heval:
        test, ep, prefix = obj.get("test"), obj.get("entry_point"), obj.get("prefix", "")
        if not isinstance(test, str) or not test.strip():
            raise ValueError("HumanEval spec needs a non-empty string 'test'")
        if not isinstance(ep, str) or not ep.isidentifier():
            raise ValueError(f"HumanEval spec: 'entry_point' must be a Python identifier, got {ep!r}")
        if not isinstance(prefix, str):
            raise ValueError("HumanEval spec: 'prefix' must be a string")
        return CodeSpec("assert", tests=(f"{test}\n\ncheck({ep})\n",), setup=prefix, timeout_s=timeout)
    tl, setup, imports = obj.get("test_list"), obj.get("test_setup_code", ""), obj.get("test_imports", [])
    if not isinstance(tl, list) or not tl or not all(isinstance(t, str) and t.strip() for t in tl):
        raise ValueError("MBPP spec needs 'test_list': a non-empty list of non-empty strings")
    if not isinstance(setup, str) or not isinstance(imports, list) or not all(isinstance(x, str) for x in imports):
        raise ValueError("MBPP spec: 'test_setup_code' must be a string and 'test_imports' a list of strings")
    return CodeSpec("assert", tests=tuple(tl), setup="\n".join([*imports, setup]).strip(), timeout_s=timeout)
