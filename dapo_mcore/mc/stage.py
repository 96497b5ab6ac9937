"""Stage 2 — mc: Monte Carlo step values. For every deduplicated state of every kept solution,
sample N completions (paper: 16); MC value = mean verified reward; the first step of each
completion is a candidate action of the state (no extra sampling). A terminal state's value is
its solution's verified reward (no completions).

Output (sharded, see :mod:`dapo_mcore.data.shards`): one record per state::

    problem_id, state_id, prompt_ids [int], step_ids [[int]] (exact training tokenisation),
    num_steps, terminal, value (float), num_completions,
    completions: [{output_ids [int], reward, finish}],
    actions: [{ids [int], text, ends_solution, reward (float | None: set iff ends_solution)}],
    sources: [[solution_index, num_steps]]

With ``num_actions`` > 0, every non-terminal state also gets that many **one-step** samples, generated only
up to the step delimiter and never completed: they follow the completions' actions in ``actions`` (action
``i`` was completed iff ``i < num_completions``), have no outcome, and only a critic can score them. Their
tokens are metered apart (``summary["one_step"]``) for the budget accounting.

Completions are verified on ``decode(state steps) + completion text`` (the whole solution).
Run it with ``dapo-mcore mc CONFIG`` (section ``mc``; ``dapo-mcore mc --help`` lists the keys).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dapo_mcore.config import identity, option
from dapo_mcore.data.shards import ShardedWriter, input_identity, iter_records
from dapo_mcore.rollout.backend import GenRequest, SamplingParams, seed_from_id
from dapo_mcore.rollout.common import (RolloutConfig, RolloutMeter, finish_stage, make_backend, run_sharded,
                                       stage_counts, whole_throughput)
from dapo_mcore.rollout.segment import TokenBytes, first_step
from dapo_mcore.rollout.states import State, StateStats, build_states
from dapo_mcore.verify import make_verifier


@dataclass
class MCConfig(RolloutConfig):
    """Stage 2 (mc). Paper: N=16."""

    model_path: str = option("", "HF checkpoint of the completer (pi_ref)", identity=False)
    num_completions: int = option(16, "N: completions per state", ge=1)
    delimiter: str = option("\n", "step delimiter")
    max_context: Optional[int] = option(None, "context length (default: the model's max_position_embeddings)",
                                         ge=1)
    num_actions: int = option(0, "extra one-step candidate actions per state, sampled up to the delimiter and "
                                 "never completed (only a critic can score them)", ge=0)
    action_max_tokens: int = option(64, "token limit of a one-step candidate action", ge=1)
    shard_size: int = option(256, "states per output shard (the unit of resume)", ge=1)
    batch_requests: int = option(32, "states sent to the backend at once", identity=False, ge=1)

    def __post_init__(self):
        super().__post_init__()
        if not self.delimiter:
            raise ValueError("delimiter must be a non-empty string (the text that ends a step)")


def collect_states(in_dir: str | Path, token_bytes: TokenBytes, delimiter: str, max_context: int,
                   stats: StateStats) -> list[tuple[State, str]]:
    """All states (with their problem's answer) of a finished generate output, in a fixed order."""
    out = []
    for rec in iter_records(in_dir):
        sols = [(s["output_ids"], float(s["reward"])) for s in rec["solutions"]]
        for st in build_states(rec["problem_id"], list(rec["prompt_ids"]), sols, token_bytes, delimiter,
                               max_context, stats):
            out.append((st, rec["answer"]))
    return out


def state_record(st: State, value: float, completions: list[dict], actions: list[dict]) -> dict:
    return {"problem_id": st.problem_id, "state_id": st.state_id, "prompt_ids": st.prompt_ids,
            "step_ids": st.step_ids, "num_steps": len(st.step_ids), "terminal": st.terminal,
            "value": float(value), "num_completions": len(completions), "completions": completions,
            "actions": actions, "sources": [list(s) for s in st.sources]}


def run_mc(cfg: MCConfig, in_dir: str | Path, out_dir: str | Path, backend=None, overwrite: bool = False) -> dict:
    """Run (or resume) the mc stage on a finished generate output ``in_dir``; returns the summary."""
    from transformers import AutoConfig, AutoTokenizer

    if not cfg.model_path:
        raise ValueError("mc.model_path is required (the completer's HF checkpoint)")
    tok = AutoTokenizer.from_pretrained(cfg.model_path)
    tb = TokenBytes(tok)
    max_ctx = cfg.max_context or int(getattr(AutoConfig.from_pretrained(cfg.model_path), "max_position_embeddings", 4096))
    sstats = StateStats()
    states = collect_states(in_dir, tb, cfg.delimiter, max_ctx, sstats)
    writer = ShardedWriter(out_dir, "mc", {"config": identity(cfg), "input": input_identity(in_dir)}, cfg.fmt,
                           overwrite=overwrite)
    verifier = make_verifier(cfg.verifier, cfg.verify_timeout_s)
    meter, one_meter = RolloutMeter(), RolloutMeter()
    if cfg.num_actions < 0 or cfg.num_completions < 1:
        raise ValueError(f"mc: need num_completions >= 1 and num_actions >= 0, got {cfg.num_completions}, "
                         f"{cfg.num_actions}")

    def process(backend, batch) -> list[dict]:
        open_ = [(st, ans) for st, ans in batch if not st.terminal]
        reqs = [GenRequest(st.input_ids, SamplingParams(
            max_new_tokens=min(cfg.max_new_tokens, max_ctx - len(st)), temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=cfg.top_k, n=cfg.num_completions,
            sampling_seed=seed_from_id(cfg.seed, st.state_id)), rid=st.state_id) for st, _ in open_]
        results = dict(zip((st.state_id for st, _ in open_), backend.generate(reqs) if reqs else []))
        one_step: dict[str, list] = {}
        if cfg.num_actions and open_:
            oreqs = [GenRequest(st.input_ids, SamplingParams(
                max_new_tokens=min(cfg.action_max_tokens, max_ctx - len(st)), temperature=cfg.temperature,
                top_p=cfg.top_p, top_k=cfg.top_k, n=cfg.num_actions, stop=[cfg.delimiter],
                sampling_seed=seed_from_id(cfg.seed + 7919, st.state_id)), rid=st.state_id + "/1") for st, _ in open_]
            one_step = dict(zip((st.state_id for st, _ in open_), backend.generate(oreqs)))
        records = []
        for st, ans in batch:
            if st.terminal:
                records.append(state_record(st, st.reward, [], []))
                continue
            samples = results[st.state_id]
            meter.add(samples)
            head = tok.decode([t for s in st.step_ids for t in s], skip_special_tokens=True)
            comps, acts = [], []
            for s in samples:
                r = verifier.verify(head + s["text"], ans)
                fin = s["meta_info"]["finish_reason"]["type"]
                comps.append({"output_ids": list(s["output_ids"]), "reward": r, "finish": fin})
                ids, whole = first_step(s["output_ids"], tb, cfg.delimiter)
                ends = whole and fin == "stop"
                acts.append({"ids": ids, "text": tok.decode(ids, skip_special_tokens=True),
                             "ends_solution": ends, "reward": r if ends else None})
            for s in one_step.get(st.state_id, []):
                one_meter.add([s])
                ids, _ = first_step(s["output_ids"], tb, cfg.delimiter)
                fin = s["meta_info"]["finish_reason"]
                ends = fin["type"] == "stop" and fin.get("matched") != cfg.delimiter   # stopped at EOS
                text = tok.decode(ids, skip_special_tokens=True)
                acts.append({"ids": ids, "text": text, "ends_solution": ends,
                             "reward": verifier.verify(head + text, ans) if ends else None})
            records.append(state_record(st, sum(c["reward"] for c in comps) / len(comps), comps, acts))
        return records

    counted = {"throughput": meter, "one_step": one_meter, "verifier": verifier.stats}
    n_shards, n_done = run_sharded("mc", states, writer, shard_size=cfg.shard_size, batch_size=cfg.batch_requests,
                                   backend=backend, open_backend=lambda: make_backend(cfg.backend, cfg.model_path),
                                   process=process, meter=meter, show_progress=cfg.show_progress, counted=counted)
    totals = stage_counts(writer, counted)
    summary = {"stage": "mc", "states": len(states), "terminal_states": sum(st.terminal for st, _ in states),
               "state_stats": asdict(sstats), "shards": n_shards, "shards_computed": n_done,
               "counted_shards": totals["counted_shards"],
               "verifier": {**verifier.stats.as_dict(), **totals["verifier"]},
               "throughput": whole_throughput(meter, totals["throughput"])}
    if cfg.num_actions:
        summary["one_step"] = whole_throughput(one_meter, totals["one_step"])
    return finish_stage(writer, out_dir, n_shards, summary, cfg.show_progress)
