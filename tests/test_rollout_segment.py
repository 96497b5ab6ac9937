"""Step segmentation at token level and state building/dedup."""
from __future__ import annotations

import pytest

from dapo_mcore.tasks.tiny import train_tokenizer
from dapo_mcore.rollout.segment import TokenBytes, first_step, split_steps
from dapo_mcore.rollout.states import build_states
from dapo_mcore.tasks.chain import make_problems


@pytest.fixture(scope="module")
def tok():
    texts = [p.prompt + p.solution() for p in make_problems(200, 0)] + ["héllo wörld → ∑ 数学\n\n"] * 20
    return train_tokenizer(texts)


@pytest.fixture(scope="module")
def tb(tok):
    return TokenBytes(tok)


def enc(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def texts(tok, steps):
    return [tok.decode(s) for s in steps]


@pytest.mark.parametrize("s", ["47+8=55\nanswer: 55", "héllo wörld → ∑ 数学\n\nx", "\n\n a \n", "∑∑数\n学"])
def test_token_bytes_match_decode(tok, tb, s):
    ids = enc(tok, s)
    assert tb.text(ids) == tok.decode(ids) == s


def test_basic_and_exact_boundaries(tok, tb):
    s = "47+8=55\n55-3=52\nanswer: 52"
    ids = enc(tok, s)
    steps = split_steps(ids, tb)
    assert texts(tok, steps) == ["47+8=55\n", "55-3=52\n", "answer: 52"]
    assert sum(steps, []) == ids                               # exact token slices, nothing re-tokenised


def test_trailing_delimiter_and_eos(tok, tb):
    ids = enc(tok, "a=1\nanswer: 1\n") + [tok.eos_token_id]
    steps = split_steps(ids, tb)
    assert texts(tok, steps) == ["a=1\n", "answer: 1\n<|endoftext|>"]   # no empty step after the delimiter
    assert sum(steps, []) == ids


def test_empty_steps_merge(tok, tb):
    ids = enc(tok, "\n\na=1\n\n\nb=2\n\n")
    steps = split_steps(ids, tb)
    assert texts(tok, steps) == ["\n\na=1\n\n\n", "b=2\n\n"]
    assert sum(steps, []) == ids
    assert texts(tok, split_steps(enc(tok, "\n\n\n"), tb)) == ["\n\n\n"]
    assert split_steps([], tb) == []


def test_multichar_and_unicode_delimiters(tok, tb):
    s = "x=1\ny=2\n\nz=3\n\n"
    assert texts(tok, split_steps(enc(tok, s), tb, "\n\n")) == ["x=1\ny=2\n\n", "z=3\n\n"]
    u = "héllo → wörld → 数学"
    steps = split_steps(enc(tok, u), tb, "→")
    assert "".join(texts(tok, steps)) == u and len(steps) == 3
    assert texts(tok, steps)[0].endswith("→")
    with pytest.raises(ValueError, match="delimiter"):
        split_steps(enc(tok, u), tb, "")


def test_delimiter_inside_a_token(tok, tb):
    """A token holding the delimiter in its middle: the cut falls after that token."""
    ids = enc(tok, "a=1\nb=2")
    nl = enc(tok, "\n")[0]
    # fake a vocabulary entry "1\nb" by editing the table of a copy
    t2 = TokenBytes.__new__(TokenBytes)
    t2.table = list(tb.table)
    fake = 5
    t2.table[fake] = b"1\nb"
    seq = enc(tok, "a=") + [fake] + enc(tok, "=2")
    steps = split_steps(seq, t2)
    assert steps == [enc(tok, "a=") + [fake], enc(tok, "=2")]
    assert nl not in seq and len(split_steps(ids, tb)) == 2


def test_first_step(tok, tb):
    ids, whole = first_step(enc(tok, "\nx=1\ny=2"), tb)
    assert tok.decode(ids) == "\nx=1\n" and not whole
    ids, whole = first_step(enc(tok, "answer: 3") + [tok.eos_token_id], tb)
    assert whole and ids[-1] == tok.eos_token_id


def test_states_dedup_terminal_and_first_state(tok, tb):
    prompt = enc(tok, "47:+8-3\n")
    s1 = enc(tok, "47+8=55\n55-3=52\nanswer: 52") + [tok.eos_token_id]
    s2 = enc(tok, "47+8=55\n55-3=51\nanswer: 51") + [tok.eos_token_id]
    states = build_states("p0", prompt, [(s1, 1.0), (s2, 0.0), (s1, 1.0)], tb)
    non_term = [s for s in states if not s.terminal]
    term = [s for s in states if s.terminal]
    # s1 and s2 share the prompt state and the "47+8=55\n" state; the duplicate s1 adds nothing
    assert len(non_term) == 3 + 1 and len(term) == 2
    assert states[0].step_ids == [] and states[0].input_ids == prompt            # first state = prompt alone
    assert [t.reward for t in term] == [1.0, 0.0]
    assert states[0].sources == [(0, 0), (1, 0), (2, 0)]
    assert len({s.state_id for s in states}) == len(states)
    for s in states:
        assert s.input_ids[: len(prompt)] == prompt


def test_solution_longer_than_context(tok, tb):
    prompt = enc(tok, "47:+8\n")
    sol = enc(tok, "47+8=55\n" * 30 + "answer: 55")
    from dapo_mcore.rollout.states import StateStats

    st = StateStats()
    states = build_states("p", prompt, [(sol, 0.0)], tb, max_context=len(prompt) + 40, stats=st)
    assert states and all(len(s) < len(prompt) + 40 for s in states)
    assert not any(s.terminal for s in states)
    assert st.too_long == 31 - len(states) + 1
