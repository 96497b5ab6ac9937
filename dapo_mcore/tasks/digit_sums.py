"""Sums of single-digit numbers, one step per line: the task of the real-model example (examples/smollm2/).

A problem is ``Compute 5 + 6 + 9.``; the solution format the model is shown (two solved examples in the chat
prompt of ``examples/smollm2/smollm2.yaml``, multi-turn ChatML) is::

    5 + 6 = 11
    11 + 9 = 20
    The answer is 20.

one step per line, so the project's step segmentation (``mc.delimiter: "\\n"``) cuts it into states, and the
math verifier reads the last number. SmolLM2-135M-Instruct solves three-term sums *sometimes* (sampled at
temperature 0.7: 20/64 = 31%, Wilson 95% 21-43%; docs/real-model.md), which is the regime DAPO needs.

``python -m dapo_mcore.tasks.digit_sums prepare --out runs/smollm2/setup`` writes::

    setup/problems/{train,heldout}.jsonl   training and held-out problems (disjoint, and distinct from the
                                           prompt's solved examples)
    setup/setup.json                       what was written and the model checkpoint (imported if missing)
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dapo_mcore.config import add_flags, from_flags

# The solved examples shown in the prompt (examples/smollm2/smollm2.yaml); never drawn as problems.
PROMPT_EXAMPLES = ((4, 3, 6), (7, 5, 2))


@dataclass(frozen=True)
class SumProblem:
    """``terms``: the single-digit numbers to add, in order."""

    id: str
    terms: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "Compute " + " + ".join(map(str, self.terms)) + "."

    @property
    def answer(self) -> str:
        return str(sum(self.terms))

    def solution(self) -> str:
        """The step-by-step solution in the prompt's format (no trailing newline)."""
        lines, v = [], self.terms[0]
        for t in self.terms[1:]:
            lines.append(f"{v} + {t} = {v + t}")
            v += t
        return "\n".join(lines + [f"The answer is {v}."])

    def to_record(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "answer": self.answer}


@dataclass
class SumsSetup:
    seed: int = 0
    terms: int = 3
    train_problems: int = 16
    eval_problems: int = 64
    model: str = "smollm2-135m-instruct"


def split_problems(s: SumsSetup) -> tuple[list[SumProblem], list[SumProblem]]:
    """Disjoint training and held-out problems drawn without replacement from all ``9**terms`` term tuples
    (minus the prompt's examples). Raises ValueError when the two sets do not fit."""
    if s.terms < 2:
        raise ValueError(f"terms must be >= 2 (one step per addition), got {s.terms}")
    pool = [t for t in itertools.product(range(1, 10), repeat=s.terms) if t not in PROMPT_EXAMPLES]
    if s.train_problems + s.eval_problems > len(pool):
        raise ValueError(f"train_problems + eval_problems = {s.train_problems + s.eval_problems} > "
                         f"{len(pool)} distinct {s.terms}-term problems")
    random.Random(s.seed).shuffle(pool)
    train = [SumProblem(f"train{i:05d}", t) for i, t in enumerate(pool[:s.train_problems])]
    held = [SumProblem(f"heldout{i:05d}", t)
            for i, t in enumerate(pool[s.train_problems:s.train_problems + s.eval_problems])]
    return train, held


def prepare(out_dir: str | Path, s: SumsSetup, import_missing: bool = True) -> dict:
    """Write the problem files (and import the model checkpoint if missing); returns ``setup.json``'s content."""
    out = Path(out_dir)
    train, held = split_problems(s)
    pdir = out / "problems"
    pdir.mkdir(parents=True, exist_ok=True)
    for name, probs in (("train", train), ("heldout", held)):
        (pdir / f"{name}.jsonl").write_text("".join(json.dumps(p.to_record()) + "\n" for p in probs))
    model = ""
    if import_missing:
        from dapo_mcore.models.importer import import_model

        model = str(import_model(s.model))
    setup = {"setup": asdict(s), "model": model, "train": str(pdir / "train.jsonl"),
             "heldout": str(pdir / "heldout.jsonl")}
    (out / "setup.json").write_text(json.dumps(setup, indent=1))
    return setup


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Single-digit sums for the real-model example: write the problems.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="problems/{train,heldout}.jsonl + setup.json (imports the model if missing)")
    p.add_argument("--out", required=True)
    p.add_argument("--no-import", action="store_true", help="do not import the model checkpoint")
    add_flags(p, SumsSetup)
    a = ap.parse_args(argv)
    s = from_flags(SumsSetup, a)
    setup = prepare(a.out, s, import_missing=not a.no_import)
    print(json.dumps({k: setup[k] for k in ("model", "train", "heldout")}, indent=1))


if __name__ == "__main__":
    main()
