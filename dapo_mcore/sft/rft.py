"""The rejection-sampling fine-tuning (RFT) control: the reference samples every training problem with DAPO's
whole generation budget (``rft-generate``: the generate stage with K = that budget per problem), then is
fine-tuned on its own distinct verified-correct samples (``rft``: SFT, section ``rft``). It is what DAPO must
beat on the same data and compute (``run.controls: [rft]``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from dapo_mcore.data.shards import iter_records
from dapo_mcore.parallel.runtime import initialize_parallel
from dapo_mcore.sft.train import SFTConfig, SFTExample, run_sft_examples
from dapo_mcore.training.loop import save_summary


BUDGETS = ("samples", "tokens")


def samples_per_problem(gen_dir: str | Path, mc_dir: str | Path, budget: str = "samples") -> int:
    """K of ``rft-generate``: DAPO's generate + mc budget (one-step candidate actions included) spread over the
    training problems. ``budget="samples"``: every sample counts one; ``"tokens"``: the generated tokens
    divided by the mean length of a generate-stage sample (as many whole solutions as the same generated
    tokens buy)."""
    if budget not in BUDGETS:
        raise ValueError(f"run.budget must be one of {BUDGETS}, got {budget!r}")
    gen = json.loads((Path(gen_dir) / "summary.json").read_text())
    mc = json.loads((Path(mc_dir) / "summary.json").read_text())
    metered = [gen["throughput"], mc["throughput"]] + ([mc["one_step"]] if mc.get("one_step") else [])
    if budget == "samples":
        total = float(sum(m["samples"] for m in metered))
    else:
        per_sample = gen["throughput"]["completion_tokens"] / max(1, gen["throughput"]["samples"])
        total = sum(m["completion_tokens"] for m in metered) / max(per_sample, 1e-9)
    return max(1, round(total / max(gen["problems"], 1)))


def rft_examples(gen_dir: str | Path, min_reward: float = 1.0) -> tuple[list[SFTExample], dict]:
    """Rejection-sampling fine-tuning data: the verified-correct samples of a ``generate`` output, one
    example per distinct (problem, solution) pair (the sample's ``output_ids`` end with EOS)."""
    exs, seen, n_samples, n_correct = [], set(), 0, 0
    for rec in iter_records(gen_dir):
        for s in rec["solutions"]:
            n_samples += 1
            if float(s["reward"]) < min_reward:
                continue
            n_correct += 1
            key = (rec["problem_id"], tuple(s["output_ids"]))
            if key in seen:
                continue
            seen.add(key)
            exs.append(SFTExample(list(rec["prompt_ids"]), list(s["output_ids"])))
    return exs, {"samples": n_samples, "correct": n_correct, "distinct_correct": len(exs)}


def run_rft(cfg: SFTConfig, gen_dir: str | Path, out_dir: str | Path) -> dict:
    """The rejection-sampling fine-tuning control: SFT of ``cfg.init_path`` on its own verified-correct
    samples from ``gen_dir`` (a ``generate`` output); returns the SFT summary plus the data counts."""
    exs, counts = rft_examples(gen_dir)
    if not exs:
        # fine-tuning on nothing leaves the reference unchanged: export it as the control's policy
        initialize_parallel(cfg.parallel)
        summary = {"stage": "rft", "rft": counts, "trained": False,
                   "note": "no verified-correct samples: the RFT policy is the reference"}
        out = Path(out_dir)
        if dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(out / "hf", ignore_errors=True)
            shutil.copytree(cfg.init_path, out / "hf")
        save_summary(out, summary)
        return summary
    summary = run_sft_examples(cfg, exs, out_dir)
    summary["rft"] = counts
    summary["trained"] = True
    if not summary.get("partial"):
        save_summary(Path(out_dir), summary)
    return summary
