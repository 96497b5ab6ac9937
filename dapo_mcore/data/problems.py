"""Problem sets: read and validate ``id`` / ``prompt`` / ``answer`` rows from JSONL or parquet,
and render prompts to token ids with a plain template or the tokenizer's chat template.

A bad row raises :class:`ProblemSetError` naming the file and line (JSONL: 1-based line number;
parquet: 1-based row number) before any compute is spent, unless ``skip_bad_rows`` is set, in
which case it is skipped and counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dapo_mcore.data.code_spec import parse_code_spec

REQUIRED_FIELDS = ("id", "prompt", "answer")


class ProblemSetError(ValueError):
    """A problem-set row is malformed (message names the file and line)."""


@dataclass(frozen=True)
class Problem:
    """One problem. ``answer`` is the reference answer string given to the verifier (for code
    problems: the JSON text of the test spec, see :mod:`dapo_mcore.data.code_spec`)."""

    id: str
    prompt: str
    answer: str


@dataclass
class ProblemSet:
    """Validated problems in file order plus the bad rows that were skipped."""

    problems: list[Problem]
    path: str
    skipped: list[str] = field(default_factory=list)   # one "file:line: reason" per skipped row

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def _validate(row: Any, where: str, seen: set[str]) -> Problem:
    if not isinstance(row, dict):
        raise ProblemSetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in row or row[k] is None]
    if missing:
        raise ProblemSetError(f"{where}: missing field(s) {', '.join(missing)}")
    pid = row["id"]
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise ProblemSetError(f"{where}: field 'id' must be a string or integer, got {type(pid).__name__}")
    pid = str(pid)
    if not pid.strip():
        raise ProblemSetError(f"{where}: field 'id' is empty")
    if pid in seen:
        raise ProblemSetError(f"{where}: duplicate id {pid!r}")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise ProblemSetError(f"{where}: field 'prompt' must be a non-empty string")
    ans = row["answer"]
    if isinstance(ans, dict):   # code problems: the answer is a test spec (dapo_mcore.data.code_spec)
        try:
            parse_code_spec(ans)
        except ValueError as e:
            raise ProblemSetError(f"{where}: field 'answer' is not a valid code test spec: {e}") from None
        ans = json.dumps(ans, ensure_ascii=False)
    if isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
        raise ProblemSetError(f"{where}: field 'answer' must be a string or number (or a code test spec "
                              f"object), got {type(ans).__name__}")
    ans = str(ans)
    if not ans.strip():
        raise ProblemSetError(f"{where}: field 'answer' is empty")
    seen.add(pid)
    return Problem(id=pid, prompt=row["prompt"], answer=ans)


def _iter_rows(path: Path):
    """Yield ``(where, row_or_exception)`` for every row of a JSONL or parquet file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, ProblemSetError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = [k for k in REQUIRED_FIELDS if k not in table.column_names]
        if missing:
            raise ProblemSetError(f"{path}: parquet file has no column(s) {', '.join(missing)}")
        for i, row in enumerate(table.to_pylist(), start=1):
            yield f"{path}:row {i}", row
    else:
        raise ProblemSetError(f"{path}: unsupported problem-set format {suffix!r} (use .jsonl or .parquet)")


def read_problems(path: str | Path, skip_bad_rows: bool = False) -> ProblemSet:
    """Read and validate a whole problem set. Raises :class:`ProblemSetError` on the first bad row
    unless ``skip_bad_rows`` (then bad rows are listed in ``ProblemSet.skipped``)."""
    path = Path(path)
    if not path.is_file():
        raise ProblemSetError(f"{path}: no such problem-set file")
    problems, skipped, seen = [], [], set()
    for where, row in _iter_rows(path):
        try:
            if isinstance(row, Exception):
                raise row
            problems.append(_validate(row, where, seen))
        except ProblemSetError as e:
            if not skip_bad_rows:
                raise
            skipped.append(str(e))
    if not problems:
        raise ProblemSetError(f"{path}: no valid problems ({len(skipped)} bad rows skipped)")
    return ProblemSet(problems=problems, path=str(path), skipped=skipped)


PROMPT_TEMPLATE_DEFAULT = "auto"


def uses_chat_template(template: str, tokenizer=None) -> bool:
    """Whether ``template`` renders through the tokenizer's chat template: ``"chat"`` always, ``"auto"``
    (the default) when the tokenizer has a ``chat_template``, a format string never."""
    if template == "chat":
        return True
    return template == "auto" and bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class PromptTemplate:
    """How a problem's text becomes the model input.

    ``template``: a format string with ``{prompt}`` (e.g. ``"Question: {prompt}\\nAnswer:\\n"``); the
    literal ``"chat"`` to use the tokenizer's chat template with one user turn and the generation prompt
    appended; or ``"auto"`` (the default): the chat template when the tokenizer has one (a chat model such
    as SmolLM2-Instruct / Qwen-Instruct), else the problem text as it is (``"{prompt}"``; the toy
    tokenizers). ``system``: optional system message for the chat template (without one, the template's
    own default system turn applies, e.g. SmolLM2's).
    """

    template: str = PROMPT_TEMPLATE_DEFAULT
    system: str | None = None

    def __post_init__(self):
        if self.template not in ("chat", "auto") and "{prompt}" not in self.template:
            raise ValueError("PromptTemplate.template must contain '{prompt}' or be 'chat' or 'auto', "
                             f"got {self.template!r}")

    def render_text(self, problem: Problem, tokenizer=None) -> str:
        if self.template == "auto":
            if tokenizer is None:
                raise ValueError("PromptTemplate 'auto' needs the tokenizer (chat template or plain text)")
            if not uses_chat_template("auto", tokenizer):
                return problem.prompt
        if self.template in ("chat", "auto"):
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError("PromptTemplate 'chat' needs a tokenizer with a chat_template")
            msgs = ([{"role": "system", "content": self.system}] if self.system else [])
            msgs.append({"role": "user", "content": problem.prompt})
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self.template.replace("{prompt}", problem.prompt)

    def render_ids(self, problem: Problem, tokenizer) -> list[int]:
        """Prompt token ids (no special tokens added beyond what the template text contains)."""
        ids = tokenizer(self.render_text(problem, tokenizer), add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"problem {problem.id!r}: prompt renders to zero tokens")
        return list(ids)
