"""Stage 1 — generate: K samples per problem, verify each, keep M with correct and wrong as
balanced as possible (paper: K=128, M=6).

Output (sharded, see :mod:`dapo_mcore.data.shards`): one record per problem::

    problem_id, prompt, answer, prompt_ids [int], num_samples, num_correct, rewards [float] (all K),
    solutions: [{sample_index, output_ids [int], text, reward, finish}]   (the kept M)

Run it with ``dapo-mcore generate CONFIG`` (section ``generate``; ``dapo-mcore generate --help`` lists the keys).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dapo_mcore.config import identity, option
from dapo_mcore.data.problems import PROMPT_TEMPLATE_DEFAULT, PromptTemplate, read_problems
from dapo_mcore.data.shards import ShardedWriter, file_sha256
from dapo_mcore.rollout.backend import GenRequest, SamplingParams, seed_from_id
from dapo_mcore.rollout.common import (RolloutConfig, RolloutMeter, finish_stage, make_backend, run_sharded,
                                       stage_counts, whole_throughput)
from dapo_mcore.verify import make_verifier


@dataclass
class GenerateConfig(RolloutConfig):
    """Stage 1 (generate). Paper: K=128, M=6."""

    problems: str = option("", "problem set (JSONL or parquet with id / prompt / answer)", identity=False)
    model_path: str = option("", "HF checkpoint of the generator (tokenizer; the model of the embedded backend)",
                             identity=False)
    num_samples: int = option(8, "K: samples per problem", ge=1)
    keep: int = option(4, "M: samples kept per problem, correct and wrong as balanced as possible", ge=1)
    prompt_template: str = option(PROMPT_TEMPLATE_DEFAULT, "auto (the tokenizer's chat template if it has one, "
                                  "else the problem text) | chat | a format string with {prompt}")
    system_prompt: Optional[str] = option(None, "system message of the 'chat' template")
    shard_size: int = option(64, "problems per output shard (the unit of resume)", ge=1)
    batch_requests: int = option(16, "problems sent to the backend at once", identity=False, ge=1)
    skip_bad_rows: bool = option(False, "skip malformed problem rows (counted) instead of stopping")

    def __post_init__(self):
        super().__post_init__()
        if self.keep > self.num_samples:
            raise ValueError(f"keep (M={self.keep}) must be <= num_samples (K={self.num_samples})")


def select_balanced(rewards: list[float], keep: int) -> list[int]:
    """Indices of ``keep`` samples, half correct (reward > 0.5) and half wrong when possible,
    topped up from the other side otherwise; sample order is kept."""
    good = [i for i, r in enumerate(rewards) if r > 0.5]
    bad = [i for i, r in enumerate(rewards) if r <= 0.5]
    n_good = min(len(good), keep // 2)
    n_bad = min(len(bad), keep - n_good)
    n_good = min(len(good), keep - n_bad)
    return sorted(good[:n_good] + bad[:n_bad])


def run_generate(cfg: GenerateConfig, out_dir: str | Path, backend=None, overwrite: bool = False) -> dict:
    """Run (or resume) the generate stage into ``out_dir``; returns the summary dict."""
    from transformers import AutoTokenizer

    if not cfg.model_path:
        raise ValueError("generate.model_path is required (the generator's HF checkpoint)")
    pset = read_problems(cfg.problems, cfg.skip_bad_rows)      # validated before any compute
    tok = AutoTokenizer.from_pretrained(cfg.model_path)
    tmpl = PromptTemplate(cfg.prompt_template, cfg.system_prompt)
    prompt_ids = {p.id: tmpl.render_ids(p, tok) for p in pset.problems}
    ident = {"config": identity(cfg), "problems_sha256": file_sha256(cfg.problems)}
    writer = ShardedWriter(out_dir, "generate", ident, cfg.fmt, overwrite=overwrite)
    verifier = make_verifier(cfg.verifier, cfg.verify_timeout_s)
    meter = RolloutMeter()

    def process(backend, batch) -> list[dict]:
        reqs = [GenRequest(prompt_ids[p.id], SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            n=cfg.num_samples, sampling_seed=seed_from_id(cfg.seed, p.id)), rid=p.id) for p in batch]
        records = []
        for p, samples in zip(batch, backend.generate(reqs)):
            meter.add(samples)
            rewards = [verifier.verify(s["text"], p.answer) for s in samples]
            kept = select_balanced(rewards, cfg.keep)
            records.append({
                "problem_id": p.id, "prompt": p.prompt, "answer": p.answer,
                "prompt_ids": prompt_ids[p.id], "num_samples": len(samples),
                "num_correct": sum(r > 0.5 for r in rewards), "rewards": rewards,
                "solutions": [{"sample_index": i, "output_ids": samples[i]["output_ids"],
                               "text": samples[i]["text"], "reward": rewards[i],
                               "finish": samples[i]["meta_info"]["finish_reason"]["type"]}
                              for i in kept]})
        return records

    counted = {"throughput": meter, "verifier": verifier.stats}
    n_shards, n_done = run_sharded("generate", pset.problems, writer, shard_size=cfg.shard_size,
                                   batch_size=cfg.batch_requests, backend=backend,
                                   open_backend=lambda: make_backend(cfg.backend, cfg.model_path), process=process,
                                   meter=meter, show_progress=cfg.show_progress, counted=counted)
    totals = stage_counts(writer, counted)
    summary = {"stage": "generate", "problems": len(pset.problems), "bad_rows_skipped": pset.n_skipped,
               "shards": n_shards, "shards_computed": n_done, "counted_shards": totals["counted_shards"],
               "verifier": {**verifier.stats.as_dict(), **totals["verifier"]},
               "throughput": whole_throughput(meter, totals["throughput"])}
    return finish_stage(writer, out_dir, n_shards, summary, cfg.show_progress)
