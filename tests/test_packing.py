"""Packed rows: mask rule, targets, bin packing, and equality with unpacked megatron runs (TP=1, TP=2)."""
from __future__ import annotations

import json

import pytest

from dapo_mcore.packing import RowBuilder, collate, first_fit_decreasing


def test_shared_prefix_layout_and_mask():
    rb = RowBuilder()
    g = rb.add_state([11, 12, 13], [[21, 22], [31]], keys=["a", "b"], key="s")
    e = rb.add_example([41, 42])
    row = rb.build()
    assert row.input_ids.tolist() == [11, 12, 13, 21, 22, 31, 41, 42]
    assert row.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 0, 1]   # actions continue from the state length
    a, b = g.actions
    assert (a.start, a.end, a.src, a.tgt) == (3, 5, [2, 3], [21, 22])
    assert (b.start, b.end, b.src, b.tgt) == (5, 6, [2], [31])     # first token predicted by the last state token
    assert (e.start, e.end) == (6, 8)
    allowed = ~row.attention_mask()
    expect = {
        0: [0], 1: [0, 1], 2: [0, 1, 2],
        3: [0, 1, 2, 3], 4: [0, 1, 2, 3, 4],     # action a: state + itself
        5: [0, 1, 2, 5],                          # action b: state + itself, not a
        6: [6], 7: [6, 7],                        # independent example
    }
    for i, js in expect.items():
        assert allowed[i].nonzero().flatten().tolist() == js, i


def test_collate_pads_and_masks():
    r1, r2 = RowBuilder(), RowBuilder()
    r1.add_example([1, 2, 3])
    r2.add_example([4])
    b = collate([r1.build(), r2.build()], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].shape == (2, 1, 3, 3)
    m = b["attention_mask"][1, 0]
    assert (~m).sum(dim=-1).min() >= 1          # no fully masked row (softmax stays finite)
    assert not (~m)[1:, 0].any()                # padding never attends to the real token...
    assert not (~m)[0, 1:].any()                # ...and the real token never attends to padding
    with pytest.raises(ValueError, match="exceeds length 2"):
        collate([r1.build()], length=2)


def test_first_fit_decreasing():
    bins = first_fit_decreasing([5, 3, 8, 2, 7, 1], budget=10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 8, 2, 7, 1][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3                        # 26 tokens, bins of 10
    assert first_fit_decreasing([4, 4], 10) == first_fit_decreasing([4, 4], 10)
    with pytest.raises(ValueError, match="item 1 has 11 tokens, more than the packing budget 10"):
        first_fit_decreasing([3, 11], 10)


def test_empty_pieces_rejected():
    with pytest.raises(ValueError, match="empty state"):
        RowBuilder().add_state([], [[1]])
    with pytest.raises(ValueError, match="empty action 'x'"):
        RowBuilder().add_state([1], [[]], keys=["x"])


@pytest.mark.dist
@pytest.mark.parametrize("tp", [1, 2])
def test_packed_equals_unpacked_megatron(tp, tiny_qwen2, torchrun, tmp_path):
    """Block-diagonal and shared-prefix rows give the logits of unpacked runs (<= 1e-5 fp32), and the
    summed action log-probs and their gradients equal one run per (state, action)."""
    out = tmp_path / "packing.json"
    torchrun("foundation_worker.py", tp, "packing", tp, 1, tiny_qwen2, out)
    r = json.loads(out.read_text())
    assert r["example_logits"] <= 1e-5
    assert r["shared_prefix_logits"] <= 1e-5
    assert r["logp_sum_diff"] <= 1e-4
    assert r["grad_rel"] <= 1e-5
