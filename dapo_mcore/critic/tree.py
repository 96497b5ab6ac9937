"""Critic data as one prefix tree per problem: every distinct step-prefix once, labelled with the mean outcome
of **all** the rollouts that pass through it, packed with a tree attention mask.

The ``mc`` stage's completions of one problem overlap heavily: the N completions of a state share the state,
the states of a solution are nested, and a low-entropy policy repeats whole continuations. As separate
examples (:func:`dapo_mcore.critic.data.completion_examples`) the same prefix is re-encoded and re-labelled
many times, each time with one completion's 0/1 outcome. Here a problem's prompt, the steps of its
solutions' states and the steps of its completions are merged into a trie at step granularity:

- a node is one step (the root: the prompt) and stands for the state "prompt + the steps on its path";
- a completion started at state ``s`` adds its verified reward to ``s`` and to every node on its own path
  (below ``s`` the rollout is a sample of pi_ref from that node; above ``s`` it is not — the path to ``s``
  was the generator's — so it adds nothing there);
- a terminal state of a solution (a whole solution) carries its verified reward as an exact label;
- the target of a node is ``reward_sum / count`` (an MC estimate from ``count`` rollouts: for a solution's
  state at least its own N completions, often more) and its weight ``count`` (``"count"``, the total of
  the per-completion loss it replaces), ``sqrt(count)`` or 1 (``"one"``: every distinct prefix alike).

Rows: a tree is laid out depth first; a token attends to the tokens of its own node (causally) and of its
node's ancestors, nothing else, and its position is its depth in tokens. A tree larger than the token
budget is cut into pieces; a piece repeats its first node's ancestors as unlabelled context. The value of
a node is read at its last token (the step delimiter), like a solution example's labels.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from dapo_mcore.packing import first_fit_decreasing

WEIGHTINGS = ("count", "sqrt", "one")


@dataclass
class Node:
    tokens: list[int]
    parent: int                     # index of the parent node in its tree (-1: the root, the prompt)
    depth: int                      # tokens on the path above this node (its first position)
    reward_sum: float = 0.0
    count: int = 0
    exact: float | None = None      # a verified terminal reward (a whole solution)
    children: dict = field(default_factory=dict)   # step tokens (tuple) -> node index

    @property
    def labelled(self) -> bool:
        return self.exact is not None or self.count > 0

    @property
    def target(self) -> float:
        return float(self.exact) if self.exact is not None else self.reward_sum / self.count


@dataclass
class PrefixTree:
    problem_id: str
    nodes: list[Node]

    def add_path(self, steps: Sequence[Sequence[int]], start: int = 0) -> list[int]:
        """Insert ``steps`` below node ``start``; returns the node index of each step."""
        out, cur = [], start
        for s in steps:
            key = tuple(int(t) for t in s)
            nxt = self.nodes[cur].children.get(key)
            if nxt is None:
                nxt = len(self.nodes)
                par = self.nodes[cur]
                self.nodes.append(Node(list(key), cur, par.depth + len(par.tokens)))
                par.children[key] = nxt
            out.append(nxt)
            cur = nxt
        return out

    def path_tokens(self, i: int) -> list[int]:
        chain = []
        while i >= 0:
            chain.append(i)
            i = self.nodes[i].parent
        return [t for n in reversed(chain) for t in self.nodes[n].tokens]

    def num_tokens(self) -> int:
        return sum(len(n.tokens) for n in self.nodes)


def split_completion(comp: Sequence[int], delimiter_ids: set[int], eos_id: int | None) -> list[list[int]]:
    """A completion's steps: cut after every delimiter token; a trailing EOS is dropped (its position carries
    no new step), the remainder after the last delimiter is the last step."""
    comp = [int(t) for t in comp]
    if eos_id is not None and comp and comp[-1] == eos_id:
        comp = comp[:-1]
    steps, cur = [], []
    for t in comp:
        cur.append(t)
        if t in delimiter_ids:
            steps.append(cur)
            cur = []
    if cur:
        steps.append(cur)
    return steps


def build_trees(records: Iterable[dict], delimiter_ids: Sequence[int], eos_id: int | None,
                use_completions: bool = True) -> list[PrefixTree]:
    """One :class:`PrefixTree` per problem from ``mc`` records (sorted by problem id). Without
    ``use_completions`` a tree holds only the solutions' states, labelled with their MC values."""
    delims = {int(t) for t in delimiter_ids}
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_problem[r["problem_id"]].append(r)
    trees = []
    for pid in sorted(by_problem):
        recs = by_problem[pid]
        tree = PrefixTree(pid, [Node(list(recs[0]["prompt_ids"]), -1, 0)])
        for r in recs:
            if list(r["prompt_ids"]) != tree.nodes[0].tokens:
                raise ValueError(f"problem {pid}: mc records disagree on the prompt tokens")
            path = tree.add_path(r["step_ids"])
            s = path[-1] if path else 0
            if r["terminal"]:
                tree.nodes[s].exact = float(r["value"])
                continue
            comps = r.get("completions") or []
            if not use_completions:
                tree.nodes[s].reward_sum += float(r["value"]) * len(comps)
                tree.nodes[s].count += len(comps)
                continue
            for c in comps:
                rew = float(c["reward"])
                for n in [s] + tree.add_path(split_completion(c["output_ids"], delims, eos_id), s):
                    tree.nodes[n].reward_sum += rew
                    tree.nodes[n].count += 1
        trees.append(tree)
    return trees


def node_weight(n: Node, weighting: str) -> float:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"tree weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    c = max(n.count, 1)
    return float(c) if weighting == "count" else math.sqrt(c) if weighting == "sqrt" else 1.0


@dataclass
class Piece:
    """A packable part of one tree: ``nodes`` (tree indices, depth first, each after its parent) of which the
    first ``n_context`` are unlabelled context (the ancestors of the piece's first own node)."""

    tree: int
    nodes: list[int]
    n_context: int
    tokens: int


def tree_pieces(trees: Sequence[PrefixTree], token_budget: int) -> list[Piece]:
    """Cut every tree depth first into pieces of at most ``token_budget`` tokens. A node whose path alone is
    longer than the budget is dropped (with its subtree)."""
    pieces = []
    for ti, tree in enumerate(trees):
        order, stack = [], [0]
        while stack:                                   # depth first, children in insertion order
            i = stack.pop()
            order.append(i)
            stack.extend(reversed(list(tree.nodes[i].children.values())))
        cur: list[int] = []
        in_cur: set[int] = set()
        n_ctx, size = 0, 0
        for i in order:
            node = tree.nodes[i]
            if node.depth + len(node.tokens) > token_budget:
                continue                               # too long even alone (its subtree too)
            # a new piece when this one is full or the node's parent sits in an earlier piece
            if size + len(node.tokens) > token_budget or (node.parent >= 0 and node.parent not in in_cur):
                if cur and len(cur) > n_ctx:
                    pieces.append(Piece(ti, cur, n_ctx, size))
                chain, j = [], node.parent
                while j >= 0:
                    chain.append(j)
                    j = tree.nodes[j].parent
                cur = list(reversed(chain))
                in_cur = set(cur)
                n_ctx = len(cur)
                size = sum(len(tree.nodes[j].tokens) for j in cur)
            cur.append(i)
            in_cur.add(i)
            size += len(node.tokens)
        if cur and len(cur) > n_ctx:
            pieces.append(Piece(ti, cur, n_ctx, size))
    return pieces


def _piece_row(tree: PrefixTree, piece: Piece, weighting: str, base: int):
    """Token arrays of one piece: ids, positions, node slot per token, the ancestor-or-self matrix of its
    nodes, and its labels (row position of each labelled own node's last token)."""
    slot = {n: k for k, n in enumerate(piece.nodes)}
    ids, pos, tok_node, label_pos, targets, weights, label_nodes = [], [], [], [], [], [], []
    anc = torch.zeros((len(piece.nodes), len(piece.nodes)), dtype=torch.bool)
    for k, n in enumerate(piece.nodes):
        node = tree.nodes[n]
        anc[k, k] = True
        if node.parent in slot:
            anc[k] |= anc[slot[node.parent]]
        start = len(ids)
        ids += node.tokens
        pos += list(range(node.depth, node.depth + len(node.tokens)))
        tok_node += [base + k] * len(node.tokens)
        if k >= piece.n_context and node.labelled:
            label_pos.append(start + len(node.tokens) - 1)
            targets.append(node.target)
            weights.append(node_weight(node, weighting))
            label_nodes.append(n)
    return ids, pos, tok_node, anc, label_pos, targets, weights, label_nodes


def pack_pieces(trees: Sequence[PrefixTree], pieces: Sequence[Piece], token_budget: int, pad_id: int,
                rows_per_microbatch: int = 1, weighting: str = "count", weight_scale: float = 1.0) -> list[dict]:
    """FFD-pack pieces into rows of at most ``token_budget`` tokens; micro-batches of ``rows_per_microbatch``
    rows: ``input_ids``/``position_ids`` ``[b, L]``, ``attention_mask`` ``[b, 1, L, L]`` (True = masked: a
    token sees only its own node, causally, and its node's ancestors), ``label_index`` ``[n]`` (flat into
    ``[b * L]``), ``targets``/``weights`` ``[n]`` float32 (weights times ``weight_scale``), ``label_nodes``
    (``(piece index, tree node)`` per label) and ``example_index`` (the pieces)."""
    rows = []
    for b in first_fit_decreasing([p.tokens for p in pieces], token_budget):
        ids, pos, tok_node, blocks, lab, tgt, wts, nodes = [], [], [], [], [], [], [], []
        nbase = 0
        for pi in b:
            p = pieces[pi]
            i2, p2, n2, anc, lp, t2, w2, ln = _piece_row(trees[p.tree], p, weighting, nbase)
            off = len(ids)
            ids += i2
            pos += p2
            tok_node += n2
            blocks.append(anc)
            lab += [off + x for x in lp]
            tgt += t2
            wts += [w * weight_scale for w in w2]
            nodes += [(pi, n) for n in ln]
            nbase += len(p.nodes)
        rows.append((ids, pos, tok_node, torch.block_diag(*blocks), lab, tgt, wts, nodes, list(b)))
    mbs = []
    for c in range(0, len(rows), rows_per_microbatch):
        chunk = rows[c:c + rows_per_microbatch]
        L = max(len(r[0]) for r in chunk)
        bsz = len(chunk)
        input_ids = torch.full((bsz, L), pad_id, dtype=torch.long)
        position_ids = torch.zeros((bsz, L), dtype=torch.long)
        mask = torch.ones((bsz, 1, L, L), dtype=torch.bool)
        label_index, targets, weights, label_nodes, example_index = [], [], [], [], []
        for i, (ids, pos, tok_node, anc, lab, tgt, wts, nodes, ex) in enumerate(chunk):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids)
            position_ids[i, :n] = torch.tensor(pos)
            tn = torch.tensor(tok_node)
            allowed = anc[tn][:, tn] & torch.ones((n, n), dtype=torch.bool).tril()
            mask[i, 0, :n, :n] = ~allowed
            mask[i, 0, torch.arange(n, L), torch.arange(n, L)] = False   # padding sees itself (no NaN rows)
            label_index += [i * L + x for x in lab]
            targets += tgt
            weights += wts
            label_nodes += nodes
            example_index += ex
        mbs.append({"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask,
                    "lengths": torch.tensor([len(r[0]) for r in chunk]),
                    "label_index": torch.tensor(label_index, dtype=torch.long),
                    "targets": torch.tensor(targets, dtype=torch.float32),
                    "weights": torch.tensor(weights, dtype=torch.float32),
                    "label_nodes": label_nodes, "example_index": example_index})
    return mbs


def prune(tree: PrefixTree, min_count: int) -> PrefixTree:
    """The tree without the nodes fewer than ``min_count`` rollouts passed through (and their subtrees), unless
    they carry an exact label or lie on a kept node's path. ``min_count`` 2 drops every completion tail only
    one rollout took: the single-sample 0/1 labels and most of the tokens."""
    if min_count <= 1:
        return tree
    keep = [False] * len(tree.nodes)
    for i in range(len(tree.nodes) - 1, -1, -1):        # children come after their parents: bottom-up
        n = tree.nodes[i]
        if i == 0 or n.exact is not None or n.count >= min_count or keep[i]:
            keep[i] = True
            if n.parent >= 0:
                keep[n.parent] = True
    new = {old: k for k, old in enumerate(i for i in range(len(tree.nodes)) if keep[i])}
    nodes = []
    for old in sorted(new, key=new.get):
        n = tree.nodes[old]
        nodes.append(Node(n.tokens, new.get(n.parent, -1), n.depth, n.reward_sum, n.count, n.exact,
                          {k: new[c] for k, c in n.children.items() if c in new}))
    return PrefixTree(tree.problem_id, nodes)


def tree_stats(trees: Sequence[PrefixTree]) -> dict:
    labelled = [n for t in trees for n in t.nodes if n.labelled]
    return {"trees": len(trees), "nodes": sum(len(t.nodes) for t in trees), "labelled_nodes": len(labelled),
            "tree_tokens": sum(t.num_tokens() for t in trees),
            "mean_count": sum(n.count for n in labelled) / max(1, len(labelled)),
            "single_rollout_nodes": sum(n.count == 1 and n.exact is None for n in labelled)}
