"""Model families beyond Llama/Qwen2: Qwen3 (q/k RMSNorm, explicit head_dim), Qwen3-MoE and Mixtral (megatron
MoE layers: SequentialMLP experts, allgather dispatcher), Mistral.

Tiny random checkpoints are built from transformers' own config classes (norm weights perturbed so a
swapped q/k norm or a wrong expert index shows), then checked through ``tests/dist/foundation_worker.py``
under torchrun: full-vocab logits equal transformers', HF -> megatron(layout) -> HF is bit-identical,
one training step (EP=2) equals the transformers step, parameter counts equal the planner's formula.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from foundation_worker import fixed_batch  # noqa: E402

from dapo_mcore.models.convert import CheckpointError, HFReader, iter_hf_tensors  # noqa: E402
from dapo_mcore.models.hf_config import ModelConfigError, arch_from_dict, load_arch, transformer_config  # noqa: E402

FAMILIES = ("qwen3", "qwen3_moe", "mixtral", "mistral")
LOGITS_RTOL = 2e-6     # max |megatron - transformers| / max |transformers| (fp32, 2 layers; measured <= 1e-6)


def tiny_hf_config(model_type: str, **over):
    """A tiny transformers config of ``model_type`` (4 heads / 2 KV heads, head_dim 32 != 64/4 where the family
    has an explicit head_dim, 4 experts top-2 for MoE, 2 layers)."""
    from transformers import MistralConfig, MixtralConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6)
    common.update(over)
    if model_type == "qwen3":
        return Qwen3Config(**{"head_dim": 32, **common})
    if model_type == "qwen3_moe":
        return Qwen3MoeConfig(**{"head_dim": 32, "moe_intermediate_size": 48, "num_experts": 4,
                                 "num_experts_per_tok": 2, "norm_topk_prob": True, **common})
    if model_type == "mixtral":
        return MixtralConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2, **common})
    if model_type == "mistral":
        return MistralConfig(**{"head_dim": 32, "sliding_window": None, **common})
    raise ValueError(model_type)


def build_family_checkpoint(out: Path, model_type: str, seed: int = 0, **over) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_hf_config(model_type, **over), dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:          # RMSNorm weights (q/k norms included) away from 1
                p.add_(0.2 * torch.randn_like(p))
    m.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def family_ckpt(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = build_family_checkpoint(tmp_path_factory.mktemp(model_type), model_type)
        return cache[model_type]

    return get


def _hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


# ------------------------------------------------------------------------------------------- configs
def test_load_arch_reads_each_family(family_ckpt):
    q3 = load_arch(family_ckpt("qwen3"))
    assert (q3.qk_norm, q3.head_dim, q3.qkv_bias, q3.is_moe) == (True, 32, False, False)
    moe = load_arch(family_ckpt("qwen3_moe"))
    assert (moe.qk_norm, moe.num_experts, moe.moe_topk, moe.moe_ffn_hidden_size, moe.moe_norm_topk) == (True, 4, 2, 48, True)
    assert moe.hf_architecture == "Qwen3MoeForCausalLM" and moe.active_ffn_hidden_size == 96
    mx = load_arch(family_ckpt("mixtral"))
    assert (mx.qk_norm, mx.num_experts, mx.moe_ffn_hidden_size, mx.moe_norm_topk, mx.head_dim) == (False, 4, 96, True, 16)
    ms = load_arch(family_ckpt("mistral"))
    assert (ms.qk_norm, ms.head_dim, ms.is_moe, ms.sliding_window) == (False, 32, False, None)
    cfg = transformer_config(moe, tp=2, ep=2)
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_token_dispatcher_type, cfg.variable_seq_lengths,
            cfg.qk_layernorm, cfg.expert_model_parallel_size) == (4, 2, "allgather", False, True, 2)
    assert not transformer_config(q3).num_moe_experts and transformer_config(q3).qk_layernorm


def test_hub_qwen3_moe_key_and_router_variants():
    base = dict(model_type="qwen3_moe", vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    # the hub's config.json spells it num_experts (transformers 5 writes num_local_experts)
    a = arch_from_dict(dict(base, num_experts=8, num_experts_per_tok=2))
    assert a.num_experts == 8 and a.moe_norm_topk is False     # transformers' default norm_topk_prob=False
    assert transformer_config(a).moe_router_pre_softmax        # softmax over all experts, no renormalisation
    with pytest.raises(ModelConfigError, match=r"mlp_only_layers=\[0\]\) are not supported"):
        arch_from_dict(dict(base, num_experts=8, mlp_only_layers=[0]))
    with pytest.raises(ModelConfigError, match="decoder_sparse_step=2"):
        arch_from_dict(dict(base, num_experts=8, decoder_sparse_step=2))
    with pytest.raises(ModelConfigError, match="expert parallel size 3 does not divide num_experts=8"):
        transformer_config(a, ep=3)
    with pytest.raises(ModelConfigError, match="top-1 routing with renormalised"):
        arch_from_dict(dict(base, model_type="mixtral", num_local_experts=4, num_experts_per_tok=1))
    import dataclasses

    with pytest.raises(ModelConfigError, match=r"tensor parallel size 2 does not divide moe_intermediate_size=47 "
                                               r"\(valid TP sizes for this model: 1\)"):
        transformer_config(dataclasses.replace(a, moe_ffn_hidden_size=47), tp=2)


def test_bad_inputs_say_what_to_do(tmp_path, family_ckpt):
    q3 = load_arch(family_ckpt("qwen3"))
    with pytest.raises(ModelConfigError, match="expert parallel size 2 given for a dense model"):
        transformer_config(q3, ep=2)
    with pytest.raises(ModelConfigError, match=r"^config: unsupported architecture model_type='gemma2' "
                                               r"\(architectures=\['Gemma2ForCausalLM'\]\); supported: llama, qwen2, "
                                               r"qwen3, qwen3_moe, mistral, mixtral$"):
        arch_from_dict({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]})
    # a quantised HF checkpoint (GPTQ/AWQ/bitsandbytes/GGUF-loaded config)
    cfg = json.loads((family_ckpt("qwen3") / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ModelConfigError, match=r"quant_method='gptq'.*de-quantise it first"):
        arch_from_dict(cfg)
    # a GGUF file where an HF checkpoint is expected
    g = tmp_path / "gguf"
    g.mkdir()
    (g / "model.Q4_1.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelConfigError, match=r"GGUF file \(model.Q4_1.gguf\).*dapo_mcore.models.importer"):
        load_arch(g)
    (g / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    with pytest.raises(CheckpointError, match=r"no model.safetensors.*found a GGUF.*model.Q4_1.gguf.*gguf_file="):
        HFReader(g)
    b = tmp_path / "bin"
    b.mkdir()
    (b / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"PyTorch pickle weights \(pytorch_model.bin\).*safe_serialization"):
        HFReader(b)


def test_sliding_window_is_exact_only_within_the_window(family_ckpt, tmp_path, torchrun):
    """Mistral/Mixtral ``sliding_window``: full causal attention, equal to the window while positions fit it
    (logits == transformers, whose mask is the window), and positions beyond it are refused."""
    d = build_family_checkpoint(tmp_path / "w", "mistral", sliding_window=21)   # the worker's batch is 21 long
    assert load_arch(d).max_attention_span == 21
    torchrun("foundation_worker.py", 1, "logits", 1, 1, d, tmp_path / "l.pt")
    got = torch.load(tmp_path / "l.pt")
    assert _rel(got["logits"], _hf_logits(d, got["ids"])) <= LOGITS_RTOL
    d2 = build_family_checkpoint(tmp_path / "w2", "mistral", sliding_window=16)
    with pytest.raises(AssertionError, match=r"position 20 is beyond the model's sliding window \(16\)"):
        torchrun("foundation_worker.py", 1, "logits", 1, 1, d2, tmp_path / "l2.pt")


# ------------------------------------------------------------------------------- parity under torchrun
LOGIT_LAYOUTS = {"qwen3": [(2, 2, 1)], "qwen3_moe": [(2, 1, 2)]}   # (tp, pp, ep); the default suite
SLOW_LOGIT_LAYOUTS = {
    "qwen3": [(1, 1, 1), (2, 1, 1), (1, 2, 1)], "mistral": [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1)],
    "qwen3_moe": [(1, 1, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1), (1, 2, 2)],
    "mixtral": [(1, 1, 1), (1, 1, 2), (2, 1, 1), (1, 2, 2), (2, 1, 2)],
}


def _cases(table, slow: bool):
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(f, *lay, marks=marks, id=f"{f}-tp{lay[0]}pp{lay[1]}ep{lay[2]}")
            for f, lays in table.items() for lay in lays]


@pytest.mark.dist
@pytest.mark.parametrize("family,tp,pp,ep", _cases(LOGIT_LAYOUTS, False) + _cases(SLOW_LOGIT_LAYOUTS, True))
def test_logits_match_transformers(family, tp, pp, ep, family_ckpt, torchrun, tmp_path):
    model = family_ckpt(family)
    out = tmp_path / "logits.pt"
    torchrun("foundation_worker.py", tp * pp * ep, "logits", tp, pp, model, out, "--ep", ep)
    got = torch.load(out)
    ref = _hf_logits(model, got["ids"])
    assert got["logits"].shape == ref.shape
    assert _rel(got["logits"], ref) <= LOGITS_RTOL


ROUNDTRIP_LAYOUTS = {"qwen3": [(2, 2, 1)], "qwen3_moe": [(1, 2, 2)], "mixtral": [(2, 1, 2)]}
SLOW_ROUNDTRIP_LAYOUTS = {"mistral": [(2, 2, 1)], "qwen3_moe": [(2, 2, 1), (2, 1, 2)], "mixtral": [(2, 2, 1), (1, 2, 2)]}


@pytest.mark.dist
@pytest.mark.parametrize("family,tp,pp,ep", _cases(ROUNDTRIP_LAYOUTS, False) + _cases(SLOW_ROUNDTRIP_LAYOUTS, True))
def test_roundtrip_bit_identical(family, tp, pp, ep, family_ckpt, torchrun, tmp_path):
    """HF -> megatron(TP, PP, EP) -> HF: every tensor (per-expert hub names included) has the same bits, and
    the export loads in transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = family_ckpt(family)
    out = tmp_path / "rt"
    torchrun("foundation_worker.py", tp * pp * ep, "roundtrip", tp, pp, model, out, "--ep", ep)
    src = load_file(str(model / "model.safetensors"))
    got = {n: f() for n, f in iter_hf_tensors(out)}
    assert set(got) == set(src)
    for k in src:
        assert got[k].dtype == src[k].dtype and torch.equal(got[k], src[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["architectures"] == [load_arch(model).hf_architecture]
    AutoModelForCausalLM.from_pretrained(str(out))


def _hub_named_grads(model) -> dict[str, torch.Tensor]:
    """Gradients under the checkpoint's (hub) names: transformers 5 keeps the experts of a layer fused in memory
    (``experts.gate_up_proj`` ``[E, 2F, H]``, ``experts.down_proj`` ``[E, H, F]``); split them per expert."""
    arch = model.config.model_type
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj"):
            layer = n.split(".")[2]
            for e in range(g.shape[0]):
                if arch == "mixtral":
                    pre = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
                    names = (f"{pre}.w1.weight", f"{pre}.w3.weight", f"{pre}.w2.weight")
                else:
                    pre = f"model.layers.{layer}.mlp.experts.{e}"
                    names = (f"{pre}.gate_proj.weight", f"{pre}.up_proj.weight", f"{pre}.down_proj.weight")
                if n.endswith("gate_up_proj"):
                    f = g.shape[1] // 2
                    out[names[0]], out[names[1]] = g[e, :f], g[e, f:]
                else:
                    out[names[2]] = g[e]
        elif arch == "mixtral" and ".mlp.gate." in n:
            out[n.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = g
        else:
            out[n] = g
    return out


def _check_fused_expert_layout(model_dir: Path, model) -> None:
    """The split in :func:`_hub_named_grads` is the one transformers applied when loading the checkpoint."""
    from safetensors.torch import load_file

    disk = load_file(str(model_dir / "model.safetensors"))
    for n, p in model.named_parameters():
        p.grad = p.detach().clone()
    named = _hub_named_grads(model)
    assert set(named) == set(disk)
    for k, v in disk.items():
        assert torch.equal(named[k], v), k
    model.zero_grad(set_to_none=True)


@pytest.mark.dist
@pytest.mark.parametrize("family,tp,pp,ep", [pytest.param("qwen3_moe", 1, 1, 2, id="qwen3_moe-ep2"),
                                             pytest.param("mixtral", 1, 2, 2, marks=pytest.mark.slow,
                                                          id="mixtral-pp2ep2"),
                                             pytest.param("qwen3", 2, 2, 1, marks=pytest.mark.slow,
                                                          id="qwen3-tp2pp2")])
def test_train_step_matches_transformers(family, tp, pp, ep, family_ckpt, torchrun, tmp_path):
    """One training step (4 micro-batches): loss and every gradient equal the transformers step. With EP=2 the
    two ranks are data-parallel copies running the same micro-batches, so the averaged step equals one copy."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir = family_ckpt(family)
    torchrun("foundation_worker.py", tp * pp * ep, "train", tp, pp, model_dir, tmp_path, "--steps", 1, "--ep", ep)
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    _check_fused_expert_layout(model_dir, m)
    total, count = 0.0, 0.0
    for b in fixed_batch(1, m.config.vocab_size):
        lg = m(b["input_ids"]).logits
        tok = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), b["labels"].reshape(-1), reduction="none")
        total = total + (tok * b["loss_mask"].reshape(-1)).sum()
        count += float(b["loss_mask"].sum())
    ref_loss = total / count
    ref_loss.backward()
    ref = _hub_named_grads(m)
    loss = json.loads((tmp_path / "losses.json").read_text())["1"]
    assert abs(loss - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    grads = load_file(str(tmp_path / "grads_step1.safetensors"))
    assert set(grads) == set(ref)
    for k, g in ref.items():
        assert _rel(grads[k], g) <= 1e-5, k


@pytest.mark.dist
@pytest.mark.parametrize("family,tp,pp,ep", [pytest.param("qwen3_moe", 2, 1, 2, id="qwen3_moe-tp2ep2"),
                                             pytest.param("qwen3", 2, 2, 1, marks=pytest.mark.slow, id="qwen3-tp2pp2")])
def test_param_counts_match_the_planner(family, tp, pp, ep, family_ckpt, torchrun, tmp_path):
    """The planner's per-rank count (q/k norms, router, E/ep experts sharded over expert-TP) equals the
    parameters megatron really builds on every rank."""
    from dapo_mcore.plan.memory import total_params

    model = family_ckpt(family)
    torchrun("foundation_worker.py", tp * pp * ep, "params", tp, pp, model, tmp_path / "p.json", "--ep", ep)
    rows = json.loads((tmp_path / "p.json").read_text())
    assert len(rows) == tp * pp * ep
    for r in rows:
        assert r["real"] == r["predicted"], r
    from transformers import AutoModelForCausalLM

    n_hf = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(model)).parameters())
    assert total_params(load_arch(model)) == n_hf


def test_qwen3_presets_equal_the_transformers_models():
    """The planner's totals for the Qwen3 presets equal the parameters of the transformers models built (on the
    meta device) from transformers' own config classes with the same config.json values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dapo_mcore.plan.memory import total_params
    from dapo_mcore.plan.presets import PRESETS, resolve_model

    for name in ("Qwen3-8B", "Qwen3-32B", "Qwen3-30B-A3B"):
        cfg = {k: v for k, v in PRESETS[name].items() if k not in ("model_type", "architectures")}
        hf_cfg = AutoConfig.for_model(PRESETS[name]["model_type"], **cfg)
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(hf_cfg)
        assert total_params(resolve_model(name)[1]) == sum(p.numel() for p in m.parameters()), name
    moe = resolve_model("Qwen3-30B-A3B")[1]
    assert (moe.num_experts, moe.moe_topk, moe.moe_ffn_hidden_size, moe.active_ffn_hidden_size) == (128, 8, 768, 6144)
