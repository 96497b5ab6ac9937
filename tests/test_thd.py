"""THD packed sequences (PackedSeqParams) on CPU: the varlen core attention, the padding-free batch
builder, the switch's selection, and full-model / critic-step / TP=2 equality (tests/dist/thd_worker.py)."""
from __future__ import annotations

import dataclasses
import functools
import json
from types import SimpleNamespace

import pytest
import torch

from dapo_mcore.models.attention import FlexCoreAttention, ThdCoreAttention, varlen_causal_attention
from dapo_mcore.packing import (RowBuilder, batch_packing, batch_rows, collate, collate_thd, empty_batch,
                                thd_packed_seq_params)
from dapo_mcore.parallel.fast_paths import FastPathConfig, resolve


def _rows(lengths=((5, 1, 7), (3, 9)), seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for row in lengths:
        rb = RowBuilder()
        for n in row:
            rb.add_example(torch.randint(2, 300, (n,), generator=g).tolist())
        rows.append(rb.build())
    return rows


def _dense_reference(q, k, v, mask, scale):
    """Plain attention in the input dtype: q ``[b, s, h, d]``, k/v ``[b, s, g, d]``, mask ``[b, 1, s, s]``
    (True = masked) -> ``[b, s, h, d]``."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_varlen_attention_equals_block_diagonal_mask_forward_and_grads(dtype, tol):
    rows = _rows()
    thd = collate_thd(rows)
    dense = collate(rows)
    T, L, h, g, d = thd["input_ids"].shape[1], dense["input_ids"].shape[1], 4, 2, 8
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(T, n, d, generator=gen, dtype=dtype, requires_grad=True) for n in (h, g, g))
    w = torch.randn(T, h * d, generator=gen, dtype=dtype)
    out = varlen_causal_attention(q, k, v, thd["cu_seqlens"])
    assert out.shape == (T, h * d) and out.dtype == dtype
    (out * w).sum().backward()

    # the same tokens laid out [b, L] (padding), attended with the block-diagonal dense mask
    def to_rows(x):
        y = torch.zeros(len(rows), L, *x.shape[1:], dtype=dtype)
        for i, off in enumerate(thd["row_offsets"].tolist()):
            y[i, :len(rows[i])] = x[off:off + len(rows[i])]
        return y

    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = _dense_reference(to_rows(q2), to_rows(k2), to_rows(v2), dense["attention_mask"], d ** -0.5)
    ref_flat = torch.cat([ref[i, :len(r)] for i, r in enumerate(rows)]).reshape(T, h * d)
    (ref_flat * w).sum().backward()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    assert rel(out.detach(), ref_flat.detach()) < tol
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert rel(a.grad, b.grad) < tol


def test_varlen_attention_rejects_bad_cu_seqlens_and_shapes():
    q, k = torch.randn(6, 4, 8), torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="rise from 0 to T=6"):
        varlen_causal_attention(q, k, k, torch.tensor([0, 4, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="h % g == 0"):
        varlen_causal_attention(q, torch.randn(6, 3, 8), torch.randn(6, 3, 8), torch.tensor([0, 6]))


class _Recorder(torch.nn.Module):
    """Stands in for the masked core attention: records that it was called."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs, self.calls = kwargs, 0

    def forward(self, q, k, v, mask, attn_mask_type=None, attention_bias=None):
        self.calls += 1
        return torch.zeros(q.shape[0], q.shape[1], q.shape[2] * q.shape[3])


def _core(masked=_Recorder):
    cfg = SimpleNamespace(kv_channels=8, attention_dropout=0.0, context_parallel_size=1)
    return ThdCoreAttention(cfg, 1, None, "self", masked=masked)


def test_thd_core_attention_routes_thd_and_masked_calls():
    core = _core()
    thd = collate_thd(_rows())
    T = thd["input_ids"].shape[1]
    q, k = torch.randn(T, 4, 8), torch.randn(T, 2, 8)
    out = core(q, k, k, None, packed_seq_params=thd["packed_seq_params"])
    assert torch.equal(out, varlen_causal_attention(q, k, k, thd["cu_seqlens"]))
    assert core.masked.calls == 0
    core(q[:, None], k[:, None], k[:, None], torch.zeros(1, 1, T, T, dtype=torch.bool))   # dense-mask rows
    assert core.masked.calls == 1
    assert core.masked.kwargs["layer_number"] == 1 and core.masked.kwargs["attention_type"] == "self"


def test_thd_core_attention_errors():
    thd = collate_thd(_rows())
    T = thd["input_ids"].shape[1]
    q, k = torch.randn(T, 4, 8), torch.randn(T, 2, 8)
    with pytest.raises(ValueError, match="no masked core attention"):
        _core(masked=None)(q, k, k, torch.zeros(1, 1, T, T, dtype=torch.bool))
    psp = thd["packed_seq_params"]
    other = dataclasses.replace(psp, cu_seqlens_kv=torch.tensor([0, T], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q must equal cu_seqlens_kv"):
        _core()(q, k, k, None, packed_seq_params=other)
    with pytest.raises(ValueError, match="qkv_format='thd'"):
        _core()(q, k, k, None, packed_seq_params=dataclasses.replace(psp, qkv_format="sbhd"))
    with pytest.raises(ValueError, match="unpadded"):
        _core()(q, k, k, None, packed_seq_params=dataclasses.replace(psp, cu_seqlens_q_padded=psp.cu_seqlens_q))
    cfg = SimpleNamespace(kv_channels=8, attention_dropout=0.0, context_parallel_size=2)
    with pytest.raises(ValueError, match="context parallelism"):
        ThdCoreAttention(cfg, 1, None, "self")


def test_collate_thd_is_padding_free_with_per_document_positions():
    rows = _rows()
    b = collate_thd(rows)
    lens = [5, 1, 7, 3, 9]
    assert b["input_ids"].shape == (1, sum(lens)) and b["attention_mask"] is None
    assert torch.equal(b["input_ids"][0], torch.cat([r.input_ids for r in rows]))
    assert b["cu_seqlens"].tolist() == [0, 5, 6, 13, 16, 25] and b["cu_seqlens"].dtype == torch.int32
    assert b["max_seqlen"] == 9 and b["row_offsets"].tolist() == [0, 13]
    assert b["position_ids"][0].tolist() == [p for n in lens for p in range(n)]
    psp = b["packed_seq_params"]
    assert psp.qkv_format == "thd" and torch.equal(psp.cu_seqlens_kv, b["cu_seqlens"]) and psp.max_seqlen_kv == 9
    # a row holding one document right after a row whose last document has id 0 stays two documents
    one = _rows(((4,), (3,)))
    assert collate_thd(one)["cu_seqlens"].tolist() == [0, 4, 7]


def test_collate_thd_rejects_shared_prefix_rows_and_wrong_positions():
    rb = RowBuilder()
    rb.add_state([1, 2, 3], [[4, 5], [6]])
    with pytest.raises(ValueError, match="shared-prefix"):
        collate_thd([rb.build()])
    row = _rows(((3, 4),))[0]
    row.position_ids = torch.arange(len(row))          # positions not restarting in document 2
    with pytest.raises(ValueError, match="restarting at 0"):
        collate_thd([row])
    with pytest.raises(ValueError, match="packing must be one of"):
        batch_rows([(row, {})], 1, 0, "bshd")


def test_critic_and_sft_batches_thd_align_labels_with_dense():
    """Labels, targets and gather indices point at the same tokens in both layouts; THD has no padding."""
    from dapo_mcore.critic.data import CriticExample, pack_examples
    from dapo_mcore.sft.train import SFTExample, pack_sft

    g = torch.Generator().manual_seed(3)
    rnd = lambda n: torch.randint(2, 300, (n,), generator=g).tolist()  # noqa: E731
    exs = [CriticExample("p", rnd(n), [n // 2, n - 1], [0.25, 0.75]) for n in (9, 4, 13, 6, 11, 3)]
    for rpm in (1, 2):
        dense, thd = pack_examples(exs, 20, 0, rpm), pack_examples(exs, 20, 0, rpm, "thd")
        assert len(dense) == len(thd)
        for d, t in zip(dense, thd):
            assert batch_packing(t) == "thd" and batch_packing(d) == "dense_mask"
            assert t["input_ids"].numel() == d["lengths"].sum() == sum(len(exs[i]) for i in t["example_index"])
            assert torch.equal(d["input_ids"].flatten()[d["label_index"]], t["input_ids"].flatten()[t["label_index"]])
            assert torch.equal(d["position_ids"].flatten()[d["label_index"]],
                               t["position_ids"].flatten()[t["label_index"]])
            assert torch.equal(d["targets"], t["targets"]) and d["example_index"] == t["example_index"]
    sft = [SFTExample(rnd(n), rnd(m)) for n, m in ((4, 3), (6, 5), (2, 7), (5, 2))]
    for d, t in zip(pack_sft(sft, 16, 0, 2), pack_sft(sft, 16, 0, 2, "thd")):
        ids = t["input_ids"].flatten()
        assert torch.equal(ids[t["src"] + 1], t["tgt"]) and torch.equal(t["tgt"], d["tgt"])
        assert torch.equal(d["input_ids"].flatten()[d["src"]], ids[t["src"]])


def test_empty_batch_in_thd_layout():
    e = empty_batch(7, "thd")
    assert batch_packing(e) == "thd" and e["input_ids"].tolist() == [[7]] and e["attention_mask"] is None
    assert e["cu_seqlens"].tolist() == [0, 1] and e["label_index"].numel() == 0
    assert batch_packing(empty_batch(7)) == "dense_mask"


def test_model_rejects_inconsistent_thd_inputs():
    from dapo_mcore.models.gpt import _check_thd_inputs

    b = collate_thd(_rows())
    psp, ids, pos = b["packed_seq_params"], b["input_ids"], b["position_ids"]
    _check_thd_inputs(ids, pos, None, psp)
    with pytest.raises(ValueError, match="attention_mask=None"):
        _check_thd_inputs(ids, pos, torch.zeros(1, 1, 25, 25, dtype=torch.bool), psp)
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        _check_thd_inputs(ids[:, :-1], pos[:, :-1], None, psp)
    with pytest.raises(ValueError, match="restart at 0"):
        _check_thd_inputs(ids, torch.arange(25)[None], None, psp)


def _core_attention(paths):
    from dapo_mcore.models.gpt import _layer_spec

    return _layer_spec(paths).submodules.self_attention.submodules.core_attention


def test_switch_selects_thd_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from dapo_mcore.models.gpt import model_packing

    cpu = resolve(FastPathConfig(mode="cpu"), tp=1)
    assert cpu.packing == "dense_mask" and _core_attention(cpu) is DotProductAttention
    thd = dataclasses.replace(cpu, packing="thd")
    ca = _core_attention(thd)
    assert isinstance(ca, functools.partial) and ca.func is ThdCoreAttention
    assert ca.keywords == {"masked": DotProductAttention, "thd": None}
    flex = _core_attention(dataclasses.replace(thd, shared_prefix_attention="flex"))
    assert flex.func is ThdCoreAttention and flex.keywords["masked"] is FlexCoreAttention
    assert model_packing([SimpleNamespace(module=SimpleNamespace(packing="thd"))]) == "thd"
    assert model_packing(torch.nn.Linear(1, 1)) == "dense_mask"
    # the switch's CPU emulation of the GPU configuration packs THD through ThdCoreAttention
    emu = resolve(FastPathConfig(mode="emulate", bf16=False), tp=1)
    assert emu.packing == "thd" and _core_attention(emu).func is ThdCoreAttention
    assert resolve(FastPathConfig(mode="emulate", thd_packing=False), tp=1).packing == "dense_mask"


def test_thd_packed_seq_params_from_cu_seqlens():
    psp = thd_packed_seq_params(torch.tensor([0, 3, 10, 12]))
    assert psp.cu_seqlens_q.dtype == torch.int32 and psp.max_seqlen_q == 7 == psp.max_seqlen_kv


def test_thd_model_and_critic_step_equal_dense_and_tp2(tiny_qwen2, synthetic_mc, torchrun, tmp_path):
    """Full DapoGPTModel fwd+bwd: THD == dense mask == alone; one critic step and one SFT step THD == dense
    mask; TP=2 == TP=1."""
    from safetensors.torch import load_file

    for tp in (1, 2):
        torchrun("thd_worker.py", tp, tp, tiny_qwen2, synthetic_mc, tmp_path / f"tp{tp}")
    for tp in (1, 2):
        m = json.loads((tmp_path / f"tp{tp}" / "model.json").read_text())
        for key in ("thd_vs_dense", "thd_vs_alone", "dense_vs_alone"):
            assert m[key]["logits"] < 1e-5 and m[key]["grads"] < 1e-5, (tp, key, m[key])
            assert m[key]["n_grads"] > 20
        assert m["merged_vs_alone"] > 1e-2, m        # the check can fail: one merged document differs
        assert m["thd_tokens"] == 36 < m["dense_tokens"] and m["thd_max_seqlen"] == 12
    ref = load_file(str(tmp_path / "tp1" / "critic_dense_mask.safetensors"))
    ref_loss = json.loads((tmp_path / "tp1" / "critic_dense_mask.json").read_text())
    for tp in (1, 2):
        for packing in ("thd", "dense_mask"):
            got = load_file(str(tmp_path / f"tp{tp}" / f"critic_{packing}.safetensors"))
            res = json.loads((tmp_path / f"tp{tp}" / f"critic_{packing}.json").read_text())
            assert set(got) == set(ref) and "score.weight" in got
            for k in ref:
                assert (got[k] - ref[k]).abs().max() <= 1e-5 * ref[k].abs().max() + 1e-12, (tp, packing, k)
            assert res["count"] == ref_loss["count"] and abs(res["loss"] - ref_loss["loss"]) < 1e-6 * ref_loss["loss"]
            if packing == "thd":       # padding-free: exactly the examples' tokens are computed
                assert res["tokens_computed"] == res["real_tokens"] == res["example_tokens"]
    sft_ref = load_file(str(tmp_path / "tp1" / "sft_dense_mask.safetensors"))
    sft_loss = json.loads((tmp_path / "tp1" / "sft_dense_mask.json").read_text())
    for tp in (1, 2):
        for packing in ("thd", "dense_mask"):
            got = load_file(str(tmp_path / f"tp{tp}" / f"sft_{packing}.safetensors"))
            res = json.loads((tmp_path / f"tp{tp}" / f"sft_{packing}.json").read_text())
            assert set(got) == set(sft_ref) and res["count"] == sft_loss["count"] == 26
            assert abs(res["loss"] - sft_loss["loss"]) < 1e-5 * sft_loss["loss"], (tp, packing, res, sft_loss)
            for k in sft_ref:
                assert (got[k] - sft_ref[k]).abs().max() <= 1e-5 * sft_ref[k].abs().max() + 1e-12, (tp, packing, k)
