"""Prefix-tree critic data: trie merging of an mc output's rollouts, piece cutting, tree-mask rows equal to
each node's path run alone (values and gradients), action-ranking metrics, the chain step checker."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dapo_mcore.critic.tree import build_trees, node_weight, pack_pieces, prune, split_completion, tree_pieces
from dapo_mcore.verify.steps import action_ranking
from dapo_mcore.verify.steps import check_chain_step as check_step


def _rec(pid, steps, k, value, terminal=False, comps=()):
    return {"problem_id": pid, "state_id": f"{pid}/{k}", "prompt_ids": [1, 2], "step_ids": steps[:k],
            "num_steps": k, "terminal": terminal, "value": value, "num_completions": len(comps),
            "completions": [{"output_ids": c, "reward": r, "finish": "stop"} for c, r in comps],
            "actions": [], "sources": [[0, k]]}


def test_split_completion_cuts_after_delimiters_and_drops_eos():
    assert split_completion([5, 9, 6, 7, 9, 8, 0], {9}, 0) == [[5, 9], [6, 7, 9], [8]]
    assert split_completion([5, 9], {9}, 0) == [[5, 9]]
    assert split_completion([0], {9}, 0) == []


def test_trie_merges_rollouts_and_labels_each_prefix_with_its_mean_outcome():
    steps = [[10, 9], [11, 9], [12]]                         # a 3-step solution, its states and terminal
    recs = [_rec("p", steps, 0, 0.5, comps=[([10, 9, 11, 9, 12, 0], 1.0), ([10, 9, 13, 9, 14, 0], 0.0)]),
            _rec("p", steps, 1, 0.5, comps=[([11, 9, 12, 0], 1.0), ([13, 9, 14, 0], 0.0)]),
            _rec("p", steps, 2, 1.0, comps=[([12, 0], 1.0), ([12, 0], 1.0)]),
            _rec("p", steps, 3, 1.0, terminal=True)]
    (t,) = build_trees(recs, [9], 0)
    node = lambda path: (lambda n: [n := t.nodes[n].children[tuple(s)] for s in path][-1])(0)  # noqa: E731
    root = t.nodes[0]
    assert root.tokens == [1, 2] and root.count == 2 and root.target == 0.5
    a = t.nodes[node([[10, 9]])]                 # s_1: its own 2 completions + both of s_0's pass through
    assert a.count == 4 and a.target == 0.5
    b = t.nodes[node([[10, 9], [11, 9]])]        # s_2: own 2 + s_1's first + s_0's first
    assert b.count == 4 and b.target == 1.0
    assert t.nodes[node([[10, 9], [13, 9]])].count == 2 and t.nodes[node([[10, 9], [13, 9]])].target == 0.0
    leaf = t.nodes[node([[10, 9], [11, 9], [12]])]
    assert leaf.exact == 1.0 and leaf.target == 1.0 and leaf.count == 4   # 2 of s_2 + s_1 + s_0 (+ exact)
    assert len(t.nodes) == 6 and t.num_tokens() == 2 + 2 + 2 + 1 + 2 + 1
    # without completions only the MC states are labelled, with their MC values
    (t2,) = build_trees(recs, [9], 0, use_completions=False)
    assert [n.target for n in t2.nodes if n.labelled] == [0.5, 0.5, 1.0, 1.0]
    assert node_weight(a, "count") == 4 and node_weight(a, "sqrt") == 2 and node_weight(a, "one") == 1
    with pytest.raises(ValueError, match="weighting"):
        node_weight(a, "bogus")


def test_prune_drops_single_rollout_tails_but_keeps_exact_labels_and_paths():
    steps = [[10, 9], [11, 9], [12]]
    recs = [_rec("p", steps, 0, 0.5, comps=[([10, 9, 11, 9, 12, 0], 1.0), ([10, 9, 13, 9, 14, 0], 0.0),
                                            ([15, 9, 16, 0], 0.0)]),
            _rec("p", steps, 3, 1.0, terminal=True)]
    (t,) = build_trees(recs, [9], 0)
    p = prune(t, 2)
    kept = {tuple(p.path_tokens(i)): n.count for i, n in enumerate(p.nodes)}
    # root (3 rollouts), [10,9] (2); [10,9,11,9] (1) stays: on the path to the exact terminal label
    assert kept == {(1, 2): 3, (1, 2, 10, 9): 2, (1, 2, 10, 9, 11, 9): 1, (1, 2, 10, 9, 11, 9, 12): 1}
    assert p.nodes[[tuple(p.path_tokens(i)) for i in range(len(p.nodes))].index((1, 2, 10, 9, 11, 9, 12))].exact == 1.0
    for i, n in enumerate(p.nodes):            # parents and children stay consistent
        for c in n.children.values():
            assert p.nodes[c].parent == i
    assert prune(t, 1) is t


def test_pieces_cover_every_node_once_with_ancestor_context_and_mask_follows_the_tree():
    steps = [[10, 9], [11, 9], [12]]
    comps = [([20 + i, 9, 30 + i, 9, 40 + i, 0], float(i % 2)) for i in range(6)]
    recs = [_rec("p", steps, 0, 0.5, comps=comps), _rec("p", steps, 1, 0.5, comps=comps),
            _rec("q", steps, 0, 0.0, comps=comps[:2])]
    trees = build_trees(recs, [9], 0)
    pieces = tree_pieces(trees, 12)
    own = [(p.tree, n) for p in pieces for n in p.nodes[p.n_context:]]
    assert sorted(own) == sorted((ti, n) for ti, t in enumerate(trees) for n in range(len(t.nodes)))
    assert any(p.n_context for p in pieces) and all(p.tokens <= 12 for p in pieces)
    for p in pieces:                             # a piece is closed under ancestors, parents first
        seen = set()
        for n in p.nodes:
            par = trees[p.tree].nodes[n].parent
            assert par == -1 or par in seen
            seen.add(n)
    mbs = pack_pieces(trees, pieces, 12, pad_id=0, rows_per_microbatch=2)
    assert sum(len(m["targets"]) for m in mbs) == sum(n.labelled for t in trees for n in t.nodes)
    w = torch.cat([m["weights"] for m in mbs])
    assert w.min() >= 1
    # in the first row: a node's token sees exactly its ancestors' tokens and its own earlier tokens
    m = mbs[0]
    mask = ~m["attention_mask"][0, 0]
    pos = m["position_ids"][0]
    for i in range(int(m["lengths"][0])):
        assert int(mask[i].sum()) == int(pos[i]) + 1   # depth + 1 visible tokens (no sibling, no other tree)


def test_action_ranking_counts_pairs_by_position():
    states = [(0, [(0.6, 1.0, True), (0.2, 0.0, False), (0.4, 0.0, False)]),
              (3, [(0.1, 0.5, True), (0.3, 0.0, False)]),
              (3, [(0.5, 0.5, None), (0.5, 0.5, None)])]
    r = action_ranking(states)
    assert r["mc_pairs"] == 3 and r["correct_pairs"] == 3
    assert math.isclose(r["vs_mc"], 2 / 3) and math.isclose(r["vs_correct"], 2 / 3)
    assert r["by_position"][0]["vs_correct"] == 1.0 and r["by_position"][3]["vs_correct"] == 0.0


def test_chain_check_step_uses_the_value_the_previous_line_wrote():
    s = "47:+8-3\n47+8=55\n"
    assert check_step(s, "55-3=52") and not check_step(s, "55-3=53")
    assert check_step("47:+8-3\n", "47+8=55") and not check_step("47:+8-3\n", "47+8=45")
    assert check_step(s + "55-3=52\n", "answer: 52") and not check_step(s + "55-3=52\n", "52-1=51")
    assert check_step("47:+8-3\n47+8=45\n", "45-3=42")           # right from the (wrong) value written
    assert check_step("not a chain", "x") is None


@pytest.mark.dist
def test_tree_rows_equal_each_path_alone(tiny_qwen2, synthetic_mc, torchrun, tmp_path):
    """Values at every labelled node and one weighted training step's loss and gradients: tree rows (trees cut
    into pieces with context, two rows per micro-batch) == every node's whole path as its own example."""
    out = tmp_path / "r.json"
    torchrun("critic_tree_worker.py", 1, tiny_qwen2, synthetic_mc, out)
    r = json.loads(out.read_text())
    assert r["context_pieces"] > 0 and r["labels"] > r["pieces"]
    assert r["max_abs_diff"] <= 1e-5
    assert abs(r["tree_loss"] - r["plain_loss"]) <= 1e-5 * abs(r["plain_loss"])
    assert r["grad_rel_diff"] <= 1e-4
