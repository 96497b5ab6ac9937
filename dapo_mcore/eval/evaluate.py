"""Greedy (temperature 0) accuracy of one checkpoint on named problem sets, through the same
generation backends (:func:`~dapo_mcore.rollout.common.make_backend`) and verifiers as the rollout stages.

Outputs in ``out_dir``: ``<set>.jsonl`` (one line per problem: id, reward, finish, text) and
``results.json`` ({set: {n, correct, accuracy, ci_lo, ci_hi, confidence}} + model + seconds).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dapo_mcore.config import Checked, option
from dapo_mcore.data.problems import PROMPT_TEMPLATE_DEFAULT, PromptTemplate, read_problems
from dapo_mcore.data.shards import atomic_write_bytes, atomic_write_json, chunk
from dapo_mcore.eval.stats import wilson_interval
from dapo_mcore.rollout.backend import GenRequest, SamplingParams
from dapo_mcore.rollout.common import BackendConfig, make_backend, progress
from dapo_mcore.verify import VERIFIERS, make_verifier


@dataclass
class EvalConfig(Checked):
    """Stage 6 (eval). Paper: zero-shot greedy, at most 2048 new tokens. The verifier and prompt settings must
    match generation (the pipeline copies them from the generate section)."""

    max_new_tokens: int = option(2048, "new tokens per answer at most (greedy)", ge=1)
    batch_requests: int = option(64, "problems sent to the backend at once", identity=False, ge=1)
    confidence: float = option(0.95, "confidence of the Wilson and paired intervals", gt=0, lt=1)
    limit: int = option(0, "first N problems of each set (0: all)", ge=0)
    verifier: str = option("exact", "answer verifier: exact | math | code", choices=tuple(VERIFIERS))
    verify_timeout_s: float = option(5.0, "verifier time limit per answer", gt=0)
    prompt_template: str = option(PROMPT_TEMPLATE_DEFAULT, "auto (the tokenizer's chat template if it has one, else the problem text) | chat | a format string with {prompt}")
    system_prompt: Optional[str] = option(None, "system message of the 'chat' template")
    show_progress: bool = option(True, "progress bar", identity=False)
    backend: BackendConfig = option(factory=BackendConfig, doc="generation backend")


@dataclass
class SetResult:
    """Accuracy of one model on one problem set; ``rewards`` in problem order (``ids``)."""

    name: str
    ids: list[str]
    rewards: list[float]
    confidence: float

    @property
    def n(self) -> int:
        return len(self.rewards)

    @property
    def correct(self) -> int:
        return sum(r > 0.5 for r in self.rewards)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n, self.confidence)

    def as_dict(self) -> dict:
        lo, hi = self.interval()
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy, "ci_lo": lo, "ci_hi": hi,
                "confidence": self.confidence}


def evaluate_set(cfg: EvalConfig, backend, tokenizer, name: str, problems_path: str | Path,
                 out_jsonl: Optional[Path] = None) -> SetResult:
    """Greedy-decode every problem of one set and verify it; optionally write per-problem lines."""
    problems = read_problems(problems_path).problems
    if cfg.limit:
        problems = problems[:cfg.limit]
    tmpl = PromptTemplate(cfg.prompt_template, cfg.system_prompt)
    verifier = make_verifier(cfg.verifier, cfg.verify_timeout_s)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, n=1, sampling_seed=0)
    rewards, lines = [], []
    bar = progress(len(problems), f"eval {name}", disable=not cfg.show_progress)
    try:
        for batch in chunk(problems, cfg.batch_requests):
            reqs = [GenRequest(tmpl.render_ids(p, tokenizer), params, rid=p.id) for p in batch]
            for p, samples in zip(batch, backend.generate(reqs)):
                s = samples[0]
                r = verifier.verify(s["text"], p.answer)
                rewards.append(r)
                lines.append(json.dumps({"id": p.id, "reward": r, "answer": p.answer,
                                         "finish": s["meta_info"]["finish_reason"]["type"], "text": s["text"]}))
                bar.update(1)
    finally:
        bar.close()
    if out_jsonl is not None:
        atomic_write_bytes(out_jsonl, ("\n".join(lines) + "\n").encode())
    return SetResult(name, [p.id for p in problems], rewards, cfg.confidence)


def evaluate_checkpoint(cfg: EvalConfig, model_path: str | Path, sets: dict[str, str], out_dir: str | Path,
                        backend=None) -> dict[str, SetResult]:
    """Evaluate ``model_path`` on every set; write ``out_dir/<set>.jsonl`` and ``out_dir/results.json``."""
    from transformers import AutoTokenizer

    if not sets:
        raise ValueError("no evaluation problem sets given (data.eval is empty)")
    for name, path in sets.items():   # validate every set before any compute
        if not name or "/" in name:
            raise ValueError(f"evaluation set name {name!r} must be non-empty and contain no '/'")
        read_problems(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(model_path))
    own = backend is None
    if own:
        backend = make_backend(cfg.backend, str(model_path))
    t0 = time.perf_counter()
    try:
        results = {name: evaluate_set(cfg, backend, tok, name, path, out / f"{name}.jsonl")
                   for name, path in sets.items()}
    finally:
        if own:
            backend.close()
    atomic_write_json(out / "results.json", {"model": str(model_path), "seconds": time.perf_counter() - t0,
                                             "sets": {k: v.as_dict() for k, v in results.items()},
                                             "problem_sets": dict(sets)})
    return results


def load_results(out_dir: str | Path) -> dict[str, SetResult]:
    """Read back what :func:`evaluate_checkpoint` wrote (per-problem rewards from the JSONL files)."""
    out = Path(out_dir)
    meta = json.loads((out / "results.json").read_text())
    res = {}
    for name, d in meta["sets"].items():
        rows = [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines() if x.strip()]
        if len(rows) != d["n"]:
            raise ValueError(f"{out / (name + '.jsonl')}: {len(rows)} rows, results.json says {d['n']}")
        res[name] = SetResult(name, [r["id"] for r in rows], [float(r["reward"]) for r in rows], d["confidence"])
    return res
