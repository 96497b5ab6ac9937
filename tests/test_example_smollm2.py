"""The real-model example (examples/smollm2/): its config parses with the pipeline's fills, its problems
prepare (disjoint, correct answers, never the prompt's solved examples), and the prompt's solved examples are
the task's own solution format. The ``real_model`` test runs the whole pipeline at a tiny size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dapo_mcore.data.problems import Problem, PromptTemplate, read_problems
from dapo_mcore.run.schema import load_run_config
from dapo_mcore.tasks.digit_sums import PROMPT_EXAMPLES, SumProblem, SumsSetup, prepare, split_problems

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "smollm2" / "smollm2.yaml"


def _fills(setup: dict, out: Path, policy: str) -> list[str]:
    return [f"run.out_dir={out}", f"model.policy={policy}", f"data.train={setup['train']}",
            f"data.eval.heldout={setup['heldout']}"]


def test_prepare_writes_disjoint_correct_problems(tmp_path):
    s = SumsSetup(train_problems=40, eval_problems=60, seed=3)
    setup = prepare(tmp_path, s, import_missing=False)
    train, held = read_problems(setup["train"]).problems, read_problems(setup["heldout"]).problems
    assert (len(train), len(held)) == (40, 60)
    prompts = [p.prompt for p in train + held]
    assert len(set(prompts)) == 100                                  # disjoint, no duplicates
    shown = {SumProblem("x", t).prompt for t in PROMPT_EXAMPLES}
    assert not shown & set(prompts)                                  # never a prompt's solved example
    for p in train + held:
        terms = [int(x) for x in p.prompt.removeprefix("Compute ").removesuffix(".").split(" + ")]
        assert len(terms) == 3 and all(1 <= t <= 9 for t in terms) and int(p.answer) == sum(terms)
    assert json.loads((tmp_path / "setup.json").read_text())["setup"]["seed"] == 3
    assert prepare(tmp_path / "again", s, import_missing=False)["setup"] == setup["setup"]
    assert (tmp_path / "again" / "problems" / "train.jsonl").read_text() == Path(setup["train"]).read_text()


def test_split_refuses_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match="distinct 3-term"):
        split_problems(SumsSetup(train_problems=700, eval_problems=100))
    with pytest.raises(ValueError, match="terms must be"):
        split_problems(SumsSetup(terms=1))


def test_config_parses_and_prompt_shows_the_task_format(tmp_path):
    setup = prepare(tmp_path, SumsSetup(train_problems=4, eval_problems=4), import_missing=False)
    cfg = load_run_config(CONFIG, _fills(setup, tmp_path / "run", str(tmp_path / "model")))
    assert cfg.run.controls == ["outcome", "rft"] and cfg.generate.verifier == "math"
    assert cfg.mc.delimiter == "\n"
    tmpl = PromptTemplate(cfg.generate.prompt_template)
    text = tmpl.render_text(Problem("p", "Compute 1 + 2 + 3.", "6"))
    for t in PROMPT_EXAMPLES:                   # each solved example: the task's prompt, then its solution
        ex = SumProblem("x", t)
        assert f"user\n{ex.prompt}<|im_end|>\n<|im_start|>assistant\n{ex.solution()}<|im_end|>" in text
    assert text.endswith("<|im_start|>user\nCompute 1 + 2 + 3.<|im_end|>\n<|im_start|>assistant\n")
    raw = yaml.safe_load(CONFIG.read_text())
    assert "model" not in raw and "data" not in raw   # filled by run.sh from the prepared setup


def test_solution_format():
    assert SumProblem("a", (5, 6, 9)).solution() == "5 + 6 = 11\n11 + 9 = 20\nThe answer is 20."


@pytest.mark.real_model
@pytest.mark.slow
def test_pipeline_runs_on_the_real_model_at_a_tiny_size(tmp_path, smollm2):
    """generate -> mc -> critic -> advantage -> actor -> eval with both controls, 4 problems, on SmolLM2 (the gap
    filter off so that a state is kept at this size; ~20 min on 2 loaded cores)."""
    setup = prepare(tmp_path / "setup", SumsSetup(train_problems=4, eval_problems=8), import_missing=False)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dapo_mcore.cli", "run", str(CONFIG), *_fills(setup, out, str(smollm2)),
           "generate.num_samples=2", "mc.num_completions=4", "advantage.gap_threshold=0.0", "critic.epochs=1",
           "actor.epochs=1", "rft.epochs=1",
           "generate.show_progress=false", "mc.show_progress=false", "eval.show_progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    comparison = json.loads(next((out / "iter_0" / "eval").glob("comparison.json")).read_text())
    assert comparison
    labels = {p.name for p in (out / "iter_0" / "eval").iterdir() if p.is_dir()}
    assert {"dapo", "outcome-only", "rft"} <= labels
    assert (out / "report.md").is_file()
