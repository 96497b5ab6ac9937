"""torchrun worker for the prefix-tree critic tests (gloo on CPU).

  MODEL MC OUT   values and one training step's gradients on tree rows (several pieces per row, trees cut
                 into pieces) vs each labelled node's whole path as its own example -> OUT/result.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dapo_mcore.critic.data import CriticExample, pack_examples, read_mc
from dapo_mcore.critic.train import value_forward_step
from dapo_mcore.critic.tree import build_trees, node_weight, pack_pieces, tree_pieces
from dapo_mcore.models.convert import collect_hf_state, load_hf_weights
from dapo_mcore.models.gpt import build_model_chunks
from dapo_mcore.models.hf_config import load_arch, transformer_config
from dapo_mcore.packing import dp_share
from dapo_mcore.parallel.runtime import ParallelConfig, destroy_parallel, initialize_parallel
from dapo_mcore.training.trainer import MegatronTrainer, OptimConfig
from dapo_mcore.training.values import values_by_example


def main() -> None:
    model, mc, out = sys.argv[1:4]
    initialize_parallel(ParallelConfig())
    arch = load_arch(model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    records = [r for r in read_mc(mc) if r["problem_id"] in {f"syn{i:06d}" for i in range(6)}]
    trees = build_trees(records, tok.encode("\n", add_special_tokens=False), tok.eos_token_id)
    budget = 96                                       # small: trees are cut into pieces with context
    pieces = tree_pieces(trees, budget)
    own = [[n for n in p.nodes[p.n_context:] if trees[p.tree].nodes[n].labelled] for p in pieces]
    # the same labels, each node's whole path as its own example
    exs = [CriticExample(trees[p.tree].problem_id, trees[p.tree].path_tokens(n), [len(trees[p.tree].path_tokens(n)) - 1],
                         [trees[p.tree].nodes[n].target]) for p, o in zip(pieces, own) for n in o]
    weights = [node_weight(trees[p.tree].nodes[n], "count") for p, o in zip(pieces, own) for n in o]

    def fresh():
        chunks = build_model_chunks(arch, transformer_config(arch), value_head=True, value_head_seed=3)
        load_hf_weights(chunks, model, arch)
        return chunks

    chunks = fresh()
    tree_mbs = pack_pieces(trees, pieces, budget, 0, rows_per_microbatch=2, weighting="count")
    tv = [v for vs in values_by_example(chunks, tree_mbs, [len(o) for o in own], 0) for v in vs]
    plain_mbs = [pack_examples([e], 256, 0)[0] for e in exs]
    for i, m in enumerate(plain_mbs):
        m["example_index"] = [i]
    pv = [v for vs in values_by_example(chunks, plain_mbs, [1] * len(exs), 0) for v in vs]
    res = {"pieces": len(pieces), "context_pieces": sum(p.n_context > 0 for p in pieces), "labels": len(exs),
           "rows": sum(int(m["input_ids"].shape[0]) for m in tree_mbs),
           "max_abs_diff": max(abs(a - b) for a, b in zip(tv, pv))}
    grads = {}
    for name, mbs in (("tree", tree_mbs), ("plain", plain_mbs)):
        if name == "plain":
            for m, w in zip(mbs, weights):
                m["weights"] = torch.tensor([w], dtype=torch.float32)
        tr = MegatronTrainer(fresh(), OptimConfig(lr=1e-3, adam_eps=1e-3, clip_grad=0.0), total_steps=1)
        r = tr.train_step(dp_share(mbs, 0), value_forward_step)
        res[f"{name}_loss"] = r.loss
        grads[name] = collect_hf_state(tr.chunks, arch, lambda n, p: p.main_grad)
    res["grad_rel_diff"] = max((grads["tree"][k] - grads["plain"][k]).abs().max().item()
                               / max(grads["plain"][k].abs().max().item(), 1e-12) for k in grads["plain"])
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(res))
    destroy_parallel()


if __name__ == "__main__":
    main()
