#!/usr/bin/env python
"""Sampled accuracy of a real model on candidate tasks, with the project's embedded engine.

For picking the task of a real-model DAPO run: a task is useful when the reference policy solves it
*sometimes* (sampled accuracy roughly 10%-60%). Prompts are built with the model's chat template (the
``"auto"`` prompt rule) from reasoning-gym generators (``rg:<name>``) or the project's chain task written
out in words (``chain``); completions are checked with the project's math verifier (reasoning-gym's own
scorer for ``rg:countdown``). Defaults: the imported SmolLM2-135M-Instruct, 24 problems x 4 samples per
task, temperature 1.0, 160 new tokens.

    .venv/bin/python scripts/probe_task_accuracy.py [--tasks rg:basic_arithmetic chain ...]

Ends with ``RESULT`` lines per task: sampled accuracy (%) with its Wilson 95% interval, and the
generation time per sample (s; the machine may be shared: see the report) and mean completion tokens.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from dapo_mcore.data.problems import Problem, PromptTemplate
from dapo_mcore.eval.stats import wilson_interval
from dapo_mcore.rollout.backend import GenRequest, SamplingParams
from dapo_mcore.tasks.chain import make_problems
from dapo_mcore.tasks.digit_sums import SumsSetup, split_problems
from dapo_mcore.verify.math import MathVerifier

INSTRUCTION = "\nSolve it step by step, one step per line, and end with: The answer is <number>."
DEFAULT_TASKS = ("rg:basic_arithmetic", "rg:chain_sum", "rg:leg_counting", "rg:simple_equations",
                 "rg:gsm_symbolic", "rg:countdown", "chain")


def chain_in_words(n: int, seed: int) -> list[tuple[Problem, object]]:
    """The chain task (start value + small +/- operations) as a question in words."""
    out = []
    for p in make_problems(n, seed):
        q = f"Compute {p.start} " + " ".join(f"{'+' if o >= 0 else '-'} {abs(o)}" for o in p.ops) + "."
        out.append((Problem(p.id, q, p.answer), None))
    return out


def sums_problems(n: int, seed: int) -> list[tuple[Problem, object]]:
    """The real-model example's task: training problems as ``digit_sums prepare`` draws them."""
    train, _ = split_problems(SumsSetup(seed=seed, train_problems=n, eval_problems=0))
    return [(Problem(p.id, p.prompt, p.answer), None) for p in train]


def example_template() -> PromptTemplate:
    """The few-shot ChatML prompt of examples/smollm2/smollm2.yaml (``generate.prompt_template``)."""
    import yaml

    cfg = Path(__file__).resolve().parents[1] / "examples" / "smollm2" / "smollm2.yaml"
    return PromptTemplate(yaml.safe_load(cfg.read_text())["generate"]["prompt_template"])


def rg_problems(name: str, n: int, seed: int) -> list[tuple[Problem, object]]:
    import reasoning_gym as rg

    ds = rg.create_dataset(name, size=n, seed=seed)
    return [(Problem(f"{name}/{i}", e["question"], str(e["answer"])), (ds, e)) for i, e in enumerate(ds)]


def score(task: str, text: str, problem: Problem, extra, verifier: MathVerifier) -> float:
    if task == "rg:countdown":
        ds, entry = extra
        lines = [ln.strip() for ln in text.strip().splitlines() if any(c.isdigit() for c in ln)]
        cand = lines[-1].split("=")[0].replace("The answer is", "").strip(" .") if lines else ""
        return float(ds.score_answer(cand, entry) == 1.0)
    return verifier.verify(text, problem.answer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF checkpoint (default: the imported smollm2-135m-instruct)")
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="rg:<reasoning-gym name>, chain or sums")
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--show", type=int, default=1, help="print this many completions per task")
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from dapo_mcore.rollout.embedded import EmbeddedEngine, EngineConfig

    model = a.model
    if model is None:
        from dapo_mcore.models.importer import import_model

        model = str(import_model("smollm2-135m-instruct"))
    tok = AutoTokenizer.from_pretrained(model)
    engine = EmbeddedEngine(EngineConfig(model_path=model), tokenizer=tok)
    tmpl = PromptTemplate()   # "auto": the chat template when the tokenizer has one
    verifier = MathVerifier()
    results = []
    for task in a.tasks:
        if task == "sums":
            probs, t_tmpl, instruction = sums_problems(a.problems, a.seed), example_template(), ""
        else:
            probs = chain_in_words(a.problems, a.seed) if task == "chain" else rg_problems(task[3:], a.problems, a.seed)
            t_tmpl, instruction = tmpl, INSTRUCTION
        reqs = [GenRequest(t_tmpl.render_ids(Problem(p.id, p.prompt + instruction, p.answer), tok),
                           SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, n=a.samples,
                                          sampling_seed=a.seed * 1000 + i), rid=p.id)
                for i, (p, _) in enumerate(probs)]
        t0 = time.perf_counter()
        outs = engine.generate(reqs)
        dt = time.perf_counter() - t0
        correct, n, toks = 0.0, 0, 0
        shown = 0
        for (p, extra), samples in zip(probs, outs):
            for s in samples:
                r = score(task, s["text"], p, extra, verifier)
                correct += r
                n += 1
                toks += s["meta_info"]["completion_tokens"]
                if shown < a.show:
                    print(f"--- {task} | {p.prompt[:120]!r} | gold {p.answer} | reward {r}\n{s['text']}", flush=True)
                    shown += 1
        lo, hi = wilson_interval(int(correct), n)
        results.append((task, 100 * correct / n, 100 * lo, 100 * hi, dt / n, toks / n))
        print(f"{task}: {int(correct)}/{n} correct ({100 * correct / n:.1f}%), {dt:.0f} s, {toks / n:.0f} tokens/sample",
              file=sys.stderr, flush=True)
    for task, acc, lo, hi, sps, tps in results:
        name = task.replace("rg:", "").replace(":", "_")
        print(f"RESULT sampled_accuracy_{name} {acc:.1f} % (wilson95 {lo:.1f}-{hi:.1f})")
        print(f"RESULT seconds_per_sample_{name} {sps:.2f} s ({tps:.0f} completion tokens/sample)")
    return 0


if __name__ == "__main__":
    random.seed(0)
    sys.exit(main())
