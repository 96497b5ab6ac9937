"""Stage 1 — generate: K samples per problem, verify each, keep M with correct and wrong as
balanced as possible (paper: K=128, M=6).

Output (sharded, see :mod:`dapo_mcore.data.shards`): one record per problem::

    problem_id, prompt, answer, prompt_ids [int], num_samples, num_correct, rewards [float] (all K),
    solutions: [{sample_index, output_ids [int], text, reward, finish}]   (the kept M)

``python -m dapo_mcore.rollout.generate --help``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dapo_mcore.data.problems import PROMPT_TEMPLATE_DEFAULT, PromptTemplate, read_problems
from dapo_mcore.data.shards import ShardedWriter, file_sha256
from dapo_mcore.rollout.backend import GenRequest, SamplingParams, seed_from_id
from dapo_mcore.rollout.common import BackendConfig, RolloutMeter, finish_stage, make_backend, run_sharded
from dapo_mcore.verify import VERIFIERS, make_verifier


@dataclass
class GenerateConfig:
    problems: str                     # JSONL or parquet with id / prompt / answer
    model_path: str                   # HF checkpoint (tokenizer; and the model for the embedded backend)
    num_samples: int = 8              # K
    keep: int = 4                     # M
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    prompt_template: str = PROMPT_TEMPLATE_DEFAULT  # "auto" | "chat" | a format string with {prompt}
    system_prompt: str | None = None
    verifier: str = "exact"           # "exact" | "math"
    verify_timeout_s: float = 5.0
    seed: int = 0
    shard_size: int = 64              # problems per shard
    batch_requests: int = 16          # problems sent to the backend at once
    skip_bad_rows: bool = False
    fmt: str = "parquet"
    show_progress: bool = True
    backend: BackendConfig = field(default_factory=BackendConfig)

    def identity(self) -> dict:
        d = asdict(self)
        for k in ("batch_requests", "show_progress", "backend"):
            d.pop(k)
        d["backend"] = self.backend.identity()
        return d


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

    pset = read_problems(cfg.problems, cfg.skip_bad_rows)      # validated before any compute
    if cfg.keep > cfg.num_samples:
        raise ValueError(f"keep (M={cfg.keep}) must be <= num_samples (K={cfg.num_samples})")
    tok = AutoTokenizer.from_pretrained(cfg.model_path)
    tmpl = PromptTemplate(cfg.prompt_template, cfg.system_prompt)
    prompt_ids = {p.id: tmpl.render_ids(p, tok) for p in pset.problems}
    ident = {"config": cfg.identity(), "problems_sha256": file_sha256(cfg.problems)}
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

    n_shards, n_done = run_sharded("generate", pset.problems, writer, shard_size=cfg.shard_size,
                                   batch_size=cfg.batch_requests, backend=backend,
                                   open_backend=lambda: make_backend(cfg.backend, cfg.model_path), process=process,
                                   meter=meter, show_progress=cfg.show_progress)
    summary = {"stage": "generate", "problems": len(pset.problems), "bad_rows_skipped": pset.n_skipped,
               "shards": n_shards, "shards_computed": n_done, "verifier": verifier.stats.as_dict(),
               "throughput": meter.summary()}
    return finish_stage(writer, out_dir, n_shards, summary, cfg.show_progress)


def add_backend_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--backend", choices=["embedded", "sglang"], default="embedded")
    ap.add_argument("--url", default="http://127.0.0.1:30000", help="SGLang server or router (sglang backend)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--no-prefix-reuse", action="store_true", help="embedded: recompute every prompt (baseline)")
    ap.add_argument("--max-batch-rows", type=int, default=256)


def backend_from_args(a) -> BackendConfig:
    return BackendConfig(kind=a.backend, url=a.url, concurrency=a.concurrency, prefix_reuse=not a.no_prefix_reuse,
                         max_batch_rows=a.max_batch_rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="DAPO stage 1: sample K solutions per problem, verify, keep M balanced.")
    ap.add_argument("--problems", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("-K", "--num-samples", type=int, default=8)
    ap.add_argument("-M", "--keep", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=-1)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--prompt-template", default=PROMPT_TEMPLATE_DEFAULT,
                    help="'auto' (default: the tokenizer's chat template if it has one, else the problem text), "
                         "'chat', or a format string with {prompt}")
    ap.add_argument("--verifier", choices=sorted(VERIFIERS), default="exact")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--skip-bad-rows", action="store_true")
    ap.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    ap.add_argument("--overwrite", action="store_true")
    add_backend_args(ap)
    a = ap.parse_args(argv)
    cfg = GenerateConfig(problems=a.problems, model_path=a.model, num_samples=a.num_samples, keep=a.keep,
                         temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, max_new_tokens=a.max_new_tokens,
                         prompt_template=a.prompt_template, verifier=a.verifier, seed=a.seed, shard_size=a.shard_size,
                         skip_bad_rows=a.skip_bad_rows, fmt=a.format, backend=backend_from_args(a))
    print(json.dumps(run_generate(cfg, a.out, overwrite=a.overwrite), indent=1))


if __name__ == "__main__":
    main()
