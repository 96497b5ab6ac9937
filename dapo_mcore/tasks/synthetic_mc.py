"""Synthetic ``mc``-stage output for the chain task, with analytic step values (no generation).

Used by tests and benchmarks of the critic/advantage/actor stages in isolation. A solution may contain
dropped-carry errors; the "MC value" of a prefix is ``p_ok ** remaining_steps`` while every step so far
is correct and ``p_bad`` after the first wrong step, so correctness is learnable from local evidence.
Each non-terminal state gets ``completions_per_state`` completions alternating between one that starts
with the correct next line and one that starts with a wrong one; their first lines are the state's
candidate actions (as in the real ``mc`` stage).
"""
from __future__ import annotations

import random
from pathlib import Path

from dapo_mcore.data.shards import ShardedWriter, chunk
from dapo_mcore.tasks.chain import DELIMITER, make_problems


def _lines(start: int, ops, wrong_at: int | None) -> tuple[list[str], list[bool]]:
    lines, ok, v, bad = [], [], start, False
    for i, o in enumerate(ops):
        new = v + o
        if i == wrong_at:
            new += 10 if new < 90 else -10
            bad = True
        lines.append(f"{v}{'+' if o >= 0 else '-'}{abs(o)}={new}")
        ok.append(not bad)
        v = new
    lines.append(f"answer: {v}")
    ok.append(not bad)
    return lines, ok


def build_synthetic_mc(out_dir: str | Path, tokenizer, n_problems: int = 64, seed: int = 0,
                       p_ok: float = 0.9, p_bad: float = 0.0625, solutions_per_problem: int = 2,
                       completions_per_state: int = 4, shard_size: int = 64) -> Path:
    """Write an ``mc`` stage output (manifest + shards, the real record schema) to ``out_dir``."""
    rng = random.Random(seed)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    records = []
    for p in make_problems(n_problems, seed, prefix="syn"):
        prompt_ids = enc(p.prompt)
        for sol in range(solutions_per_problem):
            wrong_at = rng.randrange(len(p.ops)) if rng.random() < 0.5 else None
            lines, ok = _lines(p.start, p.ops, wrong_at)
            steps = [enc(l + DELIMITER) for l in lines[:-1]] + [enc(lines[-1])]
            for k in range(len(steps) + 1):
                correct_so_far = all(ok[:k])
                terminal = k == len(steps)
                if terminal:
                    value = 1.0 if correct_so_far else 0.0
                else:
                    value = p_ok ** (len(steps) - k) if correct_so_far else p_bad
                good, _ = _lines(p.start, p.ops, None)
                bad, _ = _lines(p.start, p.ops, k if k < len(p.ops) else None)
                actions, comps = [], []
                if not terminal:
                    ends = k == len(p.ops)
                    sep = "" if ends else DELIMITER
                    for i in range(completions_per_state):
                        # completion i starts with the correct next line when i is even, a wrong one otherwise
                        lines = good[k:] if i % 2 == 0 or ends else [bad[k]] + good[k + 1:]
                        reward = float(correct_so_far and (i % 2 == 0 or ends))
                        comps.append({"output_ids": enc(DELIMITER.join(lines)), "reward": reward, "finish": "stop"})
                        actions.append({"ids": enc(lines[0] + sep), "text": lines[0], "ends_solution": ends,
                                        "reward": reward if ends else None})
                records.append({
                    "problem_id": p.id, "state_id": f"{p.id}/s{sol}k{k}", "prompt_ids": prompt_ids,
                    "step_ids": steps[:k], "num_steps": k, "terminal": terminal, "value": float(value),
                    "num_completions": len(comps), "completions": comps, "actions": actions,
                    "sources": [[sol, k]]})
    shards = chunk(records, shard_size)
    w = ShardedWriter(out_dir, "mc", {"synthetic": True, "seed": seed, "n": n_problems}, "parquet", overwrite=True)
    for i, recs in enumerate(shards):
        w.write_shard(i, recs)
    w.finalize(len(shards), {"stage": "mc", "states": len(records), "synthetic": True})
    return Path(out_dir)
