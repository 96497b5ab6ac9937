"""The CPU demo: a synthetic multi-step task, a locally trained tokenizer and a reference policy that has
plateaued on a systematic error, ready for ``dapo-mcore run``.

Design (../shared/notes/dapo-toy-findings.md): the chain task (each line checkable from itself and the
line before), a reference SFT-trained to convergence on data whose '+' steps that need a carry drop it
``carry_error_rate`` of the time (later lines stay consistent), so greedy decoding reproduces the error
and more SFT on the same data does not fix it. The reference is trained with the project's megatron SFT
stage (fused log-probs, packed rows).

``python -m dapo_mcore.tasks.demo prepare --out runs/demo/setup`` writes::

    setup/problems/{train,heldout}.jsonl   DAPO training problems and held-out problems (disjoint)
    setup/reference/hf                     the reference policy (HF checkpoint + tokenizer)
    setup/setup.json                       what was built (re-running with the same settings skips)

``python -m dapo_mcore.tasks.demo table runs/demo/seed0 runs/demo/seed1 ...`` prints the before/after table
over seeds from the runs' evaluation outputs.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dapo_mcore.config import add_flags, from_flags
from dapo_mcore.eval.evaluate import load_results
from dapo_mcore.sft.train import SFTConfig, SFTExample, run_sft_examples
from dapo_mcore.tasks.chain import make_problems
from dapo_mcore.tasks.tiny import TinyModelConfig, build_tiny_checkpoint


@dataclass
class DemoSetup:
    seed: int = 0
    sft_problems: int = 20000
    carry_error_rate: float = 0.6
    min_ops: int = 3
    max_ops: int = 5
    train_problems: int = 800
    eval_problems: int = 1000
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    tokenizer_vocab: int = 400
    sft_epochs: int = 8
    sft_batch: int = 64
    sft_lr: float = 1e-3
    token_budget: int = 128
    rows_per_microbatch: int = 8

    def sft_solution(self, p, rng: random.Random) -> str:
        """The reference's SFT target for problem ``p`` (the data's error model)."""
        return p.solution(self.carry_error_rate, rng)

    def problem_sets(self) -> dict[str, list]:
        """``{"sft", "train", "heldout", ...}`` problem lists; every set after ``train`` is disjoint from the
        SFT and training problems (and from the sets before it)."""
        ops = (self.min_ops, self.max_ops)
        sets = {"sft": make_problems(self.sft_problems, self.seed * 7 + 1, ops, prefix="sft"),
                "train": make_problems(self.train_problems, self.seed * 7 + 2, ops, prefix="train")}
        seen = {_key(p) for p in sets["sft"]} | {_key(p) for p in sets["train"]}
        held = [p for p in make_problems(self.eval_problems * 2, self.seed * 7 + 3, ops, prefix="heldout")
                if _key(p) not in seen]
        sets["heldout"] = held[:self.eval_problems]   # held-out never seen in training
        return sets


def _key(p) -> tuple:
    return (p.start, p.ops)


def prepare(out_dir: str | Path, s: DemoSetup, show_progress: bool = True) -> dict:
    """Build (or reuse) the demo's problems and reference policy; returns ``setup.json``'s content."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    marker = out / "setup.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("setup") == asdict(s):
            return done
    t0 = time.time()
    sets = s.problem_sets()
    sft = sets.pop("sft")
    pdir = out / "problems"
    pdir.mkdir(parents=True, exist_ok=True)
    for name, probs in sets.items():
        (pdir / f"{name}.jsonl").write_text("".join(json.dumps(p.to_record()) + "\n" for p in probs))

    rng = random.Random(s.seed)
    texts = [p.prompt + s.sft_solution(p, rng) for p in sft]
    init = build_tiny_checkpoint(out / "init", texts[:5000],
                                 TinyModelConfig(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                                                 num_layers=s.num_layers, num_heads=s.num_heads,
                                                 num_kv_heads=s.num_heads, max_position_embeddings=256),
                                 seed=s.seed, tokenizer_vocab=s.tokenizer_vocab)
    tok = AutoTokenizer.from_pretrained(str(init))
    examples = []
    for p, text in zip(sft, texts):
        examples.append(SFTExample(tok.encode(p.prompt, add_special_tokens=False),
                                   tok.encode(text[len(p.prompt):], add_special_tokens=False) + [tok.eos_token_id]))
    summary = run_sft_examples(
        SFTConfig(init_path=str(init), lr=s.sft_lr, min_lr=s.sft_lr * 0.05, decay_style="cosine", warmup_steps=20,
                  epochs=s.sft_epochs, global_batch=s.sft_batch, token_budget=s.token_budget,
                  rows_per_microbatch=s.rows_per_microbatch, seed=s.seed, show_progress=show_progress,
                  tensorboard=False),
        examples, out / "reference")
    setup = {"setup": asdict(s), "reference": str(out / "reference" / "hf"),
             **{name: str(pdir / f"{name}.jsonl") for name in sets},
             "sft": {k: summary.get(k) for k in ("steps", "last", "seconds")}, "seconds": time.time() - t0}
    marker.write_text(json.dumps(setup, indent=1))
    return setup


def _accuracy(run_dir: Path) -> dict[str, dict]:
    """``{model label: {"acc", "lo", "hi", "n"}}`` from the newest iteration's eval output of a run."""
    evals = sorted(run_dir.glob("iter_*/eval"))
    if not evals:
        raise FileNotFoundError(f"{run_dir}: no iter_*/eval output (did the run finish?)")
    out = {}
    for label_dir in sorted(p for p in evals[-1].iterdir() if p.is_dir()):
        for name, r in load_results(label_dir).items():
            lo, hi = r.interval()
            out[label_dir.name] = {"acc": r.accuracy, "n": len(r.rewards), "lo": lo, "hi": hi}
    return out


def table(run_dirs: list[str | Path]) -> str:
    """Markdown table over seeds: held-out greedy accuracy per model, mean and spread (max - min)."""
    rows = {str(d): _accuracy(Path(d)) for d in run_dirs}
    labels = sorted({k for r in rows.values() for k in r})
    head = "| model | " + " | ".join(Path(d).name for d in rows) + " | mean | spread (max-min) |"
    lines = [head, "|" + "---|" * (len(rows) + 3)]
    stats = {}
    for lab in labels:
        accs = [rows[d][lab]["acc"] for d in rows if lab in rows[d]]
        mean = sum(accs) / len(accs)
        stats[lab] = (mean, max(accs) - min(accs))
        cells = [f"{rows[d][lab]['acc']:.1%}" if lab in rows[d] else "-" for d in rows]
        lines.append(f"| {lab} | " + " | ".join(cells) + f" | {mean:.1%} | {max(accs) - min(accs):.1%} |")
    return "\n".join(lines) + "\n", stats


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="dapo-mcore CPU demo: build the task and reference, or print results.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="problems + tokenizer + reference policy (megatron SFT)")
    p.add_argument("--out", required=True)
    add_flags(p, DemoSetup)
    t = sub.add_parser("table", help="before/after table over the runs (seeds) given")
    t.add_argument("runs", nargs="+")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        s = from_flags(DemoSetup, a)
        setup = prepare(a.out, s)
        print(json.dumps({k: setup[k] for k in ("reference", "train", "heldout")}, indent=1))
    else:
        text, _ = table(a.runs)
        print(text)


if __name__ == "__main__":
    main()
