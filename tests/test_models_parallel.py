"""Foundation: megatron models from HF checkpoints on CPU (gloo), TP/PP parity, conversion, resume.

Every distributed case runs under ``torchrun`` (tests/dist/foundation_worker.py) so the pytest process
never holds a process group.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from foundation_worker import fixed_batch  # noqa: E402

pytestmark = pytest.mark.dist


def _hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("which", ["tiny_qwen2", "tiny_llama_tied"])
def test_logits_match_transformers(tp, which, request, torchrun, tmp_path):
    """Megatron (local spec, RoPE theta, GQA, qkv bias / tied embeddings) == transformers, fp32."""
    model = request.getfixturevalue(which)
    out = tmp_path / "logits.pt"
    torchrun("foundation_worker.py", tp, "logits", tp, 1, model, out)
    got = torch.load(out)
    ref = _hf_logits(model, got["ids"])
    assert got["logits"].shape == ref.shape
    assert (got["logits"] - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("which", ["tiny_qwen2", "tiny_llama_tied"])
def test_roundtrip_tp2_pp2_bit_identical(which, request, torchrun, tmp_path):
    """HF -> megatron(TP=2, PP=2) -> HF (sharded safetensors + index) gives the same bits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dapo_mcore.models.convert import iter_hf_tensors

    model = request.getfixturevalue(which)
    out = tmp_path / "rt"
    torchrun("foundation_worker.py", 4, "roundtrip", 2, 2, model, out)
    src = load_file(str(model / "model.safetensors"))
    got = {n: f() for n, f in iter_hf_tensors(out)}
    assert set(got) == set(src)
    for k in src:
        assert got[k].dtype == src[k].dtype and torch.equal(got[k], src[k]), k
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(src)
    AutoModelForCausalLM.from_pretrained(str(out))  # loadable by transformers as written


def _reference_step(model_dir: Path):
    """Loss and gradients of the first training batch with transformers (global per-token mean)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    total, count = 0.0, 0.0
    for b in fixed_batch(1, m.config.vocab_size):
        lg = m(b["input_ids"]).logits
        tok = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), b["labels"].reshape(-1), reduction="none")
        total = total + (tok * b["loss_mask"].reshape(-1)).sum()
        count += float(b["loss_mask"].sum())
    loss = total / count
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.fixture(scope="module")
def reference_step(tiny_qwen2):
    return _reference_step(tiny_qwen2)


@pytest.mark.parametrize("tp,pp,vpp", [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)])
def test_train_step_parity(tp, pp, vpp, tiny_qwen2, reference_step, torchrun, tmp_path):
    """One step (4 micro-batches) under TP=2 / PP=2 / TP2xPP2 / interleaved PP: loss and every gradient
    equal the single-process transformers reference (hence each other) to fp32 tolerance."""
    args = ["train", tp, pp, tiny_qwen2, tmp_path, "--steps", 1] + (["--vpp", vpp] if vpp else [])
    torchrun("foundation_worker.py", tp * pp, *args)
    from safetensors.torch import load_file

    ref_loss, ref_grads = reference_step
    loss = json.loads((tmp_path / "losses.json").read_text())["1"]
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    grads = load_file(str(tmp_path / "grads_step1.safetensors"))
    assert set(grads) == set(ref_grads)
    for k, g in ref_grads.items():
        rel = (grads[k] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
        assert rel <= 1e-5, f"{k}: relative grad diff {rel:.2e}"


def test_checkpoint_resume_identical_losses(tiny_qwen2, torchrun, tmp_path):
    """Save at step 2 under PP=2, resume in a fresh job: steps 3-4 give identical losses."""
    ck = tmp_path / "ckpt"
    torchrun("foundation_worker.py", 2, "train", 1, 2, tiny_qwen2, tmp_path / "a", "--steps", 4,
             "--save-at", 2, "--ckpt", ck)
    latest = json.loads((ck / "latest.json").read_text())
    assert latest["step"] == 2 and (ck / latest["path"] / "metadata.json").is_file()
    torchrun("foundation_worker.py", 2, "train", 1, 2, tiny_qwen2, tmp_path / "b", "--steps", 4,
             "--load", ck / latest["path"])
    a = json.loads((tmp_path / "a" / "losses.json").read_text())
    b = json.loads((tmp_path / "b" / "losses.json").read_text())
    assert set(b) == {"3", "4"}
    assert a["3"] == b["3"] and a["4"] == b["4"]
    assert a["3"] != a["4"]  # training moved


def test_value_model_export_import_tp2_pp2(tiny_qwen2, torchrun, tmp_path):
    """Critic from a policy checkpoint (fresh scalar head) under TP=2 x PP=2: its HF export loads in
    transformers as ``ForTokenClassification`` with the same per-token logits, and re-importing the
    export reproduces the values exactly."""
    from transformers import AutoModelForTokenClassification

    torchrun("foundation_worker.py", 4, "value", 2, 2, tiny_qwen2, tmp_path)
    a = torch.load(tmp_path / "values.pt")
    b = torch.load(tmp_path / "values2.pt")
    assert a["values"].shape == (2, 9)
    assert torch.equal(a["values"], b["values"])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForTokenClassification"] and cfg["num_labels"] == 1
    m = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        ref = m(a["ids"]).logits.squeeze(-1)
    assert (ref - a["values"]).abs().max().item() <= 1e-5
