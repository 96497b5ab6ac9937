"""dapo-mcore plan: parameter counts vs real megatron models, activation/peak formulas vs a measured CPU
training step, layout validation, the 72B multi-node layout, throughput and generation-fleet sizing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dapo_mcore.models.hf_config import arch_from_dict
from dapo_mcore.plan import fleet, main
from dapo_mcore.plan.layout import Layout, LayoutError
from dapo_mcore.plan.memory import (layer_activation_bytes, logits_peak_bytes, optimizer_bytes, stage_memory,
                                    total_params)
from dapo_mcore.plan.presets import PRESETS, resolve_model
from dapo_mcore.plan.throughput import forward_flops_per_token

ROOT = Path(__file__).resolve().parents[1]


def _verify(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "dapo_mcore.plan.verify", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tag = "PLAN_PARAMS " if args[0] == "params" else "PLAN_PEAK "
    line = next(x for x in proc.stdout.splitlines() if x.startswith(tag))
    return json.loads(line[len(tag):])


def _plan_json(*argv: str, capsys) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------ parameter counts

def test_preset_param_counts_match_published_models():
    # Parameter counts of the released safetensors checkpoints (sum of tensor sizes).
    published = {"Qwen2.5-7B": 7_615_616_512, "Qwen2.5-Math-7B": 7_615_616_512, "Llama-3.1-8B": 8_030_261_248,
                 "Qwen2.5-72B": 72_706_203_648, "Qwen3-8B": 8_190_735_360, "Qwen3-32B": 32_762_123_264,
                 "Qwen3-30B-A3B": 30_532_122_624}
    for name, n in published.items():
        assert total_params(resolve_model(name)[1]) == n, name


def test_param_counts_exact_vs_megatron_single_rank():
    rows = _verify("params")
    assert len(rows) == 4
    for r in rows:
        assert r["real"] == r["predicted"] == r["total_predicted"], r


@pytest.mark.dist
@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2", "--vpp", "2")], ids=["tp2", "pp2vpp2"])
def test_param_counts_exact_vs_megatron_two_ranks(layout, torchrun):
    out = torchrun("dapo_mcore.plan.verify", 2, "params", *layout)
    rows = json.loads(next(x for x in out.splitlines() if x.startswith("PLAN_PARAMS "))[len("PLAN_PARAMS "):])
    assert len(rows) == 8
    for r in rows:
        assert r["real"] == r["predicted"], r
    # the ranks of one model hold the whole model once (TP shards + replicated norms, or PP stages)
    for model in ("qwen2", "llama_tied"):
        for vh in (False, True):
            per = [r for r in rows if r["model"] == model and r["value_head"] == vh]
            if layout[0] == "--pp":
                tied_copy = 320 * 64 if (model == "llama_tied" and not vh) else 0  # megatron's last-stage copy
                assert sum(r["real"] for r in per) == per[0]["total_predicted"] + tied_copy
            else:
                assert sum(r["real"] for r in per) > per[0]["total_predicted"]  # norms/head replicated


def test_config_json_checkpoint(tiny_qwen2, capsys):
    rep = _plan_json(str(tiny_qwen2), "--gpus-per-node", "1", "--seq-length", "256", "--global-batch", "8",
                     capsys=capsys)
    cfg = json.loads((tiny_qwen2 / "config.json").read_text())
    arch = arch_from_dict(cfg)
    h, f, v = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    per_layer = h * 128 + 128 + 64 * h + 3 * h * f + 2 * h      # GQA 4/2 heads of 16: qkv 128 rows
    assert rep["params"]["policy"] == 2 * v * h + arch.num_layers * per_layer + h


# ------------------------------------------------------------------ activations and peak, measured on CPU

@pytest.mark.parametrize("batch,seq,vocab,logits", [(8, 256, 8192, "naive"), (8, 256, 8192, "fused"),
                                                    (32, 64, 320, "fused")])
def test_activation_and_peak_formula_vs_measured_cpu_step(batch, seq, vocab, logits):
    r = _verify("peak", "--batch", str(batch), "--seq", str(seq), "--vocab", str(vocab), "--logits", logits)
    # bytes saved for backward (unique storages): the local-spec formula is exact up to tiny extras (< 0.5%)
    pred_saved = r["pred_saved"]
    assert abs(r["saved_bytes"] - pred_saved) / pred_saved < 0.005, r
    # measured RSS high-water of the step (activations + loss path + backward working set): within 10%
    assert abs(r["rss_delta"] - r["pred_peak_delta"]) / r["pred_peak_delta"] < 0.10, r


def test_naive_logits_cost_vs_measured_difference():
    naive = _verify("peak", "--batch", "8", "--seq", "256", "--vocab", "8192", "--logits", "naive")
    fused = _verify("peak", "--batch", "8", "--seq", "256", "--vocab", "8192", "--logits", "fused")
    measured = naive["rss_delta"] - fused["rss_delta"]
    predicted = naive["pred_peak_delta"] - fused["pred_peak_delta"]
    assert predicted > 50e6 and abs(measured - predicted) / predicted < 0.15, (measured, predicted)


# ------------------------------------------------------------------ formulas

def test_memory_terms_follow_layout():
    arch = resolve_model("Qwen2.5-7B")[1]
    base = Layout(nodes=1, gpus_per_node=8, tp=2, pp=1, global_batch=64, seq_length=4096)
    m = stage_memory(arch, base, "actor")
    assert m.weights == m.params * 2 and m.grads == m.params * 4 and m.optimizer == m.params * 12
    dist = stage_memory(arch, Layout(**{**base.__dict__, "distributed_optimizer": True}), "actor")
    assert dist.optimizer == pytest.approx(m.params * 12 / 4)            # DP = 8 / 2
    rec = stage_memory(arch, Layout(**{**base.__dict__, "recompute": "full"}), "actor")
    assert rec.activations < m.activations / 5 and rec.activations_alt == m.activations
    assert m.logits_naive == 4096 * arch.vocab_size / 2 * 8            # fp32 softmax + 2 bf16 copies
    assert m.logits_fused == 4096 * 16
    assert optimizer_bytes(10, bf16=False, distributed=True, dp=2) == 40
    score = stage_memory(arch, base, "score")
    assert score.grads == score.optimizer == 0 and score.activations < m.activations / 20
    # sequence parallel shards the replicated LayerNorm-side activations; TP shards the rest
    a1 = layer_activation_bytes(arch, 4096, 4096, tp=1)
    assert layer_activation_bytes(arch, 4096, 4096, tp=2, sp=True) == pytest.approx(a1 / 2, rel=0.03)
    assert layer_activation_bytes(arch, 4096, 4096, tp=2) > layer_activation_bytes(arch, 4096, 4096, tp=2, sp=True)
    assert logits_peak_bytes(arch, 10, tp=1, p=4, fused=False) == 10 * arch.vocab_size * 8


def test_flops_per_token_close_to_6n_rule():
    arch = resolve_model("Llama-3.1-8B")[1]
    n = total_params(arch) - arch.vocab_size * arch.hidden_size        # embeddings do no matmul
    assert forward_flops_per_token(arch, 128) == pytest.approx(2 * n, rel=0.01)
    assert forward_flops_per_token(arch, 8192) > 2 * n * 1.1            # attention grows with context


def test_layout_errors(capsys):
    arch = resolve_model("Qwen2.5-7B")[1]
    with pytest.raises(LayoutError, match="sequence-parallel requires --tp > 1"):
        Layout(sequence_parallel=True).validate(arch)
    with pytest.raises(LayoutError, match="does not divide num_attention_heads=28"):
        Layout(tp=8).validate(arch)
    with pytest.raises(LayoutError, match="global-batch 100"):
        Layout(global_batch=100).validate(arch)
    with pytest.raises(LayoutError, match="--dp 3"):
        Layout().validate(arch, dp=3)
    assert main(["Qwen2.5-7B", "--tp", "8"]) == 2
    assert "num_attention_heads=28" in capsys.readouterr().err
    assert main(["/nonexistent/model"]) == 2
    assert "neither a preset" in capsys.readouterr().err


# ------------------------------------------------------------------ the 72B job on 4 nodes x 8 x 80 GB

def test_72b_actor_on_four_nodes_fits_with_fused_kernel(capsys):
    rep = _plan_json("Qwen2.5-72B", "--stage", "actor", "--nodes", "4", "--gpus-per-node", "8",
                     "--tp", "8", "--pp", "4", "--global-batch", "512", "--seq-length", "4096", capsys=capsys)
    st = rep["stages"]["actor"]
    assert rep["params"]["policy"] == 72_706_203_648
    assert st["fits_fused"] and st["memory_gb"]["peak_fused"] <= 80
    assert st["memory_gb"]["naive_extra_last_stage"] > 0.3                # reported, not hidden
    sug = st["suggested"]
    assert sug["peak_fused_gb"] <= 80 and sug["layout"]["tp"] * sug["layout"]["pp"] * sug["layout"]["dp"] == 32
    assert sug["naive_extra_last_stage_gb"] > 0
    # a layout that does not fit is reported as such, and the suggestion fixes it
    rep = _plan_json("Qwen2.5-72B", "--stage", "actor", "--nodes", "4", "--tp", "8", "--pp", "1",
                     "--global-batch", "512", capsys=capsys)
    assert not rep["stages"]["actor"]["fits_fused"] and rep["stages"]["actor"]["suggested"]["peak_fused_gb"] <= 80


def test_naive_logits_decides_fit_for_7b_without_tp(capsys):
    rep = _plan_json("Qwen2.5-Math-7B", "--stage", "actor", "--distributed-optimizer", "--global-batch", "64",
                     "--seq-length", "4096", capsys=capsys)
    mem = rep["stages"]["actor"]["memory_gb"]
    assert mem["naive_extra_peak"] == pytest.approx(4096 * 152064 * 8 / 1e9 - mem["backward_transient"], abs=0.02)


def test_human_readable_output(capsys):
    assert main(["Qwen2.5-72B", "--nodes", "4", "--tp", "8", "--pp", "4", "--global-batch", "512",
                 "--servers", "8", "--server-decode-tps", "3000", "--server-prefill-tps", "30000"]) == 0
    out = capsys.readouterr().out
    assert "72.706B parameters" in out and "fastest fitting layout" in out and "generation fleet" in out


# ------------------------------------------------------------------ generation fleet

def test_fleet_tokens_match_brute_force_and_paper_recipe():
    r = fleet.Recipe(problems=3, samples=8, keep=2, completions=4, prompt_tokens=10, solution_tokens=60, steps=6)
    pre = dec = 0.0
    for _ in range(r.problems * r.keep):
        for k in range(int(r.steps)):
            pre += r.completions * (r.prompt_tokens + r.solution_tokens * k / r.steps)
            dec += r.completions * r.solution_tokens * (r.steps - k) / r.steps
    mc = fleet.mc_tokens(r)
    assert mc.prefill_no_cache == pytest.approx(pre) and mc.decode == pytest.approx(dec)
    assert mc.requests == 3 * 2 * 6 * 4
    paper = fleet.Recipe()
    gen = fleet.generate_tokens(paper)
    assert gen.requests == 7500 * 128 and gen.decode == 7500 * 128 * paper.solution_tokens
    est = {e.stage: e for e in fleet.estimate(paper, servers=8, decode_tps=3000, prefill_tps=30000)}
    assert est["mc"].hours_cached < est["mc"].hours_no_cache
    assert est["generate"].hours_no_cache == pytest.approx(
        (gen.prefill_no_cache / 30000 + gen.decode / 3000) / 8 / 3600)
    with pytest.raises(ValueError, match="keep=7 > samples=6"):
        fleet.estimate(fleet.Recipe(samples=6, keep=7), 1, 1, 1)


def test_presets_are_loadable_hf_configs():
    for name, cfg in PRESETS.items():
        assert resolve_model(name.lower())[0] == name
        assert cfg["model_type"] in ("qwen2", "llama", "qwen3", "qwen3_moe")
