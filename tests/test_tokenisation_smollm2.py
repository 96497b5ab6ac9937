"""Step segmentation, state dedup and state/action boundaries on a real tokenizer's merges (SmolLM2's 49k
byte-level BPE: newlines merged with neighbours, multi-newline tokens, the ChatML special tokens), and the
``"auto"`` prompt rule (chat template for a chat tokenizer).

The premise is checked first (these merges exist and are what the tokenizer produces), then the project's
token-level rules on them: a step ends after the token that holds the end of a ``"\\n"``; whitespace-only
pieces merge into the previous step; special tokens decode to nothing; every state is an exact prefix of
the token sequence the model produced (never a re-tokenisation).
"""
from __future__ import annotations

import pytest

from dapo_mcore.data.problems import Problem, PromptTemplate
from dapo_mcore.rollout.segment import TokenBytes, first_step, split_steps
from dapo_mcore.rollout.states import build_states

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def tok(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2))


@pytest.fixture(scope="module")
def tb(tok):
    return TokenBytes(tok)


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def pieces(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(ids)


def texts(tb, steps) -> list[str]:
    return [tb.text(s) for s in steps]


def test_the_merges_this_file_is_about(tok):
    """Newline tokens merged with neighbours are real tokens of this vocabulary and come out of encoding."""
    assert pieces(tok, enc(tok, "end.\n\n\n\n")) == ["end", ".", "ĊĊĊĊ"]                 # 4 newlines, one token
    assert pieces(tok, enc(tok, "end.\n\n\n\nNext")) == ["end", ".", "ĊĊĊ", "Ċ", "Next"]
    assert pieces(tok, enc(tok, "a\n\n\nb")) == ["a", "ĊĊ", "Ċ", "b"]
    assert pieces(tok, enc(tok, "x = 3;\n    y")) == ["x", "Ġ=", "Ġ", "3", ";", "ĊĠĠĠ", "Ġy"]  # newline + indent
    assert pieces(tok, enc(tok, "ok \n  x")) == ["ok", "ĠĊ", "Ġ", "Ġx"]                  # space + newline
    assert pieces(tok, enc(tok, "done<|im_end|>")) == ["done", "<|im_end|>"]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]


def test_token_bytes_is_exact_on_the_whole_vocabulary(tok, tb):
    """Every token's bytes are what the tokenizer decodes it to without special tokens: the special added
    tokens (the ChatML markers and SmolLM2's <repo_name>, <file_sep>, ... ids 0-16) decode to nothing."""
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert {0, 1, 2} <= special and all(tb.table[i] == b"" for i in special)
    bad = []
    for i in range(len(tok)):
        d = tok.decode([i], skip_special_tokens=True)
        if "\ufffd" in d:       # a partial UTF-8 sequence: compare where it decodes
            continue
        if tb.table[i] != d.encode():
            bad.append((i, tb.table[i], d))
    assert not bad, bad[:10]
    text = "Zahl: 12,5 € — naïve café 🙂 数学\n\n\tTabs\r\nCRLF <|im_end|>"
    ids = enc(tok, text)
    assert tb.text(ids) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text,want", [
    ("First, 12 + 30 = 42.\nThen 42 * 2 = 84.\n\nSo the answer is 84.",
     ["First, 12 + 30 = 42.\n", "Then 42 * 2 = 84.\n\n", "So the answer is 84."]),       # "\n\n" as Ċ Ċ
    ("end.\n\n\n\nNext step.\n", ["end.\n\n\n\n", "Next step.\n"]),                       # ĊĊĊ then Ċ
    ("Done.\n\n\n\n", ["Done.\n\n\n\n"]),                                                # one ĊĊĊĊ token
    ("a\n\n\nb", ["a\n\n\n", "b"]),                                                      # ĊĊ then Ċ: one cut kept
    ("x = 3;\n    y = 4\nz", ["x = 3;\n   ", " y = 4\n", "z"]),                         # ĊĠĠĠ keeps 3 spaces
    ("ok \n  x = 1\n", ["ok \n", "  x = 1\n"]),                                          # ĠĊ
    ("\n\nStart here.\nDone.", ["\n\nStart here.\n", "Done."]),                         # leading empty steps
    ("Step 1: add\nStep 2: done<|im_end|>", ["Step 1: add\n", "Step 2: done"]),         # EOS stays in the last step
    ("Step 1.\nStep 2.\n<|im_end|>", ["Step 1.\n", "Step 2.\n"]),                       # a lone EOS is an empty step
])
def test_split_steps_on_real_merges(tok, tb, text, want):
    ids = enc(tok, text)
    steps = split_steps(ids, tb)
    assert [t for s in steps for t in s] == ids                 # slices of the produced tokens, nothing lost
    assert texts(tb, steps) == want
    for s in steps[:-1]:                                        # a cut falls right after a token holding "\n"
        assert b"\n" in tb.table[s[-1]]
    if text.endswith("<|im_end|>"):
        assert steps[-1][-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_states_are_exact_token_prefixes_and_dedup(tok, tb):
    prompt = PromptTemplate().render_ids(Problem("p", "What is 12 + 30 - 7?", "35"), tok)
    sols = ["12 + 30 = 42.\n42 - 7 = 35.\n\nThe answer is 35.<|im_end|>",
            "12 + 30 = 42.\n42 - 7 = 35.\nSo 35.<|im_end|>",
            "12 + 30 = 42.\n42 - 7 = 36.\n\nThe answer is 36.<|im_end|>"]
    outs = [enc(tok, s) for s in sols]
    states = build_states("p", prompt, [(o, float(i != 2)) for i, o in enumerate(outs)], tb)
    # shared: the prompt, after "12 + 30 = 42.\n", and (solutions 0 and 1) after "42 - 7 = 35.\n" -- but
    # solution 0 ends that step with "\n\n" (Ċ Ċ), solution 1 with a single Ċ: different token prefixes
    by_text = {}
    for st in states:
        full = st.input_ids
        assert full[:len(prompt)] == prompt
        src, k = st.sources[0]
        steps = split_steps(outs[src], tb)
        assert full == prompt + [t for s in steps[:k] for t in s]     # an exact prefix of what was produced
        by_text.setdefault(tb.text(full[len(prompt):]), []).append(st)
    assert len(states) == 8      # non-terminal: prompt, after step 1, 3 distinct after step 2; 3 terminal
    assert [len(st.sources) for st in states if not st.step_ids] == [3]
    shared = by_text["12 + 30 = 42.\n"]
    assert len(shared) == 1 and len(shared[0].sources) == 3
    assert sum(1 for st in states if st.terminal) == 3


def test_action_boundary_and_why_states_are_never_retokenised(tok, tb):
    """The mc stage's action is the first step of a completion, cut on token boundaries. Re-tokenising a
    state's text would not give the model's tokens back: the prompt ends with "assistant\\n" (Ċ), and a
    completion that starts with blank lines (ĊĊ Ċ) re-encodes, joined to it, as ĊĊĊ Ċ."""
    prompt = PromptTemplate().render_ids(Problem("p", "Add 2 and 3.", "5"), tok)
    completion = enc(tok, "\n\n\n2 + 3 = 5.\nThe answer is 5.<|im_end|>")
    action, whole = first_step(completion, tb)
    assert tb.text(action) == "\n\n\n2 + 3 = 5.\n" and not whole
    assert completion[:len(action)] == action
    joined_text = tok.decode(prompt + action, skip_special_tokens=False)
    assert enc(tok, joined_text) != prompt + action          # re-encoding merges across the boundary
    last, whole = first_step(enc(tok, "The answer is 5.<|im_end|>"), tb)
    assert whole and tb.text(last) == "The answer is 5."


def test_auto_prompt_rule(tok, tiny_qwen2):
    """``PromptTemplate()`` ("auto"): the chat template for a tokenizer that has one (with the template's own
    system turn unless one is given); the plain problem text for a tokenizer without (the toy ones)."""
    from transformers import AutoTokenizer

    p = Problem("p", "What is 2 + 2?", "4")
    chat = PromptTemplate().render_text(p, tok)
    assert chat == tok.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False,
                                           add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    assert PromptTemplate().render_ids(p, tok) == PromptTemplate("chat").render_ids(p, tok)
    assert "Be brief." in PromptTemplate(system="Be brief.").render_text(p, tok)
    assert PromptTemplate("Q: {prompt}\nA:").render_text(p, tok) == "Q: What is 2 + 2?\nA:"
    toy = AutoTokenizer.from_pretrained(str(tiny_qwen2))
    assert not toy.chat_template
    assert PromptTemplate().render_text(p, toy) == p.prompt
    with pytest.raises(ValueError, match="needs the tokenizer"):
        PromptTemplate().render_text(p)
